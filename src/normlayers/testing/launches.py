"""Kernel launches of one call, counted without a GPU: ``torch.profiler`` on the CPU under the Triton interpreter.

Counted as launches: every Triton kernel launch, plus every *leaf* ATen op (no ATen op beneath it) outside a Triton
launch that would launch a CUDA kernel. An ATen op does not launch when it only allocates (``empty*``), when its
results only alias its inputs without writing them (views, ``reshape``, ``detach``, a no-op ``to``), or when it
returns no tensor. ``aten::item`` / ``aten::_local_scalar_dense`` are counted apart, as host syncs.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

__all__ = ["LaunchCount", "count_launches"]

SYNC_OPS = frozenset({"aten::item", "aten::_local_scalar_dense"})
ALLOCATING_OPS = frozenset({"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                            "aten::new_empty_strided", "aten::resize_", "aten::set_", "aten::lift_fresh"})
TRITON_RANGE = "triton::"


@dataclass
class LaunchCount:
    """The launches of one call: Triton kernels and launching ATen ops by name, and host syncs."""

    triton: list[str] = field(default_factory=list)
    aten: list[str] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return len(self.triton) + len(self.aten)


@contextlib.contextmanager
def _named_triton_launches() -> Iterator[None]:
    """Name every interpreted Triton launch ``triton::<kernel>`` in the profiler trace."""
    from torch.profiler import record_function
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        with record_function(TRITON_RANGE + self.fn.__name__):
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


@functools.lru_cache(maxsize=None)
def _aten_op_launches(name: str) -> bool:
    """Whether ATen op ``name`` can launch a kernel: it returns a tensor that is not a pure alias of an input."""
    if name in ALLOCATING_OPS or name in SYNC_OPS:
        return False
    packet = getattr(torch.ops.aten, name.split("::", 1)[1], None)
    if packet is None:
        return True
    for overload in packet.overloads():
        tensors = [r for r in getattr(packet, overload)._schema.returns if "Tensor" in str(r.type)]
        if any(r.alias_info is None or r.alias_info.is_write for r in tensors):
            return True
    return False


def _inside_triton(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(TRITON_RANGE):
            return True
        parent = parent.cpu_parent
    return False


def count_launches(fn: Callable[[], object]) -> LaunchCount:
    """Launches of one call of ``fn`` (module docstring). Needs the Triton interpreter (``TRITON_INTERPRET=1``)
    for the Triton launches to be seen; run ``fn`` once before, so that one-time work is not counted."""
    from torch.profiler import ProfilerActivity, profile

    with _named_triton_launches(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = LaunchCount()
    for event in prof.events():
        if event.name.startswith(TRITON_RANGE):
            if not _inside_triton(event):
                count.triton.append(event.name[len(TRITON_RANGE):])
        elif not event.name.startswith("aten::") or _inside_triton(event):
            continue
        elif event.name in SYNC_OPS:
            # _local_scalar_dense sits under item: count the outermost of the pair only.
            if event.cpu_parent is None or event.cpu_parent.name not in SYNC_OPS:
                count.syncs.append(event.name)
        elif not any(child.name.startswith("aten::") for child in event.cpu_children) \
                and _aten_op_launches(event.name):
            count.aten.append(event.name)
    return count
