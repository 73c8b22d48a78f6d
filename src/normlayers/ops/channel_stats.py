"""``torch.library`` custom ops for the per-plane kernels: ``normlayers::plane_moments`` and ``plane_affine``.

Both take ``x`` of shape ``(N, C, *spatial)`` in any memory format; a plane is one ``(n, c)`` slice of ``HW`` values.

* ``plane_moments(x) -> (mean, var)``: per-plane mean and biased variance, ``(N, C)``, fp32 (fp64 for fp64 ``x``).
* ``plane_affine(x, center, scale, shift) -> y``: ``y = (x − center[n, c])·scale[n, c] + shift[n, c]``, in ``x``'s
  dtype and memory format. Centring inside the kernel (``center`` is typically the plane mean) keeps ``y`` accurate
  where the uncentred ``x·A + B`` would cancel.

Each is differentiable (``register_autograd``) through its own backward op (``plane_moments_bwd``,
``plane_affine_bwd``), with Triton kernels in both directions, and opaque to ``torch.compile`` (``register_fake``).
Norms whose output is a per-plane affine map of the input, with coefficients computed from per-plane moments by small
``(N, C)`` torch ops, are built from these two ops; autograd of the small ops links the two backward kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from normlayers._autograd import differentiable_backward, wants_double_backward
from normlayers._dtypes import compute_dtype

__all__ = ["plane_moments", "plane_affine", "batch_moments_from_planes"]


def _kernels():
    # Triton is imported lazily: the reference path and the package import must work without it.
    from normlayers.kernels import channel_stats

    return channel_stats


@torch.library.custom_op("normlayers::plane_moments", mutates_args=())
def plane_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-plane ``(mean, var)`` (biased variance) of ``x`` ``(N, C, *spatial)``."""
    return _kernels().plane_moments_fwd(x)


@plane_moments.register_fake
def _plane_moments_fake(x):
    stats = compute_dtype(x.dtype)
    return x.new_empty(x.shape[:2], dtype=stats), x.new_empty(x.shape[:2], dtype=stats)


@torch.library.custom_op("normlayers::plane_moments_bwd", mutates_args=())
def plane_moments_bwd(x: Tensor, mean: Tensor, dmean: Optional[Tensor], dvar: Optional[Tensor],
                      dx_partial: Optional[Tensor] = None) -> Tensor:
    """``dx = dx_partial + dmean/HW + dvar·2(x − mean)/HW`` (a missing term counts as zero), like ``x``. Composites
    pass the gradient their elementwise pass sends to ``x`` as ``dx_partial``, which saves a launch for the sum."""
    return _kernels().plane_moments_bwd(x, mean, dmean, dvar, dx_partial)


@plane_moments_bwd.register_fake
def _plane_moments_bwd_fake(x, mean, dmean, dvar, dx_partial=None):
    return torch.empty_like(x)


def _plane_moments_setup_context(ctx, inputs, output):
    (x,) = inputs
    mean, _var = output
    ctx.save_for_backward(x, mean)


def plane_moments_formula(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`plane_moments` in torch ops (what double backward differentiates)."""
    var, mean = torch.var_mean(x.to(compute_dtype(x.dtype)).flatten(2), dim=-1, correction=0)
    return mean, var


def _plane_moments_backward(ctx, dmean, dvar):
    x, mean = ctx.saved_tensors
    if dmean is None and dvar is None:
        return None
    if wants_double_backward():
        return differentiable_backward(plane_moments_formula, (x,), (dmean, dvar), ctx.needs_input_grad)[0]
    return plane_moments_bwd(x, mean, dmean, dvar)


plane_moments.register_autograd(_plane_moments_backward, setup_context=_plane_moments_setup_context)


@torch.library.custom_op("normlayers::plane_affine", mutates_args=())
def plane_affine(x: Tensor, center: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = (x − center[n, c])·scale[n, c] + shift[n, c]`` with ``(N, C)`` coefficients, computed in fp32 (fp64 for
    fp64 ``x``)."""
    return _kernels().plane_affine_fwd(x, center, scale, shift)


@plane_affine.register_fake
def _plane_affine_fake(x, center, scale, shift):
    return torch.empty_like(x)


@torch.library.custom_op("normlayers::plane_affine_bwd", mutates_args=())
def plane_affine_bwd(dy: Tensor, x: Tensor, center: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dscale, dshift) = (dy·scale, Σ_hw dy·(x − center), Σ_hw dy)``; ``dx`` like ``x``, the others like
    ``scale``."""
    return _kernels().plane_affine_bwd(dy, x, center, scale)


@plane_affine_bwd.register_fake
def _plane_affine_bwd_fake(dy, x, center, scale):
    return torch.empty_like(x), scale.new_empty(x.shape[:2]), scale.new_empty(x.shape[:2])


def _plane_affine_setup_context(ctx, inputs, output):
    x, center, scale, shift = inputs
    ctx.save_for_backward(x, center, scale)
    ctx.center_dtype, ctx.shift_dtype = center.dtype, shift.dtype


def _per_plane(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(*t.shape, *([1] * (x.dim() - 2)))


def plane_affine_formula(x: Tensor, center: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """:func:`plane_affine` in torch ops, in the compute dtype (what double backward differentiates)."""
    xf = x.to(compute_dtype(x.dtype))
    return (xf - _per_plane(center, x)) * _per_plane(scale, x) + _per_plane(shift, x)


def _plane_affine_backward(ctx, dy):
    x, center, scale = ctx.saved_tensors
    if wants_double_backward():
        # shift enters additively: a zero stand-in gives its gradient (shift itself is not saved).
        return differentiable_backward(plane_affine_formula, (x, center, scale, torch.zeros_like(scale)), (dy,),
                                       ctx.needs_input_grad)
    dx, dscale, dshift = plane_affine_bwd(dy, x, center, scale)
    return dx, (-scale * dshift).to(ctx.center_dtype), dscale, dshift.to(ctx.shift_dtype)


plane_affine.register_autograd(_plane_affine_backward, setup_context=_plane_affine_setup_context)


def batch_moments_from_planes(plane_mean: Tensor, plane_var: Tensor) -> tuple[Tensor, Tensor]:
    """Each channel's batch ``(mean, biased var)`` from its ``N`` planes' moments (equal counts): the mean of the
    means, and the mean of the variances plus the variance of the means."""
    mean = plane_mean.mean(0)
    return mean, plane_var.mean(0) + (plane_mean - mean).square().mean(0)
