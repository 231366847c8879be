// The host side of the CUDA norm ops (schemas in csrc/ops.cpp; checks and plans in
// csrc/batchless_host.h, shared with the CPU kernels): each op checks its inputs, plans the outputs,
// dispatches on the dtype and calls the kernels' entry points (batchless_norm_cuda.cuh), which the
// kernels' translation units define: batchless_norm_kernels_fp32_bf16.cu and _fp64_fp16.cu.
// Plain C++ compiled by the host compiler: no device code here, so nvcc's device passes do not
// parse ATen's tensor headers (nvcc took ~45 CPU-seconds for such a file, g++ ~15).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include "batchless_host.h"
#include "batchless_nll.h"
#include "cuda/batchless_norm_cuda.cuh"

namespace batchless_kernels {
namespace {

using at::Tensor;
using cuda_norm::NllEpilogue;
using cuda_norm::Params;

// The kernels' scratch memory (cuda_norm::ScratchAllocator): tensors of `options` (the accumulation
// dtype on x's device), held until the op returns.
class TensorScratch final : public cuda_norm::ScratchAllocator {
 public:
  explicit TensorScratch(at::TensorOptions options) : options_(options) {}
  void* allocate(int64_t count) override {
    return held_.emplace_back(host::poisoned(at::empty({count}, options_))).data_ptr();
  }

