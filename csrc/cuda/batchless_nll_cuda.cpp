// The host side of the CUDA NLL ops (schemas in csrc/ops.cpp): checks, dtype dispatch and the calls
// of the kernels (batchless_nll_kernels.cu, through batchless_nll_cuda.cuh). Plain C++, compiled by
// the host compiler (batchless_norm_cuda.cpp says why).
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "batchless_nll.h"
#include "cuda/batchless_nll_cuda.cuh"

namespace batchless_kernels {
namespace {

using at::Tensor;

Tensor nll_cuda(const Tensor& s1, const Tensor& s2, const Tensor& mean, const Tensor& std_param,
                int64_t count, c10::string_view parametrization, double eps, bool gauge) {
  nll::check_nll_args(s1, s2, mean, std_param, count, eps);
  const auto kind = nll::parse_parametrization(parametrization);
  const c10::cuda::CUDAGuard guard(s1.device());
  Tensor out = at::empty({}, s1.options());
  AT_DISPATCH_FLOATING_TYPES(s1.scalar_type(), "batchless_nll_cuda", [&] {
    const Tensor s2c = s2.contiguous();
    const Tensor pc = std_param.to(s1.scalar_type()).contiguous();
    cuda_nll::launch_nll<scalar_t>(s2c.const_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(), pc.numel(),
                                   static_cast<scalar_t>(count), kind, static_cast<scalar_t>(eps), gauge,
                                   out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor> nll_backward_cuda(const Tensor& grad_nll, const Tensor& s1,
                                             const Tensor& s2, const Tensor& mean,
                                             const Tensor& std_param, int64_t count,
                                             c10::string_view parametrization, double eps) {
  nll::check_nll_args(s1, s2, mean, std_param, count, eps);
  nll::check_grad_nll(grad_nll, s1, "batchless_nll_backward");
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
    cuda_nll::launch_nll_backward<scalar_t>(
        g.const_data_ptr<scalar_t>(), s1c.const_data_ptr<scalar_t>(), s2c.const_data_ptr<scalar_t>(),
        pc.const_data_ptr<scalar_t>(), C, static_cast<scalar_t>(count), kind,
        static_cast<scalar_t>(eps), dmean.data_ptr<scalar_t>(), dparam.data_ptr<scalar_t>());
  });
  return {dmean.to(mean.scalar_type()), dparam.to(std_param.scalar_type())};
}

TORCH_LIBRARY_IMPL(batchless_kernels, CUDA, m) {
  m.impl("batchless_nll", &nll_cuda);
  m.impl("batchless_nll_backward", &nll_backward_cuda);
}

}  // namespace batchless_kernels
