"""BatchlessNorm1d/2d/3d as drop-in replacements of nn.BatchNorm*d, nll_loss, torch.compile, and the
property batchless normalization exists for: batch-size-1 gradient accumulation is exact."""

from __future__ import annotations

import copy
import functools
import threading
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchless_kernels as bk
from conftest import ALL_BACKENDS, backend_params, make_x

MODULES = [(bk.BatchlessNorm1d, (2, 3)), (bk.BatchlessNorm2d, (4,)), (bk.BatchlessNorm3d, (5,))]
PARAMETRIZATIONS = ("abs", "log", "inv")


def _input(rank, channels, batch=3, dtype=torch.float32, device="cpu"):
    shape = (batch, channels) + (4, 3, 5)[: rank - 2]
    return make_x(shape, "contiguous", dtype, device)


# ------------------------------------------------------------------------------------------------
# Construction, parameters, repr
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, ranks", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_module_like_batchnorm(cls, ranks):
    m = cls(5)
    assert m.num_features == 5 and m.eps == 1e-5 and m.affine is True
    assert m.parametrization == "log" and m.nll_weight == 1.0 and m.gauge is True
    names = dict(m.named_parameters())
    assert set(names) == {"mean", "std_param", "weight", "bias"}
    for p in names.values():
        assert p.shape == (5,) and p.dtype == torch.float32 and p.requires_grad
    torch.testing.assert_close(m.mean.detach(), torch.zeros(5))
    torch.testing.assert_close(m.std_param.detach(), torch.zeros(5))  # log parametrization of std 1
    torch.testing.assert_close(m.weight.detach(), torch.ones(5))
    torch.testing.assert_close(m.bias.detach(), torch.zeros(5))
    assert m.nll is None
    assert list(m.buffers()) == []  # nothing like running stats: everything is trained
    # same function as the equivalent BatchNorm in eval mode with the default statistics (torch 2.11
    # rejects eps = 0; 1e-12 is below float32's resolution at var = 1)
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[int(cls.__name__[-2])](5, eps=1e-12).eval()
    x = _input(ranks[-1], 5)
    torch.testing.assert_close(m(x), bn(x))

    m2 = cls(7, eps=1e-3, affine=False, parametrization="inv", nll_weight=0.5, gauge=False)
    assert m2.weight is None and m2.bias is None
    assert set(dict(m2.named_parameters())) == {"mean", "std_param"}
    assert m2.eps == 1e-3 and m2.nll_weight == 0.5 and m2.gauge is False and m2.affine is False
    x = _input(ranks[0], 7)
    y = m2(x)
    assert y.shape == x.shape and m2.nll is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_factory_kwargs(dtype):
    m = bk.BatchlessNorm2d(3, device="cpu", dtype=dtype)
    for p in m.parameters():
        assert p.dtype == dtype and p.device.type == "cpu"
    x = _input(4, 3, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype
    assert m.nll.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    meta = bk.BatchlessNorm1d(4, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("init_std", [0.25, 1.0, 3.0])
def test_std_property_and_reset_parameters(parametrization, init_std):
    m = bk.BatchlessNorm2d(4, parametrization=parametrization, init_mean=0.5, init_std=init_std)
    std = m.std
    assert std.shape == (4,) and not std.requires_grad
    torch.testing.assert_close(std, torch.full((4,), init_std), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.mean.detach(), torch.full((4,), 0.5))
    # the module normalizes with that sigma: y = (x - 0.5) / init_std
    x = _input(4, 4)
    torch.testing.assert_close(m(x), (x - 0.5) / init_std, atol=1e-5, rtol=1e-5)
    with pytest.raises(AttributeError):
        m.std = torch.ones(4)

    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    assert m.nll is not None
    m.reset_parameters()
    assert m.nll is None
    torch.testing.assert_close(m.std, torch.full((4,), init_std), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.mean.detach(), torch.full((4,), 0.5))
    torch.testing.assert_close(m.weight.detach(), torch.ones(4))
    torch.testing.assert_close(m.bias.detach(), torch.zeros(4))


def test_std_follows_std_param():
    for parametrization, p, sigma in (("abs", -2.0, 2.0 + 1e-5), ("log", math.log(3.0), 3.0), ("inv", 0.25, 4.0),
                                      ("inv", -0.25, 4.0)):
        m = bk.BatchlessNorm1d(2, parametrization=parametrization)
        with torch.no_grad():
            m.std_param.fill_(p)
        torch.testing.assert_close(m.std, torch.full((2,), sigma), atol=1e-6, rtol=1e-6)


def test_inv_negative_std_param_flips_the_output_not_sigma():
    """inv: r = p as is (docs/method.md), so p < 0 flips y's sign; sigma, what the NLL's Gaussian uses,
    stays 1 / |p| > 0."""
    m = bk.BatchlessNorm1d(3, parametrization="inv", affine=False)
    with torch.no_grad():
        m.std_param.copy_(torch.tensor([-0.5, 0.5, -2.0]))
    x = torch.randn(4, 3)
    torch.testing.assert_close(m(x), x * torch.tensor([-0.5, 0.5, -2.0]))
    torch.testing.assert_close(m.std, torch.tensor([2.0, 2.0, 0.5]))
    assert bool((m.std > 0).all())


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("init_std", [0.1, 3.0, 7.0])
def test_init_in_the_parameters_dtype(parametrization, init_std):
    """reset_parameters computes std_param in float64, then stores it in the parameters' dtype:
    float64 layers get init_std to float64 rounding (float32 math gave 2.99999991 for inv, 3.0)."""
    m = bk.BatchlessNorm1d(3, parametrization=parametrization, init_std=init_std, dtype=torch.float64)
    torch.testing.assert_close(m.std, torch.full((3,), init_std, dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype, parametrization, init_std", [
    (torch.float16, "log", 1e5), (torch.float16, "log", 1e-7), (torch.float16, "abs", 1e-3),
    (torch.float16, "inv", 3.0), (torch.bfloat16, "abs", 1e5), (torch.bfloat16, "log", 1e-30),
    (torch.bfloat16, "inv", 1e-30)], ids=str)
def test_std_of_16_bit_layers_in_their_accumulation_dtype(dtype, parametrization, init_std):
    """std of a float16 layer was computed in float16: init_std=1e5 read inf (exp(11.5) overflows) and
    1e-7 read 0, while the layer itself computes 1/sigma in float32 and normalizes correctly."""
    eps = 1e-5
    m = bk.BatchlessNorm1d(2, parametrization=parametrization, init_std=init_std, eps=eps, dtype=dtype)
    assert m.std.dtype == torch.float32
    want = bk.parametrization.std_from_param(m.std_param.double(), parametrization, eps)  # the stored value's
    torch.testing.assert_close(m.std.double(), want, rtol=1e-6, atol=0)
    # std_param rounded to 8 bits (bfloat16 log: -69.08 to -69.0) moves sigma by up to 8%
    torch.testing.assert_close(m.std.double(), torch.full((2,), init_std, dtype=torch.float64), rtol=0.1, atol=0)


def test_abs_std_param_in_a_subnormal_is_refused():
    """abs: std_param = init_std - eps; a float16 subnormal stores it coarsely (1e-7 - 1e-8 became 1.19e-7,
    sigma 29% off); log's small std_param (sigma near 1) is fine."""
    with pytest.raises(ValueError, match=r"init_std=1e-07 gives std_param=9e-08 .* normal range of torch.float16"):
        bk.BatchlessNorm1d(1, init_std=1e-7, eps=1e-8, dtype=torch.float16, parametrization="abs")
    bk.BatchlessNorm1d(1, init_std=1.00001, dtype=torch.float16, parametrization="log")


def test_extra_repr():
    m = bk.BatchlessNorm2d(16)
    assert m.extra_repr() == (
        "16, eps=1e-05, affine=True, bias=True, parametrization='log', nll_weight=1.0, gauge=True, "
        "init_mean=0.0, init_std=1.0, backend='auto'"
    )
    m = bk.BatchlessNorm1d(3, eps=1e-3, affine=False, parametrization="abs", nll_weight=0.1, gauge=False,
                           init_mean=0.5, init_std=2.0, backend="reference")
    text = repr(m)
    assert text.startswith("BatchlessNorm1d(3, ")
    for piece in ("eps=0.001", "affine=False", "parametrization='abs'", "nll_weight=0.1", "gauge=False",
                  "init_mean=0.5", "init_std=2.0", "backend='reference'"):  # the last three were left out
        assert piece in text, piece


@pytest.mark.parametrize("cls, ranks", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_input_rank_checks(cls, ranks):
    m = cls(3)
    for rank in range(1, 7):
        shape = (2, 3, 2, 2, 2, 2)[:rank]
        x = torch.randn(shape)
        if rank in ranks:
            assert m(x).shape == shape
        else:
            with pytest.raises(ValueError, match=f"got {rank}D input"):
                m(x)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_train_and_eval_are_the_same_function(parametrization):
    torch.manual_seed(0)
    m = bk.BatchlessNorm2d(5, parametrization=parametrization)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = _input(4, 5, batch=6)
    m.train()
    y_train = m(x)
    nll_train = m.nll
    m.eval()
    y_eval = m(x)
    assert torch.equal(y_train, y_eval)
    assert torch.equal(nll_train, m.nll)  # eval() does not switch the NLL off: grad mode does
    # no batch statistics: instance 0 alone gives the same output
    torch.testing.assert_close(m(x[:1]), y_train[:1], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        y_ng = m(x)
    assert torch.equal(y_ng, y_train) and m.nll is None


def test_module_matches_functional():
    m = bk.BatchlessNorm1d(6, parametrization="abs", gauge=False, eps=1e-3, backend="reference")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = _input(3, 6)
    y = m(x)
    y_ref, nll_ref = bk.reference.batchless_norm(x, m.mean, m.std_param, m.weight, m.bias, parametrization="abs",
                                                 gauge=False, eps=1e-3)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(m.nll, nll_ref)


def test_state_dict_round_trip():
    a = bk.BatchlessNorm2d(4, parametrization="inv")
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.rand_like(p))
    sd = a.state_dict()
    assert list(sd) == ["mean", "std_param", "weight", "bias"]  # no running statistics, no counters
    b = bk.BatchlessNorm2d(4, parametrization="inv")
    b.load_state_dict(sd)
    x = _input(4, 4)
    assert torch.equal(a(x), b(x))
    assert list(bk.BatchlessNorm1d(3, affine=False).state_dict()) == ["mean", "std_param"]


def test_deepcopy_after_training_step():
    model = nn.Sequential(nn.Linear(3, 4), bk.BatchlessNorm1d(4))
    loss = model(torch.randn(5, 3)).square().mean() + bk.nll_loss(model)
    loss.backward()
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3)
    assert torch.equal(clone(x), model(x))


def test_deepcopy_after_a_forward_with_a_parametrized_parameter():
    """torch.nn.utils.parametrize's class copies __dict__ as it is, skipping __getstate__: deepcopy
    (which fuse_for_inference starts with) refused the graph's nll tensor."""
    from torch.nn.utils import parametrize

    layer = bk.BatchlessNorm2d(3)
    parametrize.register_parametrization(layer, "weight", AbsWeight())
    with torch.no_grad():
        layer.parametrizations.weight.original.uniform_(-2, 2)
    x = torch.randn(2, 3, 4, 4)
    layer(x)
    assert layer.nll is not None
    clone = copy.deepcopy(layer)
    assert clone.nll is None and clone.parametrizations.weight.original is not layer.parametrizations.weight.original
    assert torch.equal(clone(x), layer(x))
    assert isinstance(bk.fuse_for_inference(nn.Sequential(nn.Conv2d(3, 3, 1), layer))[1], nn.Identity)


class LockedNorm(bk.BatchlessNorm1d):
    """A subclass whose own __getstate__ leaves out what cannot be copied."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in super().__getstate__().items() if k != "lock"}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.lock = threading.Lock()


def test_deepcopy_uses_a_subclass_getstate():
    layer = LockedNorm(3)
    layer(torch.randn(4, 3))
    clone = copy.deepcopy(layer)
    assert clone.nll is None and clone.lock is not layer.lock
    assert isinstance(bk.fuse_for_inference(nn.Sequential(nn.Linear(2, 3), layer))[1], nn.Identity)


class AbsWeight(nn.Module):
    def forward(self, w):
        return w.abs()


# ------------------------------------------------------------------------------------------------
# nll_loss
# ------------------------------------------------------------------------------------------------


def test_nll_loss_sums_weighted_terms():
    model = nn.Sequential(
        nn.Linear(4, 6), bk.BatchlessNorm1d(6, nll_weight=2.0), nn.Tanh(),
        nn.Linear(6, 5), bk.BatchlessNorm1d(5, nll_weight=0.0, parametrization="abs"),
        nn.Sequential(nn.Linear(5, 3), bk.BatchlessNorm1d(3, parametrization="inv")),  # nested
    )
    assert bk.nll_loss(model).item() == 0.0  # no forward yet
    assert bk.nll_loss(model).dim() == 0
    model(torch.randn(8, 4))
    layers = [m for m in model.modules() if isinstance(m, bk.BatchlessNorm1d)]
    assert all(layer.nll is not None for layer in layers)
    total = bk.nll_loss(model)
    expected = 2.0 * layers[0].nll + 0.0 * layers[1].nll + 1.0 * layers[2].nll
    torch.testing.assert_close(total, expected)
    assert total.item() != 0.0
    total.backward()
    # the nll_weight=0 layer is trained by nothing; the others' mean/std_param are
    assert torch.count_nonzero(layers[1].mean.grad) == 0 and torch.count_nonzero(layers[1].std_param.grad) == 0
    for layer in (layers[0], layers[2]):
        assert torch.count_nonzero(layer.mean.grad) > 0 and torch.count_nonzero(layer.std_param.grad) > 0
    # the NLL trains nothing but mean and std_param
    for name, p in model.named_parameters():
        if not name.endswith(("mean", "std_param")):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


def test_nll_loss_adds_up_many_layers_in_a_few_ops():
    """16 layers with two weights: nll_loss's graph has a stack and a sum per weight (and the
    weights' multiply and the add of the two groups), not an op per layer, and the same value."""
    layers = [bk.BatchlessNorm1d(4, nll_weight=1.0 if i % 4 else 0.5) for i in range(16)]
    model = nn.Sequential(*layers)
    model(torch.randn(6, 4))
    total = bk.nll_loss(model)
    expected = sum(layer.nll_weight * layer.nll for layer in layers)
    torch.testing.assert_close(total, expected)
    seen, stack = [], [total.grad_fn]
    while stack:  # the nodes above the layers' own
        node = stack.pop()
        if node is None or node in seen or type(node).__name__ in ("CppFunction", "AccumulateGrad"):
            continue
        seen.append(node)
        stack += [next_fn for next_fn, _ in node.next_functions]
    assert len(seen) <= 6, [type(n).__name__ for n in seen]


def test_nll_loss_edge_cases():
    empty = nn.Sequential(nn.ReLU())
    z = bk.nll_loss(empty)
    assert isinstance(z, torch.Tensor) and z.dim() == 0 and z.item() == 0.0
    model = nn.Sequential(nn.Linear(3, 3), bk.BatchlessNorm1d(3))
    with torch.no_grad():
        model(torch.randn(2, 3))
    assert model[1].nll is None and bk.nll_loss(model).item() == 0.0
    meta_model = bk.BatchlessNorm1d(3, device="meta")
    assert bk.nll_loss(meta_model).device.type == "meta"  # a zero on the parameters' device
    with pytest.raises(TypeError, match="model"):
        bk.nll_loss([model])
    # the latest forward counts, not a sum over forwards
    model(torch.randn(2, 3))
    first = model[1].nll
    model(torch.randn(2, 3) * 5)
    assert bk.nll_loss(model) is not first and torch.equal(bk.nll_loss(model), model[1].nll)
    # nll_weight set after construction: a negative one negated the term, a str raised torch's index error
    for value, error in ((-1.0, ValueError), (float("nan"), ValueError), ("2", TypeError)):
        model[1].nll_weight = value
        with pytest.raises(error, match=r"BatchlessNorm1d.nll_weight must be a finite float >= 0"):
            bk.nll_loss(model)
    # a one-element tensor: a weight annealed without recompiling (its value not read: no sync)
    # of any shape and dtype: the loss stays 0-dim in the NLL's dtype (a (1,) weight made it (1,),
    # which Opacus refused; a float64 one made a float32 model's loss float64)
    for weight in (torch.tensor(0.5), torch.tensor([0.5]), torch.tensor([[0.5]], dtype=torch.float64)):
        model[1].nll_weight = weight
        loss = bk.nll_loss(model)
        assert loss.shape == () and loss.dtype == model[1].nll.dtype
        torch.testing.assert_close(loss, 0.5 * model[1].nll)
    model[1].nll_weight = torch.tensor([0.5, 1.0])
    with pytest.raises(TypeError, match=r"nll_weight must be a finite float >= 0 or a one-element floating tensor"):
        bk.nll_loss(model)


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


def _small_model():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), bk.BatchlessNorm2d(6), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 5 * 5, 10), bk.BatchlessNorm1d(10, parametrization="inv", nll_weight=0.5), nn.Linear(10, 4),
    )


