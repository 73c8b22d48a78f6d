"""``torch.library`` custom ops for Region Normalization.

All take ``x`` of shape ``(N, C, *spatial)`` in any memory format and a ``hole`` mask of shape
``(N, 1 or C, *spatial)`` (already resized to ``x``'s spatial size; any dtype, nonzero = hole); per-(plane, region)
tensors have a trailing region dim of 2, index 0 the hole region and index 1 the valid region.

**The fused layer** (:func:`region_norm`, three launches forward and three backward, ``kernels/region_norm.py``):

* ``region_stats(x, hole, cap) -> partials (N, C, 2, 4)``: per plane and region ``[count, s, Σx·s, M2]``, with ``s``
  a power of two (at most ``cap``) from the region's largest magnitude;
* ``region_finalize(partials, batch, eps, official_eps) -> stats``: ``[count, s, mean_s, rstd]`` per channel and
  region (``batch``, ``(C, 2, 4)``) or per plane and region (``(N, C, 2, 4)``);
* ``region_normalize(x, hole, stats, γ_hole, β_hole, γ_valid, β_valid, batch, official_affine) -> y``, and its
  backward ``region_normalize_bwd`` (``dx`` through the statistics, and the parameters' gradients).

The first two are not differentiable on their own; :class:`_RegionNorm` (a :class:`torch.autograd.Function`)
differentiates the whole layer with ``region_normalize_bwd``.

**RN-L** (:func:`learnable_region_norm`, two launches forward and four backward,
``kernels/region_learnable.py``): ``learnable_region_norm_fwd(x, conv1_weight, gamma_weight, gamma_bias, beta_weight,
beta_bias, threshold, eps, batch, official_eps, cap) -> (y, pool, s, gain, stats)`` (the self-aware map, its regions,
the region statistics and the spatial affine; the other outputs are what the backward reads) and its backward
``learnable_region_norm_bwd``, differentiated as one layer by :class:`_LearnableRegionNorm`.

**The composable pair** (synced statistics and DTensor inputs, whose statistics are combined between the ops):

* ``region_moments(x, hole, center) -> (count, first, second)``: per plane and region the value count,
  ``Σ (x − center)`` and ``Σ (x − center)²``, ``(N, C, 2)`` each, fp32 (fp64 for fp64 ``x``). Differentiable in ``x``
  and ``center``; the mask and the count carry no gradient.
* ``region_affine(x, hole, center, scale, shift) -> y``: ``y = (x − center_r)·scale_r + shift_r`` with ``r`` the
  region of each value, in ``x``'s dtype and memory format. Differentiable in ``x`` and the coefficients.

Every op has Triton kernels and is opaque to ``torch.compile`` (``register_fake``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from normlayers._autograd import differentiable_backward, recomputed_backward, wants_double_backward
from normlayers._dtensor import is_dtensor
from normlayers._dtypes import compute_dtype
from normlayers.reference import region_norm as _ref_region
from normlayers.reference import row_norms as _ref_row

__all__ = ["region_stats", "region_finalize", "region_normalize", "region_normalize_bwd", "region_moments",
           "region_affine", "region_norm", "learnable_region_norm_fwd", "learnable_region_norm_bwd",
           "learnable_region_norm"]


def _region_kernels():
    # Triton is imported lazily: the reference path and the package import must work without it.
    from normlayers.kernels import region_norm

    return region_norm


def _channel_kernels():
    from normlayers.kernels import channel_stats

    return channel_stats


def _per_region(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.new_empty((*x.shape[:2], 2), dtype=dtype)


@torch.library.custom_op("normlayers::region_moments", mutates_args=())
def region_moments(x: Tensor, hole: Tensor, center: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-(plane, region) ``(count, Σ(x − center), Σ(x − center)²)``, each ``(N, C, 2)``."""
    return _region_kernels().region_moments_fwd(x, hole, center)


