"""What the layers' ``from_module`` constructors share: take over another module's Parameter and buffer objects.

The new module is built on the ``meta`` device and *adopts* the old module's tensors (the pattern of torchao's
``from_float``), so device, dtype, ``requires_grad``, weight tying and optimizer references survive and
``state_dict`` keys can stay the same. Tensors the old module lacked are then filled on its device and dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["adopt", "adopt_same_names", "factory_kwargs_of", "fill_missing"]


def adopt(new: nn.Module, old: nn.Module, names: Mapping[str, str]) -> None:
    """Make ``new.<new_name>`` the very Parameter/buffer object ``old.<old_name>`` for each pair (dotted names)."""
    for new_name, old_name in names.items():
        old_owner, _, old_leaf = old_name.rpartition(".")
        new_owner, _, new_leaf = new_name.rpartition(".")
        src = old.get_submodule(old_owner) if old_owner else old
        dst = new.get_submodule(new_owner) if new_owner else new
        if old_leaf in src._parameters:
            dst._parameters[new_leaf] = src._parameters[old_leaf]
        else:
            dst._buffers[new_leaf] = src._buffers[old_leaf]


def adopt_same_names(new: nn.Module, old: nn.Module) -> None:
    """Adopt every direct parameter of ``old`` under the same name (the row norms' and convs' case)."""
    adopt(new, old, {name: name for name, _ in old.named_parameters(recurse=False)})


def factory_kwargs_of(module: nn.Module) -> dict[str, Any]:
    """``{"device", "dtype"}`` of the module's first parameter (or buffer); empty if it holds no tensor."""
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}


def fill_missing(new: nn.Module, like: nn.Module, values: Mapping[str, float]) -> None:
    """Give the tensors of ``new`` named in ``values`` (still on meta: ``like`` had no counterpart) ``like``'s device
    and dtype, filled with ``values[name]``."""
    factory = factory_kwargs_of(like)
    for name, value in values.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = new.get_submodule(owner_name) if owner_name else new
        is_parameter = leaf in owner._parameters
        placeholder = (owner._parameters if is_parameter else owner._buffers)[leaf]
        filled = torch.full(placeholder.shape, value, **{"dtype": placeholder.dtype, **factory})
        if is_parameter:
            owner._parameters[leaf] = nn.Parameter(filled, placeholder.requires_grad)
        else:
            owner._buffers[leaf] = filled
