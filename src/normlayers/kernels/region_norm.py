"""Triton kernels for Region Normalization (docs/region_norm.md).

RegionNorm needs, per ``(sample n, channel c)`` plane and per region (hole where the mask is nonzero, valid
elsewhere), the region's count, mean and variance, pooled over the batch (``stats="batch"``) or not.

**The fused layer** (the section at the end; three launches forward, three backward): ``region_stats`` (per plane
and region, the scaled sums), ``region_finalize`` (all the per-channel or per-plane statistics in one small kernel),
``region_normalize`` (one elementwise pass with the region affine); backward ``region_normalize_bwd`` (per-plane
sums of ``dy`` and ``dy·x̂``), ``region_finalize_bwd`` (their combination and the parameters' gradients) and
``region_dx``. Statistics are taken of the values scaled by a power of two, so inputs near fp32's range limits
normalize correctly.

**The composable pair** (for synced statistics, which must be exchanged between the reduction and its use, and for
DTensor inputs): ``region_moments``, the first-stage partials of a plane relative to a given per-(plane, region)
centre ``c_r``:

    count_r = Σ w_r,    first_r = Σ w_r·(x − c_r),    second_r = Σ w_r·(x − c_r)²        (w_hole = m, w_valid = 1 − m)

called once with ``c = 0`` (the means) and once centred at the means (the variances as sums of centred squares,
never ``E[x²] − E[x]²``). Backward: ``dx = Σ_r w_r·(dfirst_r + 2·dsecond_r·(x − c_r))`` and
``dcentre_r = −Σ w_r·(dfirst_r + 2·dsecond_r·(x − c_r))``; the mask and the count get no gradient. Its normalize
+ region-affine pass is ``plane_affine`` of :mod:`normlayers.kernels.channel_stats` with ``REGIONS = 2``.

Layout: ``x`` viewed as ``(N, C, HW)`` with arbitrary strides (no copy for NCHW, channels-last or channel slices),
the mask as ``(N, 1 or C, HW)`` of any dtype, nonzero = hole (bool read as uint8; a one-channel mask is read with
channel stride 0). Each program owns ``BLOCK_P`` planes and walks their ``HW`` values in ``BLOCK_HW`` chunks
(deterministic, no atomics). Statistics fp32 (fp64 for fp64 ``x``); offsets int64.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from normlayers._dtypes import compute_dtype
from normlayers.kernels.common import (
    as_planes,
    hole_planes,
    load_plane_values,
    num_warps_for,
    plane_block,
    plane_offsets,
    plane_strides,
    plane_tile,
    power_of_two_scale,
    tl_compute_dtype,
)


@triton.jit
def _load_pair(PTR, planes, plane_mask, COMPUTE: tl.constexpr):
    """The (hole, valid) columns of a contiguous ``(P, 2)`` per-plane tensor, each as a ``(BLOCK_P, 1)`` column."""
    hole = tl.load(PTR + planes * 2, mask=plane_mask, other=0.0).to(COMPUTE)[:, None]
    valid = tl.load(PTR + planes * 2 + 1, mask=plane_mask, other=0.0).to(COMPUTE)[:, None]
    return hole, valid


@triton.jit
def _load_chunk(X, HOLE, x_base, hole_base, hw, mask, stride_xhw, stride_hhw, COMPUTE: tl.constexpr):
    """One chunk of values and their region: ``(x, hole, valid)``, both regions false outside ``mask``."""
    x = load_plane_values(X, x_base, hw, stride_xhw, mask, COMPUTE)
    hole = tl.load(HOLE + hole_base[:, None] + hw[None, :] * stride_hhw, mask=mask, other=0) != 0
    return x, hole, mask & (hole == 0)


@triton.jit
def region_moments_fwd_kernel(
    X, HOLE, CENTER, COUNT, FIRST, SECOND, P, C, HW,
    stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw,
    COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    planes, plane_mask = plane_block(P, BLOCK_P)
    offsets = tl.arange(0, BLOCK_HW)
    x_base = plane_offsets(planes, C, stride_xn, stride_xc)
    hole_base = plane_offsets(planes, C, stride_hn, stride_hc)
    # CENTER, COUNT, FIRST, SECOND are (P, 2): index 0 the hole region, 1 the valid region.
    center_hole, center_valid = _load_pair(CENTER, planes, plane_mask, COMPUTE)
    count_hole = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    count_all = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    first_hole = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    first_valid = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    second_hole = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    second_valid = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    for start in range(0, HW, BLOCK_HW):
        hw = (start + offsets).to(tl.int64)
        mask = plane_mask[:, None] & (hw < HW)[None, :]
        x, hole, valid = _load_chunk(X, HOLE, x_base, hole_base, hw, mask, stride_xhw, stride_hhw, COMPUTE)
        d_hole = tl.where(hole, x - center_hole, 0.0)
        d_valid = tl.where(valid, x - center_valid, 0.0)
        count_hole += tl.where(hole, 1.0, 0.0)
        count_all += tl.where(mask, 1.0, 0.0)
        first_hole += d_hole
        first_valid += d_valid
        second_hole += d_hole * d_hole
        second_valid += d_valid * d_valid
    holes = tl.sum(count_hole, axis=1)
    tl.store(COUNT + planes * 2, holes, mask=plane_mask)
    tl.store(COUNT + planes * 2 + 1, tl.sum(count_all, axis=1) - holes, mask=plane_mask)
    tl.store(FIRST + planes * 2, tl.sum(first_hole, axis=1), mask=plane_mask)
    tl.store(FIRST + planes * 2 + 1, tl.sum(first_valid, axis=1), mask=plane_mask)
    tl.store(SECOND + planes * 2, tl.sum(second_hole, axis=1), mask=plane_mask)
    tl.store(SECOND + planes * 2 + 1, tl.sum(second_valid, axis=1), mask=plane_mask)


@triton.jit
def region_moments_bwd_kernel(
    X, HOLE, CENTER, DFIRST, DSECOND, DX, DCENTER, P, C, HW,
    stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw, stride_dxn, stride_dxc, stride_dxhw,
    COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # dx = Σ_r w_r·(dfirst_r + 2·dsecond_r·(x − c_r)); dcentre_r = −Σ_hw of the region-r term.
    planes, plane_mask = plane_block(P, BLOCK_P)
    offsets = tl.arange(0, BLOCK_HW)
    x_base = plane_offsets(planes, C, stride_xn, stride_xc)
    hole_base = plane_offsets(planes, C, stride_hn, stride_hc)
    dx_base = plane_offsets(planes, C, stride_dxn, stride_dxc)
    center_hole, center_valid = _load_pair(CENTER, planes, plane_mask, COMPUTE)
    dfirst_hole, dfirst_valid = _load_pair(DFIRST, planes, plane_mask, COMPUTE)
    dsecond_hole, dsecond_valid = _load_pair(DSECOND, planes, plane_mask, COMPUTE)
    dcenter_hole = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    dcenter_valid = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    for start in range(0, HW, BLOCK_HW):
        hw = (start + offsets).to(tl.int64)
        mask = plane_mask[:, None] & (hw < HW)[None, :]
        x, hole, valid = _load_chunk(X, HOLE, x_base, hole_base, hw, mask, stride_xhw, stride_hhw, COMPUTE)
        g_hole = tl.where(hole, dfirst_hole + 2.0 * dsecond_hole * (x - center_hole), 0.0)
        g_valid = tl.where(valid, dfirst_valid + 2.0 * dsecond_valid * (x - center_valid), 0.0)
        tl.store(DX + dx_base[:, None] + hw[None, :] * stride_dxhw, g_hole + g_valid, mask=mask)
        dcenter_hole -= g_hole
        dcenter_valid -= g_valid
    tl.store(DCENTER + planes * 2, tl.sum(dcenter_hole, axis=1), mask=plane_mask)
    tl.store(DCENTER + planes * 2 + 1, tl.sum(dcenter_valid, axis=1), mask=plane_mask)


def region_moments_fwd(x: torch.Tensor, hole_mask: torch.Tensor, center: torch.Tensor, *,
                       max_block_hw: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(count, first, second)``, each ``(N, C, 2)`` in fp32 (fp64 for fp64 ``x``): per plane and region (0 = hole,
    where ``hole_mask`` is nonzero; 1 = valid) the value count, ``Σ (x − center)`` and ``Σ (x − center)²``.

    ``x``: ``(N, C, *spatial)``; ``hole_mask``: bool or uint8, ``(N, 1 or C, *spatial)``; ``center``: ``(N, C, 2)``.
    ``max_block_hw`` overrides the chunk cap (tests use it to reach the chunked loop on small planes).
    """
    x3 = as_planes(x)
    n, c, hw = x3.shape
    stats = compute_dtype(x.dtype)
    count, first, second = (torch.empty((n, c, 2), dtype=stats, device=x.device) for _ in range(3))
    if n * c == 0 or hw == 0:
        return count.zero_(), first.zero_(), second.zero_()
    hole3, hole_strides = hole_planes(hole_mask, x3)
    block_p, block_hw = plane_tile(n * c, hw, max_block_hw)
    region_moments_fwd_kernel[(triton.cdiv(n * c, block_p),)](
        x3, hole3, center.to(stats).contiguous(), count, first, second, n * c, c, hw, *plane_strides(x3), *hole_strides,
        COMPUTE=tl_compute_dtype(stats), BLOCK_P=block_p, BLOCK_HW=block_hw,
        num_warps=num_warps_for(block_p * block_hw, x.device),
    )
    return count, first, second


