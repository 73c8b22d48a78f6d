"""Functional Group Normalization with an optional fused activation (``F.group_norm`` followed by SiLU, GELU or ReLU,
as every ResNet block of a diffusion UNet or VAE runs it)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from normlayers._checks import (
    FLOAT_DTYPE_SET,
    check_channel_vectors,
    check_epsilon,
    check_float_tensor,
    check_positive_int,
    is_plain_float_tensor,
)
from normlayers._dtypes import compute_dtype
from normlayers.backends import get_backend, tier
from normlayers.cpu import _extension
from normlayers.cpu import group_norm as _cpu_group_norm
from normlayers.functional._common import empty_batch_output
from normlayers.ops import group_norm as _ops_group_norm
from normlayers.reference import group_norm as _ref_group_norm

__all__ = ["GROUP_NORM_ACTIVATIONS", "check_activation", "group_norm"]

GROUP_NORM_ACTIVATIONS = tuple(_ref_group_norm.ACTIVATIONS)


def check_activation(act: object) -> Optional[str]:
    """``act``: ``None`` or one of :data:`GROUP_NORM_ACTIVATIONS`."""
    if act is not None and (not isinstance(act, str) or act not in GROUP_NORM_ACTIVATIONS):
        raise ValueError(f"act must be None or one of {GROUP_NORM_ACTIVATIONS}, got {act!r}")
    return act


def _is_plain_valid_call(input: object, num_groups: object, weight: object, bias: object, eps: object,
                         act: object) -> bool:
    """Whether the arguments are valid in their plain form (tensors, an ``int``, a ``float`` eps): what every
    model's call passes, tested in under 2 µs. It passes only calls that :func:`_check_group_norm_args` passes too.
    (The full checks cost ~5 µs per call on CPU; with them a 2×320×32×32 fp32 call measured 35–50 µs slower than
    ``F.group_norm``, one thread, interleaved medians of the thread's CPU time, more than the checks' own time.)"""
    if not (isinstance(input, Tensor) and input.dtype in FLOAT_DTYPE_SET and input.dim() >= 2):
        return False
    shape, device = (input.shape[1],), input.device
    return (type(num_groups) is int and num_groups > 0 and shape[0] % num_groups == 0
            and input.numel() != num_groups and type(eps) is float and 0.0 <= eps < math.inf
            and (act is None or (type(act) is str and act in GROUP_NORM_ACTIVATIONS))
            and (weight is None or is_plain_float_tensor(weight, shape, device))
            and (bias is None or is_plain_float_tensor(bias, shape, device)))


def _check_group_norm_args(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                           eps: float, act: Optional[str]) -> float:
    if _is_plain_valid_call(input, num_groups, weight, bias, eps, act):
        return eps
    check_float_tensor("input", input)
    if input.dim() < 2:
        raise ValueError(f"input must be (N, C, *spatial) with at least 2 dims, got {input.dim()}-D input of shape "
                         f"{list(input.shape)}")
    check_positive_int("num_groups", num_groups)
    channels = input.shape[1]
    if channels % num_groups != 0:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of channels (input.shape[1] = "
                         f"{channels}); input has shape {list(input.shape)}")
    if input.numel() == num_groups:
        # One value in every group (batch 1): F.group_norm refuses it, so every backend does.
        raise ValueError(f"Expected more than 1 value per group, got input of shape {list(input.shape)} with "
                         f"num_groups={num_groups}")
    check_channel_vectors(input, {"weight": weight, "bias": bias})
    check_activation(act)
    return check_epsilon("eps", eps)


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, act: Optional[str] = None) -> Tensor:
    r"""Group normalization of an ``(N, C, *spatial)`` input, followed by an optional activation.

    .. math:: y = \mathrm{act}\left(\frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}}
              \cdot \gamma_c + \beta_c\right)

    Mean and biased variance over each (sample, group of ``C / num_groups`` consecutive channels)'s values (Wu & He,
    2018, eq. 1), in fp32 (fp64 for fp64 input); the activation is applied before the one rounding to the input's
    dtype. ``act=None`` is ``F.group_norm``; ``"silu"``, ``"gelu"`` (exact, erf) and ``"relu"`` fuse
    ``F.silu(F.group_norm(...))`` and the like. On CUDA one Triton kernel chain reads NCHW and channels-last inputs
    in place, forward and backward; under CUDA autocast it runs in fp32, as ``F.group_norm`` does. See
    docs/group_norm.md.

    Args:
        input: ``(N, C, *spatial)``, any number of spatial dims (none included).
        num_groups: ``G``, dividing ``C``.
        weight, bias: ``(C,)`` or ``None``.
        eps: added to the variance. Default: ``1e-5``.
        act: ``None``, ``"silu"``, ``"gelu"`` or ``"relu"``. Default: ``None``.
    """
    if (type(input) is Tensor and input.is_cpu and get_backend() == "auto"
            and not torch.compiler.is_compiling()):
        # The CPU tier's common calls in one step of C++ (cpu/csrc/autograd.cpp, group_norm_call), which returns
        # None for any other: the steps below, their checks and their errors.
        extension = _extension.module()
        y = None if extension is None else extension.group_norm_call(input, num_groups, weight, bias, eps, act)
        if y is not None:
            return y
    eps = _check_group_norm_args(input, num_groups, weight, bias, eps, act)
    if input.is_cuda and torch.is_autocast_enabled("cuda"):
        # torch's autocast runs group_norm in fp32: so do we.
        input, weight, bias = (t.to(compute_dtype(t.dtype)) if t is not None else None for t in (input, weight, bias))
    if input.numel() == 0:
        return empty_batch_output(input, weight, bias)
    implementation = tier(input)
    if implementation == "triton":
        return _ops_group_norm.group_norm(input, num_groups, weight, bias, eps, act)
    if implementation == "cpu":
        return _cpu_group_norm.group_norm(input, num_groups, weight, bias, eps, act)
    return _ref_group_norm.group_norm(input, num_groups, weight, bias, eps, act)
