// The NLL's host side (schemas in csrc/ops.cpp): the parametrization's name, r by tensor ops, the
// argument checks, and the ops' entry points that other files call; its per-channel math, shared by
// the CPU loop and the CUDA kernels, is in batchless_nll_math.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "batchless_nll_math.h"

namespace batchless_kernels {
namespace nll {

using at::Tensor;

inline Parametrization parse_parametrization(c10::string_view name, const char* op = "batchless_nll") {
  if (name == "abs") return Parametrization::kAbs;
  if (name == "log") return Parametrization::kLog;
  if (name == "inv") return Parametrization::kInv;
  TORCH_CHECK(false, op, ": parametrization must be 'abs', 'log' or 'inv', got '", std::string(name), "'");
}

// eps must be a normal number of the accumulation dtype `acc` (float or double): below the smallest
// one 1/eps overflows there, and a constant channel's sigma = |p| + eps gave +-inf; above the largest
// it is inf there (and its cast undefined). The Python entry points refuse the same
// (_checks.check_eps_normal).
inline void check_eps(double eps, at::ScalarType acc, const char* op) {
  const bool is_double = acc == at::kDouble;
  const double tiny = is_double ? std::numeric_limits<double>::min()
                                : static_cast<double>(std::numeric_limits<float>::min());
  const double max = is_double ? std::numeric_limits<double>::max()
                               : static_cast<double>(std::numeric_limits<float>::max());
  TORCH_CHECK(eps >= tiny && eps <= max, op, ": eps must be a positive finite float, a normal ",
              is_double ? "float64" : "float32", " number (", tiny, " to ", max, ") where the op computes, got ", eps);
}

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
  TORCH_CHECK(at::isFloatingType(mean.scalar_type()) && at::isFloatingType(std_param.scalar_type()),
              "batchless_nll: mean and std_param must have floating dtypes, got ", mean.scalar_type(), " and ",
              std_param.scalar_type());
  check_eps(eps, s1.scalar_type(), "batchless_nll");
  TORCH_CHECK(s2.device() == s1.device() && mean.device() == s1.device() &&
                  std_param.device() == s1.device(),
              "batchless_nll: s1, s2, mean, std_param must be on one device, got ", s1.device(), ", ",
              s2.device(), ", ", mean.device(), ", ", std_param.device());
}

// The NLL's incoming gradient where a kernel reads it on the device: one floating element on s1's
// device (a complex one lost its imaginary part).
inline void check_grad_nll(const Tensor& grad_nll, const Tensor& s1, const char* op) {
  TORCH_CHECK(grad_nll.numel() == 1 && grad_nll.device() == s1.device() &&
                  at::isFloatingType(grad_nll.scalar_type()),
              op, ": grad_nll must be a one-element floating tensor on ", s1.device(), ", got shape ",
              grad_nll.sizes(), " of ", grad_nll.scalar_type(), " on ", grad_nll.device());
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

// batchless_nll_backward on the GPU (csrc/cuda/batchless_nll_cuda.cpp), also run by the training
// backward where its second stage does not compute the NLL's gradients.
std::tuple<at::Tensor, at::Tensor> nll_backward_cuda(const at::Tensor& grad_nll, const at::Tensor& s1,
                                                     const at::Tensor& s2, const at::Tensor& mean,
                                                     const at::Tensor& std_param, int64_t count,
                                                     c10::string_view parametrization, double eps);

}  // namespace batchless_kernels
