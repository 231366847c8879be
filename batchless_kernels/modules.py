"""Drop-in replacements for nn.BatchNorm1d/2d/3d, and nll_loss to add their NLL terms to a loss."""

from __future__ import annotations

import copy
import itertools
import numbers
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ._checks import (accumulation_dtype, bool_option, check_eps_normal, check_layer_input, factory_kwargs,
                      int_option, nll_weight_option, real_option, refuse_jit_script)
from .backends import BACKENDS
from .backends import prepare as prepare_backend
from .functional import (_is_functorch_wrapped, _under_functorch, batchless_norm, compiling_under_functorch, exporting,
                         in_backward_pass)
from .parametrization import check_eps, check_parametrization, param_from_std, std_from_param


# The latest forward's NLL term: a tensor of the current step's autograd graph, not of the layer's
# state (copies and pickles leave it out).
_NO_STEP_TENSORS = {"nll": None}
# Stamps of the forwards that computed an NLL (ints: they keep no graph alive), so that the Opacus
# grad sampler (privacy.py) can tell whether nll_loss put the captured training forward's term into
# the loss: _nll_stamp (the latest such forward), _training_stamp (the latest in training mode),
# _summed_stamp (the one whose term nll_loss last added). Only once privacy.py is imported (it sets
# STAMPING): the sampler exists from then on, and Opacus wraps a model after it.
_STAMPS = itertools.count(1)
STAMPING = False


def _layer_output(x, mean, std_param, weight, bias, parametrization: str, eps: float, backend: str,
                  accepted_dims, num_features, layer: str) -> torch.Tensor:
    """A Batchless layer's y, without the NLL, its input checked as the layer checks it: the node that
    torch.fx.symbolic_trace records for the layer (torch.fx.wrap; feature extraction, FX quantization),
    whose graph holds no module to keep an NLL term in, as under torch.jit.trace."""
    check_layer_input(x, accepted_dims, num_features, layer)
    return batchless_norm(x, mean, std_param, weight, bias, parametrization=parametrization, eps=eps,
                          backend=backend, need_nll=False)[0]


torch.fx.wrap("_layer_output")


# The options every layer takes, in each public class's docstring (help() shows the class's own).
_OPTIONS_DOC = """\
        eps: positive; enters sigma's parametrization (see parametrization.py).
        affine: learn a per-channel scale ``weight`` (gamma), and a shift ``bias`` (beta) unless
            ``bias=False`` (nn.LayerNorm's convention); without them y is the normalized input.
        bias: with affine, whether to learn the shift; False registers ``bias`` as None.
        parametrization: "abs", "log" or "inv": how ``std_param`` gives sigma.
        nll_weight: the NLL term's multiplier in ``nll_loss`` (>= 0).
        gauge: subtract the NLL's expected value (same gradients).
        init_mean, init_std: the Gaussian's initial mean and sigma (> 0).
        backend: "auto", "reference", "cpu", "triton" or "cuda".
        device, dtype: of the parameters.
"""
# ... and the errors they raise.
_RAISES_DOC = """        TypeError: an option of the wrong type (numpy's scalars count as Python's), a parameter dtype
            that is not floating; an input that is not a tensor or not of a floating dtype.
        ValueError: an option out of its range (eps not a normal number of the dtype the layer
            computes in, init_std <= 0, nll_weight < 0, an unknown parametrization or backend, an
            init_std whose std_param the parameters' dtype cannot hold)."""


def _layer_doc(inputs: str) -> str:
    """The docstring of each public class (help() shows the class's own)."""
    return f"""Batchless normalization over dim 1 (channels): learned mean and std, trained by the NLL term
    (docs/method.md): y = (x - mean) / sigma * weight + bias, per channel.
    {inputs}

    The same function in train and eval mode. After each forward the layer keeps its (unweighted)
    NLL term in ``self.nll``, a 0-dim float32 tensor (float64 for float64 inputs);
    ``batchless_kernels.nll_loss(model)`` adds them up with nll_weight.

    Args:
        num_features: C, the channels of the inputs.
{_OPTIONS_DOC}
    Shape:
        Input float16, bfloat16, float32 or float64 (any of them whatever the parameters' dtype);
        output of the input's shape, dtype and memory format.

    Raises (each naming the argument):
        ValueError: an input of another rank or another number of channels.
{_RAISES_DOC}
    """


