"""Triton kernels for Batch-Channel Normalization's per-``(N, C)`` "finalize" step, forward and backward.

BCN (Qiao et al., arXiv 1903.10520) is, per ``(sample n, channel c)`` plane, an affine map
``y = (x − plane_mean)·scale[n, c] + shift[n, c]`` whose coefficients follow exactly from the planes' moments
(``kernels/channel_stats.py``'s ``plane_moments``). A training call is three launches: ``plane_moments``, the
finalize kernel below, ``plane_affine``; in eval the same math on the running statistics needs no reduction over the
batch and runs inside the affine pass (``batch_channel_eval_fwd_kernel``), two launches. The finalize kernel does all
the ``(N, C)``-sized math in one launch:

* the batch stage's per-channel statistics: the batch moments (equal counts: the mean of the planes' means, and the
  mean of their variances plus the variance of their means), or the running statistics (eval), or EstBN's estimates
  after their update (the authors' ``EstBN``, BCN README);
* the running-statistics update in place on device (PyTorch's BatchNorm rule, ``num_batches_tracked`` included);
* the batch stage ``a = rsqrt(var + bn_eps)·bn_weight``, the moments of its output per plane, their combination over
  each ``(sample, group)`` (equal counts again), the group affine, and the per-plane ``scale``/``shift``.

One program owns one group of ``C/G`` channels for every sample (a loop over groups when the grid is smaller), so the
batch moments of its channels and the group moments of its planes are both local: no atomics, deterministic.

The backward kernel is the hand-derived gradient of that math: from the per-plane ``(dscale, dshift)`` of
``plane_affine``'s backward (``dscale = Σ dy·(x − plane_mean)``, ``dshift = Σ dy``) it returns the gradients of the
plane moments (the centre's ``−scale·dshift`` included) and of the four parameters; ``plane_moments``' backward then
turns the moments' gradients into ``dx``. Arithmetic in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

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
    own_column,
    parameter_grad,
    plane_group_tile,
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

# Which per-channel statistics normalize the batch stage (the kernels' STATISTICS constexpr).
BATCH_STATISTICS = 0  # the batch's moments, with gradient (training, estimate=False)
RUNNING_STATISTICS = 1  # the running buffers as they are (eval)
ESTIMATED_STATISTICS = 2  # EstBN: the estimates moved towards the batch first (training, estimate=True), no gradient

# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _group_stage(plane_mean, plane_var, mask, mean, a, bn_bias, eps, CPG, COMPUTE: tl.constexpr):
    """Per row of a tile of one (sample, group)'s planes: the batch stage's output moments per plane, their group
    combination, and ``(u_mean − group_mean, rsqrt(group_var + eps))``. The per-channel ``mean``, ``a`` and
    ``bn_bias`` come broadcastable to the tile (a row ``[None, :]`` when every row is the same group)."""
    u_mean = (plane_mean - mean) * a + bn_bias
    u_var = tl.where(mask, plane_var * (a * a), 0.0)
    count = tl.cast(CPG, COMPUTE)
    group_mean = tl.sum(tl.where(mask, u_mean, 0.0), axis=1) / count
    centred = tl.where(mask, u_mean - group_mean[:, None], 0.0)
    group_var = tl.sum(u_var + centred * centred, axis=1) / count
    return centred, tl.math.rsqrt(group_var + eps)


@triton.jit
def batch_channel_finalize_fwd_kernel(
    PLANE_MEAN, PLANE_VAR, RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES, RATE, BN_WEIGHT, BN_BIAS, WEIGHT, BIAS,
    SCALE, SHIFT, MEAN, VAR, N, C, G, CPG, count, momentum, estimate_rate, eps, bn_eps,
    STATISTICS: tl.constexpr, UPDATE_RUNNING: tl.constexpr, COUNT_BATCHES: tl.constexpr, CUMULATIVE: tl.constexpr,
    RATE_FROM_TENSOR: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # STATISTICS: 0 batch, 1 running, 2 estimated (the module constants above). With CUMULATIVE (momentum=None) the
    # rate is 1/num_batches_tracked after its increment: the launcher runs one program, which reads the counter before
    # it writes it; otherwise only program 0 writes it and nobody reads it.
    if COUNT_BATCHES:
        batches = tl.load(NUM_BATCHES) + 1
        tl.store(NUM_BATCHES, batches, mask=tl.program_id(0) == 0)
        if CUMULATIVE:
            momentum = 1.0 / batches.to(COMPUTE)
    for g in range(tl.program_id(0), G, tl.num_programs(0)):
        if STATISTICS == 0:
            mean, var = group_batch_moments(PLANE_MEAN, PLANE_VAR, N, C, g, CPG, COMPUTE, BLOCK_N, BLOCK_C)
            if UPDATE_RUNNING:
                # PyTorch's rule: the running variance receives the unbiased batch variance.
                unbiased = tl.cast(count, COMPUTE) / (tl.cast(count, COMPUTE) - 1.0)
                running_mean = load_group_channels(RUNNING_MEAN, g, CPG, 0.0, BLOCK_C, COMPUTE)
                running_var = load_group_channels(RUNNING_VAR, g, CPG, 0.0, BLOCK_C, COMPUTE)
                store_group_channels(RUNNING_MEAN, g, CPG, running_mean * (1.0 - momentum) + mean * momentum, BLOCK_C)
                store_group_channels(RUNNING_VAR, g, CPG, running_var * (1.0 - momentum) + var * unbiased * momentum,
                                BLOCK_C)
        else:
            mean = load_group_channels(RUNNING_MEAN, g, CPG, 0.0, BLOCK_C, COMPUTE)
            var = load_group_channels(RUNNING_VAR, g, CPG, 1.0, BLOCK_C, COMPUTE)
            if STATISTICS == 2:
                # EstBN: the variance is centred at the old mean estimate; the layer then uses the new estimates as
                # the buffers hold them (rounded to their dtype).
                if RATE_FROM_TENSOR:
                    rate = tl.load(RATE).to(COMPUTE)
                else:
                    rate = estimate_rate
                batch_mean, batch_var = group_batch_moments(PLANE_MEAN, PLANE_VAR, N, C, g, CPG, COMPUTE, BLOCK_N,
                                                       BLOCK_C)
                centred_at_old = batch_var + (batch_mean - mean) * (batch_mean - mean)
                mean = mean * (1.0 - rate) + batch_mean * rate
                var = var * (1.0 - rate) + centred_at_old * rate
                mean = mean.to(RUNNING_MEAN.dtype.element_ty).to(COMPUTE)
                var = var.to(RUNNING_VAR.dtype.element_ty).to(COMPUTE)
                store_group_channels(RUNNING_MEAN, g, CPG, mean, BLOCK_C)
                store_group_channels(RUNNING_VAR, g, CPG, var, BLOCK_C)
        store_group_channels(MEAN, g, CPG, mean, BLOCK_C)
        store_group_channels(VAR, g, CPG, var, BLOCK_C)
        a = tl.math.rsqrt(var + bn_eps) * load_optional_group_channels(BN_WEIGHT, g, CPG, 1.0, HAS_BN_WEIGHT,
                                                                         BLOCK_C, COMPUTE)
        bn_bias = load_optional_group_channels(BN_BIAS, g, CPG, 0.0, HAS_BN_BIAS, BLOCK_C, COMPUTE)
        for start in range(0, N, BLOCK_N):
            offsets, mask, plane_mean, plane_var = load_group_planes(PLANE_MEAN, PLANE_VAR, start, N, C, g, CPG,
                                                                     BLOCK_N, BLOCK_C)
            centred, group_scale = _group_stage(plane_mean, plane_var, mask, mean[None, :], a[None, :],
                                                bn_bias[None, :], eps, CPG, COMPUTE)
            if HAS_WEIGHT:
                group_scale *= tl.load(WEIGHT + g).to(COMPUTE)
            shift = centred * group_scale[:, None]
            if HAS_BIAS:
                shift += tl.load(BIAS + g).to(COMPUTE)
            tl.store(SCALE + offsets, a[None, :] * group_scale[:, None], mask=mask)
            tl.store(SHIFT + offsets, shift, mask=mask)


@triton.jit
def batch_channel_finalize_bwd_kernel(
    DSCALE, DSHIFT, PLANE_MEAN, PLANE_VAR, MEAN, VAR, BN_WEIGHT, BN_BIAS, WEIGHT,
    DPLANE_MEAN, DPLANE_VAR, DBN_WEIGHT, DBN_BIAS, DWEIGHT, DBIAS, N, C, G, CPG, eps, bn_eps,
    BATCH_GRADIENT: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Forward, per plane (n, c) of group g with K = C/G channels (u is the batch stage's output):
    #   a = rsqrt(var + bn_eps)·bn_weight;  u_mean = (plane_mean − mean)·a + bn_bias;  u_var = plane_var·a²
    #   d = u_mean − mean_K(u_mean);  s = rsqrt(mean_K(u_var + d²) + eps);  gs = s·weight
    #   scale = a·gs;  shift = d·gs + bias;  and plane_affine's centre is plane_mean (its gradient −scale·dshift).
    # With BATCH_GRADIENT, mean and var are the batch moments of the planes and carry gradient.
    K = tl.cast(CPG, COMPUTE)
    for g in range(tl.program_id(0), G, tl.num_programs(0)):
        mean = load_group_channels(MEAN, g, CPG, 0.0, BLOCK_C, COMPUTE)
        inv_std = tl.math.rsqrt(load_group_channels(VAR, g, CPG, 1.0, BLOCK_C, COMPUTE) + bn_eps)
        bn_weight = load_optional_group_channels(BN_WEIGHT, g, CPG, 1.0, HAS_BN_WEIGHT, BLOCK_C, COMPUTE)
        bn_bias = load_optional_group_channels(BN_BIAS, g, CPG, 0.0, HAS_BN_BIAS, BLOCK_C, COMPUTE)
        weight = tl.full((), 1.0, COMPUTE)
        if HAS_WEIGHT:
            weight = tl.load(WEIGHT + g).to(COMPUTE)
        a = inv_std * bn_weight
        da = tl.zeros((BLOCK_C,), dtype=COMPUTE)
        du_mean_sum = tl.zeros((BLOCK_C,), dtype=COMPUTE)  # Σ_n ∂/∂u_mean: bn_bias's gradient
        dweight = tl.zeros((BLOCK_N,), dtype=COMPUTE)
        dbias = tl.zeros((BLOCK_N,), dtype=COMPUTE)
        for start in range(0, N, BLOCK_N):
            offsets, mask, plane_mean, plane_var = load_group_planes(PLANE_MEAN, PLANE_VAR, start, N, C, g, CPG,
                                                                     BLOCK_N, BLOCK_C)
            dscale = tl.load(DSCALE + offsets, mask=mask, other=0.0).to(COMPUTE)
            dshift = tl.load(DSHIFT + offsets, mask=mask, other=0.0).to(COMPUTE)
            centred, s = _group_stage(plane_mean, plane_var, mask, mean[None, :], a[None, :], bn_bias[None, :], eps,
                                      CPG, COMPUTE)
            group_scale = s * weight
            dgroup_scale = tl.sum(dscale * a[None, :] + dshift * centred, axis=1)
            dweight += dgroup_scale * s
            dbias += tl.sum(dshift, axis=1)
            # s = (group_var + eps)^(−1/2); group_var = mean_K(u_var + d²); d = u_mean − mean_K(u_mean).
            dgroup_var = -0.5 * dgroup_scale * weight * s * s * s
            dcentred = dshift * group_scale[:, None] + (2.0 / K) * dgroup_var[:, None] * centred
            du_mean = tl.where(mask, dcentred - (tl.sum(dcentred, axis=1) / K)[:, None], 0.0)
            du_var = tl.where(mask, (dgroup_var / K)[:, None], 0.0)
            plane_centred = tl.where(mask, plane_mean - mean[None, :], 0.0)
            da += tl.sum(du_var * 2.0 * a[None, :] * plane_var + du_mean * plane_centred
                         + dscale * group_scale[:, None], axis=0)
            du_mean_sum += tl.sum(du_mean, axis=0)
            tl.store(DPLANE_MEAN + offsets, du_mean * a[None, :] - a[None, :] * group_scale[:, None] * dshift,
                     mask=mask)
            tl.store(DPLANE_VAR + offsets, du_var * (a * a)[None, :], mask=mask)
        if HAS_BN_WEIGHT:
            store_group_channels(DBN_WEIGHT, g, CPG, da * inv_std, BLOCK_C)
        if HAS_BN_BIAS:
            store_group_channels(DBN_BIAS, g, CPG, du_mean_sum, BLOCK_C)
        if HAS_WEIGHT:
            tl.store(DWEIGHT + g, tl.sum(dweight, axis=0))
        if HAS_BIAS:
            tl.store(DBIAS + g, tl.sum(dbias, axis=0))
        if BATCH_GRADIENT:
            # mean = mean_N(plane_mean), var = mean_N(plane_var + (plane_mean − mean)²): the second pass adds their
            # gradients to every plane's, which needs the sums over all N samples above.
            dvar = -0.5 * da * bn_weight * inv_std * inv_std * inv_std
            dmean = -a * du_mean_sum
            count = tl.cast(N, COMPUTE)
            tl.debug_barrier()  # this program's stores above are read back below
            for start in range(0, N, BLOCK_N):
                offsets, mask = group_tile(start, N, C, g, CPG, BLOCK_N, BLOCK_C)
                plane_mean = tl.load(PLANE_MEAN + offsets, mask=mask, other=0.0)
                dplane_mean = tl.load(DPLANE_MEAN + offsets, mask=mask, other=0.0)
                dplane_var = tl.load(DPLANE_VAR + offsets, mask=mask, other=0.0)
                dplane_mean += (dmean[None, :] + 2.0 * dvar[None, :] * (plane_mean - mean[None, :])) / count
                tl.store(DPLANE_MEAN + offsets, dplane_mean, mask=mask)
                tl.store(DPLANE_VAR + offsets, dplane_var + (dvar / count)[None, :], mask=mask)


@triton.jit
def batch_channel_eval_fwd_kernel(
    X, PLANE_MEAN, PLANE_VAR, RUNNING_MEAN, RUNNING_VAR, BN_WEIGHT, BN_BIAS, WEIGHT, BIAS, Y, SCALE, SHIFT, MEAN, VAR,
    P, C, HW, CPG, eps, bn_eps, stride_xn, stride_xc, stride_xhw, stride_yn, stride_yc, stride_yhw,
    HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_COEFFICIENTS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
    FLAT: tl.constexpr, ALIGN: tl.constexpr, BLOCK_CPG: tl.constexpr, STEPS: tl.constexpr,
):
    # Eval (running statistics): the finalize math of each of this program's planes, from the moments of the planes
    # of its (sample, group), then y = (x − plane_mean)·scale + shift. Grid: (plane blocks, spans of STEPS HW
    # chunks); with STORE_COEFFICIENTS the first span's programs also write scale/shift (and the statistics used, for
    # the channels of sample 0) for the backward.
    planes, plane_mask, n, c = channel_block(C, BLOCK_P)
    offsets, mask = plane_group_tile(planes, plane_mask, CPG, BLOCK_CPG)
    channels = offsets % C
    mean = tl.load(RUNNING_MEAN + channels, mask=mask, other=0.0).to(COMPUTE)
    var = tl.load(RUNNING_VAR + channels, mask=mask, other=1.0).to(COMPUTE)
    a = tl.math.rsqrt(var + bn_eps) * load_optional(BN_WEIGHT, channels, mask, 1.0, HAS_BN_WEIGHT, COMPUTE)
    bn_bias = load_optional(BN_BIAS, channels, mask, 0.0, HAS_BN_BIAS, COMPUTE)
    plane_mean = tl.load(PLANE_MEAN + offsets, mask=mask, other=0.0)
    plane_var = tl.load(PLANE_VAR + offsets, mask=mask, other=0.0)
    centred, group_scale = _group_stage(plane_mean, plane_var, mask, mean, a, bn_bias, eps, CPG, COMPUTE)
    groups = (planes % C) // CPG
    group_scale *= load_optional(WEIGHT, groups, plane_mask, 1.0, HAS_WEIGHT, COMPUTE)
    scale = own_column(a, planes, CPG) * group_scale
    shift = own_column(centred, planes, CPG) * group_scale + load_optional(BIAS, groups, plane_mask, 0.0, HAS_BIAS,
                                                                            COMPUTE)
    center = own_column(plane_mean, planes, CPG)
    first, end = program_span(HW, BLOCK_HW, STEPS)
    for start in range(first, end, BLOCK_HW):
        hw, values, lane = value_tile(C, HW, start, plane_mask, BLOCK_P, BLOCK_HW, FLAT, ALIGN)
        x = load_values(X, n, c, hw, C, stride_xn, stride_xc, stride_xhw, values, COMPUTE, FLAT, ALIGN)
        tl.store(Y + value_offsets(n, c, hw, C, stride_yn, stride_yc, stride_yhw, FLAT, ALIGN),
                 (x - spread(center, lane, FLAT)) * spread(scale, lane, FLAT) + spread(shift, lane, FLAT),
                 mask=values)
    if STORE_COEFFICIENTS:
        if tl.program_id(1) == 0:
            tl.store(SCALE + planes, scale, mask=plane_mask)
            tl.store(SHIFT + planes, shift, mask=plane_mask)
            tl.store(MEAN + planes, own_column(mean, planes, CPG), mask=plane_mask & (planes < C))
            tl.store(VAR + planes, own_column(var, planes, CPG), mask=plane_mask & (planes < C))


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def batch_channel_finalize_fwd(
    plane_mean: torch.Tensor, plane_var: torch.Tensor, running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
    estimate_rate: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], *, statistics: int, momentum: Optional[float],
    estimate_rate_value: float, count: int, eps: float, bn_eps: float, num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, shift, mean, var)``: the per-plane coefficients ``(N, C)`` of ``plane_affine`` (centred at the plane
    mean) and the per-channel statistics ``(C,)`` the batch stage used, in the planes' dtype; updates the running
    buffers in place (module docstring). ``count`` is ``N·H·W`` (the running variance's Bessel correction);
    ``estimate_rate`` (a one-element tensor) overrides ``estimate_rate_value``."""
    n, channels = plane_mean.shape
    scale, shift = torch.empty_like(plane_mean), torch.empty_like(plane_mean)
    mean = plane_mean.new_empty(channels)
    var = plane_mean.new_empty(channels)
    if n * channels == 0:
        return scale, shift, mean, var
    update_running = statistics == BATCH_STATISTICS and running_mean is not None
    count_batches = update_running and num_batches_tracked is not None
    cumulative = update_running and momentum is None
    block_n, block_c = group_tiles(n, channels // num_groups)
    grid = 1 if cumulative else num_groups
    batch_channel_finalize_fwd_kernel[(grid,)](
        plane_mean, plane_var, optional_pointer(running_mean, mean), optional_pointer(running_var, var),
        optional_pointer(num_batches_tracked, mean), optional_pointer(estimate_rate, mean),
        optional_pointer(bn_weight, mean), optional_pointer(bn_bias, mean), optional_pointer(weight, mean),
        optional_pointer(bias, mean), scale, shift, mean, var,
        n, channels, num_groups, channels // num_groups, count, 0.0 if momentum is None else momentum,
        estimate_rate_value, eps, bn_eps,
        STATISTICS=statistics, UPDATE_RUNNING=update_running, COUNT_BATCHES=count_batches, CUMULATIVE=cumulative,
        RATE_FROM_TENSOR=estimate_rate is not None, HAS_BN_WEIGHT=bn_weight is not None,
        HAS_BN_BIAS=bn_bias is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        COMPUTE=tl_compute_dtype(plane_mean.dtype), BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=num_warps_for(block_n * block_c, plane_mean.device),
    )
    return scale, shift, mean, var


def batch_channel_finalize_bwd(
    dscale: torch.Tensor, dshift: torch.Tensor, plane_mean: torch.Tensor, plane_var: torch.Tensor,
    mean: torch.Tensor, var: torch.Tensor, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], *, batch_gradient: bool, eps: float,
    bn_eps: float, num_groups: int,
) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`batch_channel_finalize_fwd` (with ``plane_affine``'s centre, the plane mean, folded in):
    ``(dplane_mean, dplane_var, dbn_weight, dbn_bias, dweight, dbias)``; the parameters' in their shape and dtype,
    empty for a missing parameter. ``batch_gradient``: ``mean``/``var`` are the planes' batch moments (training with
    batch statistics), so their gradient flows back into the planes'."""
    n, channels = plane_mean.shape
    dplane_mean, dplane_var = torch.empty_like(plane_mean), torch.empty_like(plane_mean)
    grads = [parameter_grad(p, plane_mean) for p in (bn_weight, bn_bias, weight, bias)]
    if n * channels > 0:
        block_n, block_c = group_tiles(n, channels // num_groups)
        batch_channel_finalize_bwd_kernel[(num_groups,)](
            dscale.contiguous(), dshift.contiguous(), plane_mean, plane_var, mean, var,
            optional_pointer(bn_weight, mean),
            optional_pointer(bn_bias, mean), optional_pointer(weight, mean), dplane_mean, dplane_var, *grads,
            n, channels, num_groups, channels // num_groups, eps, bn_eps,
            BATCH_GRADIENT=batch_gradient, HAS_BN_WEIGHT=bn_weight is not None, HAS_BN_BIAS=bn_bias is not None,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            COMPUTE=tl_compute_dtype(compute_dtype(plane_mean.dtype)), BLOCK_N=block_n, BLOCK_C=block_c,
            num_warps=num_warps_for(block_n * block_c, plane_mean.device),
        )
    return (dplane_mean, dplane_var, *grads)


def batch_channel_eval_fwd(
    x: torch.Tensor, plane_mean: torch.Tensor, plane_var: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], *, eps: float, bn_eps: float, num_groups: int,
    store_coefficients: bool, max_block_hw: Optional[int] = None,
) -> tuple[torch.Tensor, ...]:
    """BCN in eval on the running statistics, after ``plane_moments``, in one launch: ``(y, scale, shift, mean,
    var)``, ``y`` like ``x``; with ``store_coefficients`` also the per-plane ``scale``/``shift`` ``(N, C)`` of
    :func:`batch_channel_finalize_fwd` and the statistics used ``(C,)``, in the planes' dtype (what the backward
    reads), else those four are empty."""
    n, channels = plane_mean.shape
    y = torch.empty_like(x)
    stored = (plane_mean.shape, plane_mean.shape, (channels,), (channels,)) if store_coefficients else ((0,),) * 4
    scale, shift, mean, var = (plane_mean.new_empty(shape) for shape in stored)
    x3, y3 = as_planes(x), as_planes(y)
    hw = x3.shape[2]
    if y.numel() == 0:
        return y, scale, shift, mean, var
    tile = channel_tile(x3, max_block_hw, others=(y3,), group_block=next_power_of_2(channels // num_groups))
    batch_channel_eval_fwd_kernel[(channel_grid(x3, tile.block_p), tile.chunks(hw))](
        x3, plane_mean, plane_var, running_mean.contiguous(), running_var.contiguous(),
        optional_pointer(bn_weight, plane_mean), optional_pointer(bn_bias, plane_mean),
        optional_pointer(weight, plane_mean), optional_pointer(bias, plane_mean), y3,
        *(t if store_coefficients else plane_mean for t in (scale, shift, mean, var)),
        n * channels, channels, hw, channels // num_groups, eps, bn_eps, *plane_strides(x3), *plane_strides(y3),
        HAS_BN_WEIGHT=bn_weight is not None, HAS_BN_BIAS=bn_bias is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, STORE_COEFFICIENTS=store_coefficients,
        COMPUTE=tl_compute_dtype(plane_mean.dtype), BLOCK_CPG=next_power_of_2(channels // num_groups),
        STEPS=tile.steps(hw), **tile.constexprs(),
    )
    return y, scale, shift, mean, var
