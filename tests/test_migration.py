"""convert_batchnorm: a BN / SyncBN / Batch Renormalization network becomes a Batchless one computing
the BN network's eval-mode function (docs/method.md, "Migrating")."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import batchless_kernels as bk
from conftest import make_x

PARAMETRIZATIONS = ("abs", "log", "inv")


pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a (possibly downsampling) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet(dtype=torch.float32):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        Block(8, 8, 1), Block(8, 12, 2), Block(12, 12, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10), nn.BatchNorm1d(10),
    ).to(dtype)


def trained_stats(model, shape, dtype=torch.float32, steps=4):
    """Running statistics from training-mode forwards, and non-trivial affine parameters."""
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average: the statistics of all the batches
                if m.affine:
                    m.weight.copy_(torch.randn_like(m.weight) * 0.3 + 1)
                    m.bias.copy_(torch.randn_like(m.bias) * 0.3)
        for _ in range(steps):
            model(make_x(shape, dtype=dtype) * 2 + 1)
    return model.eval()


def max_rel_diff(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["float32", "float64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_resnet_eval_function_kept(parametrization, dtype, tol, channels_last):
    bn_model = trained_stats(resnet(dtype), (16, 3, 12, 12), dtype)
    converted = bk.convert_batchnorm(copy.deepcopy(bn_model), parametrization=parametrization)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    assert sum(isinstance(m, bk.BatchlessNorm2d) for m in converted.modules()) == 8
    assert isinstance(converted[-1], bk.BatchlessNorm1d) and not converted.training
    x = make_x((5, 3, 12, 12), dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = bn_model(x)
        assert max_rel_diff(converted(x), expected) <= tol
        # batchless layers compute the same function in training mode, BN layers do not
        assert max_rel_diff(converted.train()(x), expected) <= tol
        assert max_rel_diff(bn_model.train()(x), expected) > 1e-2


BN_CASES = [
    (nn.BatchNorm1d, bk.BatchlessNorm1d, (6, 5)),
    (nn.BatchNorm1d, bk.BatchlessNorm1d, (6, 5, 7)),
    (nn.BatchNorm2d, bk.BatchlessNorm2d, (4, 5, 3, 5)),
    (nn.BatchNorm3d, bk.BatchlessNorm3d, (2, 5, 3, 2, 3)),
    (bk.BatchRenorm1d, bk.BatchlessNorm1d, (6, 5)),
    (bk.BatchRenorm2d, bk.BatchlessNorm2d, (4, 5, 3, 5)),
    (bk.BatchRenorm3d, bk.BatchlessNorm3d, (2, 5, 3, 2, 3)),
    (nn.SyncBatchNorm, bk.BatchlessNormNd, (6, 5)),
    (nn.SyncBatchNorm, bk.BatchlessNormNd, (4, 5, 3, 5)),
    (nn.SyncBatchNorm, bk.BatchlessNormNd, (2, 5, 3, 2, 3)),
]


@pytest.mark.parametrize("source, target, shape", BN_CASES,
                         ids=[f"{s.__name__}-{len(sh)}d" for s, _, sh in BN_CASES])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_each_layer_kind(source, target, shape, parametrization, affine):
    bn = source(5, eps=1e-3, affine=affine)
    trained_stats(bn, shape)
    bn.train()  # the training flag is kept
    new = bk.convert_batchnorm(bn, parametrization=parametrization, nll_weight=0.5, gauge=False)
    assert type(new) is target and new is not bn
    assert new.training and new.eps == 1e-3 and new.affine == affine
    assert (new.parametrization, new.nll_weight, new.gauge) == (parametrization, 0.5, False)
    if hasattr(bn, "running_std"):  # BatchRenorm
        mean, std = bn.running_mean, bn.running_std
    else:
        mean, std = bn.running_mean, (bn.running_var + bn.eps).sqrt()
    torch.testing.assert_close(new.mean.detach(), mean)
    torch.testing.assert_close(new.std, std, rtol=1e-6, atol=0)
    if affine:
        torch.testing.assert_close(new.weight.detach(), bn.weight.detach())
        torch.testing.assert_close(new.bias.detach(), bn.bias.detach())
    else:
        assert new.weight is None and new.bias is None
    x = make_x(shape) * 2 + 1
    with torch.no_grad():
        assert max_rel_diff(new(x), bn.eval()(x)) <= 1e-5


def test_sync_batchnorm_layer_accepts_every_rank():
    layer = bk.convert_batchnorm(nn.SyncBatchNorm(3))
    for shape in [(2, 3), (2, 3, 4), (2, 3, 2, 2), (2, 3, 2, 2, 2), (2, 3, 1, 2, 1, 2)]:
        assert layer(torch.randn(shape)).shape == shape
    with pytest.raises(ValueError, match="at least 2D"):
        layer(torch.randn(3))
    y = layer(torch.randn(4, 3, 2))
    assert layer.nll is not None and y.requires_grad
    assert bk.nll_loss(layer).requires_grad  # nll_loss and every isinstance check see it


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_dtype_kept(dtype):
    model = nn.Sequential(nn.Linear(4, 3).to(dtype), nn.BatchNorm1d(3, dtype=dtype))
    trained_stats(model, (8, 4), dtype)
    converted = bk.convert_batchnorm(copy.deepcopy(model))
    assert all(p.dtype == dtype for p in converted.parameters())
    x = make_x((5, 4), dtype=dtype)
    with torch.no_grad():
        assert max_rel_diff(converted(x), model(x)) <= (1e-12 if dtype == torch.float64 else 2e-2)


def test_meta_device_kept():
    layer = bk.convert_batchnorm(nn.BatchNorm2d(3, device="meta"))
    assert all(p.device.type == "meta" for p in layer.parameters())


def test_requires_grad_and_sharing_kept():
    shared = nn.BatchNorm1d(3)
    shared.weight.requires_grad_(False)
    model = nn.Sequential(nn.Linear(3, 3), shared, nn.Sequential(shared))
    model = bk.convert_batchnorm(model)
    assert model[1] is model[2][0]
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    assert model[1].mean.requires_grad and model[1].std_param.requires_grad


def test_without_running_stats_warns_and_starts_standard():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.warns(UserWarning, match="init_from_data"):
        converted = bk.convert_batchnorm(model, parametrization="inv")
    layer = converted[1]
    torch.testing.assert_close(layer.mean.detach(), torch.zeros(3))
    torch.testing.assert_close(layer.std, torch.ones(3))
    # the module stays a BN-free model that trains: the NLL reaches mean and std_param
    loss = converted(torch.randn(4, 2, 3, 3)).square().mean() + bk.nll_loss(converted)
    loss.backward()
    assert layer.mean.grad.abs().sum() > 0 and layer.std_param.grad.abs().sum() > 0


def test_a_bn_eps_the_layers_refuse_names_the_way_out():
    """BatchNorm accepts eps=0, the layers do not: the error now says that eps= sets the new layers' own
    (the way out, exact: sigma keeps the BN's eps)."""
    bn = nn.BatchNorm1d(4, eps=0.0).eval()  # (torch refuses eps=0 in training)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    with pytest.raises(ValueError, match=r"eps must be a positive finite float, got 0.0 \(the eps of the BN layer; "
                                         r"convert_batchnorm\(..., eps=1e-5\)"):
        bk.convert_batchnorm(bn)
    new = bk.convert_batchnorm(bn, eps=1e-5)
    x = torch.randn(8, 4)
    # BN's eval function by hand: torch 2.11's F.batch_norm refuses eps=0 in eval mode too
    want = (x.double() - bn.running_mean.double()) / bn.running_var.double().sqrt() * bn.weight.double() \
        + bn.bias.double()
    assert max_rel_diff(new(x).double(), want) <= 1e-5


