"""Bad input raises a clear exception that names the culprit; never a crash, never a silent result."""

from __future__ import annotations

import pytest
import torch

import batchless_kernels as bk
from conftest import ALL_BACKENDS, NOT_ON_CPU, backend_params

PARAM_NAMES = ("mean", "std_param", "weight", "bias")
HAS_OPS = bk.ops.extension_loaded()
needs_ops = pytest.mark.skipif(not HAS_OPS, reason=f"batchless_kernels._C not loaded: {bk.ops.EXTENSION_ERROR}")
CPU_BACKENDS = backend_params([b for b in ALL_BACKENDS if b.device == "cpu"])


def _args(C=3, x_shape=None, **overrides):
    args = {
        "x": torch.randn(x_shape or (2, C, 4)),
        "mean": torch.zeros(C),
        "std_param": torch.zeros(C),
        "weight": torch.ones(C),
        "bias": torch.zeros(C),
    }
    args.update(overrides)
    return args


def _call(args, **kwargs):
    return bk.batchless_norm(args["x"], args["mean"], args["std_param"], args["weight"], args["bias"], **kwargs)


def _name_re(name):
    return rf"(?<![\w]){name}(?![\w])"  # the argument's name as a whole word


# ------------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(3,), (), (5,)], ids=str)
def test_x_rank(case, shape):
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, \*\)"):
        _call(_args(x=torch.randn(shape)), backend=case.name)


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("name", PARAM_NAMES)
# (3, 1) would be valid: a shared-axes shape, one Gaussian per channel (tests/test_shared_axes.py)
@pytest.mark.parametrize("bad_shape", [(4,), (2,), (3, 2), (1, 3), ()], ids=str)
def test_channel_count_mismatch(case, name, bad_shape):
    args = _args(C=3, **{name: torch.zeros(bad_shape)})
    with pytest.raises(ValueError, match=_name_re(name) + r".*\(3,\)"):
        _call(args, backend=case.name)


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64,
                                   torch.complex128], ids=str)
def test_x_dtype(case, dtype):
    x = torch.ones(2, 3, 4, dtype=dtype)
    with pytest.raises(TypeError, match=r"x must have a floating dtype.*" + str(dtype).replace(".", r"\.")):
        _call(_args(x=x), backend=case.name)


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("name", PARAM_NAMES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64], ids=str)
def test_param_dtype(case, name, dtype):
    args = _args(**{name: torch.zeros(3, dtype=dtype)})
    with pytest.raises(TypeError, match=_name_re(name) + r" must have a floating dtype"):
        _call(args, backend=case.name)


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["mean", "std_param"])
def test_required_params_not_none(case, name):
    with pytest.raises(TypeError, match=_name_re(name)):
        _call(_args(**{name: None}), backend=case.name)


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["x"] + list(PARAM_NAMES))
def test_not_a_tensor(case, name):
    with pytest.raises(TypeError, match=_name_re(name)):
        _call(_args(**{name: [0.0, 0.0, 0.0]}), backend=case.name)


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("name", PARAM_NAMES)
def test_expanded_weights_refused(case, name):
    """torch's call_for_per_sample_grads (Opacus' grad_sample_mode="ew") wraps the parameters as Expanded
    Weights, which have no per-sample rule for the NLL term: they failed with torch's "cannot handle
    function dim"."""
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    layer = bk.BatchlessNorm1d(3, backend=case.name)
    for other in PARAM_NAMES:  # only `name` stays a parameter, so only it is wrapped
        if other != name:
            value = getattr(layer, other).detach()
            delattr(layer, other)
            layer.register_buffer(other, value)
    with pytest.raises(ValueError, match=_name_re(name) + r" is an Expanded Weight.*grad_sample_mode='hooks'"):
        call_for_per_sample_grads(layer)(torch.randn(4, 3))


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("name", PARAM_NAMES)
def test_device_mismatch(case, name):
    """x on cpu, one parameter on the meta device (a second device every machine has)."""
    args = _args(**{name: torch.zeros(3, device="meta")})
    with pytest.raises(ValueError, match=_name_re(name) + r" is on meta but x is on cpu"):
        _call(args, backend=case.name)


