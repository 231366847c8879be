"""init_from_data: each Batchless layer's mean and std become the statistics of the input it sees, in
dependency order, streamed over batches; preserve_function keeps the model's function."""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from torch import nn

import batchless_kernels as bk
from batchless_kernels.modules import _BatchlessNorm
from conftest import make_x

PARAMETRIZATIONS = ("abs", "log", "inv")


pytestmark = pytest.mark.usefixtures("one_thread")


class Residual(nn.Module):
    def __init__(self, c, parametrization):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), bk.BatchlessNorm2d(c, parametrization=parametrization),
                                  nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.norm = bk.BatchlessNorm2d(c, parametrization=parametrization)

    def forward(self, x):
        return self.norm(x + self.body(x))


def cnn(parametrization="log", affine=True):
    kw = {"parametrization": parametrization, "affine": affine}
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), bk.BatchlessNorm2d(6, **kw), nn.ReLU(),
        Residual(6, parametrization), nn.Dropout(0.5),
        nn.Conv2d(6, 5, 3, stride=2), bk.BatchlessNorm2d(5, **kw), nn.Tanh(),
        nn.Flatten(), nn.Linear(5 * 3 * 3, 7), bk.BatchlessNorm1d(7, **kw),
    )


def batchless_layers(model):
    return [m for m in model.modules() if isinstance(m, _BatchlessNorm)]


def input_stats(model, batches):
    """Per layer: (mean, std) of its input over every batch, from the concatenated inputs, in float64."""
    inputs = {m: [] for m in batchless_layers(model)}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs[m].append(a[0].double())) for m in inputs]
    with torch.no_grad():
        model.eval()
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    out = {}
    for m, xs in inputs.items():
        x = torch.cat([t.movedim(1, -1).reshape(-1, t.shape[1]) for t in xs])
        out[m] = (x.mean(0), (x.var(0, unbiased=False) + m.eps).sqrt())
    return out


def data(batches=3, n=8, scale=3.0, offset=2.0):
    """Inputs far from standard, of different batch sizes."""
    return [make_x((n + i, 3, 9, 9)) * scale + offset for i in range(batches)]


def assert_params_are_input_stats(model, batches, rtol=1e-5):
    stats = input_stats(model, batches)
    for i, (m, (mean, std)) in enumerate(stats.items()):
        torch.testing.assert_close(m.mean.detach().double(), mean, rtol=rtol, atol=rtol * std.max().item(),
                                   msg=lambda s: f"layer {i} mean: {s}")
        torch.testing.assert_close(m.std.double(), std, rtol=rtol, atol=0, msg=lambda s: f"layer {i} std: {s}")


def as_form(batches, form):
    if form == "tensor":
        return batches[0]
    if form == "list":
        return batches
    if form == "tuples":
        return [(x, torch.zeros(len(x))) for x in batches]
    if form == "generator":
        return (x for x in batches)
    if form == "dataloader":
        dataset = torch.utils.data.TensorDataset(torch.cat(batches), torch.zeros(sum(map(len, batches))))
        return torch.utils.data.DataLoader(dataset, batch_size=len(batches[0]))
    raise ValueError(form)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("form", ["tensor", "list", "tuples", "generator", "dataloader"])
def test_layers_get_their_input_statistics_in_dependency_order(parametrization, form):
    """After init, each layer's mean/std are the statistics of its input *in the initialized model*:
    only true if every layer was done after the layers that feed it."""
    model = cnn(parametrization)
    batches = data()
    init_batches = [batches[0]] if form == "tensor" else batches
    if form == "dataloader":
        init_batches = [torch.cat(batches)[i:i + 8] for i in range(0, sum(map(len, batches)), 8)]
    before = copy.deepcopy(model)
    assert bk.init_from_data(model, as_form(batches, form)) is model
    assert_params_are_input_stats(model, init_batches)
    # weight and bias untouched; the statistics are not those of the uninitialized model
    for old, new in zip(batchless_layers(before), batchless_layers(model)):
        torch.testing.assert_close(new.weight, old.weight)
        torch.testing.assert_close(new.bias, old.bias)
    first_changed = [not torch.allclose(m.mean, s[0].float(), rtol=1e-3, atol=1e-3)
                     for m, s in zip(batchless_layers(model), input_stats(before, init_batches).values())]
    assert first_changed[0] is False and any(first_changed[1:])


