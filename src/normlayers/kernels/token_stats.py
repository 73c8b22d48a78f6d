"""Triton kernels for per-channel statistics across tokens, shared by PowerNorm and UnifiedNorm.

Both layers see their input as ``(R, C)`` token rows (any row and channel stride) and need, per channel ``c``:

* forward: ``Σ_valid x²`` over the non-pad rows (the quadratic mean's numerator; the count is a torch reduction of
  the mask), then the per-channel affine ``y = x·P[c] + S[c]``;
* backward: ``Σ dy·x``, ``Σ dy`` and ``Σ x²`` over **all** rows (the approximate backward's reductions,
  docs/power_unified.md: pads included), and ``dx = dy·P[c] + x·Q[c]`` — in the same pass for PowerNorm, whose ``P``,
  ``Q`` are known before the reductions, in a second pass for UnifiedNorm, whose ``Q`` depends on them.

So two kernels serve both layers, with constexpr flags:

* ``token_sums_kernel``: a fixed grid of row programs × channel blocks; each program walks its share of row tiles,
  keeps fp32 per-lane partial sums, and writes one partial row per output; ``common.column_sum`` then adds the
  partials in a fixed order (deterministic, no atomics). With ``WRITE_OUT`` it also writes ``dy·P + x·Q``.
* ``channel_affine_kernel``: elementwise, ``out = x·P[c] (+ x2·Q[c]) (+ S[c])``.

The small per-channel steps between them (warm-up rules, running buffers, ring buffers, outlier filtration) are
``(C,)``/``(M, C)`` torch ops on device, shared with the reference; nothing is read back to the host. Arithmetic is
fp32 (fp64 for fp64 inputs); offsets are int64.
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
