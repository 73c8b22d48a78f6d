"""Batch statistics across ranks for the batch-statistic norms (``sync_stats=True``), and :func:`convert_sync`.

A norm that takes statistics over the batch sees, under data parallelism, only its rank's micro-batch. With
``sync_stats=True`` (and in training, with ``torch.distributed`` initialized and more than one rank in the group, as
:class:`torch.nn.SyncBatchNorm`) each rank's per-channel ``(count, mean, M2)`` are exchanged and combined with
Chan's formula (never ``Σx`` / ``Σx²``, which cancels when a channel's mean is large against its spread), so every
rank normalizes with the statistics of the global batch and updates its running buffers identically.

The exchange is an autograd function around ``torch.distributed`` *functional* collectives (traceable by
``torch.compile(fullgraph=True)``, and portable: gloo on CPU, NCCL on CUDA). Forward: each rank writes its row of a
``(world, ...)`` zero buffer and the buffer is all-reduced (an all-gather that needs only ``all_reduce``, which every
backend has, and that keeps counts that differ per rank). Backward — its explicit adjoint: the gradient of the gathered
buffer is all-reduced and each rank keeps its own row, i.e. the gradient of the *sum* of all ranks' losses with respect
to its local statistics, as SyncBatchNorm's all-reduce of ``sum_dy`` / ``sum_dy_xmu``. Parameter gradients are not
touched: DDP/FSDP average them.

Every rank must call the norm the same number of times, also with an empty local batch (``N = 0``: it contributes a
zero count), and each call's backward runs one more collective.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["MomentSync", "all_gather_with_grad", "all_reduce_sum", "convert_sync", "moment_sync", "sync_batch_moments",
           "sync_group", "sync_group_name", "sync_masked_moments"]

# (local mean, local biased var, local count) -> (global mean, global biased var, global count), per channel.
MomentSync = Callable[[Tensor, Tensor, Union[int, Tensor]], tuple[Tensor, Tensor, Union[int, Tensor]]]


def _all_reduce_sum(t: Tensor, group: Any) -> Tensor:
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))


class _AllGatherWithGrad(torch.autograd.Function):
    """``(world, *t.shape)`` from every rank's ``t``; the backward is the adjoint of the gather over all ranks."""

    @staticmethod
    def forward(ctx, t: Tensor, group: Any, rank: int, world: int) -> Tensor:
        ctx.group, ctx.rank = group, rank
        rows = [t if r == rank else torch.zeros_like(t) for r in range(world)]
        return _all_reduce_sum(torch.stack(rows), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce_sum(grad.contiguous(), ctx.group)[ctx.rank], None, None, None


def all_gather_with_grad(t: Tensor, group: Any = None) -> Tensor:
    """Every rank's ``t`` (same shape and dtype on all ranks) stacked to ``(world, *t.shape)``, differentiable: the
    gradient reaching rank ``r``'s ``t`` is the sum over all ranks of the gradients of their gathered copies of it."""
    group = group if group is not None else dist.group.WORLD
    return _AllGatherWithGrad.apply(t, group, dist.get_rank(group), dist.get_world_size(group))


def sync_batch_moments(mean: Tensor, var: Tensor, count: Union[int, Tensor], group: Any = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Combine per-channel moments over the ranks of ``group`` (Chan's formula, in ``mean``'s dtype, fp32 or fp64).

    ``mean``/``var`` (biased) are this rank's, over ``count`` values per channel; with ``count = 0`` they may be NaN
    and are ignored. Returns the global ``(mean, var, count)``, ``count`` per channel as a tensor (no host sync).
    """
    count_t = torch.as_tensor(count, dtype=mean.dtype, device=mean.device).expand_as(mean)
    return _combine_across_ranks(mean, var, count_t, group, empty_as_zero=False)


def _combine_across_ranks(mean: Tensor, var: Tensor, count: Tensor, group: Any, *, empty_as_zero: bool
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's combination over the ranks of ``group`` of this rank's ``(count, mean, biased var)``, elementwise;
    local entries with ``count = 0`` are ignored. Where the global count is 0 the result is ``0/0`` (NaN), or 0 with
    ``empty_as_zero`` (the denominator clamped to 1)."""
    has_values = count > 0
    local_mean = torch.where(has_values, mean, torch.zeros_like(mean))
    local_m2 = torch.where(has_values, var * count, torch.zeros_like(var))
    counts, means, m2s = all_gather_with_grad(torch.stack([count.to(mean.dtype), local_mean, local_m2]),
                                              group).unbind(1)
    total = counts.sum(0)
    denominator = total.clamp_min(1) if empty_as_zero else total
    global_mean = (counts * means).sum(0) / denominator
    global_m2 = m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)
    return global_mean, global_m2 / denominator, total


def moment_sync(sync_stats: bool, process_group: Any, training: bool) -> Optional[MomentSync]:
    """The moment combiner a norm should use now (over :func:`sync_group`'s group), or ``None`` for local
    statistics."""
    group = sync_group(sync_stats, process_group, training)
    return None if group is None else (lambda mean, var, count: sync_batch_moments(mean, var, count, group))


def convert_sync(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Turn on synchronized batch statistics in every normlayers norm of ``model`` that supports them, in place
    (the analogue of :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, without new modules: ``state_dict`` keys
    and parameters are unchanged). Returns ``model``.

    Example::

        >>> model = normlayers.convert_sync(model)        # before wrapping in DDP
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    for module in model.modules():
        if hasattr(module, "sync_stats") and hasattr(module, "process_group"):
            module.sync_stats = True
            module.process_group = process_group
    return model


def sync_group(sync_stats: bool, process_group: Any, training: bool) -> Optional[Any]:
    """The process group a norm should sync its statistics over now, or ``None`` for local statistics: syncing needs
    ``sync_stats``, training, and an initialized process group (default: the world) of more than one rank
    (SyncBatchNorm's rule)."""
    if not (sync_stats and training and dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def sync_masked_moments(mean: Tensor, var: Tensor, count: Tensor, group: Any = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Combine moments over masked subsets across the ranks of ``group`` (Chan's formula), where a subset may be
    empty on some ranks **or on all of them** (RegionNorm's regions).

    ``mean``, ``var`` (biased) and ``count`` have one shape (any), one entry per statistic; where ``count`` is 0 the
    local ``mean``/``var`` are ignored. Returns the global ``(mean, var, count)``; where the global count is 0 the mean
    and variance are 0, with finite gradients (the denominator is clamped to 1, the official ``S[S==0] = 1``), unlike
    :func:`sync_batch_moments`, whose ``0/0`` there would put NaN into the backward. Differentiable like it.
    """
    return _combine_across_ranks(mean, var, count, group, empty_as_zero=True)


def sync_group_name(sync_stats: bool, process_group: Any, training: bool) -> Optional[str]:
    """:func:`sync_group`'s group by name: a name can be an argument of a custom op (the transformer norms' ops
    all-reduce in their registered backward), a group object cannot."""
    group = sync_group(sync_stats, process_group, training)
    return None if group is None else group.group_name


def all_reduce_sum(t: Tensor, group: Any = None) -> Tensor:
    """``t`` summed over the ranks of ``group`` (a group or its name; default: the world) with a functional collective
    (traceable), without gradient: for statistics that carry none (SPDBatchNorm's detached barycenter and dispersion;
    PowerNorm's and UnifiedNorm's, whose backward is the method's own)."""
    with torch.no_grad():
        return _all_reduce_sum(t.contiguous(), group if group is not None else dist.group.WORLD)
