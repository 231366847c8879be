"""fuse_for_inference: Batchless layers folded into the conv/linear before them, or turned into
ChannelAffine; same outputs, input model untouched."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import nn

import batchless_kernels as bk
from batchless_kernels.inference import Folded
from batchless_kernels.modules import _BatchlessNorm
from batchless_kernels.parametrization import param_from_std
from conftest import make_x

PARAMETRIZATIONS = ("abs", "log", "inv")


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model, data):
    """Statistics from the data (so that activations stay O(1)), then perturbed, with random affine."""
    bk.init_from_data(model, data)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchlessNorm):
                m.mean.add_(torch.randn_like(m.mean) * 0.1 * m.std)
                std = m.std.double() * torch.exp(torch.randn(m.mean.shape, dtype=torch.float64) * 0.2)
                m.std_param.copy_(param_from_std(std, m.parametrization, m.eps))
                if m.affine:
                    m.weight.normal_(1.0, 0.5)
                    m.bias.normal_(0.0, 0.5)
    return model


class Branch(nn.Module):
    """A Batchless layer outside any Sequential, on a conv's output: folded through the traced graph."""

    def __init__(self, c, **kw):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.norm = bk.BatchlessNorm2d(c, **kw)

    def forward(self, x):
        return x + self.norm(self.conv(x))


def conv_model(**kw):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), bk.BatchlessNorm2d(8, **kw), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, groups=2, bias=False, padding_mode="reflect", padding=1),
                      bk.BatchlessNorm2d(8, **kw)),
        nn.ReLU(), bk.BatchlessNorm2d(8, **kw),  # follows a ReLU: affine map
        Branch(8, **kw),
        nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2, output_padding=1), bk.BatchlessNorm2d(6, **kw),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 5), bk.BatchlessNorm1d(5, **kw),
    )


def fused_outputs_match(model, x, rtol, atol=None):
    model.eval()
    before = copy.deepcopy(model.state_dict())
    fused = bk.fuse_for_inference(model)
    with torch.no_grad():
        expected, actual = model(x), fused(x)
    assert actual.dtype == expected.dtype
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=(rtol if atol is None else atol) * scale)
    # the input model is untouched
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(isinstance(m, _BatchlessNorm) for m in fused.modules())
    return fused


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_model(parametrization, affine, channels_last):
    model = conv_model(parametrization=parametrization, affine=affine)
    data = make_x((6, 3, 7, 7)) * 2 + 1
    randomize(model, data)
    x = make_x((4, 3, 7, 7)) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fused = fused_outputs_match(model, x, rtol=1e-5)
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("ChannelAffine") == 1 and kinds.count("Folded") == 5
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[3][1], nn.Identity)
    assert fused[3][0].bias is not None and fused[3][0].bias.shape == (8,)  # created by the fold
    assert isinstance(fused[5], bk.ChannelAffine) and isinstance(fused[6].norm, nn.Identity)
    assert fused.state_dict()["0.weight"].shape == model.state_dict()["0.weight"].shape


@pytest.mark.parametrize("conv, norm, shape", [
    (nn.Conv1d(4, 6, 3), bk.BatchlessNorm1d, (3, 4, 9)),
    (nn.Conv3d(4, 6, 3, groups=2), bk.BatchlessNorm3d, (2, 4, 5, 4, 5)),
    (nn.ConvTranspose1d(4, 6, 3, groups=2, bias=False), bk.BatchlessNorm1d, (3, 4, 9)),
    (nn.ConvTranspose3d(4, 6, 2, stride=2), bk.BatchlessNorm3d, (2, 4, 3, 2, 3)),
    (nn.Linear(4, 6, bias=False), bk.BatchlessNorm1d, (5, 4)),
    (nn.Linear(4, 6), bk.BatchlessNormNd, (5, 4)),
], ids=["conv1d", "conv3d-groups", "convT1d-groups", "convT3d", "linear-nobias", "linear-Nd"])
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_each_foldable_layer(conv, norm, shape, parametrization):
    model = nn.Sequential(conv, norm(6, parametrization=parametrization))
    randomize(model, make_x(shape) * 3 - 1)
    fused = fused_outputs_match(model, make_x(shape) * 3 - 1, rtol=1e-5)
    assert isinstance(fused[1], nn.Identity) and type(fused[0]) is type(conv)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.bfloat16, 3e-2)], ids=["float64", "bfloat16"])
