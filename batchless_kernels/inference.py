"""fuse_for_inference: batchless normalization as the per-channel affine map it is at inference
(docs/method.md: y = x * a + b with a = gamma / sigma, b = beta - mu * gamma / sigma), folded into the
preceding convolution or linear layer where there is one."""

from __future__ import annotations

import collections
import copy
import sys
import warnings
from typing import NamedTuple

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from ._checks import accumulation_dtype, bool_option, fits
from .modules import BatchlessNorm, _BatchlessNorm
from .parametrization import rstd_and_log_std

_FOLD_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
              nn.Linear)
_HOOKS = {"_forward_pre_hooks": "forward pre-hooks", "_forward_hooks": "forward hooks",
          "_backward_pre_hooks": "backward pre-hooks", "_backward_hooks": "backward hooks"}


# The methods that compute a module's output: nn.Module.forward, and what the convolutions' forward
# calls (weight standardization overrides _conv_forward and inherits forward).
_OUTPUT_METHODS = ("forward", "_conv_forward", "_output_padding")


def _overridden(module: nn.Module, base: type, methods: tuple[str, ...] = _OUTPUT_METHODS) -> str | None:
    """The first of `methods` (of `base`) that `module`'s class or the instance overrides."""
    return next((name for name in methods if hasattr(base, name)
                 and (getattr(type(module), name) is not getattr(base, name) or name in vars(module))), None)


def _own_behaviour(module: nn.Module, base: type, methods: tuple[str, ...] = _OUTPUT_METHODS) -> str | None:
    """Why `module` may do more than `base.forward` (so that replacing it by a module computing
    that, or folding anything into it, could change the model or drop a hook), or None: its class
    or the instance overrides forward (or a method forward calls), or it has hooks (forward,
    backward, or their pre-hooks)."""
    method = _overridden(module, base, methods)
    if method:
        return f"it overrides {base.__name__}.{method}"
    hooks = [what for attr, what in _HOOKS.items() if getattr(module, attr)]
    return f"it has {' and '.join(hooks)}" if hooks else None


# The folded model's forwards call these free functions, wrapped for torch.fx so that
# symbolic_trace records each as one node that checks its input at run time (FX quantization and
# feature extraction trace the fused model; a Proxy cannot take the checks' branches).
# torch.jit.script compiles them with the forwards (deployment): annotated, lists and loops.


def _folded_input(input: torch.Tensor, rank: int) -> torch.Tensor:
    """Folded's forward: input itself, where its rank is the folded one."""
    if input.dim() != rank:  # list(), not tuple(): torch.jit.script compiles this
        raise ValueError(
            f"this Batchless layer was folded by fuse_for_inference into the layer before it for "
            f"{rank}-D inputs (batched, channels at dim 1), got shape {list(input.shape)}: on "
            "these inputs the layer's channels are not that layer's outputs; fuse a model that sees "
            "batched inputs, or use the unfused model")
    return input


