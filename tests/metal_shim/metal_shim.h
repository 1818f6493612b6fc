// What a Metal compute kernel body sees, provided for a C++ compiler on the CPU.
//
// mx.fast.metal_kernel wraps a source body in a generated signature (template
// constants, typed buffers, thread-position attributes) and compiles it with
// Metal's standard library. This header provides the same names in C++: the
// address-space qualifiers, uint/uint3/ushort, bfloat16_t, and the SIMD-group
// functions simd_sum and simd_shuffle_xor; tests/metal_shim/shim.py writes the
// signature and the launch from the Python launch code. Buffers are
// bounds-checked pointers (shim::device_ptr), so an access outside a buffer
// fails the launch where Metal would read or write out of bounds.
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

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

// macOS marks the ucontext calls deprecated; the tests build with -Werror.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

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

// A buffer pointer whose every access is checked against the buffer's extent.
template <class T>
class device_ptr {
 public:
  device_ptr(T* base, size_t size, ptrdiff_t offset = 0) : base_(base), size_(size), offset_(offset) {}
  device_ptr operator+(ptrdiff_t n) const { return device_ptr(base_, size_, offset_ + n); }
  T& operator[](ptrdiff_t i) const { return at(offset_ + i); }
  T& operator*() const { return at(offset_); }

 private:
  T& at(ptrdiff_t i) const {
    if (i < 0 || size_t(i) >= size_) {
      throw std::out_of_range("buffer index " + std::to_string(i) + " outside [0, " +
                              std::to_string(size_) + ")");
    }
    return base_[i];
  }
  T* base_;
  size_t size_;
  ptrdiff_t offset_;
};

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
      if (error_) {
        active_ = outer;
        std::rethrow_exception(error_);
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
    try {
      sg.body_(uint(l));
    } catch (...) {  // unwinding cannot leave the lane's stack: rethrown by run()
      sg.error_ = std::current_exception();
    }
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
  std::exception_ptr error_;
};

// dispatchThreads(grid, group) as Metal runs it: threadgroups of `group`
// threads, cut short at the grid's edge, each split into SIMD-groups of 32
// consecutive threads in x-fastest order. kernel(thread_position_in_grid,
// thread_index_in_simdgroup). A threadgroup that would leave a SIMD-group
// partly empty fails: the kernels here assume full ones.
template <class Kernel>
void dispatch(uint3 grid, uint3 group, Kernel kernel) {
  const uint size = group.x * group.y * group.z;
  if (size == 0 || size > 1024) {
    throw std::invalid_argument("threadgroup of " + std::to_string(size) + " threads (Metal: 1 to 1024)");
  }
  for (uint z0 = 0; z0 < grid.z; z0 += group.z)
    for (uint y0 = 0; y0 < grid.y; y0 += group.y)
      for (uint x0 = 0; x0 < grid.x; x0 += group.x) {
        const uint nx = std::min(group.x, grid.x - x0), ny = std::min(group.y, grid.y - y0);
        const uint n = nx * ny * std::min(group.z, grid.z - z0);
        if (n % kLanes != 0) {
          throw std::invalid_argument("a threadgroup of " + std::to_string(n) +
                                      " threads leaves a SIMD-group partly empty");
        }
        for (uint first = 0; first < n; first += kLanes) {
          SimdGroup sg([&](uint lane) {
            const uint i = first + lane;
            kernel(uint3{x0 + i % nx, y0 + i / nx % ny, z0 + i / (nx * ny)}, lane);
          });
          sg.run();
        }
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

#pragma GCC diagnostic pop
