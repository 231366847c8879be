// Host-side preparation shared by every device's kernels (csrc/cpu, csrc/cuda): argument checks,
// the layout to compute in, output allocation, and per-channel parameters in the accumulation
// dtype. A device's op implementation is: plan_forward / plan_backward, run its kernel on the
// plan's dense views, then finish() copies back to the user-visible output when a copy was needed.
#pragma once

// The ATen headers of the ops used, not <ATen/ATen.h> (every operator: seconds more per compile).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <limits>
#include <tuple>

#include "batchless_common.h"

namespace batchless_kernels {
namespace host {

using at::Tensor;

// t.movedim(1, -1).is_contiguous(), read from the strides without making the view (a view costs
// about a microsecond, and every call asks several times). Size-1 dims take any stride.
inline bool channels_innermost(const Tensor& t) {
  if (t.numel() == 0) return true;
  int64_t expected = 1;
  const auto fits = [&](int64_t d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
    return true;
  };
  if (!fits(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (!fits(d)) return false;
  }
  return fits(0);
}

inline int64_t spatial_size(const Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return s;
}

// The layout to compute in for t: no copy when t is contiguous or channels-innermost.
inline Layout choose_layout(const Tensor& t) {
  const bool contiguous = t.is_contiguous();
  if (contiguous && spatial_size(t) > 1) return Layout::kChannelsFirst;
  if (contiguous || channels_innermost(t)) return Layout::kChannelsLast;  // (N, C) is channels-last
  // Other strides are copied to contiguous first: (N, C, S), or (N, C) channels-last when S = 1.
  return spatial_size(t) > 1 ? Layout::kChannelsFirst : Layout::kChannelsLast;
}

inline Tensor to_layout(const Tensor& t, Layout layout) {
  if (layout == Layout::kChannelsFirst) return t.contiguous();
  if (channels_innermost(t)) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

inline at::ScalarType accumulation_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// t.to(dtype) without calling aten::to when t already has it: a dispatched no-op costs host time on
// every call, and ops called above the backend keys may not return an input (torch.library.opcheck's
// schema check), which aten::to would.
inline Tensor in_dtype(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// t filled with NaN where tests poison fresh outputs (poison_outputs, batchless_common.h).
inline Tensor poisoned(Tensor t) {
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// The output every backend allocates (ops.output_like on the Python side): x's strides when x is
// dense in a layout the kernels read, else contiguous.
inline Tensor output_like(const Tensor& x) {
  const bool dense = x.is_contiguous() || channels_innermost(x);
  return poisoned(dense ? at::empty_like(x) : at::empty(x.sizes(), x.options()));
}

inline void check_x(const Tensor& x, const char* name, c10::DeviceType device) {
  TORCH_CHECK(x.dim() >= 2, "batchless_norm: ", name, " must have shape (N, C, *), got ", x.sizes());
  TORCH_CHECK(x.device().type() == device, "batchless_norm: ", name, " must be a ", device,
              " tensor, got ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "batchless_norm: ", name, " must be float16, bfloat16, float32 or float64, got ", st);
}

inline void check_channel_tensor(const c10::optional<Tensor>& t, const char* name, const Tensor& x) {
  if (!t.has_value() || !t->defined()) return;
  const int64_t C = x.size(1);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "batchless_norm: ", name, " must have shape (", C,
              ",), got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "batchless_norm: ", name,
              " must have a floating dtype, got ", t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), "batchless_norm: ", name, " must be on ", x.device(),
              " like the input, got ", t->device());
}

// Per-channel parameters in the accumulation dtype, contiguous; absent ones become `fill`.
inline Tensor channel_param(const c10::optional<Tensor>& t, const Tensor& x, at::ScalarType acc,
                            double fill) {
  if (t.has_value() && t->defined()) return in_dtype(*t, acc).contiguous();
  return at::full({x.size(1)}, fill, x.options().dtype(acc));
}

// What a forward kernel reads and writes: x in the compute layout, y's buffer with the same strides,
// parameters (C,) in the accumulation dtype, and the zeroed sums (empty without stats).
struct ForwardPlan {
  Geometry geometry;
  Tensor x, y_buffer, mean, rstd, weight, bias;
  Tensor y, s1, s2;  // the op's outputs; the sums undefined without compute_stats, until finish()
  at::TensorOptions acc_opts;  // the sums' (the accumulation dtype on x's device)
  bool empty;        // nothing to compute: return the outputs as they are

  // y alone (the inference op): no empty sums allocated.
  Tensor finish_y() {
    if (!empty && !y_buffer.is_same(y)) y.copy_(y_buffer);
    return y;
  }
  std::tuple<Tensor, Tensor, Tensor> finish() {
    finish_y();
    if (!s1.defined()) {  // the forward op's schema returns them: empty
      s1 = at::empty({0}, acc_opts);
      s2 = at::empty({0}, acc_opts);
    }
    return {y, s1, s2};
  }
};

inline ForwardPlan plan_forward(const Tensor& x, const Tensor& mean, const Tensor& rstd,
                                const c10::optional<Tensor>& weight,
                                const c10::optional<Tensor>& bias, bool compute_stats,
                                c10::DeviceType device) {
  check_x(x, "x", device);
  check_channel_tensor(mean, "mean", x);
  check_channel_tensor(rstd, "rstd", x);
  check_channel_tensor(weight, "weight", x);
  check_channel_tensor(bias, "bias", x);
  ForwardPlan plan;
  const int64_t C = x.size(1);
  const auto acc = accumulation_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  plan.acc_opts = acc_opts;
  plan.empty = x.numel() == 0;
  // Every kernel writes every channel's sums; an empty input sums to zero.
  const auto sums = [&] {
    if (!compute_stats) return Tensor();
    return plan.empty ? at::zeros({C}, acc_opts) : poisoned(at::empty({C}, acc_opts));
  };
  plan.s1 = sums();
  plan.s2 = sums();
  plan.y = output_like(x);
  if (plan.empty) return plan;
  const Layout layout = choose_layout(x);
  plan.geometry = Geometry{layout, x.size(0), C, spatial_size(x)};
  plan.x = to_layout(x, layout);
  // The kernel writes through a pointer with x's strides: y itself when the strides agree.
  plan.y_buffer = plan.y.strides() == plan.x.strides() ? plan.y : poisoned(at::empty_like(plan.x));
  plan.mean = channel_param(mean, x, acc, 0.0);
  plan.rstd = channel_param(rstd, x, acc, 1.0);
  plan.weight = channel_param(weight, x, acc, 1.0);
  plan.bias = channel_param(bias, x, acc, 0.0);
  return plan;
}

// What a backward kernel reads and writes: grad_y (and x, only when dweight is wanted) in one
// compute layout, dx's buffer with the same strides, parameters in the accumulation dtype, and the
// zeroed dweight / dbias (empty when not asked for).
struct BackwardPlan {
  Geometry geometry;
  std::array<bool, 3> mask;
  Tensor grad_y, x, dx_buffer, mean, rstd, weight;
  Tensor dx, dweight, dbias;  // the op's outputs
  bool empty;

  std::tuple<Tensor, Tensor, Tensor> finish() {
    if (!empty && mask[0] && !dx_buffer.is_same(dx)) dx.copy_(dx_buffer);
    return {dx, dweight, dbias};
  }
};

inline BackwardPlan plan_backward(const Tensor& grad_y, const c10::optional<Tensor>& x_opt,
                                  const Tensor& mean, const Tensor& rstd,
                                  const c10::optional<Tensor>& weight,
                                  std::array<bool, 3> output_mask, c10::DeviceType device) {
  check_x(grad_y, "grad_y", device);
  const bool has_x = x_opt.has_value() && x_opt->defined();
  if (has_x) {
    check_x(*x_opt, "x", device);
    TORCH_CHECK(x_opt->sizes() == grad_y.sizes(), "batchless_norm_backward: grad_y has shape ",
                grad_y.sizes(), " but x has shape ", x_opt->sizes());
    TORCH_CHECK(x_opt->scalar_type() == grad_y.scalar_type(), "batchless_norm_backward: grad_y has dtype ",
                grad_y.scalar_type(), " but x has dtype ", x_opt->scalar_type());
    TORCH_CHECK(x_opt->device() == grad_y.device(), "batchless_norm_backward: grad_y is on ",
                grad_y.device(), " but x is on ", x_opt->device());
  }
  TORCH_CHECK(!output_mask[1] || has_x, "batchless_norm_backward: dweight needs x");
  check_channel_tensor(mean, "mean", grad_y);
  check_channel_tensor(rstd, "rstd", grad_y);
  check_channel_tensor(weight, "weight", grad_y);

  BackwardPlan plan;
  plan.mask = output_mask;
  const int64_t C = grad_y.size(1);
  const auto acc = accumulation_type(grad_y.scalar_type());
  const auto acc_opts = grad_y.options().dtype(acc);
  // dx takes x's layout (the layout autograd expects for x's gradient), else grad_y's.
  const Tensor& reference = has_x ? *x_opt : grad_y;
  plan.empty = grad_y.numel() == 0 || !(output_mask[0] || output_mask[1] || output_mask[2]);
  // Every kernel writes every channel's sums; an empty input sums to zero.
  const auto sums = [&](bool wanted) {
    if (!wanted) return at::empty({0}, acc_opts);
    return plan.empty ? at::zeros({C}, acc_opts) : poisoned(at::empty({C}, acc_opts));
  };
  plan.dx = output_mask[0] ? output_like(reference) : at::empty({0}, grad_y.options());
  plan.dweight = sums(output_mask[1]);
  plan.dbias = sums(output_mask[2]);
  if (plan.empty) return plan;
  const Layout layout = choose_layout(reference);
  plan.geometry = Geometry{layout, grad_y.size(0), C, spatial_size(grad_y)};
  plan.grad_y = to_layout(grad_y, layout);
  if (output_mask[1]) plan.x = to_layout(*x_opt, layout);
  plan.dx_buffer = (!output_mask[0] || plan.dx.strides() == plan.grad_y.strides())
                       ? plan.dx
                       : poisoned(at::empty_like(plan.grad_y));
  plan.mean = channel_param(mean, grad_y, acc, 0.0);
  plan.rstd = channel_param(rstd, grad_y, acc, 1.0);
  plan.weight = channel_param(weight, grad_y, acc, 1.0);
  return plan;
}

}  // namespace host

// The CPU kernels' outputs of at least this many bytes are written with non-temporal stores (a
// quarter of the last-level cache; the inference op's from twice it; csrc/cpu/batchless_norm_cpu.cpp):
// sets it where bytes >= 0 (tests set 0, so that small inputs take that path), and returns the
// previous value.
int64_t set_cpu_stream_threshold(int64_t bytes);

// A copy of the dense CPU tensor src (contiguous in some dim order), with its strides, written with
// those non-temporal stores at any size: the benchmark's copy ceiling (bench/bench_batchless.py).
at::Tensor cpu_stream_copy(const at::Tensor& src);

}  // namespace batchless_kernels
