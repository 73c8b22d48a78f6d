"""Registers the custom ops' DTensor sharding rules (:mod:`normlayers.ops.sharding`) when DTensor is in use, without
importing ``torch.distributed.tensor`` (slow) in a process that never uses it.

:func:`register_sharding_rules_lazily` (called by ``import normlayers``) registers them at once when
``torch.distributed.tensor`` is already imported, and otherwise right after it is first imported, by an import hook
that removes itself. Every DTensor (``parallelize_module``, ``fully_shard``, ``distribute_tensor``) needs that module,
so the rules are in place before any DTensor can reach an op, in eager mode and under ``torch.compile`` alike.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed
from torch import Tensor

__all__ = ["register_sharding_rules_lazily", "is_dtensor", "run_on_local_shards"]

_DTENSOR_MODULE = "torch.distributed.tensor"


def _register() -> None:
    import normlayers.ops.sharding  # noqa: F401  (registers on import)


class _AfterDTensorImport(importlib.abc.MetaPathFinder):
    """Finds ``torch.distributed.tensor`` like the default finder, with a loader that registers the rules once the
    module has executed."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None):
        if fullname != _DTENSOR_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module: ModuleType) -> None:
                exec_module(module)
                _register()

            spec.loader.exec_module = exec_then_register
        return spec


def is_dtensor(x: object) -> bool:
    """Whether ``x`` is a DTensor, without importing ``torch.distributed.tensor`` (no DTensor exists before it is)."""
    if _DTENSOR_MODULE not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def register_sharding_rules_lazily() -> None:
    """Register the sharding rules now if DTensor is imported, else when it is; nothing without torch.distributed."""
    if not torch.distributed.is_available():
        return
    if _DTENSOR_MODULE in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterDTensorImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterDTensorImport())


def _sharded_dim(placement: object, ndim: int) -> Optional[int]:
    """The tensor dim a placement shards (``Shard`` and DTensor's strided shard), non-negative; else ``None``."""
    dim = getattr(placement, "dim", None)
    return None if dim is None else dim % ndim


