"""``torch.library`` custom ops for EvoNorm's fused elementwise pass (``kernels/evo_norm.py``).

Both take ``x`` of shape ``(N, C, *spatial)`` in any memory format and ``(N, C)`` per-plane coefficients:

* ``plane_swish_affine(x, slope, scale, shift) -> y = x·sigmoid(slope·x)·scale + shift`` (EvoNorm S0; S1/S2 with
  SiLU, ``slope = 1``);
* ``plane_max_div_affine(x, left, slope, offset, scale, shift) -> y = x / max(left, slope·x + offset)·scale + shift``
  (EvoNorm B0/B1/B2), whose gradient splits half/half at ties as :func:`torch.maximum`'s.

Arithmetic in fp32 (fp64 for fp64 ``x``); ``y`` in ``x``'s dtype and memory format. Each is differentiable
(``register_autograd``) through its backward op, which returns ``dx`` and every coefficient's gradient (``(N, C)``,
in the coefficient's dtype), and opaque to ``torch.compile`` (``register_fake``). The coefficients come from
``normlayers::plane_moments`` and the sub-family's finalize math: for the B family in training a finalize op
(``evo_norm_b_finalize``, which reduces over the batch and updates the running variance); where nothing reduces over
the batch (the S family, the B family in eval) the fused pass computes each plane's coefficients itself
(``evo_norm_s_pass``, ``evo_norm_b_eval``). :func:`evo_norm_b` and :func:`evo_norm_s` below compose them into the
layers: three launches forward in B training, two otherwise; three backward.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from normlayers._autograd import differentiable_backward, recomputed_backward, wants_double_backward
from normlayers._dtensor import is_dtensor
from normlayers.distributed import MomentSync
from normlayers.ops.channel_stats import (
    _per_plane,
    batch_moments_from_planes,
    plane_affine,
    plane_affine_bwd,
    plane_moments,
    plane_moments_bwd,
)
from normlayers.reference import evo_norm as _ref_evo

__all__ = ["plane_swish_affine", "plane_max_div_affine", "evo_norm_b", "evo_norm_s", "evo_norm_s_pass",
           "evo_norm_b_eval"]


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


def _plane_swish_affine_formula(x: Tensor, slope: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    xf = x.to(scale.dtype if scale.dtype == torch.float64 else torch.float32)
    return xf * torch.sigmoid(_per_plane(slope, x) * xf) * _per_plane(scale, x) + _per_plane(shift, x)


def _plane_max_div_affine_formula(x: Tensor, left: Tensor, slope: Tensor, offset: Tensor, scale: Tensor,
                                  shift: Tensor) -> Tensor:
    xf = x.to(scale.dtype if scale.dtype == torch.float64 else torch.float32)
    denominator = torch.maximum(_per_plane(left, x), _per_plane(slope, x) * xf + _per_plane(offset, x))
    return xf / denominator * _per_plane(scale, x) + _per_plane(shift, x)


def _double_backward(formula, ctx, dy):
    """create_graph=True: autograd of the op's formula (the backward op has no derivative); shift, unsaved, enters
    additively, so a zero stand-in gives its gradient."""
    inputs = (*ctx.saved_tensors, torch.zeros_like(ctx.saved_tensors[-1]))
    return differentiable_backward(formula, inputs, (dy,), ctx.needs_input_grad)


def _plane_swish_affine_backward(ctx, dy):
    if wants_double_backward():
        return _double_backward(_plane_swish_affine_formula, ctx, dy)
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
    if wants_double_backward():
        return _double_backward(_plane_max_div_affine_formula, ctx, dy)
    dx, *grads = plane_max_div_affine_bwd(dy, *ctx.saved_tensors)
    return dx, *_cast_grads(grads, ctx.coefficient_dtypes)


# Same context as the swish op: every input saved, the coefficients' dtypes kept for their gradients.
plane_max_div_affine.register_autograd(_plane_max_div_affine_backward, setup_context=_save_inputs_setup_context)


def _affine_coefficients(weight: Optional[Tensor], bias: Optional[Tensor], scale: Tensor) -> tuple[Tensor, Tensor]:
    """``(scale·γ, β)`` as ``(N, C)`` coefficients of the plane ops, from a per-plane ``scale`` (``(N, C)``)."""
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = bias.to(scale.dtype).expand(scale.shape) if bias is not None else scale.new_zeros(scale.shape)
    return scale, shift


@torch.library.custom_op("normlayers::evo_norm_s_pass", mutates_args=())
def evo_norm_s_pass(input: Tensor, plane_mean: Tensor, plane_var: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], v: Optional[Tensor], groups: int, eps: float, statistic: int,
                    numerator: int, store_coefficients: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The S family's output from the planes' ``(N, C)`` moments, each plane's finalize math (``scale =
    weight·rsqrt(group statistic + eps)``, ``shift = bias``, the numerator's slope; ``kernels.evo_norm``'s
    ``GROUP_*`` statistics and ``NUMERATOR_*`` constants) done inside the elementwise pass: ``(y, slope, scale)``,
    ``slope``/``scale`` the ``(N, C)`` coefficients when ``store_coefficients`` (``slope`` empty for the identity
    numerator), else empty."""
    return _kernels().evo_norm_s_fwd(input, plane_mean, plane_var, weight, bias, v, groups=groups, eps=eps,
                                     statistic=statistic, numerator=numerator, store_coefficients=store_coefficients)


