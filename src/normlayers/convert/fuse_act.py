"""``fuse_group_norm_act``: fold the activation that directly follows a GroupNorm into it (opt-in model surgery).

Recognized: inside an ``nn.Sequential`` (the class itself, whose forward calls its children in order), a GroupNorm
(``nn.GroupNorm``, or :class:`normlayers.GroupNorm` without ``act``) immediately followed by ``nn.SiLU``,
``nn.GELU()`` (exact), ``nn.ReLU`` or timm's ``GELU``. The GroupNorm becomes a :class:`normlayers.GroupNorm` with
``act`` holding the same parameter objects, and the activation's slot becomes ``nn.Identity`` (indices, and so
``state_dict`` keys, are unchanged). Not recognized: norms and activations called from a custom ``forward`` (the
diffusers ``self.nonlinearity(self.norm1(x))`` block; reading a forward's source to prove what it calls is not done).
Refused, with a warning, because the fused module would change another computation: a GroupNorm reachable under
another name too (shared), or a GroupNorm or activation carrying hooks.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

from torch import nn

from normlayers.nn.group_norm import GroupNorm, activation_name

__all__ = ["fuse_group_norm_act"]

logger = logging.getLogger("normlayers")


def _plain_group_norm(module: nn.Module) -> bool:
    return type(module) is nn.GroupNorm or (type(module) is GroupNorm and module.act is None)


def _fused_act(module: nn.Module) -> Optional[str]:
    """The ``act`` name of an activation module the kernels fuse, or ``None`` (also for ``nn.Identity``)."""
    try:
        return activation_name(module)
    except TypeError:
        return None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def fuse_group_norm_act(model: nn.Module) -> nn.Module:
    """Fuse each GroupNorm directly followed by an activation inside an ``nn.Sequential`` (module docstring), in
    place; returns ``model``. The fused module computes ``act(group_norm(x))`` in one kernel chain forward and
    backward on CUDA, without materializing the norm's output for the activation's backward.

    Example::

        >>> block = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(32, 64), nn.SiLU())
        >>> normlayers.convert.fuse_group_norm_act(block)
        Sequential(
          (0): Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
          (1): GroupNorm(32, 64, eps=1e-05, affine=True, act='silu')
          (2): Identity()
        )

    :func:`normlayers.restore_norms` turns a fused module back into ``nn.Sequential(nn.GroupNorm, activation)`` at
    the norm's index (the same function; its parameters' ``state_dict`` keys gain a ``.0``).
    """
    uses: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    fused = 0
    for fqn, sequential in list(model.named_modules()):
        if type(sequential) is not nn.Sequential:
            continue
        children = list(sequential.named_children())
        for (norm_name, norm), (act_name, act_module) in zip(children, children[1:]):
            act = _fused_act(act_module)
            if act is None or not _plain_group_norm(norm):
                continue
            where = f"{fqn}.{norm_name}" if fqn else norm_name
            problem = ("it is reachable under several names" if uses[id(norm)] > 1 else
                       "it or its activation has hooks" if _has_hooks(norm) or _has_hooks(act_module) else None)
            if problem is not None:
                warnings.warn(f"fuse_group_norm_act: {where} left alone: {problem}, so fusing the activation into it "
                              f"would change another computation", stacklevel=2)
                continue
            new = GroupNorm.from_module(norm, act=act)
            new.train(norm.training)
            setattr(sequential, norm_name, new)
            setattr(sequential, act_name, nn.Identity())
            fused += 1
    if fused:
        logger.info("fuse_group_norm_act: %d GroupNorm + activation pairs fused", fused)
    return model