def run_on_local_shards(norm: Callable[..., Tensor], layer: str, args: dict[str, Any], *, params: tuple[str, ...],
                        shardable: Callable[[int], range], training: bool, sync_stats: bool, process_group: Any,
                        mask_dim: Optional[Callable[[int], int]] = None, **options: Any) -> Tensor:
    """A batch-statistic layer (PowerNorm, UnifiedNorm, SPDBatchNorm) of a DTensor ``args["input"]``, with the
    statistics of the global batch.

    These layers update running buffers from statistics over the whole batch, in the forward and (the token norms)
    in the method's own backward, and already have the synced-statistics path of data parallelism. The input may be
    sharded along the dims of ``shardable(input.dim())`` (batch, sequence: the dims the statistics run over).
    ``norm`` (the functional, called with plain tensors) runs on the local shards with synced statistics:

    * without the layer's ``sync_stats``, over the process group of the one mesh dim on which the input is sharded
      (replicated on the others; a replicated input runs as is), so every rank normalizes with, and updates its
      buffers from, the statistics of the whole DTensor;
    * with ``sync_stats`` (e.g. FSDP2 over ``dp`` × tensor parallelism over ``tp``, :func:`normlayers.convert_sync`),
      over the layer's process group, which must contain every rank holding a shard and no two ranks holding the same
      tokens (:func:`_check_sync_group`): the statistics of the global batch of every data-parallel rank.

    The output is placed like the input. ``args`` are the functional's tensor arguments by name (``input``,
    ``pad_mask``, parameters, buffers); ``params`` names the learnable ones, which must be replicated DTensors (their
    gradients come out ``Partial`` over the sharded mesh dims, as DTensor makes them for torch's norms); buffers may
    be plain tensors or replicated DTensors (updated in place either way). A DTensor ``pad_mask`` is redistributed
    like the input, its dim ``mask_dim(d)`` taking the input's dim ``d``. Refused with a ValueError naming the layer
    and the placement: other sharded dims, several sharded mesh dims without ``sync_stats``, and a sync group that
    misses a shard or holds the same tokens twice.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate

    from normlayers.distributed import sync_group

    x = args["input"]
    mesh = x.device_mesh
    if any(isinstance(p, Partial) for p in x.placements):
        x = x.redistribute(mesh, [Replicate() if isinstance(p, Partial) else p for p in x.placements])
    sharded = [(mesh_dim, _sharded_dim(p, x.dim())) for mesh_dim, p in enumerate(x.placements)
               if _sharded_dim(p, x.dim()) is not None]
    where = f"input of shape {list(x.shape)} placed {tuple(x.placements)} on {mesh}"
    allowed = list(shardable(x.dim()))
    for _, dim in sharded:
        if dim not in allowed:
            raise ValueError(f"{layer}: the {where} is sharded along dim {dim}; the layer takes shards of the dims its "
                             f"batch statistics run over only, dims {allowed}: Replicate() dim {dim} before the layer")
    sharded_mesh_dims = [mesh_dim for mesh_dim, _ in sharded]
    group = sync_group(sync_stats, process_group, training)
    if group is not None:  # the layer's own group, e.g. dp × tp ranks under FSDP2 × tensor parallelism
        _check_sync_group(layer, where, mesh, sharded_mesh_dims, group)
    elif len(sharded_mesh_dims) > 1:
        raise ValueError(f"{layer}: the {where} is sharded on {len(sharded_mesh_dims)} mesh dims; without sync_stats "
                         f"its statistics are all-reduced over one mesh dim: replicate the others, or set "
                         f"sync_stats=True (normlayers.convert_sync) with a process group of every rank of the mesh")
    elif sharded_mesh_dims:
        sync_stats, process_group = True, mesh.get_group(sharded_mesh_dims[0])
    grad_placements = [Partial() if mesh_dim in sharded_mesh_dims else Replicate() for mesh_dim in range(mesh.ndim)]
    local: dict[str, Any] = {"input": x.to_local()}
    for name, t in args.items():
        if name == "input":
            continue
        if t is None:
            local[name] = None
        elif name == "pad_mask":
            local[name] = _local_pad_mask(t, x, mask_dim, layer, where)
        elif isinstance(t, DTensor):
            if t.device_mesh != mesh or any(p != Replicate() for p in t.placements):
                raise ValueError(f"{layer}: {name} must be replicated on the input's mesh ({where}), got "
                                 f"{tuple(t.placements)} on {t.device_mesh}")
            if name in params:
                local[name] = t.to_local(grad_placements=grad_placements)
            else:
                with torch.no_grad():  # the buffer's own storage, updated in place by the layer
                    local[name] = t.to_local()
        elif name in params and t.requires_grad:
            raise TypeError(f"{layer}: {name} is a torch.Tensor but the input is a DTensor; replicate the "
                            f"parameters on its mesh (e.g. distribute_module(layer, mesh))")
        else:
            local[name] = t
    y = norm(**local, training=training, sync_stats=sync_stats, process_group=process_group, **options)
    return DTensor.from_local(y, mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride())


def _check_sync_group(layer: str, where: str, mesh: Any, sharded_mesh_dims: list[int], group: Any) -> None:
    """With ``sync_stats`` on a DTensor input, the statistics are summed over ``group``: it must hold every shard of
    the input, and no two of its ranks the same tokens (ranks of a mesh dim on which the input is replicated)."""
    members = set(torch.distributed.get_process_group_ranks(group))
    for mesh_dim in range(mesh.ndim):
        ranks = set(torch.distributed.get_process_group_ranks(mesh.get_group(mesh_dim)))
        if mesh_dim in sharded_mesh_dims and not ranks <= members:
            raise ValueError(f"{layer}: sync_stats=True with the {where}: its process group must contain every rank "
                             f"holding a shard of the input (mesh dim {mesh_dim}: ranks {sorted(ranks)}), e.g. the "
                             f"default group (the world)")
        if mesh_dim not in sharded_mesh_dims and len(ranks & members) > 1:
            raise ValueError(f"{layer}: sync_stats=True with the {where}: ranks {sorted(ranks & members)} of its "
                             f"process group hold the same tokens (the input is replicated on mesh dim {mesh_dim}) "
                             f"and would count them twice; sync over a group with one rank of that mesh dim")


def _local_pad_mask(pad_mask: Tensor, x: Any, mask_dim: Callable[[int], int], layer: str, where: str) -> Tensor:
    """This rank's part of ``pad_mask`` for the local shard of the DTensor ``x``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(pad_mask, DTensor):
        if any(_sharded_dim(p, x.dim()) is not None for p in x.placements):
            raise TypeError(f"{layer}: pad_mask must be a DTensor on the input's mesh when the input is sharded "
                            f"({where}), got a torch.Tensor")
        return pad_mask
    placements = []
    for p in x.placements:
        if type(p) not in (Shard, Replicate):
            raise ValueError(f"{layer}: pad_mask cannot follow the placement {p} of the {where}; pass the input "
                             f"sharded with Shard(dim) or Replicate()")
        placements.append(Shard(mask_dim(p.dim % x.dim())) if isinstance(p, Shard) else p)
    return pad_mask.redistribute(x.device_mesh, placements).to_local()