def test_device_mismatch_x_on_meta():
    args = _args(x=torch.randn(2, 3, 4, device="meta"))
    with pytest.raises(ValueError, match=r"mean is on cpu but x is on meta"):
        _call(args)


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("parametrization", ["sqrt", "LOG", "", "exp"])
def test_unknown_parametrization(case, parametrization):
    with pytest.raises(ValueError, match=r"parametrization must be one of \('abs', 'log', 'inv'\)"):
        _call(_args(), parametrization=parametrization, backend=case.name)


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("parametrization", [None, 3, b"log"], ids=repr)
def test_parametrization_wrong_type(case, parametrization):
    with pytest.raises(TypeError, match=r"parametrization must be a str, one of \('abs', 'log', 'inv'\)"):
        _call(_args(), parametrization=parametrization, backend=case.name)
    with pytest.raises(TypeError, match=r"parametrization must be a str"):
        bk.BatchlessNorm1d(3, parametrization=parametrization)


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("eps", [0, 0.0, -1, -1e-5, float("nan"), float("inf"), float("-inf")], ids=repr)
def test_non_positive_eps(case, eps):
    with pytest.raises(ValueError, match=r"eps must be a positive finite float"):
        _call(_args(), eps=eps, backend=case.name)


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize(("dtype", "eps"), [(torch.float32, 1e-40), (torch.bfloat16, 1e-50), (torch.float32, 1e-300),
                                            (torch.float64, 1e-310)], ids=repr)
def test_eps_below_normal(case, dtype, eps):
    """An eps below the smallest normal number of the dtype the call computes in: 1/sigma overflowed
    (abs: a constant channel gave +-inf, with NaN gradients). The functional and the layers refuse it."""
    with pytest.raises(ValueError, match=r"eps=.* is below the smallest normal torch.float(32|64) number"):
        _call(_args(x_shape=(2, 3, 4)) | {"x": torch.randn(2, 3, 4).to(dtype)}, eps=eps, backend=case.name,
              parametrization="abs")
    with pytest.raises(ValueError, match=r"is below the smallest normal"):
        bk.reference.batchless_norm(torch.randn(2, 3, 4).to(dtype), torch.zeros(3), torch.zeros(3), eps=eps)


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize(("dtype", "eps"), [(torch.float32, 1e39), (torch.bfloat16, 3.5e38), (torch.float64, 1e308 * 10)],
                         ids=repr)
def test_eps_above_the_largest_number(case, dtype, eps):
    """An eps that is inf in the dtype the call computes in (sigma inf, y = bias): refused as the raw ops
    refuse it; float64's largest finite eps is inf in Python too, refused as not finite."""
    pattern = (r"eps must be a positive finite float" if eps == float("inf") else
               r"eps=.* is above the largest torch.float32 number")
    with pytest.raises(ValueError, match=pattern):
        _call(_args(x_shape=(2, 3, 4)) | {"x": torch.randn(2, 3, 4).to(dtype)}, eps=eps, backend=case.name)
    with pytest.raises(ValueError, match=pattern):
        bk.BatchlessNorm1d(3, eps=eps, dtype=torch.float32)