def test_eps_override_keeps_function():
    bn = trained_stats(nn.BatchNorm1d(4, eps=1e-5), (16, 4))
    new = bk.convert_batchnorm(bn, eps=1e-3, parametrization="abs")
    assert new.eps == 1e-3
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert max_rel_diff(new(x), bn(x)) <= 1e-5  # sigma = sqrt(var + the BN's eps) still


def test_lazy_layers():
    lazy = nn.Sequential(nn.LazyLinear(3), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="lazy"):
        bk.convert_batchnorm(lazy)
    lazy(torch.randn(4, 5))  # materialized: converts
    assert isinstance(bk.convert_batchnorm(lazy)[1], bk.BatchlessNorm1d)


def test_model_without_batchnorm_unchanged():
    model = nn.Sequential(nn.Linear(2, 2), bk.BatchlessNorm1d(2))
    assert bk.convert_batchnorm(model) is model and isinstance(model[1], bk.BatchlessNorm1d)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"parametrization": "exp"}, ValueError, "parametrization"),
    ({"nll_weight": -1.0}, ValueError, "nll_weight"),
    ({"backend": "gpu"}, ValueError, "backend"),
    ({"momentum": 0.1}, TypeError, "momentum"),
    ({"num_features": 3}, TypeError, "num_features"),
])
def test_bad_layer_kwargs(kwargs, error, match):
    with pytest.raises(error, match=match):
        bk.convert_batchnorm(nn.Sequential(nn.Linear(2, 2)), **kwargs)