@evo_norm_s_pass.register_fake
def _evo_norm_s_pass_fake(input, plane_mean, plane_var, weight, bias, v, groups, eps, statistic, numerator,
                          store_coefficients):
    def stored(written: bool) -> Tensor:
        return torch.empty_like(plane_mean) if written else plane_mean.new_empty(0)

    has_slope = store_coefficients and numerator != _kernels().NUMERATOR_IDENTITY
    return torch.empty_like(input), stored(has_slope), stored(store_coefficients)


@torch.library.custom_op("normlayers::evo_norm_s_finalize_bwd", mutates_args=())
def evo_norm_s_finalize_bwd(dslope: Optional[Tensor], dscale: Tensor, dshift: Tensor, plane_mean: Tensor,
                            plane_var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor],
                            groups: int, eps: float, statistic: int, numerator: int
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dplane_mean, dplane_var, dweight, dbias, dv)`` of :func:`evo_norm_s_pass`'s coefficients followed by its
    elementwise pass (the identity numerator's as ``plane_affine`` centred at the plane mean), from that pass's
    per-plane coefficient gradients; a parameter's gradient has its shape and dtype (empty for
    a missing parameter, and for ``v`` unless the numerator reads it)."""
    return _kernels().evo_norm_s_finalize_bwd(dslope, dscale, dshift, plane_mean, plane_var, weight, bias, v,
                                              groups=groups, eps=eps, statistic=statistic, numerator=numerator)


@evo_norm_s_finalize_bwd.register_fake
def _evo_norm_s_finalize_bwd_fake(dslope, dscale, dshift, plane_mean, plane_var, weight, bias, v, groups, eps,
                                  statistic, numerator):
    reads_v = numerator == _kernels().NUMERATOR_SWISH
    grads = [p.new_empty(p.shape) if p is not None else plane_mean.new_empty(0)
             for p in (weight, bias, v if reads_v else None)]
    return (torch.empty_like(plane_mean), torch.empty_like(plane_mean), *grads)


class _EvoNormS(torch.autograd.Function):
    """An S-family layer whose numerator is the identity or ``x·sigmoid(slope·x)``: ``plane_moments`` then
    ``evo_norm_s_pass`` (the finalize math inside the elementwise pass: two launches); backward ``plane_affine_bwd``
    (centred at the plane mean) or ``plane_swish_affine_bwd``, ``evo_norm_s_finalize_bwd``, and ``plane_moments_bwd``
    adding the statistic's share of ``dx``.
    Gradients for ``input``, ``weight``, ``bias`` and ``v`` (None where one is None or unread)."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor],
                groups: int, eps: float, statistic: int, numerator: int) -> Tensor:
        plane_mean, plane_var = plane_moments(input)
        output, slope, scale = evo_norm_s_pass(input, plane_mean, plane_var, weight, bias, v, groups, eps, statistic,
                                               numerator, any(ctx.needs_input_grad[:4]))
        ctx.save_for_backward(input, plane_mean, plane_var, slope, scale, weight, bias, v)
        ctx.options = (groups, eps, statistic, numerator)
        return output

    @staticmethod
    def backward(ctx, dy: Tensor):
        input, plane_mean, plane_var, slope, scale, weight, bias, v = ctx.saved_tensors
        groups, eps, statistic, numerator = ctx.options
        if wants_double_backward():
            kernels = _kernels()
            variant = ("s2" if statistic == kernels.GROUP_MEAN_SQUARE else
                       "s0" if numerator == kernels.NUMERATOR_SWISH else "s1")
            normalize_only = numerator == kernels.NUMERATOR_IDENTITY

            def layer(x, weight, bias, v):
                return _ref_evo.evo_norm_s(x, groups, weight, bias, v, variant=variant,
                                           activation=torch.nn.functional.silu, eps=eps, apply_act=not normalize_only,
                                           always_normalize=True)

            return recomputed_backward(ctx, layer, (input, weight, bias, v), dy)
        if numerator == _kernels().NUMERATOR_IDENTITY:
            dslope = None
            dx_pass, dscale, dshift = plane_affine_bwd(dy, input, plane_mean, scale)
        else:
            dx_pass, dslope, dscale, dshift = plane_swish_affine_bwd(dy, input, slope, scale)
        dplane_mean, dplane_var, *parameter_grads = evo_norm_s_finalize_bwd(
            dslope, dscale, dshift, plane_mean, plane_var, weight, bias, v, *ctx.options)
        dx = plane_moments_bwd(input, plane_mean, dplane_mean, dplane_var, dx_pass)
        reads_v = numerator == _kernels().NUMERATOR_SWISH
        parameter_grads = [g if p is not None else None
                           for g, p in zip(parameter_grads, (weight, bias, v if reads_v else None))]
        return (dx, *parameter_grads) + (None,) * 4