def _loss_fn(model, x, target):
    return F.mse_loss(model(x), target) + bk.nll_loss(model)


@pytest.fixture(scope="module")
def compiled_loss():
    torch._dynamo.reset()
    return torch.compile(_loss_fn, fullgraph=True)


@pytest.mark.parametrize("step", [0, 1])
def test_torch_compile_fullgraph_train_step(compiled_loss, step):
    torch.manual_seed(100 + step)
    model = _small_model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (bk.BatchlessNorm1d, bk.BatchlessNorm2d)):
                m.mean.normal_(0, 0.3)
                m.std_param.uniform_(0.3, 1.5) if m.parametrization == "inv" else m.std_param.normal_(0, 0.3)
    eager = copy.deepcopy(model)
    x = torch.randn(8, 3, 5, 5)
    target = torch.randn(8, 4)

    loss = compiled_loss(model, x, target)
    loss.backward()
    eager_loss = _loss_fn(eager, x, target)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert model[1].nll is not None and model[5].nll is not None
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert torch.count_nonzero(model[1].mean.grad) > 0 and torch.count_nonzero(model[5].std_param.grad) > 0


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in bk.available_backends("cpu")])
def test_train_and_eval_steps_compile_as_often_as_batchnorm(backend):
    """A model compiled once per mode, as with nn.BatchNorm2d: Dynamo guarded on the backends' op cache,
    which a model's first training step (and first inference) filled, so the next step recompiled."""
    from torch._dynamo.utils import counters

    graphs = {}
    for norm in (nn.BatchNorm2d, functools.partial(bk.BatchlessNorm2d, backend=backend)):
        torch._dynamo.reset()
        counters.clear()
        model = nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.ReLU())
        compiled = torch.compile(model, backend="eager")
        x = torch.randn(2, 3, 6, 6)
        for _ in range(3):
            model.train()
            (compiled(x).sum() + bk.nll_loss(model)).backward()
            model.eval()
            with torch.no_grad():
                compiled(x)
        graphs[getattr(norm, "__name__", "BatchlessNorm2d")] = counters["stats"]["unique_graphs"]
    assert graphs["BatchlessNorm2d"] == graphs["BatchNorm2d"] == 2, graphs