def test_dtypes(dtype, rtol):
    model = conv_model().to(dtype)
    randomize(model, make_x((6, 3, 7, 7), dtype=dtype))
    fused = fused_outputs_match(model, make_x((4, 3, 7, 7), dtype=dtype), rtol=rtol)
    for name, t in fused.state_dict().items():  # ChannelAffine computes in the accumulation dtype
        affine = isinstance(fused.get_submodule(name.rpartition(".")[0]), bk.ChannelAffine)
        assert t.dtype == (torch.float32 if affine and dtype == torch.bfloat16 else dtype), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_layers_far_from_zero(dtype):
    """sigma = 1e-3 at mu = 100: the shift beta - mu * gamma / sigma = -1e5 overflowed float16 (a
    ChannelAffine and a folded conv bias of -inf: outputs -inf), and in bfloat16 its 8 bits left the
    ChannelAffine's y off by up to |mu / sigma| / 256 = 390. Now the ChannelAffine computes in float32
    and the conv is not folded where its bias would overflow (with a warning)."""
    layer = bk.BatchlessNorm2d(2, dtype=dtype).eval()
    with torch.no_grad():
        layer.mean.fill_(100.0)
        layer.std_param.fill_(math.log(1e-3))
    x = (100 + 0.5 * torch.randn(3, 2, 2, 2)).to(dtype)  # y up to ~1000
    with torch.no_grad():
        expected = layer(x)
        assert expected.isfinite().all()
        scale = expected.abs().max().item()  # x * a + b cancels: a rounding of |mu * a| in float32
        torch.testing.assert_close(bk.fuse_for_inference(layer)(x), expected, rtol=1e-3, atol=1e-5 * scale)
        conv = nn.Conv2d(2, 2, 1)
        conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))  # the identity: the layer sees x
        conv.bias.zero_()
        model = nn.Sequential(conv, layer).to(dtype).eval()
        if dtype == torch.float16:
            with pytest.warns(UserWarning, match=r"'1' \(BatchlessNorm2d\) is not folded into '0'.*overflows"):
                fused = bk.fuse_for_inference(model)
            assert isinstance(fused[1], bk.ChannelAffine)
        else:
            fused = bk.fuse_for_inference(model)
        actual, expected = fused(x), model(x)
        assert actual.isfinite().all()
        # bfloat16 folds: its conv bias, -1e5, is stored to 2^-8 (docs/api.md: folding's cancellation)
        torch.testing.assert_close(actual, expected, rtol=0.02, atol=1e5 * torch.finfo(dtype).eps)


def test_not_folded_when_unsafe():
    shared = nn.Linear(3, 3)

    class MyConv(nn.Conv1d):
        def forward(self, x):
            return super().forward(x) * 2

    hooked = nn.Linear(3, 3)
    hooked.register_forward_hook(lambda m, a, y: y + 1)
    backward_hooked = nn.Linear(3, 3)
    backward_hooked.register_full_backward_hook(lambda m, gin, gout: None)
    model = nn.Sequential(
        shared, bk.BatchlessNorm1d(3), shared,  # used twice: folding would change the second use
        hooked, bk.BatchlessNorm1d(3),          # a hook sees the unnormalized output
        backward_hooked, bk.BatchlessNorm1d(3),  # a hook sees the gradient of the unnormalized output
        nn.Unflatten(1, (3, 1)), MyConv(3, 3, 1), bk.BatchlessNorm1d(3),  # its own forward
    )
    randomize(model, torch.randn(8, 3))
    fused = fused_outputs_match(model, torch.randn(5, 3), rtol=1e-5)
    assert [type(m).__name__ for m in fused] == ["Linear", "ChannelAffine", "Linear", "Linear", "ChannelAffine",
                                                 "Linear", "ChannelAffine", "Unflatten", "MyConv", "ChannelAffine"]
    assert fused[0] is fused[2]


