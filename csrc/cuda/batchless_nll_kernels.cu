// The NLL term and its gradients from the per-channel sums s1, s2 on the GPU: one small kernel each,
// instead of the ~25 tensor ops of the composite formula, and no host synchronization (grad_nll is
// read on the device). The host side is batchless_nll_cuda.cpp.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "batchless_common.h"
#include "batchless_nll_math.h"
#include "cuda/batchless_nll_cuda.cuh"
#include "cuda/block_reduce.cuh"

namespace batchless_kernels {
namespace cuda_nll {
namespace {

using nll::Parametrization;
using nll::Sigma;

constexpr int kNllThreads = 256;

// One block: sums log sigma_c and s2_c over the channels (in a fixed order), then one thread
// writes the value.
template <typename acc_t>
__global__ void __launch_bounds__(kNllThreads)
    nll_kernel(const acc_t* __restrict__ s2, const acc_t* __restrict__ param, int64_t C,
               acc_t count, Parametrization kind, acc_t eps, bool gauge, acc_t* __restrict__ out) {
  acc_t log_total = 0, data_total = 0;
  for (int64_t c = threadIdx.x; c < C; c += kNllThreads) {
    log_total += Sigma<acc_t>(param[c], kind, eps).log_sigma;
    data_total += s2[c];
  }
  __shared__ acc_t scratch[kNllThreads / 32];
  log_total = block_sum<kNllThreads>(log_total, scratch);
  data_total = block_sum<kNllThreads>(data_total, scratch);
  if (threadIdx.x == 0) {
    const acc_t data = data_total / (acc_t(2) * count * acc_t(C));
    // With the gauge, the mean log sigma cancels in value (it stays in the gradient), as
    // mean_log - sg(mean_log): NaN, as in the reference, where a sigma is not finite.
    const acc_t mean_log = log_total / acc_t(C);
    *out = gauge ? data - acc_t(0.5) + (mean_log - mean_log) : mean_log + data;
  }
}

template <typename acc_t>
__global__ void nll_backward_kernel(const acc_t* __restrict__ grad_nll, const acc_t* __restrict__ s1,
                                    const acc_t* __restrict__ s2, const acc_t* __restrict__ param,
                                    int64_t C, acc_t count, Parametrization kind, acc_t eps,
                                    acc_t* __restrict__ dmean, acc_t* __restrict__ dparam) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t g = *grad_nll / acc_t(C);
  const nll::NllGrads<acc_t> grads(Sigma<acc_t>(param[c], kind, eps), g, s1[c], s2[c], count);
  dmean[c] = grads.dmean;
  dparam[c] = grads.dparam;
}

}  // namespace

template <typename acc_t>
void launch_nll(const acc_t* s2, const acc_t* std_param, int64_t C, acc_t count, Parametrization kind,
                acc_t eps, bool gauge, acc_t* out) {
  nll_kernel<acc_t><<<1, kNllThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(s2, std_param, C, count, kind,
                                                                                eps, gauge, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_nll_backward(const acc_t* grad_nll, const acc_t* s1, const acc_t* s2, const acc_t* std_param,
                         int64_t C, acc_t count, Parametrization kind, acc_t eps, acc_t* dmean,
                         acc_t* dparam) {
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>(host::ceil_div(C, kThreads));
  nll_backward_kernel<acc_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      grad_nll, s1, s2, std_param, C, count, kind, eps, dmean, dparam);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define BATCHLESS_NLL_CUDA_KERNELS(T)                                                                       \
  template void launch_nll<T>(const T*, const T*, int64_t, T, Parametrization, T, bool, T*);                \
  template void launch_nll_backward<T>(const T*, const T*, const T*, const T*, int64_t, T, Parametrization, \
                                       T, T*, T*);
BATCHLESS_NLL_CUDA_KERNELS(float)
BATCHLESS_NLL_CUDA_KERNELS(double)
#undef BATCHLESS_NLL_CUDA_KERNELS

}  // namespace cuda_nll
}  // namespace batchless_kernels
