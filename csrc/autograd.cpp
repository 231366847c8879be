// Autograd of the forward ops (batchless_norm_forward, triton_forward), of the training ops that
// add the NLL (batchless_norm_train, triton_norm_train) and of batchless_nll, for every backend's
// kernels (CPU, CUDA, triton), in C++: a Python autograd registration costs tens of microseconds
// per call, more than the kernels themselves on small inputs.
//
// y carries gradient to x, weight, bias; the sums s1, s2 carry none (sg(x) in the NLL); mean and
// rstd enter y as constants (sg). The NLL carries gradient to mean and std_param only. Backward:
// the fused backward ops; with create_graph (grad mode on in backward) the same formulas in
// differentiable ATen ops (the NLL: autograd of batchless_nll_composite), so that higher-order
// gradients flow.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
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

using host::in_dtype;

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
  const Tensor r = rstd.detach().to(acc).view(view);
  Tensor dx, dw, db;
  if (mask[0]) dx = (g * (weight.defined() ? r * weight.to(acc).view(view) : r)).to(grad_y.scalar_type());
  // mean and rstd are constants of y (sg): no second-order path to them.
  if (mask[1]) dw = (g * ((x.to(acc) - mean.detach().to(acc).view(view)) * r)).sum(dims);
  if (mask[2]) db = g.sum(dims);
  return {dx, dw, db};
}

// A backend's ops: the forward op and the backward op that differentiates it; the training op's
// forward and backward below autograd (csrc/ops.cpp).
struct CompiledKernels {
  static constexpr const char* forward = "batchless_kernels::batchless_norm_forward";
  static constexpr const char* backward = "batchless_kernels::batchless_norm_backward";
  static constexpr const char* train_forward = "batchless_kernels::batchless_norm_train_forward";
  static constexpr const char* train_backward = "batchless_kernels::batchless_norm_train_backward";
};
struct TritonKernels {
  static constexpr const char* forward = "batchless_kernels::triton_forward";
  static constexpr const char* backward = "batchless_kernels::triton_backward";
  static constexpr const char* train_forward = "batchless_kernels::triton_train_forward";
  static constexpr const char* train_backward = "batchless_kernels::triton_train_backward";
};

// What backward needs to know of weight and bias: present? and the dtypes to return grads in.
void save_affine(AutogradContext* ctx, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias) {
  ctx->saved_data["has_bias"] = present(bias);
  ctx->saved_data["weight_dtype"] = present(weight) ? static_cast<int64_t>(weight->scalar_type()) : int64_t(-1);
  ctx->saved_data["bias_dtype"] = present(bias) ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
}

// Which of x, weight, bias want a gradient. Graph edges follow the tensor arguments present: x at 0,
// [weight] at 3, [bias] after it.
std::array<bool, 3> norm_mask(AutogradContext* ctx, bool has_w) {
  const bool has_b = ctx->saved_data["has_bias"].toBool();
  return {ctx->needs_input_grad(0), has_w && ctx->needs_input_grad(3), has_b && ctx->needs_input_grad(has_w ? 4 : 3)};
}

// The selected dx, dweight, dbias into out[0], out[3], out[4], the affine ones in their parameters' dtypes.
void store_norm_grads(AutogradContext* ctx, std::array<bool, 3> mask, const Tensor& dx, const Tensor& dw,
                      const Tensor& db, variable_list& out) {
  if (mask[0]) out[0] = dx;
  if (mask[1]) out[3] = in_dtype(dw, static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt()));
  if (mask[2]) out[4] = in_dtype(db, static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
}

// x, weight, bias gradients from grad_y into out[0], out[3], out[4].
template <typename Kernels>
void norm_grads(AutogradContext* ctx, const Tensor& grad_y, const Tensor& x, const Tensor& mean,
                const Tensor& rstd, const Tensor& weight, variable_list& out) {
  const bool has_w = weight.defined();
  const std::array<bool, 3> mask = norm_mask(ctx, has_w);
  if (!grad_y.defined() || !(mask[0] || mask[1] || mask[2])) return;
  Tensor dx, dw, db;
  if (at::GradMode::is_enabled()) {
    std::tie(dx, dw, db) = differentiable_backward(grad_y, x, mean, rstd, weight, mask);
  } else {
    static const auto backward_op = find_op<BackwardSignature>(Kernels::backward);
    // Straight to the kernels: the op has no autograd, and its fallback's checks cost host time.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(dx, dw, db) = backward_op.call(grad_y, mask[1] ? c10::optional<Tensor>(x) : c10::nullopt,
                                              mean, rstd, has_w ? c10::optional<Tensor>(weight) : c10::nullopt,
                                              mask);
  }
  store_norm_grads(ctx, mask, dx, dw, db, out);
}

