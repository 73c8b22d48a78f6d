"""Plain-PyTorch reference of PowerNorm (Shen et al., ICML 2020, arXiv 2003.07845): the ground truth the kernels
are tested against.

It follows the official ``MaskPowerNorm`` (sIncerass/powernorm, ``fairseq/modules/norms/mask_powernorm.py``) step by
step (its L28–37, L56–95, L130–172; docs/power_unified.md has the table). For the ``R`` tokens (rows) of an
input with ``C`` channels, at training step ``t`` (``iters`` is incremented *before* the step, so ``t`` starts at 1):

1. ``u = GroupScaling(x)``: each token's groups of ``C/G`` channels divided by their RMS (eps ``1e-5``, fixed), with
   autograd (L28–37). ``group_num=None`` leaves it out (sIncerass/powernorm issues #8, #9).
2. ``q_c = mean over the non-pad tokens of u_c²``, without gradient; taken of the channel scaled by a power of two
   (:func:`masked_square_mean`), so it neither overflows nor underflows where the step's output is representable.
3. ``z = u / sqrt(d + eps)`` with ``d = q`` while ``t <= warmup_iters`` and ``d = φ_{t−1}`` (``running_phi`` before
   this step's update) afterwards; ``y = weight·z + bias``.
4. ``φ ← φ·(t−1)/t + q/t`` while ``t < warmup_iters`` (note ``<``), then ``φ ← α_fwd·φ + (1−α_fwd)·q`` every step.
5. Backward (the method's own, ``PowerFunction.backward`` L74–95; docs/power_unified.md, "The approximate
   backward"): ``g = dy·weight``; ``g̃ = g − (1−α_bkw)·ema_gz·z``;
   ``ema_gz += mean over ALL R tokens of g̃·z`` (in place, pads included); ``du = g̃ / sqrt(q + eps)`` (the *batch*
   statistic, also after warm-up; ``backward_denominator="running"`` uses ``φ_{t−1}`` instead);
   ``dweight = Σ dy·z``, ``dbias = Σ dy``; ``dx`` is autograd's through GroupScaling.

Eval: ``y = weight·u / sqrt(running_phi + eps) + bias``. The departures from the official code, both where it would
compute 0/0 = NaN and poison the buffers: a step without any non-pad token uses ``q = φ_{t−1}``, which leaves
``running_phi`` unchanged; an empty batch adds 0 to ``ema_gz``.

Arithmetic is in fp32 (fp64 for fp64 inputs); the output is rounded once, to the input's dtype; buffers keep their
dtype. Argument checks live in :mod:`normlayers.functional`.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar, Union

import torch
from torch import Tensor

from normlayers._autograd import refuse_double_backward
from normlayers._dtypes import compute_dtype
from normlayers.distributed import all_reduce_sum
from normlayers.reference.row_norms import overflow_to_nan, power_of_two_scale

__all__ = ["power_norm", "group_scaling", "token_rows", "mean_over_valid", "mean_over_rows", "power_norm_statistics_",
           "masked_square_mean", "unscaled_statistic",
           "step_snapshot", "snapshot", "select", "Step", "Decision", "GROUP_SCALING_EPS"]

# GroupScaling1D's epsilon in the official code (mask_powernorm.py L20), independent of the layer's eps.
GROUP_SCALING_EPS = 1e-5


def group_scaling(x: Tensor, group_num: int, eps: float = GROUP_SCALING_EPS) -> Tensor:
    """``x / sqrt(mean over each group of C/G contiguous channels of x² + eps)``, per token
    (``GroupScaling1D``, ``mask_powernorm.py`` L28–37)."""
    channels = x.shape[-1]
    groups = x.reshape(*x.shape[:-1], group_num, channels // group_num)
    # Taken of the group scaled by a power of two (then eps·s²), so that huge values do not overflow x² (exact).
    scale = power_of_two_scale(groups, (-1,), eps)
    scaled = groups * scale
    moment2 = scaled.square().mean(-1, keepdim=True)
    return (scaled / torch.sqrt(moment2 + eps * scale * scale)).reshape(x.shape)


def token_rows(x: Tensor, pad_mask: Optional[Tensor], *, time_major: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``x`` as ``(R, C)`` token rows, and the ``(R,)`` bool vector of non-pad rows (``None`` without a mask).

    ``x`` is ``(T, B, C)`` when ``time_major`` (row ``t·B + b``), else ``(B, T, C)`` (row ``b·T + t``); either way
    ``pad_mask`` is ``(B, T)`` with True = padding (the fairseq convention). A 2-D ``(B, C)`` input is one token per
    sample, with a ``(B,)`` mask.
    """
    rows = x.reshape(-1, x.shape[-1])
    if pad_mask is None:
        return rows, None
    keep = ~pad_mask
    if x.dim() == 3 and time_major:
        keep = keep.transpose(0, 1)
    return rows, keep.reshape(-1)


