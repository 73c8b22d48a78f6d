"""Triton kernels for Group Normalization with a fused activation: three launches forward (two when no backward
follows), four backward.

An ``(N, C, *spatial)`` input is read in place as ``(N, C, HW)`` (:func:`~normlayers.kernels.common.as_planes`: a
view for NCHW, channels-last and channel slices). Group ``g`` of sample ``n`` holds ``CPG = C / G`` channels × ``HW``
values, so a wide group (a VAE's 1×512×64×64 has 32 groups of 65536 values) is split over many programs:

* ``group_norm_moments_kernel``, grid ``(N·G, splits)``: each program reduces one block of a group's channels over
  one range of ``HW`` to its ``(Σx, centred M2, count)``, tile by tile with Chan's combination (never
  ``E[x²] − E[x]²``). ``splits`` is chosen from the shape so that about :data:`PROGRAMS_PER_SM` programs per SM run.
* ``group_norm_finalize_kernel``: each group's mean and ``rstd`` from its partials, combined exactly
  (``M2 = Σ M2ᵢ + Σ nᵢ(meanᵢ − mean)²``) in a fixed order.
* ``group_norm_apply_kernel``: ``act((x − mean)·rstd·γ + β)`` elementwise over ``(channel block, HW block)`` tiles
  that cross group boundaries (a channels-last tile reads whole rows of channels). When no gradient is needed
  (evaluation, ``torch.no_grad``) it finalizes inside the normalize pass instead: each program combines the partials
  of its tile's groups itself, as the finalize kernel would (its formula over the same partials), a cheap redundant
  finalize that saves the launch (:func:`finalizes_inline`).

Backward, with ``ŷ = (x − mean)·rstd``, ``y = ŷγ + β``, ``g = dz·act'(y)`` (``y`` and the activation recomputed from
the saved per-group mean and ``rstd``: nothing of the input's size is saved besides the input):
``dx = rstd·(gγ − Σ_group(gγ)/M − ŷ·Σ_group(gγŷ)/M)`` with ``M = CPG·HW``, ``dγ = Σ_{n,hw} g·ŷ``, ``dβ = Σ_{n,hw} g``.

* ``group_norm_bwd_reduce_kernel`` (the forward's split): per program its channels' ``Σ g·ŷ`` and ``Σ g`` over its
  ``HW`` range, written to its own cells of a ``(N·hw_splits, 2C)`` partial buffer, and the group sums
  ``Σ gγ = Σ_c γ_c·Σ g``, ``Σ gγŷ = Σ_c γ_c·Σ gŷ`` to the group's partials;
* ``group_norm_bwd_finalize_kernel``: each group's two sums; ``group_norm_bwd_apply_kernel``: ``dx`` elementwise;
* :func:`~normlayers.kernels.common.column_sum`: ``dγ``/``dβ`` from the partial rows, in one launch (none without
  affine parameters). Every sum is over cells only one program wrote, in a fixed order: deterministic, no atomics.

Arithmetic and statistics in fp32 (fp64 for fp64 input), offsets int64. Block shapes come from a static table:
starting points, not tuned on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from normlayers._dtypes import compute_dtype
from normlayers.kernels.common import (
    as_planes,
    column_sum,
    next_power_of_2,
    num_warps_for,
    persistent_programs,
    tl_compute_dtype,
)

# The activation fused after the norm, as the constexpr ACT takes it.
ACTIVATION_CODES = {None: 0, "silu": 1, "gelu": 2, "relu": 3}

# Values one program holds per tile, and the widest channel block of a channels-last tile (whole rows of channels
# are read contiguously). The reductions aim at PROGRAMS_PER_SM programs per SM; MAX_SPLITS bounds one group's.
TILE_ELEMENTS = 4096
MAX_CHANNEL_BLOCK = 128
PROGRAMS_PER_SM = 4
MAX_SPLITS = 1024
FINALIZE_ROWS = 16
FINALIZE_SPLITS = 64


# ----------------------------------------------------------------------------------------------------------------------
# Launch plans
# ----------------------------------------------------------------------------------------------------------------------


def _largest_power_of_2_dividing(n: int) -> int:
    return n & -n


@dataclass(frozen=True)
class ReducePlan:
    """How the reductions split the ``CPG × HW`` values of each group: ``c_blocks`` channel blocks of ``block_c``
    channels × ``hw_splits`` ranges of ``hw_per_split`` values (a multiple of ``block_hw``), one program each."""

    block_c: int
    block_hw: int
    c_blocks: int
    hw_splits: int
    hw_per_split: int

    @property
    def splits(self) -> int:
        return self.c_blocks * self.hw_splits


def reduce_plan(groups_total: int, cpg: int, hw: int, hw_contiguous: bool, device: torch.device, *,
                hw_splits: Optional[int] = None, max_block_hw: Optional[int] = None) -> ReducePlan:
    """The :class:`ReducePlan` of ``groups_total = N·G`` groups of ``cpg`` channels × ``hw`` values. With ``HW``
    contiguous (NCHW) a tile is a few whole channels' long runs (its channel block divides ``cpg``: no masked lanes);
    with channels contiguous (channels-last) it is up to 64 of a group's channels × as many pixels as fit. The
    ``HW`` split fills about :data:`PROGRAMS_PER_SM` programs per SM. ``hw_splits`` and ``max_block_hw`` override
    the table (tests use them to reach the split and chunked paths on small shapes)."""
    hw_cap = max_block_hw if max_block_hw is not None else TILE_ELEMENTS
    if hw_contiguous:
        block_hw = min(next_power_of_2(hw), 1 << (hw_cap.bit_length() - 1))
        block_c = min(_largest_power_of_2_dividing(cpg), max(TILE_ELEMENTS // block_hw, 1))
    else:
        block_c = min(next_power_of_2(cpg), 64)
        block_hw = min(next_power_of_2(hw), max(TILE_ELEMENTS // block_c, 1), 1 << (hw_cap.bit_length() - 1))
    c_blocks = triton.cdiv(cpg, block_c)
    hw_blocks = triton.cdiv(hw, block_hw)
    if hw_splits is None:
        target = persistent_programs(device, PROGRAMS_PER_SM)
        hw_splits = triton.cdiv(target, max(groups_total * c_blocks, 1))
    hw_splits = max(min(hw_splits, hw_blocks, MAX_SPLITS // c_blocks), 1)
    hw_per_split = triton.cdiv(hw_blocks, hw_splits) * block_hw
    return ReducePlan(block_c, block_hw, c_blocks, triton.cdiv(hw, hw_per_split), hw_per_split)


def elementwise_tile(c: int, hw: int, hw_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of the elementwise passes: long ``HW`` runs for NCHW, whole channel rows for
    channels-last."""
    if hw_contiguous:
        block_hw = min(next_power_of_2(hw), TILE_ELEMENTS)
        return min(next_power_of_2(c), max(TILE_ELEMENTS // block_hw, 1)), block_hw
    block_c = min(next_power_of_2(c), MAX_CHANNEL_BLOCK)
    return block_c, min(next_power_of_2(hw), max(TILE_ELEMENTS // block_c, 1))


def _hw_contiguous(x3: torch.Tensor) -> bool:
    return x3.shape[2] > 1 and x3.stride(2) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _offsets(chans, hw, stride_c, stride_hw):
    return chans.to(tl.int64)[:, None] * stride_c + hw.to(tl.int64)[None, :] * stride_hw


@triton.jit
def activate(y, ACT: tl.constexpr):
    """SiLU (1), exact GELU (2), ReLU (3, NaN kept as torch keeps it) or the identity (0)."""
    if ACT == 1:
        return y * tl.sigmoid(y)
    elif ACT == 2:
        return 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 3:
        return tl.where(y < 0.0, 0.0, y)
    else:
        return y


@triton.jit
def activation_grad(y, ACT: tl.constexpr):
    """``act'(y)`` of :func:`activate` (ReLU's is 0 at 0, as torch's threshold_backward gives)."""
    if ACT == 1:
        s = tl.sigmoid(y)
        return s * (1.0 + y * (1.0 - s))
    elif ACT == 2:
        return 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476)) + y * tl.exp(-0.5 * y * y) * 0.3989422804014327
    elif ACT == 3:
        return tl.where(y > 0.0, 1.0, 0.0)
    else:
        return y * 0.0 + 1.0


@triton.jit
def _split_of_group(G, CPG, HW, HW_SPLITS, HW_PER, BLOCK_C: tl.constexpr):
    """This program's sample ``n``, group ``g``, channel indices within the group (and which exist) and ``HW`` range,
    for a reduction launched on grid ``(N·G, c_blocks·HW_SPLITS)``."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    n = (row // G).to(tl.int64)
    g = row % G
    j = (split // HW_SPLITS) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw_start = (split % HW_SPLITS) * HW_PER
    return n, g, j, j < CPG, hw_start, tl.minimum(hw_start + HW_PER, HW)


@triton.jit
def group_norm_moments_kernel(
    X, PARTIALS, G, CPG, HW, stride_n, stride_c, stride_hw, HW_SPLITS, HW_PER,
    COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # PARTIALS is (3, N·G, splits): Σx, centred M2, count of each program's values.
    n, g, j, chan_mask, hw_start, hw_end = _split_of_group(G, CPG, HW, HW_SPLITS, HW_PER, BLOCK_C)
    base = X + n * stride_n + (g * CPG).to(tl.int64) * stride_c
    s = tl.zeros((), dtype=COMPUTE)
    m2 = tl.zeros((), dtype=COMPUTE)
    count = tl.zeros((), dtype=COMPUTE)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = chan_mask[:, None] & (hw < hw_end)[None, :]
        x = tl.load(base + _offsets(j, hw, stride_c, stride_hw), mask=mask, other=0.0).to(COMPUTE)
        n_b = tl.sum(tl.sum(mask.to(COMPUTE), axis=1), axis=0)
        s_b = tl.sum(tl.sum(x, axis=1), axis=0)
        d = tl.where(mask, x - s_b / n_b, 0.0)
        m2_b = tl.sum(tl.sum(d * d, axis=1), axis=0)
        # Chan's combination; the first tile meets count = 0, where the correction term vanishes.
        delta = s_b / n_b - s / tl.maximum(count, 1.0)
        m2 += m2_b + delta * delta * (count * n_b / (count + n_b))
        s += s_b
        count += n_b
    cell = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    plane = tl.num_programs(0).to(tl.int64) * tl.num_programs(1)
    tl.store(PARTIALS + cell, s)
    tl.store(PARTIALS + plane + cell, m2)
    tl.store(PARTIALS + 2 * plane + cell, count)


@triton.jit
def _finalize_rows(NG, SPLITS, BLOCK_R: tl.constexpr):
    """A finalize program's rows of the ``(N·G, SPLITS)`` partial planes, which exist, and one plane's size."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    return rows, rows < NG, NG.to(tl.int64) * SPLITS


@triton.jit
def _split_cells(rows, row_mask, start, SPLITS, BLOCK_S: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_S)
    return rows.to(tl.int64)[:, None] * SPLITS + cols[None, :], row_mask[:, None] & (cols < SPLITS)[None, :]


@triton.jit
def _sum_splits(PLANE_A, PLANE_B, rows, row_mask, SPLITS, COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_S: tl.constexpr):
    """Each row's sum over its ``SPLITS`` cells of two partial planes, in a fixed order."""
    sum_a = tl.zeros((BLOCK_R,), dtype=COMPUTE)
    sum_b = tl.zeros((BLOCK_R,), dtype=COMPUTE)
    for start in range(0, SPLITS, BLOCK_S):
        cells, mask = _split_cells(rows, row_mask, start, SPLITS, BLOCK_S)
        sum_a += tl.sum(tl.load(PLANE_A + cells, mask=mask, other=0.0), axis=1)
        sum_b += tl.sum(tl.load(PLANE_B + cells, mask=mask, other=0.0), axis=1)
    return sum_a, sum_b


@triton.jit
def _group_statistics(PARTIALS, rows, row_mask, NG, SPLITS, eps, COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_S: tl.constexpr):
    """``(mean, rstd)`` of the groups ``rows`` (of ``N·G``) from the moments kernel's ``(3, N·G, SPLITS)``
    partials, combined exactly in a fixed order: ``M2 = Σ M2ᵢ + Σ nᵢ(meanᵢ − mean)²``."""
    plane = NG.to(tl.int64) * SPLITS
    total, count = _sum_splits(PARTIALS, PARTIALS + 2 * plane, rows, row_mask, SPLITS, COMPUTE, BLOCK_R, BLOCK_S)
    count = tl.where(row_mask, count, 1.0)  # (rows past N·G: no 0/0)
    mean = total / count
    m2 = tl.zeros((BLOCK_R,), dtype=COMPUTE)
    for start in range(0, SPLITS, BLOCK_S):
        cells, mask = _split_cells(rows, row_mask, start, SPLITS, BLOCK_S)
        s_i = tl.load(PARTIALS + cells, mask=mask, other=0.0)
        n_i = tl.load(PARTIALS + 2 * plane + cells, mask=mask, other=1.0)
        d = tl.where(mask, s_i / n_i - mean[:, None], 0.0)
        m2 += tl.sum(tl.load(PARTIALS + plane + cells, mask=mask, other=0.0) + n_i * d * d, axis=1)
    return mean, tl.math.rsqrt(m2 / count + tl.cast(eps, COMPUTE))


@triton.jit
def group_norm_finalize_kernel(
    PARTIALS, MEAN, RSTD, NG, SPLITS, eps,
    COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    rows, row_mask, _ = _finalize_rows(NG, SPLITS, BLOCK_R)
    mean, rstd = _group_statistics(PARTIALS, rows, row_mask, NG, SPLITS, eps, COMPUTE, BLOCK_R, BLOCK_S)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _elementwise_tile(C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """This program's sample, channels, ``HW`` indices and mask in a 1-D grid of ``N·c_blocks·hw_blocks`` tiles."""
    pid = tl.program_id(0)
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = (pid // (hw_blocks * c_blocks)).to(tl.int64)
    rest = pid % (hw_blocks * c_blocks)
    chans = (rest // hw_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (rest % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    chan_mask = chans < C
    return n, chans, chan_mask, hw, chan_mask[:, None] & (hw < HW)[None, :]


@triton.jit
def _channel_params(W, B, chans, chan_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    COMPUTE: tl.constexpr):
    if HAS_WEIGHT:
        w = tl.load(W + chans, mask=chan_mask, other=0.0).to(COMPUTE)
    else:
        w = tl.full(chans.shape, 1.0, COMPUTE)
    if HAS_BIAS:
        b = tl.load(B + chans, mask=chan_mask, other=0.0).to(COMPUTE)
    else:
        b = tl.zeros(chans.shape, COMPUTE)
    return w, b


@triton.jit
def _tile_values(X, W, B, n, chans, chan_mask, hw, mask, stride_xn, stride_xc, stride_xhw,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr):
    """An elementwise tile's channels' weight and bias and its ``x`` values, in ``COMPUTE``."""
    w, b = _channel_params(W, B, chans, chan_mask, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    x = tl.load(X + n * stride_xn + _offsets(chans, hw, stride_xc, stride_xhw), mask=mask, other=0.0).to(COMPUTE)
    return w, b, x


@triton.jit
def _load_tile(X, W, B, MEAN, RSTD, n, chans, chan_mask, hw, mask, G, CPG, stride_xn, stride_xc, stride_xhw,
               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr):
    """An elementwise tile's per-channel group index into the ``(N, G)`` statistics, its channels' mean and rstd,
    and :func:`_tile_values`."""
    stats = n * G + chans // CPG
    mean = tl.load(MEAN + stats, mask=chan_mask, other=0.0)
    rstd = tl.load(RSTD + stats, mask=chan_mask, other=0.0)
    w, b, x = _tile_values(X, W, B, n, chans, chan_mask, hw, mask, stride_xn, stride_xc, stride_xhw, HAS_WEIGHT,
                           HAS_BIAS, COMPUTE)
    return stats, mean, rstd, w, b, x


@triton.jit
def _finalized_tile_statistics(PARTIALS, n, chans, G, CPG, NG, SPLITS, eps, COMPUTE: tl.constexpr,
                               BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """Each channel's group mean and ``rstd`` for an elementwise tile, finalized from the moments kernel's partials
    (what :func:`group_norm_finalize_kernel` computes): the ``BLOCK_G`` groups from the tile's
    first channel's on, each channel then picking its group's."""
    first = tl.min(chans, axis=0) // CPG
    groups = first + tl.arange(0, BLOCK_G)
    mean, rstd = _group_statistics(PARTIALS, n * G + groups, groups < G, NG, SPLITS, eps, COMPUTE, BLOCK_G, BLOCK_S)
    slot = tl.minimum(chans // CPG - first, BLOCK_G - 1)  # (channels past C: any slot, their lanes are masked)
    return tl.gather(mean, slot, axis=0), tl.gather(rstd, slot, axis=0)


@triton.jit
def group_norm_apply_kernel(
    X, W, B, MEAN, RSTD, Y, C, G, CPG, HW, NG, SPLITS, eps,
    stride_xn, stride_xc, stride_xhw, stride_yn, stride_yc, stride_yhw,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FINALIZE: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # With FINALIZE, MEAN holds the moments kernel's partials (RSTD is unused) and each program finalizes the
    # statistics of its tile's groups itself (NG, SPLITS, eps are read only then): one launch fewer where nothing
    # needs the statistics afterwards (no backward).
    n, chans, chan_mask, hw, mask = _elementwise_tile(C, HW, BLOCK_C, BLOCK_HW)
    if FINALIZE:
        mean, rstd = _finalized_tile_statistics(MEAN, n, chans, G, CPG, NG, SPLITS, eps, COMPUTE, BLOCK_G, BLOCK_S)
        w, b, x = _tile_values(X, W, B, n, chans, chan_mask, hw, mask, stride_xn, stride_xc, stride_xhw, HAS_WEIGHT,
                               HAS_BIAS, COMPUTE)
    else:
        _, mean, rstd, w, b, x = _load_tile(X, W, B, MEAN, RSTD, n, chans, chan_mask, hw, mask, G, CPG, stride_xn,
                                            stride_xc, stride_xhw, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    # Centred first: (x − mean)·(rstd·γ) keeps the result accurate when a group's mean dwarfs its spread.
    y = (x - mean[:, None]) * (rstd * w)[:, None] + b[:, None]
    tl.store(Y + n * stride_yn + _offsets(chans, hw, stride_yc, stride_yhw), activate(y, ACT), mask=mask)


@triton.jit
def group_norm_bwd_reduce_kernel(
    X, DZ, W, B, MEAN, RSTD, PARTIALS, PARAM_PARTIALS, C, G, CPG, HW,
    stride_xn, stride_xc, stride_xhw, stride_dzn, stride_dzc, stride_dzhw, HW_SPLITS, HW_PER,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PARAMS: tl.constexpr, ACT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # PARTIALS is (2, N·G, splits): Σ gγ and Σ gγŷ over this program's values. PARAM_PARTIALS is
    # (N·HW_SPLITS, 2C): row (n, hw split), its channels' Σ gŷ in the first C columns and Σ g in the last C.
    n, g, j, chan_mask, hw_start, hw_end = _split_of_group(G, CPG, HW, HW_SPLITS, HW_PER, BLOCK_C)
    row = tl.program_id(0)
    mean = tl.load(MEAN + row).to(COMPUTE)
    rstd = tl.load(RSTD + row).to(COMPUTE)
    chans = g * CPG + j
    w, b = _channel_params(W, B, chans, chan_mask, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    x_base = X + n * stride_xn
    dz_base = DZ + n * stride_dzn
    sum_gxhat = tl.zeros((BLOCK_C, BLOCK_HW), dtype=COMPUTE)
    sum_g = tl.zeros((BLOCK_C, BLOCK_HW), dtype=COMPUTE)
    for start in range(hw_start, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = chan_mask[:, None] & (hw < hw_end)[None, :]
        x = tl.load(x_base + _offsets(chans, hw, stride_xc, stride_xhw), mask=mask, other=0.0).to(COMPUTE)
        grad = tl.load(dz_base + _offsets(chans, hw, stride_dzc, stride_dzhw), mask=mask, other=0.0).to(COMPUTE)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        if ACT != 0:
            grad = grad * activation_grad(xhat * w[:, None] + b[:, None], ACT)
        sum_gxhat += grad * xhat
        sum_g += grad
    dw = tl.sum(sum_gxhat, axis=1)
    db = tl.sum(sum_g, axis=1)
    cell = row.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    plane = tl.num_programs(0).to(tl.int64) * tl.num_programs(1)
    tl.store(PARTIALS + cell, tl.sum(w * db, axis=0))
    tl.store(PARTIALS + plane + cell, tl.sum(w * dw, axis=0))
    if HAS_PARAMS:
        param_row = PARAM_PARTIALS + (n * HW_SPLITS + tl.program_id(1) % HW_SPLITS) * (2 * C)
        tl.store(param_row + chans, dw, mask=chan_mask)
        tl.store(param_row + C + chans, db, mask=chan_mask)


@triton.jit
def group_norm_bwd_finalize_kernel(
    PARTIALS, COEF, NG, SPLITS, count,
    COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # COEF is (2, N·G): mean_group(gγ) and mean_group(gγŷ).
    rows, row_mask, plane = _finalize_rows(NG, SPLITS, BLOCK_R)
    sum_gw, sum_gw_xhat = _sum_splits(PARTIALS, PARTIALS + plane, rows, row_mask, SPLITS, COMPUTE, BLOCK_R, BLOCK_S)
    count = tl.cast(count, COMPUTE)
    tl.store(COEF + rows, sum_gw / count, mask=row_mask)
    tl.store(COEF + NG + rows, sum_gw_xhat / count, mask=row_mask)


@triton.jit
def group_norm_bwd_apply_kernel(
    X, DZ, W, B, MEAN, RSTD, COEF, DX, C, G, CPG, HW, NG,
    stride_xn, stride_xc, stride_xhw, stride_dzn, stride_dzc, stride_dzhw, stride_dxn, stride_dxc, stride_dxhw,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n, chans, chan_mask, hw, mask = _elementwise_tile(C, HW, BLOCK_C, BLOCK_HW)
    stats, mean, rstd, w, b, x = _load_tile(X, W, B, MEAN, RSTD, n, chans, chan_mask, hw, mask, G, CPG, stride_xn,
                                            stride_xc, stride_xhw, HAS_WEIGHT, HAS_BIAS, COMPUTE)
    mean_gw = tl.load(COEF + stats, mask=chan_mask, other=0.0)
    mean_gw_xhat = tl.load(COEF + NG + stats, mask=chan_mask, other=0.0)
    grad = tl.load(DZ + n * stride_dzn + _offsets(chans, hw, stride_dzc, stride_dzhw), mask=mask,
                   other=0.0).to(COMPUTE)
    xhat = (x - mean[:, None]) * rstd[:, None]
    if ACT != 0:
        grad = grad * activation_grad(xhat * w[:, None] + b[:, None], ACT)
    dx = (grad * w[:, None] - mean_gw[:, None] - xhat * mean_gw_xhat[:, None]) * rstd[:, None]
    tl.store(DX + n * stride_dxn + _offsets(chans, hw, stride_dxc, stride_dxhw), dx, mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def _strides(t3: torch.Tensor) -> tuple[int, int, int]:
    return t3.stride(0), t3.stride(1), t3.stride(2)


def groups_per_tile(block_c: int, cpg: int, groups: int) -> int:
    """The most groups an elementwise tile of ``block_c`` channels (starting at a multiple of ``block_c``) meets."""
    if block_c % cpg == 0 or cpg % block_c == 0:  # tiles aligned to groups, or inside one
        return min(max(block_c // cpg, 1), groups)
    return min((block_c - 1) // cpg + 2, groups)


def finalizes_inline(plan: ReducePlan, tile: tuple[int, int], groups: int) -> bool:
    """Whether a call that needs no backward lets the normalize pass finalize the statistics itself (two launches,
    not three). Each program then reads its tile's ``groups``' partials, three per split per group: allowed while
    that is no more than a program of the finalize kernel reads (:data:`FINALIZE_ROWS` groups) or under half a load
    per value of the tile. A rule of thumb, not timed on a GPU: the partials are a few kB that every program
    re-reads from cache, against a launch saved. Met at every shape of the benchmark suite."""
    redundant = 3 * plan.splits * next_power_of_2(groups)
    return redundant <= max(3 * plan.splits * FINALIZE_ROWS, tile[0] * tile[1] // 2)


def group_norm_fwd(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float, act: Optional[str], *, statistics: bool = True, hw_splits: Optional[int] = None,
                   max_block_hw: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor],
                                                                 Optional[torch.Tensor]]:
    """``act(group_norm(x))`` for ``x`` ``(N, C, *spatial)``. Returns ``(y, mean, rstd)``: ``y`` like
    ``torch.empty_like(x)`` (the input's memory format when it is dense) in ``x.dtype``, ``mean`` and ``rstd``
    ``(N, G)`` in the compute dtype. Without ``statistics`` (nothing will run the backward) the normalize pass may
    finalize the statistics itself (:func:`finalizes_inline`): two launches, and ``mean``/``rstd`` are ``None``.
    ``hw_splits``/``max_block_hw``: see :func:`reduce_plan`."""
    n, c = x.shape[:2]
    compute = compute_dtype(x.dtype)
    y = torch.empty_like(x)
    if y.numel() == 0:
        stats = torch.full((n, num_groups), math.nan, dtype=compute, device=x.device)
        return (y, stats, stats.clone()) if statistics else (y, None, None)
    x3, y3 = as_planes(x), as_planes(y)
    hw = x3.shape[2]
    cpg = c // num_groups
    contiguous_hw = _hw_contiguous(x3)
    plan = reduce_plan(n * num_groups, cpg, hw, contiguous_hw, x.device, hw_splits=hw_splits,
                       max_block_hw=max_block_hw)
    partials = torch.empty((3, n * num_groups, plan.splits), dtype=compute, device=x.device)
    tl_compute = tl_compute_dtype(compute)
    group_norm_moments_kernel[(n * num_groups, plan.splits)](
        x3, partials, num_groups, cpg, hw, *_strides(x3), plan.hw_splits, plan.hw_per_split,
        COMPUTE=tl_compute, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
        num_warps=num_warps_for(plan.block_c * plan.block_hw, x.device),
    )
    block_c, block_hw = elementwise_tile(c, hw, contiguous_hw)
    tile_groups = groups_per_tile(block_c, cpg, num_groups)
    block_s = min(next_power_of_2(plan.splits), FINALIZE_SPLITS)
    finalize = not statistics and finalizes_inline(plan, (block_c, block_hw), tile_groups)
    if finalize:
        mean = rstd = None
    else:
        mean = torch.empty((n, num_groups), dtype=compute, device=x.device)
        rstd = torch.empty((n, num_groups), dtype=compute, device=x.device)
        group_norm_finalize_kernel[(triton.cdiv(n * num_groups, FINALIZE_ROWS),)](
            partials, mean, rstd, n * num_groups, plan.splits, eps,
            COMPUTE=tl_compute, BLOCK_R=FINALIZE_ROWS, BLOCK_S=block_s, num_warps=4,
        )
    group_norm_apply_kernel[(n * triton.cdiv(c, block_c) * triton.cdiv(hw, block_hw),)](
        x3, weight.contiguous() if weight is not None else x3, bias.contiguous() if bias is not None else x3,
        partials if finalize else mean, partials if finalize else rstd, y3,
        c, num_groups, cpg, hw, n * num_groups, plan.splits, eps, *_strides(x3), *_strides(y3),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=ACTIVATION_CODES[act], FINALIZE=finalize,
        COMPUTE=tl_compute, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_G=next_power_of_2(tile_groups),
        BLOCK_S=block_s, num_warps=num_warps_for(block_c * block_hw, x.device),
    )
    return y, mean, rstd


def group_norm_bwd(dz: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, act: Optional[str], *,
                   hw_splits: Optional[int] = None, max_block_hw: Optional[int] = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`group_norm_fwd` for the output gradient ``dz``: ``(dx, dweight, dbias)``, ``dx`` like
    ``torch.empty_like(x)`` in ``x.dtype``, ``dweight``/``dbias`` in their parameter's dtype (empty for a missing
    one)."""
    n, c = x.shape[:2]
    compute = compute_dtype(x.dtype)
    dx = torch.empty_like(x)
    x3, dz3, dx3 = as_planes(x), as_planes(dz), as_planes(dx)
    hw = x3.shape[2]
    cpg = c // num_groups
    has_params = weight is not None or bias is not None
    if dx.numel() == 0:
        return (dx, *(torch.zeros(c, dtype=p.dtype, device=x.device) if p is not None else x.new_empty(0)
                      for p in (weight, bias)))
    contiguous_hw = _hw_contiguous(x3)
    plan = reduce_plan(n * num_groups, cpg, hw, contiguous_hw, x.device, hw_splits=hw_splits,
                       max_block_hw=max_block_hw)
    partials = torch.empty((2, n * num_groups, plan.splits), dtype=compute, device=x.device)
    param_partials = torch.empty((n * plan.hw_splits, 2 * c) if has_params else 0, dtype=compute, device=x.device)
    tl_compute = tl_compute_dtype(compute)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=ACTIVATION_CODES[act],
                 COMPUTE=tl_compute)
    w_ptr = weight.contiguous() if weight is not None else x3
    b_ptr = bias.contiguous() if bias is not None else x3
    group_norm_bwd_reduce_kernel[(n * num_groups, plan.splits)](
        x3, dz3, w_ptr, b_ptr, mean, rstd, partials, param_partials if has_params else partials,
        c, num_groups, cpg, hw, *_strides(x3), *_strides(dz3), plan.hw_splits, plan.hw_per_split,
        HAS_PARAMS=has_params, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
        num_warps=num_warps_for(plan.block_c * plan.block_hw, x.device), **flags,
    )
    coefficients = torch.empty((2, n * num_groups), dtype=compute, device=x.device)
    group_norm_bwd_finalize_kernel[(triton.cdiv(n * num_groups, FINALIZE_ROWS),)](
        partials, coefficients, n * num_groups, plan.splits, cpg * hw,
        COMPUTE=tl_compute, BLOCK_R=FINALIZE_ROWS, BLOCK_S=min(next_power_of_2(plan.splits), FINALIZE_SPLITS),
        num_warps=4,
    )
    block_c, block_hw = elementwise_tile(c, hw, contiguous_hw)
    group_norm_bwd_apply_kernel[(n * triton.cdiv(c, block_c) * triton.cdiv(hw, block_hw),)](
        x3, dz3, w_ptr, b_ptr, mean, rstd, coefficients, dx3, c, num_groups, cpg, hw, n * num_groups,
        *_strides(x3), *_strides(dz3), *_strides(dx3), BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=num_warps_for(block_c * block_hw, x.device), **flags,
    )
    if not has_params:
        return dx, x.new_empty(0), x.new_empty(0)
    dweight, dbias = column_sum(param_partials, (weight if weight is not None else bias).dtype, split=c)
    return (dx, dweight if weight is not None else x.new_empty(0),
            dbias.to(bias.dtype) if bias is not None else x.new_empty(0))