def test_normalized_outputs_and_zero_nll_after_init():
    model = cnn()
    x = data(batches=1, n=32)[0]
    bk.init_from_data(model, x)
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, a, y: outputs.__setitem__(m, y)) for m in batchless_layers(model)]
    model.eval()
    model(x)
    for h in hooks:
        h.remove()
    for y in outputs.values():
        y = y.detach().movedim(1, -1).reshape(-1, y.shape[1]).double()
        torch.testing.assert_close(y.mean(0), torch.zeros(y.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(y.shape[1], dtype=torch.float64),
                                   atol=1e-3, rtol=0)
    assert abs(bk.nll_loss(model).item()) < 1e-3  # the gauge's zero: the learned Gaussians fit


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_preserve_function(parametrization, channels_last):
    model = cnn(parametrization)
    for m in batchless_layers(model):  # a non-trivial starting point
        with torch.no_grad():
            m.mean.normal_()
            m.std_param.copy_(bk.parametrization.param_from_std(torch.rand(m.num_features) + 0.5,
                                                                parametrization, m.eps))
            m.weight.normal_()
            m.bias.normal_()
    batches = data()
    if channels_last:
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    probe = data(batches=1)[0]
    model.eval()
    expected = model(probe)
    calls = count_calls(model[0])
    bk.init_from_data(model, batches, preserve_function=True)
    assert calls() == len(batches)  # one pass: the function never changes, nor any layer's input
    torch.testing.assert_close(model(probe), expected, rtol=1e-5, atol=1e-5)
    assert_params_are_input_stats(model, batches)


def test_preserve_function_needs_affine():
    with pytest.raises(ValueError, match="affine"):
        bk.init_from_data(cnn(affine=False), data(1)[0], preserve_function=True)


def count_calls(module):
    n = [0]
    module.register_forward_pre_hook(lambda m, a: n.__setitem__(0, n[0] + 1))
    return lambda: n[0]


def test_one_pass_per_layer_and_partial_forwards():
    model = cnn()
    first, last = count_calls(model[0]), count_calls(model[-2])
    batches = data(batches=2)
    bk.init_from_data(model, batches)
    layers = len(batchless_layers(model))
    assert first() == layers * len(batches)
    # the Linear before the last layer runs in the last two passes only: a forward stops at the
    # first uninitialized layer after the target
    assert last() == 2 * len(batches)


@pytest.mark.parametrize("max_batches", [1, 2])
def test_max_batches(max_batches):
    model = cnn()
    batches = data(batches=3)
    bk.init_from_data(model, batches, max_batches=max_batches)
    assert_params_are_input_stats(model, batches[:max_batches])


def test_streaming_is_exact_far_from_zero():
    """Chan's merge in float64: a large offset and tiny spread lose nothing across batches."""
    layer = bk.BatchlessNorm1d(4)
    batches = [torch.randn(n, 4, dtype=torch.float64) * 1e-2 + 1e4 for n in (3, 17, 1, 40)]
    bk.init_from_data(layer.double(), batches)
    x = torch.cat(batches)
    torch.testing.assert_close(layer.mean.detach(), x.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(layer.std, (x.var(0, unbiased=False) + layer.eps).sqrt(), rtol=1e-9, atol=0)


def test_training_flags_restored_and_train_mode():
    model = cnn()
    model.train()
    model[3].eval()
    flags = [m.training for m in model.modules()]
    bk.init_from_data(model, data(1)[0])
    assert [m.training for m in model.modules()] == flags
    # dropout is off by default (eval mode) and on with train_mode=True: different statistics after it
    a, b = cnn(), cnn()
    b.load_state_dict(a.state_dict())
    x = data(1)[0]
    bk.init_from_data(a, x)
    bk.init_from_data(b, x, train_mode=True)
    assert torch.allclose(a[1].mean, b[1].mean)  # before the dropout
    assert not torch.allclose(a[6].std, b[6].std)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes (add_note) came with Python 3.11")
def test_model_error_names_the_batch():
    """A single (input, target) pair iterates as two batches: the targets went through the model and
    its own error (here the conv's) named no argument; the note names the batch and the way out."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bk.BatchlessNorm2d(4))
    x, target = torch.randn(2, 3, 5, 5), torch.tensor([0, 1])
    with pytest.raises(RuntimeError) as info:
        bk.init_from_data(model, (x, target))
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert "data's batch 1, an input of shape (2,) and dtype torch.int64" in note, note
    assert "pass a single (input, target) pair as [(input, target)]" in note
    before = model[1].mean.clone()
    bk.init_from_data(model, [(x, target)])  # the pair as one batch
    assert not torch.equal(model[1].mean, before)


def test_model_without_batchless_layers():
    model = nn.Linear(2, 2)
    assert bk.init_from_data(model, torch.randn(3, 2)) is model


def test_unreached_layer_named():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = bk.BatchlessNorm1d(2)
            self.unused = bk.BatchlessNorm1d(2)

        def forward(self, x):
            return self.used(x)

    model = Model()
    with pytest.raises(ValueError, match="unused"):
        bk.init_from_data(model, torch.randn(3, 2))
    with pytest.raises(ValueError, match="unused"):
        bk.init_from_data(model, torch.randn(3, 2), preserve_function=True)


@pytest.mark.parametrize("preserve_function", [False, True])
@pytest.mark.parametrize("fault", ["nan", "inf", "std-below-eps"])
def test_failure_leaves_the_model_unchanged_and_names_the_layer(preserve_function, fault):
    """The statistics are checked before any write, and a failing pass restores earlier layers
    too: a NaN input left mean, weight and bias NaN, with no layer named."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bk.BatchlessNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          bk.BatchlessNorm2d(4, parametrization="abs", eps=2.0, init_std=3.0))
    x = make_x((8, 3, 6, 6))
    with torch.no_grad():
        model[3].weight.zero_()
        model[3].bias.fill_(1.0)  # the second layer's input: constant channels, std sqrt(0 + eps) < eps
        if fault != "std-below-eps":
            model[3].bias[2] = float(fault)
    before = copy.deepcopy(model.state_dict())
    match = "layer '4': " + ("std must exceed eps=2.0" if fault == "std-below-eps" else "its input holds non-finite")
    with pytest.raises(ValueError, match=match):
        bk.init_from_data(model, x, preserve_function=preserve_function)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True, msg=k)


def test_layer_called_with_a_keyword():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = bk.BatchlessNorm1d(3)

        def forward(self, x):
            return self.norm(input=x)

    x = make_x((16, 3)) * 2 + 5
    model = bk.init_from_data(Model(), x)
    torch.testing.assert_close(model.norm.mean, x.mean(0))


@pytest.mark.parametrize("bad, error, match", [
    ([], ValueError, "data is empty"),
    ((x for x in []), ValueError, "data is empty"),
    (3, TypeError, "data must be"),
    ([{"x": torch.randn(2, 2)}], TypeError, "batch 0"),
    ([("label", torch.randn(2, 2))], TypeError, "batch 0"),
])
def test_bad_data(bad, error, match):
    with pytest.raises(error, match=match):
        bk.init_from_data(nn.Sequential(bk.BatchlessNorm1d(2)), bad)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_batches": 0}, ValueError, "max_batches"),
    ({"max_batches": 1.5}, TypeError, "max_batches must be a positive int or None, got float"),
    ({"max_batches": True}, TypeError, "max_batches"),
    ({"preserve_function": 1}, TypeError, "preserve_function"),
    ({"train_mode": 1}, TypeError, "train_mode must be a bool, got int"),  # was nn.Module.train's ValueError
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        bk.init_from_data(nn.Sequential(bk.BatchlessNorm1d(2)), torch.randn(3, 2), **kwargs)


def test_bad_model():
    with pytest.raises(TypeError, match="model"):
        bk.init_from_data("model", torch.randn(3, 2))


class Doubled(nn.Module):
    def forward(self, w):
        return 2 * w

    def right_inverse(self, w):
        return w / 2


@pytest.mark.parametrize("preserve_function, name", [(True, "weight"), (False, "mean"), (False, "std_param")])
def test_parametrized_parameters_are_refused(preserve_function, name):
    """A write to a parametrized parameter went to a temporary: preserve_function=True changed the function
    (by 4.1), a parametrized mean stayed 0."""
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(3, 4), bk.BatchlessNorm1d(4))
    parametrize.register_parametrization(model[1], name, Doubled())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"cannot write parametrized parameters .*\['1.{name}'\]"):
        bk.init_from_data(model, torch.randn(16, 3), preserve_function=preserve_function)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if name == "weight":  # a parametrization of what init_from_data does not write is fine
        bk.init_from_data(model, torch.randn(16, 3) * 3 + 1)
        assert float(model[1].mean.abs().max()) > 0