@torch.library.custom_op("normlayers::evo_norm_b_finalize", mutates_args=("running_var",))
def evo_norm_b_finalize(plane_mean: Tensor, plane_var: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor],
                        bias: Optional[Tensor], v: Optional[Tensor], training: bool, variant: int, momentum: float,
                        count: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(left, slope, offset, scale, shift, var)``: the ``(N, C)`` coefficients of :func:`plane_max_div_affine` for
    B variant ``variant`` (``kernels.evo_norm``'s ``VARIANT_B*``) from the planes' moments, and the ``(C,)`` variance
    the left side used; in training ``running_var`` (if given) moves towards the batch's (``count`` = ``N·H·W``)."""
    return _kernels().evo_norm_b_finalize_fwd(plane_mean, plane_var, running_var, weight, bias, v, training=training,
                                              variant=variant, momentum=momentum, count=count, eps=eps)


@evo_norm_b_finalize.register_fake
def _evo_norm_b_finalize_fake(plane_mean, plane_var, running_var, weight, bias, v, training, variant, momentum, count,
                              eps):
    return (*(torch.empty_like(plane_mean) for _ in range(5)), plane_mean.new_empty(plane_mean.shape[1]))


@torch.library.custom_op("normlayers::evo_norm_b_finalize_bwd", mutates_args=())
def evo_norm_b_finalize_bwd(dleft: Tensor, dslope: Tensor, doffset: Tensor, dscale: Tensor, dshift: Tensor,
                            plane_mean: Tensor, plane_var: Tensor, var: Tensor, weight: Optional[Tensor],
                            bias: Optional[Tensor], v: Optional[Tensor], training: bool, variant: int, eps: float
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dplane_mean, dplane_var, dweight, dbias, dv)`` of :func:`evo_norm_b_finalize` from the coefficients'
    gradients; a parameter's gradient has its shape and dtype (empty for a missing parameter, and for ``v`` except in
    B0)."""
    return _kernels().evo_norm_b_finalize_bwd(dleft, dslope, doffset, dscale, dshift, plane_mean, plane_var, var,
                                              weight, bias, v, training=training, variant=variant, eps=eps)


@evo_norm_b_finalize_bwd.register_fake
def _evo_norm_b_finalize_bwd_fake(dleft, dslope, doffset, dscale, dshift, plane_mean, plane_var, var, weight, bias, v,
                                  training, variant, eps):
    reads_v = variant == _kernels().VARIANT_B0
    grads = [p.new_empty(p.shape) if p is not None else plane_mean.new_empty(0)
             for p in (weight, bias, v if reads_v else None)]
    return (torch.empty_like(plane_mean), torch.empty_like(plane_mean), *grads)


@torch.library.custom_op("normlayers::evo_norm_b_eval", mutates_args=())
def evo_norm_b_eval(input: Tensor, plane_mean: Tensor, plane_var: Tensor, running_var: Tensor,
                    weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor], variant: int, eps: float,
                    store_coefficients: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The B family in eval from the planes' ``(N, C)`` moments, each plane's coefficients (those of
    :func:`evo_norm_b_finalize` on ``running_var``) computed inside the elementwise pass: ``(y, left, slope, offset,
    scale)``, the coefficients ``(N, C)`` when ``store_coefficients``, else empty."""
    return _kernels().evo_norm_b_eval_fwd(input, plane_mean, plane_var, running_var, weight, bias, v, variant=variant,
                                          eps=eps, store_coefficients=store_coefficients)


