"""DP-SGD with Opacus (batchless_kernels.privacy): its validator accepts Batchless layers, and the
per-sample gradients it computes for every parameter, mean and std_param included (the NLL term in
each sample's loss), equal a per-sample loop in float64."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchless_kernels as bk
from conftest import ALL_BACKENDS, backend_params

opacus = pytest.importorskip("opacus", reason="opacus is not installed (the privacy feature's extra)")
import batchless_kernels.privacy  # noqa: E402, F401  (registers the grad samplers)
from opacus import PrivacyEngine  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402


def _model(backend, **norm):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), bk.BatchlessNorm2d(4, backend=backend, **norm), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), bk.BatchlessNorm1d(6, parametrization="inv", nll_weight=0.5,
                                                                 backend=backend), nn.Tanh(),
        nn.Linear(6, 3),
    ).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, bk.BatchlessNorm1d | bk.BatchlessNorm2d):
                m.mean.normal_(0, 0.3)
                m.std_param.uniform_(0.6, 1.4)
    return model


@pytest.mark.parametrize("case", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("norm", [{}, {"parametrization": "abs", "bias": False}], ids=["log", "abs-nobias"])
def test_opacus_per_sample_gradients_equal_a_loop(case, norm):
    model = _model(case.name, **norm)
    assert ModuleValidator.validate(model, strict=True) == []
    reference = copy.deepcopy(model)
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    target = torch.randint(0, 3, (6,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, target), batch_size=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus: secure RNG off, full backward hook on outputs
        private, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=0.0, max_grad_norm=1e9)
        xb, tb = x, target
        (F.cross_entropy(private(xb), tb) + bk.nll_loss(private)).backward()
    # The loop: each sample's gradients on its own (one backward per sample, every parameter's).
    per_sample = []
    for i in range(len(x)):
        single = copy.deepcopy(reference)
        (F.cross_entropy(single(x[i:i + 1]), target[i:i + 1]) + bk.nll_loss(single)).backward()
        per_sample.append({name: q.grad for name, q in single.named_parameters()})
    for name, p in private._module.named_parameters():
        expected = torch.stack([grads[name] for grads in per_sample])
        assert torch.count_nonzero(expected) > 0, name
        torch.testing.assert_close(p.grad_sample, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_empty_batch_and_a_layer_called_twice():
    from batchless_kernels.privacy import per_sample_grads

    layer = bk.BatchlessNorm1d(3).double()
    grads = per_sample_grads(layer, torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64))
    assert {tuple(g.shape) for g in grads.values()} == {(0, 3)} and len(grads) == 4
    twice = nn.Sequential(nn.Linear(3, 3), bk.BatchlessNorm1d(3))
    model = nn.Sequential(*twice, nn.Linear(3, 3), twice[1]).double()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3, dtype=torch.float64)),
                                         batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, _, _ = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                     data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0)
        out = private(torch.randn(4, 3, dtype=torch.float64))
        with pytest.raises(ValueError, match="called more than once in one forward"):
            (out.sum() + bk.nll_loss(private)).backward()


class SubclassedNorm(bk.BatchlessNorm1d):
    """A user's subclass: Opacus looks grad samplers up by exact class."""


def _private(model, **kwargs):
    x = torch.randn(4, 3, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randint(0, 2, (4,))), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=0.0, max_grad_norm=1e9, criterion=nn.CrossEntropyLoss(), **kwargs)
    criterion = made[2] if len(made) == 4 else nn.CrossEntropyLoss()  # ghost mode wraps the criterion
    return made[0], criterion, x, torch.randint(0, 2, (4,))