@pytest.mark.parametrize("preserve_function, name", [(True, "weight"), (True, "bias"), (False, "std_param")])
def test_parameters_computed_by_legacy_hooks_are_refused(preserve_function, name):
    """The legacy torch.nn.utils.weight_norm recomputes its tensor in a forward pre-hook: a written weight was
    overwritten at the next forward, so preserve_function=True changed the function."""
    model = nn.Sequential(nn.Linear(3, 4), bk.BatchlessNorm1d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for torch.nn.utils.parametrizations
        nn.utils.weight_norm(model[1], name=name, dim=None)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"not parameters of their layers .*weight_norm.*\['1.{name}'\]"):
        bk.init_from_data(model, torch.randn(16, 3), preserve_function=preserve_function)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails"])
def test_train_mode_leaves_other_layers_buffers_alone(fails):
    """With train_mode=True each partial pass updated BatchNorm's running statistics and counter (and a
    BatchRenorm's, which moves its schedule); after an error they stayed NaN."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), bk.BatchlessNorm2d(4), nn.Conv2d(4, 4, 1),
                          bk.BatchlessNorm2d(4), bk.BatchRenorm2d(4))
    before = copy.deepcopy(model.state_dict())
    batches = [make_x((4, 3, 5, 5)), make_x((4, 3, 5, 5))]
    if fails:
        batches[1] = torch.full_like(batches[1], float("nan"))
        with pytest.raises(ValueError, match="non-finite"):
            bk.init_from_data(model, batches, train_mode=True)
    else:
        bk.init_from_data(model, batches, train_mode=True)
    after = model.state_dict()
    for key, value in before.items():
        if not key.startswith(("2.", "4.")) or fails:  # only the Batchless layers' parameters change
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind", ["expanded", "inference"])
def test_train_mode_with_buffers_that_cannot_be_written(kind):
    """Restoring every buffer failed on an expanded one (self-overlapping) or one made under
    inference_mode, after the layers were set: only the buffers that changed are written back."""
    model = nn.Sequential(nn.Linear(3, 3), bk.BatchlessNorm1d(3))
    if kind == "expanded":
        model.register_buffer("table", torch.arange(3.0).expand(4, 3))
    else:
        with torch.inference_mode():
            model.register_buffer("table", torch.arange(3.0))
    x = make_x((16, 3))
    bk.init_from_data(model, x, train_mode=True)
    with torch.no_grad():
        torch.testing.assert_close(model[1].mean, model[0](x).mean(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_preserve_function_makes_up_for_the_stored_sigma(dtype):
    """weight was set from the float64 sigma, not from the one the rounded 16-bit std_param gives:
    weight / sigma was off by 1.7% (sigma ~ 300, log sigma 5.7 stored in bfloat16); now by a rounding."""
    layer = bk.BatchlessNorm1d(64, dtype=dtype)
    x = torch.randn(512, 64, dtype=torch.float64) * torch.logspace(-1, 2.5, 64, dtype=torch.float64)
    bk.init_from_data(layer, x.to(dtype), preserve_function=True)
    r, _ = bk.parametrization.rstd_and_log_std(layer.std_param.double(), layer.parametrization, layer.eps)
    gain = layer.weight.double() * r  # was 1 (weight 1, sigma 1): preserve_function keeps it
    unit = torch.finfo(dtype).eps  # the weight's rounding: half of it, relative
    assert (gain - 1).abs().max() <= unit, (gain - 1).abs().max()


def test_input_of_the_wrong_width_gets_the_layers_error():
    """A pre-hook's reshape raised "shape '[4]' is invalid for input of size 5" before the layer's check."""
    model = nn.Sequential(bk.BatchlessNorm1d(4))
    with pytest.raises(ValueError, match="num_features=4: expected an input with 4 channels"):
        bk.init_from_data(model, torch.randn(3, 5))


@pytest.mark.parametrize("preserve_function", [False, True], ids=["plain", "preserve"])
def test_values_that_overflow_the_parameters_dtype_are_refused(preserve_function):
    """A float16 layer got mean = inf from inputs around 2e5 (outputs -inf and NaN), and
    preserve_function wrote weight = inf; now a ValueError naming the layer, nothing written."""
    layer = bk.BatchlessNorm1d(3, dtype=torch.float16)
    if preserve_function:
        with torch.no_grad():
            layer.std_param.fill_(-9.0)  # sigma 1.2e-4: the weight that keeps the function is ~8e5 * std
        x = torch.randn(64, 3) * 100
    else:
        x = torch.randn(64, 3) * 1e5 + 2e5
    before = copy.deepcopy(layer.state_dict())
    match = "'BatchlessNorm1d': its new (weight|bias|mean) .* overflows its dtype, torch.float16"
    with pytest.raises(ValueError, match=match):
        bk.init_from_data(layer, x, preserve_function=preserve_function)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_layers_on_the_meta_device_are_refused():
    """They hold no values: torch's "Tensor.item() cannot be called on meta tensors" came from deep inside."""
    model = nn.Sequential(nn.Linear(2, 3), bk.BatchlessNorm1d(3)).to("meta")
    with pytest.raises(ValueError, match=r"meta device hold no values to set: \['1'\].*to_empty"):
        bk.init_from_data(model, torch.randn(4, 2))
    batches = iter([torch.randn(4, 2) for _ in range(3)])  # refused before a one-shot iterator is read
    with pytest.raises(ValueError, match="meta device"):
        bk.init_from_data(model, batches)
    assert len(list(batches)) == 3
