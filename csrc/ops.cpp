// Op schemas of batchless_kernels, defined once. Each backend registers its implementations
// under its dispatch key (csrc/cpu for CPU; csrc/cuda for CUDA; the triton backend from Python).
// The autograd is in csrc/autograd.cpp; Python adds the fake (meta) kernels in
// batchless_kernels/ops.py. The Python module that loads them all is csrc/python_module.cpp.
#include <torch/library.h>

#include <string>

// Signatures shared by the compiled kernels' ops and the triton backend's.
constexpr const char* kForwardSignature =
    "(Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, bool compute_stats) "
    "-> (Tensor y, Tensor s1, Tensor s2)";
constexpr const char* kBackwardSignature =
    "(Tensor grad_y, Tensor? x, Tensor mean, Tensor rstd, Tensor? weight, bool[3] output_mask) "
    "-> (Tensor dx, Tensor dweight, Tensor dbias)";

constexpr const char* kTrainForwardSignature =
    "(Tensor x, Tensor mean, Tensor std_param, Tensor? weight, Tensor? bias, str parametrization, float eps, "
    "bool gauge) -> (Tensor y, Tensor s1, Tensor s2, Tensor rstd, Tensor nll)";
constexpr const char* kTrainBackwardSignature =
    "(Tensor grad_y, Tensor grad_nll, Tensor? x, Tensor mean, Tensor std_param, Tensor rstd, Tensor? weight, "
    "Tensor s1, Tensor s2, SymInt count, str parametrization, float eps, bool[5] output_mask) "
    "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dmean, Tensor dstd_param)";
constexpr const char* kInferenceSignature =
    "(Tensor x, Tensor mean, Tensor std_param, Tensor? weight, Tensor? bias, str parametrization, float eps) "
    "-> Tensor";

constexpr const char* kTrainSignature =
    "(Tensor x, Tensor mean, Tensor std_param, Tensor? weight, Tensor? bias, str parametrization, "
    "float eps, bool gauge) -> (Tensor y, Tensor nll)";

