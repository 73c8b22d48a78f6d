"""Argument checks shared by :mod:`normlayers.functional` and :mod:`normlayers.nn`: small primitives, each raising
a ``TypeError``/``ValueError`` that names the argument (in the spirit of ``torch._check``)."""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import torch
from torch import Tensor

ShapeLike = Union[int, Sequence[int], torch.Size]
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_shape(normalized_shape: ShapeLike) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, (Sequence, torch.Size)) and not isinstance(normalized_shape, str):
        shape = tuple(normalized_shape)
    else:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {type(normalized_shape).__name__}")
    if not shape or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"normalized_shape must be a non-empty sequence of non-negative ints, got {normalized_shape!r}")
    return tuple(int(s) for s in shape)



def check_float_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}")
    return t


def check_unit_interval(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_epsilon(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)


def check_nonnegative_int(name: str, value: object) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
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
