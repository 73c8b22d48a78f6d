"""``fuse_group_norm_act``: fold the activation that directly follows a GroupNorm into it (opt-in model surgery).

Two entry points, both opt-in:

* :func:`fuse_group_norm_act` (in place): inside an ``nn.Sequential`` (the class itself, whose forward calls its
  children in order), a GroupNorm (``nn.GroupNorm``, or :class:`normlayers.GroupNorm` without ``act``) immediately
  followed by ``nn.SiLU``, ``nn.GELU()`` (exact), ``nn.ReLU`` or timm's ``GELU``. The GroupNorm becomes a
  :class:`normlayers.GroupNorm` with ``act`` holding the same parameter objects, and the activation's slot becomes
  ``nn.Identity`` (indices, and so ``state_dict`` keys, are unchanged).
* :func:`fuse_group_norm_act_traced` (a new module per block): a block with its own ``forward``, such as diffusers'
  ``ResnetBlock2D`` (``self.nonlinearity(self.norm1(x))``, the same ``nonlinearity`` module also applied to the time
  embedding), is traced with ``torch.fx``; each GroupNorm call whose only user is one activation call (a module as
  above, or ``F.silu``, ``F.gelu`` (exact), ``F.relu``, ``torch.relu`` on the norm's output alone) is fused, and
  that one activation call is removed from the graph; the activation's other calls stay.

Refused, with a warning, because fusing would change another computation or could not be proven safe: a GroupNorm
reachable under another name too or called twice (shared), a GroupNorm whose output has users besides the activation,
a GroupNorm or activation carrying hooks; for the traced form also a block that does not trace, or carries hooks, or
whose trace drops a parameter or buffer of a nested submodule (one its forward never calls).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from normlayers.nn.group_norm import GroupNorm, activation_name

__all__ = ["fuse_group_norm_act", "fuse_group_norm_act_traced"]

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


def _warn_left_alone(caller: str, where: str, problem: str) -> None:
    warnings.warn(f"{caller}: {where} left alone: {problem}, so fusing the activation into it would change another "
                  f"computation", stacklevel=3)


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
                _warn_left_alone("fuse_group_norm_act", where, problem)
                continue
            new = GroupNorm.from_module(norm, act=act)
            new.train(norm.training)
            setattr(sequential, norm_name, new)
            setattr(sequential, act_name, nn.Identity())
            fused += 1
    if fused:
        logger.info("fuse_group_norm_act: %d GroupNorm + activation pairs fused", fused)
    return model


# Activation functions a traced forward may call on the norm's output alone, with the keyword options that leave the
# function the fused one (`inplace` changes no value: the norm's output has no other user).
_ACTIVATION_FUNCTIONS: dict[Any, tuple[str, dict[str, tuple[Any, ...]]]] = {
    F.silu: ("silu", {"inplace": (False, True)}),
    F.relu: ("relu", {"inplace": (False, True)}),
    torch.relu: ("relu", {}),
    F.gelu: ("gelu", {"approximate": ("none",)}),
}


class _LeafTracer(fx.Tracer):
    """torch's tracer, with normlayers' modules kept as calls (their forwards check arguments, which a Proxy fails)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m).__module__.startswith("normlayers.") or super().is_leaf_module(m, module_qualified_name)


def _traced_act(node: fx.Node, norm_node: fx.Node, modules: dict[str, nn.Module]) -> Optional[str]:
    """The ``act`` name when ``node`` applies a fusable activation to ``norm_node``'s output alone, else ``None``."""
    if node.args != (norm_node,):
        return None
    if node.op == "call_module":
        return None if node.kwargs else _fused_act(modules[node.target])
    if node.op != "call_function" or node.target not in _ACTIVATION_FUNCTIONS:
        return None
    act, options = _ACTIVATION_FUNCTIONS[node.target]
    return act if all(value in options.get(name, ()) for name, value in node.kwargs.items()) else None