@evo_norm_b_eval.register_fake
def _evo_norm_b_eval_fake(input, plane_mean, plane_var, running_var, weight, bias, v, variant, eps,
                          store_coefficients):
    shape = plane_mean.shape if store_coefficients else (0,)
    return (torch.empty_like(input), *(plane_mean.new_empty(shape) for _ in range(4)))


class _EvoNormB(torch.autograd.Function):
    """A B-family layer: ``plane_moments``, ``evo_norm_b_finalize`` (which updates ``running_var`` in place, so it
    cannot carry ``register_autograd``), ``plane_max_div_affine``; backward that pass's backward,
    ``evo_norm_b_finalize_bwd``, and ``plane_moments_bwd`` adding the statistics' share of ``dx``. Gradients for
    ``input``, ``weight``, ``bias`` and ``v`` (None where one is None or unread)."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor],
                running_var: Optional[Tensor], training: bool, variant: int, momentum: float, eps: float) -> Tensor:
        plane_mean, plane_var = plane_moments(input)
        ctx.options = (training, variant, eps)
        if not training:
            # Eval: the running variance needs no reduction over the batch, so each plane's coefficients are
            # computed inside the elementwise pass (two launches), and written only when a backward can follow.
            output, *coefficients = evo_norm_b_eval(input, plane_mean, plane_var, running_var, weight, bias, v,
                                                    variant, eps, any(ctx.needs_input_grad[:4]))
            ctx.save_for_backward(input, plane_mean, plane_var, running_var, *coefficients, weight, bias, v)
            return output
        count = input.shape[0] * math.prod(input.shape[2:])
        *coefficients, var = evo_norm_b_finalize(plane_mean, plane_var, running_var, weight, bias, v, training,
                                                 variant, momentum, count, eps)
        ctx.save_for_backward(input, plane_mean, plane_var, var, *coefficients[:-1], weight, bias, v)
        return plane_max_div_affine(input, *coefficients)

    @staticmethod
    def backward(ctx, dy: Tensor):
        input, plane_mean, plane_var, var, left, slope, offset, scale, weight, bias, v = ctx.saved_tensors
        training, variant, eps = ctx.options
        if wants_double_backward():
            # The reference on the variance the forward used: the batch's (recomputed; no running buffer, so no
            # update) or the running one as it was then (finalize's var, a constant as in the forward).
            kernels = _kernels()
            variant_name = {kernels.VARIANT_B0: "b0", kernels.VARIANT_B1: "b1", kernels.VARIANT_B2: "b2"}[variant]

            def layer(x, weight, bias, v):
                return _ref_evo.evo_norm_b(x, None if training else var, weight, bias, v, variant=variant_name,
                                           training=training, momentum=0.0, eps=eps, apply_act=True)

            return recomputed_backward(ctx, layer, (input, weight, bias, v), dy)
        dx_pass, *coefficient_grads = plane_max_div_affine_bwd(dy, input, left, slope, offset, scale)
        dplane_mean, dplane_var, *parameter_grads = evo_norm_b_finalize_bwd(
            *coefficient_grads, plane_mean, plane_var, var, weight, bias, v, *ctx.options)
        dx = plane_moments_bwd(input, plane_mean, dplane_mean, dplane_var, dx_pass)
        reads_v = variant == _kernels().VARIANT_B0
        parameter_grads = [g if p is not None else None
                           for g, p in zip(parameter_grads, (weight, bias, v if reads_v else None))]
        return (dx, *parameter_grads) + (None,) * 5


def evo_norm_b(variant: str, input: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor],
               bias: Optional[Tensor], v: Optional[Tensor], training: bool, momentum: float,
               eps: float, sync: Optional[MomentSync]) -> Tensor:
    """The B family through the Triton ops: ``plane_moments``, the statistics, then one fused pass.

    Without synced statistics the statistics are one kernel and the layer three launches each way
    (:class:`_EvoNormB`). With them the batch variance must be synced before it is used, so it comes from ``(N, C)``
    torch ops that autograd differentiates. Every statistic follows exactly from the planes' ``(mean, var)``: the
    batch variance of a channel is the mean of its planes' variances plus the variance of their means (equal counts);
    a plane's ``mean(x²)`` is ``var + mean²``.
    Each variant's right-hand side is affine in ``x`` within a plane — B0 ``v·x + std``, B1 ``rms·x + rms``,
    B2 ``−x + rms`` — which is what :func:`~normlayers.ops.evo_norm.plane_max_div_affine` takes. On the synced path
    autograd of the small ops links the fused pass's backward to ``plane_moments``'s. Same semantics as the reference,
    buffer included. A DTensor input takes that composition too (DTensor reduces its per-plane statistics over the
    whole batch).
    """
    if sync is None and not is_dtensor(input):
        kernel_variant = {"b0": _kernels().VARIANT_B0, "b1": _kernels().VARIANT_B1, "b2": _kernels().VARIANT_B2}
        return _EvoNormB.apply(input, weight, bias, v if variant == "b0" else None, running_var, training,
                               kernel_variant[variant], momentum, eps)
    n, channels, height, width = input.shape
    plane_mean, plane_var = plane_moments(input)
    opmath = plane_mean.dtype
    if training:
        batch_mean, var = batch_moments_from_planes(plane_mean, plane_var)
        count: Union[int, Tensor] = n * height * width
        if sync is not None:
            _, var, count = sync(batch_mean, var, count)
        if running_var is not None:
            _ref_evo.update_running_var_(running_var, var, count, momentum)
    else:
        var = running_var.to(opmath)
    left = torch.sqrt(var + eps).expand(n, channels)
    if variant == "b0":
        slope, offset = v.to(opmath).expand(n, channels), torch.sqrt(plane_var + eps)
    else:
        rms = torch.sqrt(plane_var + plane_mean.square() + eps)
        slope, offset = (rms if variant == "b1" else torch.full_like(rms, -1.0)), rms
    scale, shift = _affine_coefficients(weight, bias, plane_mean.new_ones(n, channels))
    return plane_max_div_affine(input, left, slope, offset, scale, shift)


def _is_silu(activation: Optional[Callable[[Tensor], Tensor]]) -> bool:
    return activation is torch.nn.functional.silu or type(activation) is torch.nn.SiLU


def evo_norm_s(variant: str, input: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
               v: Optional[Tensor], activation: Optional[Callable[[Tensor], Tensor]], eps: float,
               apply_act: bool) -> Tensor:
    """The S family through the Triton ops.

    The identity numerator (no activation, or ``apply_act=False``) and ``x·sigmoid(v·x)`` (S0, and SiLU, ``v = 1``)
    run fused in three launches each way (:class:`_EvoNormS`). Any other activation runs as torch ops on the fp32
    (fp64) input: ``plane_moments``, the group statistic by ``(N, C)`` torch ops (the mean of the planes' variances
    plus the variance of their means; S2: the mean of ``var + mean²``), then ``plane_affine`` of the activation.
    """
    kernels = _kernels()
    statistic = kernels.GROUP_MEAN_SQUARE if variant == "s2" else kernels.GROUP_VARIANCE
    if not apply_act or activation is None and variant != "s0":
        return _EvoNormS.apply(input, weight, bias, None, groups, eps, statistic, kernels.NUMERATOR_IDENTITY)
    if variant == "s0":
        return _EvoNormS.apply(input, weight, bias, v, groups, eps, statistic, kernels.NUMERATOR_SWISH)
    if _is_silu(activation):
        return _EvoNormS.apply(input, weight, bias, None, groups, eps, statistic, kernels.NUMERATOR_SILU)
    n, channels = input.shape[:2]
    plane_mean, plane_var = plane_moments(input)
    per_group = (n, groups, channels // groups)
    group_mean, group_var = plane_mean.view(per_group), plane_var.view(per_group)
    if variant == "s2":
        group_statistic = (group_var + group_mean.square()).mean(-1, keepdim=True)
    else:
        group_statistic = group_var.mean(-1, keepdim=True) + (
            group_mean - group_mean.mean(-1, keepdim=True)).square().mean(-1, keepdim=True)
    inv_denominator = torch.rsqrt(group_statistic + eps).expand(per_group).reshape(n, channels)
    scale, shift = _affine_coefficients(weight, bias, inv_denominator)
    numerator = activation(input.to(scale.dtype))
    return plane_affine(numerator, torch.zeros_like(scale), scale, shift).to(input.dtype)
