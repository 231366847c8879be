// The NLL term and its gradients from the per-channel sums s1, s2 on the GPU (schemas in
// csrc/ops.cpp): one small kernel each, instead of the ~25 tensor ops of the composite formula,
// and no host synchronization (grad_nll is read on the device).
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "batchless_nll.h"
#include "cuda/block_reduce.cuh"

namespace batchless_kernels {
namespace {

using at::Tensor;
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
    // With the gauge, the mean log sigma cancels in value (it stays in the gradient).
    *out = gauge ? data - acc_t(0.5) : log_total / acc_t(C) + data;
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

Tensor nll_cuda(const Tensor& s1, const Tensor& s2, const Tensor& mean, const Tensor& std_param,
                int64_t count, c10::string_view parametrization, double eps, bool gauge) {
  nll::check_nll_args(s1, s2, mean, std_param, count, eps);
  const auto kind = nll::parse_parametrization(parametrization);
  const c10::cuda::CUDAGuard guard(s1.device());
  Tensor out = at::empty({}, s1.options());
  AT_DISPATCH_FLOATING_TYPES(s1.scalar_type(), "batchless_nll_cuda", [&] {
    const Tensor s2c = s2.contiguous();
    const Tensor pc = std_param.to(s1.scalar_type()).contiguous();
    nll_kernel<scalar_t><<<1, kNllThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        s2c.const_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(), pc.numel(),
        static_cast<scalar_t>(count), kind, static_cast<scalar_t>(eps), gauge,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor> nll_backward_cuda(const Tensor& grad_nll, const Tensor& s1,
                                             const Tensor& s2, const Tensor& mean,
                                             const Tensor& std_param, int64_t count,
                                             c10::string_view parametrization, double eps) {
  nll::check_nll_args(s1, s2, mean, std_param, count, eps);
  TORCH_CHECK(grad_nll.numel() == 1 && grad_nll.device() == s1.device(),
              "batchless_nll_backward: grad_nll must be a one-element tensor on ", s1.device(),
              ", got shape ", grad_nll.sizes(), " on ", grad_nll.device());
  const auto kind = nll::parse_parametrization(parametrization);
  const c10::cuda::CUDAGuard guard(s1.device());
  const auto acc = s1.scalar_type();
  const int64_t C = mean.numel();
  Tensor dmean = at::empty({C}, s1.options());
  Tensor dparam = at::empty({C}, s1.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "batchless_nll_backward_cuda", [&] {
    const Tensor g = grad_nll.to(acc).contiguous();
    const Tensor s1c = s1.contiguous(), s2c = s2.contiguous();
    const Tensor pc = std_param.to(acc).contiguous();
    constexpr int kThreads = 256;
    const auto blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
    nll_backward_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), s1c.const_data_ptr<scalar_t>(), s2c.const_data_ptr<scalar_t>(),
        pc.const_data_ptr<scalar_t>(), C, static_cast<scalar_t>(count), kind,
        static_cast<scalar_t>(eps), dmean.data_ptr<scalar_t>(), dparam.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dmean.to(mean.scalar_type()), dparam.to(std_param.scalar_type())};
}

TORCH_LIBRARY_IMPL(batchless_kernels, CUDA, m) {
  m.impl("batchless_nll", &nll_cuda);
  m.impl("batchless_nll_backward", &nll_backward_cuda);
}

}  // namespace batchless_kernels
