"""Functional PowerNorm and Unified Normalization, the transformer norms with batch statistics over tokens."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from normlayers._checks import (
    check_counter,
    check_epsilon,
    check_float_tensor,
    check_nonnegative_int,
    check_positive_int,
    check_running_stats_without_grad,
    check_same_device,
    check_unit_interval,
)
from normlayers._dtensor import is_dtensor, run_on_local_shards
from normlayers.backends import use_triton
from normlayers.distributed import sync_group_name
from normlayers.ops import token_stats as _ops_token
from normlayers.reference import power_norm as _ref_power
from normlayers.reference import unified_norm as _ref_unified

__all__ = ["power_norm", "unified_norm"]


def check_backward_denominator(backward_denominator: object) -> str:
    """PowerNorm's ``backward_denominator`` (also checked by :class:`normlayers.PowerNorm`)."""
    if backward_denominator not in ("batch", "running"):
        raise ValueError(f"backward_denominator must be 'batch' or 'running', got {backward_denominator!r}")
    return backward_denominator


def _flat_2d_mask(input: Tensor, pad_mask: Optional[Tensor], official_shape: tuple[int, int]) -> Optional[Tensor]:
    """For 2-D input the official code promotes the input to one token per sample, so its mask has a unit dim
    (``official_shape``); accept that form besides ``(B,)``."""
    if input.dim() == 2 and isinstance(pad_mask, Tensor) and tuple(pad_mask.shape) == official_shape:
        return pad_mask.reshape(-1)
    return pad_mask


def _token_dims(ndim: int) -> range:
    """The dims of a ``(..., C)`` input that index tokens: a DTensor input may be sharded along these."""
    return range(ndim - 1)


def _check_token_norm_input(input: Tensor, pad_mask: Optional[Tensor], mask_shape: tuple[int, ...],
                            layout: str) -> int:
    """Checks shared by both layers; returns the channel count ``C``."""
    check_float_tensor("input", input)
    if input.dim() not in (2, 3):
        raise ValueError(f"input must be 3-D {layout} or 2-D (B, C), got {input.dim()}-D input of shape "
                         f"{list(input.shape)}")
    if pad_mask is not None:
        if not isinstance(pad_mask, Tensor):
            raise TypeError(f"pad_mask must be a torch.Tensor, got {type(pad_mask).__name__}")
        if pad_mask.dtype != torch.bool:
            # `~` of an integer mask is a bitwise not (~1 = -2), which would silently select the wrong tokens.
            raise TypeError(f"pad_mask must be a bool tensor (True = padding), got {pad_mask.dtype}")
        if tuple(pad_mask.shape) != mask_shape:
            raise ValueError(f"pad_mask must have shape {list(mask_shape)} (True = padding) for input of shape "
                             f"{list(input.shape)} {layout if input.dim() == 3 else '(B, C)'}, got "
                             f"{list(pad_mask.shape)}")
        check_same_device("pad_mask", pad_mask, input)
    return input.shape[-1]


def _check_token_norm_state(input: Tensor, channels: int, per_channel: dict[str, Optional[Tensor]],
                            counters: dict[str, Tensor], windows: Optional[dict[str, Tensor]] = None) -> None:
    windows = windows or {}
    for name, t in per_channel.items():
        if t is None:
            continue
        check_float_tensor(name, t)
        if t.numel() != channels:
            raise ValueError(f"input (..., C) and {name} must agree on C = num_features: input has C = {channels} "
                             f"(shape {list(input.shape)}), {name} has shape {list(t.shape)}")
    for name, t in windows.items():
        check_float_tensor(name, t)
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] != channels:
            raise ValueError(f"{name} must have shape (window_size, C) with C = {channels}, got {list(t.shape)}")
    for name, t in counters.items():
        check_counter(name, t)
    for name, t in {**per_channel, **windows, **counters}.items():
        if t is not None:
            check_same_device(name, t, input)