def _channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, per_channel: bool,
                    min_rank: int = 0, max_rank: int = 0) -> torch.Tensor:
    """ChannelAffine's forward: x * scale + shift, x checked (its rank in [min_rank, max_rank] unless 0)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError("input must be a torch.Tensor")
    if not x.is_floating_point():  # as the layer refuses them: an int input was truncated
        raise TypeError("input must have a floating dtype, got " + str(x.dtype))
    if min_rank > 0 and not min_rank <= x.dim() <= max_rank:  # the layer's rule (BatchlessNorm1d: 2-D or 3-D)
        ranks = " or ".join([str(r) + "D" for r in range(min_rank, max_rank + 1)])  # the layer's words
        raise ValueError("expected " + ranks + " input (got " + str(x.dim()) + "D input)")
    shape = list(scale.shape)
    if per_channel:
        shape = shape + [1] * max(0, x.dim() - 2)
    fits = x.dim() == len(shape) + 1 and not (per_channel and shape[0] != x.shape[1])
    for i in range(len(shape)):
        fits = fits and (shape[i] == 1 or shape[i] == x.shape[i + 1])
    if not fits:
        expected = str(shape[0]) + ", *" if per_channel else ", ".join([str(d) for d in shape])
        raise ValueError("expected an (N, " + expected + ") input (size-1 dims broadcast), got shape "
                         + str(list(x.shape)))
    view = [1] + shape
    return torch.addcmul(shift.view(view), x, scale.view(view)).to(x.dtype)


torch.fx.wrap("_folded_input")
torch.fx.wrap("_channel_affine")


class Folded(nn.Identity):
    """What replaces a Batchless layer folded into the conv/linear layer before it: the identity, for
    inputs of the rank that layer was folded for ((N, C, *) batched conv outputs, (N, C) for a Linear):
    an unbatched conv or a Linear on (N, L, F) puts the layer's channels on another dim than its own."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Identity's name
        return _folded_input(input, self.rank)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class ChannelAffine(nn.Module):
    """y = x * scale + shift: an inference-time Batchless layer. Like the layer, it returns x's dtype
    and memory format (computing in the buffers' dtype when it is wider).

    Args:
        scale, shift: tensors of one shape: (C,) per channel (dim 1 of (N, C, *) inputs), or the shape
            of the input's dims after the batch dim, size-1 dims broadcasting (a BatchlessNorm's
            param_shape). A 1-D pair is per channel unless per_channel=False.
        per_channel: whether a 1-D scale is per channel; False: it is a param_shape (C,), for
            (N, C) inputs, or (1,), one scale and shift for every feature of (N, D) inputs.
        ranks: the input ranks accepted, consecutive ints (a layer's: (2, 3) for BatchlessNorm1d), or
            None: any that scale fits.

    Raises:
        TypeError, ValueError: scale or shift not floating tensors of one shape (construction); an
            input that scale does not fit (forward).
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, *, per_channel: bool = True,
                 ranks: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if ranks is not None and not (isinstance(ranks, tuple) and ranks and all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)
                and list(ranks) == list(range(ranks[0], ranks[0] + len(ranks)))):
            raise ValueError(f"ranks must be None or a tuple of consecutive positive ints, got {ranks!r}")
        # two ints, not the tuple: torch.jit.script compiles this module
        self.min_rank, self.max_rank = (ranks[0], ranks[-1]) if ranks is not None else (0, 0)
        if not (isinstance(scale, torch.Tensor) and isinstance(shift, torch.Tensor)):
            raise TypeError(f"scale and shift must be tensors, got {type(scale).__name__} and {type(shift).__name__}")
        per_channel = bool_option("per_channel", per_channel)
        if not (scale.is_floating_point() and shift.is_floating_point()):  # complex lost its imaginary part
            raise TypeError(f"scale and shift must be floating tensors, got {scale.dtype} and {shift.dtype}")
        if scale.dim() < 1 or scale.shape != shift.shape:
            raise ValueError(
                "scale and shift must be tensors of one shape, (C,) or a Batchless layer's param_shape, got "
                f"{tuple(scale.shape)} and {tuple(shift.shape)}"
            )
        self.per_channel = per_channel and scale.dim() == 1
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.BatchNorm's name: layer(input=x)
        """input * scale + shift, per channel (dim 1 of (N, C, *) input) or broadcast as param_shape; of
        input's shape, dtype and memory format. ValueError / TypeError for an input scale does not fit."""
        return _channel_affine(input, self.scale, self.shift, self.per_channel, self.min_rank, self.max_rank)

    def extra_repr(self) -> str:
        shape = f"{self.scale.shape[0]}" if self.per_channel else f"param_shape={tuple(self.scale.shape)}"
        return shape + (f", ranks={tuple(range(self.min_rank, self.max_rank + 1))}" if self.min_rank else "")


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
    """Whether `layer` can be folded into `prev`: a plain conv/linear (no own forward, no hooks, no
    parametrization, not used elsewhere in the model, nor its weight or bias: folding rewrites them) whose output channels
    are the layer's channels. A Linear scales its last dim: only a 1-D param_shape (inputs (N, C)) fits."""
    base = next((cls for cls in _FOLD_INTO if isinstance(prev, cls)), None)
    # A parametrized weight (weight_norm, spectral_norm, ...) is recomputed at every access: a write
    # to it would be lost.
    if base is None or not layer.per_channel or _own_behaviour(prev, base) or uses[id(prev)] > 1 \
            or parametrize.is_parametrized(prev) \
            or nn.parameter.is_lazy(prev.weight) or any(uses.get(id(p), 0) > 1 for p in (prev.weight, prev.bias)):
        return False
    if isinstance(prev, nn.Linear) and len(layer.param_shape) != 1:
        return False
    out = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
    return out == layer.num_features


