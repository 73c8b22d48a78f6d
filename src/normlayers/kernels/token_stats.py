"""Triton kernels for per-channel statistics across tokens, shared by PowerNorm and UnifiedNorm.

Both layers see their input as ``(R, C)`` token rows (any row and channel stride). Two families live here:

* **The fused layers** (the second half of this file; docs/power_unified.md, "Kernels"): ``token_moments_kernel``,
  a one-program finalize kernel per layer and ``token_affine_kernel`` forward; ``token_grad_kernel``, a finalize
  backward kernel per layer (and ``unified_norm_dx_kernel``) backward. Programs hold whole token rows, so PowerNorm's
  GroupScaling is recomputed in each pass; all the per-channel math is in the finalize kernels, on device.
* **The composition's kernels**, for synced statistics (DTensor inputs run that way too), all-reduced between
  kernels, and for buffers that are not contiguous: ``token_sums_kernel`` (a fixed grid of row programs × channel
  blocks writing partial rows of ``Σ x²`` over the valid rows, or of ``Σ x²``, ``Σ dy·x``, ``Σ dy`` over all rows,
  with ``WRITE_OUT`` also ``dy·P + x·Q``; ``common.column_sum`` adds the partials in a fixed order) and
  ``channel_affine_kernel`` (``out = x·P[c] (+ x2·Q[c]) (+ S[c])``); the per-channel steps between them are the
  reference's torch ops on device.

Arithmetic is fp32 (fp64 for fp64 inputs); offsets are int64; partial rows are combined in a fixed order
(deterministic, no atomics).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from normlayers._dtypes import compute_dtype
from normlayers.kernels.common import (
    column_sum,
    next_power_of_2,
    num_warps_for,
    persistent_programs,
    power_of_two_scale,
    scale_cap,
    tl_compute_dtype,
)

# Channel block (columns) and row tile of one program; starting points, not tuned on a GPU.
MAX_BLOCK_C = 128
TILE_ELEMENTS = 4096
# Row programs per SM for the reductions (each writes one partial row per output).
PROGRAMS_PER_SM = 4


def _tile(rows: int, channels: int) -> tuple[int, int]:
    block_c = min(next_power_of_2(channels), MAX_BLOCK_C)
    block_r = min(max(TILE_ELEMENTS // block_c, 1), next_power_of_2(max(rows, 1)))
    return block_r, block_c


@triton.jit
def token_sums_kernel(
    X, DY, VALID, PARTIALS, P, Q, OUT, R, C, stride_xr, stride_xc, stride_dyr, stride_dyc, stride_p, stride_or,
    stride_oc, row_programs, tiles_per_program,
    HAS_DY: tl.constexpr, HAS_VALID: tl.constexpr, WRITE_OUT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid: (row programs P, channel blocks). Program p reads row tiles p, p + P, p + 2P, ... and writes its partial
    # sums to PARTIALS[p, k·C + c] (row stride stride_p): k = 0 Σx² (valid rows only with HAS_VALID); with HAS_DY
    # also k = 1 Σ dy·x and k = 2 Σ dy. WRITE_OUT (with HAS_DY): also OUT = dy·P[c] + x·Q[c].
    pid_r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    if WRITE_OUT:
        p = tl.load(P + cols, mask=col_mask, other=0.0).to(COMPUTE)
        q = tl.load(Q + cols, mask=col_mask, other=0.0).to(COMPUTE)
    offsets = tl.arange(0, BLOCK_R)
    sq = tl.zeros((BLOCK_R, BLOCK_C), dtype=COMPUTE)
    dyx = tl.zeros((BLOCK_R, BLOCK_C), dtype=COMPUTE)
    dys = tl.zeros((BLOCK_R, BLOCK_C), dtype=COMPUTE)
    for tile in range(0, tiles_per_program):
        rows = (pid_r + tile * row_programs) * BLOCK_R + offsets
        row_mask = rows < R
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0).to(COMPUTE)
        if HAS_VALID:
            keep = tl.load(VALID + rows, mask=row_mask, other=0) != 0
            sq += tl.where(keep[:, None], x * x, 0.0)
        else:
            sq += x * x
        if HAS_DY:
            dy = tl.load(DY + rows[:, None] * stride_dyr + cols[None, :] * stride_dyc, mask=mask,
                         other=0.0).to(COMPUTE)
            dyx += dy * x
            dys += dy
            if WRITE_OUT:
                tl.store(OUT + rows[:, None] * stride_or + cols[None, :] * stride_oc, dy * p[None, :] + x * q[None, :],
                         mask=mask)
    out = PARTIALS + pid_r * stride_p + cols
    tl.store(out, tl.sum(sq, axis=0), mask=col_mask)
    if HAS_DY:
        tl.store(out + C, tl.sum(dyx, axis=0), mask=col_mask)
        tl.store(out + 2 * C, tl.sum(dys, axis=0), mask=col_mask)


@triton.jit
def channel_affine_kernel(
    X, X2, P, Q, S, OUT, R, C, stride_xr, stride_xc, stride_x2r, stride_x2c, stride_or, stride_oc,
    HAS_X2: tl.constexpr, HAS_SHIFT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid: (row tiles, channel blocks). out = x·P[c] (+ x2·Q[c]) (+ S[c]).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < R)[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0).to(COMPUTE)
    p = tl.load(P + cols, mask=col_mask, other=0.0).to(COMPUTE)
    out = x * p[None, :]
    if HAS_X2:
        x2 = tl.load(X2 + rows[:, None] * stride_x2r + cols[None, :] * stride_x2c, mask=mask, other=0.0).to(COMPUTE)
        q = tl.load(Q + cols, mask=col_mask, other=0.0).to(COMPUTE)
        out += x2 * q[None, :]
    if HAS_SHIFT:
        out += tl.load(S + cols, mask=col_mask, other=0.0).to(COMPUTE)[None, :]
    tl.store(OUT + rows[:, None] * stride_or + cols[None, :] * stride_oc, out, mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers. Inputs are 2-D (R, C) with any strides; per-channel vectors are (C,).
# ----------------------------------------------------------------------------------------------------------------------


def token_sums(x: torch.Tensor, dy: Optional[torch.Tensor], valid: Optional[torch.Tensor],
               p: Optional[torch.Tensor] = None, q: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sums over the rows of ``x`` ``(R, C)``, in fp32 (fp64 for fp64 ``x``): without ``dy`` a ``(1, C)``
    tensor ``[Σx²]`` (over the rows where ``valid`` is True, when given); with ``dy`` a ``(3, C)`` tensor
    ``[Σx², Σdy·x, Σdy]`` over all rows (``valid`` must then be ``None``). Returned with ``dy·p[c] + x·q[c]`` in
    ``x``'s dtype, computed in the same pass, when ``p`` and ``q`` are given (else an empty tensor)."""
    rows, channels = x.shape
    outputs = 1 if dy is None else 3
    compute = compute_dtype(x.dtype)
    write_out = p is not None and dy is not None
    out = torch.empty((rows, channels) if write_out else (0,), dtype=x.dtype, device=x.device)
    if rows == 0 or channels == 0:
        return torch.zeros((outputs, channels), dtype=compute, device=x.device), out
    block_r, block_c = _tile(rows, channels)
    col_blocks = triton.cdiv(channels, block_c)
    row_tiles = triton.cdiv(rows, block_r)
    row_programs = max(1, min(row_tiles, persistent_programs(x.device, PROGRAMS_PER_SM) // col_blocks))
    partials = torch.empty((row_programs, outputs * channels), dtype=compute, device=x.device)
    dy_arg = dy if dy is not None else x
    out_arg = out if write_out else partials
    token_sums_kernel[(row_programs, col_blocks)](
        x, dy_arg, valid.contiguous().view(torch.uint8) if valid is not None else x, partials,
        p.contiguous() if write_out else partials, q.contiguous() if write_out else partials, out_arg,
        rows, channels, x.stride(0), x.stride(1), dy_arg.stride(0), dy_arg.stride(1), partials.stride(0),
        out_arg.stride(0), out_arg.stride(1) if write_out else 1, row_programs, triton.cdiv(row_tiles, row_programs),
        HAS_DY=dy is not None, HAS_VALID=valid is not None, WRITE_OUT=write_out,
        COMPUTE=tl_compute_dtype(compute), BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=num_warps_for(block_r * block_c, x.device),
    )
    return column_sum(partials, compute).view(outputs, channels), out


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: Optional[torch.Tensor],
                   x2: Optional[torch.Tensor] = None, scale2: Optional[torch.Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x·scale[c] (+ x2·scale2[c]) (+ shift[c])`` for ``(R, C)`` inputs, computed in fp32 (fp64 for fp64 ``x``),
    returned contiguous in ``out_dtype`` (default ``x``'s dtype)."""
    rows, channels = x.shape
    out = torch.empty((rows, channels), dtype=out_dtype or x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_r, block_c = _tile(rows, channels)
    x2_arg = x2 if x2 is not None else x
    channel_affine_kernel[(triton.cdiv(rows, block_r), triton.cdiv(channels, block_c))](
        x, x2_arg, scale.contiguous(), scale2.contiguous() if scale2 is not None else scale,
        shift.contiguous() if shift is not None else scale, out, rows, channels,
        x.stride(0), x.stride(1), x2_arg.stride(0), x2_arg.stride(1), out.stride(0), out.stride(1),
        HAS_X2=x2 is not None, HAS_SHIFT=shift is not None,
        COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)), BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=num_warps_for(block_r * block_c, x.device),
    )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The fused layers: three launches forward (moments, finalize, elementwise pass), two (PowerNorm) or three
# (UnifiedNorm) backward, one in eval.
#
# A token row is held whole, as a (BLOCK_R, BLOCK_G, BLOCK_S) tile: G groups of S = C/G channels (G = 1 without
# GroupScaling), so PowerNorm's GroupScaling (x / the RMS of each group of a token, mask_powernorm.py L28–37) is
# recomputed inside every pass, forward and backward, and never stored. The per-channel statistic over the valid
# tokens is taken of the tokens scaled by a power of two per channel (from its largest magnitude, as the row norms
# do; docs/reliability.md): each moments program keeps its own scale, updated tile by tile (the sum so far rescaled,
# exactly), and writes (scaled Σu², its scale) per channel; the finalize kernel combines them at the smallest scale.
# ----------------------------------------------------------------------------------------------------------------------

# Values per tile of the row-whole kernels; starting point, not tuned on a GPU.
ROW_TILE_ELEMENTS = 4096


@triton.jit
def _row_tile(row_tile, R, G, S, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """Rows of a tile, each channel's column ``(BLOCK_G, BLOCK_S)``, and the masks (rows, channels, tile)."""
    rows = row_tile.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    groups = tl.arange(0, BLOCK_G)
    inner = tl.arange(0, BLOCK_S)
    cols = groups[:, None].to(tl.int64) * S + inner[None, :]
    col_mask = (groups < G)[:, None] & (inner < S)[None, :]
    row_mask = rows < R
    return rows, cols, row_mask, col_mask, row_mask[:, None, None] & col_mask[None, :, :]


@triton.jit
def _load_rows(PTR, rows, cols, mask, stride_r, stride_c, COMPUTE: tl.constexpr):
    return tl.load(PTR + rows[:, None, None] * stride_r + cols[None, :, :] * stride_c, mask=mask,
                   other=0.0).to(COMPUTE)


@triton.jit
def _load_channels(PTR, cols, col_mask, other, COMPUTE: tl.constexpr):
    return tl.load(PTR + cols, mask=col_mask, other=other).to(COMPUTE)


@triton.jit
def _group_scaling(x, S, gs_eps, gs_cap, GROUPS: tl.constexpr, COMPUTE: tl.constexpr):
    """``(u, s·rstd)``: GroupScaling's output and its per-(row, group) factor (``x`` unchanged without GROUPS). The
    group's mean square is taken of the group scaled by a power of two ``s`` (eps by ``s²``), as the reference's."""
    if GROUPS:
        s = power_of_two_scale(tl.max(tl.abs(x), axis=2), gs_cap, COMPUTE)
        xs = x * s[:, :, None]
        rstd = 1.0 / tl.sqrt(tl.sum(xs * xs, axis=2) / tl.cast(S, COMPUTE) + gs_eps * s * s)
        return xs * rstd[:, :, None], s * rstd
    else:
        return x, x


@triton.jit
def token_moments_kernel(
    X, PAD, PARTIALS, R, G, S, inner_rows, stride_xr, stride_xc, stride_pad_outer, stride_pad_inner, gs_eps, gs_cap,
    cap, tiles_per_program,
    GROUPS: tl.constexpr, HAS_PAD: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Grid: (P,). Program p walks row tiles p, p + P, ... and writes PARTIALS[p] = (Σ_valid (u·s)² per channel, s per
    # channel, the number of valid rows): s is a power of two from the largest |u| of the valid rows seen. Row r is
    # pad_mask[r // inner_rows, r % inner_rows] (strides given), padding when nonzero.
    pid = tl.program_id(0)
    C = G * S
    acc = tl.zeros((BLOCK_G, BLOCK_S), dtype=COMPUTE)
    largest = tl.zeros((BLOCK_G, BLOCK_S), dtype=COMPUTE)
    scale = power_of_two_scale(largest, cap, COMPUTE)
    valid_rows = tl.zeros((BLOCK_R,), dtype=COMPUTE)
    for tile in range(0, tiles_per_program):
        rows, cols, row_mask, col_mask, mask = _row_tile(pid + tile * tl.num_programs(0), R, G, S, BLOCK_R, BLOCK_G,
                                                         BLOCK_S)
        u, _ = _group_scaling(_load_rows(X, rows, cols, mask, stride_xr, stride_xc, COMPUTE), S, gs_eps, gs_cap,
                              GROUPS, COMPUTE)
        keep = row_mask
        if HAS_PAD:
            pad = tl.load(PAD + (rows // inner_rows) * stride_pad_outer + (rows % inner_rows) * stride_pad_inner,
                          mask=row_mask, other=1)
            keep = keep & (pad == 0)
        # select, never multiply: a NaN in a padded token must not reach the statistic (NaN·0 = NaN)
        u = tl.where(keep[:, None, None] & col_mask[None, :, :], u, 0.0)
        largest = tl.maximum(largest, tl.max(tl.abs(u), axis=0))
        new_scale = power_of_two_scale(largest, cap, COMPUTE)
        ratio = new_scale / scale
        us = u * new_scale[None, :, :]
        acc = acc * ratio * ratio + tl.sum(us * us, axis=0)
        scale = new_scale
        valid_rows += keep.to(COMPUTE)
    out = PARTIALS + pid.to(tl.int64) * (2 * C + 1)
    cols = tl.arange(0, BLOCK_G)[:, None] * S + tl.arange(0, BLOCK_S)[None, :]
    col_mask = (tl.arange(0, BLOCK_G) < G)[:, None] & (tl.arange(0, BLOCK_S) < S)[None, :]
    tl.store(out + cols, acc, mask=col_mask)
    tl.store(out + C + cols, scale, mask=col_mask)
    tl.store(out + 2 * C, tl.sum(valid_rows, axis=0))


@triton.jit
def _valid_count(PARTIALS, num_programs, C, BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr):
    count = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    for start in range(0, num_programs, BLOCK_P):
        programs = start + tl.arange(0, BLOCK_P)
        count += tl.load(PARTIALS + programs.to(tl.int64) * (2 * C + 1) + 2 * C, mask=programs < num_programs,
                         other=0.0)
    return tl.sum(count, axis=0)


@triton.jit
def _combined_moment(PARTIALS, num_programs, C, cols, col_mask, COMPUTE: tl.constexpr):
    """``(Σ (u·s)², s)`` of channels ``cols`` over every program, at the smallest of their scales (in a fixed order)."""
    total = tl.zeros_like(cols).to(COMPUTE)
    scale = total + float("inf")
    for p in range(0, num_programs):
        row = PARTIALS + p * (2 * C + 1)
        part = tl.load(row + cols, mask=col_mask, other=0.0)
        part_scale = tl.load(row + C + cols, mask=col_mask, other=1.0)
        new_scale = tl.minimum(scale, part_scale)
        ratio = new_scale / part_scale
        total = total * (new_scale / scale) * (new_scale / scale) + part * ratio * ratio
        scale = new_scale
    return total, scale


@triton.jit
def _batch_statistic(PARTIALS, num_programs, C, cols, col_mask, count, fallback, COMPUTE: tl.constexpr):
    """``(q·s², s)``: the mean over the valid rows of ``u²``, scaled by ``s²``, and ``s``; ``(fallback, 1)`` when no
    row is valid (where the official code divides 0 by 0)."""
    total, scale = _combined_moment(PARTIALS, num_programs, C, cols, col_mask, COMPUTE)
    # Scaled, the sum overflows only when an input is infinite: NaN then, as the reference's (not x·rsqrt(inf) = 0).
    total = tl.where(total == float("inf"), float("nan"), total)
    empty = count == 0
    scaled = tl.where(empty, fallback, total / tl.where(empty, 1.0, count))
    return scaled, tl.where(empty, 1.0, scale)


@triton.jit
def _channel_chunk(PARTIALS, RUNNING, start, num_programs, C, count, BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr):
    """Channels ``start …`` of a finalize loop: ``(cols, mask, running statistic, q·s², s, q)`` (the running value
    standing in for ``q`` when no row is valid)."""
    cols = start + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    running = _load_channels(RUNNING, cols, col_mask, 0.0, COMPUTE)
    q_scaled, s = _batch_statistic(PARTIALS, num_programs, C, cols, col_mask, count, running, COMPUTE)
    return cols, col_mask, running, q_scaled, s, q_scaled / s / s


@triton.jit
def _store_step(ITERS, STEP, t):
    """Write the incremented step counter once every thread has read the old one (a barrier first; a finalize's
    last act)."""
    tl.debug_barrier()
    tl.store(ITERS, t)
    tl.store(STEP, t)


@triton.jit
def power_norm_finalize_kernel(
    PARTIALS, RUNNING_PHI, ITERS, STEP, SCALE, GRAD_SCALE, num_programs, C, eps, alpha_fwd, warmup_iters,
    GRAD_FROM_BATCH: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program (it reads and increments the step counter). mask_powernorm.py L56–70, per channel: the denominator
    # d is the batch's q up to warm-up, then φ before this step's update; φ moves towards q.
    t = tl.load(ITERS) + 1
    tf = t.to(COMPUTE)
    count = _valid_count(PARTIALS, num_programs, C, BLOCK_P, COMPUTE)
    for start in range(0, C, BLOCK_C):
        cols, col_mask, phi, q_scaled, s, q = _channel_chunk(PARTIALS, RUNNING_PHI, start, num_programs, C, count,
                                                             BLOCK_C, COMPUTE)
        # 1/sqrt(q + eps) from the scaled statistic: s/sqrt(q·s² + eps·s²)
        batch_scale = s * tl.math.rsqrt(q_scaled + eps * s * s)
        tl.store(SCALE + cols, tl.where(t <= warmup_iters, batch_scale, tl.math.rsqrt(phi + eps)), mask=col_mask)
        if GRAD_FROM_BATCH:
            tl.store(GRAD_SCALE + cols, s / tl.sqrt(q_scaled + eps * s * s), mask=col_mask)
        else:
            tl.store(GRAD_SCALE + cols, 1.0 / tl.sqrt(phi + eps), mask=col_mask)
        cumulative = tl.where(t < warmup_iters, phi * (tf - 1.0) / tf + q / tf, phi)
        tl.store(RUNNING_PHI + cols, alpha_fwd * cumulative + (1.0 - alpha_fwd) * q, mask=col_mask)
    _store_step(ITERS, STEP, t)


@triton.jit
def _window_means(BUFFER, M, C, slot, slot_value, cols, col_mask, GEOMETRIC: tl.constexpr, COMPUTE: tl.constexpr):
    """Arithmetic and (with GEOMETRIC, else the arithmetic again) geometric mean over the ``M`` rows of a ring buffer
    ``(M, C)`` whose row ``slot`` holds ``slot_value`` (rounded to the buffer's dtype, as once written there)."""
    total = tl.zeros_like(cols).to(COMPUTE)
    log_total = tl.zeros_like(cols).to(COMPUTE)
    written = slot_value.to(BUFFER.dtype.element_ty).to(COMPUTE)
    for m in range(0, M):
        stored = tl.load(BUFFER + m * C + cols, mask=col_mask, other=1.0).to(COMPUTE)
        value = tl.where(m == slot, written, stored)
        total += value
        if GEOMETRIC:
            log_total += tl.log(value)
    if GEOMETRIC:
        return total / M, tl.exp(log_total / M)
    else:
        return total / M, total / M


@triton.jit
def _pooled_root_variance(BUFFER, M, C, BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr):
    """The unbiased variance of ``sqrt`` of every entry of the ``(M, C)`` buffer (one scalar, as ``torch.var``)."""
    n = M * C
    total = tl.zeros((BLOCK_C,), dtype=COMPUTE)
    for start in range(0, n, BLOCK_C):
        idx = start + tl.arange(0, BLOCK_C)
        total += tl.sqrt(tl.load(BUFFER + idx, mask=idx < n, other=0.0).to(COMPUTE))
    mean = tl.sum(total, axis=0) / n
    squares = tl.zeros((BLOCK_C,), dtype=COMPUTE)
    for start in range(0, n, BLOCK_C):
        idx = start + tl.arange(0, BLOCK_C)
        d = tl.where(idx < n, tl.sqrt(tl.load(BUFFER + idx, mask=idx < n, other=0.0).to(COMPUTE)) - mean, 0.0)
        squares += d * d
    return tl.sum(squares, axis=0) / (n - 1)


@triton.jit
def unified_norm_finalize_kernel(
    PARTIALS, RUNNING_VAR, BUFFER_X2, SKIP_COUNTER, ITERS, STEP, SKIP, INV_STD, R_OUT, num_programs, C, M, eps,
    momentum, warmup_iters, r_clamp_from,
    SINGLE_SLOT: tl.constexpr, OUTLIER_FILTRATION: tl.constexpr, GRAD_COMPENSATION: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program: the step counter, the one pooled variance over the whole window and the any-channel outlier test
    # are global. unified_normalization.py L27–73, per channel (normlayers.reference.unified_norm has the formulas).
    t = tl.load(ITERS) + 1
    skips = tl.load(SKIP_COUNTER)
    slot = t % M
    count = _valid_count(PARTIALS, num_programs, C, BLOCK_P, COMPUTE)
    outlier = t < 0  # False, as a tensor
    if OUTLIER_FILTRATION:
        pooled = _pooled_root_variance(BUFFER_X2, M, C, BLOCK_C, COMPUTE)  # before this step's write
        spread = tl.zeros((BLOCK_C,), dtype=tl.int32)
        for start in range(0, C, BLOCK_C):
            cols, col_mask, running, _, _, q = _channel_chunk(PARTIALS, RUNNING_VAR, start, num_programs, C, count,
                                                              BLOCK_C, COMPUTE)
            arithmetic, geometric = _window_means(BUFFER_X2, M, C, slot, q, cols, col_mask, True, COMPUTE)
            spread |= (col_mask & ((arithmetic - geometric) > pooled * M)).to(tl.int32)
        outlier = (t >= warmup_iters) & (tl.max(spread, axis=0) > 0)
    skip = outlier | SINGLE_SLOT
    tl.store(SKIP, skip.to(tl.int8))
    use_batch = (t <= M) | (t < warmup_iters) | skip
    keep_one = (t <= r_clamp_from) | skip
    for start in range(0, C, BLOCK_C):
        cols, col_mask, running, q_scaled, s, q = _channel_chunk(PARTIALS, RUNNING_VAR, start, num_programs, C, count,
                                                                 BLOCK_C, COMPUTE)
        written = tl.where(outlier, running, q)
        _, geometric = _window_means(BUFFER_X2, M, C, slot, written, cols, col_mask, True, COMPUTE)
        tl.store(BUFFER_X2 + slot * C + cols, written, mask=col_mask)
        var = tl.where(use_batch, q, geometric)
        tl.store(INV_STD + cols, tl.where(use_batch, s * tl.math.rsqrt(q_scaled + eps * s * s),
                                          tl.math.rsqrt(geometric + eps)), mask=col_mask)
        if GRAD_COMPENSATION:
            std = tl.where(use_batch, tl.sqrt(q_scaled + eps * s * s) / s, tl.sqrt(geometric + eps))
            r = tl.minimum(tl.maximum(std / tl.sqrt(running + eps), 0.2), 5.0)
            r = tl.where(keep_one, 1.0, r)
        else:
            r = tl.full((BLOCK_C,), 1.0, dtype=COMPUTE)
        tl.store(R_OUT + cols, r, mask=col_mask)
        tl.store(RUNNING_VAR + cols, momentum * running + (1.0 - momentum) * var, mask=col_mask)
    _store_step(ITERS, STEP, t)
    if OUTLIER_FILTRATION:
        tl.store(SKIP_COUNTER, skips + outlier.to(tl.int64))  # after _store_step's barrier: every thread read it


@triton.jit
def token_affine_kernel(
    X, SCALE, WEIGHT, BIAS, OUT, R, G, S, stride_xr, stride_xc, stride_or, stride_oc, eps, gs_eps, gs_cap,
    GROUPS: tl.constexpr, SCALE_FROM_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Grid: (row tiles,). out = GroupScaling(x)·scale[c]·weight[c] + bias[c]; with SCALE_FROM_RUNNING the scale is
    # rsqrt(SCALE[c] + eps) of a running statistic (eval).
    rows, cols, row_mask, col_mask, mask = _row_tile(tl.program_id(0), R, G, S, BLOCK_R, BLOCK_G, BLOCK_S)
    u, _ = _group_scaling(_load_rows(X, rows, cols, mask, stride_xr, stride_xc, COMPUTE), S, gs_eps, gs_cap, GROUPS,
                          COMPUTE)
    scale = _load_channels(SCALE, cols, col_mask, 0.0, COMPUTE)
    if SCALE_FROM_RUNNING:
        scale = 1.0 / tl.sqrt(scale + eps)
    y = u * scale[None, :, :]
    if HAS_WEIGHT:
        y = y * _load_channels(WEIGHT, cols, col_mask, 0.0, COMPUTE)[None, :, :]
    if HAS_BIAS:
        y = y + _load_channels(BIAS, cols, col_mask, 0.0, COMPUTE)[None, :, :]
    tl.store(OUT + rows[:, None, None] * stride_or + cols[None, :, :] * stride_oc, y, mask=mask)


@triton.jit
def token_grad_kernel(
    X, DY, SCALE, WEIGHT, EMA_GZ, GRAD_SCALE, DX, PARTIALS, R, G, S, stride_xr, stride_xc, stride_dyr, stride_dyc,
    stride_dxr, stride_dxc, gs_eps, gs_cap, ema_factor, tiles_per_program,
    GROUPS: tl.constexpr, HAS_WEIGHT: tl.constexpr, POWER: tl.constexpr, HAS_EMA: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Grid: (P,), program p walks row tiles p, p + P, ... With z = GroupScaling(x)·SCALE[c], it writes PARTIALS[p] =
    # (Σ dy·z, Σ dy, and with POWER Σ (g − k·z)·z, g = dy·weight, k = ema_factor·EMA_GZ[c] with HAS_EMA else 0) per
    # channel, over all rows. POWER (PowerNorm's approximate backward, mask_powernorm.py L74–95; with k = 0 the exact
    # gradient of the eval affine) also writes DX: GroupScaling's backward of du = (g − k·z)·GRAD_SCALE[c].
    pid = tl.program_id(0)
    C = G * S
    sum_dyz = tl.zeros((BLOCK_G, BLOCK_S), dtype=COMPUTE)
    sum_dy = tl.zeros((BLOCK_G, BLOCK_S), dtype=COMPUTE)
    sum_gz = tl.zeros((BLOCK_G, BLOCK_S), dtype=COMPUTE)
    for tile in range(0, tiles_per_program):
        rows, cols, row_mask, col_mask, mask = _row_tile(pid + tile * tl.num_programs(0), R, G, S, BLOCK_R, BLOCK_G,
                                                         BLOCK_S)
        u, factor = _group_scaling(_load_rows(X, rows, cols, mask, stride_xr, stride_xc, COMPUTE), S, gs_eps, gs_cap,
                                   GROUPS, COMPUTE)
        dy = _load_rows(DY, rows, cols, mask, stride_dyr, stride_dyc, COMPUTE)
        z = u * _load_channels(SCALE, cols, col_mask, 0.0, COMPUTE)[None, :, :]
        sum_dyz += tl.sum(dy * z, axis=0)
        sum_dy += tl.sum(dy, axis=0)
        if POWER:
            g = dy
            if HAS_WEIGHT:
                g = dy * _load_channels(WEIGHT, cols, col_mask, 0.0, COMPUTE)[None, :, :]
            approx = g
            if HAS_EMA:
                approx = g - (ema_factor * _load_channels(EMA_GZ, cols, col_mask, 0.0, COMPUTE))[None, :, :] * z
            sum_gz += tl.sum(approx * z, axis=0)
            du = approx * _load_channels(GRAD_SCALE, cols, col_mask, 0.0, COMPUTE)[None, :, :]
            if GROUPS:
                # u = x·ρ with ρ = rsqrt(mean over the group of x² + eps): dx = ρ·(du − u·mean over the group of du·u)
                mean_duu = tl.sum(du * u, axis=2) / tl.cast(S, COMPUTE)
                du = factor[:, :, None] * (du - u * mean_duu[:, :, None])
            tl.store(DX + rows[:, None, None] * stride_dxr + cols[None, :, :] * stride_dxc, du, mask=mask)
    out = PARTIALS + pid.to(tl.int64) * (3 * C)
    cols = tl.arange(0, BLOCK_G)[:, None] * S + tl.arange(0, BLOCK_S)[None, :]
    col_mask = (tl.arange(0, BLOCK_G) < G)[:, None] & (tl.arange(0, BLOCK_S) < S)[None, :]
    tl.store(out + cols, sum_dyz, mask=col_mask)
    tl.store(out + C + cols, sum_dy, mask=col_mask)
    tl.store(out + 2 * C + cols, sum_gz, mask=col_mask)  # zeros without POWER: every output byte is defined


@triton.jit
def _grad_sums(PARTIALS, num_programs, C, cols, col_mask, WHICH: tl.constexpr, COMPUTE: tl.constexpr):
    total = tl.zeros_like(cols).to(COMPUTE)
    for p in range(0, num_programs):
        total += tl.load(PARTIALS + p * (3 * C) + WHICH * C + cols, mask=col_mask, other=0.0)
    return total


@triton.jit
def power_norm_finalize_bwd_kernel(
    PARTIALS, EMA_GZ, DWEIGHT, DBIAS, num_programs, C, row_count,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid: (channel blocks,). ema_gz += mean over all rows of (g − k·z)·z (0 for no rows); dweight = Σ dy·z,
    # dbias = Σ dy.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    ema = _load_channels(EMA_GZ, cols, col_mask, 0.0, COMPUTE)
    sum_gz = _grad_sums(PARTIALS, num_programs, C, cols, col_mask, 2, COMPUTE)
    tl.store(EMA_GZ + cols, ema + sum_gz / row_count, mask=col_mask)
    if HAS_WEIGHT:
        tl.store(DWEIGHT + cols, _grad_sums(PARTIALS, num_programs, C, cols, col_mask, 0, COMPUTE), mask=col_mask)
    if HAS_BIAS:
        tl.store(DBIAS + cols, _grad_sums(PARTIALS, num_programs, C, cols, col_mask, 1, COMPUTE), mask=col_mask)


@triton.jit
def unified_norm_finalize_bwd_kernel(
    PARTIALS, WEIGHT, R_IN, STEP, SKIP, EMA_GZ, BUFFER_GZ, COEFF, DWEIGHT, DBIAS, num_programs, C, row_count, M,
    momentum,
    warmup_iters, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid: (channel blocks,). unified_normalization.py L76–110: gz = mean over all rows of g·z with g = dy·weight·r;
    # buffer_gz[t % M] = ema_gz if skip else gz; ema_gz moves towards gz (warm-up, skip) or the window's mean;
    # COEFF = gz if skip else the new ema_gz (the c of dx = (g − c·z)·inv_std); dweight = Σ dy·r·z, dbias = Σ dy.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    t = tl.load(STEP)
    skip = tl.load(SKIP) != 0
    slot = t % M
    r = _load_channels(R_IN, cols, col_mask, 0.0, COMPUTE)
    sum_dyz = _grad_sums(PARTIALS, num_programs, C, cols, col_mask, 0, COMPUTE)
    gz = _load_channels(WEIGHT, cols, col_mask, 0.0, COMPUTE) * r * sum_dyz / row_count
    old = _load_channels(EMA_GZ, cols, col_mask, 0.0, COMPUTE)
    written = tl.where(skip, old, gz)
    window_mean, _ = _window_means(BUFFER_GZ, M, C, slot, written, cols, col_mask, False, COMPUTE)
    tl.store(BUFFER_GZ + slot * C + cols, written, mask=col_mask)
    use_batch = (t <= M) | (t < warmup_iters) | skip
    new = momentum * old + (1.0 - momentum) * tl.where(use_batch, gz, window_mean)
    tl.store(EMA_GZ + cols, new, mask=col_mask)
    tl.store(COEFF + cols, tl.where(skip, gz, new), mask=col_mask)
    tl.store(DWEIGHT + cols, r * sum_dyz, mask=col_mask)
    tl.store(DBIAS + cols, _grad_sums(PARTIALS, num_programs, C, cols, col_mask, 1, COMPUTE), mask=col_mask)


@triton.jit
def unified_norm_dx_kernel(
    X, DY, INV_STD, WEIGHT, R_IN, COEFF, DX, R, C, stride_xr, stride_xc, stride_dyr, stride_dyc, stride_dxr,
    stride_dxc, COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Grid: (row tiles,). dx = (dy·weight·r − c·z)·inv_std with z = x·inv_std.
    rows, cols, row_mask, col_mask, mask = _row_tile(tl.program_id(0), R, 1, C, BLOCK_R, 1, BLOCK_S)
    inv_std = _load_channels(INV_STD, cols, col_mask, 0.0, COMPUTE)[None, :, :]
    z = _load_rows(X, rows, cols, mask, stride_xr, stride_xc, COMPUTE) * inv_std
    g = (_load_rows(DY, rows, cols, mask, stride_dyr, stride_dyc, COMPUTE)
         * _load_channels(WEIGHT, cols, col_mask, 0.0, COMPUTE)[None, :, :]
         * _load_channels(R_IN, cols, col_mask, 0.0, COMPUTE)[None, :, :])
    dx = (g - _load_channels(COEFF, cols, col_mask, 0.0, COMPUTE)[None, :, :] * z) * inv_std
    tl.store(DX + rows[:, None, None] * stride_dxr + cols[None, :, :] * stride_dxc, dx, mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers of the fused layers. ``x`` is the layer's input, 2-D (B, C) or 3-D; its token rows are x.reshape(-1, C)
# (a view for every layout the layers' callers make). Per-channel vectors are contiguous (C,).
# ----------------------------------------------------------------------------------------------------------------------

# Channel block of the one-program finalize kernels, and how many partial rows they add per step.
FINALIZE_BLOCK_C = 1024
FINALIZE_BLOCK_P = 64


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _row_layout(rows: int, channels: int, groups: int) -> tuple[int, int, int]:
    block_g, block_s = next_power_of_2(groups), next_power_of_2(channels // groups)
    block_r = min(max(ROW_TILE_ELEMENTS // (block_g * block_s), 1), next_power_of_2(max(rows, 1)))
    return block_r, block_g, block_s


def _group_scaling_args(groups: int, compute: torch.dtype) -> dict:
    from normlayers.reference.power_norm import GROUP_SCALING_EPS

    return dict(gs_eps=GROUP_SCALING_EPS, gs_cap=scale_cap(GROUP_SCALING_EPS, compute))


def reduction_programs(rows: int, channels: int, groups: int, device: torch.device) -> int:
    """Programs of the moments and gradient reductions over ``rows`` tokens (their partial rows)."""
    block_r = _row_layout(rows, channels, groups)[0]
    return max(1, min(triton.cdiv(rows, block_r), persistent_programs(device, PROGRAMS_PER_SM)))


def _pad_layout(x: torch.Tensor, pad_mask: Optional[torch.Tensor], time_major: bool) -> tuple:
    """(pad as uint8 or x, inner_rows, stride_outer, stride_inner): row r is pad[r // inner_rows, r % inner_rows]."""
    if pad_mask is None:
        return x, 1, 0, 0
    pad = pad_mask.view(torch.uint8)
    if x.dim() == 2:
        return pad, 1, pad.stride(0), 0
    if time_major:  # rows t·B + b, pad (B, T)
        return pad, x.shape[1], pad.stride(1), pad.stride(0)
    return pad, x.shape[1], pad.stride(0), pad.stride(1)


def token_moments(x: torch.Tensor, pad_mask: Optional[torch.Tensor], time_major: bool, groups: Optional[int],
                  eps: float) -> torch.Tensor:
    """The partial rows ``(P, 2C + 1)`` of the scaled second moment of ``u = GroupScaling(x)`` (``x`` without
    ``groups``) over the valid tokens: per program (Σ (u·s)², s) per channel and its number of valid rows."""
    rows_2d = _rows_of(x)
    rows, channels = rows_2d.shape
    g = groups or 1
    compute = compute_dtype(x.dtype)
    block_r, block_g, block_s = _row_layout(rows, channels, g)
    programs = reduction_programs(rows, channels, g, x.device)
    partials = torch.empty((programs, 2 * channels + 1), dtype=compute, device=x.device)
    pad, inner_rows, stride_outer, stride_inner = _pad_layout(x, pad_mask, time_major)
    token_moments_kernel[(programs,)](
        rows_2d, pad, partials, rows, g, channels // g, inner_rows, rows_2d.stride(0), rows_2d.stride(1), stride_outer,
        stride_inner, **_group_scaling_args(g, compute), cap=scale_cap(eps, compute),
        tiles_per_program=triton.cdiv(triton.cdiv(rows, block_r), programs),
        GROUPS=groups is not None, HAS_PAD=pad_mask is not None, COMPUTE=tl_compute_dtype(compute),
        BLOCK_R=block_r, BLOCK_G=block_g, BLOCK_S=block_s, num_warps=num_warps_for(block_r * block_g * block_s,
                                                                                  x.device),
    )
    return partials


def _finalize_launch(channels: int) -> dict:
    return dict(BLOCK_C=min(next_power_of_2(channels), FINALIZE_BLOCK_C), num_warps=4)


def power_norm_finalize(partials: torch.Tensor, running_phi: torch.Tensor, iters: torch.Tensor, *, eps: float,
                        alpha_fwd: float, warmup_iters: int,
                        grad_from_batch: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, grad_scale, step)`` of a PowerNorm training step; updates ``running_phi`` (flat ``(C,)``) and
    increments ``iters`` in place; ``step`` is a copy of the new step number."""
    channels = running_phi.shape[0]
    compute = partials.dtype
    scale = torch.empty(channels, dtype=compute, device=partials.device)
    grad_scale = torch.empty_like(scale)
    step = torch.empty_like(iters)
    power_norm_finalize_kernel[(1,)](
        partials, running_phi, iters, step, scale, grad_scale, partials.shape[0], channels, eps, alpha_fwd,
        warmup_iters, GRAD_FROM_BATCH=grad_from_batch, COMPUTE=tl_compute_dtype(compute),
        BLOCK_P=FINALIZE_BLOCK_P, **_finalize_launch(channels),
    )
    return scale, grad_scale, step


def unified_norm_finalize(partials: torch.Tensor, running_var: torch.Tensor, buffer_x2: torch.Tensor,
                          skip_counter: torch.Tensor, iters: torch.Tensor, *, eps: float, momentum: float,
                          warmup_iters: int, outlier_filtration: bool, grad_compensation: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inv_std, r, step, skip)`` of a UnifiedNorm training step (``skip`` an int8 flag); updates ``running_var``,
    ``buffer_x2``, ``skip_counter`` and ``iters`` in place."""
    from normlayers.reference.unified_norm import R_CLAMP_START

    channels = running_var.shape[0]
    compute = partials.dtype
    inv_std = torch.empty(channels, dtype=compute, device=partials.device)
    r = torch.empty_like(inv_std)
    step = torch.empty_like(iters)
    skip = torch.empty(1, dtype=torch.int8, device=partials.device)
    unified_norm_finalize_kernel[(1,)](
        partials, running_var, buffer_x2, skip_counter, iters, step, skip, inv_std, r, partials.shape[0], channels,
        buffer_x2.shape[0], eps, momentum, warmup_iters, max(R_CLAMP_START, warmup_iters),
        SINGLE_SLOT=buffer_x2.shape[0] <= 1, OUTLIER_FILTRATION=outlier_filtration, GRAD_COMPENSATION=grad_compensation,
        COMPUTE=tl_compute_dtype(compute), BLOCK_P=FINALIZE_BLOCK_P, **_finalize_launch(channels),
    )
    return inv_std, r, step, skip


def token_affine(x: torch.Tensor, scale: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 groups: Optional[int], running_eps: Optional[float], out_dtype: torch.dtype) -> torch.Tensor:
    """``GroupScaling(x)·scale[c]·weight[c] + bias[c]`` (no GroupScaling without ``groups``), contiguous, shaped as
    ``x``, in ``out_dtype``; with ``running_eps`` the per-channel factor is ``rsqrt(scale + running_eps)``."""
    rows_2d = _rows_of(x)
    rows, channels = rows_2d.shape
    g = groups or 1
    compute = compute_dtype(x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    out_2d = out.view(rows, channels)
    block_r, block_g, block_s = _row_layout(rows, channels, g)
    if rows == 0:
        return out
    token_affine_kernel[(triton.cdiv(rows, block_r),)](
        rows_2d, scale, weight if weight is not None else scale, bias if bias is not None else scale, out_2d, rows, g,
        channels // g, rows_2d.stride(0), rows_2d.stride(1), out_2d.stride(0), out_2d.stride(1),
        running_eps if running_eps is not None else 0.0, **_group_scaling_args(g, compute),
        GROUPS=groups is not None, SCALE_FROM_RUNNING=running_eps is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, COMPUTE=tl_compute_dtype(compute), BLOCK_R=block_r, BLOCK_G=block_g,
        BLOCK_S=block_s, num_warps=num_warps_for(block_r * block_g * block_s, x.device),
    )
    return out


def token_grad(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, weight: Optional[torch.Tensor],
               ema_gz: Optional[torch.Tensor], ema_factor: float, grad_scale: Optional[torch.Tensor],
               groups: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, partials)`` over every row, ``z = GroupScaling(x)·scale``: partial rows ``(P, 3C)`` of
    ``(Σ dy·z, Σ dy, Σ (g − k·z)·z)`` per channel with ``g = dy·weight``, ``k = ema_factor·ema_gz`` (0 without
    ``ema_gz``). With ``grad_scale`` also ``dx`` (shaped as ``x``): GroupScaling's backward of
    ``(g − k·z)·grad_scale``; without it only the first two sums, and ``dx`` is empty."""
    rows_2d, dy_2d = _rows_of(x), _rows_of(dy)
    rows, channels = rows_2d.shape
    g = groups or 1
    compute = compute_dtype(x.dtype)
    power = grad_scale is not None
    dx = torch.empty(x.shape if power else (0,), dtype=x.dtype, device=x.device)
    dx_2d = dx.view(rows, channels) if power else rows_2d
    block_r, block_g, block_s = _row_layout(rows, channels, g)
    programs = reduction_programs(rows, channels, g, x.device)
    partials = torch.empty((programs, 3 * channels), dtype=compute, device=x.device)
    token_grad_kernel[(programs,)](
        rows_2d, dy_2d, scale, weight if weight is not None else scale, ema_gz if ema_gz is not None else scale,
        grad_scale if power else scale, dx_2d, partials, rows, g, channels // g, rows_2d.stride(0), rows_2d.stride(1),
        dy_2d.stride(0), dy_2d.stride(1), dx_2d.stride(0), dx_2d.stride(1), **_group_scaling_args(g, compute),
        ema_factor=ema_factor, tiles_per_program=triton.cdiv(triton.cdiv(rows, block_r), programs),
        GROUPS=groups is not None, HAS_WEIGHT=weight is not None, POWER=power, HAS_EMA=ema_gz is not None,
        COMPUTE=tl_compute_dtype(compute), BLOCK_R=block_r, BLOCK_G=block_g, BLOCK_S=block_s,
        num_warps=num_warps_for(block_r * block_g * block_s, x.device),
    )
    return dx, partials


def _param_grad(param: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(param) if param is not None else like.new_empty(0)


def power_norm_finalize_bwd(partials: torch.Tensor, ema_gz: torch.Tensor, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dweight, dbias)`` (in their parameters' dtypes; empty for a missing one) from :func:`token_grad`'s partials;
    adds the mean over ``rows`` of ``(g − k·z)·z`` to ``ema_gz`` (flat ``(C,)``) in place."""
    channels = ema_gz.shape[0]
    dweight, dbias = _param_grad(weight, partials), _param_grad(bias, partials)
    block_c = min(next_power_of_2(channels), MAX_BLOCK_C)
    power_norm_finalize_bwd_kernel[(triton.cdiv(channels, block_c),)](
        partials, ema_gz, dweight, dbias, partials.shape[0], channels, float(max(rows, 1)),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, COMPUTE=tl_compute_dtype(partials.dtype),
        BLOCK_C=block_c, num_warps=4,
    )
    return dweight, dbias


def unified_norm_finalize_bwd(partials: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, step: torch.Tensor,
                              skip: torch.Tensor, ema_gz: torch.Tensor, buffer_gz: torch.Tensor, rows: int, *,
                              momentum: float, warmup_iters: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c, dweight, dbias)`` of UnifiedNorm's backward from :func:`token_grad`'s partials; updates ``ema_gz`` and
    ``buffer_gz`` in place."""
    channels = ema_gz.shape[0]
    coeff = torch.empty_like(r)
    dweight, dbias = torch.empty_like(weight), torch.empty_like(weight)
    block_c = min(next_power_of_2(channels), MAX_BLOCK_C)
    unified_norm_finalize_bwd_kernel[(triton.cdiv(channels, block_c),)](
        partials, weight, r, step, skip, ema_gz, buffer_gz, coeff, dweight, dbias, partials.shape[0], channels,
        float(max(rows, 1)), buffer_gz.shape[0], momentum, warmup_iters, COMPUTE=tl_compute_dtype(partials.dtype),
        BLOCK_C=block_c, num_warps=4,
    )
    return coeff, dweight, dbias


def unified_norm_dx(x: torch.Tensor, dy: torch.Tensor, inv_std: torch.Tensor, weight: torch.Tensor,
                    r: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """``dx = (dy·weight·r − c·x·inv_std)·inv_std``, shaped as ``x``, in its dtype."""
    rows_2d, dy_2d = _rows_of(x), _rows_of(dy)
    rows, channels = rows_2d.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx_2d = dx.view(rows, channels)
    block_r, _, block_s = _row_layout(rows, channels, 1)
    if rows == 0:
        return dx
    unified_norm_dx_kernel[(triton.cdiv(rows, block_r),)](
        rows_2d, dy_2d, inv_std, weight, r, coeff, dx_2d, rows, channels, rows_2d.stride(0), rows_2d.stride(1),
        dy_2d.stride(0), dy_2d.stride(1), dx_2d.stride(0), dx_2d.stride(1),
        COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)), BLOCK_R=block_r, BLOCK_S=block_s,
        num_warps=num_warps_for(block_r * block_s, x.device),
    )
    return dx
