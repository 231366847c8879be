// The NLL's per-channel math, shared by the CPU loop and the CUDA kernels (schemas in csrc/ops.cpp):
// sigma's parametrizations (docs/method.md's table) with their derivatives. No ATen tensor headers:
// the CUDA kernels' translation units include it (batchless_common.h says why).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace batchless_kernels {
namespace nll {

enum class Parametrization { kAbs, kLog, kInv };

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

}  // namespace nll
}  // namespace batchless_kernels