class _BatchlessNorm(nn.Module):
    __doc__ = _layer_doc("For (N, C, *) inputs.")

    _accepted_dims: tuple[int, ...] | None = ()
    # Called with every subclass defined from now on (batchless_kernels.privacy registers its Opacus
    # grad sampler for each: Opacus looks samplers up by exact class).
    _subclass_hooks: list = []

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for hook in _BatchlessNorm._subclass_hooks:
            hook(cls)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        bias: bool = True,
        parametrization: str = "log",
        nll_weight: float = 1.0,
        gauge: bool = True,
        init_mean: float = 0.0,
        init_std: float = 1.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        num_features = int_option("num_features", num_features, "a positive int", lambda v: v > 0)
        nll_weight = nll_weight_option("nll_weight", nll_weight)
        init_std = real_option("init_std", init_std, "a positive finite float", lambda v: v > 0)
        init_mean = real_option("init_mean", init_mean, "a finite float")
        factory = factory_kwargs(device, dtype)
        param_dtype = dtype if dtype is not None else torch.get_default_dtype()
        if not abs(init_mean) <= torch.finfo(param_dtype).max:
            raise ValueError(f"init_mean={init_mean!r} is outside the range of {param_dtype}, the parameters' dtype")
        # also catches a parametrization passed positionally
        affine, bias, gauge = (bool_option(name, flag) for name, flag in
                               (("affine", affine), ("bias", bias), ("gauge", gauge)))
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_features = num_features
        self.eps = check_eps(eps)
        check_eps_normal(self.eps, param_dtype, f"{param_dtype} layer")  # its inputs' may differ: checked again
        self.affine = affine
        self.parametrization = check_parametrization(parametrization)
        self.nll_weight = float(nll_weight)
        self.gauge = gauge
        self.init_mean = float(init_mean)
        self.init_std = float(init_std)
        try:  # init_std against eps, and its std_param against the parameters' dtype
            p = param_from_std(self.init_std, self.parametrization, self.eps)
        except ValueError as e:
            raise ValueError(f"init_std={init_std!r} cannot be the initial std: {e}") from None
        # std_param must be stored in the parameters' dtype; r = 1/sigma, computed in the accumulation
        # dtype (float32 for 16-bit parameters), must neither overflow (inf outputs) nor flush to 0.
        for name, value, in_dtype in (("std_param", float(p), param_dtype),
                                      ("1/sigma", 1.0 / self.init_std, accumulation_dtype(param_dtype))):
            finfo = torch.finfo(in_dtype)
            # log: std_param = log sigma, whose absolute error is sigma's relative one; abs: std_param =
            # sigma - eps > 0, a subnormal one a coarse sigma (float16 1e-7 stored as 1.19e-7); inv: r
            may_be_small = name == "std_param" and self.parametrization == "log"
            if not (abs(value) <= finfo.max and (may_be_small or abs(value) >= finfo.tiny)):
                raise ValueError(f"init_std={init_std!r} gives {name}={value:.3g} with parametrization="
                                 f"{self.parametrization!r}, outside the normal range of {in_dtype}")
        self.backend = backend
        prepare_backend(backend)  # its ops looked up now, not at a compiled model's first step
        shape = self._parameter_shape(num_features)
        self.mean = nn.Parameter(torch.empty(shape, **factory))
        self.std_param = nn.Parameter(torch.empty(shape, **factory))
        # nn.LayerNorm's convention: affine gives the learned scale (gamma) and, unless bias=False,
        # the shift (beta); the method's "output std" and "output mean", which the author's layer
        # also has apart.
        if self.affine:
            self.weight = nn.Parameter(torch.empty(shape, **factory))
        else:
            self.register_parameter("weight", None)
        if self.affine and bias:
            self.bias = nn.Parameter(torch.empty(shape, **factory))
        else:
            self.register_parameter("bias", None)
        self.nll: torch.Tensor | None = None
        self.reset_parameters()

    def _parameter_shape(self, num_features: int) -> tuple[int, ...]:
        return (num_features,)

    @property
    def param_shape(self) -> tuple[int, ...]:
        """The shape of mean, std_param, weight, bias: (num_features,) per channel."""
        return tuple(self.mean.shape)

    @property
    def per_channel(self) -> bool:
        """The parameters vary along dim 1 at most (shared over every other axis): a per-channel
        affine map, what can fold into the conv before the layer."""
        return all(d == 1 for d in self.param_shape[1:])

    def reset_parameters(self) -> None:
        """mean = init_mean, sigma = init_std, weight 1, bias 0 (what the constructor set); drops nll."""
        with torch.no_grad():
            self.mean.fill_(self.init_mean)
            self.std_param.fill_(float(param_from_std(self.init_std, self.parametrization, self.eps)))
            if self.weight is not None:
                nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        self.nll = None

    def __getstate__(self):
        # The latest NLL belongs to the current step's autograd graph, not to the layer's state:
        # leave it out so that copy.deepcopy and pickling work after a forward.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, **_NO_STEP_TENSORS}

    def __deepcopy__(self, memo):
        # What copy.deepcopy does through __getstate__ (a subclass's too), written out because
        # torch.nn.utils.parametrize swaps in a class whose __getstate__ refuses pickling and, unless
        # the class has a __deepcopy__, one that copies __dict__ as it is, nll (a non-leaf tensor
        # deepcopy refuses) included.
        state = ({**self.__dict__, **_NO_STEP_TENSORS} if parametrize.is_parametrized(self)
                 else self.__getstate__())
        replica = type(self).__new__(type(self))
        memo[id(self)] = replica
        replica.__setstate__(copy.deepcopy(state, memo))
        return replica

    @property
    def std(self) -> torch.Tensor:
        """sigma per channel, from std_param (read-only, no gradient): the standard deviation of the
        NLL's Gaussian, positive, (C,) (param_shape for BatchlessNorm), in the dtype the layer computes
        in (float32 for 16-bit parameters, where a float16 sigma of 1e5 or 1e-8 would read inf or 0).
        With parametrization="inv" it is 1/abs(std_param); a negative std_param flips the sign of the
        output (r = std_param, docs/method.md), not of sigma."""
        with torch.no_grad():
            p = self.std_param
            return std_from_param(p.to(accumulation_dtype(p.dtype)), self.parametrization, self.eps)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        check_layer_input(x, *self._input_rule(), type(self).__name__)

    def _input_rule(self) -> tuple[tuple[int, ...] | None, int | None]:
        """(accepted ranks, channels) that _check_input_dim asks of the input (also the fx node's check)."""
        return self._accepted_dims, self.num_features

    def _warn_no_nll(self, tracer: str) -> None:
        if self.training:
            warnings.warn(f"{tracer} of a {type(self).__name__} in training mode: the traced module computes the "
                          "outputs but no NLL (nll_loss cannot reach it), so it cannot train mean and std_param; "
                          "trace in eval mode for inference", torch.jit.TracerWarning, stacklevel=3)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.BatchNorm's name: layer(input=x)
        """y of input's shape, dtype and memory format; keeps the NLL term in self.nll (None where no
        gradient is wanted). TypeError / ValueError for an input of another type, rank or width."""
        x = input
        if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: one node, y (_layer_output)
            self._warn_no_nll("torch.fx.symbolic_trace")
            return _layer_output(x, self.mean, self.std_param, self.weight, self.bias, self.parametrization,
                                 self.eps, self.backend, *self._input_rule(), type(self).__name__)
        self._check_input_dim(x)
        # An exported program (torch.export, ONNX) is for inference: a module attribute is no output.
        # Under torch.compile of a torch.func transform, batchless_norm computes the NLL whatever
        # requires_grad says, and the term kept here must be taken by nll_loss in the compiled
        # function (AOTAutograd cannot return it): an eval-mode layer does not compute one there.
        need_nll = False if not self.training and compiling_under_functorch() else None
        tracing = torch.jit.is_tracing()  # torch.jit.trace: a graph of outputs, which the NLL is not
        if tracing or exporting():
            need_nll = False
            self._warn_no_nll("torch.jit.trace" if tracing else "torch.export")
        y, nll = batchless_norm(
            x, self.mean, self.std_param, self.weight, self.bias,
            parametrization=self.parametrization, eps=self.eps, gauge=self.gauge, backend=self.backend,
            need_nll=need_nll,
        )
        # A recomputation inside a backward pass (torch.utils.checkpoint) keeps the first forward's term:
        # its own would hold the recomputed activations alive until the layer's next forward (twelve
        # checkpointed conv blocks kept 780 MB between steps against BatchNorm's 411 MB).
        # A trace leaves the layer as it was: the term of a training forward run before it stays
        # for nll_loss (torch.export restores module attributes itself).
        if in_backward_pass() or tracing:
            return y
        # A plain attribute (never a parameter, buffer or submodule): nn.Module.__setattr__'s checks
        # cost ~2 us a call, a tenth of a small layer's forward.
        object.__setattr__(self, "nll", nll)
        if STAMPING and nll is not None and not torch.compiler.is_compiling():  # torch 2.11's Dynamo: no next()
            stamp = next(_STAMPS)
            object.__setattr__(self, "_nll_stamp", stamp)
            # Opacus samples a training forward's output only, and only when it needs a gradient
            object.__setattr__(self, "_output_needs_grad", y.requires_grad or not self.training)
            if self.training:
                object.__setattr__(self, "_training_stamp", stamp)
        return y

    __prepare_scriptable__ = refuse_jit_script

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, bias={self.bias is not None}, "
            f"parametrization={self.parametrization!r}, nll_weight={self.nll_weight}, gauge={self.gauge}, "
            f"init_mean={self.init_mean}, init_std={self.init_std}, backend={self.backend!r}"
        )


