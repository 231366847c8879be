"""Triton kernels of batchless normalization: fused forward (y and the per-channel sums S1, S2) and
backward (dx, dweight, dbias), their launchers, and their registration as custom ops with the
autograd and fake kernels shared with the compiled backends (batchless_kernels/ops.py).

Layouts, without copies (as the C++ CPU kernels, see csrc/cpu/batchless_norm_cpu.cpp):
  channels-first  x viewed as (N * C, S): one row per (n, c) plane;
  channels-last   x viewed as (M, C), channels innermost (channels_last, 2-D, transposed (N, L, C)).
Reductions are deterministic: each program writes its partial sums to its own slot and a second
kernel sums the slots in a fixed order (no atomics), both statistics in one launch. Slots are
channel-major, (C, programs per channel), so the second pass reduces contiguous rows, parallel
across channels. Offsets are 64-bit. Accumulation is fp32 (fp64 for fp64).

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
before import), which is how CI tests them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import ops
from .._checks import accumulation_dtype

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# The interpreter converts fp32 to bf16 by truncation; the GPU rounds to nearest even.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def _store(ptr, value, mask):
    """Stores value in ptr's dtype, rounding to nearest even as the GPU does (by hand for bf16 under
    the interpreter)."""
    if ptr.dtype.element_ty == tl.bfloat16 and _ROUND_BF16_BY_HAND:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(ptr, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_channel(PTR, c, mask, ACC: tl.constexpr):
    return tl.load(PTR + c, mask=mask, other=0.0).to(ACC)


@triton.jit
def _plane_block(P, C, BLOCK_P: tl.constexpr):
    """This program's BLOCK_P consecutive planes (64-bit), their mask and their channels."""
    planes = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    return planes, planes < P, planes % C


@triton.jit
def _plane_slots(planes, c, P, C, num_sb):
    """Offsets of these planes' partial sums (plane = n * C + c) in the (C, N, num_sb) layout."""
    N = tl.cast(P, tl.int64) // C  # int64: an i32 division would feed the offsets
    return (c * N + planes // C) * num_sb + tl.program_id(1)


@triton.jit
def _column_slots(cols):
    """Offsets of this program's partial sums (program_id(0) = row block) in the (C, num_mb) layout,
    64-bit: C * num_mb can pass 2^31."""
    return cols.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)


@triton.jit
def _plane_tile(planes, pmask, S, start, tiles, BLOCK_S: tl.constexpr):
    """Offsets and mask of the [BLOCK_P, BLOCK_S] tile at `start` of this program's share of S
    (tiles * BLOCK_S elements: a multiple of BLOCK_S, which keeps the accesses vectorized)."""
    offs = tl.program_id(1).to(tl.int64) * tiles * BLOCK_S + start + tl.arange(0, BLOCK_S)
    return planes[:, None] * S + offs[None, :], pmask[:, None] & (offs < S)[None, :]


@triton.jit
def _column_block(C_VEC, VEC: tl.constexpr, BLOCK_C: tl.constexpr):
    """C (64-bit), this program's BLOCK_C channels (64-bit offsets, as every offset) and their mask."""
    C = tl.cast(C_VEC, tl.int64) * VEC
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    return C, cols, cols < C


@triton.jit
def _column_tile(M, C, cols, cmask, start, tiles, BLOCK_M: tl.constexpr):
    """Offsets and mask of the [BLOCK_M, BLOCK_C] tile at `start` of this program's tiles * BLOCK_M
    rows."""
    rows = tl.program_id(0).to(tl.int64) * tiles * BLOCK_M + start + tl.arange(0, BLOCK_M)
    return rows[:, None] * C + cols[None, :], (rows < M)[:, None] & cmask[None, :]


# Integer arguments: Triton compiles a variant per value class of each (== 1, divisible by 16, or
# other), and the length of a program's share (`tiles`, loop iterations), the number of shares
# (`num_sb`) and the row lengths follow the input's size. Their divisibility by 16 says nothing the
# kernels use (vector widths come from VEC: rows go in as n_VEC * VEC, and a 16-byte access is VEC
# elements at most): not specialized on, so that inputs of varying size (token-packed rows, varying
# image sizes) reuse a few compiled variants. Kept: == 1 (tiles == 1, a loop known to run once,
# carries no accumulators across iterations: half the registers for small planes), and the
# divisibility of the mask bounds P and M (masks uniform over 16 planes or rows: fewer registers,
# and no spill in some float64 variants; bench/triton_codegen.py).
_JIT = dict(do_not_specialize_on_alignment=["C", "S_VEC", "num_sb", "tiles", "C_VEC"])