def fuse_group_norm_act_traced(block: nn.Module, concrete_args: Optional[dict[str, Any]] = None) -> nn.Module:
    """Fuse each GroupNorm whose output only feeds one activation, in a block with its own ``forward`` (module
    docstring), by tracing the forward with ``torch.fx``. Returns a new ``fx.GraphModule``; ``block`` itself is not
    modified. The GraphModule holds ``block``'s submodules and parameter objects (the fused norms adopt the norms'
    parameters), so its ``state_dict`` keys are ``block``'s; it is a GraphModule, not ``block``'s class, and it
    runs the forward as traced: Python control flow is fixed to the path taken during tracing (pass
    ``concrete_args``, as to ``torch.fx.symbolic_trace``, to trace another path, e.g. ``{"temb": None}``). Returns
    ``block`` itself when nothing is fused: no pattern found, or refused with a warning (untraceable forward, hooks on
    ``block``, a dropped parameter; see the module docstring for the per-norm refusals).

    Example, ``block`` a diffusers-style ResNet block (``self.nonlinearity`` applied after ``norm1``, to ``temb`` and
    after ``norm2``; the call on ``temb`` stays)::

        >>> fused = normlayers.convert.fuse_group_norm_act_traced(block)
        >>> fused.norm1
        GroupNorm(32, 320, eps=1e-05, affine=True, act='silu')

    To fuse the matching blocks of a model, replace them in their parent::

        for name, child in list(model.down_blocks[0].resnets.named_children()):
            setattr(model.down_blocks[0].resnets, name, fuse_group_norm_act_traced(child))
    """
    name = type(block).__name__
    if _has_hooks(block):
        warnings.warn(f"fuse_group_norm_act_traced: {name} left alone: it has hooks, which a traced module would not "
                      f"run", stacklevel=2)
        return block
    try:
        graph = _LeafTracer().trace(block, concrete_args)
    except Exception as error:  # noqa: BLE001 - any failure to trace means: not proven, leave the block alone
        warnings.warn(f"fuse_group_norm_act_traced: {name} left alone: its forward does not trace with torch.fx "
                      f"({type(error).__name__}: {error})", stacklevel=2)
        return block
    traced = fx.GraphModule(block, graph, class_name=f"{name}Fused")
    traced.training = block.training
    # The trace keeps only what the traced path uses; the block's other direct children, parameters and buffers
    # (e.g. a time-embedding projection on a path traced without temb) are kept so that checkpoints still load.
    for attribute in ("_modules", "_parameters", "_buffers"):
        for key, value in getattr(block, attribute).items():
            getattr(traced, attribute).setdefault(key, value)
    if set(traced.state_dict()) != set(block.state_dict()):
        warnings.warn(f"fuse_group_norm_act_traced: {name} left alone: its traced forward does not use every "
                      f"parameter and buffer of a submodule, so the fused module would change the state_dict keys",
                      stacklevel=2)
        return block
    modules = dict(traced.named_modules())
    uses: dict[int, int] = {}
    for _, module in block.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    calls: dict[str, int] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = 0
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not _plain_group_norm(modules[node.target]):
            continue
        norm = modules[node.target]
        users = list(node.users)
        act = _traced_act(users[0], node, modules) if len(users) == 1 else None
        if act is None:
            if any(_traced_act(user, node, modules) is not None for user in users):
                _warn_left_alone("fuse_group_norm_act_traced", f"{name}.{node.target}",
                                 "its output is also used elsewhere")
            continue
        act_node = users[0]
        act_module = modules[act_node.target] if act_node.op == "call_module" else None
        problem = ("it is reachable under several names or called more than once"
                   if uses[id(norm)] > 1 or calls[node.target] > 1 else
                   "it or its activation has hooks" if _has_hooks(norm) or (
                       act_module is not None and _has_hooks(act_module)) else None)
        if problem is not None:
            _warn_left_alone("fuse_group_norm_act_traced", f"{name}.{node.target}", problem)
            continue
        new = GroupNorm.from_module(norm, act=act)
        new.train(norm.training)
        traced.set_submodule(node.target, new)
        act_node.replace_all_uses_with(node)
        traced.graph.erase_node(act_node)
        fused += 1
    if not fused:
        return block
    traced.recompile()
    logger.info("fuse_group_norm_act_traced: %d GroupNorm + activation pairs fused in %s", fused, name)
    return traced
