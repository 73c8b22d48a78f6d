"""Dtype rules and numeric thresholds the CPU-tier families share."""

from __future__ import annotations

import ctypes
import sys
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from normlayers._dtypes import compute_dtype

LOW_PRECISION = (torch.float16, torch.bfloat16)

# Below this eps a family does not take its statistics unscaled (the reference takes them of values scaled by a power
# of two, docs/reliability.md): from it up, the x² terms an underflow loses (each below 2^-149) are negligible beside
# eps, and 1/sqrt(· + eps) ≤ 2^30, so its cube stays finite in fp32.
MIN_UNSCALED_EPS = 2.0 ** -60


def opmath(t: Tensor) -> Tensor:
    dtype = compute_dtype(t.dtype)
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to() still costs a dispatch (0.8 us here)


def params_like(input: Tensor, *params: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Parameters in the dtype an ATen norm should see next to ``input``: its opmath dtype. For fp32/fp64 input that
    is ``input``'s dtype; beside bf16/fp16 input it is fp32, ATen's "mixed type" path, which also sums the weight and
    bias gradients in fp32 (with bf16 parameters it sums them in bf16, rounding at every row). The casts are exact,
    or for a wider parameter the rounding the reference applies; their gradients are rounded once, on the way back."""
    dtype = compute_dtype(input.dtype)
    return tuple(p if p is None or p.dtype == dtype else p.to(dtype) for p in params)


def var_mean(x: Tensor, dim: Union[int, Sequence[int]], keepdim: bool = False) -> tuple[Tensor, Tensor]:
    """The biased variance and the mean of ``x`` over ``dim``, in two passes: the mean, then the mean of squared
    deviations. ``torch.var_mean`` (a Welford reduction) is 10–30× slower on CPU in torch 2.13 (fp32, one thread:
    9–14 ms against 0.5 ms for 8x256x14x14 over (2, 3) or (0, 2, 3)), and the two-pass form is as accurate."""
    mean = x.mean(dim, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim, keepdim=keepdim)
    return var, mean if keepdim else mean.squeeze(dim)


# The last byte in memory (little-endian: sign and leading exponent bits) of a positive, finite, non-zero float of any
# width: 0x00 is a zero or a tiny value, 0x7C-0x7F an inf or NaN (fp16: exponent 11111; wider: its top bits), 0x80 and
# up the negatives and -0.0. Every rstd of trusted statistics is in [2^-64, 2^30] (eps ≥ 2^-60 and var ≤ fp32's max;
# fp64's is wider still), whose last byte is 0x1F-0x4E (fp32/bf16) or 0x1F-0x41 (fp64): accepted; so is GroupScaling's
# ρ in [2^-64, eps^-1/2]. (fp16 statistics, of an fp16 inference call, can round to 0 or inf: refused, and the fp32
# statistics decide.)
_POSITIVE_FINITE_TOP_BYTES = bytes(range(0x01, 0x7C))
_READ_RAW_BYTES = sys.byteorder == "little"


def host_readable(*tensors: Optional[Tensor]) -> bool:
    """Whether a path that reads statistics or parameters as numbers on the host may take these tensors: plain CPU
    tensors or parameters with storage, not a FakeTensor or another subclass, nor a tensor of a ``torch.func``
    transform (``None`` entries are skipped)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    for t in tensors:  # a loop, not all() over a generator: this runs on every call of the compiled kernels
        if t is not None and type(t) not in _HOST_TYPES:
            return False
    return True


_HOST_TYPES = (Tensor, torch.nn.Parameter)


def raw_bytes(t: Tensor) -> Optional[bytes]:
    """The raw memory of a plain, contiguous tensor (fresh statistics), read without a dispatcher op, or ``None``: on a
    big-endian host, for a subclass (a FakeTensor's ``data_ptr()`` is not its data) or a tensor without storage (of a
    ``torch.func`` transform). Right after a big kernel whatever runs next finds cold caches, and this read costs the
    least there (:func:`all_positive_finite`)."""
    if not (_READ_RAW_BYTES and type(t) is Tensor and t.is_contiguous()):
        return None
    try:
        return ctypes.string_at(t.data_ptr(), t.nbytes)
    except RuntimeError:
        return None


def all_positive_finite(factors: Tensor) -> bool:
    """Whether every value of ``factors`` (per-row ``rstd``, per-group scaling factors: a fresh contiguous tensor of
    statistics) is positive and finite, and not tiny (below ``2^-125`` in fp32): the check that unscaled statistics
    give the scaled ones' answer (an overflow gives 0, a NaN or inf in the data NaN or 0; docs/reliability.md).

    Right after the big kernel every cache holds its data, and the code that runs next pays for that: ``min().item()``
    (a reduction and a read) cost 35 µs there against 2 µs before it (1576×768 fp32, one thread), 7% of the kernel.
    The top bytes of the statistics' raw memory, read without a dispatcher op, decide in 18 µs."""
    raw = raw_bytes(factors)
    if raw is None:
        return factors.min().item() > 0  # False for a NaN
    size = factors.itemsize
    return not raw[size - 1::size].translate(None, _POSITIVE_FINITE_TOP_BYTES)
