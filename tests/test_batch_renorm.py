"""BatchRenorm1d/2d/3d: the formulas of Ioffe (2017) against a float64 hand computation, gradients and
their stop-gradients, the rmax/dmax schedule, moving statistics, eval mode, BN equivalence."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import batchless_kernels as bk
from conftest import make_x

CLASSES = {2: bk.BatchRenorm1d, 3: bk.BatchRenorm1d, 4: bk.BatchRenorm2d, 5: bk.BatchRenorm3d}
SHAPES = [(6, 3), (5, 4, 7), (3, 5, 4, 3), (2, 3, 3, 4, 5)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _view(t, x):
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def brn_float64(x, running_mean, running_std, weight, bias, *, eps, momentum, rmax, dmax):
    """Ioffe's algorithm 1, written out in float64: returns (y, new running_mean, new running_std)."""
    x = x.to(torch.float64)
    rm, rs = running_mean.to(torch.float64), running_std.to(torch.float64)
    n = x.numel() // x.shape[1]
    mu_b = x.sum(_dims(x)) / n
    sigma_b = (((x - _view(mu_b, x)) ** 2).sum(_dims(x)) / n + eps) ** 0.5
    r = torch.minimum(torch.maximum(sigma_b / rs, torch.full_like(rs, 1 / rmax)), torch.full_like(rs, rmax))
    d = torch.minimum(torch.maximum((mu_b - rm) / rs, torch.full_like(rs, -dmax)), torch.full_like(rs, dmax))
    xhat = (x - _view(mu_b, x)) / _view(sigma_b, x) * _view(r, x) + _view(d, x)
    y = xhat if weight is None else xhat * _view(weight.double(), x) + _view(bias.double(), x)
    return y, rm + momentum * (mu_b - rm), rs + momentum * (sigma_b - rs)


def _randomize(m, *, spread=1.0):
    """Moving statistics away from the data's, so that r and d are clipped on some channels."""
    c = m.num_features
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(c) * 2 * spread)
        m.running_std.copy_(torch.exp(torch.randn(c) * 1.5 * spread))
        if m.affine:
            m.weight.copy_(torch.randn(c) * 0.5 + 1)
            m.bias.copy_(torch.randn(c) * 0.5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)],
                         ids=["float32", "float64", "bfloat16"])
def test_training_matches_float64_formula(shape, affine, dtype, tol):
    m = CLASSES[len(shape)](shape[1], momentum=0.3, affine=affine, rmax=1.5, dmax=0.5, dtype=dtype)
    _randomize(m)
    clipped = False
    for step in range(3):
        x = make_x(shape, dtype=dtype)
        rm, rs = m.running_mean.clone(), m.running_std.clone()
        y_ref, rm_ref, rs_ref = brn_float64(x, rm, rs, m.weight, m.bias, eps=m.eps, momentum=0.3, rmax=1.5, dmax=0.5)
        y = m(x)
        assert y.dtype == dtype and y.shape == x.shape
        torch.testing.assert_close(y.double(), y_ref, atol=tol * 4, rtol=tol)
        torch.testing.assert_close(m.running_mean.double(), rm_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(m.running_std.double(), rs_ref, atol=tol, rtol=tol)
        assert int(m.num_batches_tracked) == step + 1
        # the moving statistics differ enough from the data's that some r or d hits its limit
        mu_b = x.double().mean(_dims(x))
        clipped |= bool(((mu_b - rm.double()).abs() / rs.double() > 0.5).any())
    assert clipped


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_layout_kept_and_same_values(memory_format):
    m = bk.BatchRenorm2d(5, rmax=2.0, dmax=1.0)
    _randomize(m)
    m2 = bk.BatchRenorm2d(5, rmax=2.0, dmax=1.0)
    m2.load_state_dict(m.state_dict())
    x = make_x((3, 5, 4, 7))
    y = m(x.contiguous(memory_format=memory_format))
    assert y.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(y, m2(x), atol=1e-6, rtol=1e-6)


def test_eval_uses_moving_statistics_and_updates_nothing():
    m = bk.BatchRenorm2d(4)
    _randomize(m)
    m.eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = make_x((2, 4, 3, 3))
    y = m(x)
    expected = (x - _view(m.running_mean, x)) / _view(m.running_std, x) * _view(m.weight, x) + _view(m.bias, x)
    torch.testing.assert_close(y, expected)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)
    # a sample's output does not depend on the rest of the batch in eval (it does in training)
    torch.testing.assert_close(m(x[:1]), y[:1])
    m.train()
    assert not torch.allclose(m(x)[:1], m(x[:1]))


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 5), (2, 3, 4, 3)], ids=["2d", "3d", "4d"])
def test_no_clipping_equals_batch_norm_training(shape):
    """rmax=1, dmax=0 is plain BN in training: F.batch_norm (biased batch variance), gradients too."""
    m = CLASSES[len(shape)](shape[1], rmax=1.0, dmax=0.0, dtype=torch.float64)
    _randomize(m)
    x = make_x(shape, dtype=torch.float64).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w, b = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    y = m(x)
    y_bn = F.batch_norm(x2, None, None, w, b, training=True, eps=m.eps)
    torch.testing.assert_close(y, y_bn, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_bn.backward(g)
    for a, e in ((x.grad, x2.grad), (m.weight.grad, w.grad), (m.bias.grad, b.grad)):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)


