"""Which implementation of a layer runs: the Triton kernels, the CPU tier or the plain-PyTorch reference.

* ``"auto"`` (the default): the Triton kernels for CUDA tensors when ``triton`` imports, the CPU tier
  (:mod:`normlayers.cpu`: ATen's fused kernels and closed-form autograd Functions) for CPU tensors, the
  reference otherwise.
* ``"triton"``: always the kernels. On CPU tensors they run only under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before ``triton`` is first imported); without it a clear ``RuntimeError`` is raised.
* ``"reference"``: always the reference.

The choice is process-wide: :func:`set_backend`, the context manager :func:`backend`, or the environment variable
``NORMLAYERS_BACKEND`` read at import. It is never a constructor argument, so a model does not change when it moves
between machines.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from typing import Iterator

import torch

from normlayers._checks import check_choice

__all__ = ["BACKENDS", "set_backend", "get_backend", "backend", "use_triton", "tier", "triton_available",
           "interpreter_enabled"]

BACKENDS = ("auto", "triton", "reference")


def _validate(name: object, source: str = "backend") -> str:
    return check_choice(source, name, BACKENDS)


# A plain module global (not a ContextVar) so that torch.compile can read it and guard on it.
_current: str = _validate(os.environ.get("NORMLAYERS_BACKEND", "auto"), "the environment variable NORMLAYERS_BACKEND")


def set_backend(name: str) -> None:
    """Set the process-wide backend: ``"auto"``, ``"triton"`` or ``"reference"``."""
    global _current
    _current = _validate(name)


def get_backend() -> str:
    """Return the current backend name."""
    return _current


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside a ``with`` block, then restore the previous one.

    Example::

        with normlayers.backend("reference"):
            y = layer(x)
    """
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def interpreter_enabled() -> bool:
    """Whether the Triton interpreter is on (it runs ``@triton.jit`` kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether ``triton`` is installed (checked once, at import)."""
    return _TRITON_AVAILABLE


def use_triton(x: torch.Tensor) -> bool:
    """Decide, for a call whose main input is ``x``, whether the Triton kernels run.

    Raises ``RuntimeError`` when the backend is ``"triton"`` but the kernels cannot run on ``x``.
    """
    name = _current
    if name == "reference":
        return False
    if name == "auto":
        return x.is_cuda and triton_available()  # (is_cuda: 60 ns; x.device.type builds a device, 600 ns)
    if not triton_available():
        raise RuntimeError("normlayers backend 'triton' was requested but the 'triton' package is not installed")
    if x.device.type == "cuda":
        return True
    if x.device.type == "cpu" and interpreter_enabled():
        return True
    raise RuntimeError(
        f"normlayers backend 'triton' cannot run on a {x.device.type} tensor: the kernels need a CUDA device, or CPU "
        "tensors with the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported). "
        "Use normlayers.set_backend('auto') or 'reference' instead."
    )


def tier(x: torch.Tensor, *, has_kernels: bool = True) -> str:
    """The implementation that runs a call whose main input is ``x``: ``"triton"`` (see :func:`use_triton`),
    ``"cpu"`` (backend ``"auto"`` on a CPU tensor) or ``"reference"``. An op with no Triton kernel
    (``has_kernels=False``) runs the reference where it would run them."""
    if _current == "auto" and x.is_cpu:  # first: the CPU tier's every call, decided without use_triton
        return "cpu"
    if has_kernels and use_triton(x):
        return "triton"
    return "reference"