def test_linear_on_sequences_not_folded():
    """Linear on (N, L, in) and BatchlessNorm1d(L): the channels are not the Linear's features."""
    model = nn.Sequential(nn.Linear(3, 4), bk.BatchlessNorm1d(5))
    randomize(model, torch.randn(6, 5, 3))
    fused = fused_outputs_match(model, torch.randn(2, 5, 3), rtol=1e-5)
    assert isinstance(fused[1], bk.ChannelAffine)


def test_shared_norm_is_one_affine_map():
    norm = bk.BatchlessNorm1d(3)
    model = nn.Sequential(nn.Linear(3, 3), norm, nn.Tanh(), norm)
    randomize(model, torch.randn(8, 3))
    fused = fused_outputs_match(model, torch.randn(5, 3), rtol=1e-5)
    # called twice: not folded where the model traces (a call through the emptied slot would change)
    assert isinstance(fused[1], bk.ChannelAffine) and fused[3] is fused[1]


def test_root_layer():
    layer = bk.BatchlessNorm3d(2, parametrization="inv")
    randomize(layer, torch.randn(3, 2, 2, 3, 2))
    fused = fused_outputs_match(layer, torch.randn(3, 2, 2, 3, 2), rtol=1e-6)
    assert isinstance(fused, bk.ChannelAffine)
    assert fused.state_dict().keys() == {"scale", "shift"}


