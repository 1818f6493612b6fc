// Runs mlx_qwen35/kernels/gated_delta.metal on the CPU through metal_shim.h.
//
// Build (the test does it): g++ -std=c++17 -O1 -shared -fPIC
//   -I tests/metal_shim -I mlx_qwen35/kernels
//   -DGDN_DK=.. -DGDN_DV=.. -DGDN_HK=.. -DGDN_HV=.. -DGDN_LANES=.. harness.cpp -o harness.so
// and call gdn_run through ctypes.
#include <cstdio>

#include "metal_shim.h"

// The parameter list mx.fast.metal_kernel generates for the launch in
// mlx_qwen35/gated_delta.py: template constants in the order given there,
// inputs (q, k, v, g, beta, state_in, mask, T), outputs (y, state_out), then
// the attributes the body names. The input element types are template
// parameters here because MLX writes each input's dtype into the signature.
template <typename YT, int Dk, int Dv, int Hk, int Hv, int LANES, int HAS_MASK, typename QT, typename VT>
void gated_delta_kernel(
    const device QT* q,
    const device QT* k,
    const device VT* v,
    const device float* g,
    const device float* beta,
    const device float* state_in,
    const device bool* mask,
    const constant int& T,
    device YT* y,
    device float* state_out,
    uint thread_index_in_simdgroup,
    uint3 thread_position_in_grid) {
#include "gated_delta.metal"
}

template <typename T, int HAS_MASK>
static void launch(int B, int steps, const void* q, const void* k, const void* v, const float* g,
                   const float* beta, const float* state_in, const bool* mask, void* y,
                   float* state_out) {
  constexpr int rows = 32 / GDN_LANES;
  shim::dispatch(uint3{32, uint(GDN_DV / rows), uint(B * GDN_HV)}, [&](uint3 pos, uint lane) {
    gated_delta_kernel<T, GDN_DK, GDN_DV, GDN_HK, GDN_HV, GDN_LANES, HAS_MASK, T, T>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), g, beta,
        state_in, mask, steps, static_cast<T*>(y), state_out, lane, pos);
  });
}

// q, k, v and y are float32, or bfloat16 (as uint16 bits) when `bf16`;
// g, beta and the states float32; mask bool [B, T] when has_mask.
// Returns 0, or 1 with a message in err.
extern "C" int gdn_run(int B, int T, int has_mask, int bf16, const void* q, const void* k,
                       const void* v, const float* g, const float* beta, const float* state_in,
                       const bool* mask, void* y, float* state_out, char* err, int err_len) {
  try {
    if (bf16) {
      if (has_mask)
        launch<bfloat16_t, 1>(B, T, q, k, v, g, beta, state_in, mask, y, state_out);
      else
        launch<bfloat16_t, 0>(B, T, q, k, v, g, beta, state_in, mask, y, state_out);
    } else {
      if (has_mask)
        launch<float, 1>(B, T, q, k, v, g, beta, state_in, mask, y, state_out);
      else
        launch<float, 0>(B, T, q, k, v, g, beta, state_in, mask, y, state_out);
    }
  } catch (const std::exception& e) {
    std::snprintf(err, size_t(err_len), "%s", e.what());
    return 1;
  }
  return 0;
}
