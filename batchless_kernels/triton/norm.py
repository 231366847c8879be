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
import math
import os
import struct
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import ops
from .._checks import accumulation_dtype
from ..parametrization import rstd_and_log_std

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# The interpreter converts fp32 to bf16 by truncation, and bf16 subnormals to fp32 wrongly (9.2e-41 to
# 0, 4.6e-40 to 2.9e-39); the GPU rounds to nearest even and converts exactly. Under the interpreter
# bf16 is loaded and stored by its bits.
_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def _load(ptr, mask, other, ACC: tl.constexpr):
    """ptr's values (other where masked) as ACC; bf16 by its bits under the interpreter."""
    if ptr.dtype.element_ty == tl.bfloat16 and _BF16_BY_HAND:
        bits = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
        value = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(ACC)
        return tl.where(mask, value, other)
    else:
        return tl.load(ptr, mask=mask, other=other).to(ACC)


@triton.jit
def _store(ptr, value, mask):
    """Stores value in ptr's dtype, rounding to nearest even as the GPU does (by hand for bf16 under
    the interpreter)."""
    if ptr.dtype.element_ty == tl.bfloat16 and _BF16_BY_HAND:
        f = value.to(tl.float32)
        bits = f.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN as torch's 0x7FC0: rounding a NaN's bits may carry into the sign (0x7FFFFFFF gave -0.0)
        bits = tl.where(f != f, 0x7FC0, rounded)
        tl.store(ptr, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_channel(PTR, c, mask, ACC: tl.constexpr):
    return _load(PTR + c, mask, 0.0, ACC)


@triton.jit
def _rstd(p, kind, eps):
    """r = 1/sigma from std_param p by parametrization `kind` (KINDS; parametrization.py's table):
    abs 1 / (|p| + eps), log exp(-p), inv p itself (so kind inv also passes a given r through)."""
    # Branches on the uniform kind, not tl.where: only one formula computed (float64's exp and
    # division made a forward variant spill).
    if kind == 0:
        r = 1.0 / (tl.abs(p) + eps)
    elif kind == 1:
        r = tl.exp(-p)
    else:
        r = p
    return r


@triton.jit
def _sigma(p, kind, eps):
    """(r, log sigma, d log|r| / dp, d log sigma / dp) per channel, as nll::Sigma (csrc/batchless_nll.h):
    d log|r| / dp rather than dr/dp, which overflows float32 (abs) where the NLL's gradient does not.
    r is _rstd's, bit for bit (the forward kernels compute it alike)."""
    a = tl.abs(p) + eps
    sign = tl.where(p > 0, 1.0, tl.where(p < 0, -1.0, 0.0))  # d|p|/dp, 0 at 0
    r = _rstd(p, kind, eps)
    log_a = tl.log(a)
    log_sigma = tl.where(kind == 0, log_a, tl.where(kind == 1, p, -log_a))
    dlog_sigma = tl.where(kind == 0, sign * r, tl.where(kind == 1, 1.0, -sign / a))
    # inv with p = 0: r = 0, hence xhat = 0 and s2 = 0: no data term (0 rather than 1/0)
    dlog_r = tl.where(kind == 0, -sign * r, tl.where(kind == 1, -1.0, tl.where(p != 0, 1.0 / tl.where(p != 0, p, 1.0), 0.0)))
    return r, log_sigma, dlog_r, dlog_sigma


@triton.jit
def _eps(eps_bits, ACC: tl.constexpr):
    """eps in the accumulation dtype from the bits of its float64 (_eps_bits): Triton types a Python
    float argument float32, which a float64 eps below 1.4e-45 or above 3.4e38 does not survive (two
    float32 halves lost it on a GPU, where the interpreter keeps Python's double)."""
    return tl.cast(tl.cast(eps_bits, tl.int64).to(tl.float64, bitcast=True), ACC)


@triton.jit
def _affine(W, B, c, mask, has_w, has_b, ACC: tl.constexpr):
    """weight and bias of channels c; absent (has_w / has_b == 0: not read): ones and zeros. Runtime
    flags, not constexprs: no variant of their own, and no launch to fill a stand-in."""
    w = _load(W + c, mask & (has_w != 0), 1.0, ACC)
    b = _load(B + c, mask & (has_b != 0), 0.0, ACC)
    return w, b


@triton.jit
def _zero_counter(COUNTER):
    """The first pass zeroes the second pass's ticket (one program writes it; the launches are
    ordered on the stream), so that no launch is spent on a memset."""
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(COUNTER, 0)


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
# The flags and the parametrization are runtime values too (one variant for all, tl.where in the kernels).
_JIT = dict(do_not_specialize_on_alignment=["C", "S_VEC", "num_sb", "tiles", "C_VEC"],
            do_not_specialize=["kind", "eps_bits", "has_w", "has_b", "gauge", "count"])


@triton.jit(**_JIT)
def _forward_rows_kernel(
    X,  # (N * C, S) planes of x, row-major
    Y,  # (N * C, S) output, same layout
    MEAN, R, W, B,  # (C,) mean, std_param (r by `kind`; or r itself), weight, bias (read when has_w, has_b)
    PS1, PS2,  # (C, N, num_sb) partial sums, one slot per (plane, program along S)
    COUNTER,  # (1,) int32 ticket of the second pass, zeroed here (with STATS)
    P, C, S_VEC, num_sb, tiles,  # S = S_VEC * VEC elements per plane; tiles: loop iterations
    kind, eps_bits, has_w, has_b,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, VEC: tl.constexpr,
    STATS: tl.constexpr, ACC: tl.constexpr,
):
    # A program takes BLOCK_P consecutive planes (many when planes are small) and tiles * BLOCK_S of
    # their elements.
    S = tl.cast(S_VEC, tl.int64) * VEC  # int64: S_VEC < 2**31 does not bound S
    planes, pmask, c = _plane_block(P, C, BLOCK_P)
    # r first: its exp's temporaries are not live beside the other parameters (a float64 variant spilled)
    rstd = _rstd(_load_channel(R, c, pmask, ACC), kind, _eps(eps_bits, ACC))[:, None]
    mean = _load_channel(MEAN, c, pmask, ACC)[:, None]
    w, b = _affine(W, B, c, pmask, has_w, has_b, ACC)
    w, b = w[:, None], b[:, None]
    acc1 = tl.zeros([BLOCK_P, BLOCK_S], ACC)
    acc2 = tl.zeros([BLOCK_P, BLOCK_S], ACC)
    for start in range(0, tiles * BLOCK_S, BLOCK_S):
        ptrs, mask = _plane_tile(planes, pmask, S, start, tiles, BLOCK_S)
        x = _load(X + ptrs, mask, 0.0, ACC)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        _store(Y + ptrs, xhat * w + b, mask)
        if STATS:
            acc1 += xhat
            acc2 += xhat * xhat
    if STATS:
        _zero_counter(COUNTER)
        slots = _plane_slots(planes, c, P, C, num_sb)
        tl.store(PS1 + slots, tl.sum(acc1, axis=1), mask=pmask)
        tl.store(PS2 + slots, tl.sum(acc2, axis=1), mask=pmask)


@triton.jit(**_JIT)
def _forward_columns_kernel(
    X,  # (M, C) x with channels innermost
    Y,  # (M, C) output, same layout
    MEAN, R, W, B,  # (C,) mean, std_param (r by `kind`; or r itself), weight, bias (read when has_w, has_b)
    PS1, PS2,  # (C, num_mb) partial sums, one column per row-block (num_mb: grid axis 0)
    COUNTER,  # (1,) int32 ticket of the second pass, zeroed here (with STATS)
    M, C_VEC, tiles,  # C = C_VEC * VEC channels; tiles: loop iterations
    kind, eps_bits, has_w, has_b,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
    STATS: tl.constexpr, ACC: tl.constexpr,
):
    C, cols, cmask = _column_block(C_VEC, VEC, BLOCK_C)
    rstd = _rstd(_load_channel(R, cols, cmask, ACC), kind, _eps(eps_bits, ACC))  # first, as above
    mean = _load_channel(MEAN, cols, cmask, ACC)
    w, b = _affine(W, B, cols, cmask, has_w, has_b, ACC)
    acc1 = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for start in range(0, tiles * BLOCK_M, BLOCK_M):
        offs, mask = _column_tile(M, C, cols, cmask, start, tiles, BLOCK_M)
        x = _load(X + offs, mask, 0.0, ACC)
        xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        _store(Y + offs, xhat * w[None, :] + b[None, :], mask)
        if STATS:
            acc1 += xhat
            acc2 += xhat * xhat
    if STATS:
        _zero_counter(COUNTER)
        slots = _column_slots(cols)
        tl.store(PS1 + slots, tl.sum(acc1, axis=0), mask=cmask)
        tl.store(PS2 + slots, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit(**_JIT)
def _backward_rows_kernel(
    G,  # (N * C, S) grad_y planes
    X,  # (N * C, S) x planes (read only for dweight)
    DX,  # (N * C, S) output
    MEAN, RSTD, W,  # (C,) (weight read when has_w; absent: ones)
    PW, PB,  # (C, N, num_sb) partial sums of dweight, dbias
    P, C, S_VEC, num_sb, tiles,  # S = S_VEC * VEC elements per plane; tiles: loop iterations
    has_w,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, VEC: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, ACC: tl.constexpr,
):
    S = tl.cast(S_VEC, tl.int64) * VEC  # int64: S_VEC < 2**31 does not bound S
    planes, pmask, c = _plane_block(P, C, BLOCK_P)
    mean = _load_channel(MEAN, c, pmask, ACC)[:, None]
    rstd = _load_channel(RSTD, c, pmask, ACC)[:, None]
    scale = _affine(W, W, c, pmask, has_w, 0, ACC)[0][:, None] * rstd
    accw = tl.zeros([BLOCK_P, BLOCK_S], ACC)
    accb = tl.zeros([BLOCK_P, BLOCK_S], ACC)
    for start in range(0, tiles * BLOCK_S, BLOCK_S):
        ptrs, mask = _plane_tile(planes, pmask, S, start, tiles, BLOCK_S)
        g = _load(G + ptrs, mask, 0.0, ACC)
        if NEED_DX:
            _store(DX + ptrs, g * scale, mask)
        if NEED_DW:
            x = _load(X + ptrs, mask, 0.0, ACC)
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
    MEAN, RSTD, W,  # (C,) (weight read when has_w; absent: ones)
    PW, PB,  # (C, num_mb) partial sums of dweight, dbias (num_mb: grid axis 0)
    M, C_VEC, tiles,  # C = C_VEC * VEC channels; tiles: loop iterations
    has_w,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, ACC: tl.constexpr,
):
    C, cols, cmask = _column_block(C_VEC, VEC, BLOCK_C)
    # Before the loop: computed after it, triton 3.6 spilled 4 bytes in the bf16/fp16 (1000, 3)
    # variant (bench/triton_codegen.py).
    slots = _column_slots(cols)
    mean = _load_channel(MEAN, cols, cmask, ACC)
    rstd = _load_channel(RSTD, cols, cmask, ACC)
    scale = _affine(W, W, cols, cmask, has_w, 0, ACC)[0] * rstd
    accw = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    accb = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for start in range(0, tiles * BLOCK_M, BLOCK_M):
        offs, mask = _column_tile(M, C, cols, cmask, start, tiles, BLOCK_M)
        g = _load(G + offs, mask, 0.0, ACC)
        if NEED_DX:
            _store(DX + offs, g * scale[None, :], mask)
        if NEED_DW:
            x = _load(X + offs, mask, 0.0, ACC)
            accw += tl.where(mask, g * ((x - mean[None, :]) * rstd[None, :]), 0.0)
        if NEED_DB:
            accb += g
    if NEED_DW:
        tl.store(PW + slots, tl.sum(accw, axis=0), mask=cmask)
    if NEED_DB:
        tl.store(PB + slots, tl.sum(accb, axis=0), mask=cmask)


@triton.jit(**_JIT)
def _sum_partials_kernel(
    P1, P2,  # (C, K) per-program partial sums of NSUM (0-2) statistics, channel-major
    OUT1, OUT2,  # (C,) their per-channel totals
    STD,  # (C,) std_param (EPILOGUE 1 or 2)
    RSTD, NLL, BLOCK_SUMS, COUNTER,  # EPILOGUE 1 (forward): r (C,), the nll (), (programs, 2) scratch, ticket
    GRAD_NLL, S1, S2, DMEAN, DPARAM,  # EPILOGUE 2 (backward): grad_nll (), the forward's sums (C,); (C,) grads
    C, K, segment, count, kind, eps_bits, gauge,  # segment: see below; count: elements per channel
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, NSUM: tl.constexpr, EPILOGUE: tl.constexpr, ACC: tl.constexpr,
):
    # The second pass: a program adds up BLOCK_C channels' rows, BLOCK_K partials at a time (a fixed
    # order for a given shape: deterministic), every statistic in one launch; then the NLL's epilogue.
    # Each `segment` blocks of BLOCK_K are summed afresh before they join the total, so that an
    # accumulator adds segment + K / (BLOCK_K * segment) terms in sequence, not K / BLOCK_K
    # (_second_pass_grid).
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    total2 = tl.zeros([BLOCK_C], ACC)
    if NSUM > 0:
        rows = cols[:, None] * K
        acc1 = tl.zeros([BLOCK_C, BLOCK_K], ACC)
        acc2 = tl.zeros([BLOCK_C, BLOCK_K], ACC)
        for outer in range(0, K, BLOCK_K * segment):
            seg1 = tl.zeros([BLOCK_C, BLOCK_K], ACC)
            seg2 = tl.zeros([BLOCK_C, BLOCK_K], ACC)
            ks = tl.arange(0, BLOCK_K).to(tl.int64) + outer
            for _ in range(0, segment):
                mask = cmask[:, None] & (ks < K)[None, :]
                seg1 += tl.load(P1 + rows + ks[None, :], mask=mask, other=0.0)
                if NSUM == 2:
                    seg2 += tl.load(P2 + rows + ks[None, :], mask=mask, other=0.0)
                ks += BLOCK_K
            acc1 += seg1
            if NSUM == 2:
                acc2 += seg2
        tl.store(OUT1 + cols, tl.sum(acc1, axis=1), mask=cmask)
        if NSUM == 2:
            total2 = tl.sum(acc2, axis=1)
            tl.store(OUT2 + cols, total2, mask=cmask)
    if EPILOGUE > 0:
        n = tl.cast(count, ACC)
        channels = tl.cast(C, ACC)
        r, log_sigma, dlog_r, dlog_sigma = _sigma(_load_channel(STD, cols, cmask, ACC), kind, _eps(eps_bits, ACC))
        if EPILOGUE == 1:
            # nll = mean_c [log sigma_c + s2_c / (2 count)] - gauge * (mean_c log sigma_c + 1/2), as the
            # CUDA second stage (csrc/cuda/batchless_norm_kernels.cuh, NllEpilogue): each program adds its
            # channels' terms; the last to take a ticket adds the programs' sums in program order.
            tl.store(RSTD + cols, r, mask=cmask)
            pid = tl.program_id(0).to(tl.int64)
            tl.store(BLOCK_SUMS + 2 * pid, tl.sum(tl.where(cmask, log_sigma, 0.0), axis=0))
            tl.store(BLOCK_SUMS + (2 * pid + 1), tl.sum(tl.where(cmask, total2, 0.0), axis=0))
            tl.debug_barrier()  # every thread's stores before the ticket (acq_rel: visible to the last)
            programs = tl.num_programs(0)
            if tl.atomic_add(COUNTER, 1, sem="acq_rel") == programs - 1:
                log_total = tl.zeros([BLOCK_K], ACC)
                data_total = tl.zeros([BLOCK_K], ACC)
                for start in range(0, programs, BLOCK_K):
                    b = tl.arange(0, BLOCK_K).to(tl.int64) + start
                    log_total += tl.load(BLOCK_SUMS + 2 * b, mask=b < programs, other=0.0, volatile=True)
                    data_total += tl.load(BLOCK_SUMS + (2 * b + 1), mask=b < programs, other=0.0, volatile=True)
                data = tl.sum(data_total, axis=0) / (2.0 * n * channels)
                # with the gauge, the mean log sigma cancels in value (it stays in the gradient), as
                # mean_log - sg(mean_log): NaN, as in the reference, where a sigma is not finite
                mean_log = tl.sum(log_total, axis=0) / channels
                tl.store(NLL, tl.where(gauge != 0, data - 0.5 + (mean_log - mean_log), mean_log + data))
        else:
            # grad_nll times the NLL's gradients (nll::NllGrads), per channel, from the forward's sums
            g = tl.load(GRAD_NLL).to(ACC) / channels
            s1 = _load_channel(S1, cols, cmask, ACC)
            s2 = _load_channel(S2, cols, cmask, ACC)
            _store(DMEAN + cols, -g * r * (s1 / n), cmask)
            _store(DPARAM + cols, g * (dlog_sigma + (s2 / n) * dlog_r), cmask)


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
# Tiles a program adds into its accumulators at most: each add rounds, so a longer chain loses
# accuracy that torch.sum's cascade keeps (the CPU kernels' kMaxChain, csrc/cpu/batchless_norm_cpu.cpp).
# Huge channels-last inputs get more programs instead (and more partials, which the second pass
# adds in segments).
_MAX_CHAIN = 64
# Warps of a full tile (one loop iteration of a program), and elements a thread holds of it: with
# vector accesses 16 keep the tile, its two accumulators and its addresses in registers; scalar
# accesses (rows not divisible by 2) carry one 64-bit address per element, and only 8 fit; so do
# float64 elements, two registers each (with 16, triton 3.6 spilled in a float64 variant whose r
# computation, a float64 exp or division, added to the tile's registers).
# bench/triton_codegen.py checks every variant for spills.
_WARPS = 8


def _tile_plan(vec: int, dtype: torch.dtype) -> tuple[int, int]:
    """(elements per full tile, elements per thread)."""
    per_thread = 16 if vec > 1 and dtype.itemsize < 8 else 8
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
        tile, per_thread = _tile_plan(vec, dtype)
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
    tile, per_thread = _tile_plan(vec, dtype)
    block_c = min(triton.next_power_of_2(channels), 128)
    block_m = max(1, min(triton.next_power_of_2(rows), tile // block_c))
    column_blocks = triton.cdiv(channels, block_c)
    if column_blocks > 65535:  # grid axis 1's limit on a GPU, as the CUDA kernels' check
        raise RuntimeError(f"batchless_norm (triton): too many channels ({channels}) for a channels-innermost "
                           f"input: at most {65535 * block_c}")
    tiles = max(_ELEMENTS_PER_PROGRAM // (block_m * block_c),
                triton.cdiv(rows * column_blocks, block_m * _PROGRAMS_OF_LARGE_INPUTS))
    tiles = max(1, min(triton.cdiv(rows, block_m), tiles, _MAX_CHAIN))
    num_mb = triton.cdiv(rows, tiles * block_m)
    return Launch(False, (num_mb, column_blocks), (rows, channels // vec, tiles),
                  dict(BLOCK_M=block_m, BLOCK_C=block_c, VEC=vec,
                       num_warps=_num_warps(block_m * block_c, per_thread)), (channels, num_mb))


def _plan(t: torch.Tensor, channels_first: bool) -> Launch:
    """plan_launch for t's shape; int() specializes sizes that torch.compile traces symbolically
    (dynamic shapes): the launch geometry depends on them."""
    return plan_launch(channels_first, int(t.shape[0]), int(t.shape[1]), int(t.numel()), t.dtype)


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


# Parametrizations as the kernels take them (_rstd, _sigma). A given r goes in as "inv" (r = p).
KINDS = {"abs": 0, "log": 1, "inv": 2}
_R_GIVEN = KINDS["inv"]


def _kind(parametrization: str) -> int:
    if parametrization not in KINDS:
        raise RuntimeError(f"batchless_norm: parametrization must be 'abs', 'log' or 'inv', got {parametrization!r}")
    return KINDS[parametrization]


def _eps_bits(eps: float) -> int:
    """eps as the bits of its float64 (_eps in the kernels; checked by ops.check_eps): a positive normal
    float64's are at least 2**52, so Triton types the argument int64."""
    return struct.unpack("<q", struct.pack("<d", float(eps)))[0]


def _dense(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """A per-channel tensor as the kernels index it, PTR + c: dense. Parameters may be any view (a
    column of a packed tensor, an expanded scalar with stride 0, a ::2 slice); contiguous() copies only
    those (the C++ host code makes them contiguous alike). An absent one: `stand_in`, never read (the
    kernels' has_w / has_b flags)."""
    return t.contiguous() if t is not None else stand_in


def _partials(launch: Launch, acc: torch.dtype, device, needed: bool = True) -> torch.Tensor:
    """One statistic's per-program partial sums: a tensor of its own, so that where every channel
    has a single program the totals are the partials themselves (no second pass, no aliasing)."""
    return ops.poisoned(torch.empty(launch.slots if needed else (1, 1), dtype=acc, device=device))


def _second_pass_grid(channels: int, k: int) -> tuple[int, int, int, int]:
    """(programs, BLOCK_C, BLOCK_K, segment) of _sum_partials_kernel over (C, K) partials. Up to
    _MAX_CHAIN blocks of BLOCK_K are added one after the other; beyond, blocks of 1024 partials,
    ceil(sqrt(blocks)) per segment, which bounds an accumulator's adds to about 2 sqrt(blocks)
    (K = 2**20: 2 x 32). Channels-first inputs get there: a partial per plane or piece of one."""
    block_k = min(triton.next_power_of_2(k), 128)
    if triton.cdiv(k, block_k) > _MAX_CHAIN:
        block_k = 1024
    block_c = min(triton.next_power_of_2(channels), max(1, 1024 // block_k))
    blocks = triton.cdiv(k, block_k)
    segment = 1 if blocks <= _MAX_CHAIN else math.isqrt(blocks - 1) + 1
    return triton.cdiv(channels, block_c), block_c, block_k, segment


def _second_pass(channels: int, partials: list[torch.Tensor], acc: torch.dtype, device, epilogue: int = 0,
                 std=None, rstd=None, nll=None, counter=None, grad_nll=None, s1=None, s2=None, dmean=None,
                 dparam=None, count: int = 1, kind: int = 0, eps: float = 1.0, gauge: bool = False):
    """Launches _sum_partials_kernel: the per-channel totals of the (C, K) partials (returned), and
    with `epilogue` the NLL's (1: r and the nll; 2: dmean, dparam), into the tensors given."""
    # int(): under torch.compile with dynamic shapes these are symbolic; the launch specializes on them
    channels, k, count = int(channels), int(partials[0].shape[1]) if partials else 1, int(count)
    programs, block_c, block_k, segment = _second_pass_grid(channels, k)
    totals = [ops.poisoned(torch.empty((channels,), dtype=acc, device=device)) for _ in partials]
    any_ = (partials + [std])[0]  # a pointer for the arguments this launch does not read
    block_sums = ops.poisoned(torch.empty((programs, 2), dtype=acc, device=device)) if epilogue == 1 else any_
    p1, p2 = (partials * 2)[:2] if partials else (any_, any_)
    o1, o2 = (totals * 2)[:2] if totals else (any_, any_)
    pick = lambda t: any_ if t is None else t  # noqa: E731
    _launchable(_sum_partials_kernel)[(programs,)](
        p1, p2, o1, o2, pick(std), pick(rstd), pick(nll), block_sums, pick(counter),
        pick(grad_nll), pick(s1), pick(s2), pick(dmean), pick(dparam),
        channels, k, segment, count, kind, _eps_bits(eps), int(gauge),
        BLOCK_C=block_c, BLOCK_K=block_k, NSUM=len(partials), EPILOGUE=epilogue, ACC=accumulator(acc), num_warps=4)
    return totals


def _sum_partials(*partials: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel totals of one or two statistics' (C, K) per-program partials, in one launch and a
    fixed order (_sum_partials_kernel); none where each channel had one program."""
    channels, k = partials[0].shape
    if k == 1:  # one program per channel: the partials are the totals
        return [p.view(channels) for p in partials]
    return _second_pass(channels, list(partials), partials[0].dtype, partials[0].device)


# ------------------------------------------------------------------------------------------------
# Launchers: the kernels of the ops batchless_kernels::triton_* (csrc/ops.cpp)
# ------------------------------------------------------------------------------------------------


_TRACING = threading.local()  # .active: _decomposed runs the launchers for torch.compile's tracing


def _launchable(kernel):
    """The kernel to launch: itself, or while torch.compile traces the ops (_decomposed) its
    wrap_triton wrapper, whose launch the trace records as a node for inductor."""
    return torch.library.wrap_triton(kernel) if getattr(_TRACING, "active", False) else kernel


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


def _forward(x, mean, r, kind, eps, weight, bias, stats):
    """Launches the forward kernel on a non-empty x: (y, [ps1, ps2] (C, K) partials, the second pass's
    counter) with stats; r is std_param (by `kind`) or, with kind _R_GIVEN, rstd."""
    acc = accumulation_dtype(x.dtype)
    y = ops.poisoned(ops.output_like(x))
    first = _channels_first(x)
    xin = _to_layout(x, first)
    yout = y if y.stride() == xin.stride() else ops.poisoned(torch.empty_like(xin))
    mean, r = mean.contiguous(), r.contiguous()  # as _dense
    launch = _plan(x, first)
    ps1, ps2 = (_partials(launch, acc, x.device, stats) for _ in range(2))
    counter = torch.empty((1,), dtype=torch.int32, device=x.device) if stats else ps1
    _launchable(FORWARD_KERNELS[first])[launch.grid](
        xin, yout, mean, r, _dense(weight, mean), _dense(bias, mean), ps1, ps2, counter, *launch.sizes,
        kind, _eps_bits(eps), int(weight is not None), int(bias is not None),
        **launch.meta, STATS=stats, ACC=accumulator(acc))
    if yout is not y:
        y.copy_(yout)
    return y, [ps1, ps2], counter


def _empty_sums(x, n):
    acc = accumulation_dtype(x.dtype)
    return x.new_zeros((n,), dtype=acc), x.new_zeros((n,), dtype=acc)


@_on_device_of_first
def triton_forward(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, compute_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ops.check_forward_inputs(x, mean=mean, rstd=rstd, weight=weight, bias=bias)
    if x.numel() == 0:
        return ops.poisoned(ops.output_like(x)), *_empty_sums(x, x.shape[1] if compute_stats else 0)
    y, partials, _ = _forward(x, mean, rstd, _R_GIVEN, 1.0, weight, bias, compute_stats)
    if not compute_stats:
        return y, *(x.new_empty((0,), dtype=p.dtype) for p in partials)
    s1, s2 = _sum_partials(*partials)
    return y, s1, s2


@_on_device_of_first
def triton_train_forward(
    x: torch.Tensor, mean: torch.Tensor, std_param: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, parametrization: str, eps: float, gauge: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """batchless_norm_train_forward's values (csrc/ops.cpp) in two launches: the forward kernel with
    r computed from std_param, and the second pass with the NLL's epilogue (r, nll)."""
    ops.check_forward_inputs(x, mean=mean, std_param=std_param, weight=weight, bias=bias)
    kind, acc = _kind(parametrization), accumulation_dtype(x.dtype)
    ops.check_eps("batchless_kernels::triton_train_forward", eps, acc)
    channels = x.shape[1]
    if x.numel() == 0:  # no elements to average: nll = 0 (reference.py)
        r = rstd_and_log_std(std_param.detach().to(acc, copy=True), parametrization, eps)[0]
        return ops.poisoned(ops.output_like(x)), *_empty_sums(x, channels), r, x.new_zeros((), dtype=acc)
    y, partials, counter = _forward(x, mean, std_param, kind, eps, weight, bias, True)
    rstd = ops.poisoned(torch.empty((channels,), dtype=acc, device=x.device))
    nll = ops.poisoned(torch.empty((), dtype=acc, device=x.device))
    s1, s2 = _second_pass(channels, partials, acc, x.device, 1, std=std_param.contiguous(), rstd=rstd, nll=nll,
                          counter=counter, count=x.numel() // channels, kind=kind, eps=eps, gauge=gauge)
    return y, s1, s2, rstd, nll


@_on_device_of_first
def triton_inference(
    x: torch.Tensor, mean: torch.Tensor, std_param: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, parametrization: str, eps: float,
) -> torch.Tensor:
    """batchless_norm_inference (csrc/ops.cpp): one launch, r computed in it as in training."""
    ops.check_forward_inputs(x, mean=mean, std_param=std_param, weight=weight, bias=bias)
    kind = _kind(parametrization)
    ops.check_eps("batchless_kernels::triton_inference", eps, accumulation_dtype(x.dtype))
    if x.numel() == 0:
        return ops.poisoned(ops.output_like(x))
    return _forward(x, mean, std_param, kind, eps, weight, bias, False)[0]


def _backward(grad_y, x, mean, rstd, weight, output_mask):
    """Launches the backward kernel: (dx, partials of the wanted ones of dweight, dbias)."""
    acc = accumulation_dtype(grad_y.dtype)
    need_dx, need_dw, need_db = output_mask
    reference = x if x is not None else grad_y
    dx = ops.poisoned(ops.output_like(reference)) if need_dx else grad_y.new_empty((0,))
    first = _channels_first(reference)
    g = _to_layout(grad_y, first)
    xin = _to_layout(x, first) if need_dw else g  # unused pointer when dweight is not wanted
    dx_out = dx if (not need_dx or dx.stride() == g.stride()) else ops.poisoned(torch.empty_like(g))
    mean, rstd = mean.contiguous(), rstd.contiguous()  # as _dense
    launch = _plan(grad_y, first)
    pw, pb = _partials(launch, acc, g.device, need_dw), _partials(launch, acc, g.device, need_db)
    _launchable(BACKWARD_KERNELS[first])[launch.grid](
        g, xin, dx_out if need_dx else g, mean, rstd, _dense(weight, rstd), pw, pb, *launch.sizes,
        int(weight is not None), **launch.meta, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
        ACC=accumulator(acc))
    if need_dx and dx_out is not dx:
        dx.copy_(dx_out)
    return dx, [p for p, need in ((pw, need_dw), (pb, need_db)) if need]




def _affine_grads(grad_y, output_mask, totals):
    """(dweight, dbias) from the wanted ones' totals; empty where not wanted."""
    acc = accumulation_dtype(grad_y.dtype)
    totals = iter(totals)
    return tuple(next(totals) if need else grad_y.new_empty((0,), dtype=acc) for need in output_mask[1:3])


@_on_device_of_first
def triton_backward(
    grad_y: torch.Tensor, x: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor | None, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ops.check_backward_inputs("batchless_kernels::triton_backward", grad_y, x, output_mask, mean=mean, rstd=rstd,
                              weight=weight)
    if grad_y.numel() == 0 or not any(output_mask):
        return _empty_backward(grad_y, x, output_mask)
    dx, partials = _backward(grad_y, x, mean, rstd, weight, output_mask)
    return dx, *_affine_grads(grad_y, output_mask, _sum_partials(*partials) if partials else ())


def _empty_backward(grad_y, x, output_mask):
    """An empty grad_y (or nothing wanted): an empty dx; zero dweight, dbias where wanted."""
    dx = ops.output_like(x if x is not None else grad_y) if output_mask[0] else grad_y.new_empty((0,))
    acc, channels = accumulation_dtype(grad_y.dtype), grad_y.shape[1]
    return dx, *(grad_y.new_zeros((channels if need else 0,), dtype=acc) for need in output_mask[1:3])


@_on_device_of_first
def triton_train_backward(
    grad_y: torch.Tensor, grad_nll: torch.Tensor, x: torch.Tensor | None, mean: torch.Tensor,
    std_param: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None, s1: torch.Tensor,
    s2: torch.Tensor, count: int, parametrization: str, eps: float, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """batchless_norm_train_backward (csrc/ops.cpp) in two launches: the backward kernel, and the
    second pass summing dweight, dbias with the NLL's gradients as its epilogue."""
    op = "batchless_kernels::triton_train_backward"
    ops.check_backward_inputs(op, grad_y, x, output_mask, mean=mean, std_param=std_param, rstd=rstd, weight=weight,
                              s1=s1, s2=s2)
    ops.check_grad_nll(op, grad_nll, s1)
    kind, acc = _kind(parametrization), accumulation_dtype(grad_y.dtype)
    need_nll = output_mask[3] or output_mask[4]
    if need_nll and grad_y.numel() > 0:
        ops.check_nll_args(op, s1, s2, count)
        ops.check_eps(op, eps, s1.dtype)
    channels = grad_y.shape[1]
    if grad_y.numel() == 0:  # no elements: zero NLL gradients (reference.py)
        dx, dw, db = _empty_backward(grad_y, x, output_mask[:3])
        dmean, dparam = torch.zeros_like(mean), torch.zeros_like(std_param)
    else:
        dx, partials = _backward(grad_y, x, mean, rstd, weight, output_mask[:3]) if any(output_mask[:3]) else (
            grad_y.new_empty((0,)), [])
        if not need_nll:
            return dx, *_affine_grads(grad_y, output_mask, _sum_partials(*partials) if partials else ()), \
                mean.new_empty((0,)), std_param.new_empty((0,))
        dmean = ops.poisoned(torch.empty((channels,), dtype=mean.dtype, device=mean.device))
        dparam = ops.poisoned(torch.empty((channels,), dtype=std_param.dtype, device=std_param.device))
        totals = _second_pass(
            channels, partials, acc, grad_y.device, 2, std=std_param.contiguous(), grad_nll=grad_nll.to(acc),
            s1=s1.to(acc).contiguous(), s2=s2.to(acc).contiguous(), dmean=dmean, dparam=dparam, count=count,
            kind=kind, eps=eps)
        dw, db = _affine_grads(grad_y, output_mask, totals)
    return dx, dw, db, *(t if need else t.new_empty((0,)) for t, need in ((dmean, output_mask[3]),
                                                                          (dparam, output_mask[4])))


def _decomposed(launcher):
    """The op's rule under FunctionalTensorMode, the mode of torch.compile's AOTAutograd trace (as
    torch.library.triton_op registers it for its ops): the launcher runs on the traced tensors with its
    kernels wrapped (_launchable), so that the graph inductor compiles holds the Triton kernels
    themselves, not an opaque op. torch.export keeps the op, as it does triton_op's."""

    def rule(mode, op, types, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if custom_triton_ops_decomposition_disabled():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        if any(t is not torch.Tensor and not issubclass(t, (FakeTensor, FunctionalTensor)) for t in types):
            return NotImplemented  # another tensor subclass: its own __torch_dispatch__ first
        previous = getattr(_TRACING, "active", False)
        _TRACING.active = True
        try:
            with mode:
                return launcher(*args, **kwargs)
        finally:
            _TRACING.active = previous

    return rule


# CUDA tensors, and CPU tensors under the interpreter. The fake kernels and the autograd
# (csrc/autograd.cpp) are those of the compiled backends' ops.
if ops.extension_loaded():  # which defines the ops (the kernels above compile without it)
    _LIBRARY = torch.library.Library("batchless_kernels", "IMPL")
    _KERNELS = {"triton_forward": triton_forward, "triton_backward": triton_backward,
                "triton_train_forward": triton_train_forward, "triton_train_backward": triton_train_backward,
                "triton_inference": triton_inference}
    for _key in ("CUDA", "CPU") if INTERPRETED else ("CUDA",):
        for _name, _kernel in _KERNELS.items():
            _LIBRARY.impl(_name, _kernel, _key)
    if not INTERPRETED:  # wrap_triton takes compiled kernels only
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        for _name, _kernel in _KERNELS.items():
            torch.library.register_torch_dispatch(f"batchless_kernels::{_name}", FunctionalTensorMode,
                                                  _decomposed(_kernel), lib=_LIBRARY)
    for _name, _fake in (("triton_forward", ops._forward_fake), ("triton_backward", ops._backward_fake),
                         ("triton_train_forward", ops._train_forward_fake),
                         ("triton_train_backward", ops._train_backward_fake),
                         ("triton_inference", ops._inference_fake)):
        torch.library.register_fake(f"batchless_kernels::{_name}")(_fake)