def power_norm(input: Tensor, running_phi: Tensor, ema_gz: Tensor, iters: Tensor, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, pad_mask: Optional[Tensor] = None, training: bool = False,
               eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9, warmup_iters: int = 10000,
               group_num: Optional[int] = 1, *, batch_first: bool = False, backward_denominator: str = "batch",
               sync_stats: bool = False, process_group: Optional[Any] = None) -> Tensor:
    r"""PowerNorm (Shen et al., ICML 2020), exactly as the official ``MaskPowerNorm`` (sIncerass/powernorm).

    .. math::
        u = \mathrm{GroupScaling}(x), \qquad y = \gamma \cdot \frac{u}{\sqrt{d + \epsilon}} + \beta

    In training ``d`` is the batch quadratic mean ``q = mean over non-pad tokens of u²`` for the first
    ``warmup_iters`` steps, then ``running_phi`` (before this step's update); the backward is the method's approximate
    one with the running statistic ``ema_gz``. In eval ``d = running_phi``. See :class:`normlayers.PowerNorm`.

    Args:
        input: ``(T, B, C)`` (time-major, as fairseq), ``(B, T, C)`` with ``batch_first=True``, or ``(B, C)``.
        running_phi, ema_gz: buffers with ``C`` elements (officially ``(1, C, 1, 1)``); training updates
            ``running_phi`` in the forward and ``ema_gz`` in the backward, in place.
        iters: one-element integer tensor, incremented in place by every training call (the step counter ``t``).
        weight, bias: ``(C,)`` or ``None``.
        pad_mask: ``(B, T)`` bool, True = padding (``(B,)`` or the official ``(B, 1)`` for 2-D input). Padding is
            left out of the forward statistic only (the backward's means run over all tokens, as the official code).
        training, eps, alpha_fwd, alpha_bkw, warmup_iters, group_num: as the module; ``group_num=None`` skips
            GroupScaling.
        batch_first: input ``(B, T, C)``. Default: ``False``.
        backward_denominator: ``"batch"`` (the official code: ``sqrt(q + eps)``) or ``"running"``
            (``sqrt(running_phi + eps)``, the paper's form; docs/power_unified.md). Default: ``"batch"``.
        sync_stats, process_group (keyword-only): in training, with ``torch.distributed`` initialized and more than
            one rank in ``process_group`` (default: the world), the statistics are those of the global batch: ``q``
            over the non-pad tokens of every rank, and the backward's mean for ``ema_gz`` over every rank's tokens
            (one all-reduce each; every rank must call, also with no tokens). Default: ``False``, ``None``.
    """
    if is_dtensor(input):  # statistics over the tokens of every shard (docs/scaling_out.md)
        return run_on_local_shards(
            power_norm, "PowerNorm", dict(input=input, running_phi=running_phi, ema_gz=ema_gz, iters=iters,
                                          weight=weight, bias=bias, pad_mask=pad_mask),
            params=("weight", "bias"), shardable=_token_dims,
            mask_dim=lambda d: 1 - d if input.dim() == 3 and not batch_first else d,
            training=training, sync_stats=sync_stats, process_group=process_group, eps=eps, alpha_fwd=alpha_fwd,
            alpha_bkw=alpha_bkw, warmup_iters=warmup_iters, group_num=group_num, batch_first=batch_first,
            backward_denominator=backward_denominator)
    if input.dim() == 3:
        mask_shape = tuple(input.shape[:2]) if batch_first else (input.shape[1], input.shape[0])
    else:
        mask_shape = tuple(input.shape[:1])
        pad_mask = _flat_2d_mask(input, pad_mask, (input.shape[0], 1))
    channels = _check_token_norm_input(input, pad_mask, mask_shape, "(B, T, C)" if batch_first else "(T, B, C)")
    _check_token_norm_state(input, channels, {"running_phi": running_phi, "ema_gz": ema_gz, "weight": weight,
                                              "bias": bias}, {"iters": iters})
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},), got {list(t.shape)}")
    check_epsilon("eps", eps)
    check_running_stats_without_grad(training, running_phi=running_phi, ema_gz=ema_gz)
    check_unit_interval("alpha_fwd", alpha_fwd)
    check_unit_interval("alpha_bkw", alpha_bkw)
    check_nonnegative_int("warmup_iters", warmup_iters)
    group_num = check_positive_int("group_num", group_num, or_none=True)
    if group_num is not None and channels % group_num != 0:
        raise ValueError(f"group_num ({group_num}) must divide the channel count C = {channels}")
    check_backward_denominator(backward_denominator)
    kwargs = dict(training=training, eps=float(eps), alpha_fwd=float(alpha_fwd), alpha_bkw=float(alpha_bkw),
                  warmup_iters=int(warmup_iters), group_num=group_num, batch_first=batch_first,
                  backward_denominator=backward_denominator,
                  sync_group=sync_group_name(sync_stats, process_group, training))
    if use_triton(input):
        return _ops_token.power_norm(input, running_phi, ema_gz, iters, weight, bias, pad_mask, **kwargs)
    return _ref_power.power_norm(input, running_phi, ema_gz, iters, weight, bias, pad_mask, **kwargs)


