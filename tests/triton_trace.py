"""Child process of test_triton.test_compile_traces_the_triton_kernels: traces the triton ops as
torch.compile's AOTAutograd does (fake tensors under FunctionalTensorMode, after the C++ autograd
node) with the compiled kernels, which Triton's interpreter replaces (hence a process of its own,
without TRITON_INTERPRET), and prints, per case, the graph's Triton kernels (name and the arguments
the kernel writes, from torch's analysis of its TTIR) and its other ops, as JSON.

Without a GPU, a stand-in driver targets sm_90 (the GPU machines'): the analysis compiles to TTIR
only, which needs no device."""

from __future__ import annotations

import json
import os

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the interpreter's kernels cannot be traced"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _Sm90Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_Sm90Driver())

from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.functional_tensor import dispatch_functionalize  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

from batchless_kernels import backends  # noqa: E402

WRAPPER = torch.ops.higher_order.triton_kernel_wrapper_functional


def _leaves(shape, layout, affine):
    channels = shape[1]
    x = torch.randn(shape, device=DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    params = [torch.randn(channels, device=DEVICE) for _ in range(4 if affine else 2)]
    return [t.requires_grad_() for t in (x, *params)]


def _train_step(parametrization, affine):
    op = backends.train_op("triton")

    def step(grad_y, *leaves):
        x, mean, std_param, *affine_params = leaves
        weight, bias = affine_params or (None, None)
        y, nll = op(x, mean, std_param, weight, bias, parametrization, 1e-5, False)
        return torch.autograd.grad(((y * grad_y).sum() + nll), leaves)

    return step


def _inference(x, mean, std_param, weight, bias):
    return backends.inference_op("triton")(x, mean, std_param, weight, bias, "log", 1e-5)


def _graph(fn, args, mode):
    gm = make_fx(dispatch_functionalize(fn), tracing_mode=mode)(*args)
    kernels, ops = [], set()
    for node in gm.graph.nodes:
        if node.target is WRAPPER:
            name = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
            kernels.append([name, sorted(node.kwargs["tensors_to_clone"])])
        elif node.op == "call_function":
            ops.add(str(node.target))
    return {"kernels": kernels, "ops": sorted(ops)}


def main():
    results = {}
    for name, shape, layout, parametrization, affine, mode in [
        ("planes", (4, 8, 5, 5), "contiguous", "log", True, "fake"),
        ("channels_last", (2, 8, 3, 3), "channels_last", "abs", False, "fake"),
        ("rows_symbolic", (6, 9), "contiguous", "inv", True, "symbolic"),
    ]:
        leaves = _leaves(shape, layout, affine)
        results[name] = _graph(_train_step(parametrization, affine), [torch.randn_like(leaves[0]), *leaves], mode)
    x, mean, std_param, weight, bias = (t.detach() for t in _leaves((4, 8, 5, 5), "contiguous", True))
    results["inference"] = _graph(_inference, [x, mean, std_param, weight, bias], "fake")
    # torch.export keeps the ops (as it keeps torch.library.triton_op's): its trace is not lowered.
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        results["export"] = _graph(_inference, [x, mean, std_param, weight, bias], "fake")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
