"""Triton kernels for the row norms: LayerNorm, RMSNorm and CRMSNorm (spec A §3.1, §4.5).

One forward and one backward kernel serve all three norms, selected by the constexpr ``NORM``
(0 = LayerNorm, 1 = RMSNorm, 2 = CRMSNorm), with constexpr flags for the weight, bias and fused residual add.

Layout of a launch: the input is a 2-D ``(M, N)`` view whose rows may be strided (``stride(1) == 1``); outputs are
contiguous. Statistics and all arithmetic are fp32 (fp64 for fp64 inputs, so the ops can be ``gradcheck``-ed).

* Forward: each program normalizes ``BLOCK_M`` rows. A row that fits in ``BLOCK_N`` stays in registers
  (``SINGLE_BLOCK``); a wider row is walked twice in ``BLOCK_N`` chunks, the first pass combining per-chunk moments
  with Chan's formula (never ``E[x²] − E[x]²``), the second normalizing. Narrow rows get several rows per program.
* Backward: a persistent grid; each program walks row tiles, writes dX, and keeps its dW/dB partial sums
  (in registers, or in its own row of the partial buffer for wide rows), one partial row per program. A second kernel
  sums the partials in a fixed order, so the backward is deterministic and uses no atomics.

Fused residual: the norm is applied to ``h = x + residual`` rounded to the residual-out dtype (what an unfused
``x + residual`` followed by the norm computes), and ``h`` is returned so pre-norm blocks can carry it on.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from normlayers.kernels.common import (
    centred_row_moments,
    chan_combine,
    column_sum,
    compute_dtype,
    next_power_of_2,
    num_warps_for,
    persistent_programs,
    power_of_two_scale,
    scale_cap,
    tl_compute_dtype,
)

NORM_KINDS = {"layer": 0, "rms": 1, "crms": 2}

# Widest row held in registers in one block. Forward: 64 KiB of input per row (16K fp32 / 32K bf16 elements); the
# backward holds x, dy, the weight and the dW/dB partials, so it caps lower. Wider rows use the chunked loop, whose
# chunk is CHUNK_N. These are starting points to be tuned on a GPU, not measured optima.
FWD_MAX_ROW_BYTES = 65536
BWD_MAX_BLOCK_N = 8192
CHUNK_N = 4096
# Target elements per program for narrow rows (several rows per program), and the most rows per program.
ROWS_TILE_ELEMENTS = 4096
MAX_BLOCK_M = 32


# ----------------------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------------------


def _block_shape(n: int, max_block_n: int) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, SINGLE_BLOCK) for rows of width ``n`` when at most ``max_block_n`` fit in one block."""
    block_n = next_power_of_2(n)
    if block_n <= max_block_n:
        block_m = min(max(ROWS_TILE_ELEMENTS // block_n, 1), MAX_BLOCK_M)
        return block_m, block_n, True
    return 1, min(CHUNK_N, 1 << (max_block_n.bit_length() - 1)), False


def _programs_per_sm(n: int) -> int:
    # More programs per SM for narrow rows, where one program's work is small (quack's Hopper ladder).
    for limit, programs in ((256, 16), (1024, 8), (2048, 4), (4096, 2)):
        if n <= limit:
            return programs
    return 1


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
    if NORM == 0:
        s, q = centred_row_moments(h, mask, n_valid)
    else:
        s = tl.sum(h, axis=1)
        q = tl.sum(h * h, axis=1)
    return s, q


@triton.jit
def _finalize_stats(s, q, N, eps, NORM: tl.constexpr, COMPUTE: tl.constexpr):
    """(mean, rstd) of rows from their Σh and q; the mean is only meaningful for LayerNorm."""
    n = tl.cast(N, COMPUTE)
    if NORM == 0:
        mean = s / n
        rstd = tl.math.rsqrt(q / n + eps)
    elif NORM == 1:
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
    if NORM == 0:
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
            if NORM == 0:
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
    if NORM == 0:
        tl.store(MEAN + rows, mean / scale, mask=row_mask)
    tl.store(RSTD + rows, rstd * scale, mask=row_mask)


@triton.jit
def _load_grad_inputs(H, W, DY, rows, cols, mask, mean, rstd, stride_h, stride_dy, N, weight_offset,
                      NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE: tl.constexpr):
    """(h, x̂, dy, ĝ = dy ⊙ w) of one chunk, zero outside ``mask``."""
    h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    if NORM == 0:
        xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
    else:
        xhat = h * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(COMPUTE) + weight_offset
        g = dy * w[None, :]
    else:
        g = dy
    return h, xhat, dy, g


@triton.jit
def _store_input_grad(DH, DRES_OUT, xhat, g, rstd, c1, c2, shift, rows, cols, mask, stride_dres, N,
                      HAS_DRESIDUAL: tl.constexpr, COMPUTE: tl.constexpr):
    """dh = rstd·(ĝ − (x̂ + shift)·c1 − c2) (+ the gradient reaching the residual output)."""
    dh = (g - (xhat + shift[:, None]) * c1[:, None] - c2[:, None]) * rstd[:, None]
    if HAS_DRESIDUAL:
        dh += tl.load(DRES_OUT + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    tl.store(DH + rows[:, None] * N + cols[None, :], dh, mask=mask)


@triton.jit
def row_norm_bwd_kernel(
    H, W, DY, DRES_OUT, MEAN, RSTD, DH, DW_PARTIAL, DB_PARTIAL,
    M, N, stride_h, stride_dy, stride_dres, weight_offset,
    NORM: tl.constexpr, HAS_DRESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    # Per row, with ĝ = dy ⊙ w and d the RMS divisor (N, or N + 1 for CRMSNorm; spec A §3.1, §4.5):
    #   LayerNorm  dx = rstd·(ĝ − x̂·Σ(x̂ĝ)/N − Σĝ/N)
    #   RMSNorm    dx = rstd·(ĝ − x̂·Σ(x̂ĝ)/N)
    #   CRMSNorm   dx = rstd·(ĝ − (x̂ + rstd·Σx)·Σ(x̂ĝ)/(N + 1))
    weight_offset = tl.cast(weight_offset, COMPUTE)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    n = tl.cast(N, COMPUTE)
    divisor = n + 1.0 if NORM == 2 else n
    partial_row = pid.to(tl.int64) * N
    if SINGLE_BLOCK:
        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
        db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    for tile in range(pid, num_tiles, num_programs):
        rows = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0).to(COMPUTE)
        if NORM == 0:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0).to(COMPUTE)
        else:
            mean = rstd * 0.0
        if SINGLE_BLOCK:
            mask = row_mask[:, None] & (cols < N)[None, :]
            h, xhat, dy, g = _load_grad_inputs(H, W, DY, rows, cols, mask, mean, rstd, stride_h, stride_dy, N,
                                               weight_offset, NORM, HAS_WEIGHT, COMPUTE)
            sum_xg = tl.sum(xhat * g, axis=1)
            sum_g = tl.sum(g, axis=1)
            sum_h = tl.sum(h, axis=1)
        else:
            sum_xg = rstd * 0.0
            sum_g = rstd * 0.0
            sum_h = rstd * 0.0
            for start in range(0, N, BLOCK_N):
                chunk_cols = start + cols
                mask = row_mask[:, None] & (chunk_cols < N)[None, :]
                h, xhat, dy, g = _load_grad_inputs(H, W, DY, rows, chunk_cols, mask, mean, rstd, stride_h, stride_dy,
                                                   N, weight_offset, NORM, HAS_WEIGHT, COMPUTE)
                sum_xg += tl.sum(xhat * g, axis=1)
                sum_g += tl.sum(g, axis=1)
                sum_h += tl.sum(h, axis=1)
        c1 = sum_xg / divisor
        c2 = sum_g / n if NORM == 0 else sum_g * 0.0
        shift = rstd * sum_h if NORM == 2 else sum_h * 0.0
        if SINGLE_BLOCK:
            _store_input_grad(DH, DRES_OUT, xhat, g, rstd, c1, c2, shift, rows, cols, mask, stride_dres, N,
                              HAS_DRESIDUAL, COMPUTE)
            dw_acc += dy * xhat
            db_acc += dy
        else:
            for start in range(0, N, BLOCK_N):
                chunk_cols = start + cols
                col_mask = chunk_cols < N
                mask = row_mask[:, None] & col_mask[None, :]
                h, xhat, dy, g = _load_grad_inputs(H, W, DY, rows, chunk_cols, mask, mean, rstd, stride_h, stride_dy,
                                                   N, weight_offset, NORM, HAS_WEIGHT, COMPUTE)
                _store_input_grad(DH, DRES_OUT, xhat, g, rstd, c1, c2, shift, rows, chunk_cols, mask, stride_dres,
                                  N, HAS_DRESIDUAL, COMPUTE)
                # Wide rows: this program's partial row lives in memory; only this program touches it.
                if HAS_WEIGHT:
                    dw = tl.load(DW_PARTIAL + partial_row + chunk_cols, mask=col_mask, other=0.0)
                    tl.store(DW_PARTIAL + partial_row + chunk_cols, dw + tl.sum(dy * xhat, axis=0), mask=col_mask)
                if HAS_BIAS:
                    db = tl.load(DB_PARTIAL + partial_row + chunk_cols, mask=col_mask, other=0.0)
                    tl.store(DB_PARTIAL + partial_row + chunk_cols, db + tl.sum(dy, axis=0), mask=col_mask)
                tl.debug_barrier()  # the next tile reads these partials back, maybe in other threads
    if SINGLE_BLOCK:
        col_mask = cols < N
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + partial_row + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + partial_row + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


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
    cap = max_block_n if max_block_n is not None else FWD_MAX_ROW_BYTES // x.element_size()
    block_m, block_n, single = _block_shape(n, cap)
    row_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, y, residual_out if residual is not None else x,
        mean if kind == "layer" else rstd, rstd,
        m, n, x.stride(0), residual.stride(0) if residual is not None else 0, eps, weight_offset,
        scale_cap(eps, compute),
        NORM=NORM_KINDS[kind], HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, COMPUTE=tl_compute_dtype(compute), BLOCK_M=block_m, BLOCK_N=block_n,
        SINGLE_BLOCK=single,
        num_warps=num_warps_for(block_m * block_n, x.device),
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`row_norm_fwd` with respect to the normalized input ``h`` (``x`` or ``x + residual``).

    ``dy``, ``h`` and ``dresidual_out`` are 2-D with ``stride(1) == 1``. Returns ``(dh, dweight, dbias)``: ``dh``
    contiguous in ``h.dtype`` (``dresidual_out`` added in); ``dweight`` in ``weight.dtype`` and ``dbias`` in the same
    dtype (each empty when there is no such parameter).
    """
    m, n = h.shape
    compute = compute_dtype(h.dtype)
    dh = torch.empty((m, n), dtype=h.dtype, device=h.device)
    param_dtype = weight.dtype if weight is not None else h.dtype
    cap = max_block_n if max_block_n is not None else BWD_MAX_BLOCK_N
    block_m, block_n, single = _block_shape(max(n, 1), cap)
    programs = max(min(persistent_programs(h.device, _programs_per_sm(n)), triton.cdiv(m, block_m)), 1)
    # Wide rows accumulate into their partial row in place, so it must start at zero (as must an unlaunched one).
    new_partials = torch.empty if single and m > 0 and n > 0 else torch.zeros
    dw_partial = new_partials((programs, n), dtype=compute, device=h.device) if weight is not None else None
    db_partial = new_partials((programs, n), dtype=compute, device=h.device) if has_bias else None
    if m > 0 and n > 0:
        row_norm_bwd_kernel[(programs,)](
            h, weight if weight is not None else h, dy, dresidual_out if dresidual_out is not None else dy,
            mean if kind == "layer" else rstd, rstd, dh,
            dw_partial if dw_partial is not None else dh, db_partial if db_partial is not None else dh,
            m, n, h.stride(0), dy.stride(0), dresidual_out.stride(0) if dresidual_out is not None else 0, weight_offset,
            NORM=NORM_KINDS[kind], HAS_DRESIDUAL=dresidual_out is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=has_bias, COMPUTE=tl_compute_dtype(compute), BLOCK_M=block_m, BLOCK_N=block_n,
            SINGLE_BLOCK=single,
            num_warps=num_warps_for(block_m * block_n, h.device),
        )
    dweight = column_sum(dw_partial, param_dtype) if dw_partial is not None else h.new_empty(0)
    dbias = column_sum(db_partial, param_dtype) if db_partial is not None else h.new_empty(0)
    return dh, dweight, dbias