 private:
  at::TensorOptions options_;
  std::vector<Tensor> held_;
};

template <typename acc_t>
Params<acc_t> params_of(const Tensor& mean, const Tensor& rstd, const Tensor& weight,
                        const Tensor* bias) {
  return {mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), weight.const_data_ptr<acc_t>(),
          bias != nullptr ? bias->const_data_ptr<acc_t>() : nullptr};
}

// A forward's arguments over a plan, without sums or NLL (the caller sets them where wanted).
template <typename scalar_t>
cuda_norm::ForwardArgs<scalar_t> forward_args(const host::ForwardPlan& plan,
                                              const Params<at::opmath_type<scalar_t>>& params,
                                              TensorScratch& scratch) {
  cuda_norm::ForwardArgs<scalar_t> args;
  args.geometry = plan.geometry;
  args.x = plan.x.const_data_ptr<scalar_t>();
  args.y = plan.y_buffer.data_ptr<scalar_t>();
  args.params = params;
  args.scratch = &scratch;
  return args;
}

std::tuple<Tensor, Tensor, Tensor> forward_cuda(const Tensor& x, const Tensor& mean,
                                                const Tensor& rstd,
                                                const c10::optional<Tensor>& weight,
                                                const c10::optional<Tensor>& bias,
                                                bool compute_stats) {
  TORCH_CHECK(x.is_cuda(), "batchless_norm: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  auto plan = host::plan_forward(x, mean, rstd, weight, bias, compute_stats, c10::DeviceType::CUDA);
  if (plan.empty) return plan.finish();
  TensorScratch scratch(plan.acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchless_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto args = forward_args<scalar_t>(plan, params_of<acc_t>(plan.mean, plan.rstd, plan.weight, &plan.bias), scratch);
    if (compute_stats) {
      args.s1 = plan.s1.data_ptr<acc_t>();
      args.s2 = plan.s2.data_ptr<acc_t>();
    }
    cuda_norm::run_forward(args);
  });
  return plan.finish();
}

// The backward kernels over a plan, with the training op's NLL gradients in their second stage when
// `epilogue` asks for them.
template <typename acc_t>
void run_backward(const host::BackwardPlan& plan, std::array<bool, 3> output_mask,
                  const NllEpilogue<acc_t>& epilogue) {
  TensorScratch scratch(plan.dweight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.grad_y.scalar_type(), "batchless_backward_cuda", [&] {
    if constexpr (std::is_same_v<acc_t, at::opmath_type<scalar_t>>) {
      cuda_norm::BackwardArgs<scalar_t> args;
      args.geometry = plan.geometry;
      args.grad_y = plan.grad_y.const_data_ptr<scalar_t>();
      if (output_mask[0]) args.dx = plan.dx_buffer.data_ptr<scalar_t>();
      if (output_mask[1]) {
        args.x = plan.x.const_data_ptr<scalar_t>();
        args.dweight = plan.dweight.data_ptr<acc_t>();
      }
      if (output_mask[2]) args.dbias = plan.dbias.data_ptr<acc_t>();
      args.params = params_of<acc_t>(plan.mean, plan.rstd, plan.weight, nullptr);
      args.scratch = &scratch;
      args.epilogue = epilogue;
      cuda_norm::run_backward(args);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> backward_cuda(const Tensor& grad_y,
                                                 const c10::optional<Tensor>& x_opt,
                                                 const Tensor& mean, const Tensor& rstd,
                                                 const c10::optional<Tensor>& weight,
                                                 std::array<bool, 3> output_mask) {
  TORCH_CHECK(grad_y.is_cuda(), "batchless_norm: grad_y must be a CUDA tensor, got ", grad_y.device());
  const c10::cuda::CUDAGuard guard(grad_y.device());
  auto plan = host::plan_backward(grad_y, x_opt, mean, rstd, weight, output_mask, c10::DeviceType::CUDA);
  if (plan.empty) return plan.finish();
  if (grad_y.scalar_type() == at::kDouble) {
    run_backward<double>(plan, output_mask, {});
  } else {
    run_backward<float>(plan, output_mask, {});
  }
  return plan.finish();
}

// The checks and plan of the ops that take std_param (training forward, inference; under the caller's
// device guard): std_param takes the plan's rstd slot, which brings it to the accumulation dtype,
// contiguous, and the kernels compute r from it (params_with_std_param).
host::ForwardPlan plan_with_std_param(const Tensor& x, const Tensor& mean, const Tensor& std_param,
                                      const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                                      double eps, bool compute_stats, const char* op) {
  host::check_x(x, "x", c10::DeviceType::CUDA);
  nll::check_eps(eps, host::accumulation_type(x.scalar_type()), op);
  host::check_channel_tensor(std_param, "std_param", x);
  return host::plan_forward(x, mean, std_param, weight, bias, compute_stats, c10::DeviceType::CUDA);
}

template <typename acc_t>
Params<acc_t> params_with_std_param(const host::ForwardPlan& plan, nll::Parametrization kind, double eps) {
  auto params = params_of<acc_t>(plan.mean, plan.rstd, plan.weight, &plan.bias);
  params.std_param = params.rstd;
  params.rstd = nullptr;
  params.kind = kind;
  params.eps = static_cast<acc_t>(eps);
  return params;
}

}  // namespace

// The training op's forward (csrc/ops.cpp, batchless_norm_train_forward) in two launches: the fused
// forward with r computed from std_param in every thread, and the second stage, which also writes r
// and the NLL (NllEpilogue).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> train_forward_cuda(
    const Tensor& x, const Tensor& mean, const Tensor& std_param, const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias, c10::string_view parametrization, double eps, bool gauge) {
  TORCH_CHECK(x.is_cuda(), "batchless_norm: x must be a CUDA tensor, got ", x.device());
  const auto kind = nll::parse_parametrization(parametrization, "batchless_norm");
  const c10::cuda::CUDAGuard guard(x.device());
  auto plan = plan_with_std_param(x, mean, std_param, weight, bias, eps, /*compute_stats=*/true,
                                  "batchless_norm_train_forward");
  const auto acc_opts = plan.s1.options();
  Tensor rstd, nll;
  if (plan.empty) {  // nothing to launch: r by tensor ops, nll = 0 (reference.py)
    rstd = nll::rstd_of(std_param, plan.s1.scalar_type(), kind, eps);
    nll = at::zeros({}, acc_opts);
  } else {
    const int64_t C = x.size(1);
    rstd = host::poisoned(at::empty({C}, acc_opts));
    nll = host::poisoned(at::empty({}, acc_opts));
    TensorScratch scratch(acc_opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchless_train_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto params = params_with_std_param<acc_t>(plan, kind, eps);
      NllEpilogue<acc_t> epilogue;
      epilogue.std_param = params.std_param;
      epilogue.kind = kind;
      epilogue.eps = params.eps;
      epilogue.count = static_cast<acc_t>(x.numel() / C);
      epilogue.gauge = gauge;
      epilogue.rstd = rstd.data_ptr<acc_t>();
      epilogue.nll = nll.data_ptr<acc_t>();
      auto args = forward_args<scalar_t>(plan, params, scratch);
      args.s1 = plan.s1.data_ptr<acc_t>();
      args.s2 = plan.s2.data_ptr<acc_t>();
      args.epilogue = epilogue;
      cuda_norm::run_forward(args);
    });
  }
  auto [y, s1, s2] = plan.finish();
  return {y, s1, s2, rstd, nll};
}

// batchless_norm_inference (csrc/ops.cpp) in one launch: the forward without sums, with r computed
// from std_param in every thread as the training forward computes it (the same bits as its y).
Tensor inference_cuda(const Tensor& x, const Tensor& mean, const Tensor& std_param, const c10::optional<Tensor>& weight,
                      const c10::optional<Tensor>& bias, c10::string_view parametrization, double eps) {
  TORCH_CHECK(x.is_cuda(), "batchless_norm: x must be a CUDA tensor, got ", x.device());
  const auto kind = nll::parse_parametrization(parametrization, "batchless_norm");
  const c10::cuda::CUDAGuard guard(x.device());
  auto plan = plan_with_std_param(x, mean, std_param, weight, bias, eps, /*compute_stats=*/false,
                                  "batchless_norm_inference");
  if (!plan.empty) {
    TensorScratch scratch(plan.acc_opts);  // unused: no sums
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchless_inference_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      cuda_norm::run_forward(forward_args<scalar_t>(plan, params_with_std_param<acc_t>(plan, kind, eps), scratch));
    });
  }
  return plan.finish_y();
}