TORCH_LIBRARY(batchless_kernels, m) {
  // Fused training/inference forward, one pass over x:
  //   xhat = (x - mean) * rstd,  y = xhat * weight + bias  (same shape, dtype, layout as x)
  //   s1[c] = sum xhat, s2[c] = sum xhat^2 over every element of channel c, in the accumulation
  //   dtype (fp32, fp64 for fp64 x); empty tensors when compute_stats is false.
  // mean, rstd, weight, bias: (C,), any floating dtype. No gradient flows to mean or rstd.
  m.def((std::string("batchless_norm_forward") + kForwardSignature).c_str());
  // Fused backward, one pass over (grad_y, x):
  //   dx = grad_y * weight * rstd;  dweight[c] = sum grad_y * xhat;  dbias[c] = sum grad_y
  // output_mask selects (dx, dweight, dbias); unselected outputs are empty. x is needed only for
  // dweight. dweight and dbias are in the accumulation dtype.
  m.def((std::string("batchless_norm_backward") + kBackwardSignature).c_str());
  // The same two ops for the triton backend, whose kernels are Python: batchless_kernels/triton/
  // norm.py registers them for CUDA (and CPU under Triton's interpreter). They share the fake
  // kernels and the autograd (csrc/autograd.cpp) of the two above.
  m.def((std::string("triton_forward") + kForwardSignature).c_str());
  m.def((std::string("triton_backward") + kBackwardSignature).c_str());
  // Training step of a layer: the forward op with its sums, then batchless_nll, as ONE autograd
  // node (csrc/autograd.cpp) whose backward gives x, weight, bias their gradients from grad_y and
  // mean, std_param theirs from grad_nll. The parameters' NLL gradients are thus computed in the
  // layer's own backward, when grad_y arrives, not as soon as the loss starts its backward: engines
  // that gather parameters around a layer's forward and backward (FSDP) or re-run the forward in
  // the backward (checkpointing) see them, and no tensor of the layer is read outside that window.
  //   y as batchless_norm_forward with rstd = r(std_param) by `parametrization`, `eps`;
  //   nll as batchless_nll with count = elements per channel; 0 for an empty x.
  m.def((std::string("batchless_norm_train") + kTrainSignature).c_str());
  m.def((std::string("triton_norm_train") + kTrainSignature).c_str());
  // batchless_norm_train's forward below autograd: y, the sums, r (C,) and the nll, in the
  // accumulation dtype (r = 1/sigma by `parametrization`, `eps`; nll = 0 for an empty x). CPU: the
  // kernels and the NLL's loop, no intermediate op; CUDA: two launches (r computed in the kernels,
  // the NLL in the sums' second stage).
  m.def((std::string("batchless_norm_train_forward") + kTrainForwardSignature).c_str());
  // Its backward below autograd: batchless_norm_backward's (dx, dweight, dbias) from grad_y and
  // batchless_nll_backward's (dmean, dstd_param) from grad_nll, selected by output_mask (unselected
  // outputs are empty; dmean and dstd_param come in the dtypes of mean and std_param). s1, s2 are the
  // forward's sums, count the elements per channel. CUDA computes the NLL's gradients in the second
  // stage of the backward's sums (two launches).
  m.def((std::string("batchless_norm_train_backward") + kTrainBackwardSignature).c_str());
  // Inference: y as batchless_norm_forward without the sums, r = 1/sigma computed from std_param by
  // `parametrization`, `eps` (the same bits as the training op's y). No gradient: for calls that
  // need none (no_grad, frozen layers). CPU: no intermediate op; CUDA: one launch, r computed in it.
  m.def((std::string("batchless_norm_inference") + kInferenceSignature).c_str());
  // The same three for the triton backend (batchless_kernels/triton/norm.py), two launches a pass:
  // r computed in the kernels, the NLL and its gradients in the second pass over the partial sums.
  m.def((std::string("triton_train_forward") + kTrainForwardSignature).c_str());
  m.def((std::string("triton_train_backward") + kTrainBackwardSignature).c_str());
  m.def((std::string("triton_inference") + kInferenceSignature).c_str());
}

TORCH_LIBRARY_FRAGMENT(batchless_kernels, m) {
  // The layer's NLL term from the forward's sums (docs/method.md, mean reduction over the C channels
  // and the `count` elements per channel):
  //   nll = mean_c [log sigma_c + s2_c / (2 count)] - gauge * (mean_c log sigma_c + 1/2)
  // sigma_c comes from std_param by `parametrization` ("abs", "log", "inv") and eps. A 0-dim
  // tensor in s1's dtype. Its gradients for mean and std_param come from nll_backward.
  m.def(
      "batchless_nll(Tensor s1, Tensor s2, Tensor mean, Tensor std_param, SymInt count, "
      "str parametrization, float eps, bool gauge) -> Tensor");
  // grad_nll times (dnll/dmean, dnll/dstd_param), in the dtypes of mean and std_param:
  //   dnll/dmean_c = -r_c s1_c / (C count)
  //   dnll/dp_c    = (dlog sigma_c/dp + (s2_c / count) dlog|r_c|/dp) / C   (never dr/dp = -r^2)
  m.def(
      "batchless_nll_backward(Tensor grad_nll, Tensor s1, Tensor s2, Tensor mean, Tensor std_param, "
      "SymInt count, str parametrization, float eps) -> (Tensor dmean, Tensor dstd_param)");
  // batchless_nll's value composed of differentiable tensor ops (implemented in Python,
  // functional.nll_from_sums, for CompositeImplicitAutograd): what batchless_nll's backward
  // differentiates under create_graph=True, for second derivatives.
  m.def(
      "batchless_nll_composite(Tensor s1, Tensor s2, Tensor mean, Tensor std_param, SymInt count, "
      "str parametrization, float eps, bool gauge) -> Tensor");
}
