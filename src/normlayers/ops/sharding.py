"""DTensor sharding rules for every ``normlayers::*`` custom op (tensor/sequence parallelism with ``DTensor``).

A custom op called with :class:`~torch.distributed.tensor.DTensor` arguments needs a rule saying which placements of
its inputs it accepts and what placements its outputs then have; without one DTensor refuses the op ("does not have
a sharding strategy registered"). The rules here, registered with
:func:`torch.distributed.tensor.experimental.register_sharding` (experimental, present since torch 2.5; tested with
torch 2.13 only), let each op run on its local shards with no communication wherever its math allows:

* **Row norms** (``row_norm_fwd``/``_bwd``, on the ``(rows, normalized size)`` view the layers pass them): the rows
  may be sharded in any way — ``Shard(0)``, or the strided shard DTensor makes when a sharded sequence dim of a
  ``(batch, seq, hidden)`` input is flattened into the rows — and stay so; weight and bias are replicated; the
  backward's ``dweight``/``dbias`` come out ``Partial`` (summed when DTensor reduces them, as for torch's norms). A
  sharded normalized dim is refused: a row's statistic would need values held by other ranks.
* **Per-plane ops** (``plane_*``, ``(N, C, *spatial)`` with ``(N, C)`` coefficients): sharded on the batch or the
  channel dim; every statistic is per plane, so all stay local. Sharded spatial dims are refused.
* **Region ops** (``region_*``): sharded on the batch dim (the mask ``hole`` alike). Other dims are refused.
* **Per-pixel channel norms** (``channel_norm_fwd``/``_bwd``, LayerNorm2d/RMSNorm2d on ``(N, C, H, W)``): sharded on
  the batch dim; weight and bias replicated, ``dweight``/``dbias`` ``Partial``. Sharded channels are refused (a
  pixel's statistics span them), and so are sharded spatial dims (the per-pixel statistics are kept flattened to
  ``(N, H·W)``).
* **EvoNorm-S statistics** (``evo_norm_s_pass``, ``evo_norm_s_finalize_bwd``, per-plane ``(N, C)`` moments to
  per-sample group coefficients): sharded on the batch dim; parameters replicated, their gradients ``Partial``.
  Sharded channels are refused: a group spans several channels.
* **GroupNorm** (``group_norm_fwd``/``_bwd``/``_inference``, ``(N, C, *spatial)`` with ``(N, G)`` statistics):
  sharded on the batch dim; weight and bias replicated, ``dweight``/``dbias`` ``Partial``. Sharded channels or
  spatial dims are refused.
* **Token ops** (``token_square_sum``, ``token_grad_sums``, ``channel_affine*``, ``power_norm_train``,
  ``unified_norm_train``, on token rows ``(R, C)``): the rows may be sharded (batch or sequence); the per-channel
  sums over rows come out ``Partial``. Sharded channels are refused. The layers themselves never pass DTensors to
  these ops: PowerNorm and UnifiedNorm run DTensor inputs on the local shards with synced statistics
  (:func:`normlayers._dtensor.run_on_local_shards`), so ``step_snapshot`` (their per-step copies) and their fused
  ops (``token_moments``, ``token_affine``, ``token_grad``, the finalize ops, ``unified_norm_dx``) refuse DTensors.
* **Fused batch-statistic ops** (``batch_channel_finalize``, ``evo_norm_b_finalize``, their backward, the eval
  passes ``batch_channel_eval`` and ``evo_norm_b_eval``; RegionNorm's ``region_stats``, ``region_finalize``,
  ``region_normalize`` and ``region_normalize_bwd``) refuse DTensors: they take the batch's statistics from their
  inputs alone. BatchChannelNorm2d, EvoNorm-B and RegionNorm route DTensor inputs to their unfused compositions
  instead (next paragraph).

Batch statistics need no rule of their own: the compositions reduce ``Partial``/sharded per-plane or per-row values
with ordinary torch ops, which DTensor reduces across the shard group, so a batch-statistic layer fed a DTensor
sharded on its batch normalizes with the statistics of the whole (global) batch. Inputs that are plain tensors (DDP,
FSDP2) keep the local statistics unless ``sync_stats=True``/:func:`normlayers.convert_sync`.

This module imports ``torch.distributed.tensor`` (slow to import), so ``import normlayers`` does not import it:
:mod:`normlayers._dtensor` imports it as soon as DTensor itself is imported. One private piece of DTensor is used:
the ``RuntimeSchemaInfo`` of each op is widened so that DTensor's cache of sharding decisions keys on the non-tensor
arguments (see :func:`_register`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
from torch.distributed.tensor.experimental import register_sharding

# The ops must be registered before their rules.
from normlayers.ops import (  # noqa: F401
    batch_channel, channel_norms, channel_stats, evo_norm, group_norm, region_norm, row_norms, token_stats)

__all__: list[str] = []


def _shard_dim(placement: Any) -> Optional[int]:
    """The tensor dim a placement shards (``Shard``, and the strided shard of a flattened dim), else ``None``."""
    return getattr(placement, "dim", None)


# Per op family: the dims of the data arguments that may be sharded and what sharding another dim would split.
_DATA_DIMS: dict[str, tuple[tuple[int, ...], str]] = {
    "row": ((0,), "the normalized dims (flattened): a row's statistic would need values held by other ranks"),
    "plane": ((0, 1), "a spatial dim: a plane's statistics would need values held by other ranks"),
    "region": ((0,), "a channel or spatial dim: the region statistics are taken here per sample only"),
    "token": ((0,), "the channels: the layer's statistics are per channel over token rows, sharded rows only"),
    "pixel": ((0,), "a channel or spatial dim: a pixel's statistics are over all channels, and the per-pixel mean and "
                    "rstd are kept flattened to (N, H·W)"),
    "sample_group": ((0,), "a channel or spatial dim: a sample's group statistics span several channels and every "
                           "spatial position"),
}
# The families whose rows may come from flattened (batch, seq) dims.
_FLATTENED_ROWS = ("row", "token")


def _shardings(family: str, spec: Any) -> list[Any]:
    """The shardings to offer, given the first data argument's spec: ``Shard(d)`` for each dim the family may shard;
    for row families also the row placements ``spec`` has (a strided shard after a sharded sequence dim was
    flattened into the rows)."""
    shardings = [Shard(dim) for dim in _DATA_DIMS[family][0]]
    if family in _FLATTENED_ROWS:
        shardings += [p for p in spec.placements if _shard_dim(p) == 0 and p not in shardings]
    return shardings


# Per op: its family, and one letter per argument and per output: "d" a data tensor (placed like the sharding),
# "r" replicated, "p" a sum over the sharded data (Partial on shards), "-" not a tensor. The ops of _DATA_ONLY are
# added at registration.
_RULES: dict[str, tuple[str, str, str]] = {
    "row_norm_fwd": ("row", "ddrr----", "dddd"),  # (y, residual_out, mean, rstd): all per row
    "row_norm_bwd": ("row", "dddrdd---", "dpp"),  # (dh, dweight, dbias)
    "token_square_sum": ("token", "dd", "p"),
    "token_grad_sums": ("token", "ddrr", "pd"),  # ((3, C) sums, dx)
    "channel_affine": ("token", "drr-", "d"),
    "channel_affine2": ("token", "drdr", "d"),
    "power_norm_train": ("token", "drrrrr---", "d"),
    "unified_norm_train": ("token", "drrrrrrrr---", "d"),
    "channel_norm_fwd": ("pixel", "drr--", "ddd"),  # (y, mean, rstd): mean/rstd (N, H·W)
    "channel_norm_bwd": ("pixel", "ddrdd--", "dpp"),  # (dx, dweight, dbias)
    "evo_norm_s_pass": ("sample_group", "dddrrr-----", "ddd"),  # (y, slope, scale)
    "evo_norm_s_finalize_bwd": ("sample_group", "dddddrrr----", "ddppp"),  # (dplane_mean, dplane_var, dweight, ...)
    "group_norm_fwd": ("sample_group", "drr---", "ddd"),  # (y, mean, rstd): mean/rstd (N, G)
    "group_norm_bwd": ("sample_group", "ddrrdd--", "dpp"),  # (dx, dweight, dbias)
    "group_norm_inference": ("sample_group", "drr---", "d"),
}

# Per family, the ops whose every tensor (argument or output) is data placed like the sharding: statistics per plane
# or per sample, nothing replicated or summed. Their letters come from the schema (see _data_only_roles).
_DATA_ONLY: dict[str, tuple[str, ...]] = {
    "plane": ("plane_moments", "plane_moments_bwd", "plane_affine", "plane_affine_bwd", "plane_swish_affine",
              "plane_swish_affine_bwd", "plane_max_div_affine", "plane_max_div_affine_bwd"),
    "region": ("region_moments", "region_moments_bwd", "region_affine", "region_affine_bwd"),
}


def _placement(role: str, sharding: Any) -> Optional[Any]:
    if role == "d":
        return sharding
    if role == "p":
        return Replicate() if sharding == Replicate() else Partial()
    return Replicate() if role == "r" else None


def _make_rule(name: str, family: str, inputs: str, outputs: str) -> Callable[..., list]:
    allowed, meaning = _DATA_DIMS[family]
    schema = getattr(torch.ops.normlayers, name).default._schema
    if (len(inputs), len(outputs)) != (len(schema.arguments), len(schema.returns)):
        raise AssertionError(f"the sharding rule of normlayers::{name} does not match its schema {schema}")
    argument_names = [a.name for a in schema.arguments]

    def rule(*args: Any) -> list:
        data = [(argument_names[i], a) for i, (role, a) in enumerate(zip(inputs, args))
                if role == "d" and a is not None]
        for arg_name, spec in data:
            for placement in spec.placements:
                dim = _shard_dim(placement)
                if dim is not None and dim not in allowed:
                    raise ValueError(
                        f"normlayers::{name}: {arg_name} is sharded along dim {dim} of its {list(spec.shape)} "
                        f"({meaning}); this op can be sharded only along dim(s) {list(allowed)}. Redistribute "
                        f"the layer's input (e.g. Replicate() on that mesh dim) before the layer.")
        strategies = []
        for sharding in [Replicate(), *_shardings(family, data[0][1])]:
            strategies.append(([_placement(role, sharding) for role in outputs],
                               [None if a is None else _placement(role, sharding)
                                for role, a in zip(inputs, args)]))
        return strategies

    return rule


def _refusal(name: str, layers: str, how: str) -> Callable[..., list]:
    """A rule refusing every DTensor call of ``normlayers::{name}``, for ops that need statistics over the whole
    batch, which the shards alone do not have."""

    def refuse(*args: Any) -> list:
        raise ValueError(
            f"normlayers::{name}: this op of {layers} does not take DTensors (its statistics would be the shard's, "
            f"not the whole batch's); {how} (see the normlayers docs, 'Scaling out').")

    return refuse


# Ops never reached with DTensors: the token layers' step_snapshot and fused ops (the layers run on local shards); the
# fused batch-statistic ops, whose layers take the unfused composition (DTensor reduces its per-plane statistics).
_REFUSED: dict[str, tuple[str, str]] = {
    **{name: ("BatchChannelNorm2d and EvoNorm-B", "their layers route DTensor inputs to the unfused composition, so "
              "call the layer, not this op") for name in ("batch_channel_finalize", "batch_channel_finalize_bwd",
                                                         "batch_channel_eval", "evo_norm_b_finalize",
                                                         "evo_norm_b_finalize_bwd", "evo_norm_b_eval")},
    **{name: ("RegionNorm2d and LearnableRegionNorm2d", "their layers route DTensor inputs to the composition of "
              "region_moments and region_affine, so call the layer, not this op")
       for name in ("region_stats", "region_finalize", "region_normalize", "region_normalize_bwd",
                    "learnable_region_norm_fwd", "learnable_region_norm_bwd")},
    **{name: ("PowerNorm and UnifiedNorm", "the layers (and normlayers.functional) run DTensor inputs on their "
              "local shards with synced statistics, so call the layer, not this op")
       for name in ("step_snapshot", "token_moments", "power_norm_finalize", "unified_norm_finalize", "token_affine",
                    "token_grad", "power_norm_finalize_bwd", "unified_norm_finalize_bwd", "unified_norm_dx")},
}


def _is_tensor_type(t: Any) -> bool:
    t = t.getElementType() if isinstance(t, torch.OptionalType) else t
    return isinstance(t, torch.TensorType) or (isinstance(t, torch.ListType) and _is_tensor_type(t.getElementType()))


def _data_only_roles(name: str) -> tuple[str, str]:
    """The letters of an op of _DATA_ONLY: "d" for every tensor argument and output, "-" for the others."""
    schema = getattr(torch.ops.normlayers, name).default._schema
    return "".join("d" if _is_tensor_type(a.type) else "-" for a in schema.arguments), "d" * len(schema.returns)


def _register(name: str, rule: Callable[..., list]) -> None:
    op = getattr(torch.ops.normlayers, name).default
    register_sharding(op)(rule)
    # register_sharding keys DTensor's cache of sharding decisions on the tensor specs and on int arguments only, but
    # the non-tensor arguments of these ops change the outputs' shapes and dtypes (row_norm_fwd's `kind` decides
    # whether `mean` is empty, `out_dtype` the output dtype): every argument from the first non-tensor one on is part
    # of the key.
    arguments = op._schema.arguments
    first_static = next((i for i, a in enumerate(arguments) if not _is_tensor_type(a.type)), len(arguments))
    DTensor._op_dispatcher.sharding_propagator.op_to_schema_info[op] = RuntimeSchemaInfo(first_static,
                                                                                          needs_pytree=True)


_RULES.update({name: (family, *_data_only_roles(name)) for family, names in _DATA_ONLY.items() for name in names})
for _name, (_family, _inputs, _outputs) in _RULES.items():
    _register(_name, _make_rule(_name, _family, _inputs, _outputs))
for _name, (_layers, _how) in _REFUSED.items():
    _register(_name, _refusal(_name, _layers, _how))