def test_subclass_gets_per_sample_nll_gradients():
    """A subclass (defined after the import) got zero per-sample gradients for mean and std_param: the
    functorch fallback sees the output only, not the NLL."""
    torch.manual_seed(0)
    private, criterion, x, t = _private(nn.Sequential(SubclassedNorm(3), nn.Linear(3, 2)).double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (criterion(private(x), t) + bk.nll_loss(private)).backward()
    layer = private._module[0]
    assert torch.count_nonzero(layer.mean.grad_sample) > 0 and torch.count_nonzero(layer.std_param.grad_sample) > 0


@pytest.mark.parametrize("mode", ["ghost", "functorch", "ew"])
@pytest.mark.parametrize("given", ["wrapper", "inner model", "layer"])
def test_unsupported_opacus_modes_are_refused(mode, given):
    """Ghost clipping weights each sample's loss by its clipping factor but the NLL enters once (an update of
    norm 1e5 with max_grad_norm 1); functorch mode gives mean and std_param no NLL gradient (refused only
    when nll_loss was given Opacus' wrapper: given the model itself or the layer, their gradients became 0
    silently); "ew" (torch's Expanded Weights) failed in the forward with torch's "cannot handle function
    dim"."""
    private, criterion, x, t = _private(nn.Sequential(bk.BatchlessNorm1d(3), nn.Linear(3, 2)).double(),
                                        grad_sample_mode=mode)
    with pytest.raises(ValueError, match="grad_sample_mode='hooks'"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = private(x)
        given_module = {"wrapper": private, "inner model": private._module, "layer": private._module[0]}[given]
        (criterion(out, t) + bk.nll_loss(given_module)).backward()


@pytest.mark.parametrize("given", ["wrapper", "layer"])
def test_a_layer_whose_output_needs_no_gradient_is_refused(given):
    """An affine=False first layer: its output needs no gradient, so Opacus' backward hook never ran its
    grad sampler, and the optimizer's step failed with Opacus' 'Per sample gradient is not initialized'."""
    private, criterion, x, t = _private(nn.Sequential(bk.BatchlessNorm1d(3, affine=False), nn.Linear(3, 2)).double())
    with pytest.raises(ValueError, match=r"output of BatchlessNorm1d '(0|BatchlessNorm1d)' needs no gradient.*x.requires_grad_"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = private(x)
        (criterion(out, t) + bk.nll_loss(private if given == "wrapper" else private._module[0])).backward()
    # the way out (a new model: Opacus keeps the refused forward's input in the layer)
    private, criterion, x, t = _private(nn.Sequential(bk.BatchlessNorm1d(3, affine=False), nn.Linear(3, 2)).double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (criterion(private(x.requires_grad_()), t) + bk.nll_loss(private)).backward()
    assert torch.count_nonzero(private._module[0].mean.grad_sample) > 0
    # in eval mode (a validation loss with grad on; Opacus itself takes no backward there), Opacus samples
    # nothing and nll_loss refuses nothing
    private.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(criterion(private(x.detach()), t) + bk.nll_loss(private))


def test_summed_loss_gets_per_sample_gradients_that_add_up():
    """loss_reduction='sum': each sample got the whole gradient of its own NLL, so the samples' gradients of
    mean and std_param added up to N times the loss's (task summed + nll_loss, the batch's mean NLL)."""
    torch.manual_seed(0)
    private, _, x, t = _private(nn.Sequential(nn.Linear(3, 3), bk.BatchlessNorm1d(3, nll_weight=0.5),
                                              nn.Linear(3, 2)).double(), loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (F.cross_entropy(private(x), t, reduction="sum") + bk.nll_loss(private)).backward()
    for name, p in private._module.named_parameters():
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # a one-element tensor nll_weight (which nll_loss accepts) gives the float's per-sample gradients
    # (of shape (1,) too: the loss became (1,), which Opacus' per-sample grad refused)
    expected = {name: p.grad_sample.clone() for name, p in private._module.named_parameters()}
    for weight in (torch.tensor(0.5, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)):
        private._module[1].nll_weight = weight
        private.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (F.cross_entropy(private(x), t, reduction="sum") + bk.nll_loss(private)).backward()
        for name, p in private._module.named_parameters():
            torch.testing.assert_close(p.grad_sample, expected[name], rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"{name}: {m}")


def test_layers_without_the_grad_sampler_are_refused(monkeypatch):
    """Without batchless_kernels.privacy imported before make_private, Opacus' functorch fallback takes the
    layers' per-sample gradients from their outputs only: mean and std_param got zero, unclipped."""
    from opacus import GradSampleModule

    samplers = {k: v for k, v in GradSampleModule.GRAD_SAMPLERS.items() if not issubclass(k, bk.BatchlessNorm1d)}
    monkeypatch.setattr(GradSampleModule, "GRAD_SAMPLERS", samplers)
    private, criterion, x, t = _private(nn.Sequential(bk.BatchlessNorm1d(3), nn.Linear(3, 2)).double())
    with pytest.raises(ValueError, match="import batchless_kernels.privacy before make_private"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (criterion(private(x), t) + bk.nll_loss(private)).backward()


@pytest.mark.parametrize("order", ["no_grad forward, then nll_loss", "nll_loss, then no_grad forward",
                                   "no nll_loss"])
def test_per_sample_nll_gradients_follow_the_loss(order):
    """The sampler adds a layer's NLL to its samples' gradients when the loss has it: a forward under no_grad
    before nll_loss leaves none to add (the sampler added it anyway), one after it (a metric) does not take
    it out (a first fix did, and mean and std_param stopped training)."""
    torch.manual_seed(0)
    private, criterion, x, t = _private(nn.Sequential(bk.BatchlessNorm1d(3), nn.Linear(3, 2)).double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = private(x)
        if order.startswith("no_grad"):
            with torch.no_grad():
                private(x)
        loss = criterion(out, t) + (bk.nll_loss(private) if order != "no nll_loss" else 0)
        if order.startswith("nll_loss"):
            with torch.no_grad():
                private(x[:2])
        loss.backward()
    layer = private._module[0]
    in_loss = order.startswith("nll_loss")
    for p in (layer.mean, layer.std_param):
        assert (p.grad is not None and torch.count_nonzero(p.grad) > 0) == in_loss
        assert (torch.count_nonzero(p.grad_sample) > 0) == in_loss
        if in_loss:  # the mean of the samples' gradients is the gradient (loss_reduction="mean")
            torch.testing.assert_close(p.grad_sample.mean(0), p.grad, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(layer.weight.grad_sample) > 0


class ScaledBlock(nn.Module):
    """A block with a parameter of its own: Opacus prepares it for functorch and does not look inside."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(()))
        self.norm = bk.BatchlessNorm1d(3)

    def forward(self, x):
        return self.alpha * self.norm(x)


def test_a_layer_inside_a_module_with_its_own_parameters_is_refused():
    """Its per-sample gradients came from the block's functorch route: mean and std_param got zero, unclipped."""
    private, criterion, x, t = _private(nn.Sequential(ScaledBlock(), nn.Linear(3, 2)).double())
    with pytest.raises(ValueError, match=r"ScaledBlock '0', which holds \['norm'\] and has parameters of its own"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (criterion(private(x), t) + bk.nll_loss(private._module)).backward()


def test_forwards_stamp_their_nll_only_once_privacy_is_imported():
    """The stamps that tell the grad sampler which forward nll_loss summed cost every forward a counter
    step; only Opacus users need them, and they import batchless_kernels.privacy before wrapping a
    model. A fresh process: this one imported privacy above."""
    import subprocess
    import sys

    code = """
import torch, batchless_kernels as bk
layer = bk.BatchlessNorm1d(3)
layer(torch.randn(4, 3))
assert "_nll_stamp" not in layer.__dict__, "stamped without privacy"
import batchless_kernels.privacy
layer(torch.randn(4, 3))
first = layer.__dict__["_training_stamp"]
layer(torch.randn(4, 3))
assert layer.__dict__["_nll_stamp"] == layer.__dict__["_training_stamp"] > first
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(nll_weight=float("nan")), ValueError, "nll_weight must be a finite float >= 0, got nan"),
    (dict(nll_weight=-1.0), ValueError, "nll_weight"),
    (dict(nll_weight=True), TypeError, "nll_weight"),
    (dict(nll_weight=torch.ones(2)), TypeError, r"nll_weight must be .* a one-element floating tensor, got a tensor "
                                                r"of shape \(2,\)"),
    (dict(layer=None), TypeError, "layer must be a Batchless layer, got NoneType"),
    (dict(x=[1.0]), TypeError, "x and grad_y must be tensors"),
    (dict(grad_y=torch.ones(4, 3)), ValueError, r"grad_y must have x's shape \(4, 3, 2, 2\)"),
    (dict(x=torch.ones(4, 3, 2), grad_y=torch.ones(4, 3, 2)), ValueError, r"expected 4D input \(got 3D input\)"),
])
def test_per_sample_grads_checks_its_arguments(kwargs, error, match):
    """nll_weight=nan gave NaN gradients, a 3-D x passed a BatchlessNorm2d's rank rule, a wrong-shaped
    grad_y broadcast, a missing layer raised AttributeError."""
    args = dict(layer=bk.BatchlessNorm2d(3), x=torch.randn(4, 3, 2, 2), grad_y=torch.randn(4, 3, 2, 2))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        batchless_kernels.privacy.per_sample_grads(**args)


def test_per_sample_grads_takes_a_tensor_nll_weight_as_the_layer_does():
    """A one-element tensor nll_weight, which layers and nll_loss accept, raised a TypeError here."""
    torch.manual_seed(0)
    layer, x, grad_y = bk.BatchlessNorm1d(3).double(), torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3)
    grad_y = grad_y.double()
    want = batchless_kernels.privacy.per_sample_grads(layer, x, grad_y, nll_weight=2.5)
    for weight in (torch.tensor(2.5), torch.tensor([2.5], dtype=torch.float64)):  # (1,): "f must return a scalar"
        got = batchless_kernels.privacy.per_sample_grads(layer, x, grad_y, nll_weight=weight)
        assert want.keys() == got.keys()
        for p in want:
            torch.testing.assert_close(got[p], want[p], rtol=1e-12, atol=0)