def test_warmup_is_batch_norm_and_schedule_is_linear():
    m = bk.BatchRenorm2d(3, rmax=3.0, dmax=5.0, warmup_steps=2, relax_steps=4, momentum=0.0)
    _randomize(m, spread=2.0)  # far from the data: every r and d would clip
    expected = [(1, 0), (1, 0), (1, 0), (1.5, 1.25), (2, 2.5), (2.5, 3.75), (3, 5), (3, 5), (3, 5)]
    x = make_x((4, 3, 2, 2))
    for step, (rmax_t, dmax_t) in enumerate(expected):
        assert m.current_limits() == pytest.approx((rmax_t, dmax_t)), step
        y = m(x)
        y_bn = F.batch_norm(x, None, None, m.weight, m.bias, training=True, eps=m.eps)
        assert torch.allclose(y, y_bn, atol=1e-5) == (step <= 2), step
        y_ref, _, _ = brn_float64(x, m.running_mean, m.running_std, m.weight, m.bias, eps=m.eps,
                                  momentum=0.0, rmax=rmax_t, dmax=dmax_t)
        torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    # eval forwards are not training steps
    m.eval()
    m(x)
    assert int(m.num_batches_tracked) == len(expected)
    assert bk.BatchRenorm1d(2, rmax=2.0, dmax=1.0).current_limits() == (2.0, 1.0)  # no schedule: full from the start
    m.reset_running_stats()
    assert m.current_limits() == (1.0, 0.0)


