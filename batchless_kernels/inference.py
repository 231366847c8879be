"""fuse_for_inference: batchless normalization as the per-channel affine map it is at inference
(docs/method.md: y = x * a + b with a = gamma / sigma, b = beta - mu * gamma / sigma), folded into the
preceding convolution or linear layer where there is one."""

from __future__ import annotations

import collections
import copy
import warnings

import torch
import torch.fx
from torch import nn

from .modules import _BatchlessNorm
from .parametrization import rstd_and_log_std

_FOLD_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
              nn.Linear)
_HOOKS = {"_forward_pre_hooks": "forward pre-hooks", "_forward_hooks": "forward hooks",
          "_backward_pre_hooks": "backward pre-hooks", "_backward_hooks": "backward hooks"}


def _overrides_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward or "forward" in vars(module)  # class or instance


def _own_behaviour(module: nn.Module, base: type) -> str | None:
    """Why `module` may do more than `base.forward` (so that replacing it by a module computing
    that, or folding anything into it, could change the model or drop a hook), or None: its class
    or the instance overrides forward, or it has hooks (forward, backward, or their pre-hooks)."""
    if _overrides_forward(module, base):
        return f"it overrides {base.__name__}.forward"
    hooks = [what for attr, what in _HOOKS.items() if getattr(module, attr)]
    return f"it has {' and '.join(hooks)}" if hooks else None


class ChannelAffine(nn.Module):
    """y = x * scale + shift per channel (dim 1): an inference-time Batchless layer. Like the layer,
    it returns x's dtype and memory format (computing in the buffers' dtype when it is wider)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        if not (isinstance(scale, torch.Tensor) and isinstance(shift, torch.Tensor)):
            raise TypeError("scale and shift must be tensors")
        if scale.dim() < 1 or scale.shape != shift.shape:
            raise ValueError(
                "scale and shift must be tensors of one shape, (C,) or a Batchless layer's param_shape, got "
                f"{tuple(scale.shape)} and {tuple(shift.shape)}"
            )
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(self.scale.shape)
        if self.scale.dim() == 1:  # per channel
            shape += (1,) * max(0, x.dim() - 2)
        if x.dim() != len(shape) + 1 or any(d not in (1, full) for d, full in zip(shape, x.shape[1:])) \
                or (self.scale.dim() == 1 and shape[0] != x.shape[1]):
            expected = f"{shape[0]}, *" if self.scale.dim() == 1 else ", ".join(map(str, shape))
            raise ValueError(f"expected an (N, {expected}) input (size-1 dims broadcast), got shape {tuple(x.shape)}")
        view = (1,) + shape
        return torch.addcmul(self.shift.view(view), x, self.scale.view(view)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}" if self.scale.dim() == 1 else f"param_shape={tuple(self.scale.shape)}"


def _affine_of(layer: _BatchlessNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) in float64 with layer(x) = x * a + b per channel."""
    p = layer.std_param.detach().to(torch.float64)
    r, _ = rstd_and_log_std(p, layer.parametrization, layer.eps)
    a = r if layer.weight is None else r * layer.weight.detach().to(torch.float64)
    b = -layer.mean.detach().to(torch.float64) * a
    if layer.bias is not None:
        b = b + layer.bias.detach().to(torch.float64)
    return a, b


def _foldable(prev: nn.Module, layer: _BatchlessNorm, uses: dict) -> bool:
    """Whether `layer` can be folded into `prev`: a plain conv/linear (no own forward, no hooks, not
    used elsewhere in the model, nor its weight or bias: folding rewrites them) whose output channels
    are the layer's channels. A Linear scales its last dim: only a 1-D param_shape (inputs (N, C)) fits."""
    base = next((cls for cls in _FOLD_INTO if isinstance(prev, cls)), None)
    if base is None or not layer.per_channel or _own_behaviour(prev, base) or uses[id(prev)] > 1 \
            or nn.parameter.is_lazy(prev.weight) or any(uses.get(id(p), 0) > 1 for p in (prev.weight, prev.bias)):
        return False
    if isinstance(prev, nn.Linear) and len(layer.param_shape) != 1:
        return False
    out = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
    return out == layer.num_features


class _LeafTracer(torch.fx.Tracer):
    """Traces a model down to its convolutions, linear and Batchless layers (kept as modules)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_BatchlessNorm, *_FOLD_INTO)) or super().is_leaf_module(m, qualname)


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, Batchless layer name) where, in the forward traced in training and in eval mode
    alike, the layer is called once, on the output of a conv called once, which nothing else reads,
    and no other node reads the conv's parameters: the pairs that PyTorch's own conv-bn fusion
    (torch.fx.experimental.optimization.fuse) finds. Empty when the model does not trace."""
    flags = {m: m.training for m in model.modules()}
    try:
        return sorted(set(_pairs_in(model.train(True))) & set(_pairs_in(model.train(False))))
    finally:
        for m, flag in flags.items():
            m.training = flag