class KeepsStageOutputs(nn.Module):
    """Runs its Sequential's children itself and keeps each output (UNet/FPN style): the conv's
    output is read by the layer and by the concatenation."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bk.BatchlessNorm2d(4), nn.ReLU())

    def forward(self, x):
        outputs = []
        for layer in self.features:
            x = layer(x)
            outputs.append(x)
        return torch.cat(outputs, 1)


class CallsAChildAgain(nn.Module):
    def __init__(self, again):
        super().__init__()
        self.again = again
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bk.BatchlessNorm2d(4))
        self.alias = nn.ModuleList([self.seq[1]])  # registered twice, called twice

    def forward(self, x):
        y = self.seq(x)
        return y + (self.seq[0](x) if self.again == "conv" else self.seq[1](y))


@pytest.mark.parametrize("model", [KeepsStageOutputs, lambda: CallsAChildAgain("conv"),
                                   lambda: CallsAChildAgain("norm")], ids=["kept-outputs", "conv-again", "norm-again"])
def test_sequential_pairs_are_folded_only_where_the_data_flow_allows(model):
    """The Sequential rule checks the traced data flow: a conv whose output the model also reads, or a
    child the model calls outside the Sequential, is not folded (it changed the outputs by up to 1.4)."""
    x = make_x((2, 3, 6, 6))
    fused = fused_outputs_match(randomize(model(), x), x, rtol=1e-5)
    assert not any(isinstance(m, nn.Identity) for m in fused.modules())


@pytest.mark.parametrize("parametrize", [
    lambda conv: nn.utils.parametrizations.weight_norm(conv),
    lambda conv: nn.utils.parametrizations.spectral_norm(conv),
], ids=["weight_norm", "spectral_norm"])
def test_parametrized_conv_is_not_folded(parametrize):
    """A parametrized weight is recomputed at each access: folding wrote into a copy and was lost."""
    x = make_x((2, 3, 6, 6))
    sequential = nn.Sequential(parametrize(nn.Conv2d(3, 4, 3)), bk.BatchlessNorm2d(4))
    fused = fused_outputs_match(randomize(sequential, x), x, rtol=1e-5)
    assert isinstance(fused[1], bk.ChannelAffine)
    block = BasicBlockOfBatchless()
    block.conv1 = parametrize(block.conv1)
    fused = fused_outputs_match(randomize(block, x), x, rtol=1e-5)
    assert isinstance(fused.bn1, bk.ChannelAffine) and isinstance(fused.bn2, nn.Identity)


@pytest.mark.parametrize("param_shape", [(1,), (5,)])
def test_shared_axis_layer_on_features(param_shape):
    """BatchlessNorm((1,)) shares one Gaussian over the features of (N, D) inputs: its ChannelAffine
    broadcasts like the layer (it took the 1 for a channel count and refused (4, 5) inputs)."""
    x = make_x((4, 3))
    model = randomize(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), bk.BatchlessNorm(param_shape)), x)
    fused = fused_outputs_match(model, x, rtol=1e-5)
    assert isinstance(fused[2], bk.ChannelAffine) and not fused[2].per_channel
    with pytest.raises(ValueError, match=r"expected an \(N, " + str(param_shape[0]) + r"\) input"):
        fused[2](make_x((4, 5, 2)))  # as the layer: (N, D) inputs only


def test_channel_affine():
    m = bk.ChannelAffine(torch.tensor([2.0, 3.0]), torch.tensor([1.0, -1.0]))
    x = torch.randn(3, 2, 4, 5).contiguous(memory_format=torch.channels_last)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y[:, 1], 3 * x[:, 1] - 1)
    assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\(N, 2, \*\)"):
        m(torch.randn(3, 4))
    with pytest.raises(ValueError, match="scale and shift"):
        bk.ChannelAffine(torch.ones(2), torch.ones(3))
    with pytest.raises(TypeError, match="scale and shift"):
        bk.ChannelAffine([1.0], [2.0])


def test_bad_model():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bk.fuse_for_inference(None)


class Tripled(bk.BatchlessNorm2d):
    def forward(self, x):
        return super().forward(x) * 3


def hooked(register, hook):
    def make(c):
        layer = bk.BatchlessNorm2d(c)
        getattr(layer, register)(hook)
        return layer
    return make


def instance_forward(c):
    layer = bk.BatchlessNorm2d(c)
    layer.forward = types.MethodType(lambda self, x: _BatchlessNorm.forward(self, x) * 3, layer)
    return layer


KEPT = {  # how to make the layer, why it is kept
    "forward-hook": (hooked("register_forward_hook", lambda m, args, y: y * 2), "it has forward hooks"),
    "pre-hook": (hooked("register_forward_pre_hook", lambda m, args: (args[0] + 1,)), "it has forward pre-hooks"),
    "backward-hook": (hooked("register_full_backward_hook", lambda m, gin, gout: None), "it has backward hooks"),
    "subclass": (Tripled, "it overrides _BatchlessNorm.forward"),
    "instance-forward": (instance_forward, "it overrides _BatchlessNorm.forward"),
}


@pytest.mark.parametrize("kind", KEPT)
def test_layers_with_own_behaviour_kept(kind):
    """Hooks and overridden forwards are not the affine map: such layers stay, after a conv (the fold
    path), elsewhere (the ChannelAffine path) and as the model itself; plain layers are still fused."""
    make, what = KEPT[kind]
    model = nn.Sequential(nn.Conv2d(3, 4, 1), make(4), nn.ReLU(), make(4),
                          nn.Conv2d(4, 4, 1), bk.BatchlessNorm2d(4)).double()
    randomize(model, make_x((6, 3, 5, 5), dtype=torch.float64))
    kept = type(model[1])
    with pytest.warns(UserWarning) as record:
        fused = bk.fuse_for_inference(model)
    assert sorted(str(w.message) for w in record) == [
        f"module {name!r} ({kept.__name__}) is kept as it is, not fused: {what}" for name in ("1", "3")]
    assert [type(m) for m in fused] == [nn.Conv2d, kept, nn.ReLU, kept, nn.Conv2d, Folded]
    assert torch.equal(fused[0].weight, model[0].weight)  # nothing folded into the conv before
    with pytest.warns(UserWarning, match=f"module {kept.__name__!r} .*not fused: {what}"):
        fused_layer = bk.fuse_for_inference(model[1])
    assert type(fused_layer) is kept and fused_layer is not model[1]
    x = make_x((4, 3, 5, 5), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
        h = model[:1](x)
        torch.testing.assert_close(fused_layer(h), model[1](h))


def test_sequential_with_own_forward_not_folded():
    class Taps(nn.Sequential):  # returns every child's output: the Linear's must stay unnormalized
        def forward(self, x):
            outs = []
            for m in self:
                x = m(x)
                outs.append(x)
            return torch.cat(outs, 1)

    model = Taps(nn.Linear(3, 3), bk.BatchlessNorm1d(3))
    randomize(model[1], torch.randn(8, 3))
    fused = fused_outputs_match(model, torch.randn(5, 3), rtol=1e-5)
    assert type(fused[0]) is nn.Linear and isinstance(fused[1], bk.ChannelAffine)


# ------------------------------------------------------------------------------------------------
# Folding found in the traced graph (torch.fx), outside nn.Sequential
# ------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: norm(conv(x)) pairs inside a custom forward, a residual."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride > 1 or cin != cout else None)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class SharedOutput(nn.Module):
    """The conv's output is read twice (by the norm and the residual): folding would change it."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(4, 4, 1), bk.BatchlessNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so its data flow is unknown (its forward
    could call body[0] itself): nothing is folded."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), bk.BatchlessNorm2d(4))
        self.conv, self.norm = nn.Conv2d(4, 4, 1), bk.BatchlessNorm2d(4)

    def forward(self, x):
        y = self.body(x)
        return self.norm(self.conv(y)) if bool(y.sum() > -1e9) else y


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_resnet_blocks_fold_every_layer(parametrization):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          BasicBlock(8, 8, 1), BasicBlock(8, 16, 2)).double()
    model = bk.convert_batchnorm(model, parametrization=parametrization)
    data = make_x((6, 3, 8, 8), dtype=torch.float64)
    randomize(model, data)
    fused = fused_outputs_match(model, make_x((4, 3, 8, 8), dtype=torch.float64), rtol=1e-10)
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("Folded") == 6 and "ChannelAffine" not in kinds
    assert isinstance(fused[4].downsample[1], nn.Identity) and isinstance(fused[3].bn2, nn.Identity)


