// Autograd of the forward ops (batchless_norm_forward, triton_forward) and batchless_nll, for every
// backend's kernels (CPU, CUDA, triton), in C++: a Python autograd registration costs tens of
// microseconds per call, more than the kernels themselves on small inputs.
//
// batchless_norm_forward (triton_forward alike, with triton_backward): y carries gradient to x, weight, bias; s1, s2 carry none (sg(x) in the
// NLL); mean and rstd are constants of the op (the NLL op trains them). Backward: the fused
// backward op; with create_graph (grad mode on in backward) the same formulas in differentiable
// ATen ops, so that higher-order gradients flow.
// batchless_nll: gradient to mean and std_param by the nll_backward op; with create_graph, autograd
// of batchless_nll_composite (the same value in differentiable ops).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "batchless_host.h"

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace batchless_kernels {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using ForwardSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&,
    const c10::optional<Tensor>&, bool);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const c10::optional<Tensor>&, const Tensor&, const Tensor&,
    const c10::optional<Tensor>&, std::array<bool, 3>);

using NllSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::SymInt,
                            c10::string_view, double, bool);
using NllBackwardSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                        const Tensor&, const Tensor&, c10::SymInt,
                                                        c10::string_view, double);

bool present(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// The backward op's formulas in differentiable ATen ops (create_graph=True). Not fused.
std::tuple<Tensor, Tensor, Tensor> differentiable_backward(const Tensor& grad_y, const Tensor& x,
                                                           const Tensor& mean, const Tensor& rstd,
                                                           const Tensor& weight,
                                                           std::array<bool, 3> mask) {
  const auto acc = host::accumulation_type(grad_y.scalar_type());
  std::vector<int64_t> view(grad_y.dim(), 1), dims{0};
  view[1] = grad_y.size(1);
  for (int64_t d = 2; d < grad_y.dim(); ++d) dims.push_back(d);
  const Tensor g = grad_y.to(acc);
  const Tensor r = rstd.to(acc).view(view);
  Tensor dx, dw, db;
  if (mask[0]) dx = (g * (weight.defined() ? r * weight.to(acc).view(view) : r)).to(grad_y.scalar_type());
  if (mask[1]) dw = (g * ((x.to(acc) - mean.to(acc).view(view)) * r)).sum(dims);
  if (mask[2]) db = g.sum(dims);
  return {dx, dw, db};
}

// A forward op and the backward op that differentiates it (csrc/ops.cpp).
struct CompiledKernels {
  static constexpr const char* forward = "batchless_kernels::batchless_norm_forward";
  static constexpr const char* backward = "batchless_kernels::batchless_norm_backward";
};
struct TritonKernels {
  static constexpr const char* forward = "batchless_kernels::triton_forward";
  static constexpr const char* backward = "batchless_kernels::triton_backward";
};

template <typename Kernels>
class NormForward : public torch::autograd::Function<NormForward<Kernels>> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& mean,
                               const Tensor& rstd, const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, bool compute_stats) {
    static const auto op = find_op<ForwardSignature>(Kernels::forward);
    Tensor y, s1, s2;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, s1, s2) = op.call(x, mean, rstd, weight, bias, compute_stats);
    }
    ctx->mark_non_differentiable({s1, s2});
    const bool has_w = present(weight), has_b = present(bias);
    // x is needed only for dweight (dx = grad_y * weight * rstd does not read it).
    const bool keep_x = has_w && weight->requires_grad();
    ctx->save_for_backward({keep_x ? x : Tensor(), mean, rstd, has_w ? *weight : Tensor()});
    ctx->saved_data["has_bias"] = has_b;
    ctx->saved_data["weight_dtype"] = has_w ? static_cast<int64_t>(weight->scalar_type()) : int64_t(-1);
    ctx->saved_data["bias_dtype"] = has_b ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
    return {y, s1, s2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &mean = saved[1], &rstd = saved[2], &weight = saved[3];
    const bool has_w = weight.defined(), has_b = ctx->saved_data["has_bias"].toBool();
    // Graph edges follow the tensor arguments present: x, mean, rstd, [weight], [bias].
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), has_w && ctx->needs_input_grad(3),
                                      has_b && ctx->needs_input_grad(has_w ? 4 : 3)};
    const Tensor& grad_y = grads[0];
    variable_list out(6);
    if (!grad_y.defined() || !(mask[0] || mask[1] || mask[2])) return out;
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      std::tie(dx, dw, db) = differentiable_backward(grad_y, x, mean, rstd, weight, mask);
    } else {
      static const auto backward_op = find_op<BackwardSignature>(Kernels::backward);
      std::tie(dx, dw, db) = backward_op.call(grad_y, mask[1] ? c10::optional<Tensor>(x) : c10::nullopt,
                                                mean, rstd, has_w ? c10::optional<Tensor>(weight) : c10::nullopt,
                                                mask);
    }
    if (mask[0]) out[0] = dx;
    if (mask[1]) out[3] = dw.to(static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt()));
    if (mask[2]) out[4] = db.to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
    return out;
  }
};