@pytest.mark.parametrize("relax_steps", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_schedule_is_exact_beyond_float32_steps(relax_steps, dtype):
    """The schedule ran in the input's accumulation dtype: float32 rounds steps past 2^24, so with
    warmup_steps = 2^24 + 1 the step 2^24 already took the full limits, where current_limits() (float64)
    said plain BN."""
    m = bk.BatchRenorm1d(1, warmup_steps=2**24 + 1, relax_steps=relax_steps, rmax=3.0, dmax=5.0, dtype=dtype)
    m.num_batches_tracked.fill_(2**24)
    assert m.current_limits() == (1.0, 0.0)
    y = m(torch.tensor([[100.0], [120.0]], dtype=dtype))  # far from the running (0, 1): every clip would bite
    torch.testing.assert_close(y.float(), torch.tensor([[-1.0], [1.0]]), atol=1e-2, rtol=0)  # plain BN


@pytest.mark.parametrize("relax_steps", [0, 3])
def test_schedule_reads_no_device_value_on_the_host(relax_steps):
    """The schedule read num_batches_tracked with int() every training step: a device sync on a GPU,
    an error on the meta device and under torch.export (a data-dependent guard)."""
    m = bk.BatchRenorm2d(3, warmup_steps=2, relax_steps=relax_steps)
    meta = bk.BatchRenorm2d(3, warmup_steps=2, relax_steps=relax_steps, device="meta")
    assert meta(torch.empty(4, 3, 2, 2, device="meta")).shape == (4, 3, 2, 2)
    exported = torch.export.export(copy.deepcopy(m), (make_x((4, 3, 2, 2)),)).module()  # shares its buffers
    x = make_x((4, 3, 2, 2))
    for _ in range(6):  # the exported program runs the schedule from its own counter, as the module does
        torch.testing.assert_close(exported(x), m(x), atol=1e-6, rtol=1e-6)
    assert int(exported.num_batches_tracked) == int(m.num_batches_tracked) == 6


@pytest.mark.parametrize("limits", [(1.3, 0.4), (1.0, 0.0)], ids=["clipped", "bn"])
def test_gradcheck(limits):
    """Gradients of x, weight and bias in float64 against finite differences. Finite differences see
    r and d move with x, which the stop-gradient hides from autograd: they agree where r and d are
    clipped (constant near x), so the moving statistics are chosen to clip every channel.
    Momentum 0 keeps the function fixed across calls. (Unclipped: test_stop_gradient_on_r_and_d.)"""
    m = bk.BatchRenorm2d(2, momentum=0.0, rmax=limits[0], dmax=limits[1], dtype=torch.float64)
    _randomize(m)
    x = make_x((3, 2, 2, 2), dtype=torch.float64).requires_grad_()
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    mu_b, sigma_b = x.detach().mean((0, 2, 3)), (x.detach().var((0, 2, 3), unbiased=False) + m.eps).sqrt()
    with torch.no_grad():  # r and d clipped on both channels, on either side
        m.running_mean.copy_(mu_b + torch.tensor([-1.0, 1.0]) * sigma_b)
        m.running_std.copy_(sigma_b * torch.tensor([2.0, 0.5]))
    r = sigma_b / m.running_std
    d = (mu_b - m.running_mean) / m.running_std
    assert (r.tolist(), d.tolist()) == (pytest.approx([0.5, 2.0]), pytest.approx([0.5, -2.0]))

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_stop_gradient_on_r_and_d():
    """Gradients equal those of the formula with r, d detached, and differ from those without the
    stop-gradient (where xhat = (x - mu) / sigma when unclipped: no batch coupling at all)."""
    m = bk.BatchRenorm1d(3, rmax=10.0, dmax=10.0, dtype=torch.float64)  # wide limits: nothing clipped
    _randomize(m, spread=0.3)
    x0 = make_x((8, 3), dtype=torch.float64)
    g = torch.randn(8, 3, dtype=torch.float64)
    rm, rs = m.running_mean.clone(), m.running_std.clone()

    def manual(detach):
        x = x0.clone().requires_grad_()
        mu_b = x.mean(0)
        sigma_b = (x.var(0, unbiased=False) + m.eps).sqrt()
        r = (sigma_b.detach() if detach else sigma_b) / rs
        d = ((mu_b.detach() if detach else mu_b) - rm) / rs
        y = ((x - mu_b) / sigma_b * r + d) * m.weight.detach() + m.bias.detach()
        y.backward(g)
        return y.detach(), x.grad

    x = x0.clone().requires_grad_()
    y = m(x)
    y.backward(g)
    y_sg, grad_sg = manual(detach=True)
    y_nosg, grad_nosg = manual(detach=False)
    torch.testing.assert_close(y, y_sg)
    torch.testing.assert_close(x.grad, grad_sg)
    torch.testing.assert_close(y_nosg, y_sg)  # same forward value...
    assert (x.grad - grad_nosg).abs().max() > 1e-3  # ...different gradient
    # without the stop-gradient the gradient would be the per-element g * gamma / sigma
    torch.testing.assert_close(grad_nosg, g * m.weight.detach() / rs)


def test_batch_of_one_value_per_channel_does_not_raise():
    m = bk.BatchRenorm1d(4, dmax=0.5)
    _randomize(m)
    rm, rs = m.running_mean.clone(), m.running_std.clone()
    x = torch.randn(1, 4, requires_grad=True)
    y = m(x)
    d = ((x.detach()[0] - rm) / rs).clamp(-0.5, 0.5)
    torch.testing.assert_close(y.detach()[0], m.weight.detach() * d + m.bias.detach())
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, torch.zeros_like(x))  # x - mu_B = 0 whatever x is
    torch.testing.assert_close(m.running_std, rs + 0.01 * (m.eps ** 0.5 - rs))  # pulled toward sqrt(eps)
    # the same through a (1, C, 1) input
    assert torch.isfinite(bk.BatchRenorm1d(4)(torch.randn(1, 4, 1))).all()