class _LeafTracer(torch.fx.Tracer):
    """Traces a model down to its convolutions, linear and Batchless layers (kept as modules)."""

    def __init__(self, opaque: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque  # ids of modules that do not trace: called, not looked into

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (_BatchlessNorm, *_FOLD_INTO)) or id(m) in self.opaque
                or super().is_leaf_module(m, qualname))


class _Trace(NamedTuple):
    """What the traced forward says, by module name (a shared module's first name)."""

    pairs: set[tuple[str, str]]  # (conv/linear, Batchless layer): the layer reads the conv's output, alone
    calls: collections.Counter  # how many times each module is called


def _trace(model: nn.Module) -> _Trace | None:
    """The pairs of the forward traced in training and in eval mode alike (the calls: the most of
    the two): a conv/linear called once, whose output nothing but one call of a Batchless layer
    reads, and whose parameters no other node reads; the pairs that PyTorch's own conv-bn fusion
    (torch.fx.experimental.optimization.fuse) finds. Submodules that do not trace are not looked
    into (no pair inside them). None when the model itself does not trace."""
    flags = {m: m.training for m in model.modules()}
    try:
        in_train, in_eval = _trace_in(model.train(True)), _trace_in(model.train(False))
    finally:
        for m, flag in flags.items():
            m.training = flag
    if in_train is None or in_eval is None:
        return None
    return _Trace(in_train.pairs & in_eval.pairs, in_train.calls | in_eval.calls)


def _fx_graph(model: nn.Module) -> tuple[torch.fx.Graph, set[int]] | None:
    """model's graph, with every submodule that does not trace by itself (data-dependent control flow,
    say) called as a whole, and the ids of the modules inside those (their calls are not in the graph);
    None when the model itself does not trace."""
    with warnings.catch_warnings():  # a Batchless root's "no NLL" warning: this graph is only read
        warnings.filterwarnings("ignore", message=".*symbolic_trace of a .* in training mode", category=torch.jit.TracerWarning)
        return _fx_graph_unwarned(model)


def _fx_graph_unwarned(model: nn.Module) -> tuple[torch.fx.Graph, set[int]] | None:
    try:
        return _LeafTracer().trace(model), set()
    except Exception:  # noqa: BLE001 - any tracing failure means: no graph to read here
        pass
    opaque: set[int] = set()
    kept_whole = _LeafTracer()  # asks only which modules the tracer keeps as modules anyway
    for m in reversed(list(model.modules())):  # a module after every module below it
        if m is model or kept_whole.is_leaf_module(m, ""):
            continue
        try:
            _LeafTracer(frozenset(opaque)).trace(m)
        except Exception:  # noqa: BLE001
            opaque.add(id(m))
    try:
        graph = _LeafTracer(frozenset(opaque)).trace(model)
    except Exception:  # noqa: BLE001
        return None
    hidden = {id(inner) for m in model.modules() if id(m) in opaque for inner in m.modules() if inner is not m}
    return graph, hidden