class Nll : public torch::autograd::Function<Nll> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& s1, const Tensor& s2,
                               const Tensor& mean, const Tensor& std_param, c10::SymInt count,
                               c10::string_view parametrization, double eps, bool gauge) {
    static const auto op = find_op<NllSignature>("batchless_kernels::batchless_nll");
    Tensor value;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      value = op.call(s1, s2, mean, std_param, count, parametrization, eps, gauge);
    }
    ctx->save_for_backward({s1, s2, mean, std_param});
    ctx->saved_data["count"] = count;
    ctx->saved_data["parametrization"] = std::string(parametrization);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["gauge"] = gauge;
    return {value};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = find_op<NllBackwardSignature>("batchless_kernels::batchless_nll_backward");
    static const auto composite_op = find_op<NllSignature>("batchless_kernels::batchless_nll_composite");
    const auto saved = ctx->get_saved_variables();
    const Tensor &s1 = saved[0], &s2 = saved[1], &mean = saved[2], &std_param = saved[3];
    const auto count = ctx->saved_data["count"].toSymInt();
    const std::string parametrization = ctx->saved_data["parametrization"].toStringRef();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool need_mean = ctx->needs_input_grad(2), need_param = ctx->needs_input_grad(3);
    const Tensor& grad = grads[0];
    variable_list out(8);
    if (!grad.defined() || !(need_mean || need_param)) return out;
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiate the composite value
      const Tensor value = composite_op.call(s1, s2, mean, std_param, count, parametrization, eps,
                                             ctx->saved_data["gauge"].toBool());
      variable_list wanted;
      if (need_mean) wanted.push_back(mean);
      if (need_param) wanted.push_back(std_param);
      const auto g = torch::autograd::grad({value}, wanted, {grad}, /*retain_graph=*/true,
                                           /*create_graph=*/true);
      if (need_mean) out[2] = g[0];
      if (need_param) out[3] = g.back();
    } else {
      auto [dmean, dparam] = backward_op.call(grad, s1, s2, mean, std_param, count, parametrization, eps);
      if (need_mean) out[2] = dmean;
      if (need_param) out[3] = dparam;
    }
    return out;
  }
};

Tensor nll_autograd(const Tensor& s1, const Tensor& s2, const Tensor& mean, const Tensor& std_param,
                    c10::SymInt count, c10::string_view parametrization, double eps, bool gauge) {
  return Nll::apply(s1, s2, mean, std_param, std::move(count), parametrization, eps, gauge)[0];
}

template <typename Kernels>
std::tuple<Tensor, Tensor, Tensor> forward_autograd(const Tensor& x, const Tensor& mean,
                                                    const Tensor& rstd,
                                                    const c10::optional<Tensor>& weight,
                                                    const c10::optional<Tensor>& bias,
                                                    bool compute_stats) {
  auto out = NormForward<Kernels>::apply(x, mean, rstd, weight, bias, compute_stats);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(batchless_kernels, Autograd, m) {
  m.impl("batchless_norm_forward", &forward_autograd<CompiledKernels>);
  m.impl("triton_forward", &forward_autograd<TritonKernels>);
  m.impl("batchless_nll", &nll_autograd);
}

}  // namespace batchless_kernels
