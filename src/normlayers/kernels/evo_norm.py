"""Triton kernels for EvoNorm: the "finalize" step of each sub-family and the fused normalize + activation + affine
pass over ``(N, C, *spatial)`` tensors.

EvoNorm's statistics are per-plane moments (``kernels/channel_stats.py``'s ``plane_moments``) combined over the batch
(B family) or a group of channels (S family). In B training a small finalize kernel does that combination, writes
the pass's ``(N, C)`` coefficients and updates the running variance in place; where nothing reduces over the batch
(the S family; the B family in eval, on the running variance) the pass computes each plane's coefficients itself
(its ``COEFFICIENTS`` constexpr), one launch fewer. The finalize backward kernels are the hand-derived gradient of
that math, from the pass's per-plane coefficient gradients to the plane moments' and the parameters'. The pass is
*not* an affine map of ``x``, so ``plane_affine`` cannot do it; per ``(sample n, channel c)`` plane, with every
coefficient an ``(N, C)`` value, ``y = f(x)·SCALE + SHIFT`` where ``f`` is chosen by the ``MODE`` constexpr:

* ``MODE_SWISH`` (S0, and S1/S2 with SiLU): ``f(x) = x·sigmoid(SLOPE·x)``; the S family's ``1/group statistic``
  is folded into ``SCALE``.
* ``MODE_MAX_DIV`` (B0/B1/B2): ``f(x) = x / max(LEFT, SLOPE·x + OFFSET)``; the right-hand side of every B variant is
  affine in ``x`` within a plane (B0: ``v·x + instance std``; B1: ``rms·x + rms``; B2: ``−x + rms``).
* ``MODE_IDENTITY`` (the S family's identity numerator): ``f(x) = x``.

The backward kernel owns its planes (deterministic, no atomics): it writes ``dx`` and the per-plane sums of the
coefficients' gradients. At an exact tie ``LEFT == SLOPE·x + OFFSET`` the gradient of ``max`` goes half to each side,
PyTorch's rule for ``torch.maximum`` (docs/evo_norm.md), so the kernels agree with autograd of the reference there too.
Arithmetic in fp32 (fp64 for fp64 inputs); launches and layouts as ``channel_stats`` (views, no copies, int64
offsets; outputs keep the input's memory format).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from normlayers._dtypes import compute_dtype
from normlayers.kernels.channel_stats import (
    channel_block,
    channel_grid,
    channel_tile,
    group_batch_moments,
    group_tile,
    group_tiles,
    load_group_channels,
    load_group_planes,
    load_optional,
    load_optional_group_channels,
    load_values,
    optional_pointer,
    parameter_grad,
    plane_group_tile,
    plane_sum,
    program_span,
    spread,
    store_group_channels,
    value_offsets,
    value_tile,
)
from normlayers.kernels.common import (
    as_planes,
    next_power_of_2,
    num_warps_for,
    plane_strides,
    tl_compute_dtype,
)

# The MODE constexpr: which f the fused pass applies (module docstring). Named constexprs (as Liger's casting modes),
# so that the kernels compare against the names; the launchers pass .value.
MODE_SWISH: tl.constexpr = tl.constexpr(0)
MODE_MAX_DIV: tl.constexpr = tl.constexpr(1)
MODE_IDENTITY: tl.constexpr = tl.constexpr(2)  # f(x) = x: the S family's identity numerator (fused pass only)

# Where the fused pass takes its coefficients from (its COEFFICIENTS constexpr): given as (N, C) tensors, or computed
# per plane in the pass itself from the planes' moments (the finalize math of the S family, or of the B family on the
# running variance, which needs no reduction over the batch).
COEFFICIENTS_GIVEN: tl.constexpr = tl.constexpr(0)
COEFFICIENTS_S: tl.constexpr = tl.constexpr(1)
COEFFICIENTS_B_RUNNING: tl.constexpr = tl.constexpr(2)

# The S family's group statistic (the S finalize kernels' STATISTIC constexpr).
GROUP_VARIANCE = 0  # S0, S1: the biased variance over each sample's group of channels and H, W
GROUP_MEAN_SQUARE = 1  # S2: the mean of x² over the same values

# The S family's numerator (the S finalize kernels' NUMERATOR constexpr), which decides the coefficients they write.
NUMERATOR_IDENTITY = 0  # x, for plane_affine centred at the plane mean: shift = bias + plane_mean·scale
NUMERATOR_SWISH = 1  # x·sigmoid(v·x) (S0), for MODE_SWISH: slope = v
NUMERATOR_SILU = 2  # x·sigmoid(x) (S1/S2 with SiLU), for MODE_SWISH: slope = 1

# The B family's right-hand side of the max, affine in x within a plane (the B finalize kernels' VARIANT constexpr).
VARIANT_B0 = 0  # v·x + sqrt(s²_{h,w} + eps)
VARIANT_B1 = 1  # rms·x + rms, rms = sqrt(mean_{h,w}(x²) + eps)
VARIANT_B2 = 2  # −x + rms

# Channels per program of the B finalize kernels (at most; a power of two dividing C).
B_CHANNELS_PER_PROGRAM = 32

# Coefficients each mode reads; the bwd launcher returns the gradients of exactly these, in this order.
MODE_COEFFICIENTS = {
    MODE_SWISH: ("slope", "scale", "shift"),
    MODE_MAX_DIV: ("left", "slope", "offset", "scale", "shift"),
    MODE_IDENTITY: ("scale", "shift"),
}


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(t):
    # 1/(1 + exp(−t)) rather than tl.sigmoid, so fp64 (gradcheck) takes the same code; exp overflow gives 0, not NaN.
    return 1.0 / (1.0 + tl.exp(-t))


@triton.jit
def _s_plane_coefficients(PLANE_MEAN, PLANE_VAR, WEIGHT, BIAS, V, planes, plane_mask, C, CPG, eps,
                          STATISTIC: tl.constexpr, NUMERATOR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                          HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_CPG: tl.constexpr):
    """The S family's ``(slope, scale, shift)`` of each plane: ``scale = weight·rsqrt(statistic + eps)`` of its
    (sample, group)'s planes' moments, ``shift = bias``, and the numerator's slope (``v``, or 1)."""
    offsets, mask = plane_group_tile(planes, plane_mask, CPG, BLOCK_CPG)
    plane_mean = tl.load(PLANE_MEAN + offsets, mask=mask, other=0.0)
    plane_var = tl.load(PLANE_VAR + offsets, mask=mask, other=0.0)
    _, inv_denominator = _group_statistic(plane_mean, plane_var, mask, eps, CPG, STATISTIC, COMPUTE)
    channels = planes % C
    scale = inv_denominator * load_optional(WEIGHT, channels, plane_mask, 1.0, HAS_WEIGHT, COMPUTE)
    shift = load_optional(BIAS, channels, plane_mask, 0.0, HAS_BIAS, COMPUTE)
    slope = load_optional(V, channels, plane_mask, 1.0, NUMERATOR == 1, COMPUTE)
    return slope, scale, shift


