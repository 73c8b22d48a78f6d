"""Plain-PyTorch reference of Unified Normalization (Yang et al., ACM MM 2022, arXiv 2208.01313): the ground truth
the kernels are tested against.

It follows the official ``UN1d`` (repository Unified-Normalization of hikvision-research, ``unified_normalization.py``)
step by step. Input ``(B, N, C)``, statistics per channel over the non-pad tokens; ``M`` and ``M_b`` are the forward and
backward window sizes (the rows of ``buffer_x2`` and ``buffer_gz``); at training step ``t`` (``iters`` incremented
before the step):

Forward (``unified_normalization.py`` L27–73)::

    q      = mean over the non-pad tokens of x²                 (no gradient; taken scaled by a power of two)
    rvar   = unbiased variance of sqrt(buffer_x2) over all M·C entries, before this step's write (ONE scalar)
    buffer_x2[t % M] = q
    skip   = M <= 1
    if outlier_filtration and t >= warmup_iters and any_c(AM_c − GM_c > rvar·M) over the window:
        buffer_x2[t % M] = running_var;  skip = True;  skip_counter += 1
    var    = q if (t <= M or t < warmup_iters or skip) else GM over the window (geometric mean, incl. slot t % M)
    r      = 1 if (t <= max(1000, warmup_iters) or skip) else clamp(sqrt(var+eps)/sqrt(running_var+eps), 1/5, 5)
    z      = x / sqrt(var + eps);   y = weight·z + bias            (r is not applied in the forward)
    running_var = momentum·running_var + (1 − momentum)·var

Backward (L76–110)::

    g        = dy·weight·r;   gz = mean over ALL tokens of g·z
    buffer_gz[t % M_b] = ema_gz if skip else gz
    mean_gz  = gz if (t <= M_b or t < warmup_iters or skip) else mean of buffer_gz over the window
    ema_gz   = momentum·ema_gz + (1 − momentum)·mean_gz
    dx       = (g − c·z) / sqrt(var + eps),  c = gz if skip else ema_gz (the new value)
    dweight  = Σ dy·r·z;   dbias = Σ dy

Eval (L190–194): ``y = weight·x / sqrt(running_var + eps) + bias``. Every decision is a ``torch.where`` on device (no
``.item()``, no data-dependent Python branch). ``grad_compensation=False`` fixes ``r = 1`` (docs/power_unified.md; the
official code always applies it). The departures from the official code, both where it would compute 0/0 = NaN: a step
without any non-pad token uses ``q = running_var``; an empty batch has ``gz = 0``.

Arithmetic is in fp32 (fp64 for fp64 inputs); the output is rounded once, to the input's dtype; buffers keep their
dtype. Argument checks live in :mod:`normlayers.functional`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from normlayers._autograd import refuse_double_backward
from normlayers._dtypes import compute_dtype
from normlayers.reference.power_norm import (
    masked_square_mean,
    mean_over_rows,
    step_snapshot,
    token_rows,
    unscaled_statistic,
)

__all__ = ["unified_norm", "unified_norm_statistics_", "unified_norm_backward_statistics_", "R_CLAMP_START"]

# The official code clamps r only after max(1000, warmup_iters) steps; 1000 is hard-coded there (L59–63).
R_CLAMP_START = 1000


def _ring_write_(buffer: Tensor, slot: Tensor, value: Tensor) -> None:
    """``buffer[slot] = value`` for a ``(1,)`` device index ``slot`` (no host read of the index)."""
    buffer.index_copy_(0, slot, value.to(buffer.dtype).unsqueeze(0))


def _unbiased_variance(values: Tensor) -> Tensor:
    """``values.var()`` (unbiased, over every entry) without its host read of the count."""
    centred = values - values.mean()
    return centred.square().sum() / (values.numel() - 1)


@torch.no_grad()
def unified_norm_statistics_(q: Tensor, scale: Optional[Tensor], count: Optional[Tensor], running_var: Tensor,
                             buffer_x2: Tensor, skip_counter: Tensor, t: Tensor, *, eps: float, momentum: float,
                             warmup_iters: int, outlier_filtration: bool,
                             grad_compensation: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One training step's forward statistics (official L27–73) from :func:`masked_square_mean`'s ``(q·s², s,
    count)``: returns ``(inv_std, r, skip)`` — ``1/sqrt(var + eps)`` and ``r`` per channel, ``skip`` a ``(1,)`` bool —
    and updates ``buffer_x2``, ``skip_counter`` and ``running_var`` in place."""
    window = buffer_x2.shape[0]
    running = running_var.to(q.dtype, copy=True)  # the value before this step: running_var is overwritten below
    q, batch_inv_std, batch_std = unscaled_statistic(q, scale, count, running, eps)  # no valid token: keep running
    slot = torch.remainder(t, window)
    # One scalar over the whole previous window, before q is written (official L41); unbiased, as torch.var.
    pooled_var = _unbiased_variance(torch.sqrt(buffer_x2.to(q.dtype))) if outlier_filtration else None
    _ring_write_(buffer_x2, slot, q)
    skip = torch.full_like(t, window <= 1, dtype=torch.bool)
    if outlier_filtration:
        window_values = buffer_x2.to(q.dtype)
        arithmetic = window_values.mean(0)
        geometric = torch.exp(torch.log(window_values).mean(0))
        outlier = (t >= warmup_iters) & ((arithmetic - geometric) > pooled_var * window).any()
        _ring_write_(buffer_x2, slot, torch.where(outlier, running, q))
        skip_counter.add_(outlier.to(skip_counter.dtype))
        skip = skip | outlier
    geometric = torch.exp(torch.log(buffer_x2.to(q.dtype)).mean(0))
    use_batch = (t <= window) | (t < warmup_iters) | skip
    var = torch.where(use_batch, q, geometric)
    inv_std = torch.where(use_batch, batch_inv_std, torch.rsqrt(geometric + eps))
    if grad_compensation:
        r = torch.where(use_batch, batch_std, torch.sqrt(geometric + eps)) / torch.sqrt(running + eps)
        r = torch.where((t <= max(R_CLAMP_START, warmup_iters)) | skip, torch.ones_like(r), r.clamp(0.2, 5.0))
    else:
        r = torch.ones_like(var)
    inv_std, r, skip = step_snapshot([inv_std, r, skip])
    running_var.copy_(momentum * running + (1 - momentum) * var)
    return inv_std, r, skip