def test_traced_folding_keeps_the_refusal_rules():
    x = make_x((2, 3, 5, 5))
    x4 = make_x((2, 4, 5, 5))
    fused = fused_outputs_match(randomize(SharedOutput(), x4), x4, rtol=1e-5)
    assert isinstance(fused.norm, bk.ChannelAffine)
    untraceable = randomize(Untraceable(), x)
    with pytest.warns(UserWarning, match="Untraceable does not trace with torch.fx"):
        fused = fused_outputs_match(untraceable, x, rtol=1e-5)
    assert isinstance(fused.body[1], bk.ChannelAffine) and isinstance(fused.norm, bk.ChannelAffine)
    hooked = randomize(BasicBlockOfBatchless(), x)
    hooked.conv1.register_forward_hook(lambda m, i, o: o * 2)
    fused = fused_outputs_match(hooked, x, rtol=1e-5)
    assert isinstance(fused.bn1, bk.ChannelAffine) and isinstance(fused.bn2, nn.Identity)


def BasicBlockOfBatchless():  # noqa: N802 - a model factory named like the class it converts
    return bk.convert_batchnorm(BasicBlock(3, 3, 1))


def test_torchvision_resnet18_folds_20_of_20():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed with this torch")
    model = bk.convert_batchnorm(torchvision.models.resnet18(num_classes=10)).double().eval()
    randomize(model, make_x((2, 3, 32, 32), dtype=torch.float64))
    fused = fused_outputs_match(model, make_x((2, 3, 32, 32), dtype=torch.float64), rtol=1e-9)
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("Folded") == 20 and "ChannelAffine" not in kinds


class ReadsConvWeight(nn.Module):
    """The conv's weight is also read directly (get_attr): folding would change that read."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(4, 4, 1), bk.BatchlessNorm2d(4)

    def forward(self, x):
        return self.norm(self.conv(x)) + torch.nn.functional.conv2d(x, self.conv.weight)


class TiedConvs(nn.Module):
    """Two convs share one weight: folding into one would change the other."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.norm = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), bk.BatchlessNorm2d(4)
        self.c2.weight = self.c1.weight

    def forward(self, x):
        return self.norm(self.c1(x)) + self.c2(x)


