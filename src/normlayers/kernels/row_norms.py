"""Triton kernels for the row norms: LayerNorm, RMSNorm and CRMSNorm (docs/row_norms.md).

One forward and one backward kernel serve all three norms, selected by the constexpr ``NORM``
(0 = LayerNorm, 1 = RMSNorm, 2 = CRMSNorm), with constexpr flags for the weight, bias and fused residual add.

Layout of a launch: the input is a 2-D ``(M, N)`` view whose rows may be strided (``stride(1) == 1``); outputs are
contiguous. Statistics and all arithmetic are fp32 (fp64 for fp64 inputs, so the ops can be ``gradcheck``-ed).

* Forward: each program normalizes ``BLOCK_M`` rows. A row that fits in ``BLOCK_N`` stays in registers
  (``SINGLE_BLOCK``); a wider row is walked twice in ``BLOCK_N`` chunks, the first pass combining per-chunk moments
  with Chan's formula (never ``E[x²] − E[x]²``), the second normalizing. Narrow rows get several rows per program.
* Backward: a persistent grid of as many programs as the GPU keeps resident at once; each program walks row tiles,
  writes dX, and keeps its dW/dB partial sums in fp32 registers, written once to its row of a ``(programs, 2N)``
  buffer. dX needs two sums over the whole row, so a row too wide for registers cannot be read only once: its first
  ``HELD_N`` columns are (the rest of the row is streamed first for its share of the sums; the held columns then
  complete them and wait, bf16 in its own 16 bits, for their dX), the rest is read a second time, column chunk by
  column chunk with the program's rows inside, so a chunk's partial sums stay in registers too (no read-modify-write
  in memory). ``HELD_N`` is sized by the registers a held column costs (16K columns for bf16 RMSNorm, 8K otherwise),
  and a row no wider than it is read once. One ``column_sum`` launch then adds the partial rows in a fixed order:
  deterministic, no atomics, two launches. docs/benchmarking.md gives the bytes this moves.

Fused residual: the norm is applied to ``h = x + residual`` rounded to the residual-out dtype (what an unfused
``x + residual`` followed by the norm computes), and ``h`` is returned so pre-norm blocks can carry it on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from normlayers._dtypes import compute_dtype
from normlayers.kernels.common import (
    centred_row_moments,
    chan_combine,
    column_sum,
    next_power_of_2,
    num_warps_for,
    persistent_programs,
    power_of_two_scale,
    scale_cap,
    tl_compute_dtype,
)

# The NORM constexpr: which norm a kernel computes. Named constexprs (as Liger's casting modes), so that the kernels
# compare against the names; the launchers pass the values of NORM_KINDS.
NORM_LAYER: tl.constexpr = tl.constexpr(0)
NORM_RMS: tl.constexpr = tl.constexpr(1)
NORM_CRMS: tl.constexpr = tl.constexpr(2)
NORM_KINDS = {"layer": NORM_LAYER.value, "rms": NORM_RMS.value, "crms": NORM_CRMS.value}

# Widest row held in registers in one block. Forward: 64 KiB of input per row (16K fp32 / 32K bf16 elements); the
# backward holds x, dy, the weight and the dW/dB partials, so it caps lower. Wider rows use the chunked loop, whose
# chunk is CHUNK_N. These are starting points to be tuned on a GPU, not measured optima.
FWD_MAX_ROW_BYTES = 65536
BWD_MAX_BLOCK_N = 8192
CHUNK_N = 4096
# The backward's tiles for rows wider than BWD_MAX_BLOCK_N. Their first held_n columns are held one row at a time,
# as many as fit WIDE_HELD_BYTES of a program's registers (40 of the 64 of each of 1024 threads) at the bytes a held
# column costs: x and dy waiting in the input dtype, the weight, and the fp32 dW (and dB) sums over the program's rows
# (bf16: 16K columns for RMSNorm, 8K for LayerNorm; see bwd_launch_plan). The rest is streamed for the row sums in
# tiles of WIDE_BLOCK_M rows, so each weight chunk load serves 16 rows, and WIDE_STREAM_N columns, then finished in
# tiles of WIDE_BLOCK_N columns: 4 values per thread each (wider tiles spill in the Triton 3.6 or 3.9 compile).
WIDE_BLOCK_M = 16
WIDE_HELD_BYTES = 163840
WIDE_BLOCK_N = 256
WIDE_STREAM_N = 256
# Warps per SM the backward's registers leave room for (half of an H100's 64): the persistent grid fills them.
BWD_RESIDENT_WARPS = 32
# Target elements per program for narrow rows (several rows per program), and the most rows per program. The
# backward's tile holds 8 values per thread of its 32 warps: 16 bytes of bf16, a 128-bit load.
ROWS_TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 8192
MAX_BLOCK_M = 32


# ----------------------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------------------


def _block_shape(n: int, max_block_n: int, tile_elements: int = ROWS_TILE_ELEMENTS) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, SINGLE_BLOCK) for rows of width ``n`` when at most ``max_block_n`` fit in one block, about
    ``tile_elements`` values per program."""
    block_n = next_power_of_2(n)
    if block_n <= max_block_n:
        block_m = min(max(tile_elements // block_n, 1), MAX_BLOCK_M)
        return block_m, block_n, True
    return 1, min(CHUNK_N, 1 << (max_block_n.bit_length() - 1)), False


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_norm_input(X, RES, RES_OUT, rows, cols, mask, stride_x, stride_res, N, HAS_RESIDUAL: tl.constexpr,
                     COMPUTE: tl.constexpr):
    """The values the norm sees: x, or x + residual rounded to the residual-out dtype (and stored there)."""
    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    if HAS_RESIDUAL:
        r = tl.load(RES + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        h = (h + r).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + rows[:, None] * N + cols[None, :], h, mask=mask)
        h = h.to(COMPUTE)
    return h


@triton.jit
def _chunk_moments(h, mask, n_valid, NORM: tl.constexpr):
    """Per-row (Σh, q) of one chunk: q is the centred M2 for LayerNorm, Σh² for the RMS norms."""
    if NORM == NORM_LAYER:
        s, q = centred_row_moments(h, mask, n_valid)
    else:
        s = tl.sum(h, axis=1)
        q = tl.sum(h * h, axis=1)
    return s, q


@triton.jit
def _finalize_stats(s, q, N, eps, NORM: tl.constexpr, COMPUTE: tl.constexpr):
    """(mean, rstd) of rows from their Σh and q; the mean is only meaningful for LayerNorm."""
    n = tl.cast(N, COMPUTE)
    if NORM == NORM_LAYER:
        mean = s / n
        rstd = tl.math.rsqrt(q / n + eps)
    elif NORM == NORM_RMS:
        mean = s * 0.0
        rstd = tl.math.rsqrt(q / n + eps)
    else:
        # CRMSNorm: the dropped coordinate is −Σh, so the RMS over n + 1 entries is (Σh² + (Σh)²) / (n + 1).
        mean = s * 0.0
        rstd = tl.math.rsqrt((q + s * s) / (n + 1.0) + eps)
    return mean, rstd


@triton.jit
def _normalize_store(Y, W, B, h, mean, rstd, rows, cols, mask, N, weight_offset, NORM: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr):
    if NORM == NORM_LAYER:
        y = (h - mean[:, None]) * rstd[:, None]
    else:
        y = h * rstd[:, None]
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(COMPUTE) + weight_offset
        y = y * w[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(COMPUTE)[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], y, mask=mask)


@triton.jit
def _row_scale(h, cap, COMPUTE: tl.constexpr):
    """Per-row power-of-two scale of a tile (zero outside the mask) from its largest magnitude."""
    return power_of_two_scale(tl.max(tl.abs(h), axis=1), cap, COMPUTE)


@triton.jit
def row_norm_fwd_kernel(
    X, RES, W, B, Y, RES_OUT, MEAN, RSTD,
    M, N, stride_x, stride_res, eps, weight_offset, cap,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    # Scalars are cast here: a Python float may arrive as fp64 and would silently widen the whole kernel.
    eps = tl.cast(eps, COMPUTE)
    weight_offset = tl.cast(weight_offset, COMPUTE)
    cap = tl.cast(cap, COMPUTE)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N)
    mask = row_mask[:, None] & (cols < N)[None, :]
    h = _load_norm_input(X, RES, RES_OUT, rows, cols, mask, stride_x, stride_res, N, HAS_RESIDUAL, COMPUTE)
    # The statistics are those of the row scaled by a power of two s (from its largest magnitude, kept up to date
    # chunk by chunk on wide rows), with eps·s²: exact, and free of overflow/underflow at the dtype's range limits.
    # The row is in registers already, so this costs no memory traffic.
    scale = _row_scale(h, cap, COMPUTE)
    if SINGLE_BLOCK:
        s, q = _chunk_moments(h * scale[:, None], mask, tl.cast(N, COMPUTE), NORM)
        mean, rstd = _finalize_stats(s, q, N, eps * scale * scale, NORM, COMPUTE)
        _normalize_store(Y, W, B, h * scale[:, None], mean, rstd, rows, cols, mask, N, weight_offset, NORM,
                         HAS_WEIGHT, HAS_BIAS, COMPUTE)
    else:
        # Pass 1: moments chunk by chunk. The first chunk is full (N > BLOCK_N), so `start` elements precede each
        # later chunk, which is all Chan's combination needs. A larger chunk maximum lowers the scale: the moments
        # so far are rescaled (by a power of two, exactly).
        max_abs = tl.max(tl.abs(h), axis=1)
        s, q = _chunk_moments(h * scale[:, None], mask, tl.cast(BLOCK_N, COMPUTE), NORM)
        for start in range(BLOCK_N, N, BLOCK_N):
            chunk_cols = start + cols
            chunk_mask = row_mask[:, None] & (chunk_cols < N)[None, :]
            h = _load_norm_input(X, RES, RES_OUT, rows, chunk_cols, chunk_mask, stride_x, stride_res, N,
                                 HAS_RESIDUAL, COMPUTE)
            max_abs = tl.maximum(max_abs, tl.max(tl.abs(h), axis=1))
            new_scale = power_of_two_scale(max_abs, cap, COMPUTE)
            ratio = new_scale / scale
            s, q, scale = s * ratio, q * ratio * ratio, new_scale
            n_a = tl.cast(start, COMPUTE)
            n_b = tl.cast(tl.minimum(N - start, BLOCK_N), COMPUTE)
            s_b, q_b = _chunk_moments(h * scale[:, None], chunk_mask, n_b, NORM)
            if NORM == NORM_LAYER:
                s, q = chan_combine(s, q, n_a, s_b, q_b, n_b)
            else:
                s, q = s + s_b, q + q_b
        mean, rstd = _finalize_stats(s, q, N, eps * scale * scale, NORM, COMPUTE)
        if HAS_RESIDUAL:
            tl.debug_barrier()  # the residual sums stored in pass 1 are read back below, maybe by other threads
        # Pass 2: re-read (the stored residual sum, if any, so the residual is not added twice) and normalize.
        for start in range(0, N, BLOCK_N):
            chunk_cols = start + cols
            chunk_mask = row_mask[:, None] & (chunk_cols < N)[None, :]
            if HAS_RESIDUAL:
                stored = tl.load(RES_OUT + rows[:, None] * N + chunk_cols[None, :], mask=chunk_mask, other=0.0)
            else:
                stored = tl.load(X + rows[:, None] * stride_x + chunk_cols[None, :], mask=chunk_mask, other=0.0)
            _normalize_store(Y, W, B, stored.to(COMPUTE) * scale[:, None], mean, rstd, rows, chunk_cols, chunk_mask,
                             N, weight_offset, NORM, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    # The saved statistics are those of the unscaled row (what the backward reads).
    if NORM == NORM_LAYER:
        tl.store(MEAN + rows, mean / scale, mask=row_mask)
    tl.store(RSTD + rows, rstd * scale, mask=row_mask)


@triton.jit
def _load_weight(W, cols, N, weight_offset, HAS_WEIGHT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The scale ``w + weight_offset`` of columns ``cols`` (zero past ``N``; unused without a weight)."""
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(COMPUTE) + weight_offset
    else:
        w = tl.zeros((BLOCK_N,), dtype=COMPUTE)
    return w


@triton.jit
def _grad_terms(h, dy, w, mean, rstd, NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """(x̂, ĝ = dy ⊙ w) of a tile of ``h`` and ``dy`` already in the compute dtype; ``w`` is a ``(1, BLOCK_N)``
    row."""
    if NORM == NORM_LAYER:
        xhat = (h - mean[:, None]) * rstd[:, None]
    else:
        xhat = h * rstd[:, None]
    if HAS_WEIGHT:
        g = dy * w
    else:
        g = dy
    return xhat, g


@triton.jit
def _load_grad_inputs(H, DY, w, rows, cols, mask, mean, rstd, stride_h, stride_dy, NORM: tl.constexpr,
                      HAS_WEIGHT: tl.constexpr, COMPUTE: tl.constexpr):
    """(h, x̂, dy, ĝ = dy ⊙ w) of one tile, zero outside ``mask`` except LayerNorm's x̂ (``−mean·rstd`` there):
    every use multiplies it by dy or ĝ, zero there, or stores it masked. Not masking it saves the registers of a
    per-value select (Triton 3.6's backward spilled 32 B at rows wider than a block without this)."""
    h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    xhat, g = _grad_terms(h, dy, w[None, :], mean, rstd, NORM, HAS_WEIGHT)
    return h, xhat, dy, g


@triton.jit
def _hold_weight(W, cols, col_mask, weight_offset, HAS_WEIGHT: tl.constexpr, COMPUTE: tl.constexpr,
                 HELD_N: tl.constexpr):
    """The weight of the held columns ``cols`` (a ``(1, HELD_N)`` row) as the backward keeps it in registers: a 16-bit
    weight as pairs packed in 32-bit words (``(1, HELD_N / 2)``, half the registers of fp32), another as the scale
    ``w + weight_offset`` in the compute dtype. :func:`_held_weight_terms` reads it back."""
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0)
        if W.dtype.element_ty.primitive_bitwidth == 16:
            held = _pack_pairs(w, HELD_N)
        else:
            held = w.to(COMPUTE) + weight_offset
    else:
        held = tl.zeros((1, HELD_N), dtype=COMPUTE)
    return held


@triton.jit
def _held_weight_terms(W, held, row_mask, weight_offset, HAS_WEIGHT: tl.constexpr, COMPUTE: tl.constexpr,
                       HELD_N: tl.constexpr):
    """(held, scale for the row sums, scale for dx) of one row's turn, from :func:`_hold_weight`'s ``held``.

    Packed pairs are unpacked twice, once per use (see :func:`_widen`), and zeroed once the row is past ``M``: rows
    only grow along a program's loop, so no stored row changes, and the packed words become a value of the loop,
    which the compiler cannot unpack once before it (it would: the unpacking is loop-invariant, and two fp32 copies
    take four times the registers of the pairs)."""
    if HAS_WEIGHT and W.dtype.element_ty.primitive_bitwidth == 16:
        held = tl.where(row_mask[:, None], held, 0)
        w_sums = _unpack_pairs(held, W.dtype.element_ty, HELD_N).to(COMPUTE) + weight_offset
        w_dx = _widen(_unpack_pairs(held, W.dtype.element_ty, HELD_N), COMPUTE) + weight_offset
    else:
        w_sums = held
        w_dx = held
    return held, w_sums, w_dx


@triton.jit
def _pack_pairs(v, B: tl.constexpr):
    """A ``(1, B)`` row of 16-bit values as ``(1, B / 2)`` 32-bit words, value ``2j`` in the low half of word ``j``."""
    low, high = tl.split(tl.reshape(v.to(tl.uint16, bitcast=True), (1, B // 2, 2)))
    return low.to(tl.uint32) | (high.to(tl.uint32) << 16)


@triton.jit
def _unpack_pairs(words, DTYPE: tl.constexpr, B: tl.constexpr):
    """The inverse of :func:`_pack_pairs`: a ``(1, B)`` row of ``DTYPE`` values."""
    low = (words & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
    high = (words >> 16).to(tl.uint16).to(DTYPE, bitcast=True)
    return tl.reshape(tl.join(low, high), (1, B))


@triton.jit
def _widen(v, COMPUTE: tl.constexpr):
    """``v.to(COMPUTE)``, computed for bf16 by integer ops (exact: a bf16 is the top half of its fp32). The held
    columns are widened twice, for the row sums and again for dx; were both ``.to()``, the compiler would merge them
    and keep the fp32 copy alive across the row sums' reduction, twice the registers of the 16-bit values."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(COMPUTE)
    else:
        return v.to(COMPUTE)


@triton.jit
def _load_row_stats(MEAN, RSTD, rows, row_mask, NORM: tl.constexpr, COMPUTE: tl.constexpr):
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0).to(COMPUTE)
    if NORM == NORM_LAYER:
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0).to(COMPUTE)
    else:
        mean = rstd * 0.0
    return mean, rstd


@triton.jit
def _row_coefficients(sum_xg, sum_g, sum_h, rstd, N, NORM: tl.constexpr, COMPUTE: tl.constexpr):
    """Per row ``(a, b)`` with ``dh = rstd·(ĝ − x̂·a − b)``, from Σx̂ĝ, Σĝ and Σh over the row: LayerNorm
    ``a = Σx̂ĝ/N, b = Σĝ/N``; RMSNorm ``a = Σx̂ĝ/N, b = 0``; CRMSNorm ``a = Σx̂ĝ/(N + 1), b = rstd·Σh·a``."""
    n = tl.cast(N, COMPUTE)
    if NORM == NORM_LAYER:
        a = sum_xg / n
        b = sum_g / n
    elif NORM == NORM_RMS:
        a = sum_xg / n
        b = a * 0.0
    else:
        a = sum_xg / (n + 1.0)
        b = rstd * sum_h * a
    return a, b


@triton.jit
def _store_input_grad(DH, DRES_OUT, xhat, g, rstd, a, b, rows, cols, mask, stride_dres, N,
                      HAS_DRESIDUAL: tl.constexpr, COMPUTE: tl.constexpr):
    """dh = rstd·(ĝ − x̂·a − b) (+ the gradient reaching the residual output)."""
    dh = (g - xhat * a[:, None] - b[:, None]) * rstd[:, None]
    if HAS_DRESIDUAL:
        dh += tl.load(DRES_OUT + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    tl.store(DH + rows[:, None] * N + cols[None, :], dh, mask=mask)


@triton.jit
def _pick(values, i, BLOCK_M: tl.constexpr):
    """Entry ``i`` of a ``(BLOCK_M,)`` per-row vector, as a ``(1,)`` tensor."""
    return tl.sum(tl.where(tl.arange(0, BLOCK_M) == i, values, 0.0), axis=0) + tl.zeros((1,), dtype=values.dtype)


@triton.jit
def row_norm_bwd_kernel(
    H, W, DY, DRES_OUT, MEAN, RSTD, DH, PARTIALS, COEF,
    M, N, stride_h, stride_dy, stride_dres, weight_offset,
    NORM: tl.constexpr, HAS_DRESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HELD_N: tl.constexpr,
    STREAM_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    # Per row, with ĝ = dy ⊙ w and d the RMS divisor (N, or N + 1 for CRMSNorm; docs/row_norms.md):
    #   LayerNorm  dx = rstd·(ĝ − x̂·Σ(x̂ĝ)/N − Σĝ/N)
    #   RMSNorm    dx = rstd·(ĝ − x̂·Σ(x̂ĝ)/N)
    #   CRMSNorm   dx = rstd·(ĝ − (x̂ + rstd·Σx)·Σ(x̂ĝ)/(N + 1))
    # dW and dB are column sums over rows; each program keeps them in fp32 registers and writes them once, to its
    # row of PARTIALS (dW in columns [0, N), dB in [N, 2N) when both exist); column_sum adds the rows in a fixed order.
    # Over row tiles they are summed as (BLOCK_M, BLOCK_N) tiles: a thread holds one row's 8 columns of a tile, so
    # that costs the registers of a row vector (8 per thread either way) and saves a cross-warp reduction per tile.
    weight_offset = tl.cast(weight_offset, COMPUTE)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dw_row = PARTIALS + pid.to(tl.int64) * N * (2 if HAS_WEIGHT and HAS_BIAS else 1)
    db_row = dw_row + N if HAS_WEIGHT else dw_row
    if not SINGLE_BLOCK:
        # Rows wider than a block. dx needs the row's sums Σx̂ĝ, Σĝ (Σh), so a row that does not fit in registers is
        # read twice, except its first HELD_N columns: per tile of BLOCK_M rows, the columns past HELD_N are streamed
        # once for their share of the sums; then each row's first HELD_N columns are loaded, complete the sums, and
        # get their dx and dW/dB (kept in registers across the program's rows, with that part of the weight) at once.
        # The row's coefficients (a, b) go to COEF, and the columns past HELD_N are finished by the loop below.
        # The held columns are masked: HELD_N may exceed N (the whole row is then held: nothing is streamed or left).
        # Their weight and dW/dB sums are (1, HELD_N) rows in the layout of a row of x, so nothing is converted.
        held_cols = tl.arange(0, HELD_N)[None, :]
        held_col_mask = held_cols < N
        w_held = _hold_weight(W, held_cols, held_col_mask, weight_offset, HAS_WEIGHT, COMPUTE, HELD_N)
        dw_held = tl.zeros((1, HELD_N), dtype=COMPUTE)
        db_held = tl.zeros((1, HELD_N), dtype=COMPUTE)
        # One loop over this program's rows (a loop nest would keep more values live): the first row of each tile
        # streams the tile's columns past HELD_N first.
        sum_xg = tl.zeros((BLOCK_M,), dtype=COMPUTE)
        sum_g = tl.zeros((BLOCK_M,), dtype=COMPUTE)
        sum_h = tl.zeros((BLOCK_M,), dtype=COMPUTE)
        for step in range(0, tl.cdiv(num_tiles - pid, num_programs) * BLOCK_M):
            tile = pid + (step // BLOCK_M) * num_programs
            i = step % BLOCK_M
            if i == 0:
                rows = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
                row_mask = rows < M
                mean, rstd = _load_row_stats(MEAN, RSTD, rows, row_mask, NORM, COMPUTE)
                sum_xg = rstd * 0.0
                sum_g = rstd * 0.0
                sum_h = rstd * 0.0
                for start in range(HELD_N, N, STREAM_N):
                    chunk_cols = start + tl.arange(0, STREAM_N)
                    mask = row_mask[:, None] & (chunk_cols < N)[None, :]
                    w = _load_weight(W, chunk_cols, N, weight_offset, HAS_WEIGHT, COMPUTE, STREAM_N)
                    h, xhat, dy, g = _load_grad_inputs(H, DY, w, rows, chunk_cols, mask, mean, rstd, stride_h,
                                                       stride_dy, NORM, HAS_WEIGHT, COMPUTE)
                    sum_xg += tl.sum(xhat * g, axis=1)
                    sum_g += tl.sum(g, axis=1)
                    sum_h += tl.sum(h, axis=1)
            row = tl.cast(tile, tl.int64) * BLOCK_M + i + tl.arange(0, 1)
            row_mask_i = row < M
            mask = row_mask_i[:, None] & held_col_mask
            mean_i, rstd_i = _load_row_stats(MEAN, RSTD, row, row_mask_i, NORM, COMPUTE)
            # The held columns wait in the input dtype while the row sums are reduced, and are widened again for dx
            # (the same values and arithmetic as a second load, without its traffic); _widen keeps the compiler from
            # merging the two widenings into one fp32 copy, which would double their registers.
            h_raw = tl.load(H + row[:, None] * stride_h + held_cols, mask=mask, other=0.0)
            dy_raw = tl.load(DY + row[:, None] * stride_dy + held_cols, mask=mask, other=0.0)
            w_held, w_sums, w_dx = _held_weight_terms(W, w_held, row_mask_i, weight_offset, HAS_WEIGHT, COMPUTE,
                                                      HELD_N)
            h = h_raw.to(COMPUTE)
            dy = dy_raw.to(COMPUTE)
            xhat, g = _grad_terms(h, dy, w_sums, mean_i, rstd_i, NORM, HAS_WEIGHT)
            if HAS_WEIGHT:
                dw_held += dy * xhat
            if HAS_BIAS:
                db_held += dy
            a, b = _row_coefficients(tl.sum(xhat * g, axis=1) + _pick(sum_xg, i, BLOCK_M),
                                     tl.sum(g, axis=1) + _pick(sum_g, i, BLOCK_M),
                                     tl.sum(h, axis=1) + _pick(sum_h, i, BLOCK_M), rstd_i, N, NORM, COMPUTE)
            xhat, g = _grad_terms(_widen(h_raw, COMPUTE), _widen(dy_raw, COMPUTE), w_dx, mean_i, rstd_i, NORM,
                                  HAS_WEIGHT)
            _store_input_grad(DH, DRES_OUT, xhat, g, rstd_i, a, b, row, tl.arange(0, HELD_N), mask, stride_dres, N,
                              HAS_DRESIDUAL, COMPUTE)
            tl.store(COEF + 2 * row, a, mask=row_mask_i)
            tl.store(COEF + 2 * row + 1, b, mask=row_mask_i)
        if HAS_WEIGHT:
            tl.store(dw_row + held_cols, dw_held, mask=held_col_mask)
        if HAS_BIAS:
            tl.store(db_row + held_cols, db_held, mask=held_col_mask)
        tl.debug_barrier()  # the loop below reads the coefficients back, maybe in other threads
    # Column chunk by chunk, this program's rows inside: dh, and the chunk's dW/dB in registers, written once per
    # chunk (never read back). A row that fits a block is one chunk: a constant trip count, so no loop is compiled.
    first_col = 0 if SINGLE_BLOCK else HELD_N
    num_chunks = 1 if SINGLE_BLOCK else tl.cdiv(N - HELD_N, BLOCK_N)
    for chunk in range(0, num_chunks):
        chunk_cols = first_col + chunk * BLOCK_N + cols
        col_mask = chunk_cols < N
        w = _load_weight(W, chunk_cols, N, weight_offset, HAS_WEIGHT, COMPUTE, BLOCK_N)
        dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
        db = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
        for tile in range(pid, num_tiles, num_programs):
            rows = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            mask = row_mask[:, None] & col_mask[None, :]
            mean, rstd = _load_row_stats(MEAN, RSTD, rows, row_mask, NORM, COMPUTE)
            h, xhat, dy, g = _load_grad_inputs(H, DY, w, rows, chunk_cols, mask, mean, rstd, stride_h, stride_dy,
                                               NORM, HAS_WEIGHT, COMPUTE)
            # dW/dB first: dy is then dead while the row sums are reduced (fewer live registers).
            if HAS_WEIGHT:
                dw += dy * xhat
            if HAS_BIAS:
                db += dy
            if SINGLE_BLOCK:
                a, b = _row_coefficients(tl.sum(xhat * g, axis=1), tl.sum(g, axis=1), tl.sum(h, axis=1), rstd, N,
                                         NORM, COMPUTE)
            else:
                a = tl.load(COEF + 2 * rows, mask=row_mask, other=0.0)
                b = tl.load(COEF + 2 * rows + 1, mask=row_mask, other=0.0)
            _store_input_grad(DH, DRES_OUT, xhat, g, rstd, a, b, rows, chunk_cols, mask, stride_dres, N,
                              HAS_DRESIDUAL, COMPUTE)
        if HAS_WEIGHT:
            tl.store(dw_row + chunk_cols, tl.sum(dw, axis=0), mask=col_mask)
        if HAS_BIAS:
            tl.store(db_row + chunk_cols, tl.sum(db, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchPlan:
    """How a row-norm kernel is launched on ``(M, N)`` rows: its block, warps and grid."""

    block_m: int
    block_n: int
    single_block: bool
    num_warps: int
    programs: int
    held_n: int = 1  # backward, rows wider than a block: the columns of each row read once (a power of two)
    stream_n: int = 1  # backward, rows wider than a block: the chunk of the pass over the other columns


def fwd_launch_plan(m: int, n: int, dtype: torch.dtype, device: torch.device, *,
                    max_block_n: Optional[int] = None) -> LaunchPlan:
    """One program per ``BLOCK_M`` rows; ``max_block_n`` overrides the widest single block (tests use it to reach the
    chunked path on small rows)."""
    cap = max_block_n if max_block_n is not None else FWD_MAX_ROW_BYTES // dtype.itemsize
    block_m, block_n, single = _block_shape(max(n, 1), cap)
    return LaunchPlan(block_m, block_n, single, num_warps_for(block_m * block_n, device), triton.cdiv(m, block_m))


def bwd_launch_plan(m: int, n: int, dtype: torch.dtype, device: torch.device, *, params: int = 2,
                    weight_dtype: Optional[torch.dtype] = None, max_block_n: Optional[int] = None,
                    sm_count: Optional[int] = None, programs_per_sm: Optional[int] = None) -> LaunchPlan:
    """The backward's persistent grid: ``programs_per_sm`` programs on each of ``sm_count`` SMs (by default the
    device's SMs and as many programs as fill ``BWD_RESIDENT_WARPS`` warps per SM; on CPU without ``sm_count``, a few
    programs), never more than row tiles.
    ``sm_count`` and ``programs_per_sm`` let the audit emulate a GPU's grid under the interpreter.

    Rows up to ``BWD_MAX_BLOCK_N`` wide are held in registers, several rows per program when narrow
    (``BWD_TILE_ELEMENTS`` values in all); wider rows hold their first ``held_n`` columns one row at a time and walk
    the rest in ``(WIDE_BLOCK_M, WIDE_BLOCK_N)`` tiles. ``held_n`` is the largest power of two whose columns fit
    ``WIDE_HELD_BYTES``, each column costing x and dy as they wait (bf16 in its own 2 bytes, widened exactly for each
    use; other dtypes in the compute dtype, as the compiler merges their two widenings), the weight (a 16-bit
    ``weight_dtype``, by default ``dtype``, in its 2 bytes, another in the compute dtype), and one fp32 sum per
    parameter gradient (``params``: 2 for LayerNorm's dW and dB); it may exceed ``n``, holding the whole row.
    32 warps, few enough registers for ``BWD_RESIDENT_WARPS`` resident warps per SM: the partials are then sized to
    programs that are all resident at once (tests/bench/test_audit.py checks this against an sm_90 compile)."""
    cap = max_block_n if max_block_n is not None else BWD_MAX_BLOCK_N
    block_m, block_n, single = _block_shape(max(n, 1), cap, BWD_TILE_ELEMENTS)
    held_n = stream_n = 1
    if not single:
        compute_size = compute_dtype(dtype).itemsize
        value_bytes = 2 if dtype == torch.bfloat16 else compute_size
        weight_bytes = 2 if (weight_dtype or dtype).itemsize == 2 else compute_size
        column_bytes = 2 * value_bytes + weight_bytes + params * compute_size
        held_n = 1 << ((WIDE_HELD_BYTES // column_bytes).bit_length() - 1)
        held_n = min(held_n, next_power_of_2(n) if max_block_n is None else 1 << (cap.bit_length() - 1))
        block_m, block_n = WIDE_BLOCK_M, min(WIDE_BLOCK_N, held_n)
        stream_n = min(WIDE_STREAM_N, held_n)
    num_warps = num_warps_for(max(block_m * block_n, held_n) * 2, device, max_warps=32)
    per_sm = programs_per_sm if programs_per_sm is not None else max(BWD_RESIDENT_WARPS // num_warps, 1)
    programs = sm_count * per_sm if sm_count is not None else persistent_programs(device, per_sm)
    return LaunchPlan(block_m, block_n, single, num_warps, max(min(programs, triton.cdiv(m, block_m)), 1), held_n,
                      stream_n)


def row_norm_fwd(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    kind: str,
    eps: float,
    weight_offset: float,
    residual_dtype: Optional[torch.dtype],
    *,
    max_block_n: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize the rows of a 2-D ``x`` (``x.stride(1) == 1``).

    Returns ``(y, residual_out, mean, rstd)``: ``y`` contiguous in ``x.dtype``; ``residual_out`` the sum
    ``x + residual`` in ``residual_dtype`` (empty without a residual); ``mean`` (LayerNorm only, else empty) and
    ``rstd`` per row in the compute dtype. ``max_block_n`` overrides the widest single block (tests use it to reach
    the chunked path on small rows).
    """
    m, n = x.shape
    compute = compute_dtype(x.dtype)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    residual_out = (torch.empty((m, n), dtype=residual_dtype, device=x.device) if residual is not None
                    else x.new_empty(0))
    mean = torch.empty(m if kind == "layer" else 0, dtype=compute, device=x.device)
    rstd = torch.empty(m, dtype=compute, device=x.device)
    if m == 0 or n == 0:
        mean.zero_()
        rstd.fill_(eps ** -0.5 if eps > 0 else float("inf"))
        return y, residual_out, mean, rstd
    plan = fwd_launch_plan(m, n, x.dtype, x.device, max_block_n=max_block_n)
    row_norm_fwd_kernel[(plan.programs,)](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, y, residual_out if residual is not None else x,
        mean if kind == "layer" else rstd, rstd,
        m, n, x.stride(0), residual.stride(0) if residual is not None else 0, eps, weight_offset,
        scale_cap(eps, compute),
        NORM=NORM_KINDS[kind], HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, COMPUTE=tl_compute_dtype(compute), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        SINGLE_BLOCK=plan.single_block, num_warps=plan.num_warps,
    )
    return y, residual_out, mean, rstd


def row_norm_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    dresidual_out: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    kind: str,
    weight_offset: float,
    has_bias: bool,
    *,
    max_block_n: Optional[int] = None,
    sm_count: Optional[int] = None,
    programs_per_sm: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`row_norm_fwd` with respect to the normalized input ``h`` (``x`` or ``x + residual``).

    ``dy``, ``h`` and ``dresidual_out`` are 2-D with ``stride(1) == 1``. Returns ``(dh, dweight, dbias)``: ``dh``
    contiguous in ``h.dtype`` (``dresidual_out`` added in); ``dweight`` in ``weight.dtype`` and ``dbias`` in the same
    dtype (each empty when there is no such parameter). ``sm_count`` and ``programs_per_sm`` set the persistent grid
    (see :func:`bwd_launch_plan`).
    """
    m, n = h.shape
    compute = compute_dtype(h.dtype)
    dh = torch.empty((m, n), dtype=h.dtype, device=h.device)
    param_dtype = weight.dtype if weight is not None else h.dtype
    params = (weight is not None) + has_bias
    plan = bwd_launch_plan(m, n, h.dtype, h.device, params=params, weight_dtype=param_dtype, max_block_n=max_block_n,
                           sm_count=sm_count, programs_per_sm=programs_per_sm)
    # Every program writes its whole partial row (dW then dB), so the buffer needs no zero-fill unless nothing runs.
    partials = (torch.empty if m > 0 else torch.zeros)((plan.programs, params * n), dtype=compute, device=h.device)
    coefficients = torch.empty((0 if plan.single_block else m, 2), dtype=compute, device=h.device)
    if m > 0 and n > 0:
        row_norm_bwd_kernel[(plan.programs,)](
            h, weight if weight is not None else h, dy, dresidual_out if dresidual_out is not None else dy,
            mean if kind == "layer" else rstd, rstd, dh, partials if params else dh,
            coefficients if not plan.single_block else rstd,
            m, n, h.stride(0), dy.stride(0), dresidual_out.stride(0) if dresidual_out is not None else 0, weight_offset,
            NORM=NORM_KINDS[kind], HAS_DRESIDUAL=dresidual_out is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=has_bias, COMPUTE=tl_compute_dtype(compute), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
            HELD_N=plan.held_n, STREAM_N=plan.stream_n, SINGLE_BLOCK=plan.single_block, num_warps=plan.num_warps,
        )
    if params == 2:
        dweight, dbias = column_sum(partials, param_dtype, split=n)
    else:  # (the op's outputs must not alias one another: two distinct empty tensors)
        dweight = column_sum(partials, param_dtype) if weight is not None else h.new_empty(0, dtype=param_dtype)
        dbias = column_sum(partials, param_dtype) if has_bias else h.new_empty(0, dtype=param_dtype)
    return dh, dweight, dbias


# ----------------------------------------------------------------------------------------------------------------------
# The sm_90 compile the audit (normlayers.bench.audit) inspects
# ----------------------------------------------------------------------------------------------------------------------

_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def compile_specs(kind: str, n: int, dtype: torch.dtype) -> dict[str, tuple]:
    """``{phase: (kernel, signature, constexprs, num_warps)}`` of the kernels the launchers run on rows of width ``n``
    in ``dtype`` (affine, no residual; CUDA launch parameters), for an ahead-of-time compile."""
    data = _TRITON_TYPES[dtype]
    stats = "fp64" if dtype == torch.float64 else "fp32"
    fwd = fwd_launch_plan(1 << 20, n, dtype, torch.device("cpu"))
    bwd = bwd_launch_plan(1 << 20, n, dtype, torch.device("cpu"), params=2 if kind == "layer" else 1)
    flags = {"NORM": NORM_KINDS[kind], "HAS_WEIGHT": True, "HAS_BIAS": kind == "layer",
             "COMPUTE": tl_compute_dtype(compute_dtype(dtype))}
    return {
        "fwd": (row_norm_fwd_kernel,
                {**{p: f"*{data}" for p in ("X", "RES", "W", "B", "Y", "RES_OUT")}, "MEAN": f"*{stats}",
                 "RSTD": f"*{stats}", "M": "i32", "N": "i32", "stride_x": "i64", "stride_res": "i64", "eps": "fp32",
                 "weight_offset": "fp32", "cap": "fp32"},
                {"NORM": flags["NORM"], "HAS_RESIDUAL": False, "HAS_WEIGHT": True, "HAS_BIAS": flags["HAS_BIAS"],
                 "COMPUTE": flags["COMPUTE"], "BLOCK_M": fwd.block_m, "BLOCK_N": fwd.block_n,
                 "SINGLE_BLOCK": fwd.single_block},
                fwd.num_warps),
        "bwd": (row_norm_bwd_kernel,
                {"H": f"*{data}", "W": f"*{data}", "DY": f"*{data}", "DRES_OUT": f"*{data}", "MEAN": f"*{stats}",
                 "RSTD": f"*{stats}", "DH": f"*{data}", "PARTIALS": f"*{stats}", "COEF": f"*{stats}",
                 "M": "i32", "N": "i32", "stride_h": "i64", "stride_dy": "i64", "stride_dres": "i64",
                 "weight_offset": "fp32"},
                {"NORM": flags["NORM"], "HAS_DRESIDUAL": False, "HAS_WEIGHT": True, "HAS_BIAS": flags["HAS_BIAS"],
                 "COMPUTE": flags["COMPUTE"], "BLOCK_M": bwd.block_m, "BLOCK_N": bwd.block_n, "HELD_N": bwd.held_n,
                 "STREAM_N": bwd.stream_n, "SINGLE_BLOCK": bwd.single_block},
                bwd.num_warps),
    }
