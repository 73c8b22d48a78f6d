"""Argument checks shared by :mod:`normlayers.functional` and :mod:`normlayers.nn`.

Small primitives in the spirit of ``torch._check``: each validates one argument and raises a ``TypeError`` or
``ValueError`` that names it, and returns the value in its canonical type (``float``, ``int``, a shape tuple), so a
constructor can store what it checked. The rules of one family (a variant name, a conv weight's fan-in) live in that
family's functional module and are built from these.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from normlayers._dtypes import FLOAT_DTYPES

ShapeLike = Union[int, Sequence[int], torch.Size]


def is_real(value: object) -> bool:
    """A real number that is not a bool (``True`` is an ``numbers.Real`` too)."""
    # the exact-type test first: an ABC isinstance costs about a microsecond, on every call of every layer
    return type(value) in (float, int) or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def is_int(value: object) -> bool:
    """An integer that is not a bool."""
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def as_shape(normalized_shape: ShapeLike) -> tuple[int, ...]:
    """``normalized_shape`` as a non-empty tuple of non-negative ints, as torch's norms take it."""
    if type(normalized_shape) in (tuple, torch.Size) and normalized_shape and all(
            type(s) is int and s >= 0 for s in normalized_shape):
        return tuple(normalized_shape)  # the common case, checked without the ABCs below (a per-call cost)
    if is_int(normalized_shape):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, (Sequence, torch.Size)) and not isinstance(normalized_shape, str):
        shape = tuple(normalized_shape)
    else:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                        f"{type(normalized_shape).__name__}")
    if not shape or not all(is_int(s) and s >= 0 for s in shape):
        raise ValueError(f"normalized_shape must be a non-empty sequence of non-negative ints, got "
                         f"{normalized_shape!r}")
    return tuple(int(s) for s in shape)


def check_float_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}")
    return t


def check_same_device(name: str, t: Tensor, other: Tensor, other_name: str = "input") -> None:
    if t.device != other.device:
        raise ValueError(f"{name} is on {t.device} but {other_name} is on {other.device}")


def check_nchw_input(input: object) -> Tensor:
    """A floating ``(N, C, H, W)`` tensor."""
    check_float_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got {input.dim()}-D input of shape {list(input.shape)}")
    return input


def check_channel_vectors(input: Tensor, vectors: dict[str, Optional[Tensor]]) -> None:
    """Each given tensor of ``vectors`` is a floating ``(C,)`` tensor on ``input``'s device, ``C = input.shape[1]``
    of an ``(N, C, H, W)`` input (a per-channel parameter or buffer)."""
    channels = input.shape[1]
    for name, t in vectors.items():
        if t is None:
            continue
        if tuple(check_float_tensor(name, t).shape) != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},), the channel count of input (N, C, H, W) = "
                             f"{list(input.shape)}; got {name} of shape {list(t.shape)}")
        check_same_device(name, t, input)


def check_counter(name: str, t: object) -> Tensor:
    """A one-element integer tensor (a step counter such as ``num_batches_tracked``)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a one-element integer tensor, got {type(t).__name__}")
    if t.numel() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must be a one-element integer tensor, got {t.dtype} of shape {list(t.shape)}")
    return t


def check_real(name: str, value: object) -> float:
    if not is_real(value):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def check_finite(name: str, value: object) -> float:
    if not is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_epsilon(name: str, value: object) -> float:
    """A finite number ``≥ 0`` (an epsilon added to a variance)."""
    if not is_real(value) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: object) -> float:
    """A number in ``[0, 1]`` (a momentum, a rate)."""
    if not is_real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_positive_int(name: str, value: object, *, or_none: bool = False) -> Optional[int]:
    """An int ``> 0``; with ``or_none``, ``None`` passes through."""
    if or_none and value is None:
        return None
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if or_none else ''}, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value: object) -> int:
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def check_positive_epsilon(name: str, value: object) -> float:
    """A batch-statistic epsilon: ``0`` would turn a constant input into NaN, so it is rejected, as torch's
    ``batch_norm`` rejects it."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be positive and finite (as torch's batch_norm eps), got {value!r}")
    return float(value)


def check_running_stats_without_grad(training: bool, **buffers: object) -> None:
    """Running statistics are updated in place in training, which autograd cannot differentiate (torch's
    ``batch_norm`` refuses a ``running_mean`` that requires grad as well)."""
    for name, t in buffers.items():
        if training and isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but running statistics are updated in place in training and "
                             f"are not differentiable; call {name}.requires_grad_(False)")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)  # (a hashed lookup: 70 ns against 170 ns for the tuple)


def is_plain_float_tensor(t: object, shape: tuple[int, ...], device: torch.device) -> bool:
    """Whether ``t`` is a floating tensor of exactly ``shape`` on ``device``, tested in well under a microsecond: the
    fast path of the checks above for the arguments every model's call passes (a parameter, a residual). ``False``
    sends a call to the full checks, which raise the error that names the argument."""
    return isinstance(t, Tensor) and t.dtype in FLOAT_DTYPE_SET and t.shape == shape and t.device == device