class BatchlessNorm1d(_BatchlessNorm):
    __doc__ = _layer_doc("For (N, C) or (N, C, L) inputs, where nn.BatchNorm1d is used.")

    _accepted_dims = (2, 3)


class BatchlessNorm2d(_BatchlessNorm):
    __doc__ = _layer_doc("For (N, C, H, W) inputs, where nn.BatchNorm2d is used.")

    _accepted_dims = (4,)


class BatchlessNorm3d(_BatchlessNorm):
    __doc__ = _layer_doc("For (N, C, D, H, W) inputs, where nn.BatchNorm3d is used.")

    _accepted_dims = (5,)


class BatchlessNormNd(_BatchlessNorm):
    __doc__ = _layer_doc("For (N, C, *) inputs of any rank >= 2: what nn.SyncBatchNorm (which accepts any rank)\n"
                         "    converts to, since its rank is only known at run time.")

    _accepted_dims = None


class BatchlessNorm(_BatchlessNorm):
    __doc__ = f"""Batchless normalization with Gaussians shared over any set of the non-batch axes (the
    author's shared_axes, docs/method.md), in PyTorch's broadcasting idiom.

    Args:
        param_shape: the shape of mean, std_param, weight and bias, with as many dims as the input
            has after the batch dim, each 1 (an axis the Gaussian shares) or the input's size there:
            (C, 1, 1) on (N, C, H, W) inputs is BatchlessNorm2d(C); (C, H, W) keeps statistics per
            position; (1, 1, 1) one Gaussian for the whole layer. An int C means (C,).
{_OPTIONS_DOC}
    The NLL is the mean over every element of the input (docs/method.md). The kernels run it without
    copies where the Gaussians vary along leading axes only ((C, H, 1)), trailing axes only ((1, H, W)),
    or per channel; other patterns on contiguous inputs, and shared patterns on non-contiguous inputs,
    run through the reference (tensor ops).

    Raises:
        ValueError: param_shape not a positive int nor a non-empty tuple or list of them; an input of
            another rank or whose sizes param_shape does not broadcast to; the options' errors below.
{_RAISES_DOC}
    """

    _accepted_dims = None

    def __init__(self, param_shape, eps: float = 1e-5, affine: bool = True, bias: bool = True,
                 parametrization: str = "log", nll_weight: float = 1.0, gauge: bool = True,
                 init_mean: float = 0.0, init_std: float = 1.0, backend: str = "auto", device=None,
                 dtype=None) -> None:
        def positive_int(d) -> bool:  # numpy's integers too
            return isinstance(d, numbers.Integral) and not isinstance(d, (bool, np.bool_)) and d > 0

        shape = (param_shape,) if isinstance(param_shape, numbers.Integral) else param_shape
        if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) > 0 and all(map(positive_int, shape))):
            raise ValueError(f"param_shape must be a positive int or a non-empty tuple of positive ints, got "
                             f"{param_shape!r}")
        self._shape = tuple(int(d) for d in shape)
        super().__init__(self._shape[0], eps, affine, bias, parametrization, nll_weight, gauge, init_mean,
                         init_std, backend, device, dtype)

    def _parameter_shape(self, num_features: int) -> tuple[int, ...]:
        return self._shape

    def _input_rule(self) -> tuple[tuple[int, ...] | None, int | None]:
        return (len(self._shape) + 1,), None  # batchless_norm checks that param_shape broadcasts

    def _check_input_dim(self, x: torch.Tensor) -> None:
        check_layer_input(x, *self._input_rule())
        rest = tuple(x.shape[1:])
        if any(d != 1 and d != full for d, full in zip(self._shape, rest)):
            raise ValueError(f"BatchlessNorm has param_shape={self._shape}, which does not broadcast to the input's "
                             f"{rest} after the batch dim (input shape {tuple(x.shape)})")

    def extra_repr(self) -> str:
        return f"param_shape={self._shape}, " + super().extra_repr().split(", ", 1)[1]


