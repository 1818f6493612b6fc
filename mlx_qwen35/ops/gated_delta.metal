// Gated delta rule, sequential in time, state in registers.
//
// This file is the body of a kernel: mx.fast.metal_kernel generates the
// signature around it on a Mac, and tests/metal_shim compiles the same text
// as C++ on the CPU. Inputs: q, k [B,T,Hk,Dk]; v [B,T,Hv,Dv]; g, beta
// [B,T,Hv] (float32); state_in [B,Hv,Dv,Dk] (float32); mask [B,T] (bool,
// read only when HAS_MASK); T. Outputs: y [B,T,Hv,Dv] (YT), state_out.
// Template constants: YT, Dk, Dv, Hk, Hv, LANES, HAS_MASK.
//
// Geometry: grid (32, Dv / ROWS, B * Hv), threadgroups of 32 x n. Each
// SIMD-group owns ROWS = 32 / LANES value rows of one (batch, value head);
// LANES adjacent lanes share a row, lane `sub` holding its columns
// sub, sub + LANES, ... (Dk / LANES floats). Row dot products reduce over
// those LANES lanes: simd_sum when a row spans the SIMD-group, else a
// butterfly of simd_shuffle_xor that never leaves the row's lanes. Masking
// depends only on (b, t), so control flow stays uniform in a SIMD-group.

constexpr int ROWS = 32 / LANES;
constexpr int PER = Dk / LANES;

const int lane = int(thread_index_in_simdgroup);
const int sub = lane % LANES;
const int n = int(thread_position_in_grid.z);
const int b = n / Hv;
const int hv = n % Hv;
const int hk = hv / (Hv / Hk);
const int row = int(thread_position_in_grid.y) * ROWS + lane / LANES;

auto q_ = q + (b * T * Hk + hk) * Dk + sub;
auto k_ = k + (b * T * Hk + hk) * Dk + sub;
auto v_ = v + (b * T * Hv + hv) * Dv + row;
auto y_ = y + (b * T * Hv + hv) * Dv + row;
auto g_ = g + b * T * Hv + hv;
auto beta_ = beta + b * T * Hv + hv;
auto mask_ = mask + (HAS_MASK ? b * T : 0);

float s[PER];
auto s_in = state_in + (n * Dv + row) * Dk + sub;
for (int j = 0; j < PER; ++j) {
  s[j] = s_in[j * LANES];
}

for (int t = 0; t < T; ++t) {
  if (!HAS_MASK || mask_[t]) {
    // k and q are re-read rather than held: with 32 state floats a lane
    // (LANES = 4, Dk = 128) registers go to the state.
    const auto kt = k_ + t * Hk * Dk;
    const auto qt = q_ + t * Hk * Dk;
    const float gt = g_[t * Hv];
    const float bt = beta_[t * Hv];
    float kv = 0.0f;
    for (int j = 0; j < PER; ++j) {
      s[j] *= gt;
      kv += s[j] * static_cast<float>(kt[j * LANES]);
    }
    if (LANES == 32) {
      kv = simd_sum(kv);
    } else {
      for (int m = LANES / 2; m > 0; m /= 2) {
        kv += simd_shuffle_xor(kv, ushort(m));
      }
    }
    const float delta = (static_cast<float>(v_[t * Hv * Dv]) - kv) * bt;
    float out = 0.0f;
    for (int j = 0; j < PER; ++j) {
      s[j] += static_cast<float>(kt[j * LANES]) * delta;
      out += s[j] * static_cast<float>(qt[j * LANES]);
    }
    if (LANES == 32) {
      out = simd_sum(out);
    } else {
      for (int m = LANES / 2; m > 0; m /= 2) {
        out += simd_shuffle_xor(out, ushort(m));
      }
    }
    if (sub == 0) {
      y_[t * Hv * Dv] = static_cast<YT>(out);
    }
  } else if (sub == 0) {
    y_[t * Hv * Dv] = static_cast<YT>(0.0f);
  }
}

auto s_out = state_out + (n * Dv + row) * Dk + sub;
for (int j = 0; j < PER; ++j) {
  s_out[j * LANES] = s[j];
}
