"""Inputs in layouts the kernels do not index directly: per-channel tensors that are not contiguous
(a ::2 slice, an expanded scalar with stride 0, an as_strided view with an offset), and a grad_y in
another layout than x. Every backend must give what it gives on contiguous copies, exactly for the
fused kernels (they compute on dense copies in a fixed order; the pure-PyTorch reference sums in
an order that follows the strides, so it gets float32 tolerances): the triton launchers read
per-channel tensors as dense (C,) arrays (PTR + c), and used to read the wrong elements (past the
end, on a GPU, for the expanded one)."""

from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, GRAD_NAMES, TOLS, assert_close_scaled, backend_params, make_case, run_batchless

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (4, 5, 3, 3)


def _view_of(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A non-contiguous (C,) view holding t's values (t[0] everywhere for "expanded")."""
    c = t.numel()
    if kind == "expanded":  # stride 0, as torch.full((1,), v).expand(C)
        view = t[:1].clone().expand(c)
    elif kind == "every_other":  # stride 2, as one column of a packed (C, 2) tensor
        view = torch.randn(2 * c, dtype=t.dtype, device=t.device)[::2]
    elif kind == "as_strided":  # stride 3 and a storage offset
        view = torch.randn(3 * c + 1, dtype=t.dtype, device=t.device).as_strided((c,), (3,), 1)
    else:
        raise ValueError(kind)
    if kind != "expanded":
        view.copy_(t)
    assert not view.is_contiguous()
    return view


def _assert_same(got: dict, want: dict, backend: str, what: str):
    for name in ("y", "nll", *GRAD_NAMES):
        if want[name] is None:
            assert got[name] is None, f"{what}: {name}"
        elif backend == "reference":
            assert_close_scaled(got[name], want[name], *TOLS[torch.float32], what=f"{what}: {name}")
        else:
            assert torch.equal(got[name], want[name]), (
                f"{what}: {name} differs by {(got[name].double() - want[name].double()).abs().max().item():.3g}")


@pytest.mark.parametrize("case", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", ["every_other", "expanded", "as_strided"])
def test_per_channel_views_give_what_contiguous_copies_give(case, layout, kind):
    """mean, std_param, weight and bias all non-contiguous views: y, nll and the gradients of x and
    of each of the four equal those of the same call on their contiguous copies."""
    x, *params = make_case(SHAPE, layout, torch.float32, case.device, "log", True)
    views = [_view_of(p, kind) for p in params]
    grad_y = torch.randn_like(x)
    got = run_batchless(x, *views, backend=case.name, grad_y=grad_y)
    want = run_batchless(x, *[v.contiguous() for v in views], backend=case.name, grad_y=grad_y)
    _assert_same(got, want, case.name, f"{case.id} {layout} {kind}")


@pytest.mark.parametrize("case", backend_params(ALL_BACKENDS))
@pytest.mark.parametrize("x_layout, grad_layout", [("contiguous", torch.channels_last),
                                                   ("channels_last", torch.contiguous_format)])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_grad_y_in_another_layout_than_x(case, x_layout, grad_layout, affine):
    """The backward with grad_y channels_last for a contiguous x and vice versa gives exactly what it
    gives with grad_y in x's layout (without affine, x is not saved and grad_y alone sets the
    kernels' layout)."""
    x, *params = make_case(SHAPE, x_layout, torch.float32, case.device, "log", affine)
    grad_y = torch.randn_like(x)
    other = grad_y.contiguous(memory_format=grad_layout)
    assert other.stride() != grad_y.stride()
    got = run_batchless(x, *params, backend=case.name, grad_y=other)
    want = run_batchless(x, *params, backend=case.name, grad_y=grad_y)
    _assert_same(got, want, case.name, f"{case.id} x {x_layout}, grad_y {grad_layout}")