@torch.no_grad()
def unified_norm_backward_statistics_(gz: Tensor, ema_gz: Tensor, buffer_gz: Tensor, t: Tensor, skip: Tensor, *,
                                      momentum: float, warmup_iters: int) -> Tensor:
    """The backward's smoothing (official L76–110): from this step's ``gz`` (per channel), update ``buffer_gz`` and
    ``ema_gz`` in place and return the ``c`` of ``dx = (g − c·z)/sqrt(var + eps)``."""
    window = buffer_gz.shape[0]
    slot = torch.remainder(t, window)
    old = ema_gz.to(gz.dtype, copy=True)
    _ring_write_(buffer_gz, slot, torch.where(skip, old, gz))
    use_batch = (t <= window) | (t < warmup_iters) | skip
    mean_gz = torch.where(use_batch, gz, buffer_gz.to(gz.dtype).mean(0))
    new = momentum * old + (1 - momentum) * mean_gz
    ema_gz.copy_(new)
    return torch.where(skip, gz, new)


class _UnifiedNormFunction(torch.autograd.Function):
    """UN's training step on token rows ``x`` ``(R, C)`` (opmath), with the method's own backward (L76–110)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, running_var: Tensor, ema_gz: Tensor,
                buffer_x2: Tensor, buffer_gz: Tensor, skip_counter: Tensor, t: Tensor, valid: Optional[Tensor],
                eps: float, momentum: float, warmup_iters: int, outlier_filtration: bool,
                grad_compensation: bool, sync_group: Optional[str]) -> Tensor:
        q, scale, count = masked_square_mean(x, valid, eps, sync_group)
        inv_std, r, skip = unified_norm_statistics_(q, scale, count, running_var, buffer_x2, skip_counter, t,
                                                    eps=eps, momentum=momentum, warmup_iters=warmup_iters,
                                                    outlier_filtration=outlier_filtration,
                                                    grad_compensation=grad_compensation)
        z = x * inv_std
        ctx.save_for_backward(z, weight, inv_std, r, t, skip)
        ctx.ema_gz, ctx.buffer_gz = ema_gz, buffer_gz  # updated when backward runs
        ctx.momentum, ctx.warmup_iters, ctx.sync_group = momentum, warmup_iters, sync_group
        return z * weight.to(z.dtype) + bias.to(z.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        refuse_double_backward("UnifiedNorm's training backward (the method's own, which updates ema_gz and "
                               "buffer_gz)")
        z, weight, inv_std, r, t, skip = ctx.saved_tensors
        g = dy * weight.to(dy.dtype) * r
        # Mean over all rows, of every rank when synced (0 for an empty batch, not 0/0).
        gz = mean_over_rows((g * z).sum(0), z.shape[0], ctx.sync_group)
        c = unified_norm_backward_statistics_(gz, ctx.ema_gz, ctx.buffer_gz, t, skip, momentum=ctx.momentum,
                                              warmup_iters=ctx.warmup_iters)
        dx = (g - c * z) * inv_std
        dweight = (dy * r * z).sum(0).to(weight.dtype)
        dbias = dy.sum(0).to(weight.dtype)
        return dx, dweight, dbias, *([None] * 13)


def unified_norm(x: Tensor, running_var: Tensor, ema_gz: Tensor, buffer_x2: Tensor, buffer_gz: Tensor,
                 iters: Tensor, skip_counter: Tensor, weight: Tensor, bias: Tensor,
                 pad_mask: Optional[Tensor] = None, *, training: bool, eps: float, momentum: float,
                 warmup_iters: int, outlier_filtration: bool, grad_compensation: bool = True,
                 sync_group: Optional[str] = None) -> Tensor:
    """Unified Normalization of ``x`` ``(B, N, C)`` or ``(B, C)``; see the module docstring.

    Training increments ``iters`` and updates ``running_var``, ``buffer_x2`` and ``skip_counter`` in place; the backward
    updates ``ema_gz`` and ``buffer_gz`` in place. With ``sync_group`` (a process group name, training only) ``q`` and
    the backward's ``gz`` are means over the tokens of every rank of the group (see :mod:`normlayers.distributed`).
    """
    xf = x.to(compute_dtype(x.dtype))
    rows, valid = token_rows(xf, pad_mask, time_major=False)
    if training:
        iters.add_(1)
        (step,) = step_snapshot([iters])
        y = _UnifiedNormFunction.apply(rows, weight, bias, running_var, ema_gz, buffer_x2, buffer_gz, skip_counter,
                                       step, valid, eps, momentum, warmup_iters, outlier_filtration,
                                       grad_compensation, sync_group)
    else:
        y = rows * torch.rsqrt(running_var.to(rows.dtype) + eps) * weight.to(rows.dtype) + bias.to(rows.dtype)
    return y.reshape(x.shape).to(x.dtype)