@triton.jit
def _b_right_side(plane_mean, plane_var, v, eps, VARIANT: tl.constexpr):
    """``(slope, offset)`` of the B family's right-hand side of the max, affine in ``x`` within a plane, from the
    plane's moments (module constants ``VARIANT_B*``)."""
    if VARIANT == 0:
        return v + tl.zeros_like(plane_var), tl.sqrt(plane_var + eps)
    rms = _plane_rms(plane_mean, plane_var, eps)
    if VARIANT == 1:
        return rms, rms
    return tl.zeros_like(rms) - 1.0, rms


@triton.jit
def _b_running_coefficients(PLANE_MEAN, PLANE_VAR, RUNNING_VAR, WEIGHT, BIAS, V, planes, plane_mask, C, eps,
                            VARIANT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                            COMPUTE: tl.constexpr):
    """The B family's ``(left, slope, offset, scale, shift)`` of each plane in eval: ``left`` from the running
    variance of its channel, the right-hand side from its own moments, ``scale = weight``, ``shift = bias``."""
    channels = planes % C
    left = tl.sqrt(tl.load(RUNNING_VAR + channels, mask=plane_mask, other=1.0).to(COMPUTE) + eps)
    plane_mean = tl.load(PLANE_MEAN + planes, mask=plane_mask, other=0.0)
    plane_var = tl.load(PLANE_VAR + planes, mask=plane_mask, other=0.0)
    v = load_optional(V, channels, plane_mask, 0.0, VARIANT == 0, COMPUTE)
    slope, offset = _b_right_side(plane_mean, plane_var, v, eps, VARIANT)
    scale = load_optional(WEIGHT, channels, plane_mask, 1.0, HAS_WEIGHT, COMPUTE)
    return left, slope, offset, scale, load_optional(BIAS, channels, plane_mask, 0.0, HAS_BIAS, COMPUTE)