def _trace_in(model: nn.Module) -> _Trace | None:
    traced = _fx_graph(model)
    if traced is None:
        return None
    graph, hidden = traced
    read = {n.target for n in graph.nodes if n.op == "get_attr"}  # parameters read directly
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = set()
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and calls[src.target] == 1
                and len(src.users) == 1 and not any(t.startswith(f"{src.target}.") for t in read)
                # a module that an untraced one holds may be called there too, unseen
                and not {id(model.get_submodule(src.target)), id(model.get_submodule(node.target))} & hidden):
            pairs.add((src.target, node.target))
    return _Trace(pairs, calls)


def _fold(prev: nn.Module, a: torch.Tensor, b: torch.Tensor) -> Folded | None:
    """prev(x) * a + b as prev's own weight and bias (per output channel); returns what replaces the
    layer, or None (prev unchanged) where the new weight or bias overflows prev's dtype (float16:
    beta - mu * gamma / sigma = -1e5)."""
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
    dtype = prev.weight.dtype
    if not (fits(new_weight, dtype) and fits(bias, dtype)):
        return None
    with torch.no_grad():
        prev.weight.copy_(new_weight)
        if prev.bias is None:
            prev.bias = nn.Parameter(bias.to(device=prev.weight.device, dtype=prev.weight.dtype),
                                     requires_grad=prev.weight.requires_grad)
        else:
            prev.bias.copy_(bias)
    return Folded(_output_rank(prev))