def test_empty_batch():
    m = bk.BatchRenorm2d(3)
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert int(m.num_batches_tracked) == 0
    torch.testing.assert_close(m.running_std, torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_factory_kwargs_and_module_api(dtype):
    m = bk.BatchRenorm2d(3, dtype=dtype, device="cpu")
    assert {k: v.dtype for k, v in m.state_dict().items()} == {
        "weight": dtype, "bias": dtype, "running_mean": dtype, "running_std": dtype,
        "num_batches_tracked": torch.long,
    }
    y = m(make_x((2, 3, 2, 2), dtype=dtype))
    assert y.dtype == dtype
    assert all(t.device.type == "meta" for t in bk.BatchRenorm1d(2, device="meta").state_dict().values())
    n = bk.BatchRenorm3d(4, affine=False)
    assert n.weight is None and n.bias is None and list(n.parameters()) == []
    assert "rmax=3.0, dmax=5.0" in repr(n) and "affine=False" in repr(n)
    with torch.no_grad():
        m.weight.fill_(2)
        m.running_std.fill_(3)
    m(make_x((2, 3, 2, 2), dtype=dtype))
    m.reset_parameters()
    assert int(m.num_batches_tracked) == 0 and bool((m.weight == 1).all()) and bool((m.running_std == 1).all())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_features": 0}, ValueError, "num_features"),
    ({"num_features": 2.0}, TypeError, "num_features must be a positive int, got 2.0"),
    ({"eps": 0.0}, ValueError, "eps"),
    ({"eps": 1e-50}, ValueError, "eps=1e-50 rounds to 0 in torch.float32"),  # a constant batch gave NaN
    ({"momentum": 1.5}, ValueError, "momentum"),
    ({"momentum": None}, TypeError, r"momentum must be a finite float in \[0.0, 1.0\], got None"),
    ({"rmax": 0.5}, ValueError, "rmax"),
    ({"rmax": float("inf")}, ValueError, "rmax"),
    ({"dmax": -1.0}, ValueError, "dmax"),
    ({"dmax": float("nan")}, ValueError, "dmax"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps"),
    ({"warmup_steps": 2 ** 70}, ValueError, r"warmup_steps must be an int in \[0, 2\^53\]"),  # OverflowError at forward
    ({"relax_steps": 1.5}, TypeError, "relax_steps"),
    ({"rmax": 10 ** 400}, ValueError, "rmax must be a finite float >= 1.0, got an int of 1329 bits"),
    ({"eps": 10 ** 400}, ValueError, "eps must be a positive finite float, got an int of 1329 bits"),
    ({"eps": 1e39}, ValueError, r"eps=1e\+39 is above the largest torch.float32 number"),  # running_std inf, y NaN
])
def test_bad_arguments(kwargs, error, match):
    """A wrong type is a TypeError, a wrong value a ValueError (momentum=None was a ValueError)."""
    kwargs = {"num_features": 3, **kwargs}
    with pytest.raises(error, match=match):
        bk.BatchRenorm2d(**kwargs)


def test_numpy_scalars_are_accepted_as_nn_batchnorm_accepts_them():
    np = pytest.importorskip("numpy")
    layer = bk.BatchRenorm2d(np.int64(3), momentum=np.float32(0.1))
    assert layer.num_features == 3 and isinstance(layer.num_features, int)
    assert bk.BatchlessNorm2d(np.int64(3), nll_weight=np.float32(0.5)).nll_weight == 0.5


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=str)
def test_integer_input_refused(dtype):
    """An int64 input came back truncated, and updated the running statistics (nn.BatchNorm refuses it)."""
    layer = bk.BatchRenorm1d(2)
    with pytest.raises(TypeError, match="input must have a floating dtype"):
        layer(torch.tensor([[0, 10], [5, 20], [9, 40]]).to(dtype))
    assert torch.equal(layer.running_mean, torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64], ids=str)
def test_non_floating_dtype_refused(dtype):
    """complex64 constructed a layer; int64 failed in requires_grad, or at the first forward (affine=False)."""
    for affine in (True, False):
        with pytest.raises(TypeError, match="dtype must be a floating point torch.dtype"):
            bk.BatchRenorm2d(3, affine=affine, dtype=dtype)


def test_bad_affine_and_input_keyword():
    with pytest.raises(TypeError, match="affine must be a bool"):
        bk.BatchRenorm2d(3, affine="False")
    layer = bk.BatchRenorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(layer(input=x), layer(x))  # nn.BatchNorm's argument name


def test_bad_inputs():
    with pytest.raises(ValueError, match="4D"):
        bk.BatchRenorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="2D or 3D"):
        bk.BatchRenorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        bk.BatchRenorm1d(3)(torch.randn(2, 4))
    with pytest.raises(TypeError, match="input"):
        bk.BatchRenorm1d(3)([1.0, 2.0, 3.0])


@pytest.mark.parametrize("kwargs", [dict(warmup_steps=2, relax_steps=3, momentum=0.0), dict(momentum=0.2)],
                         ids=["schedule", "momentum"])
def test_compiled_training_equals_eager(kwargs):
    """AOTAutograd recomputed r and d in the backward from the buffers after their in-place updates: the
    next step's limits (off by 143 at the end of the warmup) and moving statistics."""
    compiled_layer = bk.BatchRenorm1d(3, **kwargs)
    with torch.no_grad():
        compiled_layer.running_mean.fill_(0.5)
        compiled_layer.running_std.fill_(0.5)
    eager = copy.deepcopy(compiled_layer)
    w = torch.randn(3)
    step = torch.compile(lambda x: (compiled_layer(x) * w).pow(3).sum(), backend="aot_eager")
    for _ in range(6):
        x = make_x((8, 3))
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        step(a).backward()
        (eager(b) * w).pow(3).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_layer.running_std, eager.running_std, rtol=0, atol=0)
    # fullgraph cannot hold the eager step: Dynamo's refusal says why, not only "remove the disable"
    torch._dynamo.reset()
    with pytest.raises(Exception, match="updates the moving statistics in place"):
        torch.compile(lambda x: compiled_layer(x).sum(), backend="aot_eager", fullgraph=True)(make_x((8, 3)))
