// The interface between the host side of the CUDA norm ops (batchless_norm_cuda.cpp: checks, plans,
// dtype dispatch, registration) and their kernels (batchless_norm_kernels.cuh), which are compiled
// per dtype in two translation units, batchless_norm_kernels_fp32_bf16.cu and _fp64_fp16.cu, so that
// the build compiles them in parallel. Plain C++ on the host side: no CUDA syntax here.
#pragma once

// No ATen tensor headers here nor in the kernels (batchless_common.h says why).
#include <ATen/OpMathType.h>

#include <cstdint>

#include "batchless_common.h"
#include "batchless_nll_math.h"

namespace batchless_kernels {
namespace cuda_norm {

// Device memory for the kernels' partial sums, which the host side provides (batchless_norm_cuda.cpp:
// tensors on the op's device, freed when the op returns; the caching allocator reuses them only after
// the kernels queued on the stream), so that the kernels' translation units need no tensor headers.
class ScratchAllocator {
 public:
  // count elements of the accumulation dtype, valid until the op returns (NaN where tests poison
  // fresh outputs: host::poison_outputs).
  virtual void* allocate(int64_t count) = 0;

 protected:
  ~ScratchAllocator() = default;
};

// Per-channel parameters (C,) in the accumulation dtype; the op's plan fills absent ones. Where
// rstd is null, each thread computes r = 1/sigma from std_param (the training op: no separate kernel).
template <typename acc_t>
struct Params {
  const acc_t* mean;
  const acc_t* rstd;
  const acc_t* weight;
  const acc_t* bias;  // unused by backward
  const acc_t* std_param = nullptr;
  nll::Parametrization kind = nll::Parametrization::kLog;
  acc_t eps = 0;
};

// The training op's NLL, computed by the second stage once the sums are known (no NLL kernel):
//   nll = mean_c [log sigma_c + s2_c / (2 count)] - gauge * (mean_c log sigma_c + 1/2)
// with r_c = 1/sigma_c written out for the backward. Each block adds its channels' terms in a fixed
// order into block_sums; the last block to finish (an integer counter, zeroed by the first stage)
// adds the blocks' sums in block order: deterministic, no float atomics.
//
// The training op's backward uses the same second stage for the NLL's gradients (per channel, from
// the forward's sums: nll::NllGrads), instead of a kernel of their own: dmean, dparam set, nll null.
template <typename acc_t>
struct NllEpilogue {
  const acc_t* std_param = nullptr;  // null: no NLL (the plain forward and backward)
  nll::Parametrization kind = nll::Parametrization::kLog;
  acc_t eps = 0, count = 0;
  bool gauge = false;
  acc_t* rstd = nullptr;        // (C,)   forward
  acc_t* nll = nullptr;         // ()     forward
  acc_t* block_sums = nullptr;  // (2, blocks of the second stage)
  unsigned int* counter = nullptr;
  const acc_t* grad_nll = nullptr;  // ()    backward
  const acc_t* s1 = nullptr;        // (C,)  backward: the forward's sums
  const acc_t* s2 = nullptr;        // (C,)
  acc_t* dmean = nullptr;           // (C,)
  acc_t* dparam = nullptr;          // (C,)
};

// A forward over geometry: y from x (g.N * g.C * g.S elements in g.layout), and the sums s1, s2 (C,)
// where s1 is set (both or neither); epilogue: the training op's NLL (default: none).
template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  host::Geometry geometry;
  const scalar_t* x;
  scalar_t* y;
  Params<acc_t> params;
  acc_t* s1 = nullptr;
  acc_t* s2 = nullptr;
  ScratchAllocator* scratch = nullptr;  // for the partial sums (where s1 is set)
  NllEpilogue<acc_t> epilogue = {};
};

// A backward over geometry: each output where its pointer is set, dx from grad_y, dweight (C,) from
// grad_y and x, dbias (C,) from grad_y; x is read only for dweight (null otherwise).
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  host::Geometry geometry;
  const scalar_t* grad_y;
  const scalar_t* x = nullptr;
  scalar_t* dx = nullptr;
  Params<acc_t> params;
  acc_t* dweight = nullptr;
  acc_t* dbias = nullptr;
  ScratchAllocator* scratch = nullptr;  // for the partial sums (where dweight or dbias is set)
  NllEpilogue<acc_t> epilogue = {};
};

// Defined for double, float, c10::Half and c10::BFloat16 by the kernels' translation units
// (BATCHLESS_NORM_CUDA_KERNELS in batchless_norm_kernels.cuh).
template <typename scalar_t>
void run_forward(const ForwardArgs<scalar_t>& args);
template <typename scalar_t>
void run_backward(const BackwardArgs<scalar_t>& args);

#define BATCHLESS_NORM_CUDA_DECLARE(T)                              \
  template <>                                                       \
  void run_forward<T>(const ForwardArgs<T>& args);                  \
  template <>                                                       \
  void run_backward<T>(const BackwardArgs<T>& args);
BATCHLESS_NORM_CUDA_DECLARE(double)
BATCHLESS_NORM_CUDA_DECLARE(float)
BATCHLESS_NORM_CUDA_DECLARE(c10::Half)
BATCHLESS_NORM_CUDA_DECLARE(c10::BFloat16)
#undef BATCHLESS_NORM_CUDA_DECLARE

}  // namespace cuda_norm
}  // namespace batchless_kernels
