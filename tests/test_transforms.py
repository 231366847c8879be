"""Engines that transform or re-run a model's forward: torch.func (per-sample gradients, what
differentially private training needs), torch.utils.checkpoint, and torch.compile under static,
automatic-dynamic and dynamic shapes. Every backend must give the values of plain eager autograd."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vjp, vmap
from torch.utils.checkpoint import checkpoint

import batchless_kernels as bk
from conftest import ALL_BACKENDS, backend_params

BACKENDS = backend_params(ALL_BACKENDS)


def _mlp(backend, device, dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 4), bk.BatchlessNorm1d(4, backend=backend), nn.Tanh(),
        nn.Linear(4, 5), bk.BatchlessNorm1d(5, parametrization="abs", nll_weight=0.5, backend=backend),
        nn.Linear(5, 1), bk.BatchlessNorm1d(1, parametrization="inv", backend=backend),
    ).to(device=device, dtype=dtype)
    with torch.no_grad():  # away from the initial values, so that every NLL gradient is non-zero
        for m in net.modules():
            if isinstance(m, bk.BatchlessNorm1d):
                m.mean.normal_(0, 0.5)
                m.std_param.uniform_(0.5, 1.5)
    return net


def _sample_loss(net):
    def loss(params, x):
        out = functional_call(net, params, (x.unsqueeze(0),))
        return out.square().sum() + bk.nll_loss(net)

    return loss


# ------------------------------------------------------------------------------------------------
# torch.func
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BACKENDS)
def test_per_sample_gradients_equal_a_loop(case):
    """vmap(grad) over the samples of a batch (Opacus' functorch route, DP-SGD) equals one
    grad per sample, for every parameter, the NLL's mean and std_param included."""
    net = _mlp(case.name, case.device)
    params = {k: v.detach() for k, v in net.named_parameters()}
    xs = torch.randn(6, 3, dtype=torch.float64, device=case.device)
    loss = _sample_loss(net)
    batched = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        single = grad(loss)(params, x)
        for name, g in single.items():
            torch.testing.assert_close(batched[name][i], g, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # ... and the loop equals plain autograd on each sample alone
    eager = copy.deepcopy(net)
    (eager(xs[:1]).square().sum() + bk.nll_loss(eager)).backward()
    for name, p in eager.named_parameters():
        assert torch.count_nonzero(p.grad) > 0, f"{name}: zero gradient, the check would be vacuous"
        torch.testing.assert_close(batched[name][0], p.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", BACKENDS)
def test_vmapped_ensemble_trains_mean_and_std(case):
    """torch.func's ensemble recipe (stacked members' parameters, vmap over functional_call): inside plain
    vmap requires_grad reads False, so no NLL was computed and nll_loss gave 0 without a word."""
    members = [_mlp(case.name, case.device) for _ in range(3)]
    for i, m in enumerate(members):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * i)
    params, _ = torch.func.stack_module_state(members)
    base = copy.deepcopy(members[0])
    x = torch.randn(6, 3, dtype=torch.float64, device=case.device)

    def member(p, x):
        out = functional_call(base, p, (x,))
        return out.square().sum() + bk.nll_loss(base)

    vmap(member, in_dims=(0, None))(params, x).sum().backward()
    for i, m in enumerate(members):
        (m(x).square().sum() + bk.nll_loss(m)).backward()
        for name, p in m.named_parameters():
            assert torch.count_nonzero(p.grad) > 0, name
            torch.testing.assert_close(params[name].grad[i], p.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # a term left inside the transform: nll_loss outside says so
    vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))(params, x)
    with pytest.raises(ValueError, match="ran inside a torch.func transform"):
        bk.nll_loss(base)


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiled_per_sample_gradients_equal_eager(case, compiler):
    """torch.compile(vmap(grad(loss))): Dynamo reads requires_grad as False inside the transform, which
    dropped the NLL (zero gradients for mean and std_param, the reference backend), and the compiled
    backends' ops met functorch's tensors (an error); the stored NLL term, a tensor of the transform,
    made AOTAutograd fail."""
    net = _mlp(case.name, case.device)
    params = {k: v.detach() for k, v in net.named_parameters()}
    xs = torch.randn(5, 3, dtype=torch.float64, device=case.device)
    per_sample = vmap(grad(_sample_loss(net)), in_dims=(None, 0))
    expected = per_sample(params, xs)
    torch._dynamo.reset()
    actual = torch.compile(per_sample, backend=compiler)(params, xs)
    for name, g in expected.items():
        assert torch.count_nonzero(g) > 0, name
        torch.testing.assert_close(actual[name], g, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_compiled_vmap_of_an_eval_layer():
    """An eval-mode layer under torch.compile(vmap(...)) keeps no NLL term, which AOTAutograd could not
    return ("Cannot access storage of BatchedTensorImpl")."""
    layer = bk.BatchlessNorm1d(4).requires_grad_(False).eval()
    x = torch.randn(6, 3, 4)
    expected = vmap(layer)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(vmap(layer), backend="aot_eager")(x), expected)


def test_need_nll_must_be_a_bool_or_none():
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="need_nll must be a bool or None, got str"):
        bk.batchless_norm(x, torch.zeros(3), torch.zeros(3), need_nll="False")


