// What a Metal compute kernel body sees, provided for a C++ compiler on the CPU.
//
// mx.fast.metal_kernel wraps a source body in a generated signature (template
// constants, typed buffers, thread-position attributes) and compiles it with
// Metal's standard library. This header provides the same names in C++: the
// address-space qualifiers, uint/uint3/ushort, bfloat16_t, and the SIMD-group
// functions simd_sum and simd_shuffle_xor.
//
// A SIMD-group is run as 32 lanes, each a cooperative thread (ucontext) with
// its own stack. Every SIMD-group function is a barrier: the lane publishes
// its value and suspends; once all 32 lanes have arrived, each resumes and
// reads what the operation defines. Lanes that do not all reach the same
// operation (non-uniform control flow around a SIMD-group function, which
// Metal leaves undefined) make the launch fail.
#pragma once

#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 600  // macOS hides the (deprecated) ucontext calls without it
#endif
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#define device
#define constant

using uint = unsigned int;
using ushort = unsigned short;

struct uint3 {
  uint x, y, z;
};

// bfloat16 with round-to-nearest-even, as Metal converts float to bfloat.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // quiet NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = uint16_t(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

namespace shim {

constexpr int kLanes = 32;

class SimdGroup {
 public:
  explicit SimdGroup(std::function<void(uint lane)> body) : body_(std::move(body)) {}

  // Runs the 32 lanes to completion, barrier by barrier.
  void run() {
    constexpr size_t kStack = 256 * 1024;
    stacks_.reset(new char[kStack * kLanes]);
    for (int l = 0; l < kLanes; ++l) {
      getcontext(&lanes_[l]);
      lanes_[l].uc_stack.ss_sp = stacks_.get() + l * kStack;
      lanes_[l].uc_stack.ss_size = kStack;
      lanes_[l].uc_link = &scheduler_;
      makecontext(&lanes_[l], &SimdGroup::entry, 0);
      done_[l] = false;
      phase_[l] = 0;
    }
    SimdGroup* outer = active_;
    active_ = this;
    for (;;) {
      int waiting = 0;
      for (int l = 0; l < kLanes; ++l) {
        if (done_[l]) continue;
        lane_ = l;
        op_[l] = -1;
        swapcontext(&scheduler_, &lanes_[l]);
        waiting += op_[l] >= 0;
      }
      if (waiting == 0) break;
      if (waiting != kLanes) {
        active_ = outer;
        throw std::runtime_error(
            "SIMD-group function reached by " + std::to_string(waiting) + " of 32 lanes");
      }
      for (int l = 1; l < kLanes; ++l) {
        if (op_[l] != op_[0]) {
          active_ = outer;
          throw std::runtime_error("lanes disagree on the SIMD-group function at a barrier");
        }
      }
    }
    active_ = outer;
  }

  // The SIMD-group function of the calling lane: publish, wait for all, read.
  template <class Read>
  static float exchange(float x, int op, Read read) {
    SimdGroup& sg = *active_;
    const int l = sg.lane_;
    const int p = sg.phase_[l];
    sg.slots_[p][l] = x;
    sg.op_[l] = op;
    swapcontext(&sg.lanes_[l], &sg.scheduler_);
    // Slots alternate between two banks, so a lane that runs ahead into the
    // next function cannot overwrite values others have yet to read.
    sg.phase_[l] ^= 1;
    return read(sg.slots_[p], l);
  }

 private:
  static void entry() {
    SimdGroup& sg = *active_;
    const int l = sg.lane_;
    sg.body_(uint(l));
    sg.done_[l] = true;
  }

  static inline thread_local SimdGroup* active_ = nullptr;
  std::function<void(uint)> body_;
  std::unique_ptr<char[]> stacks_;
  ucontext_t scheduler_;
  ucontext_t lanes_[kLanes];
  float slots_[2][kLanes];
  int op_[kLanes];
  int phase_[kLanes];
  bool done_[kLanes];
  int lane_ = 0;
};

// dispatch_threads over `grid` (grid.x a multiple of 32): one SIMD-group per
// 32 consecutive x positions, as in threadgroups whose x extent is 32·k.
template <class Kernel>
void dispatch(uint3 grid, Kernel kernel) {
  if (grid.x % kLanes != 0) throw std::invalid_argument("grid.x must be a multiple of 32");
  for (uint z = 0; z < grid.z; ++z)
    for (uint y = 0; y < grid.y; ++y)
      for (uint x0 = 0; x0 < grid.x; x0 += kLanes) {
        SimdGroup sg([&](uint lane) { kernel(uint3{x0 + lane, y, z}, lane); });
        sg.run();
      }
}

}  // namespace shim

inline float simd_sum(float x) {
  return shim::SimdGroup::exchange(x, 0, [](const float* v, int) {
    float s = 0.0f;
    for (int i = 0; i < shim::kLanes; ++i) s += v[i];
    return s;
  });
}

inline float simd_shuffle_xor(float x, ushort mask) {
  return shim::SimdGroup::exchange(x, 1 + int(mask), [mask](const float* v, int l) {
    return v[(l ^ int(mask)) & (shim::kLanes - 1)];
  });
}
