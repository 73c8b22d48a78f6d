"""The C++ autograd node of the compiled CPU kernels (``cpu/csrc/autograd.cpp``), built at first use and cached.

A Python ``autograd.Function`` costs a training step of a compiled kernel more than the kernel wins where the caches
are cold (a layer called right after others): 100-200 µs per GroupNorm step at diffusion shapes on a Zen 4 core,
where eager PyTorch's C++ node costs about nothing (docs/backend.md). ``autograd.cpp`` is that node in C++: a torch
extension (``torch.utils.cpp_extension.load``, built with ninja and the host's C++ compiler, about half a minute
once, under :func:`normlayers.cpu._native`'s cache directory, keyed by the source, torch's version and the compiler's)
that calls the C kernels of :mod:`normlayers.cpu._native` through their addresses. It also holds GroupNorm's whole
call (``group_norm_call``: the checks the kernels need, the kernel, the node), which
``normlayers.functional.group_norm`` tries first: its Python path to the same kernels took 26-156 µs more per call
where the caches were cold (docs/backend.md).

Where it cannot be built (no ninja or C++ compiler, a failed build: a warning says so once), where the C kernels are
off (``NORMLAYERS_CPU_KERNELS=0``) or with ``NORMLAYERS_CPU_AUTOGRAD=0`` at import, :func:`module` returns ``None``
and the tier runs its Python ``autograd.Function`` around the same kernels (the same results).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch

from normlayers.cpu import _native

__all__ = ["module"]

_SOURCE = Path(__file__).with_name("csrc") / "autograd.cpp"
_ENABLED = os.environ.get("NORMLAYERS_CPU_AUTOGRAD", "1") != "0"
_LOCK = threading.Lock()
_MODULE: list[Optional[ModuleType]] = []  # empty until the first call; then the module or None


def _kernel_addresses() -> Optional[tuple[int, ...]]:
    """The addresses of the GroupNorm and LayerNorm kernels, or ``None`` where one is unavailable."""
    from normlayers.cpu import group_norm, row_norms  # (they import this module)

    kernels = (group_norm._nchw_forward_kernel(), group_norm._nchw_backward_kernel(), group_norm._forward_kernel(),
               group_norm._backward_kernel(), row_norms._native_row_norm_kernel(), row_norms._layer_norm_kernel())
    if any(k is None for k in kernels):
        return None
    return tuple(ctypes.cast(k, ctypes.c_void_p).value for k in kernels)


def _build() -> Optional[ModuleType]:
    from torch.utils import cpp_extension

    source = _SOURCE.read_bytes()
    compiler = os.environ.get("CXX", "c++")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join((source, torch.__version__.encode(), version.encode()))).hexdigest()[:16]
    directory = _native.cache_dir() / f"autograd-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(f"normlayers_cpu_autograd_{key}", [str(_SOURCE)], extra_cflags=["-O2"],
                              build_directory=str(directory), verbose=False)


def module() -> Optional[Any]:
    """The built extension, its kernels set (``group_norm(x, weight, bias, groups, eps, act, channels_last)``,
    ``group_norm_call(input, num_groups, weight, bias, eps, act)``, ``layer_norm(x, weight, bias, eps, fallback)``),
    or ``None`` where it is unavailable (module docstring)."""
    if not _native.enabled():  # (read on every call: the switch is also the tests' way to the ATen path)
        return None
    if _MODULE:
        return _MODULE[0]
    with _LOCK:
        if not _MODULE:
            extension = None
            addresses = _kernel_addresses() if _ENABLED else None
            if addresses is not None:
                try:
                    extension = _build()
                    extension.set_kernels(*addresses)
                    extension.set_types(torch.Tensor, torch.nn.Parameter)
                except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as error:
                    warnings.warn(f"normlayers: the C++ autograd node of the CPU kernels is unavailable, so their "
                                  f"calls go through Python, in training a Python autograd.Function (slower, same "
                                  f"results): {error}",
                                  RuntimeWarning, stacklevel=3)
                    extension = None
            _MODULE.append(extension)
    return _MODULE[0]
