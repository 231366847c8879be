// The NLL term and its gradients from the per-channel sums s1, s2 (schemas in csrc/ops.cpp):
// O(C) scalar work, done in one loop instead of a chain of small tensor ops.
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "batchless_host.h"
#include "batchless_nll.h"

#include <cmath>
#include <string>
#include <tuple>

namespace batchless_kernels {

using at::Tensor;

namespace {
using nll::check_nll_args;
using nll::parse_parametrization;
using nll::Parametrization;
using nll::Sigma;
}  // namespace

Tensor nll_cpu(const Tensor& s1, const Tensor& s2, const Tensor& mean, const Tensor& std_param,
               int64_t count, c10::string_view parametrization, double eps, bool gauge) {
  check_nll_args(s1, s2, mean, std_param, count, eps);
  const auto kind = parse_parametrization(parametrization);
  Tensor out = at::empty({}, s1.options());
  AT_DISPATCH_FLOATING_TYPES(s1.scalar_type(), "batchless_nll", [&] {
    const Tensor s2c = s2.contiguous();
    const Tensor pc = host::in_dtype(std_param, s1.scalar_type()).contiguous();
    const scalar_t* s2p = s2c.const_data_ptr<scalar_t>();
    const scalar_t* pp = pc.const_data_ptr<scalar_t>();
    const int64_t C = pc.numel();
    // Totals over channels in double: one float32 chain over C channels drifted by 6e-4 of the NLL
    // at C = 65537 (the CUDA and Triton reductions add in trees). C adds, next to the sums' C * count.
    double log_total = 0, data_total = 0;
    for (int64_t c = 0; c < C; ++c) {
      log_total += Sigma<scalar_t>(pp[c], kind, scalar_t(eps)).log_sigma;
      data_total += s2p[c];
    }
    const auto mean_log = static_cast<scalar_t>(log_total / static_cast<double>(C));
    const auto data = static_cast<scalar_t>(data_total / (2.0 * static_cast<double>(count) * static_cast<double>(C)));
    // With the gauge, mean_log cancels in value (it stays in the gradient through nll_backward), as
    // mean_log - sg(mean_log): NaN, as in the reference, where a sigma is not finite.
    *out.data_ptr<scalar_t>() = gauge ? data - scalar_t(0.5) + (mean_log - mean_log) : mean_log + data;
  });
  return out;
}

std::tuple<Tensor, Tensor> nll_backward_cpu(const Tensor& grad_nll, const Tensor& s1,
                                            const Tensor& s2, const Tensor& mean,
                                            const Tensor& std_param, int64_t count,
                                            c10::string_view parametrization, double eps) {
  check_nll_args(s1, s2, mean, std_param, count, eps);
  nll::check_grad_nll(grad_nll, s1, "batchless_nll_backward");
  const auto kind = parse_parametrization(parametrization);
  const auto acc = s1.scalar_type();
  Tensor dmean = at::empty({mean.numel()}, s1.options());
  Tensor dparam = at::empty({std_param.numel()}, s1.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "batchless_nll_backward", [&] {
    const Tensor s1c = s1.contiguous(), s2c = s2.contiguous();
    const Tensor pc = host::in_dtype(std_param, acc).contiguous();
    const scalar_t* s1p = s1c.const_data_ptr<scalar_t>();
    const scalar_t* s2p = s2c.const_data_ptr<scalar_t>();
    const scalar_t* pp = pc.const_data_ptr<scalar_t>();
    scalar_t* dm = dmean.data_ptr<scalar_t>();
    scalar_t* dp = dparam.data_ptr<scalar_t>();
    const int64_t C = pc.numel();
    // grad_nll's one value (a CPU tensor of the sums' dtype, as autograd passes it: read in place)
    const bool in_place = grad_nll.numel() == 1 && grad_nll.is_cpu() && grad_nll.scalar_type() == acc;
    const scalar_t g = (in_place ? *grad_nll.const_data_ptr<scalar_t>() : grad_nll.item().to<scalar_t>()) / C;
    const scalar_t n = scalar_t(count);
    for (int64_t c = 0; c < C; ++c) {
      const nll::NllGrads<scalar_t> grads(Sigma<scalar_t>(pp[c], kind, scalar_t(eps)), g, s1p[c], s2p[c], n);
      dm[c] = grads.dmean;
      dp[c] = grads.dparam;
    }
  });
  return {host::in_dtype(dmean, mean.scalar_type()), host::in_dtype(dparam, std_param.scalar_type())};
}

TORCH_LIBRARY_IMPL(batchless_kernels, CPU, m) {
  m.impl("batchless_nll", &nll_cpu);
  m.impl("batchless_nll_backward", &nll_backward_cpu);
}

}  // namespace batchless_kernels
