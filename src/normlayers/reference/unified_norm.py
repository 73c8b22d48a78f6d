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
``.item()``, no data-dependent Python branch), or a Python branch where the CPU tier passes the step as an int.
``grad_compensation=False`` fixes ``r = 1`` (docs/power_unified.md; the official code always applies it). The
departures from the official code, both where it would compute 0/0 = NaN: a step without any non-pad token uses
``q = running_var``; an empty batch has ``gz = 0``.

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
    Decision,
    Step,
    mean_over_rows,
    select,
    snapshot,
    step_snapshot,
    token_rows,
    unscaled_statistic,
)

__all__ = ["unified_norm", "unified_norm_statistics_", "unified_norm_backward_statistics_", "R_CLAMP_START"]

# The official code clamps r only after max(1000, warmup_iters) steps; 1000 is hard-coded there (L59–63).
R_CLAMP_START = 1000


def _ring_write_(buffer: Tensor, t: Step, value: Tensor) -> None:
    """``buffer[t % M] = value``; for a device step ``t`` with a device index (no host read of it)."""
    if isinstance(t, int):
        buffer[t % buffer.shape[0]].copy_(value)
    else:
        buffer.index_copy_(0, torch.remainder(t, buffer.shape[0]), value.to(buffer.dtype).unsqueeze(0))


def _unbiased_variance(values: Tensor) -> Tensor:
    """``values.var()`` (unbiased, over every entry) without its host read of the count."""
    centred = values - values.mean()
    return centred.square().sum() / (values.numel() - 1)


def _is_outlier_step(window_values: Tensor, pooled_var: Tensor, t: Step, warmup_iters: int) -> Decision:
    """After warm-up, any channel's arithmetic minus geometric mean over the window above ``pooled_var·M`` (L43–52)."""
    if isinstance(t, int) and t < warmup_iters:
        return False
    arithmetic = window_values.mean(0)
    geometric = torch.exp(torch.log(window_values).mean(0))
    spread = ((arithmetic - geometric) > pooled_var * window_values.shape[0]).any()
    return bool(spread) if isinstance(t, int) else (t >= warmup_iters) & spread


@torch.no_grad()
def unified_norm_statistics_(q: Tensor, scale: Optional[Tensor], count: Optional[Tensor], running_var: Tensor,
                             buffer_x2: Tensor, skip_counter: Tensor, t: Step, *, eps: float, momentum: float,
                             warmup_iters: int, outlier_filtration: bool,
                             grad_compensation: bool) -> tuple[Tensor, Tensor, Decision]:
    """One training step's forward statistics (official L27–73) from :func:`masked_square_mean`'s ``(q·s², s,
    count)``: returns ``(inv_std, r, skip)`` — ``1/sqrt(var + eps)`` and ``r`` per channel, ``skip`` a ``(1,)`` bool
    (a bool for an int ``t``, see :data:`normlayers.reference.power_norm.Step`) — and updates ``buffer_x2``,
    ``skip_counter`` and ``running_var`` in place."""
    window = buffer_x2.shape[0]
    running = running_var.to(q.dtype, copy=True)  # the value before this step: running_var is overwritten below
    q, batch_inv_std, batch_std = unscaled_statistic(q, scale, count, running, eps)  # no valid token: keep running
    # One scalar over the whole previous window, before q is written (official L41); unbiased, as torch.var.
    pooled_var = _unbiased_variance(torch.sqrt(buffer_x2.to(q.dtype))) if outlier_filtration else None
    _ring_write_(buffer_x2, t, q)
    skip = window <= 1 if isinstance(t, int) else torch.full_like(t, window <= 1, dtype=torch.bool)
    if outlier_filtration:
        outlier = _is_outlier_step(buffer_x2.to(q.dtype), pooled_var, t, warmup_iters)
        if outlier is not False:
            _ring_write_(buffer_x2, t, select(outlier, lambda: running, lambda: q))
            skip_counter.add_(outlier if isinstance(outlier, bool) else outlier.to(skip_counter.dtype))
            skip = skip | outlier

    def window_statistic() -> tuple[Tensor, Tensor, Tensor]:  # (var, 1/sqrt(var + eps), sqrt(var + eps))
        geometric = torch.exp(torch.log(buffer_x2.to(q.dtype)).mean(0))
        return geometric, torch.rsqrt(geometric + eps), torch.sqrt(geometric + eps)

    use_batch = (t <= window) | (t < warmup_iters) | skip
    var, inv_std, std = select(use_batch, lambda: (q, batch_inv_std, batch_std), window_statistic)
    if grad_compensation:
        r = select((t <= max(R_CLAMP_START, warmup_iters)) | skip, lambda: torch.ones_like(var),
                   lambda: (std / torch.sqrt(running + eps)).clamp(0.2, 5.0))
    else:
        r = torch.ones_like(var)
    if isinstance(skip, Tensor):
        inv_std, r, skip = snapshot(t, [inv_std, r, skip])
    else:
        inv_std, r = snapshot(t, [inv_std, r])
    running_var.copy_(momentum * running + (1 - momentum) * var)
    return inv_std, r, skip


@torch.no_grad()
def unified_norm_backward_statistics_(gz: Tensor, ema_gz: Tensor, buffer_gz: Tensor, t: Step, skip: Decision, *,
                                      momentum: float, warmup_iters: int) -> Tensor:
    """The backward's smoothing (official L76–110): from this step's ``gz`` (per channel), update ``buffer_gz`` and
    ``ema_gz`` in place and return the ``c`` of ``dx = (g − c·z)/sqrt(var + eps)``."""
    window = buffer_gz.shape[0]
    old = ema_gz.to(gz.dtype, copy=True)
    _ring_write_(buffer_gz, t, select(skip, lambda: old, lambda: gz))
    use_batch = (t <= window) | (t < warmup_iters) | skip
    mean_gz = select(use_batch, lambda: gz, lambda: buffer_gz.to(gz.dtype).mean(0))
    new = momentum * old + (1 - momentum) * mean_gz
    ema_gz.copy_(new)
    return select(skip, lambda: gz, lambda: new)


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