class ModeDependent(nn.Module):
    """In training mode the norm reads the dropout's output, not the conv's."""

    def __init__(self):
        super().__init__()
        self.conv, self.drop, self.norm = nn.Conv2d(4, 4, 1), nn.Dropout(0.5), bk.BatchlessNorm2d(4)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = self.drop(x)
        return self.norm(x)


@pytest.mark.parametrize("cls", [ReadsConvWeight, TiedConvs, ModeDependent])
def test_traced_folding_refuses_what_would_change_the_model(cls):
    x = make_x((2, 4, 5, 5), dtype=torch.float64)
    model = randomize(cls().double(), x)
    fused = fused_outputs_match(model, x, rtol=1e-10)
    assert isinstance(fused.norm, bk.ChannelAffine)
    torch.manual_seed(0)
    with torch.no_grad():
        trained = model.train()(x) if cls is not ModeDependent else None
    if trained is not None:  # train mode computes the same function too
        torch.testing.assert_close(fused.train()(x).detach(), trained, rtol=1e-10, atol=1e-10)


def test_linear_is_not_folded_into_a_multi_dim_layer():
    """A Linear scales the last dim; BatchlessNorm((4, 1)) normalizes dim 1 of (N, 4, L) inputs."""
    x = make_x((2, 4, 4), dtype=torch.float64)
    model = randomize(nn.Sequential(nn.Linear(4, 4), bk.BatchlessNorm((4, 1))).double(), x)
    fused = fused_outputs_match(model, x, rtol=1e-10)
    assert isinstance(fused[1], bk.ChannelAffine)


class WSConv2d(nn.Conv2d):
    """Weight standardization: inherits forward, overrides _conv_forward (which would undo a fold)."""

    def _conv_forward(self, input, weight, bias):  # noqa: A002 - nn.Conv2d's name
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(input, w, bias)


class InstanceConvForward(nn.Conv2d):
    def __init__(self, *args):
        super().__init__(*args)
        self._conv_forward = lambda input, weight, bias: nn.Conv2d._conv_forward(self, input, weight.abs(), bias)


@pytest.mark.parametrize("conv", [WSConv2d, InstanceConvForward])
def test_conv_with_its_own_conv_forward_not_folded(conv):
    """The fold was undone by the standardization: outputs off by 11."""
    x = make_x((2, 3, 6, 6), dtype=torch.float64)
    model = randomize(nn.Sequential(conv(3, 4, 3), bk.BatchlessNorm2d(4)).double(), x)
    fused = fused_outputs_match(model, x, rtol=1e-10)
    assert isinstance(fused[1], bk.ChannelAffine)


class ConvThenNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(4, 8, 1), bk.BatchlessNorm1d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("make, batched, other", [
    (lambda: nn.Sequential(nn.Conv1d(4, 8, 1), bk.BatchlessNorm1d(8)), (3, 4, 8), (4, 8)),  # unbatched conv
    (ConvThenNorm, (3, 4, 8), (4, 8)),  # the traced path
    (lambda: nn.Sequential(nn.Linear(3, 4), bk.BatchlessNorm1d(4)), (5, 3), (2, 4, 3)),  # Linear on (N, L, F)
])
def test_folded_layer_refuses_inputs_whose_channels_are_elsewhere(make, batched, other):
    """An unbatched conv's channels are dim 0: BatchlessNorm1d normalized dim 1 of its (C, L) output,
    and the fold scaled the conv's channels instead (outputs off by 3.6)."""
    model = randomize(make().double(), make_x(batched, dtype=torch.float64))
    fused = fused_outputs_match(model, make_x(batched, dtype=torch.float64), rtol=1e-10)
    assert not any(isinstance(m, bk.ChannelAffine) for m in fused.modules())
    x = make_x(other, dtype=torch.float64)
    model(x)  # the unfused model takes these inputs
    with pytest.raises(ValueError, match=r"folded by fuse_for_inference .* for \d-D inputs"):
        fused(x)