@triton.jit(**_JIT)
def _forward_rows_kernel(
    X,  # (N * C, S) planes of x, row-major
    Y,  # (N * C, S) output, same layout
    MEAN, RSTD, W, B,  # (C,) per-channel parameters (absent weight/bias: ones/zeros)
    PS1, PS2,  # (C, N, num_sb) partial sums, one slot per (plane, program along S)
    P, C, S_VEC, num_sb, tiles,  # S = S_VEC * VEC elements per plane; tiles: loop iterations
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, VEC: tl.constexpr,
    STATS: tl.constexpr, ACC: tl.constexpr,
):
    # A program takes BLOCK_P consecutive planes (many when planes are small) and tiles * BLOCK_S of
    # their elements.
    S = tl.cast(S_VEC, tl.int64) * VEC  # int64: S_VEC < 2**31 does not bound S
    planes, pmask, c = _plane_block(P, C, BLOCK_P)
    mean = _load_channel(MEAN, c, pmask, ACC)[:, None]
    rstd = _load_channel(RSTD, c, pmask, ACC)[:, None]
    w = _load_channel(W, c, pmask, ACC)[:, None]
    b = _load_channel(B, c, pmask, ACC)[:, None]
    acc1 = tl.zeros([BLOCK_P, BLOCK_S], ACC)
    acc2 = tl.zeros([BLOCK_P, BLOCK_S], ACC)
    for start in range(0, tiles * BLOCK_S, BLOCK_S):
        ptrs, mask = _plane_tile(planes, pmask, S, start, tiles, BLOCK_S)
        x = tl.load(X + ptrs, mask=mask, other=0.0).to(ACC)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        _store(Y + ptrs, xhat * w + b, mask)
        if STATS:
            acc1 += xhat
            acc2 += xhat * xhat
    if STATS:
        slots = _plane_slots(planes, c, P, C, num_sb)
        tl.store(PS1 + slots, tl.sum(acc1, axis=1), mask=pmask)
        tl.store(PS2 + slots, tl.sum(acc2, axis=1), mask=pmask)


