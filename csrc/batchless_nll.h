// The NLL's per-channel math, shared by the CPU loop and the CUDA kernels (schemas in csrc/ops.cpp):
// sigma's parametrizations (docs/method.md's table) with their derivatives, and the argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <string>
#include <tuple>

namespace batchless_kernels {
namespace nll {

using at::Tensor;

enum class Parametrization { kAbs, kLog, kInv };

inline Parametrization parse_parametrization(c10::string_view name) {
  if (name == "abs") return Parametrization::kAbs;
  if (name == "log") return Parametrization::kLog;
  if (name == "inv") return Parametrization::kInv;
  TORCH_CHECK(false, "batchless_nll: parametrization must be 'abs', 'log' or 'inv', got '",
              std::string(name), "'");
}

// r = 1/sigma from p, per docs/method.md's parametrization table: the kernels' r on every device.
template <typename acc_t>
C10_HOST_DEVICE acc_t rstd_value(acc_t p, Parametrization kind, acc_t eps) {
  switch (kind) {
    case Parametrization::kAbs:
      return acc_t(1) / (std::abs(p) + eps);
    case Parametrization::kLog:
      return std::exp(-p);
    case Parametrization::kInv:
      break;
  }
  return p;
}

// r = 1/sigma, log sigma and their derivatives in p, per docs/method.md's parametrization table.
// d log|r| / dp rather than dr/dp: the NLL's data term needs (s2 / n) dlog|r|/dp, and dr/dp = -r^2
// (abs) overflows float32 for sigma below ~1e-19 where the product is representable.
template <typename acc_t>
struct Sigma {
  acc_t r = 0, log_sigma = 0, dlog_r_dp = 0, dlog_sigma_dp = 0;
  C10_HOST_DEVICE Sigma(acc_t p, Parametrization kind, acc_t eps) {
    const acc_t sign = p > 0 ? acc_t(1) : (p < 0 ? acc_t(-1) : acc_t(0));  // d|p|/dp, 0 at 0
    r = rstd_value(p, kind, eps);
    switch (kind) {
      case Parametrization::kAbs: {
        const acc_t sigma = std::abs(p) + eps;
        log_sigma = std::log(sigma);
        dlog_sigma_dp = sign * r;
        dlog_r_dp = -dlog_sigma_dp;
        break;
      }
      case Parametrization::kLog:
        log_sigma = p;
        dlog_r_dp = acc_t(-1);
        dlog_sigma_dp = acc_t(1);
        break;
      case Parametrization::kInv: {
        const acc_t a = std::abs(p) + eps;
        log_sigma = -std::log(a);
        // p = 0 gives r = 0, hence xhat = 0 and s2 = 0: no data term (0 instead of 1/0).
        dlog_r_dp = p != 0 ? acc_t(1) / p : acc_t(0);
        dlog_sigma_dp = -sign / a;
        break;
      }
    }
  }
};

// The NLL's gradients for one channel (batchless_nll_backward's formulas, csrc/ops.cpp), with
// g = grad_nll / C and the forward's sums s1, s2 over `count` elements.
template <typename acc_t>
struct NllGrads {
  acc_t dmean, dparam;
  C10_HOST_DEVICE NllGrads(const Sigma<acc_t>& s, acc_t g, acc_t s1, acc_t s2, acc_t count)
      : dmean(-g * s.r * (s1 / count)), dparam(g * (s.dlog_sigma_dp + (s2 / count) * s.dlog_r_dp)) {}
};

// r = 1/sigma per channel as a fresh tensor in dtype `acc`, by the same ops as
// parametrization.rstd_and_log_std (the CUDA training forward's r for an empty x, where no kernel
// runs). Never std_param itself: an op's output does not alias its input.
inline Tensor rstd_of(const Tensor& std_param, at::ScalarType acc, Parametrization kind, double eps) {
  const Tensor p = std_param.scalar_type() == acc ? std_param : std_param.to(acc);
  switch (kind) {
    case Parametrization::kAbs:
      return p.abs().add(eps).reciprocal();
    case Parametrization::kLog:
      return p.neg().exp();
    case Parametrization::kInv:
      break;
  }
  return p.is_same(std_param) ? p.clone() : p;
}

inline void check_nll_args(const Tensor& s1, const Tensor& s2, const Tensor& mean,
                           const Tensor& std_param, int64_t count, double eps) {
  const int64_t C = mean.numel();
  TORCH_CHECK(s1.dim() == 1 && s2.dim() == 1 && mean.dim() == 1 && std_param.dim() == 1 &&
                  s1.numel() == C && s2.numel() == C && std_param.numel() == C,
              "batchless_nll: s1, s2, mean, std_param must all have shape (C,), got ", s1.sizes(),
              ", ", s2.sizes(), ", ", mean.sizes(), ", ", std_param.sizes());
  TORCH_CHECK(s1.scalar_type() == s2.scalar_type() &&
                  (s1.scalar_type() == at::kFloat || s1.scalar_type() == at::kDouble),
              "batchless_nll: s1 and s2 must both be float32 or float64");
  TORCH_CHECK(count > 0 && C > 0, "batchless_nll: needs count > 0 and C > 0 (an empty input has no NLL "
              "to compute), got count=", count, ", C=", C);
  TORCH_CHECK(eps > 0, "batchless_nll: eps must be positive, got ", eps);
  TORCH_CHECK(s2.device() == s1.device() && mean.device() == s1.device() &&
                  std_param.device() == s1.device(),
              "batchless_nll: s1, s2, mean, std_param must be on one device, got ", s1.device(), ", ",
              s2.device(), ", ", mean.device(), ", ", std_param.device());
}

}  // namespace nll

// batchless_nll and batchless_nll_backward on the CPU (csrc/cpu/batchless_nll_cpu.cpp), also called
// directly by the CPU training ops.
at::Tensor nll_cpu(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& mean, const at::Tensor& std_param,
                   int64_t count, c10::string_view parametrization, double eps, bool gauge);
std::tuple<at::Tensor, at::Tensor> nll_backward_cpu(const at::Tensor& grad_nll, const at::Tensor& s1,
                                                    const at::Tensor& s2, const at::Tensor& mean,
                                                    const at::Tensor& std_param, int64_t count,
                                                    c10::string_view parametrization, double eps);

// batchless_nll_backward's CUDA kernel (csrc/cuda/batchless_nll_cuda.cu), also run by the training
// backward where its second stage does not compute the NLL's gradients.
std::tuple<at::Tensor, at::Tensor> nll_backward_cuda(const at::Tensor& grad_nll, const at::Tensor& s1,
                                                     const at::Tensor& s2, const at::Tensor& mean,
                                                     const at::Tensor& std_param, int64_t count,
                                                     c10::string_view parametrization, double eps);

}  // namespace batchless_kernels