def _check_nll_weight(layer: nn.Module) -> None:
    """A layer's nll_weight set after construction (see check_nll_weight)."""
    check_nll_weight(f"{type(layer).__name__}.nll_weight", layer.nll_weight)


def as_nll_weight(weight, dtype: torch.dtype):
    """A checked nll_weight as it multiplies an NLL term of `dtype`: a float as it is, a tensor 0-dim in
    that dtype (a (1,) weight made the loss (1,), which Opacus' per-sample grad refuses, and a float64
    one made a float32 model's loss float64)."""
    return weight.reshape(()).to(dtype) if isinstance(weight, torch.Tensor) else weight


def check_nll_weight(name: str, weight):
    """An NLL weight given after construction: a finite float >= 0 (returned as a float), or a one-element
    floating tensor, returned as it is (a weight annealed without recompiling a torch.compile'd step; its
    value is not read: no sync)."""
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1 or not weight.is_floating_point():
            raise TypeError(f"{name} must be a finite float >= 0 or a one-element floating tensor, got a tensor of "
                            f"shape {tuple(weight.shape)} and {weight.dtype}")
        return weight
    return nll_weight_option(name, weight)


def _opacus_hooked(layer: nn.Module) -> bool:
    """Whether Opacus' GradSampleModule hooks `layer` (its forward hook captures the activations), with
    its hooks enabled."""
    for hook in layer._forward_hooks.values():
        owner = getattr(hook, "__self__", None)
        if any(c.__name__ == "GradSampleModule" for c in type(owner).__mro__):
            return getattr(owner, "hooks_enabled", True)
    return False