@triton.jit
def evo_plane_fwd_kernel(
    X, LEFT, SLOPE, OFFSET, SCALE, SHIFT, Y, PLANE_MEAN, PLANE_VAR, RUNNING_VAR, WEIGHT, BIAS, V, P, C, HW, CPG, eps,
    stride_xn, stride_xc, stride_xhw, stride_yn, stride_yc, stride_yhw,
    MODE: tl.constexpr, COEFFICIENTS: tl.constexpr, STATISTIC: tl.constexpr, VARIANT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_COEFFICIENTS: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, FLAT: tl.constexpr, ALIGN: tl.constexpr, BLOCK_CPG: tl.constexpr,
    STEPS: tl.constexpr,
):
    # Grid: (plane blocks, spans of STEPS HW chunks). With COEFFICIENTS_GIVEN the coefficients are read from LEFT …
    # SHIFT; otherwise each program computes its planes' from the moments (VARIANT: the S numerator, or the B variant)
    # and, with STORE_COEFFICIENTS, the first span's programs write them (all but shift) for the backward.
    planes, plane_mask, n, c = channel_block(C, BLOCK_P)
    if COEFFICIENTS == COEFFICIENTS_GIVEN:
        slope = load_optional(SLOPE, planes, plane_mask, 0.0, MODE != MODE_IDENTITY, COMPUTE)
        scale = tl.load(SCALE + planes, mask=plane_mask, other=0.0).to(COMPUTE)
        shift = tl.load(SHIFT + planes, mask=plane_mask, other=0.0).to(COMPUTE)
        left = load_optional(LEFT, planes, plane_mask, 1.0, MODE == MODE_MAX_DIV, COMPUTE)
        offset = load_optional(OFFSET, planes, plane_mask, 0.0, MODE == MODE_MAX_DIV, COMPUTE)
    elif COEFFICIENTS == COEFFICIENTS_S:
        slope, scale, shift = _s_plane_coefficients(PLANE_MEAN, PLANE_VAR, WEIGHT, BIAS, V, planes, plane_mask, C,
                                                    CPG, eps, STATISTIC, VARIANT, HAS_WEIGHT, HAS_BIAS, COMPUTE,
                                                    BLOCK_CPG)
    else:
        left, slope, offset, scale, shift = _b_running_coefficients(PLANE_MEAN, PLANE_VAR, RUNNING_VAR, WEIGHT, BIAS,
                                                                    V, planes, plane_mask, C, eps, VARIANT,
                                                                    HAS_WEIGHT, HAS_BIAS, COMPUTE)
    first, end = program_span(HW, BLOCK_HW, STEPS)
    for start in range(first, end, BLOCK_HW):
        hw, mask, lane = value_tile(C, HW, start, plane_mask, BLOCK_P, BLOCK_HW, FLAT, ALIGN)
        x = load_values(X, n, c, hw, C, stride_xn, stride_xc, stride_xhw, mask, COMPUTE, FLAT, ALIGN)
        if MODE == MODE_SWISH:
            f = x * _sigmoid(spread(slope, lane, FLAT) * x)
        elif MODE == MODE_MAX_DIV:
            # NaN-propagating, as torch.maximum: a NaN statistic (batch or running) makes the output NaN, never
            # skipped.
            f = x / tl.maximum(spread(left, lane, FLAT), spread(slope, lane, FLAT) * x + spread(offset, lane, FLAT),
                               propagate_nan=tl.PropagateNan.ALL)
        else:
            f = x
        tl.store(Y + value_offsets(n, c, hw, C, stride_yn, stride_yc, stride_yhw, FLAT, ALIGN),
                 f * spread(scale, lane, FLAT) + spread(shift, lane, FLAT), mask=mask)
    if STORE_COEFFICIENTS:
        if tl.program_id(1) == 0:
            tl.store(SCALE + planes, scale, mask=plane_mask)
            if MODE != MODE_IDENTITY:
                tl.store(SLOPE + planes, slope, mask=plane_mask)
            if MODE == MODE_MAX_DIV:
                tl.store(LEFT + planes, left, mask=plane_mask)
                tl.store(OFFSET + planes, offset, mask=plane_mask)