// What the NLL's backward reads, saved by Nll and NormTrain.
void save_nll(AutogradContext* ctx, c10::SymInt count, c10::string_view parametrization, double eps, bool gauge) {
  ctx->saved_data["count"] = std::move(count);
  ctx->saved_data["parametrization"] = std::string(parametrization);
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["gauge"] = gauge;
}

// grad_nll times (dnll/dmean, dnll/dstd_param); undefined where not wanted.
std::tuple<Tensor, Tensor> nll_grads(AutogradContext* ctx, const Tensor& grad, const Tensor& s1, const Tensor& s2,
                                     const Tensor& mean, const Tensor& std_param, bool need_mean, bool need_param) {
  if (!grad.defined() || !(need_mean || need_param)) return {};
  static const auto backward_op = find_op<NllBackwardSignature>("batchless_kernels::batchless_nll_backward");
  static const auto composite_op = find_op<NllSignature>("batchless_kernels::batchless_nll_composite");
  const auto count = ctx->saved_data["count"].toSymInt();
  const std::string parametrization = ctx->saved_data["parametrization"].toStringRef();
  const double eps = ctx->saved_data["eps"].toDouble();
  Tensor dmean, dparam;
  if (at::GradMode::is_enabled()) {  // create_graph=True: differentiate the composite value
    const Tensor value = composite_op.call(s1, s2, mean, std_param, count, parametrization, eps,
                                           ctx->saved_data["gauge"].toBool());
    variable_list wanted;
    if (need_mean) wanted.push_back(mean);
    if (need_param) wanted.push_back(std_param);
    const auto g = torch::autograd::grad({value}, wanted, {grad}, /*retain_graph=*/true, /*create_graph=*/true);
    if (need_mean) dmean = g[0];
    if (need_param) dparam = g.back();
  } else {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(dmean, dparam) = backward_op.call(grad, s1, s2, mean, std_param, count, parametrization, eps);
  }
  return {need_mean ? dmean : Tensor(), need_param ? dparam : Tensor()};
}

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
    ctx->set_materialize_grads(false);  // backward checks .defined(): no zero-filled grads to read
    const bool has_w = present(weight);
    // x is needed only for dweight (dx = grad_y * weight * rstd does not read it).
    const bool keep_x = has_w && weight->requires_grad();
    ctx->save_for_backward({keep_x ? x : Tensor(), mean, rstd, has_w ? *weight : Tensor()});
    save_affine(ctx, weight, bias);
    return {y, s1, s2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    variable_list out(6);
    norm_grads<Kernels>(ctx, grads[0], saved[0], saved[1], saved[2], saved[3], out);
    return out;
  }
};

using TrainForwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&, const c10::optional<Tensor>&,
    c10::string_view, double, bool);

// The training op's forward below autograd: y, s1, s2, r and the nll.
template <typename Kernels>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> train_forward(
    const Tensor& x, const Tensor& mean, const Tensor& std_param, const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias, c10::string_view parametrization, double eps, bool gauge) {
  static const auto op = find_op<TrainForwardSignature>(Kernels::train_forward);
  return op.call(x, mean, std_param, weight, bias, parametrization, eps, gauge);
}

using TrainBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const c10::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
    const c10::optional<Tensor>&, const Tensor&, const Tensor&, c10::SymInt, c10::string_view, double,
    std::array<bool, 5>);

// Both gradients of a training node in one op (the train_backward op: on CUDA and triton the NLL's
// gradients come from the second stage of the backward's sums).
template <typename Kernels>
void fused_train_backward(AutogradContext* ctx, const variable_list& grads, const variable_list& saved,
                          bool need_mean, bool need_param, variable_list& out) {
  const Tensor &x = saved[0], &weight = saved[3];
  const bool has_w = weight.defined();
  const std::array<bool, 3> affine = norm_mask(ctx, has_w);
  const std::array<bool, 5> mask = {affine[0], affine[1], affine[2], need_mean, need_param};
  static const auto op = find_op<TrainBackwardSignature>(Kernels::train_backward);
  Tensor dx, dw, db, dmean, dparam;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(dx, dw, db, dmean, dparam) =
        op.call(grads[0], grads[1], mask[1] ? c10::optional<Tensor>(x) : c10::nullopt, saved[1], saved[6], saved[2],
                has_w ? c10::optional<Tensor>(weight) : c10::nullopt, saved[4], saved[5],
                ctx->saved_data["count"].toSymInt(), ctx->saved_data["parametrization"].toStringRef(),
                ctx->saved_data["eps"].toDouble(), mask);
  }
  store_norm_grads(ctx, affine, dx, dw, db, out);
  if (need_mean) out[1] = dmean;
  if (need_param) out[2] = dparam;
}

