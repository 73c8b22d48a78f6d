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
from typing import Optional, Sequence

import torch.distributed

__all__ = ["register_sharding_rules_lazily", "is_dtensor"]

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