// The training op's backward (csrc/ops.cpp, batchless_norm_train_backward) in two launches when it
// reduces (dweight or dbias wanted): the fused backward, and the second stage, which also writes the
// NLL's gradients. Other masks, empty inputs and sums in another dtype than the accumulation's: the
// two ops' kernels.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> train_backward_cuda(
    const Tensor& grad_y, const Tensor& grad_nll, const c10::optional<Tensor>& x, const Tensor& mean,
    const Tensor& std_param, const Tensor& rstd, const c10::optional<Tensor>& weight, const Tensor& s1,
    const Tensor& s2, int64_t count, c10::string_view parametrization, double eps, std::array<bool, 5> mask) {
  TORCH_CHECK(grad_y.is_cuda(), "batchless_norm: grad_y must be a CUDA tensor, got ", grad_y.device());
  const auto acc = host::accumulation_type(grad_y.scalar_type());
  const std::array<bool, 3> norm_mask = {mask[0], mask[1], mask[2]};
  const auto unselected = [&](const Tensor& t, bool wanted) { return wanted ? t : at::empty({0}, t.options()); };
  if (!((mask[1] || mask[2]) && (mask[3] || mask[4])) || grad_y.numel() == 0 || s1.scalar_type() != acc) {
    // the two ops' kernels, one after the other (as the default implementation in csrc/autograd.cpp)
    auto [dx, dw, db] = backward_cuda(grad_y, x, mean, rstd, weight, norm_mask);
    Tensor dmean = mean, dparam = std_param;
    if (mask[3] || mask[4]) {
      std::tie(dmean, dparam) = nll_backward_cuda(grad_nll, s1, s2, mean, std_param, count, parametrization, eps);
    }
    return {dx, dw, db, unselected(dmean, mask[3]), unselected(dparam, mask[4])};
  }
  nll::check_nll_args(s1, s2, mean, std_param, count, eps);
  nll::check_grad_nll(grad_nll, s1, "batchless_norm_train_backward");
  const auto kind = nll::parse_parametrization(parametrization);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  host::check_x(grad_y, "grad_y", c10::DeviceType::CUDA);  // before std_param's check reads its dim 1
  host::check_channel_tensor(std_param, "std_param", grad_y);
  auto plan = host::plan_backward(grad_y, x, mean, rstd, weight, norm_mask, c10::DeviceType::CUDA);
  const auto acc_opts = plan.dweight.options().dtype(acc);
  const int64_t C = grad_y.size(1);
  Tensor dmean = host::poisoned(at::empty({C}, acc_opts)), dparam = host::poisoned(at::empty({C}, acc_opts));
  const Tensor g = grad_nll.to(acc_opts).reshape({1}), s1c = s1.contiguous(), s2c = s2.contiguous();
  const Tensor param = std_param.to(acc_opts).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "batchless_train_backward_cuda", [&] {
    NllEpilogue<scalar_t> epilogue;
    epilogue.std_param = param.const_data_ptr<scalar_t>();
    epilogue.kind = kind;
    epilogue.eps = static_cast<scalar_t>(eps);
    epilogue.count = static_cast<scalar_t>(count);
    epilogue.grad_nll = g.const_data_ptr<scalar_t>();
    epilogue.s1 = s1c.const_data_ptr<scalar_t>();
    epilogue.s2 = s2c.const_data_ptr<scalar_t>();
    epilogue.dmean = dmean.data_ptr<scalar_t>();
    epilogue.dparam = dparam.data_ptr<scalar_t>();
    run_backward<scalar_t>(plan, norm_mask, epilogue);
  });
  auto [dx, dw, db] = plan.finish();
  return {dx, dw, db, unselected(dmean.to(mean.scalar_type()), mask[3]),
          unselected(dparam.to(std_param.scalar_type()), mask[4])};
}

TORCH_LIBRARY_IMPL(batchless_kernels, CUDA, m) {
  m.impl("batchless_norm_train_backward", &train_backward_cuda);
  m.impl("batchless_norm_forward", &forward_cuda);
  m.impl("batchless_norm_backward", &backward_cuda);
  m.impl("batchless_norm_train_forward", &train_forward_cuda);
  m.impl("batchless_norm_inference", &inference_cuda);
}

}  // namespace batchless_kernels