def test_failing_layer_named_and_nothing_converted():
    """Every layer converts before any is replaced: a dead channel (running_var 0, sigma = sqrt(eps)
    below the 'abs' parametrization's eps) left a half-converted model and named no layer."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[4].running_var[0] = 0.0
    with pytest.raises(ValueError, match=r"module '4' \(BatchNorm2d\): std must exceed eps=0.01.*no layer was converted"):
        bk.convert_batchnorm(model, parametrization="abs", eps=0.01)
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_running_mean_refused(value):
    """A running_var of NaN was refused, a running_mean of inf became the layer's mean silently."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_mean[2] = value
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm2d\): running_mean is not finite at channels \[2\]"
                                         r".*no layer was converted"):
        bk.convert_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d


def test_bad_module():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        bk.convert_batchnorm(lambda x: x)


def test_bn_registered_twice_becomes_one_layer():
    """named_children() lists a module once per parent: every slot must still be converted."""
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn, nn.Sequential(bn))
    trained_stats(model, (8, 3, 4, 4))
    x = make_x((5, 3, 4, 4)) * 2 + 1
    with torch.no_grad():
        expected = model(x)
        converted = bk.convert_batchnorm(model)
        assert type(converted[0]) is bk.BatchlessNorm2d
        assert converted[0] is converted[2] is converted[3][0]
        torch.testing.assert_close(converted(x), expected)


def subclasses(base):
    class Act(base):  # a BN with an activation in its forward, as timm's BatchNormAct2d
        def forward(self, x):
            return torch.relu(super().forward(x))

    class Tagged(base):  # only adds a method: converted
        def tag(self):
            return "tagged"

    return Act, Tagged


@pytest.mark.parametrize("base, target", [
    (nn.BatchNorm2d, bk.BatchlessNorm2d),
    (nn.SyncBatchNorm, bk.BatchlessNormNd),
    (bk.BatchRenorm2d, bk.BatchlessNorm2d),
], ids=["BatchNorm2d", "SyncBatchNorm", "BatchRenorm2d"])
def test_bn_subclass_with_own_forward_kept(base, target):
    Act, Tagged = subclasses(base)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), Tagged(4), nn.Sequential(Act(4)))
    trained_stats(model, (8, 2, 3, 3))
    x = make_x((5, 2, 3, 3)) * 2 + 1
    with torch.no_grad():
        expected = model(x)
        act = model[2][0]
        warned = rf"'2\.0' \(Act\) is not converted: it overrides {base.__name__}\.forward"
        with pytest.warns(UserWarning, match=warned):
            converted = bk.convert_batchnorm(model)
        assert converted[2][0] is act and type(converted[1]) is target
        y = converted(x)
        torch.testing.assert_close(y, expected)
        assert y.min() == 0  # the ReLU of Act's forward is kept
    with pytest.warns(UserWarning, match=r"'Act' \(Act\) is not converted"):
        assert bk.convert_batchnorm(act) is act  # a root layer likewise


@pytest.mark.parametrize("install, what", [
    (lambda m: m.register_forward_hook(lambda mod, args, y: y * 2), "forward hooks"),
    (lambda m: m.register_forward_pre_hook(lambda mod, args: (args[0] + 1,)), "forward pre-hooks"),
    (lambda m: m.register_full_backward_hook(lambda mod, gin, gout: None), "backward hooks"),
    (lambda m: m.register_full_backward_pre_hook(lambda mod, gout: None), "backward pre-hooks"),
    (lambda m: setattr(m, "forward", lambda x: nn.BatchNorm1d.forward(m, x) * 3), r"overrides BatchNorm1d\.forward"),
], ids=["forward-hook", "forward-pre-hook", "backward-hook", "backward-pre-hook", "instance-forward"])
def test_bn_with_hooks_kept(install, what):
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(bn), nn.BatchNorm1d(3))
    trained_stats(model, (8, 3))
    install(bn)
    x = make_x((5, 3)) * 2 + 1
    expected = model(x)
    with pytest.warns(UserWarning, match=rf"'1\.0' \(BatchNorm1d\) is not converted: .*{what}"):
        bk.convert_batchnorm(model)
    assert model[1][0] is bn and type(model[2]) is bk.BatchlessNorm1d
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_layer_without_tensors_takes_its_neighbours_device_and_dtype(device, dtype):
    """A BN with affine=False and track_running_stats=False holds no tensor: its layer was made in the
    default float32 on the CPU, beside a model of another dtype or device."""
    model = nn.Sequential(nn.Conv2d(2, 3, 1, device=device, dtype=dtype),
                          nn.Sequential(nn.BatchNorm2d(3, affine=False, track_running_stats=False)))
    with pytest.warns(UserWarning, match="no running statistics"):
        layer = bk.convert_batchnorm(model)[1][0]
    assert {(p.device.type, p.dtype) for p in layer.parameters()} == {(device, dtype)}