def region_moments_bwd(x: torch.Tensor, hole_mask: torch.Tensor, center: torch.Tensor, dfirst: torch.Tensor,
                       dsecond: torch.Tensor, *,
                       max_block_hw: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`region_moments_fwd` with respect to ``x`` and ``center``: ``(dx, dcenter)``, ``dx`` in
    ``x``'s dtype and memory format, ``dcenter`` ``(N, C, 2)`` in ``center``'s dtype."""
    dx = torch.empty_like(x)
    x3, dx3 = as_planes(x), as_planes(dx)
    n, c, hw = x3.shape
    stats = compute_dtype(x.dtype)
    dcenter = torch.empty((n, c, 2), dtype=stats, device=x.device)  # the kernel writes every entry
    if n * c == 0 or hw == 0:
        return dx, dcenter.zero_().to(center.dtype)
    hole3, hole_strides = hole_planes(hole_mask, x3)
    block_p, block_hw = plane_tile(n * c, hw, max_block_hw)
    region_moments_bwd_kernel[(triton.cdiv(n * c, block_p),)](
        x3, hole3, center.to(stats).contiguous(), dfirst.to(stats).contiguous(), dsecond.to(stats).contiguous(), dx3,
        dcenter, n * c, c, hw, *plane_strides(x3), *hole_strides, *plane_strides(dx3),
        COMPUTE=tl_compute_dtype(stats), BLOCK_P=block_p, BLOCK_HW=block_hw,
        num_warps=num_warps_for(block_p * block_hw, x.device),
    )
    return dx, dcenter.to(center.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The fused layer: region_stats → region_finalize → region_normalize forward; region_normalize_bwd →
# region_finalize_bwd → region_dx backward (docs/region_norm.md).
#
# Every statistic is taken of the region's values scaled by a power of two ``s`` (from the region's largest
# magnitude, the scaling of BLAS ``nrm2``; :func:`normlayers.kernels.common.power_of_two_scale`), with ``ε_r·s²``:
# normalization is scale invariant and a power of two scales exactly, so ordinary inputs give the same result, and
# inputs whose squares would overflow (or underflow) fp32 still normalize correctly. Per region (0 = hole, 1 = valid):
#
#   partials (N·C, 2, 4):  [count, s, Σ x·s, Σ (x·s − mean)²]                 one plane each (region_stats)
#   stats    (I, 2, 4):    [count, s, mean_s, rstd = rsqrt(var_s + ε_r·s²)]    I = C (batch) or N·C (instance)
#   y = (x·s − mean_s)·rstd·(1 + γ_r) + β_r                                    (region_normalize)
#
# Backward, per statistic group of S values (x̂ = (x·s − mean_s)·rstd, g = 1 + γ_r; ε_r depends on counts only):
#   dx = s·rstd·g·(dy − Σdy/S − x̂·Σ(dy·x̂)/S),  dγ_r = Σ_r dy·x̂,  dβ_r = Σ_r dy (each beta: Σ dy, "official")
# Regions are selected (tl.where), never weighted by 0/1: a NaN or inf in one region reaches nothing of the other.
# ----------------------------------------------------------------------------------------------------------------------

# Channels (or planes) per program of the finalize kernels; each walks the N samples.
FINALIZE_BLOCK = 128
# Values per program of the per-plane kernels, and one warp per 128 of them (4 per thread): with the two regions'
# per-plane statistics beside the tile, plane_tile's 4096-value tiles on 16 warps spill on small planes in an sm_90
# compile (812 bytes in region_stats at 7×7); tiles of 1024 on 8 warps spill nowhere (registers ≤ 142 at every
# plane size, bf16, by normlayers.bench.audit's compile).
REGION_TILE_ELEMENTS = 1024


@triton.jit
def _region_chunk_moments(x, inside, max_abs, scale, count, total, m2, cap, COMPUTE: tl.constexpr):
    """One chunk of a region into its running ``(max|x|, s, count, Σx·s, M2)`` per plane: a larger maximum lowers
    ``s`` (the sums so far are rescaled by a power of two, exactly), then Chan's combination with the chunk's own
    centred moments (the chunk or the sums so far may hold no value of the region)."""
    max_abs = tl.maximum(max_abs, tl.max(tl.where(inside, tl.abs(x), 0.0), axis=1))
    new_scale = power_of_two_scale(max_abs, cap, COMPUTE)
    ratio = new_scale / scale
    total = total * ratio
    m2 = m2 * ratio * ratio
    scaled = tl.where(inside, x, 0.0) * new_scale[:, None]  # (no overflow in the other region's lanes)
    count_b = tl.sum(inside.to(COMPUTE), axis=1)
    total_b = tl.sum(scaled, axis=1)
    mean_b = total_b / tl.maximum(count_b, 1.0)
    centred = tl.where(inside, scaled - mean_b[:, None], 0.0)
    delta = mean_b - total / tl.maximum(count, 1.0)
    both = count + count_b
    m2 = m2 + tl.sum(centred * centred, axis=1) + delta * delta * (count * count_b / tl.maximum(both, 1.0))
    return max_abs, new_scale, both, total + total_b, m2


@triton.jit
def _store_quad(PTR, index, mask, a, b, c, d):
    """Fields 0–3 of entry ``index`` of a contiguous ``(…, 4)`` tensor."""
    tl.store(PTR + index * 4, a, mask=mask)
    tl.store(PTR + index * 4 + 1, b, mask=mask)
    tl.store(PTR + index * 4 + 2, c, mask=mask)
    tl.store(PTR + index * 4 + 3, d, mask=mask)


@triton.jit
def _load_quad(PTR, index, mask, COMPUTE: tl.constexpr):
    """Fields 0–3 of entry ``index`` of a contiguous ``(…, 4)`` tensor, in ``COMPUTE``."""
    return (tl.load(PTR + index * 4, mask=mask, other=0.0).to(COMPUTE),
            tl.load(PTR + index * 4 + 1, mask=mask, other=1.0).to(COMPUTE),
            tl.load(PTR + index * 4 + 2, mask=mask, other=0.0).to(COMPUTE),
            tl.load(PTR + index * 4 + 3, mask=mask, other=0.0).to(COMPUTE))


@triton.jit
def region_stats_kernel(
    X, HOLE, PARTIALS, P, C, HW, stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw, cap,
    COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    cap = tl.cast(cap, COMPUTE)
    planes, plane_mask = plane_block(P, BLOCK_P)
    offsets = tl.arange(0, BLOCK_HW)
    x_base = plane_offsets(planes, C, stride_xn, stride_xc)
    hole_base = plane_offsets(planes, C, stride_hn, stride_hc)
    zero = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    max_h, count_h, total_h, m2_h = zero, zero, zero, zero
    max_v, count_v, total_v, m2_v = zero, zero, zero, zero
    scale_h = zero + cap  # an empty region's scale (power_of_two_scale of 0)
    scale_v = zero + cap
    for start in range(0, HW, BLOCK_HW):
        hw = (start + offsets).to(tl.int64)
        mask = plane_mask[:, None] & (hw < HW)[None, :]
        x, hole, valid = _load_chunk(X, HOLE, x_base, hole_base, hw, mask, stride_xhw, stride_hhw, COMPUTE)
        max_h, scale_h, count_h, total_h, m2_h = _region_chunk_moments(x, hole, max_h, scale_h, count_h, total_h,
                                                                       m2_h, cap, COMPUTE)
        max_v, scale_v, count_v, total_v, m2_v = _region_chunk_moments(x, valid, max_v, scale_v, count_v, total_v,
                                                                       m2_v, cap, COMPUTE)
    _store_quad(PARTIALS, planes * 2, plane_mask, count_h, scale_h, total_h, m2_h)
    _store_quad(PARTIALS, planes * 2 + 1, plane_mask, count_v, scale_v, total_v, m2_v)


@triton.jit
def _combine_planes(count, scale, total, m2, count_b, scale_b, total_b, m2_b):
    """Chan's combination of two parts' ``(count, s, Σx·s, M2)``, each first brought to the smaller scale."""
    new_scale = tl.minimum(scale, scale_b)
    ratio = new_scale / scale
    ratio_b = new_scale / scale_b
    total = total * ratio
    m2 = m2 * ratio * ratio
    total_b = total_b * ratio_b
    m2_b = m2_b * ratio_b * ratio_b
    both = count + count_b
    delta = total_b / tl.maximum(count_b, 1.0) - total / tl.maximum(count, 1.0)
    return both, new_scale, total + total_b, m2 + m2_b + delta * delta * (count * count_b / tl.maximum(both, 1.0))


@triton.jit
def _region_stats(count, scale, total, m2, values, eps, OFFICIAL_EPS: tl.constexpr):
    """``(mean_s, rstd)`` of one region from its combined sums; ``values`` = both regions' count, the ``V`` of the
    official effective epsilon ``ε·V/S`` (an empty region counts as one value, the official ``S[S==0] = 1``)."""
    safe = tl.maximum(count, 1.0)
    if OFFICIAL_EPS:
        eps = eps * values / safe
    return total / safe, tl.math.rsqrt(m2 / safe + eps * scale * scale)


@triton.jit
def _finalized(PARTIALS, index, mask, LOOP, stride_loop, eps, OFFICIAL_EPS: tl.constexpr, COMPUTE: tl.constexpr):
    """Statistic ``index``'s ``(count, s, mean_s, rstd)`` for the hole and then the valid region, combining the
    planes ``n·stride_loop + index``, ``n < LOOP``, in order (deterministic, no atomics): a channel's N planes (batch
    statistics, stride C) or one plane (instance statistics)."""
    count_h, scale_h, total_h, m2_h = _load_quad(PARTIALS, index * 2, mask, COMPUTE)
    count_v, scale_v, total_v, m2_v = _load_quad(PARTIALS, index * 2 + 1, mask, COMPUTE)
    for n in range(1, LOOP):
        plane = n * stride_loop + index
        c, s, t, m = _load_quad(PARTIALS, plane * 2, mask, COMPUTE)
        count_h, scale_h, total_h, m2_h = _combine_planes(count_h, scale_h, total_h, m2_h, c, s, t, m)
        c, s, t, m = _load_quad(PARTIALS, plane * 2 + 1, mask, COMPUTE)
        count_v, scale_v, total_v, m2_v = _combine_planes(count_v, scale_v, total_v, m2_v, c, s, t, m)
    values = tl.maximum(count_h + count_v, 1.0)  # V ≥ 1 (and no rsqrt(0) in the padding lanes)
    mean_h, rstd_h = _region_stats(count_h, scale_h, total_h, m2_h, values, eps, OFFICIAL_EPS)
    mean_v, rstd_v = _region_stats(count_v, scale_v, total_v, m2_v, values, eps, OFFICIAL_EPS)
    return count_h, scale_h, mean_h, rstd_h, count_v, scale_v, mean_v, rstd_v


@triton.jit
def region_finalize_kernel(
    PARTIALS, STATS, STAT_COUNT, LOOP, stride_loop, eps,
    OFFICIAL_EPS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    eps = tl.cast(eps, COMPUTE)
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < STAT_COUNT
    count_h, scale_h, mean_h, rstd_h, count_v, scale_v, mean_v, rstd_v = _finalized(
        PARTIALS, index, mask, LOOP, stride_loop, eps, OFFICIAL_EPS, COMPUTE)
    _store_quad(STATS, index * 2, mask, count_h, scale_h, mean_h, rstd_h)
    _store_quad(STATS, index * 2 + 1, mask, count_v, scale_v, mean_v, rstd_v)


@triton.jit
def _gain(GAMMA, channels, plane_mask, like, HAS_GAMMA: tl.constexpr, COMPUTE: tl.constexpr):
    """``1 + γ`` of each plane's channel (1 without ``γ``), shaped like ``like``."""
    gain = tl.full(like.shape, 1.0, COMPUTE)
    if HAS_GAMMA:
        gain += tl.load(GAMMA + channels, mask=plane_mask, other=0.0).to(COMPUTE)
    return gain