# ------------------------------------------------------------------------------------------------
# Gradient accumulation: a batch of 8 == 8 micro-batches of 1 (the triton interpreter runs 3 layers
# forward and backward per micro-batch: 32 of them took 35 s of CI per case)
# ------------------------------------------------------------------------------------------------


def _mlp(backend):
    return nn.Sequential(
        nn.Linear(5, 16), bk.BatchlessNorm1d(16, backend=backend), nn.Tanh(),
        nn.Linear(16, 12), bk.BatchlessNorm1d(12, parametrization="abs", backend=backend), nn.ReLU(),
        nn.Linear(12, 3), bk.BatchlessNorm1d(3, parametrization="inv", affine=False, nll_weight=0.3, backend=backend),
    )


def _cnn(backend):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), bk.BatchlessNorm2d(8, backend=backend), nn.ReLU(),
        nn.Conv2d(8, 6, 3), bk.BatchlessNorm2d(6, parametrization="inv", gauge=False, backend=backend), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 7), bk.BatchlessNorm1d(7, parametrization="abs", backend=backend),
        nn.Linear(7, 3),
    )


def _perturb(model):
    """Move the Gaussians off their init so that every gradient is non-trivial."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (bk.BatchlessNorm1d, bk.BatchlessNorm2d)):
                m.mean.normal_(0, 0.3)
                if m.parametrization == "log":
                    m.std_param.normal_(0, 0.3)
                else:
                    m.std_param.uniform_(0.5, 1.5)


@pytest.fixture
def no_tf32():
    """On GPUs, cuDNN convolutions default to TF32 (10-bit mantissa): far from a 1e-5 comparison."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("case", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("arch", ["mlp", "cnn", "cnn_channels_last"])