def test_layer_without_tensors_skips_non_floating_neighbours():
    """The parent's first tensor, a bool mask, gave the new layer dtype=torch.bool: TypeError."""
    block = nn.Module()
    block.register_buffer("mask", torch.ones(3, dtype=torch.bool))
    block.bn = nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    model = nn.Sequential(nn.Linear(3, 3, dtype=torch.float64), block)
    with pytest.warns(UserWarning, match="no running statistics"):
        bk.convert_batchnorm(model)
    assert block.bn.mean.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_16_bit_conversion_keeps_the_function_as_bn_does(dtype, parametrization):
    """In 16 bits log sigma = 4.6 (sigma 100) is stored with an error of up to 0.016, 1.6% of 1 / sigma:
    the output was off by 0.09 where BN's own 16-bit rounding gives 0.016. The weight now makes up for
    the stored sigma: the error against the float64 function stays within twice BN's in the same dtype."""
    bn = nn.BatchNorm2d(256)
    with torch.no_grad():
        bn.running_var.copy_(torch.logspace(-2, 2, 256) ** 2)  # sigma 0.01 to 100: float16 holds var
        bn.running_mean.normal_()
        bn.weight.normal_(1, 0.3)
        bn.bias.normal_()
    bn.eval()
    x = (torch.randn(4, 256, 3, 3, dtype=torch.float64) * bn.running_var.double().sqrt().view(1, -1, 1, 1)
         + bn.running_mean.double().view(1, -1, 1, 1)).to(dtype).double()  # what both layers read
    with torch.no_grad():
        exact = copy.deepcopy(bn).to(dtype).double()(x)  # BN's 16-bit parameters, in float64
        bn_error = (copy.deepcopy(bn).to(dtype)(x.to(dtype)).double() - exact).abs().max()
        layer = bk.convert_batchnorm(copy.deepcopy(bn).to(dtype), parametrization=parametrization)
        error = (layer(x.to(dtype)).double() - exact).abs().max()
    assert error <= 2 * bn_error, (error, bn_error)


class AnyRankBN(nn.BatchNorm2d):
    def _check_input_dim(self, input):
        pass


class RanklessBN(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, input):
        pass


@pytest.mark.parametrize("cls, why", [
    (AnyRankBN, r"overrides BatchNorm2d\._check_input_dim"),
    (RanklessBN, "subclasses _BatchNorm but none of BatchNorm1d/2d/3d"),
])
def test_bn_accepting_other_ranks_kept(cls, why):
    """A BN subclass whose _check_input_dim accepts (N, C, L) was converted to BatchlessNorm2d, which
    then refused the model's inputs; a direct _BatchNorm subclass was left in place without a word."""
    model = nn.Sequential(cls(4)).eval()
    x = torch.randn(2, 4, 9)
    expected = model(x)
    with pytest.warns(UserWarning, match=why):
        bk.convert_batchnorm(model)
    assert type(model[0]) is cls
    torch.testing.assert_close(model(x), expected)


def test_parametrized_bn_kept():
    """A BN whose weight is parametrized became a layer with a plain weight: the constraint was lost."""
    bn = nn.BatchNorm1d(3)
    torch.nn.utils.parametrize.register_parametrization(bn, "weight", nn.Softplus())
    model = nn.Sequential(bn)
    with pytest.warns(UserWarning, match=r"parametrized \(torch\.nn\.utils\.parametrize\)"):
        bk.convert_batchnorm(model)
    assert model[0] is bn


def test_warnings_point_at_the_caller():
    """The warnings came from the recursion inside migration.py, not from the line that called it."""
    model = nn.Sequential(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), nn.BatchNorm1d(3))
    model[1].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning) as record:
        bk.convert_batchnorm(model)
    assert len(record) == 2 and {w.filename for w in record} == {__file__}