def _output_rank(prev: nn.Module) -> int:
    """The rank of a conv/linear layer's batched output: (N, C) for a Linear, (N, C, *spatial) for a conv."""
    return 2 if isinstance(prev, nn.Linear) else prev.weight.dim()


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of `model` (the input is not changed) without Batchless layers, same outputs up to float
    rounding (train and eval alike; the copy computes no NLL), except the layers kept below.

    Rule: inside an nn.Sequential (not a subclass with its own forward), a Batchless layer that
    directly follows (as the next child) a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear with as many
    output channels is folded into that layer's weight and bias, and replaced by an nn.Identity
    (indices, hence state_dict keys, are kept) that raises ValueError on inputs of another rank than
    the batched conv output, (N, C) for a Linear: there the layer's channels are not the conv's (an
    unbatched conv, a Linear on (N, L, F)). The model must trace with torch.fx, and the trace agree:
    the conv and the layer are each called once, and only the layer reads the conv's output (a model
    that calls a Sequential's children itself, or keeps their outputs, is not folded there).
    Elsewhere (e.g. ResNet blocks, whose forward calls self.bn1(self.conv1(x))), a Batchless layer
    used once, called on the output of a conv (not Linear) called once whose output nothing else
    reads, is folded likewise. Nothing is folded inside submodules that do not trace by themselves
    (data-dependent control flow), nor anywhere in a model that does not trace (with a UserWarning).
    Conv/linear modules used more than once, with hooks, with a parametrized weight or bias
    (weight_norm, spectral_norm: recomputed at each access), or subclasses that override forward (or
    _conv_forward, as weight standardization does) are not folded, nor a layer whose rank rule refuses
    the conv's batched output (a BatchlessNorm1d after a Conv2d: the model raised there). Every other
    Batchless layer becomes a ChannelAffine (of param_shape for BatchlessNorm, which broadcasts as the
    layer does), which keeps the layer's rank rule.

    Kept as they are, with a UserWarning naming each: Batchless layers with hooks (forward, backward,
    or their pre-hooks) or whose class or instance overrides forward, since their function is not the
    affine map. Nothing is folded into the layer before them, and they still compute their NLL.

    Raises TypeError when `model` is not an nn.Module, or is a torch.compile'd one (fuse the module it
    wraps, model._orig_mod, then compile the result). A model on the meta device folds alike (shapes
    only).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dynamo = sys.modules.get("torch._dynamo")  # imported once anything was compiled
    if dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule):  # does not trace with fx
        raise TypeError("fuse_for_inference got a torch.compile'd module: fuse the module it wraps "
                        "(model._orig_mod), then compile the result")
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
            # In the layer's accumulation dtype, as it computes: b = beta - mu * a cancels against x * a,
            # which bfloat16's 8 bits would leave off by |mu * a| / 256 (and float16 may overflow).
            dtype = accumulation_dtype(layer.mean.dtype)
            # BatchlessNorm's 1-D param_shape is no channel count: (1,) broadcasts over (N, D) inputs
            affines[id(layer)] = ChannelAffine(a.to(dtype), b.to(dtype), per_channel=not isinstance(layer, BatchlessNorm),
                                               ranks=layer._accepted_dims or None)  # the layer's rank rule
        return affines[id(layer)]

    folded: set[int] = set()
    # The data flow, where the model traces: a pair of a Sequential's children is folded only if the
    # trace agrees that the layer reads the conv's output alone, that nothing else does, and that the
    # layer runs only there (a model may call a Sequential's children itself, through the slot that
    # folding empties, or keep their outputs).
    trace = _trace(model)
    if trace is None and any(fusable(m) for m in model.modules()):
        warnings.warn(f"{type(model).__name__} does not trace with torch.fx (data-dependent control flow?): "
                      "its data flow is unknown, so no Batchless layer is folded into the layer before it; "
                      "each becomes a ChannelAffine", stacklevel=2)
    first_name = {id(m): n for n, m in model.named_modules()}

    def fold(prev: nn.Module, layer: _BatchlessNorm) -> Folded | None:
        if layer._accepted_dims and _output_rank(prev) not in layer._accepted_dims:  # the model refused that output:
            folded.add(id(prev))  # so does the layer's ChannelAffine (a Folded would run it)
            return None
        replacement = _fold(prev, *_affine_of(layer))
        if replacement is None:
            warnings.warn(f"module {first_name[id(layer)]!r} ({type(layer).__name__}) is not folded into "
                          f"{first_name[id(prev)]!r}: the folded weight or bias overflows {prev.weight.dtype}; "
                          "it becomes a ChannelAffine, which computes in float32", stacklevel=3)
        folded.add(id(prev))  # folded, or refused: not tried again
        return replacement

    def data_flow_allows(prev: nn.Module, layer: nn.Module) -> bool:
        if trace is None:
            return False
        prev_name, name = first_name[id(prev)], first_name[id(layer)]
        return (prev_name, name) in trace.pairs and trace.calls[name] == 1

    # a Sequential with its own forward may not run its children one after the other
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential) and not _overridden(m, nn.Sequential)]:
        names = list(seq._modules)
        for prev_name, name in zip(names, names[1:]):
            prev, layer = seq._modules[prev_name], seq._modules[name]
            if fusable(layer) and id(prev) not in folded and _foldable(prev, layer, uses) \
                    and data_flow_allows(prev, layer):
                seq._modules[name] = fold(prev, layer) or layer
    # Elsewhere, from the traced graph: convolutions only. A Linear's features are dim 1 only for 2-D
    # inputs, which a graph without shapes can't tell: a model whose Linear sees (N, L, F) would then
    # raise in Folded where it ran unfused.
    for prev_name, name in sorted(trace.pairs if trace is not None else ()):
        prev, layer = model.get_submodule(prev_name), model.get_submodule(name)
        if (fusable(layer) and uses[id(layer)] == 1 and trace.calls[name] == 1 and not isinstance(prev, nn.Linear)
                and id(prev) not in folded and _foldable(prev, layer, uses)):
            parent_name, _, child_name = name.rpartition(".")
            model.get_submodule(parent_name)._modules[child_name] = fold(prev, layer) or layer
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if fusable(child):
                parent._modules[name] = as_affine(child)
    if fusable(model):
        return as_affine(model)
    return model