def test_gradient_accumulation_is_exact(case, arch, no_tf32):
    batch = 8
    model = (_mlp if arch == "mlp" else _cnn)(case.name).to(case.device)
    _perturb(model)
    if arch == "mlp":
        x = torch.randn(batch, 5, device=case.device)
    else:
        x = torch.randn(batch, 3, 7, 7, device=case.device)
        if arch == "cnn_channels_last":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randn(batch, 3, device=case.device)
    micro = copy.deepcopy(model)

    loss = F.mse_loss(model(x), target) + bk.nll_loss(model)
    loss.backward()

    for i in range(batch):
        part = (F.mse_loss(micro(x[i : i + 1]), target[i : i + 1]) + bk.nll_loss(micro)) / batch
        part.backward()

    for (name, p), (_, q) in zip(model.named_parameters(), micro.named_parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, f"{name}: zero gradient, the check would be vacuous"
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5 * scale, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# bias=False: the learned scale without the shift (nn.LayerNorm's convention)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bias_false_on_every_backend_and_fused(case, layout):
    torch.manual_seed(3)
    layer = bk.BatchlessNorm2d(5, bias=False, parametrization="abs", backend=case.name, dtype=torch.float64,
                               device=case.device)
    assert layer.bias is None and "bias" not in layer.state_dict() and "bias=False" in repr(layer)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.mean.normal_()
        layer.std_param.uniform_(0.5, 2.0)
    x = make_x((3, 5, 4, 3), layout, torch.float64, case.device).requires_grad_()
    y = layer(x)
    sigma = layer.std_param.detach().abs() + layer.eps
    expected = (x.detach() - layer.mean.detach().view(1, -1, 1, 1)) / sigma.view(1, -1, 1, 1) \
        * layer.weight.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    (y.square().sum() + layer.nll).backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in layer.parameters())
    torch.testing.assert_close(x.grad, 2 * y.detach() * (layer.weight / sigma).detach().view(1, -1, 1, 1))
    model = nn.Sequential(nn.Conv2d(5, 5, 1), layer).to(torch.float64).to(case.device)
    fused = bk.fuse_for_inference(model)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