@pytest.mark.parametrize("case", CPU_BACKENDS)
def test_eps_normal_in_float64_only(case):
    """The bound is the accumulation dtype's: 1e-300 is fine for float64 x, and gives finite y."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    y, nll = bk.batchless_norm(x, torch.zeros(3), torch.ones(3, requires_grad=True), eps=1e-300,
                               parametrization="abs", backend=case.name)
    assert torch.isfinite(y).all() and torch.isfinite(nll)


def test_numpy_options():
    """numpy scalars are accepted as the layers accept them (np.float32 eps was a TypeError, np.True_ gauge
    "must be a bool, got bool"), with the results of the Python values."""
    np = pytest.importorskip("numpy")
    args = _args()
    args["std_param"] = args["std_param"].requires_grad_()
    expected = _call(args, eps=float(np.float32(1e-5)))
    for kwargs in (dict(eps=np.float32(1e-5)), dict(eps=np.float32(1e-5), gauge=np.True_, need_nll=np.True_)):
        got = _call(args, **kwargs)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(TypeError, match=r"gauge must be a bool, got numpy.int64"):
        _call(args, gauge=np.int64(1))


def test_numpy_options_under_torch_compile():
    """Dynamo hands numpy scalars over as 0-dim arrays: eps=np.float64(1e-5) failed the number check, whose
    message (repr of a traced value) broke a fullgraph compile. (Numpy float32 and bools stay data there,
    which no check can read: docs/api.md asks for Python values under compile.)"""
    np = pytest.importorskip("numpy")
    args = _args()
    args["std_param"] = args["std_param"].requires_grad_()
    expected = _call(args, eps=1e-5)
    for kwargs in (dict(eps=np.float64(1e-5)), dict(eps=np.float64(1e-5), gauge=True)):
        torch._dynamo.reset()
        got = torch.compile(lambda a: _call(a, **kwargs), backend="eager", fullgraph=True)(args)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # an int option is not a float truncated (int() of Dynamo's array would have taken 3.7 as 3)
    torch._dynamo.reset()
    int_option = torch.compile(lambda: bk._checks.int_option("n", np.float64(3.7), "an int", lambda v: v > 0),
                               backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="n must be an int"):
        int_option()


def test_numpy_bool_options_of_layers_and_tools():
    """Every bool option takes numpy's bools as the functional does (a layer refused gauge=np.True_ that
    batchless_norm accepted) and stores a Python bool (extra_repr, torch.jit.script)."""
    np = pytest.importorskip("numpy")
    layer = bk.BatchlessNorm2d(3, affine=np.True_, bias=np.False_, gauge=np.False_)
    assert (type(layer.affine), type(layer.gauge)) == (bool, bool) and layer.bias is None
    assert repr(layer) == repr(bk.BatchlessNorm2d(3, affine=True, bias=False, gauge=False))
    renorm = bk.BatchRenorm2d(3, affine=np.False_)
    assert type(renorm.affine) is bool and renorm.weight is None
    affine = bk.ChannelAffine(torch.ones(3), torch.zeros(3), per_channel=np.True_)
    assert type(affine.per_channel) is bool and affine.per_channel
    model = torch.nn.Sequential(bk.BatchlessNorm1d(3))
    bk.init_from_data(model, [torch.randn(8, 3)], preserve_function=np.True_, train_mode=np.False_)
    with pytest.raises(TypeError, match=r"gauge must be a bool, got numpy.int64"):
        bk.BatchlessNorm1d(3, gauge=np.int64(1))
    with pytest.raises(TypeError, match=r"affine must be a bool, got str 'abs'"):  # a parametrization positionally
        bk.BatchlessNorm1d(3, 1e-5, "abs")


def test_numpy_float32_infinity_refused_without_warnings():
    """Compared with float_info.max, which numpy casts to float32 inf, np.float32('inf') passed every
    'finite' check (a BatchRenorm then trained to NaN), and every np.float32 value warned twice."""
    import warnings

    np = pytest.importorskip("numpy")
    inf = np.float32("inf")
    for make in (lambda: bk.BatchlessNorm2d(2, eps=inf), lambda: bk.BatchlessNorm2d(2, nll_weight=inf),
                 lambda: bk.BatchlessNorm2d(2, init_std=inf), lambda: bk.BatchRenorm2d(2, rmax=inf),
                 lambda: bk.BatchRenorm2d(2, eps=inf), lambda: _call(_args(), eps=inf)):
        with pytest.raises(ValueError, match=r"must be a .*finite float"):
            make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bk.BatchlessNorm2d(2, eps=np.float32(1e-5), nll_weight=np.float32(0.5))
        _call(_args(), eps=np.float32(1e-5))
    with pytest.raises(ValueError, match=r"the dtype batchless normalization of a torch.float32 input computes in"):
        _call(_args(), eps=1e-39)
    from fractions import Fraction

    with pytest.raises(ValueError, match=r"eps must be a positive finite float"):  # float() overflowed
        bk.BatchlessNorm1d(3, eps=Fraction(10 ** 400))


@pytest.mark.parametrize("eps", [True, "1e-5", None, torch.tensor(1e-5)], ids=repr)
def test_eps_wrong_type(eps):
    with pytest.raises(TypeError, match=r"eps must be a positive finite float"):
        _call(_args(), eps=eps)


@pytest.mark.parametrize("gauge", [1, None, "yes"], ids=repr)
def test_gauge_wrong_type(gauge):
    with pytest.raises(TypeError, match=r"gauge must be a bool"):
        _call(_args(), gauge=gauge)


@pytest.mark.parametrize("backend", ["gpu", "CPU", "", "triton-cuda"])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"backend must be one of .*'auto'.*'reference'.*" + repr(backend)):
        _call(_args(), backend=backend)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        bk.BatchlessNorm1d(3, backend=backend)


def test_backend_wrong_type():
    with pytest.raises(TypeError, match=r"backend must be a str"):
        _call(_args(), backend=None)


@pytest.mark.parametrize(("device", "error", "match"), [
    ("cpux", ValueError, r"device must name a device, got 'cpux'"),
    ("cuda:abc", ValueError, r"device must name a device, got 'cuda:abc'"),
    (3.5, TypeError, r"device must be a str, torch.device or int, got float"),
    (True, TypeError, r"device must be a str, torch.device or int, got bool"),
], ids=repr)
def test_available_backends_bad_device(device, error, match):
    """A device torch cannot read: the library's exception naming the argument, not torch's."""
    with pytest.raises(error, match=match):
        bk.available_backends(device)
    with pytest.raises(error, match=match):
        bk.backends.resolve_backend("auto", device)


def test_available_backends_device_forms():
    assert bk.available_backends(torch.device("cpu")) == bk.available_backends("cpu")
    assert bk.available_backends("meta") == ["reference"]


@pytest.mark.parametrize("backend", NOT_ON_CPU)
def test_backend_not_available(backend):
    """Asking for a backend that cannot run CPU tensors: a RuntimeError that names it and says why."""
    assert backend not in bk.available_backends("cpu")
    with pytest.raises(RuntimeError, match=rf"'{backend}'.*cannot run here: \S+"):
        _call(_args(), backend=backend)
    layer = bk.BatchlessNorm1d(3, backend=backend)  # the module fails at forward, with the same message
    with pytest.raises(RuntimeError, match=rf"'{backend}'.*cannot run here"):
        layer(torch.randn(2, 3))


def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(RuntimeError, match=r"cuda.*cannot run here: .*CUDA"):
        _call(_args(), backend="cuda")


# ------------------------------------------------------------------------------------------------
# BATCHLESS_BACKEND
# ------------------------------------------------------------------------------------------------


def _count_reference_calls(monkeypatch):
    calls = []
    original = bk.reference.batchless_norm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(bk.reference, "batchless_norm", spy)
    return calls


def test_env_var_forces_reference(monkeypatch):
    calls = _count_reference_calls(monkeypatch)
    monkeypatch.setenv("BATCHLESS_BACKEND", "reference")
    args = _args(std_param=torch.zeros(3, requires_grad=True))
    y, nll = _call(args)  # backend="auto": overridden
    assert len(calls) == 1 and nll is not None
    bk.BatchlessNorm1d(3)(torch.randn(4, 3))  # modules too
    assert len(calls) == 2
    kernels = [n for n in bk.available_backends("cpu") if n != "reference"]
    for name in kernels:  # an explicit backend is not overridden
        y_k, _ = _call(args, backend=name)
        assert len(calls) == 2
        torch.testing.assert_close(y_k, y)
    monkeypatch.setenv("BATCHLESS_BACKEND", "auto")
    _call(args)
    assert len(calls) == (2 if kernels else 3)  # "auto" means no override


def test_env_var_read_from_os_environ_by_every_path(monkeypatch):
    """The C++ fast path read BATCHLESS_BACKEND with getenv, the Python path from os.environ: after
    os.unsetenv (which leaves os.environ alone) the fast path ran the kernels while os.environ still
    asked for the reference. Both now read os.environ; os.putenv alone changes neither."""
    import os

    calls = _count_reference_calls(monkeypatch)
    args = _args(std_param=torch.zeros(3, requires_grad=True))
    monkeypatch.setenv("BATCHLESS_BACKEND", "reference")
    try:
        os.unsetenv("BATCHLESS_BACKEND")
        _call(args)
        _call(_args())  # no gradient wanted
        assert len(calls) == 2
        monkeypatch.delenv("BATCHLESS_BACKEND")
        os.putenv("BATCHLESS_BACKEND", "reference")
        _call(args)
        assert len(calls) == 2 + ("cpu" not in bk.available_backends("cpu"))
    finally:
        os.unsetenv("BATCHLESS_BACKEND")


@pytest.mark.skipif("cpu" not in bk.available_backends("cpu"), reason="needs the compiled cpu backend")
def test_env_var_selects_cpu(monkeypatch):
    calls = _count_reference_calls(monkeypatch)
    monkeypatch.setenv("BATCHLESS_BACKEND", "cpu")
    _call(_args())
    assert calls == []
    monkeypatch.delenv("BATCHLESS_BACKEND")
    _call(_args(), backend="reference")
    assert len(calls) == 1


@pytest.mark.parametrize("value", ["gpu", "Reference", " ", " cpu"], ids=repr)
def test_env_var_invalid(monkeypatch, value):
    monkeypatch.setenv("BATCHLESS_BACKEND", value)
    with pytest.raises(ValueError, match=r"BATCHLESS_BACKEND must be one of"):
        _call(_args())


def test_env_var_empty_means_unset(monkeypatch):
    """`BATCHLESS_BACKEND= python train.py` raised ValueError on every call; an empty value is unset, as
    CPython treats its own PYTHON* variables: auto, on both paths (the C++ fast one reads it alike)."""
    calls = _count_reference_calls(monkeypatch)
    monkeypatch.setenv("BATCHLESS_BACKEND", "")
    for args in (_args(std_param=torch.zeros(3, requires_grad=True)), _args()):
        y, _ = _call(args)
        monkeypatch.delenv("BATCHLESS_BACKEND")
        assert torch.equal(y, _call(args)[0])
        monkeypatch.setenv("BATCHLESS_BACKEND", "")
    assert len(calls) == 2 * ("cpu" not in bk.available_backends("cpu"))
    fast = bk.functional._fast
    if fast is not None and "cpu" in bk.available_backends("cpu"):  # the C++ fast path serves the call itself
        args = _args()
        assert fast(args["x"], args["mean"], args["std_param"], None, None, "log", 1e-5, True, "auto", None) is not None
        monkeypatch.setenv("BATCHLESS_BACKEND", "reference")
        assert fast(args["x"], args["mean"], args["std_param"], None, None, "log", 1e-5, True, "auto", None) is None


@pytest.mark.parametrize("backend", NOT_ON_CPU)
def test_env_var_unavailable(monkeypatch, backend):
    monkeypatch.setenv("BATCHLESS_BACKEND", backend)
    with pytest.raises(RuntimeError, match=rf"BATCHLESS_BACKEND asks for '{backend}', which cannot run here"):
        _call(_args())


# ------------------------------------------------------------------------------------------------
# Module constructors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [bk.BatchlessNorm1d, bk.BatchlessNorm2d, bk.BatchlessNorm3d], ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(num_features=0), ValueError, r"num_features must be a positive int"),
    (dict(num_features=-3), ValueError, r"num_features must be a positive int"),
    # a wrong type is a TypeError, a wrong value a ValueError (nll_weight=True was a ValueError, eps=True a TypeError)
    (dict(num_features=2.0), TypeError, r"num_features must be a positive int, got 2.0"),
    (dict(num_features=True), TypeError, r"num_features"),
    (dict(num_features=3, init_std=0.0), ValueError, r"init_std must be a positive"),
    (dict(num_features=3, init_std=-1.0), ValueError, r"init_std must be a positive"),
    (dict(num_features=3, init_std=float("nan")), ValueError, r"init_std"),
    (dict(num_features=3, init_std=float("inf")), ValueError, r"init_std"),
    (dict(num_features=3, init_std=1e-6, parametrization="abs"), ValueError, r"eps"),
    (dict(num_features=3, init_mean=float("nan")), ValueError, r"init_mean"),
    (dict(num_features=3, parametrization="bln"), ValueError, r"parametrization must be one of"),
    (dict(num_features=3, eps=0.0), ValueError, r"eps must be a positive"),
    (dict(num_features=3, eps=-1e-5), ValueError, r"eps must be a positive"),
    (dict(num_features=3, nll_weight=-1.0), ValueError, r"nll_weight"),
    (dict(num_features=3, nll_weight=float("nan")), ValueError, r"nll_weight"),
    (dict(num_features=3, nll_weight=True), TypeError, r"nll_weight"),
    (dict(num_features=3, nll_weight="1"), TypeError, r"nll_weight must be a finite float >= 0, got '1'"),
    (dict(num_features=3, nll_weight=10 ** 400), ValueError, r"nll_weight .* got an int of 1329 bits"),
    (dict(num_features=3, init_mean=1e39), ValueError, r"init_mean=1e\+39 is outside the range of torch.float32"),
    (dict(num_features=3, init_mean=7e4, dtype=torch.float16), ValueError, r"outside the range of torch.float16"),
    (dict(num_features=3, eps=1e-50), ValueError, r"eps=1e-50 is below the smallest normal torch.float32 number"),
    (dict(num_features=3, eps=1e-40), ValueError, r"eps=1e-40 is below the smallest normal torch.float32 number"),
    (dict(num_features=3, parametrization="inv", init_std=1e-5, dtype=torch.float16), ValueError,
     r"init_std=1e-05 gives std_param=1e\+05 .* outside the normal range of torch.float16"),
    (dict(num_features=3, parametrization="abs", eps=2.0), ValueError, r"init_std=1.0 cannot be the initial std"),
    # r = 1/sigma overflows (inf outputs) or flushes to zero (zero outputs) in the parameters' dtype
    (dict(num_features=3, init_std=1e-40), ValueError, r"init_std=1e-40 gives 1/sigma=1e\+40 .* torch.float32"),
    (dict(num_features=3, parametrization="inv", init_std=1e46), ValueError, r"std_param=1e-46 .* torch.float32"),
    (dict(num_features=3, init_std=1e-40, dtype=torch.float16), ValueError, r"1/sigma=1e\+40 .* torch.float32"),
    (dict(num_features=3, parametrization="inv", init_std=1e6, dtype=torch.float16), ValueError,
     r"std_param=1e-06 .* torch.float16"),  # r = std_param flushes to 0 in float16
    (dict(num_features=3, init_std=True), TypeError, r"init_std must be a positive finite float, got True"),
    (dict(num_features=3, init_mean=True), TypeError, r"init_mean must be a finite float, got True"),
    (dict(num_features=3, dtype=torch.int64), TypeError, r"dtype must be a floating point torch.dtype"),
    (dict(num_features=3, dtype=torch.complex64), TypeError, r"dtype must be a floating point torch.dtype"),
    (dict(num_features=3, eps=10 ** 400), ValueError, r"eps must be a positive finite float, got an int of"),
    (dict(num_features=3, gauge="False"), TypeError, r"gauge must be a bool"),
    (dict(num_features=3, gauge=0), TypeError, r"gauge must be a bool"),
    (dict(num_features=3, backend="gpu"), ValueError, r"backend must be one of"),
    # the device named (torch's own error, "Expected one of cpu, cuda, ...", names no argument)
    (dict(num_features=3, device="gpu"), ValueError, r"device must name a device, got 'gpu'"),
    (dict(num_features=3, device=1.5), TypeError, r"device must be a str, torch.device or int, got float"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_module_constructor_errors(cls, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [bk.BatchlessNorm2d, bk.BatchRenorm2d], ids=lambda c: c.__name__)
def test_module_device_forms(cls):
    """The device argument as nn.BatchNorm takes it: None, a str, a torch.device (meta too); a bad
    one raises the library's error naming `device`."""
    for device in (None, "cpu", torch.device("cpu"), "meta"):
        layer = cls(3, device=device)
        assert all(t.device == torch.device(device or "cpu") for t in layer.state_dict().values())
    with pytest.raises(ValueError, match=r"device must name a device, got 'cpux'"):
        cls(3, device="cpux")


