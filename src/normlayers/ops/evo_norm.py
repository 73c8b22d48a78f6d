"""``torch.library`` custom ops for EvoNorm's fused elementwise pass (``kernels/evo_norm.py``).

Both take ``x`` of shape ``(N, C, *spatial)`` in any memory format and ``(N, C)`` per-plane coefficients:

* ``plane_swish_affine(x, slope, scale, shift) -> y = x·sigmoid(slope·x)·scale + shift`` (EvoNorm S0; S1/S2 with
  SiLU, ``slope = 1``);
* ``plane_max_div_affine(x, left, slope, offset, scale, shift) -> y = x / max(left, slope·x + offset)·scale + shift``
  (EvoNorm B0/B1/B2), whose gradient splits half/half at ties as :func:`torch.maximum`'s.

Arithmetic in fp32 (fp64 for fp64 ``x``); ``y`` in ``x``'s dtype and memory format. Each is differentiable
(``register_autograd``) through its backward op, which returns ``dx`` and every coefficient's gradient (``(N, C)``,
in the coefficient's dtype), and opaque to ``torch.compile`` (``register_fake``). The statistics feeding the
coefficients come from ``normlayers::plane_moments`` and small torch ops (see ``normlayers.functional``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["plane_swish_affine", "plane_max_div_affine"]


def _kernels():
    # Triton is imported lazily: the reference path and the package import must work without it.
    from normlayers.kernels import evo_norm

    return evo_norm


def _fake_grads(x: Tensor, like: Tensor, count: int) -> tuple[Tensor, ...]:
    return (torch.empty_like(x), *(like.new_empty(x.shape[:2]) for _ in range(count)))


def _cast_grads(grads: tuple[Tensor, ...], dtypes: tuple[torch.dtype, ...]) -> tuple[Tensor, ...]:
    return tuple(g.to(dtype) for g, dtype in zip(grads, dtypes))


@torch.library.custom_op("normlayers::plane_swish_affine", mutates_args=())
def plane_swish_affine(x: Tensor, slope: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = x·sigmoid(slope[n, c]·x)·scale[n, c] + shift[n, c]``."""
    kernels = _kernels()
    return kernels.evo_plane_fwd(x, kernels.MODE_SWISH, slope=slope, scale=scale, shift=shift)


@plane_swish_affine.register_fake
def _plane_swish_affine_fake(x, slope, scale, shift):
    return torch.empty_like(x)


@torch.library.custom_op("normlayers::plane_swish_affine_bwd", mutates_args=())
def plane_swish_affine_bwd(dy: Tensor, x: Tensor, slope: Tensor, scale: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dslope, dscale, dshift)`` of :func:`plane_swish_affine`."""
    kernels = _kernels()
    return kernels.evo_plane_bwd(dy, x, kernels.MODE_SWISH, slope=slope, scale=scale)


@plane_swish_affine_bwd.register_fake
def _plane_swish_affine_bwd_fake(dy, x, slope, scale):
    return _fake_grads(x, scale, 3)


def _save_inputs_setup_context(ctx, inputs, output):
    # Both ops: every input but shift saved (the backward does not read it; its gradient is Σ dy), and the
    # coefficients' dtypes kept for their gradients.
    ctx.save_for_backward(*inputs[:-1])
    ctx.coefficient_dtypes = tuple(t.dtype for t in inputs[1:])


def _plane_swish_affine_backward(ctx, dy):
    dx, *grads = plane_swish_affine_bwd(dy, *ctx.saved_tensors)
    return dx, *_cast_grads(grads, ctx.coefficient_dtypes)


plane_swish_affine.register_autograd(_plane_swish_affine_backward, setup_context=_save_inputs_setup_context)


@torch.library.custom_op("normlayers::plane_max_div_affine", mutates_args=())
def plane_max_div_affine(x: Tensor, left: Tensor, slope: Tensor, offset: Tensor, scale: Tensor, shift: Tensor
                         ) -> Tensor:
    """``y = x / max(left[n, c], slope[n, c]·x + offset[n, c])·scale[n, c] + shift[n, c]``."""
    kernels = _kernels()
    return kernels.evo_plane_fwd(x, kernels.MODE_MAX_DIV, left=left, slope=slope, offset=offset, scale=scale,
                                 shift=shift)


@plane_max_div_affine.register_fake
def _plane_max_div_affine_fake(x, left, slope, offset, scale, shift):
    return torch.empty_like(x)


@torch.library.custom_op("normlayers::plane_max_div_affine_bwd", mutates_args=())
def plane_max_div_affine_bwd(dy: Tensor, x: Tensor, left: Tensor, slope: Tensor, offset: Tensor, scale: Tensor
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dleft, dslope, doffset, dscale, dshift)`` of :func:`plane_max_div_affine` (ties split half/half)."""
    kernels = _kernels()
    return kernels.evo_plane_bwd(dy, x, kernels.MODE_MAX_DIV, left=left, slope=slope, offset=offset, scale=scale)


@plane_max_div_affine_bwd.register_fake
def _plane_max_div_affine_bwd_fake(dy, x, left, slope, offset, scale):
    return _fake_grads(x, scale, 5)


def _plane_max_div_affine_backward(ctx, dy):
    dx, *grads = plane_max_div_affine_bwd(dy, *ctx.saved_tensors)
    return dx, *_cast_grads(grads, ctx.coefficient_dtypes)


# Same context as the swish op: every input saved, the coefficients' dtypes kept for their gradients.
plane_max_div_affine.register_autograd(_plane_max_div_affine_backward, setup_context=_save_inputs_setup_context)