class SkipWithBatchRenorm(nn.Module):
    """Keeps the conv's output; the BatchRenorm's training forward does not trace with torch.fx."""

    def __init__(self, extra):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bk.BatchlessNorm2d(4))
        self.extra = extra
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), bk.BatchlessNorm2d(4))

    def forward(self, x):
        h = self.seq[0](x)
        return self.head(self.extra(self.seq[1](h) + h))


@pytest.mark.parametrize("extra", [lambda: bk.BatchRenorm2d(4), lambda: Untraceable2()])
def test_a_submodule_that_does_not_trace_keeps_the_data_flow_check(extra):
    """With a BatchRenorm anywhere the whole model did not trace, and the Sequential rule folded seq[1]
    although the model keeps seq[0]'s output (off by 1.0)."""
    x = make_x((2, 3, 5, 5), dtype=torch.float64)
    model = randomize(SkipWithBatchRenorm(extra()).double(), x)
    fused = fused_outputs_match(model, x, rtol=1e-10)
    assert isinstance(fused.seq[1], bk.ChannelAffine)
    assert isinstance(fused.head[1], nn.Identity)  # the rest of the model still folds


class Untraceable2(nn.Module):
    def forward(self, x):
        return x * 2 if bool(x.sum() > 0) else x


def test_fused_model_scripts():
    """torch.jit.script, how fused models are often deployed: Folded's message built a tuple of the
    input's shape, which TorchScript cannot compile (it scripted when the layer became nn.Identity)."""
    x = make_x((2, 3, 6, 6), dtype=torch.float64)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), bk.BatchlessNorm2d(4), nn.ReLU(),
                                    bk.BatchlessNorm2d(4)).double(), x)
    fused = fused_outputs_match(model, x, rtol=1e-10)
    scripted = torch.jit.script(fused)
    torch.testing.assert_close(scripted(x), fused(x), rtol=0, atol=0)
    with pytest.raises(torch.jit.Error, match=r"expected an \(N, 4, \*\) input"):
        torch.jit.script(fused[3])(torch.randn(2, 5, 4, 4, dtype=torch.float64))
    # The unfused layers say so, in a model too (TorchScript's compiler failed on a type hint, an import).
    for layer in (bk.BatchlessNorm2d(4), bk.BatchlessNorm(4), bk.BatchRenorm2d(4)):
        with pytest.raises(RuntimeError, match=rf"{type(layer).__name__} cannot be compiled by torch.jit.script"
                                               r".*fuse_for_inference"):
            torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), layer))