@triton.jit(**_JIT)
def _forward_columns_kernel(
    X,  # (M, C) x with channels innermost
    Y,  # (M, C) output, same layout
    MEAN, RSTD, W, B,  # (C,) per-channel parameters (absent weight/bias: ones/zeros)
    PS1, PS2,  # (C, num_mb) partial sums, one column per row-block (num_mb: grid axis 0)
    M, C_VEC, tiles,  # C = C_VEC * VEC channels; tiles: loop iterations
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
    STATS: tl.constexpr, ACC: tl.constexpr,
):
    C, cols, cmask = _column_block(C_VEC, VEC, BLOCK_C)
    mean = _load_channel(MEAN, cols, cmask, ACC)
    rstd = _load_channel(RSTD, cols, cmask, ACC)
    w = _load_channel(W, cols, cmask, ACC)
    b = _load_channel(B, cols, cmask, ACC)
    acc1 = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for start in range(0, tiles * BLOCK_M, BLOCK_M):
        offs, mask = _column_tile(M, C, cols, cmask, start, tiles, BLOCK_M)
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        _store(Y + offs, xhat * w[None, :] + b[None, :], mask)
        if STATS:
            acc1 += xhat
            acc2 += xhat * xhat
    if STATS:
        slots = _column_slots(cols)
        tl.store(PS1 + slots, tl.sum(acc1, axis=0), mask=cmask)
        tl.store(PS2 + slots, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit(**_JIT)
def _backward_rows_kernel(
    G,  # (N * C, S) grad_y planes
    X,  # (N * C, S) x planes (read only for dweight)
    DX,  # (N * C, S) output
    MEAN, RSTD, W,  # (C,) (absent weight: ones)
    PW, PB,  # (C, N, num_sb) partial sums of dweight, dbias
    P, C, S_VEC, num_sb, tiles,  # S = S_VEC * VEC elements per plane; tiles: loop iterations
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, VEC: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, ACC: tl.constexpr,
):
    S = tl.cast(S_VEC, tl.int64) * VEC  # int64: S_VEC < 2**31 does not bound S
    planes, pmask, c = _plane_block(P, C, BLOCK_P)
    mean = _load_channel(MEAN, c, pmask, ACC)[:, None]
    rstd = _load_channel(RSTD, c, pmask, ACC)[:, None]
    scale = _load_channel(W, c, pmask, ACC)[:, None] * rstd
    accw = tl.zeros([BLOCK_P, BLOCK_S], ACC)
    accb = tl.zeros([BLOCK_P, BLOCK_S], ACC)
    for start in range(0, tiles * BLOCK_S, BLOCK_S):
        ptrs, mask = _plane_tile(planes, pmask, S, start, tiles, BLOCK_S)
        g = tl.load(G + ptrs, mask=mask, other=0.0).to(ACC)
        if NEED_DX:
            _store(DX + ptrs, g * scale, mask)
        if NEED_DW:
            x = tl.load(X + ptrs, mask=mask, other=0.0).to(ACC)
            accw += tl.where(mask, g * ((x - mean) * rstd), 0.0)
        if NEED_DB:
            accb += g
    slots = _plane_slots(planes, c, P, C, num_sb)
    if NEED_DW:
        tl.store(PW + slots, tl.sum(accw, axis=1), mask=pmask)
    if NEED_DB:
        tl.store(PB + slots, tl.sum(accb, axis=1), mask=pmask)


@triton.jit(**_JIT)
def _backward_columns_kernel(
    G,  # (M, C) grad_y, channels innermost
    X,  # (M, C) x (read only for dweight)
    DX,  # (M, C) output
    MEAN, RSTD, W,  # (C,) (absent weight: ones)
    PW, PB,  # (C, num_mb) partial sums of dweight, dbias (num_mb: grid axis 0)
    M, C_VEC, tiles,  # C = C_VEC * VEC channels; tiles: loop iterations
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, ACC: tl.constexpr,
):
    C, cols, cmask = _column_block(C_VEC, VEC, BLOCK_C)
    # Before the loop: computed after it, triton 3.6 spilled 4 bytes in the bf16/fp16 (1000, 3)
    # variant (bench/triton_codegen.py).
    slots = _column_slots(cols)
    mean = _load_channel(MEAN, cols, cmask, ACC)
    rstd = _load_channel(RSTD, cols, cmask, ACC)
    scale = _load_channel(W, cols, cmask, ACC) * rstd
    accw = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    accb = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for start in range(0, tiles * BLOCK_M, BLOCK_M):
        offs, mask = _column_tile(M, C, cols, cmask, start, tiles, BLOCK_M)
        g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
        if NEED_DX:
            _store(DX + offs, g * scale[None, :], mask)
        if NEED_DW:
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
            accw += tl.where(mask, g * ((x - mean[None, :]) * rstd[None, :]), 0.0)
        if NEED_DB:
            accb += g
    if NEED_DW:
        tl.store(PW + slots, tl.sum(accw, axis=0), mask=cmask)
    if NEED_DB:
        tl.store(PB + slots, tl.sum(accb, axis=0), mask=cmask)


@triton.jit
def _sum_partials_kernel(
    P1, P2,  # (C, K) per-program partial sums of one or two statistics, channel-major
    OUT1, OUT2,  # (C,) their per-channel totals
    C, K,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, TWO: tl.constexpr, ACC: tl.constexpr,
):
    # A program adds up BLOCK_C channels' rows, BLOCK_K partials at a time: a fixed order for a
    # given shape (deterministic), both statistics in one launch.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = cols[:, None] * K
    acc1 = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    acc2 = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    for start in range(0, K, BLOCK_K):
        ks = tl.arange(0, BLOCK_K).to(tl.int64) + start
        mask = cmask[:, None] & (ks < K)[None, :]
        acc1 += tl.load(P1 + rows + ks[None, :], mask=mask, other=0.0)
        if TWO:
            acc2 += tl.load(P2 + rows + ks[None, :], mask=mask, other=0.0)
    tl.store(OUT1 + cols, tl.sum(acc1, axis=1), mask=cmask)
    if TWO:
        tl.store(OUT2 + cols, tl.sum(acc2, axis=1), mask=cmask)


# ------------------------------------------------------------------------------------------------
# Launch geometry: a documented heuristic (no autotuning yet; GPU tuning awaits a GPU session).
# ------------------------------------------------------------------------------------------------

# Elements one program handles at most (the same under the interpreter, so that CI exercises the
# GPU's geometry, split planes and multi-block partials included).
_ELEMENTS_PER_PROGRAM = 1 << 13
# Channels-last programs each write BLOCK_C partial pairs (8 bytes a channel) that a second pass
# reads back: against R rows a program reads of x and writes of y, 8 / (R * itemsize) of
# the traffic (6% for bf16 at 64 rows). Large inputs therefore get about this many programs, with
# more rows each (256 rows for (65536, 1024): 1.6% in bf16), which is still several waves on an H100.
_PROGRAMS_OF_LARGE_INPUTS = 2048
# Warps of a full tile (one loop iteration of a program), and elements a thread holds of it: with
# vector accesses 16 keep the tile, its two accumulators and its addresses in registers; scalar
# accesses (rows not divisible by 2) carry one 64-bit address per element, and only 8 fit.
# bench/triton_codegen.py checks every variant for spills.
_WARPS = 8


def _tile_plan(vec: int) -> tuple[int, int]:
    """(elements per full tile, elements per thread)."""
    per_thread = 16 if vec > 1 else 8
    return 32 * _WARPS * per_thread, per_thread


def _num_warps(tile: int, per_thread: int) -> int:
    return max(1, min(_WARPS, tile // (32 * per_thread)))


def _vector_width(n: int, dtype: torch.dtype) -> int:
    """The largest power of two that divides n, up to 16 bytes of dtype. Kernels take n as
    (n // VEC) * VEC: Triton learns divisibility from integer arguments only when it is by 16, and
    without knowing that rows of n elements start VEC-aligned it emits scalar loads and stores
    (e.g. for 14x14 planes)."""
    return min(n & -n, max(1, 16 // dtype.itemsize))


@dataclass(frozen=True)
class Launch:
    """How the kernels of one layout run over one shape: the grid, the integer arguments that follow
    the tensors (sizes and loop lengths, runtime values), the block constexprs (which depend on the
    shape only through powers of two and the vector width, so that a few variants cover all sizes),
    and the shape of one statistic's partial sums, (C, partials per channel)."""

    channels_first: bool
    grid: tuple[int, int]
    sizes: tuple[int, ...]
    meta: dict
    slots: tuple[int, int]


@functools.lru_cache(maxsize=256)  # per layer shape; computed in Python on every call otherwise
def plan_launch(channels_first: bool, batch: int, channels: int, numel: int, dtype: torch.dtype) -> Launch:
    """The launch for a non-empty input of `numel` elements, (batch, channels, ...) of `dtype`.

    Channels-first: P = batch * channels planes of S elements; small planes are packed BLOCK_P to a
    program, large ones split along S. Channels-last: (M, C) rows, BLOCK_C channels wide."""
    if channels_first:
        planes = batch * channels
        spatial = numel // planes
        vec = _vector_width(spatial, dtype)
        tile, per_thread = _tile_plan(vec)
        block_s = min(triton.next_power_of_2(spatial), 1024)
        block_p = min(triton.next_power_of_2(planes), max(1, tile // block_s))
        tiles = max(1, min(triton.cdiv(spatial, block_s), _ELEMENTS_PER_PROGRAM // (block_s * block_p)))
        # grid axis 1 holds at most 65535 programs: huge planes get longer shares
        tiles = max(tiles, triton.cdiv(triton.cdiv(spatial, block_s), 65535))
        num_sb = triton.cdiv(spatial, tiles * block_s)
        return Launch(True, (triton.cdiv(planes, block_p), num_sb), (planes, channels, spatial // vec, num_sb, tiles),
                      dict(BLOCK_P=block_p, BLOCK_S=block_s, VEC=vec,
                           num_warps=_num_warps(block_p * block_s, per_thread)), (channels, batch * num_sb))
    rows = numel // channels
    vec = _vector_width(channels, dtype)
    tile, per_thread = _tile_plan(vec)
    block_c = min(triton.next_power_of_2(channels), 128)
    block_m = max(1, min(triton.next_power_of_2(rows), tile // block_c))
    column_blocks = triton.cdiv(channels, block_c)
    tiles = max(_ELEMENTS_PER_PROGRAM // (block_m * block_c),
                triton.cdiv(rows * column_blocks, block_m * _PROGRAMS_OF_LARGE_INPUTS))
    tiles = max(1, min(triton.cdiv(rows, block_m), tiles))
    num_mb = triton.cdiv(rows, tiles * block_m)
    return Launch(False, (num_mb, column_blocks), (rows, channels // vec, tiles),
                  dict(BLOCK_M=block_m, BLOCK_C=block_c, VEC=vec,
                       num_warps=_num_warps(block_m * block_c, per_thread)), (channels, num_mb))


# By channels_first: the kernels take the same tensors in both layouts, then Launch.sizes.
FORWARD_KERNELS = {True: _forward_rows_kernel, False: _forward_columns_kernel}
BACKWARD_KERNELS = {True: _backward_rows_kernel, False: _backward_columns_kernel}


def accumulator(acc: torch.dtype):
    """Triton's accumulation type for torch's."""
    return tl.float64 if acc == torch.float64 else tl.float32


def _channels_innermost(t: torch.Tensor) -> bool:
    return t.movedim(1, -1).is_contiguous()


def _channels_first(t: torch.Tensor) -> bool:
    """The layout to compute a non-empty t in, as the C++ kernels choose it (choose_layout)."""
    spatial = t.numel() // (t.shape[0] * t.shape[1])  # (N, C) planes of 1 element: channels-last
    return spatial > 1 and (t.is_contiguous() or not _channels_innermost(t))


def _to_layout(t: torch.Tensor, channels_first: bool) -> torch.Tensor:
    if channels_first:
        return t.contiguous()
    return t if _channels_innermost(t) else t.movedim(1, -1).contiguous().movedim(-1, 1)


def _param(t, channels, acc, fill, device):
    """A per-channel tensor as the kernels index it, PTR + c: dense. Parameters may be any view (a
    column of a packed tensor, an expanded scalar with stride 0, a ::2 slice); contiguous() copies only
    those (the C++ host code makes them contiguous alike). An absent one is `fill`."""
    return t.contiguous() if t is not None else torch.full((channels,), fill, dtype=acc, device=device)


def _partials(launch: Launch, acc: torch.dtype, device, needed: bool = True) -> torch.Tensor:
    """One statistic's per-program partial sums: a tensor of its own, so that where every channel
    has a single program the totals are the partials themselves (no second pass, no aliasing)."""
    return ops.poisoned(torch.empty(launch.slots if needed else (1, 1), dtype=acc, device=device))


def _sum_partials(*partials: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel totals of one or two statistics' (C, K) per-program partials, in one launch and a
    fixed order (_sum_partials_kernel)."""
    channels, k = partials[0].shape
    if k == 1:  # one program per channel: the partials are the totals
        return [p.view(channels) for p in partials]
    totals = [ops.poisoned(p.new_empty((channels,))) for p in partials]
    block_k = min(triton.next_power_of_2(k), 128)
    block_c = min(triton.next_power_of_2(channels), max(1, 1024 // block_k))
    second = len(partials) == 2
    _sum_partials_kernel[(triton.cdiv(channels, block_c),)](
        partials[0], partials[-1], totals[0], totals[-1], channels, k,
        BLOCK_C=block_c, BLOCK_K=block_k, TWO=second, ACC=accumulator(partials[0].dtype), num_warps=4)
    return totals


# ------------------------------------------------------------------------------------------------
# Launchers: the kernels of the ops batchless_kernels::triton_forward/backward (csrc/ops.cpp)
# ------------------------------------------------------------------------------------------------


def _on_device_of_first(launcher):
    """Triton launches on the current CUDA device and its current stream: with x on cuda:1 while
    cuda:0 is current, the kernels would run on the wrong device. The C++ ops guard the device of
    their tensors; so does this, for CUDA tensors off the current device only (one cheap check
    otherwise)."""

    @functools.wraps(launcher)
    def guarded(t, *args):
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(t, *args)
        return launcher(t, *args)

    return guarded


@_on_device_of_first
def triton_forward(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, compute_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(x.dtype)
    channels = x.shape[1]
    y = ops.poisoned(ops.output_like(x))
    if x.numel() == 0:
        n = channels if compute_stats else 0
        return y, x.new_zeros((n,), dtype=acc), x.new_zeros((n,), dtype=acc)
    first = _channels_first(x)
    xin = _to_layout(x, first)
    yout = y if y.stride() == xin.stride() else ops.poisoned(torch.empty_like(xin))
    mean, rstd = mean.contiguous(), rstd.contiguous()  # as _param
    w = _param(weight, channels, acc, 1.0, x.device)
    b = _param(bias, channels, acc, 0.0, x.device)
    launch = plan_launch(first, x.shape[0], channels, x.numel(), x.dtype)
    ps1, ps2 = (_partials(launch, acc, x.device, compute_stats) for _ in range(2))
    FORWARD_KERNELS[first][launch.grid](
        xin, yout, mean, rstd, w, b, ps1, ps2, *launch.sizes,
        **launch.meta, STATS=compute_stats, ACC=accumulator(acc))
    if yout is not y:
        y.copy_(yout)
    if not compute_stats:
        return y, x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
    s1, s2 = _sum_partials(ps1, ps2)
    return y, s1, s2


@_on_device_of_first
def triton_backward(
    grad_y: torch.Tensor, x: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor | None, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(grad_y.dtype)
    channels = grad_y.shape[1]
    need_dx, need_dw, need_db = output_mask
    if need_dw and x is None:
        raise RuntimeError("batchless_kernels::triton_backward: dweight needs x")
    reference = x if x is not None else grad_y
    dx = ops.poisoned(ops.output_like(reference)) if need_dx else grad_y.new_empty((0,))
    zeros = lambda need: grad_y.new_zeros((channels if need else 0,), dtype=acc)  # noqa: E731
    if grad_y.numel() == 0 or not any(output_mask):
        return dx, zeros(need_dw), zeros(need_db)
    first = _channels_first(reference)
    g = _to_layout(grad_y, first)
    xin = _to_layout(x, first) if need_dw else g  # unused pointer when dweight is not wanted
    dx_out = dx if (not need_dx or dx.stride() == g.stride()) else ops.poisoned(torch.empty_like(g))
    mean, rstd = mean.contiguous(), rstd.contiguous()  # as _param
    w = _param(weight, channels, acc, 1.0, g.device)
    launch = plan_launch(first, grad_y.shape[0], channels, grad_y.numel(), grad_y.dtype)
    pw, pb = _partials(launch, acc, g.device, need_dw), _partials(launch, acc, g.device, need_db)
    BACKWARD_KERNELS[first][launch.grid](
        g, xin, dx_out if need_dx else g, mean, rstd, w, pw, pb, *launch.sizes,
        **launch.meta, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db, ACC=accumulator(acc))
    if need_dx and dx_out is not dx:
        dx.copy_(dx_out)
    wanted = [p for p, need in ((pw, need_dw), (pb, need_db)) if need]
    totals = iter(_sum_partials(*wanted) if wanted else ())
    dw = next(totals) if need_dw else zeros(False)
    db = next(totals) if need_db else zeros(False)
    return dx, dw, db


# CUDA tensors, and CPU tensors under the interpreter. The fake kernels and the autograd
# (csrc/autograd.cpp) are those of the compiled backends' ops.
if ops.extension_loaded():  # which defines the ops (the kernels above compile without it)
    _LIBRARY = torch.library.Library("batchless_kernels", "IMPL")
    for _key in ("CUDA", "CPU") if INTERPRETED else ("CUDA",):
        _LIBRARY.impl("triton_forward", triton_forward, _key)
        _LIBRARY.impl("triton_backward", triton_backward, _key)
    torch.library.register_fake("batchless_kernels::triton_forward")(ops._forward_fake)
    torch.library.register_fake("batchless_kernels::triton_backward")(ops._backward_fake)
