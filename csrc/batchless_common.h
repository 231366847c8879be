// What the host side (csrc/batchless_host.h) and the CUDA kernels' translation units share without
// ATen's tensor headers, which the kernels need none of: the compute layouts and geometry, ceil_div,
// dispatch_bool and the switch that poisons fresh outputs. Measured (2026-12-01, torch 2.11, sm_90):
// batchless_norm_kernels_fp64_fp16.cu 78 CPU-seconds under nvcc against 83 with them (same SASS), the
// CUDA emulation's sanitizer stub (tests/cuda_emulation/sanitizer_dtypes.cpp) 12 s against 36-38.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace batchless_kernels {
namespace host {

// The two dense layouts the kernels read without copies.
//   channels-first  (N, C, S) contiguous, S = product of the spatial dims (NCHW, NCDHW, NCL);
//   channels-last   (M, C) with channels innermost (channels_last 4-D/5-D, (N, C), transposed (N, L, C)).
enum class Layout { kChannelsFirst, kChannelsLast };

struct Geometry {
  Layout layout;
  int64_t N, C, S;  // x viewed as (N, C, S); channels-last kernels see rows M = N * S
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template argument.
template <typename F>
void dispatch_bool(bool value, const F& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Tests set BATCHLESS_POISON_OUTPUTS=1 (before the first op call): fresh outputs then start as NaN,
// so that an element a kernel fails to write shows (at::empty would often hand back zeros or a
// previous result). Read once, not on every call.
inline bool poison_outputs() {
  static const bool enabled = [] {
    const char* flag = std::getenv("BATCHLESS_POISON_OUTPUTS");
    return flag != nullptr && flag[0] == '1';
  }();
  return enabled;
}

}  // namespace host
}  // namespace batchless_kernels