def test_bias_and_affine_must_be_bools():
    with pytest.raises(TypeError, match="bias must be a bool"):
        bk.BatchlessNorm2d(4, 1e-5, True, "abs")  # a parametrization passed where bias now is
    with pytest.raises(TypeError, match="affine must be a bool"):
        bk.BatchlessNorm2d(4, affine="yes")
    assert bk.BatchlessNorm2d(4, affine=False, bias=True).bias is None  # no shift without affine


def test_preserve_function_needs_a_bias():
    model = nn.Sequential(nn.Linear(3, 4), bk.BatchlessNorm1d(4, bias=False))
    with pytest.raises(ValueError, match=r"affine=True, bias=True.*\['1'\]"):
        bk.init_from_data(model, torch.randn(8, 3), preserve_function=True)


@pytest.mark.parametrize("make", [lambda: bk.BatchlessNorm2d(8), lambda: bk.BatchlessNorm((8, 1, 1)),
                                  lambda: bk.BatchRenorm2d(8)], ids=["BatchlessNorm2d", "BatchlessNorm", "BatchRenorm2d"])
def test_layers_build_under_a_meta_default_device(make):
    """FSDP2's large-model set-up: build under `with torch.device("meta")`, then to_empty() and
    reset_parameters(). The constructors read a float of a tensor made on the default device:
    "Tensor.item() cannot be called on meta tensors"."""
    with torch.device("meta"):
        layer = make()
        layer.reset_parameters()
    assert {p.device.type for p in layer.parameters()} == {"meta"}
    layer = layer.to_empty(device="cpu")
    layer.reset_parameters()
    reference = make()
    for (name, p), q in zip(layer.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name