@region_moments.register_fake
def _region_moments_fake(x, hole, center):
    stats = compute_dtype(x.dtype)
    return _per_region(x, stats), _per_region(x, stats), _per_region(x, stats)


@torch.library.custom_op("normlayers::region_moments_bwd", mutates_args=())
def region_moments_bwd(x: Tensor, hole: Tensor, center: Tensor, dfirst: Tensor,
                       dsecond: Tensor) -> tuple[Tensor, Tensor]:
    """``(dx, dcenter)`` of :func:`region_moments` from the gradients of ``first`` and ``second``."""
    return _region_kernels().region_moments_bwd(x, hole, center, dfirst, dsecond)


@region_moments_bwd.register_fake
def _region_moments_bwd_fake(x, hole, center, dfirst, dsecond):
    return torch.empty_like(x), center.new_empty(center.shape)


def _region_moments_setup_context(ctx, inputs, output):
    x, hole, center = inputs
    ctx.save_for_backward(x, hole, center)
    # An unused output's gradient stays None (the backward makes zeros like `center`): autograd would materialize it
    # as a plain tensor, which DTensor refuses beside the DTensor gradients of the other outputs.
    ctx.set_materialize_grads(False)


def _regions(x: Tensor, hole: Tensor) -> Tensor:
    """``(N, C, *spatial, 2)``: whether each value is in the hole (index 0) or the valid region (index 1)."""
    inside = hole.expand(x.shape) != 0
    return torch.stack([inside, ~inside], dim=-1)


def _spread_over_values(t: Tensor, x: Tensor) -> Tensor:
    """A ``(N, C, 2)`` per-(plane, region) tensor, shaped to broadcast against ``(N, C, *spatial, 2)``."""
    return t.reshape(*x.shape[:2], *([1] * (x.dim() - 2)), 2)


