"""Triton kernels for Region Normalization's masked statistics (docs/region_norm.md).

RegionNorm needs, per ``(sample n, channel c)`` plane and per region (hole where the mask is nonzero, valid
elsewhere), the region's count, mean and variance. One kernel pair gives the first-stage fp32 partials of a plane,
relative to a given per-(plane, region) centre ``c_r``:

    count_r = Σ w_r,    first_r = Σ w_r·(x − c_r),    second_r = Σ w_r·(x − c_r)²        (w_hole = m, w_valid = 1 − m)

Called once with ``c = 0`` (giving the means, after the small ``(N, C, 2)`` reductions over the batch that
``stats="batch"`` needs) and once centred at those means (giving the variances as sums of centred squares, never
``E[x²] − E[x]²``). Backward: ``dx = Σ_r w_r·(dfirst_r + 2·dsecond_r·(x − c_r))`` and
``dcentre_r = −Σ w_r·(dfirst_r + 2·dsecond_r·(x − c_r))``; the mask and the count get no gradient. The normalize
+ region-affine pass is ``plane_affine`` of :mod:`normlayers.kernels.channel_stats` with ``REGIONS = 2``.

Layout: ``x`` viewed as ``(N, C, HW)`` with arbitrary strides (no copy for NCHW, channels-last or channel slices),
the mask as ``(N, 1 or C, HW)`` uint8 (a one-channel mask is read with channel stride 0). Each program owns
``BLOCK_P`` planes and walks their ``HW`` values in ``BLOCK_HW`` chunks with per-lane accumulators reduced once at the
end (deterministic, no atomics). Statistics fp32 (fp64 for fp64 ``x``); offsets int64.
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
    count = torch.zeros((n, c, 2), dtype=stats, device=x.device)
    first = torch.zeros((n, c, 2), dtype=stats, device=x.device)
    second = torch.zeros((n, c, 2), dtype=stats, device=x.device)
    if n * c == 0 or hw == 0:
        return count, first, second
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
    dcenter = torch.zeros((n, c, 2), dtype=stats, device=x.device)
    if n * c == 0 or hw == 0:
        return dx, dcenter.to(center.dtype)
    hole3, hole_strides = hole_planes(hole_mask, x3)
    block_p, block_hw = plane_tile(n * c, hw, max_block_hw)
    region_moments_bwd_kernel[(triton.cdiv(n * c, block_p),)](
        x3, hole3, center.to(stats).contiguous(), dfirst.to(stats).contiguous(), dsecond.to(stats).contiguous(), dx3,
        dcenter, n * c, c, hw, *plane_strides(x3), *hole_strides, *plane_strides(dx3),
        COMPUTE=tl_compute_dtype(stats), BLOCK_P=block_p, BLOCK_HW=block_hw,
        num_warps=num_warps_for(block_p * block_hw, x.device),
    )
    return dx, dcenter.to(center.dtype)