@pytest.mark.parametrize("case", BACKENDS)
def test_vjp_and_jacrev_match_autograd(case):
    x = torch.randn(5, 3, 4, dtype=torch.float64, device=case.device)
    mean, std_param, weight, bias = (torch.randn(3, dtype=torch.float64, device=case.device) for _ in range(4))

    def f(x, mean, std_param, weight, bias):
        y, nll = bk.batchless_norm(x, mean, std_param, weight, bias, backend=case.name, need_nll=True)
        return y.sin().sum() + 2 * nll

    inputs = (x, mean, std_param, weight, bias)
    leaves = [t.clone().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(f(*leaves), leaves)
    _, pullback = vjp(f, *inputs)
    for got, want in zip(pullback(torch.ones((), dtype=torch.float64, device=case.device)), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(jacrev(f, argnums=(0, 1, 2, 3, 4))(*inputs), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(torch.count_nonzero(g) > 0 for g in expected)


# ------------------------------------------------------------------------------------------------
# torch.utils.checkpoint
# ------------------------------------------------------------------------------------------------


def _grads_with(net, x, run):
    out = run(net, x)
    (out.square().sum() + bk.nll_loss(net)).backward()
    return {name: p.grad for name, p in net.named_parameters()}


@pytest.mark.parametrize("case", BACKENDS)
def test_non_reentrant_checkpoint_gives_the_same_gradients(case):
    x = torch.randn(6, 3, dtype=torch.float64, device=case.device)
    expected = _grads_with(_mlp(case.name, case.device), x, lambda net, x: net(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning of ours on this supported path
        got = _grads_with(_mlp(case.name, case.device), x, lambda net, x: checkpoint(net, x, use_reentrant=False))
    for name, g in expected.items():
        assert torch.count_nonzero(g) > 0, name
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_compiled_non_reentrant_checkpoint_gives_the_same_gradients():
    """torch.compile of a checkpointed step: the layer's nll attribute is a side effect, which Dynamo
    refuses inside a checkpoint with fullgraph=True (PyTorch's rule, docs/api.md says the ways out);
    without fullgraph the region runs eagerly and the gradients are those of no checkpointing."""
    x = torch.randn(6, 3, dtype=torch.float64)
    expected = _grads_with(_mlp("auto", "cpu"), x, lambda net, x: net(x))
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's graph-break warnings
        got = _grads_with(_mlp("auto", "cpu"), x,
                          torch.compile(lambda net, x: checkpoint(net, x, use_reentrant=False), backend="aot_eager"))
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", BACKENDS)
def test_reentrant_checkpoint_warns_that_the_nll_is_lost(case):
    """use_reentrant=True runs the forward without gradients (no NLL), then again inside backward:
    mean and std_param cannot get their NLL gradient. Said loudly, once per recomputed layer call."""
    net = _mlp(case.name, case.device)
    x = torch.randn(6, 3, dtype=torch.float64, device=case.device, requires_grad=True)
    with pytest.warns(UserWarning, match=r"use_reentrant=True.*no NLL gradient.*use_reentrant=False"):
        _grads_with(net, x, lambda net, x: checkpoint(net, x, use_reentrant=True))


@pytest.mark.parametrize("case", BACKENDS)
def test_checkpoint_recomputation_keeps_the_first_term(case):
    """use_reentrant=False recomputes the layer inside backward: the layer keeps the first forward's
    NLL term, whose graph holds no activation (the recomputation's held the recomputed ones alive
    until the next forward), and the gradients are those of the plain step."""
    net = _mlp(case.name, case.device)
    x = torch.randn(6, 3, dtype=torch.float64, device=case.device)
    expected = _grads_with(copy.deepcopy(net), x, lambda net, x: net(x))
    layers = [m for m in net.modules() if isinstance(m, bk.BatchlessNorm1d)]
    out = checkpoint(net, x, use_reentrant=False)
    terms = [m.nll for m in layers]
    (out.square().sum() + bk.nll_loss(net)).backward()
    assert all(m.nll is t for m, t in zip(layers, terms))
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_batch_renorm_checkpoint_recomputation_warns():
    """A training BatchRenorm recomputed by a checkpoint takes other r and d (its buffers moved): said."""
    net = nn.Sequential(nn.Linear(3, 4), bk.BatchRenorm1d(4, momentum=0.5)).train()
    out = checkpoint(net, torch.randn(8, 3), use_reentrant=False)
    with pytest.warns(UserWarning, match=r"BatchRenorm1d in training mode is being recomputed inside a backward"):
        out.square().sum().backward()


@pytest.mark.parametrize("case", BACKENDS)
def test_reentrant_checkpoint_warns_once_with_shared_axes(case):
    """(C, 1) parameters take a second call inside (x viewed per channel): still one warning."""
    x = torch.randn(2, 3, 4, dtype=torch.float64, device=case.device, requires_grad=True)
    params = [torch.zeros(3, 1, dtype=torch.float64, device=case.device, requires_grad=True) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, _ = checkpoint(lambda x: bk.batchless_norm(x, *params, backend=case.name), x, use_reentrant=True)
        y.sum().backward()
    assert len([w for w in caught if "use_reentrant=True" in str(w.message)]) == 1, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------
# Forward-mode AD
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("need_nll", [None, True, False])
def test_forward_mode_ad(case, need_nll):
    """Dual tensors (torch.autograd.forward_ad) run the spec on every backend, as torch.func does:
    the compiled ops have no forward derivative (torch raised NotImplementedError or "jvp is not
    implemented"). The tangents equal the reverse-mode Jacobian's products, a layer's too."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(0)
    x, tx = (torch.randn(4, 3, 5, dtype=torch.float64, generator=g).to(case.device) for _ in range(2))
    mean, std_param, weight, bias, t_std = (torch.randn(3, dtype=torch.float64, generator=g).to(case.device)
                                            for _ in range(5))
    mean.requires_grad_()

    def f(x, std_param):
        return bk.batchless_norm(x, mean, std_param, weight, bias, backend=case.name, need_nll=need_nll)

    with fwAD.dual_level():
        y, nll = f(fwAD.make_dual(x, tx), fwAD.make_dual(std_param, t_std))
        ty = fwAD.unpack_dual(y).tangent
        t_nll = None if nll is None else fwAD.unpack_dual(nll).tangent
    expected_y = torch.autograd.functional.jvp(lambda x: f(x, std_param)[0], x, tx)[1]  # y's tangent: x's only (sg)
    torch.testing.assert_close(ty, expected_y, rtol=1e-12, atol=1e-12)
    if nll is not None:
        expected_nll = torch.autograd.functional.jvp(lambda p: f(x, p)[1], std_param, t_std)[1]
        assert expected_nll.abs() > 0
        torch.testing.assert_close(t_nll, expected_nll, rtol=1e-12, atol=1e-12)
    layer = bk.BatchlessNorm1d(3, backend=case.name, dtype=torch.float64, device=case.device)
    with fwAD.dual_level():
        out = layer(fwAD.make_dual(x, tx))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, tx * layer.std_param.detach().neg().exp()[:, None])


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_forward_mode_ad_tangent_asks_for_the_nll(case, grad_mode):
    """A tangent on mean or std_param asks for the NLL (need_nll=None) though neither requires grad,
    as torch.func.jvp does: gradcheck's forward-AD check makes its duals of detached tensors, and
    read the NLL as None (its tangent as zeros)."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=g).to(case.device)
    mean, std_param, t_mean, t_std = (torch.randn(3, dtype=torch.float64, generator=g).to(case.device)
                                      for _ in range(4))

    def nll_of(m, p):
        return bk.batchless_norm(x, m, p, backend=case.name, gauge=False)[1]

    expected = torch.func.jvp(nll_of, (mean, std_param), (t_mean, t_std))
    assert expected[1].abs() > 0
    with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
        nll = nll_of(fwAD.make_dual(mean, t_mean), fwAD.make_dual(std_param, t_std))
        assert nll is not None
        torch.testing.assert_close((fwAD.unpack_dual(nll).primal, fwAD.unpack_dual(nll).tangent), expected,
                                   rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(nll_of, (mean.requires_grad_(), std_param.requires_grad_()),
                                    check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)


# ------------------------------------------------------------------------------------------------
# torch.jit.trace
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BACKENDS)
def test_jit_trace_of_an_eval_model(case):
    """The op depended on the grad mode, and jit.trace's check retraces under no_grad: TracingCheckError.
    The trace runs in both modes and gives the model's outputs and gradients."""
    net = _mlp(case.name, case.device).eval()
    x = torch.randn(6, 3, dtype=torch.float64, device=case.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's: jit.trace is deprecated, shape checks become constants
        traced = torch.jit.trace(net, x)
    expected = _grads_with(copy.deepcopy(net), x, lambda net, x: net(x))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), rtol=1e-12, atol=1e-12)
    y = traced(x)
    torch.testing.assert_close(y, net(x), rtol=1e-12, atol=1e-12)
    y.square().sum().backward()  # no NLL in a traced module: the task loss's gradients
    for name, p in net.named_parameters():
        if not name.endswith(("mean", "std_param")):
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_jit_trace_in_training_mode_warns_that_there_is_no_nll():
    """The trace also leaves the layers' terms of the training forward before it to nll_loss (it
    set them to None). Its check (check_trace) calls the model again under no_grad, which clears
    them as any no_grad forward does."""
    net = _mlp("auto", "cpu")
    x = torch.randn(6, 3, dtype=torch.float64)
    net(x)
    expected = bk.nll_loss(net)
    with pytest.warns(torch.jit.TracerWarning, match="no NLL"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(deprecated|Python boolean).*")
        torch.jit.trace(net, torch.randn(4, 3, dtype=torch.float64), check_trace=False)
    assert expected.abs() > 0
    torch.testing.assert_close(bk.nll_loss(net), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# torch.fx.symbolic_trace (feature extraction, FX quantization)
# ------------------------------------------------------------------------------------------------


def _fx_model(case):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), bk.BatchlessNorm2d(4, backend=case.name), nn.ReLU(),
                        bk.BatchRenorm2d(4), bk.BatchlessNorm((4, 1, 1), parametrization="inv", backend=case.name),
                        nn.Flatten(), nn.Linear(36, 5), bk.BatchlessNorm1d(5, affine=False, backend=case.name))
    net = net.to(device=case.device, dtype=torch.float64)
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "std_param"):
                m.mean.normal_()
                m.std_param.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("case", BACKENDS)
def test_fx_symbolic_trace_of_an_eval_model(case):
    """check_layer_input raised TypeError on an fx Proxy: a converted model no longer traced, where
    nn.BatchNorm (a leaf module) does. Each layer is one node, which checks its input as the layer does."""
    net = _fx_model(case)
    traced = torch.fx.symbolic_trace(net)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, device=case.device)
    torch.testing.assert_close(traced(x), net(x), rtol=1e-12, atol=1e-12)
    called = [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"]
    assert called == ["_layer_output", "_traced_moving_normalize", "_layer_output", "_layer_output"]
    layer = torch.fx.symbolic_trace(net[1])
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(x[0])
    with pytest.raises(ValueError, match="num_features=4"):
        layer(x[:, :2])


def test_fx_symbolic_trace_in_training_mode():
    """Batchless layers trace with a warning (no NLL: as under torch.jit.trace); a BatchRenorm, whose
    step updates buffers, is refused with the way out."""
    net = _fx_model(types.SimpleNamespace(name="auto", device="cpu")).train()
    with pytest.warns(torch.jit.TracerWarning, match="symbolic_trace of a BatchlessNorm2d in training mode"):
        with pytest.raises(TypeError, match="cannot trace a BatchRenorm2d in training mode.*is_leaf_module"):
            torch.fx.symbolic_trace(net)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_export_runs_standard_ops(strict, mode):
    """Strict export traces through Dynamo, where exporting() read False: the program kept this library's
    training op (its sums computed, the extension needed to load it)."""
    model = getattr(_mlp("auto", "cpu"), mode)()
    x = torch.randn(6, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Dynamo's too: the layer's nll attribute is set (a side effect)
        program = torch.export.export(model, (x,), strict=strict)
    # A training-mode export warns that it has no NLL, as jit.trace does (strict export's Dynamo
    # traces the warning without emitting it).
    no_nll = [w for w in caught if "torch.export of a BatchlessNorm1d in training mode" in str(w.message)]
    assert bool(no_nll) == (mode == "train" and not strict)
    assert not [n.target for n in program.graph.nodes if "batchless" in str(n.target)]
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# torch.compile, static and dynamic shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("dynamic", [False, None, True], ids=["static", "automatic", "dynamic"])
def test_compiled_step_equals_eager_for_two_batch_sizes(case, dynamic):
    """fullgraph=True: the argument checks trace (eps is symbolic under dynamic=True)."""
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bk.BatchlessNorm2d(4, backend=case.name), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 5 * 5, 2)).to(case.device)
    eager = copy.deepcopy(net)

    def step(model, x):
        return F.mse_loss(model(x), torch.ones(x.shape[0], 2, device=x.device)) + bk.nll_loss(model)

    compiled = torch.compile(step, dynamic=dynamic, fullgraph=True)
    for batch in (3, 5):
        x = torch.randn(batch, 3, 5, 5, device=case.device)
        got, want = compiled(net, x), step(eager, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        got.backward()
        want.backward()
        for (name, p), (_, q) in zip(net.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