def _check_opacus_layers(model: nn.Module, layers: list) -> None:
    """ValueError for a layer Opacus hooks whose latest output needed no gradient: Opacus then calls no grad
    sampler for it, and mean and std_param, trained by the NLL, would get no per-sample gradient."""
    for layer in layers:
        if layer.__dict__.get("_output_needs_grad") is False:
            name = next(n for n, m in model.named_modules() if m is layer) or type(layer).__name__
            raise ValueError(
                f"nll_loss: the output of {type(layer).__name__} {name!r} needs no gradient (its input needs none, "
                "and it has no trainable weight or bias), so Opacus computes no per-sample gradient for it, and "
                "mean and std_param would get none from the NLL: make its input require grad (a model's first "
                "layer: x.requires_grad_()) or give it a trainable affine")


def _check_opacus_route(model: nn.Module) -> None:
    """ValueError where Opacus takes a Batchless layer's per-sample gradients through functorch, from
    the output of the module it prepared (prepare_layer sets ft_compute_sample_grad): the layer itself
    (grad_sample_mode="functorch", or batchless_kernels.privacy not imported before make_private), or a
    module with parameters of its own around it (Opacus does not look inside such a module). mean and
    std_param would get no per-sample gradient from the NLL, and train unclipped."""
    for name, m in model.named_modules():
        if "ft_compute_sample_grad" in m.__dict__:
            inside = [n for n, c in m.named_modules() if isinstance(c, _BatchlessNorm)]
            if inside:
                where = f"{type(m).__name__} {name!r}" + (f", which holds {inside} and has parameters of its own"
                                                          if inside != [""] else "")
                raise ValueError(
                    f"nll_loss: Opacus computes the per-sample gradients of {where} with functorch from its "
                    "output only, so mean and std_param would get none from the NLL and train unclipped: import "
                    "batchless_kernels.privacy before make_private, use grad_sample_mode='hooks', and keep "
                    "Batchless layers out of modules that have parameters of their own")


