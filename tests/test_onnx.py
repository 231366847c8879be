"""Deployment through ONNX: a model with Batchless layers (converted from BN, or trained) exports with
torch.onnx.export (the dynamo exporter of the installed torch) for inference, and onnxruntime's output
equals PyTorch's to float rounding, with and without fuse_for_inference. Under torch.export the layers
are expressed in standard ATen ops (functional.py), so the ONNX graph has no custom-domain node."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import batchless_kernels as bk
from conftest import make_x

onnx = pytest.importorskip("onnx", reason="onnx is not installed (a test dependency: pip install onnx)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's dynamo exporter) is not installed")


def _model(parametrization):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5), nn.BatchNorm1d(5),
    )
    with torch.no_grad():  # trained-looking statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return bk.convert_batchnorm(model, parametrization=parametrization).eval()


def _run_onnx(model, x):
    buffer = io.BytesIO()
    program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(buffer) if hasattr(program, "save") else None
    proto = onnx.load_from_string(buffer.getvalue())
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return lambda t: session.run(None, {session.get_inputs()[0].name: t.numpy()})[0]


@pytest.mark.parametrize("parametrization", ["abs", "log", "inv"])
@pytest.mark.parametrize("fused", [False, True], ids=["layers", "fused"])
def test_onnxruntime_equals_pytorch(parametrization, fused):
    model = _model(parametrization)
    if fused:
        model = bk.fuse_for_inference(model)
    x = make_x((4, 3, 9, 9))
    run = _run_onnx(model, x)
    for batch in (4, 2):  # a batch size other than the exported one: the batch dim is dynamic
        xb = make_x((batch, 3, 9, 9))
        with torch.no_grad():
            expected = model(xb)
        torch.testing.assert_close(torch.from_numpy(run(xb)), expected, rtol=1e-5, atol=1e-5)
