"""Compiled CPU kernels: C sources under ``cpu/csrc/``, compiled at first use with the host's C compiler and cached.

Where no ATen op computes a layer's math in the fewest passes (a LayerNorm that checks its own statistics, a
channels-last GroupNorm backward with accurate sums), the CPU tier calls a small C kernel instead: portable C11 with
GCC/Clang vector extensions, built with ``-O3 -march=native -fopenmp -ffp-contract=fast`` into one shared library per
source file and loaded with :mod:`ctypes` (which releases the GIL during the call). Its OpenMP runtime is torch's
own (the library links ``libgomp.so.1``, already loaded by torch under that name), so a kernel runs on torch's
thread pool with ``torch.get_num_threads()`` threads. This is how Triton builds its own launchers: the same
compiler, at first use.

The library is cached under ``$NORMLAYERS_CACHE_DIR`` (default ``$XDG_CACHE_HOME/normlayers`` or
``~/.cache/normlayers``), keyed by the source, the flags, the compiler's version and the CPU's feature flags (a shared
home directory on machines of another CPU gets its own build). Compiling a file takes about a second, once.

Without a compiler, or with ``NORMLAYERS_CPU_KERNELS=0`` at import, :func:`load` returns ``None`` and the tier runs
its ATen path (the same math, a little slower); a failed compile says so once in a warning. Under ``torch.compile``,
for FakeTensors, tensor subclasses and ``torch.func`` transforms the ATen path runs too: a kernel reads raw memory
(:func:`normlayers.cpu._common.host_readable`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["load", "function", "enabled", "threads", "ptr", "cache_dir"]

_CSRC = Path(__file__).with_name("csrc")
# -ffp-contract=fast: a·b + c as one FMA, rounded once (ISO C mode, -std=c11, would turn that off; the polynomials and
# affine maps of the kernels run in half the instructions)
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=fast",
          "-fno-math-errno")
_LOCK = threading.Lock()
_LIBRARIES: dict[str, Optional[ctypes.CDLL]] = {}
_FUNCTIONS: dict[tuple[Any, ...], Optional[Any]] = {}


# read once: a call into the environment costs a microsecond, and these kernels save only a few
_ENABLED = os.environ.get("NORMLAYERS_CPU_KERNELS", "1") != "0"


def enabled() -> bool:
    """Whether the compiled kernels may run: ``NORMLAYERS_CPU_KERNELS`` was not ``0`` when normlayers was imported."""
    return _ENABLED


def threads() -> int:
    """The threads a kernel runs on: torch's (``torch.set_num_threads``)."""
    return torch.get_num_threads()


def ptr(t: Optional[Tensor]) -> Optional[int]:
    """The address of a tensor's first element (``None`` for ``None``: a NULL pointer)."""
    return None if t is None else t.data_ptr()


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    """Where the compiled libraries are kept (module docstring)."""
    if os.environ.get("NORMLAYERS_CACHE_DIR"):
        return Path(os.environ["NORMLAYERS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normlayers"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _key(compiler: str, source: bytes) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256()
    for part in (source, " ".join(_FLAGS).encode(), version.encode(), _cpu_flags().encode(),
                 platform.machine().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def _source(name: str) -> bytes:
    """The source of ``csrc/<name>.c`` with the headers it shares (they are part of the cache key)."""
    return b"".join(p.read_bytes() for p in (*sorted(_CSRC.glob("*.h")), _CSRC / f"{name}.c"))


def _build(name: str) -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
    target = cache_dir() / f"{name}-{_key(compiler, _source(name))}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # built beside the target and renamed onto it: concurrent processes (pytest-xdist workers) never load a
        # half-written library
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run([compiler, *_FLAGS, f"-I{_CSRC}", str(_CSRC / f"{name}.c"), "-o", tmp, "-lm"],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed on {name}.c:\n{result.stderr[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


def load(name: str) -> Optional[ctypes.CDLL]:
    """The compiled library of ``cpu/csrc/<name>.c`` (built on the first call, then cached on disk and here), or
    ``None`` where the kernels are disabled or cannot be built (then the caller runs its ATen path)."""
    if not _ENABLED:
        return None
    try:
        return _LIBRARIES[name]
    except KeyError:
        pass
    with _LOCK:
        if name not in _LIBRARIES:
            try:
                _LIBRARIES[name] = _build(name)
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                warnings.warn(f"normlayers: the compiled CPU kernels of {name}.c are unavailable, so the CPU tier runs "
                              f"ATen's kernels there (slower, same math): {error}", RuntimeWarning, stacklevel=3)
                _LIBRARIES[name] = None
    return _LIBRARIES[name]


def function(library: str, name: str, restype: Any, *argtypes: Any) -> Optional[Any]:
    """The C function ``name`` of :func:`load`'s ``library`` with this ctypes signature (cached), or ``None``."""
    if not _ENABLED:
        return None
    key = (library, name, restype, argtypes)
    try:
        return _FUNCTIONS[key]
    except KeyError:
        pass
    lib = load(library)
    fn = None
    if lib is not None:
        fn = lib[name]  # a function object of its own: another signature for the same symbol does not change it
        fn.restype, fn.argtypes = restype, argtypes
    _FUNCTIONS[key] = fn
    return fn