@triton.jit
def evo_plane_bwd_kernel(
    DY, X, LEFT, SLOPE, OFFSET, SCALE, DX, DLEFT, DSLOPE, DOFFSET, DSCALE, DSHIFT, P, C, HW,
    stride_dyn, stride_dyc, stride_dyhw, stride_xn, stride_xc, stride_xhw, stride_dxn, stride_dxc, stride_dxhw,
    MODE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, FLAT: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # Each program owns BLOCK_P planes and walks their HW values (a flat tile holds them whole), summing the
    # coefficient gradients per plane chunk by chunk (per-lane accumulators, five of them, spilled registers at small
    # planes). Masked lanes are zeroed with tl.where: a padded lane may divide by zero.
    planes, plane_mask, n, c = channel_block(C, BLOCK_P)
    slope = tl.load(SLOPE + planes, mask=plane_mask, other=0.0).to(COMPUTE)
    scale = tl.load(SCALE + planes, mask=plane_mask, other=0.0).to(COMPUTE)
    if MODE == MODE_MAX_DIV:
        left = tl.load(LEFT + planes, mask=plane_mask, other=1.0).to(COMPUTE)
        offset = tl.load(OFFSET + planes, mask=plane_mask, other=0.0).to(COMPUTE)
    dleft = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    dslope = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    doffset = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    dscale = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    dshift = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    for start in range(0, HW, BLOCK_HW):  # once for a flat tile (BLOCK_HW ≥ HW)
        hw, mask, lane = value_tile(C, HW, start, plane_mask, BLOCK_P, BLOCK_HW, FLAT, ALIGN)
        dy = load_values(DY, n, c, hw, C, stride_dyn, stride_dyc, stride_dyhw, mask, COMPUTE, FLAT, ALIGN)
        x = load_values(X, n, c, hw, C, stride_xn, stride_xc, stride_xhw, mask, COMPUTE, FLAT, ALIGN)
        lane_slope = spread(slope, lane, FLAT)
        df = dy * spread(scale, lane, FLAT)
        dshift += plane_sum(dy, lane, HW, FLAT, BLOCK_P)
        if MODE == MODE_SWISH:
            s = _sigmoid(lane_slope * x)
            dscale += plane_sum(dy * x * s, lane, HW, FLAT, BLOCK_P)
            # d/dt of t·sigmoid(t) splits into the sigmoid and its derivative s(1 − s), times the slope or x.
            d_inner = df * x * s * (1.0 - s)
            dx = df * s + d_inner * lane_slope
            dslope += plane_sum(d_inner * x, lane, HW, FLAT, BLOCK_P)
        else:
            lane_left = spread(left, lane, FLAT)
            right = lane_slope * x + spread(offset, lane, FLAT)
            denominator = tl.maximum(lane_left, right, propagate_nan=tl.PropagateNan.ALL)
            f = x / denominator
            dscale += plane_sum(tl.where(mask, dy * f, 0.0), lane, HW, FLAT, BLOCK_P)
            d_denominator = tl.where(mask, -df * f / denominator, 0.0)
            left_share = tl.where(lane_left > right, 1.0, tl.where(lane_left == right, 0.5, 0.0))
            d_right = d_denominator * (1.0 - left_share)
            dleft += plane_sum(d_denominator * left_share, lane, HW, FLAT, BLOCK_P)
            dslope += plane_sum(d_right * x, lane, HW, FLAT, BLOCK_P)
            doffset += plane_sum(d_right, lane, HW, FLAT, BLOCK_P)
            dx = df / denominator + d_right * lane_slope
        tl.store(DX + value_offsets(n, c, hw, C, stride_dxn, stride_dxc, stride_dxhw, FLAT, ALIGN), dx, mask=mask)
    tl.store(DSLOPE + planes, dslope, mask=plane_mask)
    tl.store(DSCALE + planes, dscale, mask=plane_mask)
    tl.store(DSHIFT + planes, dshift, mask=plane_mask)
    if MODE == MODE_MAX_DIV:
        tl.store(DLEFT + planes, dleft, mask=plane_mask)
        tl.store(DOFFSET + planes, doffset, mask=plane_mask)


@triton.jit
def _group_statistic(plane_mean, plane_var, mask, eps, CPG, STATISTIC: tl.constexpr, COMPUTE: tl.constexpr):
    """Per row (sample) of a group tile of plane moments: ``(c, rsqrt(statistic + eps))`` where the statistic's
    derivative with respect to each plane mean is ``2c/CPG`` (``c``: the plane mean minus the group's mean, or the
    plane mean itself for the mean square) and with respect to each plane variance ``1/CPG``."""
    count = tl.cast(CPG, COMPUTE)
    if STATISTIC == 0:
        centred = tl.where(mask, plane_mean - (tl.sum(plane_mean, axis=1) / count)[:, None], 0.0)
    else:
        centred = plane_mean
    return centred, tl.math.rsqrt(tl.sum(plane_var + centred * centred, axis=1) / count + eps)


@triton.jit
def evo_norm_s_finalize_bwd_kernel(
    DSCALE, DSHIFT, DSLOPE, PLANE_MEAN, PLANE_VAR, WEIGHT, DPLANE_MEAN, DPLANE_VAR, DWEIGHT, DBIAS, DV,
    N, C, G, CPG, eps,
    STATISTIC: tl.constexpr, NUMERATOR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # From the elementwise pass's per-plane (dscale, dshift[, dslope]): the gradients of the plane moments and of
    # weight, bias and v. With the identity numerator the pass is centred at the plane mean and shift holds
    # plane_mean·scale, so the uncentred dscale is dscale + plane_mean·dshift and the plane mean's explicit terms
    # cancel; its only gradient is through the statistic.
    K = tl.cast(CPG, COMPUTE)
    for g in range(tl.program_id(0), G, tl.num_programs(0)):
        weight = load_optional_group_channels(WEIGHT, g, CPG, 1.0, HAS_WEIGHT, BLOCK_C, COMPUTE)
        dweight = tl.zeros((BLOCK_C,), dtype=COMPUTE)
        dbias = tl.zeros((BLOCK_C,), dtype=COMPUTE)
        dv = tl.zeros((BLOCK_C,), dtype=COMPUTE)
        for start in range(0, N, BLOCK_N):
            offsets, mask, plane_mean, plane_var = load_group_planes(PLANE_MEAN, PLANE_VAR, start, N, C, g, CPG,
                                                                     BLOCK_N, BLOCK_C)
            dscale = tl.load(DSCALE + offsets, mask=mask, other=0.0).to(COMPUTE)
            dshift = tl.load(DSHIFT + offsets, mask=mask, other=0.0).to(COMPUTE)
            if NUMERATOR == 0:
                dscale += plane_mean * dshift
            elif NUMERATOR == 1:
                dv += tl.sum(tl.load(DSLOPE + offsets, mask=mask, other=0.0).to(COMPUTE), axis=0)
            centred, inv_denominator = _group_statistic(plane_mean, plane_var, mask, eps, CPG, STATISTIC, COMPUTE)
            dweight += tl.sum(dscale * inv_denominator[:, None], axis=0)
            dbias += tl.sum(dshift, axis=0)
            dinv = tl.sum(dscale * weight[None, :], axis=1)
            dstatistic = -0.5 * dinv * inv_denominator * inv_denominator * inv_denominator / K
            tl.store(DPLANE_MEAN + offsets, 2.0 * dstatistic[:, None] * centred, mask=mask)
            tl.store(DPLANE_VAR + offsets, tl.zeros((BLOCK_N, BLOCK_C), dtype=COMPUTE) + dstatistic[:, None],
                     mask=mask)
        if HAS_WEIGHT:
            store_group_channels(DWEIGHT, g, CPG, dweight, BLOCK_C)
        if HAS_BIAS:
            store_group_channels(DBIAS, g, CPG, dbias, BLOCK_C)
        if NUMERATOR == 1:
            store_group_channels(DV, g, CPG, dv, BLOCK_C)


@triton.jit
def _plane_rms(plane_mean, plane_var, eps):
    """``sqrt(mean_{h,w}(x²) + eps)`` of each plane from its moments."""
    return tl.sqrt(plane_var + plane_mean * plane_mean + eps)


@triton.jit
def evo_norm_b_finalize_fwd_kernel(
    PLANE_MEAN, PLANE_VAR, RUNNING_VAR, WEIGHT, BIAS, V, LEFT, SLOPE, OFFSET, SCALE, SHIFT, VAR,
    N, C, G, CPG, count, momentum, eps,
    BATCH_STATISTICS: tl.constexpr, UPDATE_RUNNING: tl.constexpr, VARIANT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # The B family's (N, C) coefficients of plane_max_div_affine from the planes' moments, and timm's running-variance
    # update in place. Each program owns CPG channels ("groups" of channels) for every sample.
    for g in range(tl.program_id(0), G, tl.num_programs(0)):
        if BATCH_STATISTICS:
            _, var = group_batch_moments(PLANE_MEAN, PLANE_VAR, N, C, g, CPG, COMPUTE, BLOCK_N, BLOCK_C)
            if UPDATE_RUNNING:
                # timm's rule: the running variance receives the unbiased batch variance.
                unbiased = tl.cast(count, COMPUTE) / (tl.cast(count, COMPUTE) - 1.0)
                running_var = load_group_channels(RUNNING_VAR, g, CPG, 0.0, BLOCK_C, COMPUTE)
                store_group_channels(RUNNING_VAR, g, CPG, running_var * (1.0 - momentum) + var * unbiased * momentum,
                                     BLOCK_C)
        else:
            var = load_group_channels(RUNNING_VAR, g, CPG, 1.0, BLOCK_C, COMPUTE)
        store_group_channels(VAR, g, CPG, var, BLOCK_C)
        left = tl.sqrt(var + eps)
        weight = load_optional_group_channels(WEIGHT, g, CPG, 1.0, HAS_WEIGHT, BLOCK_C, COMPUTE)
        bias = load_optional_group_channels(BIAS, g, CPG, 0.0, HAS_BIAS, BLOCK_C, COMPUTE)
        v = load_optional_group_channels(V, g, CPG, 0.0, VARIANT == 0, BLOCK_C, COMPUTE)
        for start in range(0, N, BLOCK_N):
            offsets, mask, plane_mean, plane_var = load_group_planes(PLANE_MEAN, PLANE_VAR, start, N, C, g, CPG,
                                                                     BLOCK_N, BLOCK_C)
            zeros = tl.zeros((BLOCK_N, BLOCK_C), dtype=COMPUTE)
            slope, offset = _b_right_side(plane_mean, plane_var, v[None, :], eps, VARIANT)
            tl.store(LEFT + offsets, zeros + left[None, :], mask=mask)
            tl.store(SLOPE + offsets, slope, mask=mask)
            tl.store(OFFSET + offsets, offset, mask=mask)
            tl.store(SCALE + offsets, zeros + weight[None, :], mask=mask)
            tl.store(SHIFT + offsets, zeros + bias[None, :], mask=mask)


@triton.jit
def evo_norm_b_finalize_bwd_kernel(
    DLEFT, DSLOPE, DOFFSET, DSCALE, DSHIFT, PLANE_MEAN, PLANE_VAR, VAR, DPLANE_MEAN, DPLANE_VAR, DWEIGHT, DBIAS, DV,
    N, C, G, CPG, eps,
    BATCH_GRADIENT: tl.constexpr, VARIANT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # From plane_max_div_affine's per-plane coefficient gradients: left = sqrt(var + eps) per channel (var the batch
    # variance of the planes with BATCH_GRADIENT), the right-hand side's slope and offset from each plane's moments
    # (B0: offset = sqrt(plane_var + eps); B1, B2: rms = sqrt(plane_var + plane_mean² + eps)), scale = weight,
    # shift = bias.
    for g in range(tl.program_id(0), G, tl.num_programs(0)):
        left = tl.sqrt(load_group_channels(VAR, g, CPG, 1.0, BLOCK_C, COMPUTE) + eps)
        dweight = tl.zeros((BLOCK_C,), dtype=COMPUTE)
        dbias = tl.zeros((BLOCK_C,), dtype=COMPUTE)
        dv = tl.zeros((BLOCK_C,), dtype=COMPUTE)
        dleft = tl.zeros((BLOCK_C,), dtype=COMPUTE)
        for start in range(0, N, BLOCK_N):
            offsets, mask, plane_mean, plane_var = load_group_planes(PLANE_MEAN, PLANE_VAR, start, N, C, g, CPG,
                                                                     BLOCK_N, BLOCK_C)
            dslope = tl.load(DSLOPE + offsets, mask=mask, other=0.0).to(COMPUTE)
            doffset = tl.load(DOFFSET + offsets, mask=mask, other=0.0).to(COMPUTE)
            dweight += tl.sum(tl.load(DSCALE + offsets, mask=mask, other=0.0).to(COMPUTE), axis=0)
            dbias += tl.sum(tl.load(DSHIFT + offsets, mask=mask, other=0.0).to(COMPUTE), axis=0)
            dleft += tl.sum(tl.load(DLEFT + offsets, mask=mask, other=0.0).to(COMPUTE), axis=0)
            if VARIANT == 0:
                dv += tl.sum(dslope, axis=0)
                dplane_var = 0.5 * doffset / tl.sqrt(plane_var + eps)
                dplane_mean = tl.zeros((BLOCK_N, BLOCK_C), dtype=COMPUTE)
            else:
                drms = doffset
                if VARIANT == 1:
                    drms += dslope
                rms = _plane_rms(plane_mean, plane_var, eps)
                dplane_var = 0.5 * drms / rms
                dplane_mean = drms * plane_mean / rms
            tl.store(DPLANE_MEAN + offsets, dplane_mean, mask=mask)
            tl.store(DPLANE_VAR + offsets, dplane_var, mask=mask)
        if HAS_WEIGHT:
            store_group_channels(DWEIGHT, g, CPG, dweight, BLOCK_C)
        if HAS_BIAS:
            store_group_channels(DBIAS, g, CPG, dbias, BLOCK_C)
        if VARIANT == 0:
            store_group_channels(DV, g, CPG, dv, BLOCK_C)
        if BATCH_GRADIENT:
            # var = mean_N(plane_var + (plane_mean − mean)²): a second pass, as it needs dleft summed over all N.
            mean, _ = group_batch_moments(PLANE_MEAN, PLANE_VAR, N, C, g, CPG, COMPUTE, BLOCK_N, BLOCK_C)
            dvar = 0.5 * dleft / left / tl.cast(N, COMPUTE)
            tl.debug_barrier()  # this program's stores above are read back below
            for start in range(0, N, BLOCK_N):
                offsets, mask = group_tile(start, N, C, g, CPG, BLOCK_N, BLOCK_C)
                plane_mean = tl.load(PLANE_MEAN + offsets, mask=mask, other=0.0)
                dplane_mean = tl.load(DPLANE_MEAN + offsets, mask=mask, other=0.0)
                dplane_var = tl.load(DPLANE_VAR + offsets, mask=mask, other=0.0)
                tl.store(DPLANE_MEAN + offsets, dplane_mean + 2.0 * dvar[None, :] * (plane_mean - mean[None, :]),
                         mask=mask)
                tl.store(DPLANE_VAR + offsets, dplane_var + dvar[None, :], mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


_FWD_POINTERS = ("left", "slope", "offset", "scale", "shift")
_BWD_POINTERS = ("left", "slope", "offset", "scale")  # shift's gradient, Σ dy, needs no coefficient


def _coefficients(mode: tl.constexpr, coefficients: dict[str, torch.Tensor],
                  pointers: tuple[str, ...]) -> list[torch.Tensor]:
    """The coefficient pointers a kernel takes, in its order, contiguous: those of ``mode`` among ``pointers`` must be
    given (by name) and nothing else; one the mode does not read is replaced by ``scale`` (never dereferenced)."""
    names = tuple(name for name in MODE_COEFFICIENTS[mode] if name in pointers)
    if set(coefficients) != set(names):
        raise ValueError(f"mode {mode} takes coefficients {names}, got {sorted(coefficients)}")
    return [coefficients.get(name, coefficients["scale"]).contiguous() for name in pointers]


def _launch_pass(x: torch.Tensor, mode: tl.constexpr, coefficients: list[torch.Tensor], statistics: list[torch.Tensor],
                 *, source: tl.constexpr, statistic: int = 0, variant: int = 0, has_weight: bool = False,
                 has_bias: bool = False, store: bool = False, groups: int = 1, eps: float = 0.0,
                 max_block_hw: Optional[int] = None) -> torch.Tensor:
    """Launch :func:`evo_plane_fwd_kernel`: ``coefficients`` its (left, slope, offset, scale, shift) pointers,
    ``statistics`` its (plane_mean, plane_var, running_var, weight, bias, v) pointers; returns ``y`` like ``x``."""
    y = torch.empty_like(x)
    x3, y3 = as_planes(x), as_planes(y)
    n, c, hw = x3.shape
    if y.numel() == 0:
        return y
    coefficients = [t if t.numel() > 0 else statistics[0] for t in coefficients]  # unwritten ones: never read
    tile = channel_tile(x3, max_block_hw, others=(y3,),
                        group_block=next_power_of_2(c // groups) if source == COEFFICIENTS_S else 0)
    evo_plane_fwd_kernel[(channel_grid(x3, tile.block_p), tile.chunks(hw))](
        x3, *coefficients, y3, *statistics, n * c, c, hw, c // groups, eps, *plane_strides(x3), *plane_strides(y3),
        MODE=mode.value, COEFFICIENTS=source.value, STATISTIC=statistic, VARIANT=variant, HAS_WEIGHT=has_weight,
        HAS_BIAS=has_bias, STORE_COEFFICIENTS=store, COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)),
        BLOCK_CPG=next_power_of_2(c // groups), STEPS=tile.steps(hw), **tile.constexprs(),
    )
    return y


def evo_plane_fwd(x: torch.Tensor, mode: tl.constexpr, *, max_block_hw: Optional[int] = None,
                  **coefficients: torch.Tensor) -> torch.Tensor:
    """``y = f(x)·scale + shift`` with ``f`` by ``mode`` (module docstring) and ``(N, C)`` coefficients given by name
    (:data:`MODE_COEFFICIENTS`); arithmetic in fp32 (fp64 for fp64 ``x``), ``y`` like ``x`` (dtype, memory format)."""
    pointers = _coefficients(mode, coefficients, _FWD_POINTERS)
    scale = pointers[3]
    return _launch_pass(x, mode, pointers, [scale] * 6, source=COEFFICIENTS_GIVEN, max_block_hw=max_block_hw)


def _stored_coefficients(plane_mean: torch.Tensor, names: tuple[str, ...], store: bool) -> dict[str, torch.Tensor]:
    """Buffers for the coefficients a fused pass writes for the backward: ``(N, C)`` each when ``store``, else
    empty (never written)."""
    return {name: torch.empty_like(plane_mean) if store else plane_mean.new_empty(0) for name in names}


def evo_norm_s_fwd(x: torch.Tensor, plane_mean: torch.Tensor, plane_var: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], v: Optional[torch.Tensor], *, groups: int, eps: float, statistic: int,
                   numerator: int, store_coefficients: bool, max_block_hw: Optional[int] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The S family after ``plane_moments``, in one launch: ``(y, slope, scale)``. Each plane's coefficients are
    computed in the pass from its (sample, group)'s planes' moments: ``scale = weight·rsqrt(group statistic + eps)``,
    ``shift = bias`` and the numerator's slope (:data:`NUMERATOR_SWISH`: ``v``; :data:`NUMERATOR_SILU`: 1; the
    identity numerator has none). With ``store_coefficients`` ``slope``/``scale`` are those ``(N, C)`` coefficients
    (the backward's; ``slope`` empty for the identity), else empty."""
    mode = MODE_IDENTITY if numerator == NUMERATOR_IDENTITY else MODE_SWISH
    stored = _stored_coefficients(plane_mean, MODE_COEFFICIENTS[mode][:-1], store_coefficients)
    scale = stored["scale"]
    y = _launch_pass(x, mode, [scale, stored.get("slope", scale), scale, scale, scale],
                     [plane_mean, plane_var, plane_mean, optional_pointer(weight, plane_mean),
                      optional_pointer(bias, plane_mean), optional_pointer(v, plane_mean)],
                     source=COEFFICIENTS_S, statistic=statistic, variant=numerator, has_weight=weight is not None,
                     has_bias=bias is not None, store=store_coefficients, groups=groups, eps=eps,
                     max_block_hw=max_block_hw)
    return y, stored.get("slope", plane_mean.new_empty(0)), scale


def evo_norm_b_eval_fwd(x: torch.Tensor, plane_mean: torch.Tensor, plane_var: torch.Tensor, running_var: torch.Tensor,
                        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], v: Optional[torch.Tensor], *,
                        variant: int, eps: float, store_coefficients: bool, max_block_hw: Optional[int] = None
                        ) -> tuple[torch.Tensor, ...]:
    """The B family in eval after ``plane_moments``, in one launch: ``(y, left, slope, offset, scale)``, the
    coefficients those of :func:`evo_norm_b_finalize_fwd` on ``running_var`` (computed per plane in the pass) when
    ``store_coefficients``, else empty."""
    stored = _stored_coefficients(plane_mean, MODE_COEFFICIENTS[MODE_MAX_DIV][:-1], store_coefficients)
    y = _launch_pass(x, MODE_MAX_DIV, [*stored.values(), stored["scale"]],
                     [plane_mean, plane_var, running_var.contiguous(), optional_pointer(weight, plane_mean),
                      optional_pointer(bias, plane_mean), optional_pointer(v, plane_mean)],
                     source=COEFFICIENTS_B_RUNNING, variant=variant, has_weight=weight is not None,
                     has_bias=bias is not None, store=store_coefficients, eps=eps, max_block_hw=max_block_hw)
    return (y, *stored.values())


def evo_plane_bwd(dy: torch.Tensor, x: torch.Tensor, mode: tl.constexpr, *, max_block_hw: Optional[int] = None,
                  **coefficients: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`evo_plane_fwd`, given its coefficients less ``shift``: ``dx`` (like ``x``) followed by the
    ``(N, C)`` gradient of each coefficient of ``mode`` in :data:`MODE_COEFFICIENTS` order (``shift``'s is ``Σ dy``),
    in ``scale``'s dtype."""
    left, slope, offset, scale = _coefficients(mode, coefficients, _BWD_POINTERS)
    dx = torch.empty_like(x)
    dy3, x3, dx3 = as_planes(dy), as_planes(x), as_planes(dx)
    n, c, hw = x3.shape
    # The kernel writes every gradient; only planes without values (HW = 0) need zeros.
    allocate = torch.zeros if hw == 0 else torch.empty
    grads = {name: allocate((n, c), dtype=scale.dtype, device=x.device) for name in MODE_COEFFICIENTS[mode]}
    if n * c > 0 and hw > 0:
        unused = grads["scale"]
        tile = channel_tile(x3, max_block_hw, reduction=True, others=(dy3, dx3))
        evo_plane_bwd_kernel[(channel_grid(x3, tile.block_p),)](
            dy3, x3, left, slope, offset, scale, dx3, grads.get("left", unused), grads["slope"],
            grads.get("offset", unused), grads["scale"], grads["shift"], n * c, c, hw,
            *plane_strides(dy3), *plane_strides(x3), *plane_strides(dx3),
            MODE=mode.value, COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)), **tile.constexprs(),
        )
    return (dx, *grads.values())


def evo_norm_s_finalize_bwd(dslope: Optional[torch.Tensor], dscale: torch.Tensor, dshift: torch.Tensor,
                            plane_mean: torch.Tensor, plane_var: torch.Tensor, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], v: Optional[torch.Tensor], *, groups: int, eps: float,
                            statistic: int, numerator: int) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`evo_norm_s_finalize_fwd` followed by its elementwise pass, from that pass's per-plane
    coefficient gradients: ``(dplane_mean, dplane_var, dweight, dbias, dv)``; a parameter's in its shape and dtype,
    empty for a missing one (``v`` counts as missing unless the numerator is :data:`NUMERATOR_SWISH`)."""
    n, channels = plane_mean.shape
    dplane_mean, dplane_var = torch.empty_like(plane_mean), torch.empty_like(plane_mean)
    grads = [parameter_grad(p, plane_mean) for p in (weight, bias, v if numerator == NUMERATOR_SWISH else None)]
    if n * channels > 0:
        block_n, block_c = group_tiles(n, channels // groups)
        evo_norm_s_finalize_bwd_kernel[(groups,)](
            dscale.contiguous(), dshift.contiguous(), optional_pointer(dslope, dscale), plane_mean, plane_var,
            optional_pointer(weight, plane_mean), dplane_mean, dplane_var, *grads,
            n, channels, groups, channels // groups, eps,
            STATISTIC=statistic, NUMERATOR=numerator, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            COMPUTE=tl_compute_dtype(compute_dtype(plane_mean.dtype)), BLOCK_N=block_n, BLOCK_C=block_c,
            num_warps=num_warps_for(block_n * block_c, plane_mean.device),
        )
    return (dplane_mean, dplane_var, *grads)


def _b_programs(channels: int) -> tuple[int, int]:
    """(programs, channels per program) of the B finalize kernels: a power of two dividing ``C``, at most
    :data:`B_CHANNELS_PER_PROGRAM`."""
    per_program = math.gcd(channels, B_CHANNELS_PER_PROGRAM)
    return channels // per_program, per_program


def evo_norm_b_finalize_fwd(plane_mean: torch.Tensor, plane_var: torch.Tensor, running_var: Optional[torch.Tensor],
                            weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], v: Optional[torch.Tensor],
                            *, training: bool, variant: int, momentum: float, count: int, eps: float
                            ) -> tuple[torch.Tensor, ...]:
    """``(left, slope, offset, scale, shift, var)``: the ``(N, C)`` coefficients of ``plane_max_div_affine`` for
    B variant ``variant`` (:data:`VARIANT_B0` …) and the ``(C,)`` variance the left side used (the batch's in
    training, ``running_var`` in eval); in training ``running_var`` (if given) is updated in place (timm's rule;
    ``count`` = ``N·H·W``)."""
    n, channels = plane_mean.shape
    coefficients = [torch.empty_like(plane_mean) for _ in range(5)]
    var = plane_mean.new_empty(channels)
    if n * channels > 0:
        programs, per_program = _b_programs(channels)
        block_n, block_c = group_tiles(n, per_program)
        evo_norm_b_finalize_fwd_kernel[(programs,)](
            plane_mean, plane_var, optional_pointer(running_var, var), optional_pointer(weight, var),
            optional_pointer(bias, var), optional_pointer(v, var), *coefficients, var,
            n, channels, programs, per_program, count, momentum, eps,
            BATCH_STATISTICS=training, UPDATE_RUNNING=training and running_var is not None, VARIANT=variant,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            COMPUTE=tl_compute_dtype(plane_mean.dtype), BLOCK_N=block_n, BLOCK_C=block_c,
            num_warps=num_warps_for(block_n * block_c, plane_mean.device),
        )
    return (*coefficients, var)


def evo_norm_b_finalize_bwd(dleft: torch.Tensor, dslope: torch.Tensor, doffset: torch.Tensor, dscale: torch.Tensor,
                            dshift: torch.Tensor, plane_mean: torch.Tensor, plane_var: torch.Tensor,
                            var: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            v: Optional[torch.Tensor], *, training: bool, variant: int, eps: float
                            ) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`evo_norm_b_finalize_fwd` from ``plane_max_div_affine``'s coefficient gradients:
    ``(dplane_mean, dplane_var, dweight, dbias, dv)``; a parameter's in its shape and dtype, empty for a missing one
    (``v`` counts as missing except for B0). ``training``: ``var`` is the planes' batch variance, with gradient."""
    n, channels = plane_mean.shape
    dplane_mean, dplane_var = torch.empty_like(plane_mean), torch.empty_like(plane_mean)
    grads = [parameter_grad(p, plane_mean) for p in (weight, bias, v if variant == VARIANT_B0 else None)]
    if n * channels > 0:
        programs, per_program = _b_programs(channels)
        block_n, block_c = group_tiles(n, per_program)
        evo_norm_b_finalize_bwd_kernel[(programs,)](
            *(t.contiguous() for t in (dleft, dslope, doffset, dscale, dshift)), plane_mean, plane_var, var,
            dplane_mean, dplane_var, *grads, n, channels, programs, per_program, eps,
            BATCH_GRADIENT=training, VARIANT=variant, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            COMPUTE=tl_compute_dtype(plane_mean.dtype), BLOCK_N=block_n, BLOCK_C=block_c,
            num_warps=num_warps_for(block_n * block_c, plane_mean.device),
        )
    return (dplane_mean, dplane_var, *grads)