def nll_loss(model: nn.Module) -> torch.Tensor:
    """Sum over the BatchlessNorm layers of `model` of nll_weight times the NLL of their latest
    forward; a zero tensor when there is none. ``loss = task_loss + nll_loss(model)``.

    Returns a 0-dim tensor (float32, or float64 where a layer's input is float64) on the layers'
    device. Raises TypeError when `model` is not an nn.Module; ValueError where the terms would not
    train mean and std_param as the loss says: a layer whose latest forward ran inside a torch.func
    transform that has ended (take nll_loss inside it), or whose per-sample gradients Opacus takes
    through functorch (grad_sample_mode="functorch", or batchless_kernels.privacy not imported)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = model._modules.get("_module", model)  # the model, if this is Opacus' GradSampleModule
    opacus = "autograd_grad_sample_hooks" in inner.__dict__  # Opacus computes per-sample gradients
    hooked = []  # the layers Opacus hooks: also seen when nll_loss is given a part of the model
    groups: dict[tuple, list[torch.Tensor]] = {}
    # torch.compile of a torch.func transform (compile(vmap(grad(loss)))): a term is a tensor of the
    # transform, which AOTAutograd cannot return when Dynamo replays the attribute after the graph
    # ("Cannot access storage of TensorWrapper"); it has no meaning outside it: taken, not kept.
    take = compiling_under_functorch()
    # A term from a forward inside a torch.func transform (an ensemble's vmap) means nothing outside
    # it: torch.func's own error ("escaped from inside a function being vmapped") would not say why.
    outside_transforms = not torch.compiler.is_compiling() and not _under_functorch()
    for module in model.modules():
        if isinstance(module, _BatchlessNorm) and module.nll is not None:
            if module._forward_hooks and _opacus_hooked(module):
                hooked.append(module)
            if outside_transforms:
                if _is_functorch_wrapped(module.nll):
                    raise ValueError(
                        f"nll_loss: the latest forward of a {type(module).__name__} ran inside a torch.func "
                        "transform (vmap, grad, ...), and its NLL term belongs to it: call nll_loss inside the "
                        "transformed function and return the term (docs/api.md, per-sample gradients)")
                object.__setattr__(module, "_summed_stamp", module.__dict__.get("_nll_stamp"))
            key = (module.nll_weight, module.nll.device, module.nll.dtype)
            if key not in groups:  # checked at construction; an attribute set since is checked here
                _check_nll_weight(module)
            groups.setdefault(key, []).append(module.nll)
            if take:
                object.__setattr__(module, "nll", None)
    if opacus or hooked:
        _check_opacus_route(inner)
        _check_opacus_layers(inner, hooked)
    total = None
    for (weight, _, _), terms in groups.items():
        weight = as_nll_weight(weight, terms[0].dtype)
        # One stack and one sum per weight, not a multiply and an add per layer: each op is an
        # autograd node, microseconds of host time forward and backward, as much as a small layer.
        term = weight * terms[0] if len(terms) == 1 else torch.stack(terms).sum()
        if len(terms) > 1 and (isinstance(weight, torch.Tensor) or weight != 1.0):  # no sync on a tensor
            term = weight * term
        total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        total = torch.zeros((), device=None if param is None else param.device)
    return total