def _region_moments_formula(x: Tensor, hole: Tensor, center: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`region_moments` in torch ops (what double backward differentiates)."""
    regions = _regions(x, hole)
    d = torch.where(regions, x.to(center.dtype).unsqueeze(-1) - _spread_over_values(center, x), 0.0)
    spatial = tuple(range(2, x.dim()))
    return regions.sum(spatial).to(center.dtype), d.sum(spatial), d.square().sum(spatial)


def _region_affine_formula(x: Tensor, hole: Tensor, center: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """:func:`region_affine` in torch ops, in the compute dtype (what double backward differentiates)."""
    centred = x.to(scale.dtype).unsqueeze(-1) - _spread_over_values(center, x)
    y = centred * _spread_over_values(scale, x) + _spread_over_values(shift, x)
    return torch.where(_regions(x, hole), y, 0.0).sum(-1)


def _region_moments_backward(ctx, _dcount: Optional[Tensor], dfirst: Optional[Tensor], dsecond: Optional[Tensor]):
    x, hole, center = ctx.saved_tensors
    if dfirst is None and dsecond is None:
        return None, None, None
    if wants_double_backward():
        return differentiable_backward(_region_moments_formula, (x, hole, center), (None, dfirst, dsecond),
                                       ctx.needs_input_grad)
    zeros = center.new_zeros((*x.shape[:2], 2), dtype=compute_dtype(x.dtype))
    dx, dcenter = region_moments_bwd(x, hole, center, zeros if dfirst is None else dfirst,
                                     zeros if dsecond is None else dsecond)
    return dx, None, dcenter


region_moments.register_autograd(_region_moments_backward, setup_context=_region_moments_setup_context)


@torch.library.custom_op("normlayers::region_affine", mutates_args=())
def region_affine(x: Tensor, hole: Tensor, center: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = (x − center_r)·scale_r + shift_r`` with ``(N, C, 2)`` coefficients, ``r`` the region of each value,
    computed in fp32 (fp64 for fp64 ``x``)."""
    return _channel_kernels().plane_affine_fwd(x, center, scale, shift, hole_mask=hole)


@region_affine.register_fake
def _region_affine_fake(x, hole, center, scale, shift):
    return torch.empty_like(x)


@torch.library.custom_op("normlayers::region_affine_bwd", mutates_args=())
def region_affine_bwd(dy: Tensor, x: Tensor, hole: Tensor, center: Tensor,
                      scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dscale, dshift)``: ``dx = dy·scale_r``, and per plane and region ``Σ dy·(x − center_r)`` and ``Σ dy``;
    ``dx`` like ``x``, the others like ``scale``."""
    return _channel_kernels().plane_affine_bwd(dy, x, center, scale, hole_mask=hole)


@region_affine_bwd.register_fake
def _region_affine_bwd_fake(dy, x, hole, center, scale):
    return torch.empty_like(x), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _region_affine_setup_context(ctx, inputs, output):
    x, hole, center, scale, shift = inputs
    ctx.save_for_backward(x, hole, center, scale)
    ctx.center_dtype, ctx.shift_dtype = center.dtype, shift.dtype


def _region_affine_backward(ctx, dy):
    x, hole, center, scale = ctx.saved_tensors
    if wants_double_backward():
        # shift enters additively: a zero stand-in gives its gradient (shift itself is not saved).
        return differentiable_backward(_region_affine_formula, (x, hole, center, scale, torch.zeros_like(scale)),
                                       (dy,), ctx.needs_input_grad)
    dx, dscale, dshift = region_affine_bwd(dy, x, hole, center, scale)
    return dx, None, (-scale * dshift).to(ctx.center_dtype), dscale, dshift.to(ctx.shift_dtype)


region_affine.register_autograd(_region_affine_backward, setup_context=_region_affine_setup_context)


def _region_pair(hole: Optional[Tensor], valid: Optional[Tensor], center: Tensor) -> Optional[Tensor]:
    """The ``(C, 2)`` stack, in ``center``'s dtype, of a hole and a valid per-channel parameter (a missing one is 0);
    ``None`` if both are missing."""
    if hole is None and valid is None:
        return None
    zeros = center.new_zeros(center.shape[1])
    return torch.stack([(zeros if hole is None else hole.to(center.dtype)),
                (zeros if valid is None else valid.to(center.dtype))], dim=-1)


def _composed_region_norm(input: Tensor, hole: Tensor, foreground_gamma: Optional[Tensor],
                foreground_beta: Optional[Tensor], background_gamma: Optional[Tensor],
                background_beta: Optional[Tensor], *, eps: float, stats: str, eps_mode: str,
                affine: str, sync: Optional[_ref_region.MaskedMomentSync] = None) -> Tensor:
    """RN through the composable ops: two :func:`~normlayers.ops.region_norm.region_moments` passes (sums, then centred
    squares at the means), small ``(N, C, 2)`` torch ops for the statistics (pooled over the batch for
    ``stats="batch"``, then over the ranks by ``sync``), then one fused
    :func:`~normlayers.ops.region_norm.region_affine` pass. Autograd of the small ops links the backward kernels, so
    the gradient runs through the region statistics, as the reference's."""
    n, channels = input.shape[:2]
    opmath = compute_dtype(input.dtype)
    count, first, _ = region_moments(input, hole, input.new_zeros((n, channels, 2), dtype=opmath))
    values = math.prod(input.shape[2:])
    if stats == "batch":
        count, first, values = count.sum(0, keepdim=True), first.sum(0, keepdim=True), values * n
    safe_count = torch.where(count == 0, torch.ones_like(count), count)  # the official S[S==0] = 1 (rn.py)
    mean = first / safe_count
    _, _, second = region_moments(input, hole, mean.expand(n, channels, 2).contiguous())
    if stats == "batch":
        second = second.sum(0, keepdim=True)
    var = _ref_row.overflow_to_nan(second) / safe_count  # NaN, not a silent 0 output, where it overflowed
    if sync is not None:
        # This rank's (count, mean, M2) per (channel, region), combined with Chan's formula; the effective epsilon
        # takes the global counts and V = the global N·H·W (the two regions' counts together).
        mean, var, count = sync(mean, var, count)
        values = count.sum(-1, keepdim=True)
        safe_count = torch.where(count == 0, torch.ones_like(count), count)
    center = mean.expand(n, channels, 2).contiguous()
    region_eps = eps * values / safe_count if eps_mode == "official" else eps
    scale = torch.rsqrt(var + region_eps)
    gamma = _region_pair(foreground_gamma, background_gamma, center)
    if gamma is not None:
        scale = scale * (1 + gamma)
    betas = [beta.to(center.dtype) for beta in (foreground_beta, background_beta) if beta is not None]
    if not betas:
        shift = torch.zeros_like(center)
    elif affine == "official":
        # Both betas at every pixel (the official rn.py), summed from the parameters themselves: the sum over a
        # stacked pair would backward into stride-0 views of one gradient, which autograd stores as both .grad
        # tensors, so that a later backward accumulating into them (gradient accumulation) would add twice into one
        # buffer.
        total = betas[0] if len(betas) == 1 else betas[0] + betas[1]
        shift = torch.stack([total, total], dim=-1)
    else:
        shift = _region_pair(foreground_beta, background_beta, center)
    return region_affine(input, hole, center, scale.expand(n, channels, 2).contiguous(),
                             shift.expand(n, channels, 2).contiguous())


@torch.library.custom_op("normlayers::region_stats", mutates_args=())
def region_stats(x: Tensor, hole: Tensor, cap: float) -> Tensor:
    """Per plane and region ``[count, s, Σx·s, Σ(x·s − mean)²]``, ``(N, C, 2, 4)``."""
    return _region_kernels().region_stats(x, hole, cap)


@region_stats.register_fake
def _region_stats_fake(x, hole, cap):
    return x.new_empty((*x.shape[:2], 2, 4), dtype=compute_dtype(x.dtype))


@torch.library.custom_op("normlayers::region_finalize", mutates_args=())
def region_finalize(partials: Tensor, batch: bool, eps: float, official_eps: bool) -> Tensor:
    """``[count, s, mean_s, rstd]`` per statistic and region from :func:`region_stats`' partials."""
    return _region_kernels().region_finalize(partials, batch=batch, eps=eps, official_eps=official_eps)


@region_finalize.register_fake
def _region_finalize_fake(partials, batch, eps, official_eps):
    return partials.new_empty(partials.shape[1:] if batch else partials.shape)


@torch.library.custom_op("normlayers::region_normalize", mutates_args=())
def region_normalize(x: Tensor, hole: Tensor, stats: Tensor, foreground_gamma: Optional[Tensor],
                     foreground_beta: Optional[Tensor], background_gamma: Optional[Tensor],
                     background_beta: Optional[Tensor], batch: bool, official_affine: bool, finalize: bool = False,
                     eps: float = 0.0, official_eps: bool = False) -> Tensor:
    """``y = (x·s_r − mean_r)·rstd_r·(1 + γ_r) + shift_r``, ``r`` the region of each value (foreground = hole). With
    ``finalize``, ``stats`` are :func:`region_stats`' partials, finalized inside the pass with ``eps`` and
    ``official_eps`` as :func:`region_finalize` would (one launch fewer where no backward needs the statistics)."""
    return _region_kernels().region_normalize(
        x, hole, stats, (foreground_gamma, foreground_beta, background_gamma, background_beta), batch=batch,
        official_affine=official_affine, finalize=(eps, official_eps) if finalize else None)


@region_normalize.register_fake
def _region_normalize_fake(x, hole, stats, foreground_gamma, foreground_beta, background_gamma, background_beta,
                           batch, official_affine, finalize=False, eps=0.0, official_eps=False):
    return torch.empty_like(x)


@torch.library.custom_op("normlayers::region_normalize_bwd", mutates_args=())
def region_normalize_bwd(dy: Tensor, x: Tensor, hole: Tensor, stats: Tensor, foreground_gamma: Optional[Tensor],
                         foreground_beta: Optional[Tensor], background_gamma: Optional[Tensor],
                         background_beta: Optional[Tensor], batch: bool, official_affine: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dγ_hole, dβ_hole, dγ_valid, dβ_valid)`` of the layer (:func:`region_stats`, :func:`region_finalize` and
    :func:`region_normalize`) at fixed counts; a parameter's gradient has its shape and dtype, empty for a missing
    one."""
    parameters = (foreground_gamma, foreground_beta, background_gamma, background_beta)
    dx, *grads = _region_kernels().region_normalize_bwd(dy, x, hole, stats, parameters, batch=batch,
                                                        official_affine=official_affine)
    return (dx, *(stats.new_empty(0) if g is None else g for g in grads))


@region_normalize_bwd.register_fake
def _region_normalize_bwd_fake(dy, x, hole, stats, foreground_gamma, foreground_beta, background_gamma,
                               background_beta, batch, official_affine):
    return (torch.empty_like(x), *(stats.new_empty(0) if p is None else p.new_empty(p.shape)
                                   for p in (foreground_gamma, foreground_beta, background_gamma, background_beta)))


def statistics_scale_cap(input: Tensor, eps: float, batch: bool, official_eps: bool) -> float:
    """The largest statistics scale (a power of two) for this call: ``ε_r·s²`` stays ≤ 1 for every region's effective
    epsilon, at most ``ε·V`` with the official one (``V`` = the values per statistic)."""
    values = math.prod(input.shape[2:]) * (input.shape[0] if batch else 1)
    largest_eps = eps * max(values, 1) if official_eps else eps
    return 2.0 ** _ref_row.scale_exponent_cap(largest_eps, compute_dtype(input.dtype))


class _RegionNorm(torch.autograd.Function):
    """RN-B of ``input`` with gradients for ``input`` and the four parameters (None where a parameter is None):
    ``region_stats``, ``region_finalize``, ``region_normalize``; backward ``region_normalize_bwd``."""

    @staticmethod
    def forward(ctx, input: Tensor, foreground_gamma: Optional[Tensor], foreground_beta: Optional[Tensor],
                background_gamma: Optional[Tensor], background_beta: Optional[Tensor], hole: Tensor, eps: float,
                stats: str, eps_mode: str, affine: str) -> Tensor:
        batch, official_eps = stats == "batch", eps_mode == "official"
        partials = region_stats(input, hole, statistics_scale_cap(input, eps, batch, official_eps))
        statistics = region_finalize(partials, batch, eps, official_eps)
        parameters = (foreground_gamma, foreground_beta, background_gamma, background_beta)
        ctx.save_for_backward(input, hole, statistics, *parameters)
        ctx.options = (eps, stats, eps_mode, affine)
        return region_normalize(input, hole, statistics, *parameters, batch, affine == "official")

    @staticmethod
    def backward(ctx, dy: Tensor):
        input, hole, statistics, *parameters = ctx.saved_tensors
        eps, stats, eps_mode, affine = ctx.options
        if wants_double_backward():
            # The reference recomputes the same statistics (no running buffers), so its gradient is the layer's.
            def layer(x, *params):
                return _ref_region.region_norm(x, hole, *params, eps=eps, stats=stats, eps_mode=eps_mode,
                                               affine=affine)

            return recomputed_backward(ctx, layer, (input, *parameters), dy)
        dx, *grads = region_normalize_bwd(dy, input, hole, statistics, *parameters, stats == "batch",
                                          affine == "official")
        return (dx, *(g if p is not None else None for g, p in zip(grads, parameters))) + (None,) * 5


def kernel_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """The hole mask as the kernels read it: ``mask`` itself (detached; nonzero = hole) when it has ``x``'s spatial
    size, so that no conversion runs, else resized (:func:`normlayers.reference.region_norm.prepare_mask`)."""
    if tuple(mask.shape[2:]) == tuple(size):
        return mask.detach()
    return _ref_region.prepare_mask(mask, size)


def region_norm(input: Tensor, mask: Tensor, foreground_gamma: Optional[Tensor],
                foreground_beta: Optional[Tensor], background_gamma: Optional[Tensor],
                background_beta: Optional[Tensor], *, eps: float, stats: str, eps_mode: str,
                affine: str, sync: Optional[_ref_region.MaskedMomentSync] = None) -> Tensor:
    """RN through the Triton ops: fused (:class:`_RegionNorm`, three launches each way), or, with synced statistics
    or a DTensor input, the composition of ``region_moments``, ``(N, C, 2)`` torch ops and ``region_affine``."""
    hole = kernel_mask(mask, input.shape[2:])
    if sync is not None or is_dtensor(input):
        return _composed_region_norm(input, hole, foreground_gamma, foreground_beta, background_gamma,
                                     background_beta, eps=eps, stats=stats, eps_mode=eps_mode, affine=affine,
                                     sync=sync)
    parameters = (foreground_gamma, foreground_beta, background_gamma, background_beta)
    batch, official_eps = stats == "batch", eps_mode == "official"
    needs_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, *parameters))
    if not needs_backward and _region_kernels().finalizes_inline(input.shape[0], math.prod(input.shape[2:]), batch):
        partials = region_stats(input, hole, statistics_scale_cap(input, eps, batch, official_eps))
        return region_normalize(input, hole, partials, *parameters, batch, affine == "official", True, eps,
                                official_eps)
    return _RegionNorm.apply(input, foreground_gamma, foreground_beta, background_gamma, background_beta, hole, eps,
                             stats, eps_mode, affine)


def _learnable_kernels():
    from normlayers.kernels import region_learnable

    return region_learnable


@torch.library.custom_op("normlayers::learnable_region_norm_fwd", mutates_args=())
def learnable_region_norm_fwd(x: Tensor, conv1_weight: Tensor, gamma_weight: Tensor, gamma_bias: Optional[Tensor],
                              beta_weight: Tensor, beta_bias: Optional[Tensor], threshold: float, eps: float,
                              batch: bool, official_eps: bool, cap: float
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """RN-L in two launches: ``(y, pool, s, gain, stats)``; ``pool`` ``(N, 3, H, W)`` (the channel mean, maximum and
    how many channels reach it), ``s`` and ``gain = 1 + γ`` ``(N, 1, H, W)``, ``stats`` ``[count, s, mean_s, rstd]``
    per statistic and region (``(C, 2, 4)`` with ``batch``, else ``(N, C, 2, 4)``), all but ``y`` in fp32 (fp64 for
    fp64 ``x``)."""
    return _learnable_kernels().learnable_region_norm_fwd(
        x, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias, threshold=threshold, eps=eps,
        batch=batch, official_eps=official_eps, cap=cap)


@learnable_region_norm_fwd.register_fake
def _learnable_region_norm_fwd_fake(x, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias, threshold,
                                    eps, batch, official_eps, cap):
    n, c, height, width = x.shape
    opmath = compute_dtype(x.dtype)
    s = x.new_empty((n, 1, height, width), dtype=opmath)
    return (torch.empty_like(x), x.new_empty((n, 3, height, width), dtype=opmath), s, torch.empty_like(s),
            x.new_empty((c, 2, 4) if batch else (n, c, 2, 4), dtype=opmath))


@torch.library.custom_op("normlayers::learnable_region_norm_bwd", mutates_args=())
def learnable_region_norm_bwd(dy: Tensor, x: Tensor, conv1_weight: Tensor, gamma_weight: Tensor,
                              gamma_bias: Optional[Tensor], beta_weight: Tensor, beta_bias: Optional[Tensor],
                              pool: Tensor, s: Tensor, gain: Tensor, stats: Tensor, threshold: float, batch: bool
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dconv1_weight, dgamma_weight, dgamma_bias, dbeta_weight, dbeta_bias)`` of
    :func:`learnable_region_norm_fwd` in four launches, each like its input (empty for a missing bias)."""
    grads = _learnable_kernels().learnable_region_norm_bwd(
        dy, x, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias, pool, s, gain, stats,
        threshold=threshold, batch=batch)
    return tuple(stats.new_empty(0) if g is None else g for g in grads)


@learnable_region_norm_bwd.register_fake
def _learnable_region_norm_bwd_fake(dy, x, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias, pool, s,
                                    gain, stats, threshold, batch):
    return (torch.empty_like(x), *(stats.new_empty(0) if t is None else t.new_empty(t.shape)
                                   for t in (conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias)))


class _LearnableRegionNorm(torch.autograd.Function):
    """RN-L with gradients for ``input`` and the five conv parameters (None where a bias is None):
    ``learnable_region_norm_fwd``; backward ``learnable_region_norm_bwd``."""

    @staticmethod
    def forward(ctx, input: Tensor, conv1_weight: Tensor, gamma_weight: Tensor, gamma_bias: Optional[Tensor],
                beta_weight: Tensor, beta_bias: Optional[Tensor], threshold: float, eps: float, stats: str,
                eps_mode: str) -> Tensor:
        batch, official_eps = stats == "batch", eps_mode == "official"
        y, pool, s, gain, statistics = learnable_region_norm_fwd(
            input, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias, threshold, eps, batch,
            official_eps, statistics_scale_cap(input, eps, batch, official_eps))
        ctx.save_for_backward(input, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias, pool, s, gain,
                              statistics)
        ctx.options = (threshold, eps, stats, eps_mode)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        input, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias, pool, s, gain, statistics = (
            ctx.saved_tensors)
        threshold, eps, stats, eps_mode = ctx.options
        weights = (conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias)
        if wants_double_backward():
            # The reference recomputes the same map, regions and statistics (no running buffers).
            def layer(x, *params):
                return _ref_region.learnable_region_norm(x, *params, threshold=threshold, eps=eps, stats=stats,
                                                         eps_mode=eps_mode)

            return recomputed_backward(ctx, layer, (input, *weights), dy)
        dx, *grads = learnable_region_norm_bwd(dy, input, *weights, pool, s, gain, statistics, threshold,
                                               stats == "batch")
        return (dx, *(g if w is not None else None for g, w in zip(grads, weights))) + (None,) * 4


def learnable_region_norm(input: Tensor, conv1_weight: Tensor, gamma_weight: Tensor, gamma_bias: Optional[Tensor],
                          beta_weight: Tensor, beta_bias: Optional[Tensor], *, threshold: float, eps: float,
                          stats: str, eps_mode: str, sync: Optional[_ref_region.MaskedMomentSync] = None) -> Tensor:
    """RN-L through the Triton ops: fused (:class:`_LearnableRegionNorm`, two launches forward, four backward), or,
    with synced statistics, a DTensor input or no value, the self-aware affine's convs as the reference's torch ops,
    :func:`region_norm` on the thresholded map (no gradient through the threshold) and the spatial affine."""
    if sync is None and not is_dtensor(input) and input.numel() > 0:
        return _LearnableRegionNorm.apply(input, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias,
                                          threshold, eps, stats, eps_mode)
    s, gamma, beta = _ref_region.self_aware_affine(input, conv1_weight, gamma_weight, gamma_bias, beta_weight,
                                                   beta_bias)
    r = region_norm(input, s.detach() >= threshold, None, None, None, None, eps=eps, stats=stats, eps_mode=eps_mode,
                    affine="masked", sync=sync)
    return (r * (1 + gamma) + beta).to(input.dtype)