def test_module_input_errors():
    layer = bk.BatchlessNorm2d(3)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(layer(input=x), layer(x))  # nn.BatchNorm's argument name
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor"):
        layer([[1.0]])
    # A channel mismatch names the layer's num_features, as nn.BatchNorm does, not its parameters.
    with pytest.raises(ValueError, match=r"BatchlessNorm2d has num_features=3: .* got 5 channels"):
        layer(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"BatchlessNorm1d has num_features=32: .* got 16 channels"):
        bk.BatchlessNorm1d(32)(torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"BatchRenorm2d has num_features=3: .* got 5 channels"):
        bk.BatchRenorm2d(3)(torch.randn(2, 5, 4, 4))
    with pytest.raises(TypeError, match=r"^input must have a floating dtype"):  # the forward's name, not "x"
        layer(torch.ones(2, 3, 4, 4, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------
# The C++ ops: RuntimeError, not a crash
# ------------------------------------------------------------------------------------------------


def _fwd(family="batchless_norm"):
    if family == "triton":  # its kernels register on the backend's first use, which a test run alone lacks
        bk.triton.register_kernels()
    return getattr(torch.ops.batchless_kernels, "triton_forward" if family == "triton" else "batchless_norm_forward")


def _bwd(family="batchless_norm"):
    if family == "triton":
        bk.triton.register_kernels()
    return getattr(torch.ops.batchless_kernels, "triton_backward" if family == "triton" else "batchless_norm_backward")


# The ops' families on this machine: the C++ kernels' (CPU), their fake kernels (meta tensors, what
# torch.compile traces with), and the Triton backend's (Python launchers; on the CPU under the interpreter),
# which checked nothing: a short std_param was read past its end.
OP_FAMILIES = [("batchless_norm", "cpu"), ("batchless_norm", "meta")] + (
    [("triton", "cpu")] if "triton" in bk.available_backends("cpu") else [])


@needs_ops
@pytest.mark.parametrize("which, value, pattern", [
    ("x", torch.randn(3), r"x must have shape \(N, C, \*\)"),
    ("x", torch.ones(2, 3, dtype=torch.int32), r"x must be float16, bfloat16, float32 or float64"),
    ("x", torch.ones(2, 3, dtype=torch.complex64), r"x must be float16, bfloat16, float32 or float64"),
    ("mean", torch.zeros(4), r"mean must have shape \(3,\)"),
    ("mean", torch.zeros(3, 1), r"mean must have shape \(3,\)"),
    ("rstd", torch.ones(2), r"rstd must have shape \(3,\)"),
    ("rstd", torch.ones(3, dtype=torch.int64), r"rstd must have a floating dtype"),
    ("weight", torch.ones(5), r"weight must have shape \(3,\)"),
    ("bias", torch.zeros(1), r"bias must have shape \(3,\)"),
    ("bias", torch.zeros(3, dtype=torch.int64), r"bias must have a floating dtype"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 10 else None)
@pytest.mark.parametrize("family, device", OP_FAMILIES, ids=str)
def test_forward_op_errors(which, value, pattern, family, device):
    args = {"x": torch.randn(2, 3), "mean": torch.zeros(3), "rstd": torch.ones(3), "weight": torch.ones(3),
            "bias": torch.zeros(3)}
    args[which] = value
    args = {k: v.to(device) for k, v in args.items()}
    with pytest.raises(RuntimeError, match=pattern):
        _fwd(family)(args["x"], args["mean"], args["rstd"], args["weight"], args["bias"], True)


@needs_ops
@pytest.mark.parametrize("which, value, mask, pattern", [
    ("grad_y", torch.randn(3), [True, True, True], r"grad_y must have shape \(N, C, \*\)"),
    ("grad_y", torch.ones(2, 3, dtype=torch.int64), [True, False, False], r"grad_y must be float16"),
    ("x", torch.randn(2, 3, 5), [True, True, True], r"grad_y has shape .* but x has shape"),
    ("x", torch.randn(2, 3, 4, dtype=torch.float64), [True, True, True], r"grad_y has dtype .* but x has dtype"),
    ("x", None, [False, True, False], r"dweight needs x"),
    ("mean", torch.zeros(2), [True, True, True], r"mean must have shape \(3,\)"),
    ("rstd", torch.ones(4), [True, False, False], r"rstd must have shape \(3,\)"),
    ("weight", torch.ones(2), [True, False, False], r"weight must have shape \(3,\)"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 10 else None)
@pytest.mark.parametrize("family, device", OP_FAMILIES, ids=str)
def test_backward_op_errors(which, value, mask, pattern, family, device):
    args = {"grad_y": torch.randn(2, 3, 4), "x": torch.randn(2, 3, 4), "mean": torch.zeros(3),
            "rstd": torch.ones(3), "weight": torch.ones(3)}
    args[which] = value
    args = {k: v if v is None else v.to(device) for k, v in args.items()}
    with pytest.raises(RuntimeError, match=pattern):
        _bwd(family)(args["grad_y"], args["x"], args["mean"], args["rstd"], args["weight"], mask)


@needs_ops
@pytest.mark.parametrize("family", ["batchless_norm", "triton"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_training_op_errors(family, device):
    """The one-pass training ops check what the forward and backward ops check, eps and grad_nll too
    (a (2,) grad_nll raised 'a Tensor with 2 elements cannot be converted to Scalar')."""
    if family == "triton" and ("triton" not in bk.available_backends("cpu") or device == "meta"):
        pytest.skip("the triton ops run on the CPU under the interpreter only; their fakes are the C++ ops'")
    ops = torch.ops.batchless_kernels
    forward = getattr(ops, f"{family}_train_forward" if family == "triton" else "batchless_norm_train_forward")
    backward = getattr(ops, f"{family}_train_backward" if family == "triton" else "batchless_norm_train_backward")
    x, p = torch.randn(2, 3, 4, device=device), torch.zeros(3, device=device)
    with pytest.raises(RuntimeError, match=r"std_param must have shape \(3,\)"):
        forward(x, p, p[:1], None, None, "log", 1e-5, True)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="eps must be a positive finite float"):
            forward(x, p, p, None, None, "log", float("inf"), True)
    s = torch.ones(3, device=device)
    for grad_nll in (torch.ones(2, device=device), torch.ones((), dtype=torch.complex64, device=device)):
        # a complex grad_nll: Triton dropped its imaginary part, the CPU op named no argument
        with pytest.raises(RuntimeError, match="grad_nll must be a one-element floating tensor"):
            backward(x, grad_nll, x, p, p, s, None, s, s, 8, "log", 1e-5, [True] * 5)
    with pytest.raises(RuntimeError, match=r"rstd must have shape \(3,\)"):
        backward(x, torch.ones((), device=device), x, p, p, s[:2], None, s, s, 8, "log", 1e-5, [True] * 5)
    if device == "cpu":  # the sums and count, as the NLL op checks them (Triton computed garbage: -1 flipped signs)
        for count, sums, pattern in ((0, s, "count > 0"), (-1, s, "count > 0"),
                                     (8, s.half(), "s1 and s2 must both be float32 or float64")):
            with pytest.raises(RuntimeError, match=pattern):
                backward(x, torch.ones(()), x, p, p, s, None, sums, sums, count, "log", 1e-5, [True] * 5)


@needs_ops
def test_nll_op_errors():
    s, ops = torch.ones(3), torch.ops.batchless_kernels
    with pytest.raises(RuntimeError, match="mean and std_param must have floating dtypes"):
        ops.batchless_nll(s, s, s, torch.ones(3, dtype=torch.int64), 4, "log", 1e-5, True)
    with pytest.raises(RuntimeError, match="eps must be a positive finite float"):
        ops.batchless_nll(s, s, s, s, 4, "log", float("inf"), True)
    with pytest.raises(RuntimeError, match="grad_nll must be a one-element floating tensor"):
        ops.batchless_nll_backward(torch.ones(2), s, s, s, s, 4, "log", 1e-5)


@needs_ops
@pytest.mark.parametrize("family, device", OP_FAMILIES, ids=str)
@pytest.mark.parametrize("dtype, eps", [(torch.float32, 1e-39), (torch.bfloat16, 1e-45), (torch.float64, 1e-310),
                                        (torch.float32, 1e39), (torch.bfloat16, 3.5e38)], ids=str)
def test_raw_ops_refuse_eps_outside_the_normal_numbers(family, device, dtype, eps):
    """The raw ops took any positive eps: 1e-50 with 'abs' made y +-inf for a constant channel, and 1e39 is
    inf in float32 (its cast in C++ undefined), as the Python entry points refuse (_checks.check_eps_normal).
    The smallest and largest normal numbers themselves are fine."""
    if family == "triton":
        bk.triton.register_kernels()
    ops = torch.ops.batchless_kernels
    prefix = "triton" if family == "triton" else "batchless_norm"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, p = torch.ones(2, 3, 4, dtype=dtype, device=device), torch.zeros(3, dtype=dtype, device=device)
    s, g = torch.ones(3, dtype=acc, device=device), torch.ones((), dtype=acc, device=device)
    calls = {
        "train_forward": lambda e: getattr(ops, f"{prefix}_train_forward")(x, p, p, None, None, "abs", e, True),
        "inference": lambda e: getattr(ops, f"{prefix}_inference")(x, p, p, None, None, "abs", e),
        "train_backward": lambda e: getattr(ops, f"{prefix}_train_backward")(x, g, x, p, p, s, None, s, s, 8, "abs",
                                                                              e, [True] * 5),
    }
    if family != "triton":
        calls["nll"] = lambda e: ops.batchless_nll(s, s, p, p, 8, "abs", e, True)
        calls["nll_backward"] = lambda e: ops.batchless_nll_backward(g, s, s, p, p, 8, "abs", e)
    for name, call in calls.items():
        if device == "meta" and name in ("train_backward", "nll", "nll_backward"):
            continue  # their fakes check devices and shapes only; the kernels check the rest
        with pytest.raises(RuntimeError, match=rf"eps must be a positive finite float, a normal "
                                               rf"{str(acc)[6:]} number"):
            call(eps)
        call(torch.finfo(acc).max)
        out = call(torch.finfo(acc).tiny)
        if device == "cpu" and name == "train_forward":  # a constant channel's y at sigma = eps: finite
            assert torch.isfinite(out[0]).all(), name


@pytest.mark.parametrize("case", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["sparse", "nested"])
def test_x_not_dense(case, layout):
    x = torch.randn(2, 3, 4)
    x = x.to_sparse() if layout == "sparse" else torch.nested.nested_tensor([x[0], x[1]])
    with pytest.raises(TypeError, match="x must be a dense \\(strided\\) tensor"):
        bk.batchless_norm(x, torch.zeros(3), torch.zeros(3), backend=case.name)
    with pytest.raises(TypeError, match="mean must be a dense \\(strided\\) tensor"):
        bk.batchless_norm(torch.randn(2, 3, 4), torch.zeros(3).to_sparse(), torch.zeros(3), backend=case.name)


@needs_ops
@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("name", ["mean", "rstd", "weight"])
def test_ops_device_mismatch(op, name):
    """x/grad_y on cpu, one per-channel tensor on meta: the raw op must refuse, not compute."""
    args = {"mean": torch.zeros(3), "rstd": torch.ones(3), "weight": torch.ones(3)}
    args[name] = args[name].to("meta")
    x = torch.randn(200, 3)
    with pytest.raises(RuntimeError, match=name):
        if op == "forward":
            _fwd()(x, args["mean"], args["rstd"], args["weight"], None, True)
        else:
            _bwd()(x, x, args["mean"], args["rstd"], args["weight"], [True, True, True])


@pytest.mark.parametrize("backend", [b for b in bk.available_backends("cpu") if b != "reference"])
def test_inference_tensor_in_a_training_forward(backend):
    """docs/api.md: a compiled backend keeps x for dweight, which PyTorch refuses for an inference
    tensor (its own clear error, as nn.BatchNorm2d's); the reference keeps xhat and runs, and a clone
    made outside inference mode runs everywhere with the reference's values."""
    with torch.inference_mode():
        x = torch.randn(2, 3, 4)
    layer = bk.BatchlessNorm1d(3, backend=backend)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        layer(x)
    want = bk.BatchlessNorm1d(3, backend="reference")(x)
    torch.testing.assert_close(layer(x.clone()), want)