def test_fused_model_symbolic_traces():
    """torch.fx.symbolic_trace of a fused model (FX quantization, feature extraction): Folded's rank check
    and ChannelAffine's input checks branched on a Proxy (TraceError, TypeError). Each is one node now,
    which gives the fused outputs and still checks its input when the graph runs."""
    x = make_x((2, 3, 6, 6), dtype=torch.float64)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), bk.BatchlessNorm2d(4), nn.ReLU(),
                                    bk.BatchlessNorm2d(4)).double(), x)
    fused = fused_outputs_match(model, x, rtol=1e-10)
    assert isinstance(fused[1], Folded) and isinstance(fused[3], bk.ChannelAffine)
    traced = torch.fx.symbolic_trace(fused)
    torch.testing.assert_close(traced(x), fused(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"folded by fuse_for_inference .* for 4-D inputs"):
        traced(x[0])
    with pytest.raises(ValueError, match=r"expected an \(N, 4, \*\) input"):
        torch.fx.symbolic_trace(fused[3])(torch.randn(2, 5, 4, 4, dtype=torch.float64))


class Gate(nn.Module):
    """Data-dependent: does not trace; it calls its conv, which the model calls too."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x) if bool(x.mean() > -10) else x


class CallsIntoAnUntracedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.bn = Gate(), bk.BatchlessNorm2d(3)

    def forward(self, x):
        return self.bn(self.gate.conv(x)) + self.gate(x)


def test_a_conv_inside_a_module_that_does_not_trace_is_not_folded():
    """The untraced gate's own call of gate.conv was invisible: the conv looked called once, the fold also
    rescaled the gate's output (off by 0.65)."""
    x = make_x((2, 3, 4, 4), dtype=torch.float64)
    model = randomize(CallsIntoAnUntracedModule().double(), x)
    fused = fused_outputs_match(model, x, rtol=1e-10)
    assert isinstance(fused.bn, bk.ChannelAffine)


def test_channel_affine_refuses_what_the_layer_refuses():
    """An int input came back truncated (3 * 0.5 -> 1) where the unfused layer raises TypeError; a list
    raised AttributeError."""
    affine = bk.ChannelAffine(torch.full((2,), 0.5), torch.zeros(2))
    with pytest.raises(TypeError, match="input must have a floating dtype, got torch.int64"):
        affine(torch.full((1, 2), 3))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        affine([1.0, 2.0])
    with pytest.raises(torch.jit.Error, match="input must have a floating dtype"):  # TorchScript's own error type
        torch.jit.script(affine)(torch.full((1, 2), 3))
    with pytest.raises(TypeError, match="scale and shift must be tensors, got list and Tensor"):
        bk.ChannelAffine([1.0], torch.zeros(1))
    # a complex scale lost its imaginary part (torch's cast warning only); bool and int: not an affine map's
    for scale in (torch.tensor([1 + 2j, 3]), torch.tensor([True, False]), torch.tensor([1, 2])):
        with pytest.raises(TypeError, match=rf"scale and shift must be floating tensors, got {scale.dtype}"):
            bk.ChannelAffine(scale, torch.zeros(2, dtype=scale.dtype))


def test_a_compiled_module_is_refused_with_the_way_out():
    """It did not trace with fx: every layer became a ChannelAffine, with a warning that blamed
    data-dependent control flow."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bk.BatchlessNorm2d(4)).eval()
    with pytest.raises(TypeError, match=r"torch.compile'd module: fuse the module it wraps \(model._orig_mod\)"):
        bk.fuse_for_inference(torch.compile(model))


def test_a_model_on_the_meta_device_fuses_to_the_same_shapes():
    """Folding checked that the folded weights fit their dtype by reading them: on the meta device,
    torch's "Tensor.item() cannot be called on meta tensors"."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bk.BatchlessNorm2d(4), nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
                          bk.BatchlessNorm1d(5)).to("meta")
    fused = bk.fuse_for_inference(model)
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[4], nn.Identity)
    assert all(p.is_meta for p in fused.parameters())
    assert fused(torch.empty(2, 3, 5, 5, device="meta")).shape == (2, 5)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, 1), bk.BatchlessNorm1d(4)),  # would have been folded
    lambda: nn.Sequential(nn.ReLU(), bk.BatchlessNorm1d(4)),  # a ChannelAffine
    lambda: nn.Sequential(nn.ReLU(), bk.BatchlessNorm2d(4)),
], ids=["folded", "affine-1d", "affine-2d"])
def test_fused_model_refuses_the_ranks_the_layer_refused(make):
    """A BatchlessNorm1d after a Conv2d refused the conv's 4-D output, but the folded stand-in ran it, and
    a ChannelAffine took any rank: the fused model's function changed from an error to an output."""
    model = make().eval()
    fused = bk.fuse_for_inference(model)
    channels = 3 if isinstance(model[0], nn.Conv2d) else 4
    for shape in ((2, channels, 5, 5), (2, channels, 5), (2, channels)):
        try:
            want = model(torch.randn(shape))
        except ValueError as error:  # the layer's refusal
            with pytest.raises(ValueError, match=str(error).split(" (got")[0]):
                fused(torch.randn(shape))
        except RuntimeError:  # the conv's own (an unbatched input of other channels), before the layer
            continue
        else:
            x = torch.randn(shape)
            torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)
            assert want.shape == fused(x).shape
    scripted = torch.jit.script(fused)  # the rank rule compiles
    with pytest.raises(Exception, match="input"):
        scripted(torch.randn(2, channels, 5, 5, 5))