def _pairs_in(model: nn.Module) -> list[tuple[str, str]]:
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: no graph to read, keep today's rule
        return []
    read = {n.target for n in graph.nodes if n.op == "get_attr"}  # parameters read directly
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and calls[src.target] == 1
                and len(src.users) == 1 and not any(t.startswith(f"{src.target}.") for t in read)):
            pairs.append((src.target, node.target))
    return pairs


def _fold(prev: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """prev(x) * a + b as prev's own weight and bias (per output channel)."""
    weight = prev.weight.detach().to(torch.float64)
    a, b = a.reshape(-1), b.reshape(-1)  # a per-channel layer's (C, 1, ...) parameters
    if isinstance(prev, nn.modules.conv._ConvTransposeNd):
        # weight is (in, out / groups, *k): output channel g * out/groups + j is weight[group g rows, j]
        g = prev.groups
        grouped = weight.reshape(g, weight.shape[0] // g, weight.shape[1], *weight.shape[2:])
        scale = a.view(g, 1, weight.shape[1], *([1] * (weight.dim() - 2)))
        new_weight = (grouped * scale).reshape(weight.shape)
    else:
        new_weight = weight * a.view((-1,) + (1,) * (weight.dim() - 1))
    bias = b if prev.bias is None else prev.bias.detach().to(torch.float64) * a + b
    with torch.no_grad():
        prev.weight.copy_(new_weight)
        if prev.bias is None:
            prev.bias = nn.Parameter(bias.to(device=prev.weight.device, dtype=prev.weight.dtype),
                                     requires_grad=prev.weight.requires_grad)
        else:
            prev.bias.copy_(bias)


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of `model` (the input is not changed) without Batchless layers, same outputs up to float
    rounding (train and eval alike; the copy computes no NLL), except the layers kept below.

    Rule: inside an nn.Sequential (not a subclass with its own forward), a Batchless layer that
    directly follows (as the next child) a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear with as many
    output channels is folded into that layer's weight and bias, and replaced by nn.Identity (indices,
    hence state_dict keys, are kept). A Linear is assumed to see (N, in_features) inputs, the case
    where BatchlessNorm1d's channels are its output features. Elsewhere (e.g. ResNet blocks, whose
    forward calls self.bn1(self.conv1(x))), the model is traced with torch.fx: a Batchless layer used
    once, called on the output of a conv (not Linear) called once whose output nothing else reads, is
    folded likewise; models that do not trace keep the Sequential rule only. Conv/linear modules used
    more than once, with hooks, or subclasses with their own forward are not folded. Every other
    Batchless layer becomes a ChannelAffine.

    Kept as they are, with a UserWarning naming each: Batchless layers with hooks (forward, backward,
    or their pre-hooks) or whose class or instance overrides forward, since their function is not the
    affine map. Nothing is folded into the layer before them, and they still compute their NLL.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)
    uses: dict[int, int] = {}  # registrations of each module and parameter (tied weights count twice)
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    kept: set[int] = set()
    for name, m in model.named_modules():
        why = _own_behaviour(m, _BatchlessNorm) if isinstance(m, _BatchlessNorm) else None
        if why:
            warnings.warn(f"module {name or type(m).__name__!r} ({type(m).__name__}) is kept as it is, "
                          f"not fused: {why}", stacklevel=2)
            kept.add(id(m))

    def fusable(m: nn.Module) -> bool:
        return isinstance(m, _BatchlessNorm) and id(m) not in kept

    affines: dict[int, nn.Module] = {}  # one ChannelAffine per (possibly shared) Batchless layer

    def as_affine(layer: _BatchlessNorm) -> nn.Module:
        if id(layer) not in affines:
            a, b = _affine_of(layer)
            dtype = layer.mean.dtype
            affines[id(layer)] = ChannelAffine(a.to(dtype), b.to(dtype))
        return affines[id(layer)]

    folded: set[int] = set()
    # a Sequential with its own forward may not run its children one after the other
    for seq in [m for m in model.modules()
                if isinstance(m, nn.Sequential) and not _overrides_forward(m, nn.Sequential)]:
        names = list(seq._modules)
        for prev_name, name in zip(names, names[1:]):
            prev, layer = seq._modules[prev_name], seq._modules[name]
            if fusable(layer) and id(prev) not in folded and _foldable(prev, layer, uses):
                _fold(prev, *_affine_of(layer))
                folded.add(id(prev))
                seq._modules[name] = nn.Identity()
    # Elsewhere, from the traced graph: convolutions only, whose channel dim is dim 1 whatever the
    # input (a Linear's features are dim 1 only for 2-D inputs, which a graph without shapes can't tell).
    for prev_name, name in _traced_pairs(model):
        prev, layer = model.get_submodule(prev_name), model.get_submodule(name)
        if (fusable(layer) and uses[id(layer)] == 1 and not isinstance(prev, nn.Linear) and id(prev) not in folded
                and _foldable(prev, layer, uses)):
            _fold(prev, *_affine_of(layer))
            folded.add(id(prev))
            parent_name, _, child_name = name.rpartition(".")
            model.get_submodule(parent_name)._modules[child_name] = nn.Identity()
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if fusable(child):
                parent._modules[name] = as_affine(child)
    if fusable(model):
        return as_affine(model)
    return model