// One node for a training step's layer: y and the NLL. Its backward runs once grad_y (and grad_nll)
// have arrived, i.e. inside the layer's own backward (see batchless_norm_train in csrc/ops.cpp).
template <typename Kernels>
class NormTrain : public torch::autograd::Function<NormTrain<Kernels>> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& mean,
                               const Tensor& std_param, const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, c10::string_view parametrization,
                               double eps, bool gauge) {
    const bool empty = x.sym_numel() == 0;
    const c10::SymInt count = empty ? c10::SymInt(0) : x.sym_numel() / x.sym_size(1);
    Tensor y, s1, s2, rstd, nll;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, s1, s2, rstd, nll) = train_forward<Kernels>(x, mean, std_param, weight, bias, parametrization, eps, gauge);
    }
    const bool has_w = present(weight);
    const bool keep_x = has_w && weight->requires_grad();
    ctx->save_for_backward({keep_x ? x : Tensor(), mean, rstd, has_w ? *weight : Tensor(), s1, s2, std_param});
    save_affine(ctx, weight, bias);
    save_nll(ctx, count, parametrization, eps, gauge);
    ctx->saved_data["empty"] = empty;
    ctx->set_materialize_grads(false);  // an unused y or NLL costs no backward work
    // y depends on x, weight, bias only; the NLL on mean, std_param only (the stop-gradients).
    if (!(x.requires_grad() || (has_w && weight->requires_grad()) || (present(bias) && bias->requires_grad()))) {
      ctx->mark_non_differentiable({y});
    }
    if (!(mean.requires_grad() || std_param.requires_grad())) ctx->mark_non_differentiable({nll});
    return {y, nll};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &mean = saved[1], &std_param = saved[6];
    variable_list out(8);
    const bool need_mean = ctx->needs_input_grad(1), need_param = ctx->needs_input_grad(2);
    const bool nll_wanted = grads[1].defined() && (need_mean || need_param);
    if (nll_wanted && grads[0].defined() && !at::GradMode::is_enabled() && !ctx->saved_data["empty"].toBool()) {
      fused_train_backward<Kernels>(ctx, grads, saved, need_mean, need_param, out);
      return out;
    }
    norm_grads<Kernels>(ctx, grads[0], saved[0], mean, saved[2], saved[3], out);
    if (!nll_wanted) return out;
    if (ctx->saved_data["empty"].toBool()) {
      if (need_mean) out[1] = at::zeros_like(mean);
      if (need_param) out[2] = at::zeros_like(std_param);
      return out;
    }
    std::tie(out[1], out[2]) = nll_grads(ctx, grads[1], saved[4], saved[5], mean, std_param, need_mean, need_param);
    return out;
  }
};

// Below autograd (no gradient wanted, fake tensors): the same values without a node.
template <typename Kernels>
std::tuple<Tensor, Tensor> train_composite(const Tensor& x, const Tensor& mean, const Tensor& std_param,
                                           const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                                           c10::string_view parametrization, double eps, bool gauge) {
  auto [y, s1, s2, rstd, nll] = train_forward<Kernels>(x, mean, std_param, weight, bias, parametrization, eps, gauge);
  return {y, nll};
}

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
    ctx->set_materialize_grads(false);
    save_nll(ctx, std::move(count), parametrization, eps, gauge);
    return {value};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    variable_list out(8);
    std::tie(out[2], out[3]) = nll_grads(ctx, grads[0], saved[0], saved[1], saved[2], saved[3],
                                         ctx->needs_input_grad(2), ctx->needs_input_grad(3));
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

template <typename Kernels>
std::tuple<Tensor, Tensor> train_autograd(const Tensor& x, const Tensor& mean, const Tensor& std_param,
                                          const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                                          c10::string_view parametrization, double eps, bool gauge) {
  auto out = NormTrain<Kernels>::apply(x, mean, std_param, weight, bias, parametrization, eps, gauge);
  return {out[0], out[1]};
}
}  // namespace

TORCH_LIBRARY_IMPL(batchless_kernels, Autograd, m) {
  m.impl("batchless_norm_forward", &forward_autograd<CompiledKernels>);
  m.impl("triton_forward", &forward_autograd<TritonKernels>);
  m.impl("batchless_nll", &nll_autograd);
  m.impl("batchless_norm_train", &train_autograd<CompiledKernels>);
  m.impl("triton_norm_train", &train_autograd<TritonKernels>);
  // Ops without a gradient formula (the inference op, which functional.py calls only where none is
  // needed; the backward ops and the training op's halves, which the nodes above call below autograd):
  // inputs that require grad give outputs whose backward raises, never a silently missing gradient
  // (without a registration torch only warned, and x.grad stayed None).
  for (const char* name : {"batchless_norm_inference", "triton_inference", "batchless_norm_backward", "triton_backward",
                           "batchless_norm_train_forward", "triton_train_forward", "batchless_norm_train_backward",
                           "triton_train_backward", "batchless_nll_backward"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(batchless_kernels, CompositeExplicitAutograd, m) {
  m.impl("batchless_norm_train", &train_composite<CompiledKernels>);
  m.impl("triton_norm_train", &train_composite<TritonKernels>);
}

}  // namespace batchless_kernels