@torch.library.custom_op("normlayers::step_snapshot", mutates_args=())
def step_snapshot(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of ``tensors``: the per-step values (step number, statistics) that the backward reads.

    They derive from buffers that the same step then overwrites (``iters``, ``running_phi``, ``running_var``,
    ``buffer_x2``). Under ``torch.compile`` the partitioner may recompute cheap saved values in the backward from the
    graph inputs, which by then hold the updated buffers (observed with torch 2.13: the backward saw step ``t + 1``).
    An opaque op's outputs are saved, never recomputed, so the backward sees this step's values.
    """
    return [t.clone() for t in tensors]


@step_snapshot.register_fake
def _step_snapshot_fake(tensors):
    return [torch.empty_like(t) for t in tensors]


# The step number ``t`` and the decisions taken from it: device tensors here (every decision a ``torch.where``, no host
# read), or Python values, which the CPU tier passes in eager (a CPU tensor's value is at hand there, and a branch
# costs nothing where a dozen small ops cost more than a small layer's arithmetic).
Step = Union[int, Tensor]
Decision = Union[bool, Tensor]
_Selected = TypeVar("_Selected", Tensor, tuple[Tensor, ...])


def select(decision: Decision, if_true: Callable[[], _Selected], if_false: Callable[[], _Selected]) -> _Selected:
    """``torch.where(decision, if_true(), if_false())`` (elementwise for tuples); for a Python ``decision`` only the
    chosen side is computed."""
    if isinstance(decision, bool):
        return if_true() if decision else if_false()
    chosen, other = if_true(), if_false()
    if isinstance(chosen, Tensor):
        return torch.where(decision, chosen, other)
    return tuple(torch.where(decision, a, b) for a, b in zip(chosen, other))


def snapshot(t: Step, tensors: list[Tensor]) -> list[Tensor]:
    """:func:`step_snapshot` of a step's values where the step is a device tensor (it may be compiled); with a Python
    step (the CPU tier in eager) the values are fresh tensors already."""
    return tensors if isinstance(t, int) else step_snapshot(tensors)


def _sum_over_ranks(total: Tensor, count: Tensor, sync_group: str) -> tuple[Tensor, Tensor]:
    """Per-channel ``total`` and the scalar ``count`` summed over the ranks of ``sync_group``, in one all-reduce.

    Plain sums suffice (not the Chan combination of moments that the mean-subtracting norms use): these statistics
    subtract no mean, so there is nothing to cancel. fp64 on the wire keeps counts exact and the sum of partial sums
    rounding-free at these sizes; the result has ``total``'s dtype, the count is fp64.
    """
    packed = torch.cat([total.to(torch.float64), count.to(torch.float64).reshape(1)])
    packed = all_reduce_sum(packed, sync_group)
    return packed[:-1].to(total.dtype), packed[-1]


def mean_over_valid(total: Tensor, rows: int, valid: Optional[Tensor],
                    sync_group: Optional[str] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``(total / number of valid rows, that number as a device tensor)``; the count is ``None`` when every row is
    valid and there is at least one (nothing to guard, and no host-to-device copy of ``rows``).

    With ``sync_group`` both are summed over its ranks first (every rank must call, also with no rows): the mean
    over the valid rows of the global batch, and the global count (0 only when no rank has a valid row).
    """
    total = overflow_to_nan(total)  # the sum of squares overflowed: NaN, not a silent 0 output
    if sync_group is None and valid is None and rows > 0:
        return total / rows, None
    if valid is not None:
        count = valid.sum()
    else:
        count = torch.full((), rows, dtype=torch.int64, device=total.device)
    if sync_group is not None:
        total, count = _sum_over_ranks(total, count, sync_group)
    return total / count, count


def mean_over_rows(total: Tensor, rows: int, sync_group: Optional[str] = None) -> Tensor:
    """``total / rows``, the backward's mean over all rows (pads included), 0 for no rows (not 0/0); with
    ``sync_group`` over the rows of every rank (``total`` and ``rows`` summed over its ranks)."""
    if sync_group is None:
        return total / max(rows, 1)
    total, count = _sum_over_ranks(total, torch.full((), rows, dtype=torch.int64, device=total.device), sync_group)
    return total / count.clamp(min=1).to(total.dtype)


def keep_if_empty(q: Tensor, count: Optional[Tensor], fallback: Tensor) -> Tensor:
    """``q``, or ``fallback`` when no row was valid (where the official code divides 0 by 0)."""
    return q if count is None else torch.where(count > 0, q, fallback)


def masked_square_mean(rows: Tensor, valid: Optional[Tensor], eps: float,
                       sync_group: Optional[str] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(q·s², s, count)``: per channel, the mean of ``rows²`` over the valid rows (of every rank of ``sync_group``)
    taken of the rows scaled by ``s``, a power of two from the largest magnitude of the channel's valid values (as the
    row norms'; ``eps·s² ≤ 1``), so that it neither overflows nor underflows; and their count (see
    :func:`mean_over_valid`). With ``sync_group`` ``s`` is ``None``, i.e. 1 (the ranks' sums must share one scale)."""
    selected = rows.detach()
    if valid is not None:
        selected = torch.where(valid[:, None], selected, 0.0)  # select: a NaN in a pad must not leak (NaN·0 = NaN)
    scale = None
    if sync_group is None and rows.shape[0] > 0:  # (no rows: nothing to scale, and amax needs one)
        scale = power_of_two_scale(selected, (0,), eps).squeeze(0)
        selected = selected * scale
    q, count = mean_over_valid(selected.square().sum(0), rows.shape[0], valid, sync_group)
    return q, scale, count


def unscaled_statistic(q: Tensor, scale: Optional[Tensor], count: Optional[Tensor], fallback: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """From :func:`masked_square_mean`'s ``(q·s², s)``: ``(q, 1/sqrt(q + eps), sqrt(q + eps))``, the last two from
    the scaled values (``s/sqrt(q·s² + eps·s²)``), so they are right where ``q`` itself over- or underflows. With no
    valid row ``q`` is ``fallback`` (where the official code divides 0 by 0)."""
    q = keep_if_empty(q, count, fallback)
    if scale is None:
        return q, torch.rsqrt(q + eps), torch.sqrt(q + eps)
    scale = keep_if_empty(scale, count, torch.ones_like(scale))
    eps_scaled = eps * scale * scale  # ≤ 1: the scale is capped for eps
    return q / scale / scale, scale * torch.rsqrt(q + eps_scaled), torch.sqrt(q + eps_scaled) / scale


@torch.no_grad()
def power_norm_statistics_(q: Tensor, scale: Optional[Tensor], count: Optional[Tensor], running_phi: Tensor,
                           t: Step, *, eps: float, alpha_fwd: float, warmup_iters: int,
                           backward_denominator: str) -> tuple[Tensor, Tensor]:
    """One training step's statistics (``mask_powernorm.py`` L56–70) from :func:`masked_square_mean`'s ``(q·s², s,
    count)``: returns ``(rsqrt(d + eps), the backward's 1/sqrt(denominator))`` and updates ``running_phi`` (flat
    ``(C,)`` view of the buffer) in place. ``t`` is the step as a ``(1,)`` tensor, so the warm-up decisions are
    ``torch.where`` on device, not Python branches (or an int: see :data:`Step`)."""
    phi = running_phi.to(q.dtype, copy=True)  # the value before this step: running_phi is overwritten below
    q, batch_scale, batch_std = unscaled_statistic(q, scale, count, phi, eps)  # no valid token: keep φ
    tf = t if isinstance(t, int) else t.to(q.dtype)
    forward_scale = select(t <= warmup_iters, lambda: batch_scale, lambda: torch.rsqrt(phi + eps))
    cumulative = select(t < warmup_iters, lambda: phi * (tf - 1) / tf + q / tf, lambda: phi)
    running_phi.copy_(alpha_fwd * cumulative + (1 - alpha_fwd) * q)
    grad_std = batch_std if backward_denominator == "batch" else torch.sqrt(phi + eps)
    forward_scale, grad_scale = snapshot(t, [forward_scale, 1.0 / grad_std])
    return forward_scale, grad_scale


class _PowerNormFunction(torch.autograd.Function):
    """Step 3–5 on token rows ``u`` ``(R, C)`` (opmath); its backward is the method's approximate one
    (``mask_powernorm.py`` L74–95)."""

    @staticmethod
    def forward(ctx, u: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_phi: Tensor,
                ema_gz: Tensor, t: Tensor, valid: Optional[Tensor], eps: float, alpha_fwd: float, alpha_bkw: float,
                warmup_iters: int, backward_denominator: str, sync_group: Optional[str]) -> Tensor:
        q, q_scale, count = masked_square_mean(u, valid, eps, sync_group)
        scale, grad_scale = power_norm_statistics_(q, q_scale, count, running_phi, t, eps=eps, alpha_fwd=alpha_fwd,
                                                   warmup_iters=warmup_iters,
                                                   backward_denominator=backward_denominator)
        z = u * scale
        y = z
        if weight is not None:
            y = y * weight.to(z.dtype)
        if bias is not None:
            y = y + bias.to(z.dtype)
        ctx.save_for_backward(z, weight, grad_scale)
        # The buffer itself, read and updated when backward runs (as the official ctx does), not a snapshot.
        ctx.ema_gz = ema_gz
        ctx.alpha_bkw = alpha_bkw
        ctx.sync_group = sync_group
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        refuse_double_backward("PowerNorm's training backward (the method's approximate one, which updates ema_gz)")
        z, weight, grad_scale = ctx.saved_tensors
        ema_gz = ctx.ema_gz
        g = dy * weight.to(dy.dtype) if weight is not None else dy
        approx = g - (1 - ctx.alpha_bkw) * ema_gz.to(dy.dtype) * z
        # Mean over all rows (of every rank when synced); an empty batch adds nothing (a plain mean would be 0/0).
        ema_gz.copy_(ema_gz + mean_over_rows((approx * z).sum(0), z.shape[0], ctx.sync_group))
        du = approx * grad_scale
        dweight = (dy * z).sum(0).to(weight.dtype) if weight is not None else None
        dbias = dy.sum(0).to(weight.dtype if weight is not None else dy.dtype) if ctx.has_bias else None
        return du, dweight, dbias, *([None] * 10)


def power_norm(x: Tensor, running_phi: Tensor, ema_gz: Tensor, iters: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], pad_mask: Optional[Tensor] = None, *, training: bool, eps: float,
               alpha_fwd: float, alpha_bkw: float, warmup_iters: int, group_num: Optional[int],
               batch_first: bool = False, backward_denominator: str = "batch",
               sync_group: Optional[str] = None) -> Tensor:
    """PowerNorm of ``x`` ``(T, B, C)`` (``(B, T, C)`` with ``batch_first``, or ``(B, C)``); see the module docstring.

    Training increments ``iters`` and updates ``running_phi`` in place, and the backward updates ``ema_gz`` in place.
    Buffers may have any shape with ``C`` elements (officially ``(1, C, 1, 1)``). With ``sync_group`` (a process
    group name, training only) the forward statistic ``q`` and the backward's mean for ``ema_gz`` are taken over the
    tokens of every rank of the group (see :mod:`normlayers.distributed`).
    """
    xf = x.to(compute_dtype(x.dtype))
    u = group_scaling(xf, group_num) if group_num is not None else xf
    rows, valid = token_rows(u, pad_mask, time_major=not batch_first)
    if training:
        iters.add_(1)
        (step,) = step_snapshot([iters])
        y = _PowerNormFunction.apply(rows, weight, bias, running_phi.view(-1), ema_gz.view(-1), step, valid,
                                     eps, alpha_fwd, alpha_bkw, warmup_iters, backward_denominator, sync_group)
    else:
        y = rows * torch.rsqrt(running_phi.reshape(-1).to(rows.dtype) + eps)
        if weight is not None:
            y = y * weight.to(y.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
    return y.reshape(x.shape).to(x.dtype)