def unified_norm(input: Tensor, running_var: Tensor, ema_gz: Tensor, buffer_x2: Tensor, buffer_gz: Tensor,
                 iters: Tensor, skip_counter: Tensor, weight: Tensor, bias: Tensor, pad_mask: Optional[Tensor] = None,
                 training: bool = False, eps: float = 1e-5, momentum: float = 0.9, warmup_iters: int = 4000,
                 outlier_filtration: bool = False, *, grad_compensation: bool = True, sync_stats: bool = False,
                 process_group: Optional[Any] = None) -> Tensor:
    r"""Unified Normalization (Yang et al., ACM MM 2022), exactly as the official ``UN1d``.

    .. math:: y = \gamma \cdot \frac{x}{\sqrt{v + \epsilon}} + \beta

    In training ``v`` is the batch quadratic mean over non-pad tokens during warm-up (and on outlier-filtered steps),
    else the geometric mean of the last ``M`` batch statistics (the ring buffer ``buffer_x2``); the backward is the
    method's own (arithmetic mean of the last ``M_b`` gradient statistics in ``buffer_gz``, running ``ema_gz``, the
    compensation factor ``r``). In eval ``v = running_var``: a per-channel affine. See :class:`normlayers.UnifiedNorm`.

    Args:
        input: ``(B, N, C)`` or ``(B, C)``.
        running_var, ema_gz: ``(C,)`` buffers; buffer_x2 ``(M, C)``, buffer_gz ``(M_b, C)``: the ring buffers;
            iters, skip_counter: one-element integer tensors. All updated in place in training (``ema_gz`` and
            ``buffer_gz`` by the backward).
        weight, bias: ``(C,)``.
        pad_mask: ``(B, N)`` bool, True = padding (``(B,)`` or the official ``(1, B)`` for 2-D input); left out of
            the forward statistic only.
        training, eps, momentum, warmup_iters, outlier_filtration: as the module.
        grad_compensation: apply the factor ``r`` in the backward (the official code). Default: ``True``.
        sync_stats, process_group (keyword-only): in training, with ``torch.distributed`` initialized and more than
            one rank in ``process_group`` (default: the world), ``q`` is over the non-pad tokens of every rank and the
            backward's ``gz`` over every rank's tokens (one all-reduce each; every rank must call, also with no
            tokens), so the ring buffers and every decision are the global batch's. Default: ``False``, ``None``.
    """
    if is_dtensor(input):  # statistics over the tokens of every shard (docs/scaling_out.md)
        return run_on_local_shards(
            unified_norm, "UnifiedNorm", dict(input=input, running_var=running_var, ema_gz=ema_gz,
                                              buffer_x2=buffer_x2, buffer_gz=buffer_gz, iters=iters,
                                              skip_counter=skip_counter, weight=weight, bias=bias, pad_mask=pad_mask),
            params=("weight", "bias"), shardable=_token_dims,
            mask_dim=lambda d: 1 if input.dim() == 2 and pad_mask.dim() == 2 else d,
            training=training, sync_stats=sync_stats, process_group=process_group, eps=eps, momentum=momentum,
            warmup_iters=warmup_iters, outlier_filtration=outlier_filtration, grad_compensation=grad_compensation)
    mask_shape = tuple(input.shape[:-1]) if input.dim() in (2, 3) else ()
    if input.dim() == 2:
        pad_mask = _flat_2d_mask(input, pad_mask, (1, input.shape[0]))
    channels = _check_token_norm_input(input, pad_mask, mask_shape, "(B, N, C)")
    _check_token_norm_state(input, channels, {"running_var": running_var, "ema_gz": ema_gz, "weight": weight,
                                              "bias": bias}, {"iters": iters, "skip_counter": skip_counter},
                            {"buffer_x2": buffer_x2, "buffer_gz": buffer_gz})
    for name, t in (("weight", weight), ("bias", bias), ("running_var", running_var), ("ema_gz", ema_gz)):
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},), got {list(t.shape)}")
    check_epsilon("eps", eps)
    check_running_stats_without_grad(training, running_var=running_var, ema_gz=ema_gz, buffer_x2=buffer_x2,
                                     buffer_gz=buffer_gz)
    check_unit_interval("momentum", momentum)
    check_nonnegative_int("warmup_iters", warmup_iters)
    kwargs = dict(training=training, eps=float(eps), momentum=float(momentum), warmup_iters=int(warmup_iters),
                  outlier_filtration=bool(outlier_filtration), grad_compensation=bool(grad_compensation),
                  sync_group=sync_group_name(sync_stats, process_group, training))
    state = (running_var, ema_gz, buffer_x2, buffer_gz, iters, skip_counter, weight, bias)
    if use_triton(input):
        return _ops_token.unified_norm(input, *state, pad_mask, **kwargs)
    return _ref_unified.unified_norm(input, *state, pad_mask, **kwargs)