@triton.jit
def _plane_region(STATS, GAMMA, stat_index, channels, plane_mask, HAS_GAMMA: tl.constexpr, COMPUTE: tl.constexpr):
    """One region's ``(s, mean_s, rstd, g = 1 + γ)`` for each plane, as ``(BLOCK_P, 1)`` columns."""
    _, scale, mean, rstd = _load_quad(STATS, stat_index, plane_mask, COMPUTE)
    gain = _gain(GAMMA, channels, plane_mask, scale, HAS_GAMMA, COMPUTE)
    return scale[:, None], mean[:, None], rstd[:, None], gain[:, None]


@triton.jit
def _plane_stat_index(planes, C, BATCH: tl.constexpr):
    """Each plane's channel and the index of its statistics (its channel's, or its own)."""
    channels = planes % C
    if BATCH:
        return channels, channels
    return channels, planes


@triton.jit
def _elementwise_tile(X, HOLE, P, C, HW, stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw,
                      BATCH: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The tile of a ``(plane blocks, HW chunks)`` grid: its planes (and which exist), positions, mask, each plane's
    channel and statistic index, and the values and hole flags there."""
    planes, plane_mask = plane_block(P, BLOCK_P)
    hw = tl.program_id(1).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = plane_mask[:, None] & (hw < HW)[None, :]
    channels, stat = _plane_stat_index(planes, C, BATCH)
    x, hole, _ = _load_chunk(X, HOLE, plane_offsets(planes, C, stride_xn, stride_xc),
                             plane_offsets(planes, C, stride_hn, stride_hc), hw, mask, stride_xhw, stride_hhw, COMPUTE)
    return planes, plane_mask, hw, mask, channels, stat, x, hole


@triton.jit
def region_normalize_kernel(
    X, HOLE, STATS, GAMMA_H, BETA_H, GAMMA_V, BETA_V, Y, P, C, HW, N, eps,
    stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw, stride_yn, stride_yc, stride_yhw,
    BATCH: tl.constexpr, OFFICIAL_AFFINE: tl.constexpr, HAS_GAMMA_H: tl.constexpr, HAS_BETA_H: tl.constexpr,
    HAS_GAMMA_V: tl.constexpr, HAS_BETA_V: tl.constexpr, FINALIZE: tl.constexpr, OFFICIAL_EPS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # Grid: (plane blocks, HW chunks). y = (x·s_r − mean_r)·rstd_r·(1 + γ_r) + shift_r, r the region of each value.
    # With FINALIZE, STATS holds region_stats' partials and each program finalizes its planes' statistics itself
    # (what region_finalize_kernel computes; eps and N are read only then): one launch fewer where nothing needs
    # the statistics afterwards (no backward).
    planes, plane_mask, hw, mask, channels, stat, x, hole = _elementwise_tile(
        X, HOLE, P, C, HW, stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw, BATCH, COMPUTE,
        BLOCK_P, BLOCK_HW)
    if FINALIZE:
        _, scale_h, mean_h, rstd_h, _, scale_v, mean_v, rstd_v = _finalized(
            STATS, stat, plane_mask, N if BATCH else 1, C, tl.cast(eps, COMPUTE), OFFICIAL_EPS, COMPUTE)
        gain_h = _gain(GAMMA_H, channels, plane_mask, scale_h, HAS_GAMMA_H, COMPUTE)[:, None]
        gain_v = _gain(GAMMA_V, channels, plane_mask, scale_v, HAS_GAMMA_V, COMPUTE)[:, None]
        scale_h, mean_h, rstd_h = scale_h[:, None], mean_h[:, None], rstd_h[:, None]
        scale_v, mean_v, rstd_v = scale_v[:, None], mean_v[:, None], rstd_v[:, None]
    else:
        scale_h, mean_h, rstd_h, gain_h = _plane_region(STATS, GAMMA_H, stat * 2, channels, plane_mask, HAS_GAMMA_H,
                                                        COMPUTE)
        scale_v, mean_v, rstd_v, gain_v = _plane_region(STATS, GAMMA_V, stat * 2 + 1, channels, plane_mask,
                                                        HAS_GAMMA_V, COMPUTE)
    shift_h = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    shift_v = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    if HAS_BETA_H:
        shift_h += tl.load(BETA_H + channels, mask=plane_mask, other=0.0).to(COMPUTE)
    if HAS_BETA_V:
        shift_v += tl.load(BETA_V + channels, mask=plane_mask, other=0.0).to(COMPUTE)
    if OFFICIAL_AFFINE:  # both betas at every pixel (the official rn.py)
        shift_h = shift_h + shift_v
        shift_v = shift_h
    y = tl.where(hole, (x * scale_h - mean_h) * (rstd_h * gain_h) + shift_h[:, None],
                 (x * scale_v - mean_v) * (rstd_v * gain_v) + shift_v[:, None])
    tl.store(Y + plane_offsets(planes, C, stride_yn, stride_yc)[:, None] + hw[None, :] * stride_yhw, y, mask=mask)


@triton.jit
def region_normalize_bwd_kernel(
    DY, X, HOLE, STATS, SUMS, P, C, HW,
    stride_dyn, stride_dyc, stride_dyhw, stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw,
    BATCH: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # Per plane and region: Σ dy and Σ dy·x̂, written as SUMS (P, 2, 2). Each chunk is reduced as it comes, so the
    # accumulators are per plane, not per-lane register tiles.
    planes, plane_mask = plane_block(P, BLOCK_P)
    offsets = tl.arange(0, BLOCK_HW)
    channels, stat = _plane_stat_index(planes, C, BATCH)
    dy_base = plane_offsets(planes, C, stride_dyn, stride_dyc)
    x_base = plane_offsets(planes, C, stride_xn, stride_xc)
    hole_base = plane_offsets(planes, C, stride_hn, stride_hc)
    _, scale_h, mean_h, rstd_h = _load_quad(STATS, stat * 2, plane_mask, COMPUTE)
    _, scale_v, mean_v, rstd_v = _load_quad(STATS, stat * 2 + 1, plane_mask, COMPUTE)
    zero = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    dy_h, dy_xhat_h, dy_v, dy_xhat_v = zero, zero, zero, zero
    for start in range(0, HW, BLOCK_HW):
        hw = (start + offsets).to(tl.int64)
        mask = plane_mask[:, None] & (hw < HW)[None, :]
        x, hole, valid = _load_chunk(X, HOLE, x_base, hole_base, hw, mask, stride_xhw, stride_hhw, COMPUTE)
        dy = load_plane_values(DY, dy_base, hw, stride_dyhw, mask, COMPUTE)
        xhat_h = (x * scale_h[:, None] - mean_h[:, None]) * rstd_h[:, None]
        xhat_v = (x * scale_v[:, None] - mean_v[:, None]) * rstd_v[:, None]
        dy_h += tl.sum(tl.where(hole, dy, 0.0), axis=1)
        dy_xhat_h += tl.sum(tl.where(hole, dy * xhat_h, 0.0), axis=1)
        dy_v += tl.sum(tl.where(valid, dy, 0.0), axis=1)
        dy_xhat_v += tl.sum(tl.where(valid, dy * xhat_v, 0.0), axis=1)
    _store_quad(SUMS, planes, plane_mask, dy_h, dy_xhat_h, dy_v, dy_xhat_v)


@triton.jit
def _store_means(STATS, COEF, stat, mask, dy_sum, dy_xhat_sum, COMPUTE: tl.constexpr):
    """``COEF[stat] = (Σdy, Σdy·x̂) / S``, ``stat`` indexing ``(…, 2)`` entries (an empty region's S counts as 1)."""
    safe = tl.maximum(tl.load(STATS + stat * 4, mask=mask, other=1.0).to(COMPUTE), 1.0)
    tl.store(COEF + stat * 2, dy_sum / safe, mask=mask)
    tl.store(COEF + stat * 2 + 1, dy_xhat_sum / safe, mask=mask)


@triton.jit
def region_finalize_bwd_kernel(
    SUMS, STATS, COEF, DGAMMA_H, DBETA_H, DGAMMA_V, DBETA_V, N, C,
    BATCH: tl.constexpr, OFFICIAL_AFFINE: tl.constexpr, HAS_GAMMA_H: tl.constexpr, HAS_BETA_H: tl.constexpr,
    HAS_GAMMA_V: tl.constexpr, HAS_BETA_V: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per block of channels, walking the N samples in order: the parameters' gradients (sums over every
    # plane of the channel) and, per statistic and region, COEF = (Σdy/S, Σdy·x̂/S) for the dx pass.
    channels = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = channels < C
    zero = tl.zeros((BLOCK,), dtype=COMPUTE)
    dy_h, dy_xhat_h, dy_v, dy_xhat_v = zero, zero, zero, zero
    for n in range(0, N):
        plane = n * C + channels
        plane_dy_h = tl.load(SUMS + plane * 4, mask=mask, other=0.0)
        plane_dy_xhat_h = tl.load(SUMS + plane * 4 + 1, mask=mask, other=0.0)
        plane_dy_v = tl.load(SUMS + plane * 4 + 2, mask=mask, other=0.0)
        plane_dy_xhat_v = tl.load(SUMS + plane * 4 + 3, mask=mask, other=0.0)
        dy_h += plane_dy_h
        dy_xhat_h += plane_dy_xhat_h
        dy_v += plane_dy_v
        dy_xhat_v += plane_dy_xhat_v
        if not BATCH:
            _store_means(STATS, COEF, plane * 2, mask, plane_dy_h, plane_dy_xhat_h, COMPUTE)
            _store_means(STATS, COEF, plane * 2 + 1, mask, plane_dy_v, plane_dy_xhat_v, COMPUTE)
    if BATCH:
        _store_means(STATS, COEF, channels * 2, mask, dy_h, dy_xhat_h, COMPUTE)
        _store_means(STATS, COEF, channels * 2 + 1, mask, dy_v, dy_xhat_v, COMPUTE)
    if HAS_GAMMA_H:
        tl.store(DGAMMA_H + channels, dy_xhat_h, mask=mask)
    if HAS_GAMMA_V:
        tl.store(DGAMMA_V + channels, dy_xhat_v, mask=mask)
    if OFFICIAL_AFFINE:
        dy_h = dy_h + dy_v
        dy_v = dy_h
    if HAS_BETA_H:
        tl.store(DBETA_H + channels, dy_h, mask=mask)
    if HAS_BETA_V:
        tl.store(DBETA_V + channels, dy_v, mask=mask)


@triton.jit
def region_dx_kernel(
    DY, X, HOLE, STATS, COEF, GAMMA_H, GAMMA_V, DX, P, C, HW,
    stride_dyn, stride_dyc, stride_dyhw, stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw,
    stride_dxn, stride_dxc, stride_dxhw,
    BATCH: tl.constexpr, HAS_GAMMA_H: tl.constexpr, HAS_GAMMA_V: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # Grid: (plane blocks, HW chunks). dx = s·rstd·g·(dy − mean(dy) − x̂·mean(dy·x̂)) with the region's statistics.
    planes, plane_mask, hw, mask, channels, stat, x, hole = _elementwise_tile(
        X, HOLE, P, C, HW, stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw, BATCH, COMPUTE,
        BLOCK_P, BLOCK_HW)
    dy = load_plane_values(DY, plane_offsets(planes, C, stride_dyn, stride_dyc), hw, stride_dyhw, mask, COMPUTE)
    scale_h, mean_h, rstd_h, gain_h = _plane_region(STATS, GAMMA_H, stat * 2, channels, plane_mask, HAS_GAMMA_H,
                                                    COMPUTE)
    scale_v, mean_v, rstd_v, gain_v = _plane_region(STATS, GAMMA_V, stat * 2 + 1, channels, plane_mask, HAS_GAMMA_V,
                                                    COMPUTE)
    dy_mean_h, dy_xhat_mean_h, dy_mean_v, dy_xhat_mean_v = _load_quad(COEF, stat, plane_mask, COMPUTE)
    xhat_h = (x * scale_h - mean_h) * rstd_h
    xhat_v = (x * scale_v - mean_v) * rstd_v
    dx = tl.where(hole, (scale_h * rstd_h * gain_h) * (dy - dy_mean_h[:, None] - xhat_h * dy_xhat_mean_h[:, None]),
                  (scale_v * rstd_v * gain_v) * (dy - dy_mean_v[:, None] - xhat_v * dy_xhat_mean_v[:, None]))
    tl.store(DX + plane_offsets(planes, C, stride_dxn, stride_dxc)[:, None] + hw[None, :] * stride_dxhw, dx,
             mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers of the fused layer
# ----------------------------------------------------------------------------------------------------------------------


def _stat_count(n: int, c: int, batch: bool) -> int:
    return c if batch else n * c


def region_tile(planes: int, hw: int, max_block_hw: Optional[int], device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_P, BLOCK_HW, num_warps)`` of the fused layer's per-plane kernels (see ``REGION_TILE_ELEMENTS``)."""
    block_p, block_hw = plane_tile(planes, max(hw, 1), max_block_hw)
    block_p = max(1, min(block_p, REGION_TILE_ELEMENTS // block_hw))
    return block_p, block_hw, num_warps_for(2 * block_p * block_hw, device)


def region_stats(x: torch.Tensor, hole_mask: torch.Tensor, cap: float, *,
                 max_block_hw: Optional[int] = None) -> torch.Tensor:
    """Per plane and region (0 = hole, where ``hole_mask`` is nonzero; 1 = valid) ``[count, s, Σx·s, M2]``, an
    ``(N, C, 2, 4)`` tensor in fp32 (fp64 for fp64 ``x``); ``s`` is a power of two at most ``cap``."""
    x3 = as_planes(x)
    n, c, hw = x3.shape
    partials = torch.empty((n, c, 2, 4), dtype=compute_dtype(x.dtype), device=x.device)
    if n * c == 0:
        return partials
    hole3, hole_strides = hole_planes(hole_mask, x3)
    block_p, block_hw, warps = region_tile(n * c, hw, max_block_hw, x.device)
    region_stats_kernel[(triton.cdiv(n * c, block_p),)](
        x3, hole3, partials, n * c, c, hw, *plane_strides(x3), *hole_strides, cap,
        COMPUTE=tl_compute_dtype(partials.dtype), BLOCK_P=block_p, BLOCK_HW=block_hw, num_warps=warps,
    )
    return partials


def region_finalize(partials: torch.Tensor, *, batch: bool, eps: float, official_eps: bool) -> torch.Tensor:
    """``[count, s, mean_s, rstd]`` per statistic and region: ``(C, 2, 4)`` (``batch``: the channel's N planes
    combined) or ``(N, C, 2, 4)``; ``rstd = rsqrt(var_s + ε_r·s²)``, ``ε_r = ε·V/S_r`` with ``official_eps``."""
    n, c = partials.shape[:2]
    stats = partials.new_empty((c, 2, 4) if batch else (n, c, 2, 4))
    count = _stat_count(n, c, batch)
    if count == 0:
        return stats
    region_finalize_kernel[(triton.cdiv(count, FINALIZE_BLOCK),)](
        partials, stats, count, n if batch else 1, c, eps, OFFICIAL_EPS=official_eps,
        COMPUTE=tl_compute_dtype(partials.dtype), BLOCK=FINALIZE_BLOCK, num_warps=4,
    )
    return stats


def _optional(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t is not None else fallback


def finalizes_inline(n: int, hw: int, batch: bool) -> bool:
    """Whether a call that needs no backward lets :func:`region_normalize` finalize the statistics itself (two
    launches, not three): each program then combines its planes' partials over the batch, ``8·N`` values per plane
    with batch statistics, which costs less than a launch only while it is small against the plane's own ``H·W``
    values (tiny planes of a large batch keep the separate finalize kernel)."""
    return not batch or 8 * n <= hw


def region_normalize(x: torch.Tensor, hole_mask: torch.Tensor, stats: torch.Tensor,
                     parameters: tuple[Optional[torch.Tensor], ...], *, batch: bool, official_affine: bool,
                     finalize: Optional[tuple[float, bool]] = None,
                     max_block_hw: Optional[int] = None) -> torch.Tensor:
    """``y = (x·s_r − mean_r)·rstd_r·(1 + γ_r) + shift_r`` in ``x``'s dtype and memory format; ``parameters`` are
    ``(hole γ, hole β, valid γ, valid β)``, each ``(C,)`` or ``None``. With ``finalize = (eps, official_eps)``,
    ``stats`` are :func:`region_stats`' partials, finalized inside the pass (as :func:`region_finalize` would)."""
    y = torch.empty_like(x)
    x3, y3 = as_planes(x), as_planes(y)
    n, c, hw = x3.shape
    if y.numel() == 0:
        return y
    hole3, hole_strides = hole_planes(hole_mask, x3)
    block_p, block_hw, warps = region_tile(n * c, hw, max_block_hw, x.device)
    region_normalize_kernel[(triton.cdiv(n * c, block_p), triton.cdiv(hw, block_hw))](
        x3, hole3, stats, *(_optional(p, stats) for p in parameters), y3, n * c, c, hw, n,
        0.0 if finalize is None else finalize[0], *plane_strides(x3), *hole_strides, *plane_strides(y3),
        BATCH=batch, OFFICIAL_AFFINE=official_affine, HAS_GAMMA_H=parameters[0] is not None,
        HAS_BETA_H=parameters[1] is not None, HAS_GAMMA_V=parameters[2] is not None,
        HAS_BETA_V=parameters[3] is not None, FINALIZE=finalize is not None,
        OFFICIAL_EPS=finalize is not None and finalize[1],
        COMPUTE=tl_compute_dtype(stats.dtype), BLOCK_P=block_p, BLOCK_HW=block_hw, num_warps=warps,
    )
    return y


def region_normalize_bwd(dy: torch.Tensor, x: torch.Tensor, hole_mask: torch.Tensor, stats: torch.Tensor,
                         parameters: tuple[Optional[torch.Tensor], ...], *, batch: bool, official_affine: bool,
                         max_block_hw: Optional[int] = None) -> tuple[Optional[torch.Tensor], ...]:
    """Gradients of :func:`region_normalize` (its statistics' dependence on ``x`` included): ``dx`` in ``x``'s dtype
    and memory format, then each parameter's (its shape and dtype; ``None`` for a missing one). Three launches: the
    per-plane sums, their combination (and the parameters' gradients), the ``dx`` pass."""
    dx = torch.empty_like(x)
    dy3, x3, dx3 = as_planes(dy), as_planes(x), as_planes(dx)
    n, c, hw = x3.shape
    grads = [None if p is None else torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in parameters]
    if n * c == 0 or hw == 0:
        return (dx, *(None if g is None else g.zero_() for g in grads))
    hole3, hole_strides = hole_planes(hole_mask, x3)
    compute = tl_compute_dtype(stats.dtype)
    block_p, block_hw, warps = region_tile(n * c, hw, max_block_hw, x.device)
    sums = stats.new_empty((n, c, 2, 2))
    region_normalize_bwd_kernel[(triton.cdiv(n * c, block_p),)](
        dy3, x3, hole3, stats, sums, n * c, c, hw, *plane_strides(dy3), *plane_strides(x3), *hole_strides,
        BATCH=batch, COMPUTE=compute, BLOCK_P=block_p, BLOCK_HW=block_hw, num_warps=warps,
    )
    coefficients = stats.new_empty((*stats.shape[:-1], 2))
    has = [p is not None for p in parameters]
    region_finalize_bwd_kernel[(triton.cdiv(c, FINALIZE_BLOCK),)](
        sums, stats, coefficients, *(_optional(g, sums) for g in grads), n, c, BATCH=batch,
        OFFICIAL_AFFINE=official_affine, HAS_GAMMA_H=has[0], HAS_BETA_H=has[1], HAS_GAMMA_V=has[2],
        HAS_BETA_V=has[3], COMPUTE=compute, BLOCK=FINALIZE_BLOCK, num_warps=4,
    )
    region_dx_kernel[(triton.cdiv(n * c, block_p), triton.cdiv(hw, block_hw))](
        dy3, x3, hole3, stats, coefficients, _optional(parameters[0], stats), _optional(parameters[2], stats), dx3,
        n * c, c, hw, *plane_strides(dy3), *plane_strides(x3), *hole_strides, *plane_strides(dx3), BATCH=batch,
        HAS_GAMMA_H=has[0], HAS_GAMMA_V=has[2], COMPUTE=compute, BLOCK_P=block_p, BLOCK_HW=block_hw,
        num_warps=warps,
    )
    return (dx, *grads)
