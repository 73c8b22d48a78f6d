"""Functional forms of every normlayers norm, in ``torch.nn.functional``'s argument order.

Each function validates its arguments, then runs the Triton op or the plain-PyTorch reference as
:mod:`normlayers.backend` decides.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from normlayers.backend import use_triton
from normlayers.distributed import (
    MomentSync,
    all_reduce_sum,
    moment_sync,
    sync_group,
    sync_group_name,
    sync_masked_moments,
)
from normlayers.ops import channel_stats as _ops_channel
from normlayers.ops import evo_norm as _ops_evo
from normlayers.ops import region_norm as _ops_region
from normlayers.ops import row_norms as _ops_row
from normlayers.ops import token_stats as _ops_token
from normlayers.reference import batch_channel as _ref_batch_channel
from normlayers.reference import evo_norm as _ref_evo
from normlayers.reference import power_norm as _ref_power
from normlayers.reference import region_norm as _ref_region
from normlayers.reference import row_norms as _ref_row
from normlayers.reference import spd_batch_norm as _ref_spd
from normlayers.reference import unified_norm as _ref_unified
from normlayers.reference import weight_std as _ref_ws

__all__ = [
    "layer_norm",
    "rms_norm",
    "crms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "add_crms_norm",
    "batch_channel_norm",
    "weight_standardize",
    "scaled_weight_standardize",
    "ws_conv2d",
    "scaled_ws_conv2d",
    "evo_norm2d_b0",
    "evo_norm2d_b1",
    "evo_norm2d_b2",
    "evo_norm2d_s0",
    "evo_norm2d_s0a",
    "evo_norm2d_s1",
    "evo_norm2d_s1a",
    "evo_norm2d_s2",
    "evo_norm2d_s2a",
    "spd_batch_norm",
    "region_norm",
    "learnable_region_norm",
    "power_norm",
    "unified_norm",
]

_ShapeLike = Union[int, Sequence[int], torch.Size]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks shared by the row norms
# ----------------------------------------------------------------------------------------------------------------------


def _as_shape(normalized_shape: _ShapeLike) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, (Sequence, torch.Size)) and not isinstance(normalized_shape, str):
        shape = tuple(normalized_shape)
    else:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {type(normalized_shape).__name__}")
    if not shape or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"normalized_shape must be a non-empty sequence of non-negative ints, got {normalized_shape!r}")
    return tuple(int(s) for s in shape)


def _check_float_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}")
    return t


def _check_row_norm_args(
    input: Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor] = None,
) -> tuple[int, ...]:
    _check_float_tensor("input", input)
    shape = _as_shape(normalized_shape)
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"input's trailing dims must equal normalized_shape {list(shape)}, got input of shape {list(input.shape)}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        _check_float_tensor(name, param)
        if tuple(param.shape) != shape:
            raise ValueError(f"{name} must have shape normalized_shape {list(shape)}, got {list(param.shape)}")
        if param.device != input.device:
            raise ValueError(f"{name} is on {param.device} but input is on {input.device}")
    if residual is not None:
        _check_float_tensor("residual", residual)
        if residual.shape != input.shape:
            raise ValueError(f"residual must have the input's shape {list(input.shape)} (no broadcasting), "
                             f"got {list(residual.shape)}")
        if residual.device != input.device:
            raise ValueError(f"residual is on {residual.device} but input is on {input.device}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    return shape


def _resolve_rms_eps(eps: Optional[float], dtype: torch.dtype) -> float:
    """``eps=None`` means the machine epsilon of the computation dtype: fp32's for fp16/bf16/fp32 inputs, fp64's for
    fp64 (spec A §4.3, as ``torch.nn.functional.rms_norm``)."""
    if eps is not None:
        return eps
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


# torch runs layer_norm in fp32 under CUDA autocast, and rms_norm too since 2.12 (spec A §4.4); the row norms follow
# the installed torch, so swapping a torch norm for ours keeps a model's dtypes.
_RMS_AUTOCASTS_TO_FP32 = torch.torch_version.TorchVersion(torch.__version__) >= (2, 12)


def _autocasts_to_fp32(kind: str, input: Tensor) -> bool:
    if input.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return False
    return kind == "layer" or _RMS_AUTOCASTS_TO_FP32


def _to_fp32(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.float() if t is not None and t.dtype != torch.float64 else t


def _row_norm(kind: str, input: Tensor, shape: tuple[int, ...], weight: Optional[Tensor], bias: Optional[Tensor],
              eps: float, residual: Optional[Tensor], residual_in_fp32: bool,
              weight_offset: float) -> tuple[Tensor, Optional[Tensor]]:
    if _autocasts_to_fp32(kind, input):
        input, residual, weight, bias = (_to_fp32(t) for t in (input, residual, weight, bias))
    residual_dtype = None
    if residual is not None:
        residual_dtype = torch.float32 if residual_in_fp32 and residual.dtype != torch.float64 else residual.dtype
    if use_triton(input):
        return _ops_row.row_norm(input, shape, weight, bias, kind, eps, residual=residual,
                                 residual_dtype=residual_dtype, weight_offset=weight_offset)
    h = _ref_row.residual_add(input, residual, residual_dtype) if residual is not None else input
    if kind == "layer":
        y = _ref_row.layer_norm(h, shape, weight, bias, eps, out_dtype=input.dtype)
    elif kind == "rms":
        y = _ref_row.rms_norm(h, shape, weight, eps, weight_offset=weight_offset, out_dtype=input.dtype)
    else:
        y = _ref_row.crms_norm(h, shape, weight, eps, out_dtype=input.dtype)
    return y, h if residual is not None else None


def _check_weight_offset(weight_offset: float, weight: Optional[Tensor]) -> float:
    if not isinstance(weight_offset, numbers.Real) or isinstance(weight_offset, bool):
        raise TypeError(f"weight_offset must be a float, got {type(weight_offset).__name__}")
    if weight_offset != 0 and weight is None:
        raise ValueError("weight_offset scales the weight (weight + weight_offset); it needs a weight")
    return float(weight_offset)


# ----------------------------------------------------------------------------------------------------------------------
# Row norms
# ----------------------------------------------------------------------------------------------------------------------


def layer_norm(input: Tensor, normalized_shape: _ShapeLike, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    r"""Layer normalization over the last ``len(normalized_shape)`` dims, as :func:`torch.nn.functional.layer_norm`.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with the biased variance, statistics in fp32 (fp64 for fp64 input), output in the input dtype.
    """
    shape = _check_row_norm_args(input, normalized_shape, weight, bias, eps)
    return _row_norm("layer", input, shape, weight, bias, eps, None, False, 0.0)[0]


def rms_norm(input: Tensor, normalized_shape: _ShapeLike, weight: Optional[Tensor] = None,
             eps: Optional[float] = None, *, weight_offset: float = 0.0) -> Tensor:
    r"""RMS normalization over the last ``len(normalized_shape)`` dims, as :func:`torch.nn.functional.rms_norm`.

    .. math:: y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \cdot (\gamma + \text{weight\_offset})

    ``eps=None`` is fp32's machine epsilon (fp64's for fp64 input), as in torch. ``weight_offset=1.0`` gives the
    Gemma-style ``(1 + w)`` scale; it requires ``weight``.
    """
    shape = _check_row_norm_args(input, normalized_shape, weight, None, 0.0 if eps is None else eps)
    offset = _check_weight_offset(weight_offset, weight)
    return _row_norm("rms", input, shape, weight, None, _resolve_rms_eps(eps, input.dtype), None, False, offset)[0]


def crms_norm(input: Tensor, normalized_shape: _ShapeLike, weight: Optional[Tensor] = None,
              eps: Optional[float] = None) -> Tensor:
    r"""Compressed RMS normalization (Jiang et al., NeurIPS 2023; spec A §3.1).

    ``input`` holds the first ``d − 1`` coordinates ``x'`` of a zero-mean vector of width ``d``; the dropped
    coordinate is ``−Σx'``. With ``n = d − 1 = prod(normalized_shape)``:

    .. math:: y = \frac{x'}{\sqrt{\left(\sum_i x_i'^2 + (\sum_i x'_i)^2\right) / (n + 1) + \epsilon}} \cdot \gamma

    which equals the first ``n`` outputs of RMSNorm on the restored vector ``[x', −Σx']``. ``eps`` as in
    :func:`rms_norm`.
    """
    shape = _check_row_norm_args(input, normalized_shape, weight, None, 0.0 if eps is None else eps)
    return _row_norm("crms", input, shape, weight, None, _resolve_rms_eps(eps, input.dtype), None, False, 0.0)[0]


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape: _ShapeLike, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, *,
                   residual_in_fp32: bool = False) -> tuple[Tensor, Tensor]:
    """Fused ``h = x + residual; return layer_norm(h), h`` for pre-norm blocks.

    ``h`` is computed in fp32 and stored in ``residual``'s dtype, or in fp32 when ``residual_in_fp32`` (an fp32
    residual stream under bf16 activations); the norm is applied to that stored ``h``. The normalized output has
    ``x``'s dtype. Gradients flow to ``x``, ``residual`` (both receive ``dh``) and the parameters.
    """
    shape = _check_row_norm_args(x, normalized_shape, weight, bias, eps, residual)
    return _row_norm("layer", x, shape, weight, bias, eps, residual, residual_in_fp32, 0.0)


def add_rms_norm(x: Tensor, residual: Tensor, normalized_shape: _ShapeLike, weight: Optional[Tensor] = None,
                 eps: Optional[float] = None, *, weight_offset: float = 0.0,
                 residual_in_fp32: bool = False) -> tuple[Tensor, Tensor]:
    """Fused ``h = x + residual; return rms_norm(h), h``; see :func:`add_layer_norm` and :func:`rms_norm`."""
    shape = _check_row_norm_args(x, normalized_shape, weight, None, 0.0 if eps is None else eps, residual)
    offset = _check_weight_offset(weight_offset, weight)
    return _row_norm("rms", x, shape, weight, None, _resolve_rms_eps(eps, x.dtype), residual, residual_in_fp32, offset)


def add_crms_norm(x: Tensor, residual: Tensor, normalized_shape: _ShapeLike, weight: Optional[Tensor] = None,
                  eps: Optional[float] = None, *, residual_in_fp32: bool = False) -> tuple[Tensor, Tensor]:
    """Fused ``h = x + residual; return crms_norm(h), h``; see :func:`add_layer_norm` and :func:`crms_norm`."""
    shape = _check_row_norm_args(x, normalized_shape, weight, None, 0.0 if eps is None else eps, residual)
    return _row_norm("crms", x, shape, weight, None, _resolve_rms_eps(eps, x.dtype), residual, residual_in_fp32, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Batch-Channel Normalization
# ----------------------------------------------------------------------------------------------------------------------


def _check_unit_interval(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_epsilon(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)


def _empty_batch_output(input: Tensor, *params: Optional[Tensor]) -> Tensor:
    """The output for an input with no values (``N = 0``, or empty planes): empty, as torch's norms return, and still
    connected to every parameter so that each gets a (zero) gradient — DDP expects one from every rank, including a
    rank whose local batch is empty. Running statistics are left alone, as ``nn.BatchNorm2d`` leaves them."""
    out = input.clone()
    for param in params:
        if param is not None:
            out = out + param.sum() * 0
    return out


def _check_batch_channel_args(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                              bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                              bias: Optional[Tensor],
                              training: bool, momentum: Optional[float], eps: float, bn_eps: float, num_groups: int,
                              estimate: bool, estimate_rate: Union[float, Tensor],
                              num_batches_tracked: Optional[Tensor], *, local_batch: bool) -> None:
    per_channel = {"running_mean": running_mean, "running_var": running_var, "bn_weight": bn_weight,
                   "bn_bias": bn_bias}
    per_group = {"weight": weight, "bias": bias}
    _check_float_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got {input.dim()}-D input of shape {list(input.shape)}")
    channels = input.shape[1]
    if not isinstance(num_groups, numbers.Integral) or isinstance(num_groups, bool) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    for name, t in per_channel.items():
        if t is not None and tuple(_check_float_tensor(name, t).shape) != (channels,):
            raise ValueError(f"input (N, C, H, W) and {name} (C,) must agree on C = num_channels; got input of shape "
                             f"{list(input.shape)} and {name} of shape {list(t.shape)}")
    if channels % num_groups != 0:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of channels (num_channels = input.shape[1]"
                         f" = {channels}); input has shape {list(input.shape)}")
    for name, t in per_group.items():
        if t is not None and _check_float_tensor(name, t).numel() != num_groups:
            raise ValueError(f"{name} must hold one value per group (num_groups = {num_groups}; officially of shape "
                             f"(1, {num_groups}, 1)), got {name} of shape {list(t.shape)}")
    for name, t in {**per_channel, **per_group, "num_batches_tracked": num_batches_tracked}.items():
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if running_mean is None and (estimate or not training):
        raise ValueError("running_mean and running_var are required in eval mode and with estimate=True "
                         "(only training=True, estimate=False may run on batch statistics alone)")
    # With synced statistics only the global count matters, and reading it would be a host sync: not checked.
    if local_batch and training and not estimate and input.numel() // channels == 1:
        raise ValueError(f"Expected more than 1 value per channel when training (N·H·W = 1 for input of shape "
                         f"{list(input.shape)}): the batch stage's variance is undefined, as in torch.nn.BatchNorm2d;"
                         " use estimate=True or eval mode for single values")
    if momentum is None:
        if training and not estimate and running_mean is not None and num_batches_tracked is None:
            raise ValueError("momentum=None (a cumulative average of the batch statistics) needs num_batches_tracked")
    else:
        _check_unit_interval("momentum", momentum)
    if num_batches_tracked is not None and (num_batches_tracked.numel() != 1
                                            or num_batches_tracked.dtype.is_floating_point):
        raise TypeError(f"num_batches_tracked must be a one-element integer tensor, got {num_batches_tracked.dtype} "
                        f"of shape {list(num_batches_tracked.shape)}")
    if isinstance(estimate_rate, Tensor):
        # A tensor rate (the module's estbn_moving_speed buffer) is not range-checked: that would read it back to
        # the host on every call.
        if estimate_rate.numel() != 1 or not estimate_rate.dtype.is_floating_point:
            raise TypeError(f"estimate_rate must be a float or a one-element floating tensor, got "
                            f"{estimate_rate.dtype} of shape {list(estimate_rate.shape)}")
    else:
        _check_unit_interval("estimate_rate", estimate_rate)
    _check_epsilon("eps", eps)
    _check_epsilon("bn_eps", bn_eps)


def batch_channel_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                       weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                       momentum: Optional[float] = 0.1, eps: float = 1e-5, num_groups: int = 32,
                       bn_eps: float = 1e-5, *, estimate: bool = False, estimate_rate: Union[float, Tensor] = 0.0,
                       num_batches_tracked: Optional[Tensor] = None, sync_stats: bool = False,
                       process_group: Optional[Any] = None) -> Tensor:
    r"""Batch-Channel Normalization (Qiao et al.; spec B §2): a batch stage, then GroupNorm, then a group affine.

    .. math::
        u = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon_{bn}}} \cdot \gamma^{bn}_c + \beta^{bn}_c, \qquad
        y = \frac{u - \mathrm{E}_{n,g}[u]}{\sqrt{\mathrm{Var}_{n,g}[u] + \epsilon}} \cdot \gamma_g + \beta_g

    where ``(μ_c, σ²_c)`` are the batch statistics over ``(N, H, W)`` in training and ``running_mean``/``running_var``
    in eval, as :func:`torch.nn.functional.batch_norm`; with ``estimate=True`` they are the running *estimates*
    (EstBN), first moved towards the batch at ``estimate_rate`` in training (variance centred at the old mean estimate,
    no gradient through them). ``E_{n,g}``/``Var_{n,g}`` (biased) run over each sample's group of ``C/G`` contiguous
    channels and ``H·W`` positions, in training and eval alike. Statistics in fp32 (fp64 for fp64 input); the output
    has the input's dtype.

    Args:
        input: ``(N, C, H, W)``.
        running_mean, running_var: ``(C,)`` buffers, updated in place in training (see below). May be ``None`` only
            with ``training=True, estimate=False``.
        bn_weight, bn_bias: the batch stage's per-channel affine, ``(C,)`` (the official ``bn.weight``/``bn.bias``).
        weight, bias: the per-group affine, ``G`` values (officially of shape ``(1, G, 1)``).
        training: batch statistics (and running updates) when ``True``. Default: ``False``.
        momentum: the running-statistics rate, as ``F.batch_norm``; ``None`` is a cumulative average
            (needs ``num_batches_tracked``). Unused with ``estimate=True``. Default: ``0.1``.
        eps: the channel (group) stage's epsilon. Default: ``1e-5``.
        num_groups: ``G``; must divide ``C``. Default: ``32``.
        bn_eps: the batch stage's epsilon. Default: ``1e-5``.
        estimate: EstBN instead of BatchNorm in the batch stage (spec §2.2). Default: ``False``.
        estimate_rate: EstBN's update rate ``r`` (a float in [0, 1], or a one-element tensor such as the official
            ``estbn_moving_speed`` buffer). Default: ``0.0``, which freezes the estimates (the official default).
        num_batches_tracked: incremented in place in training with ``estimate=False``, as ``nn.BatchNorm2d`` does.
        sync_stats, process_group: in training, with ``torch.distributed`` initialized and more than one rank in
            ``process_group`` (default: the world), take the batch stage's statistics over the global batch
            (:mod:`normlayers.distributed`); every rank must then call this, also with an empty batch.
            Default: ``False``.

    Running updates (training): with ``estimate=False``, ``running ← (1 − m)·running + m·batch`` with the unbiased
    batch variance (PyTorch semantics); with ``estimate=True``, ``mean ← (1 − r)·mean + r·E[x]`` and
    ``var ← (1 − r)·var + r·E[(x − mean_old)²]``. All on device, computed in fp32, stored in the buffers' dtype.
    An input with no values (``N = 0``) gives an empty output and changes no statistic; ``num_batches_tracked`` still
    counts it in training, as ``nn.BatchNorm2d`` does.
    """
    sync = moment_sync(sync_stats, process_group, training)
    _check_batch_channel_args(input, running_mean, running_var, bn_weight, bn_bias, weight, bias, training, momentum,
                              eps, bn_eps, num_groups, estimate, estimate_rate, num_batches_tracked,
                              local_batch=sync is None)
    if input.numel() == 0 and sync is None:
        if training and not estimate and num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # nn.BatchNorm2d counts an empty batch too (and updates nothing else)
        return _empty_batch_output(input, bn_weight, bn_bias, weight, bias)
    if use_triton(input):
        return _batch_channel_norm_planes(
            input, running_mean, running_var, bn_weight, bn_bias, weight, bias, training=training, momentum=momentum,
            eps=eps, num_groups=int(num_groups), bn_eps=bn_eps, estimate=estimate, estimate_rate=estimate_rate,
            num_batches_tracked=num_batches_tracked, sync=sync)
    return _ref_batch_channel.batch_channel_norm(
        input, running_mean, running_var, bn_weight, bn_bias, weight, bias, training=training, momentum=momentum,
        eps=eps, num_groups=int(num_groups), bn_eps=bn_eps, estimate=estimate, estimate_rate=estimate_rate,
        num_batches_tracked=num_batches_tracked, sync=sync)


def _batch_moments_from_planes(plane_mean: Tensor, plane_var: Tensor) -> tuple[Tensor, Tensor]:
    """Each channel's batch ``(mean, biased var)`` from its ``N`` planes' moments (equal counts): the mean of the
    means, and the mean of the variances plus the variance of the means."""
    mean = plane_mean.mean(0)
    return mean, plane_var.mean(0) + (plane_mean - mean).square().mean(0)


def _batch_channel_norm_planes(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                               bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                               bias: Optional[Tensor], *, training: bool, momentum: Optional[float], eps: float,
                               num_groups: int, bn_eps: float, estimate: bool, estimate_rate: Union[float, Tensor],
                               num_batches_tracked: Optional[Tensor], sync: Optional[MomentSync]) -> Tensor:
    """BCN through the plane kernels: both stages and the affines compose to one affine map per plane.

    One pass of :func:`~normlayers.ops.channel_stats.plane_moments` gives every plane's ``(mean, var)``; all the
    statistics BCN needs follow from them exactly (equal-count combinations: the mean of means, and the mean of the
    variances plus the variance of the means), in ``(N, C)`` torch ops that autograd differentiates; then one
    :func:`~normlayers.ops.channel_stats.plane_affine` pass. Same semantics as the reference, buffers included.
    """
    n, channels = input.shape[:2]
    plane_mean, plane_var = _ops_channel.plane_moments(input)
    opmath = plane_mean.dtype
    if training:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not estimate):
            mean, var = _batch_moments_from_planes(plane_mean, plane_var)
            count: Union[int, Tensor] = n * math.prod(input.shape[2:])
            if sync is not None:
                mean, var, count = sync(mean, var, count)
    if training and not estimate:
        if running_mean is not None and running_var is not None:
            _ref_batch_channel.update_batch_running_stats_(running_mean, running_var, num_batches_tracked, mean, var,
                                                           count=count, momentum=momentum)
    else:
        if training:
            _ref_batch_channel.estimate_update_(running_mean, running_var, mean, var, estimate_rate)
        mean, var = running_mean.to(opmath), running_var.to(opmath)
    # Batch stage, per channel: u = (x − mean)·a + bn_bias. Each plane's moments after it:
    a = torch.rsqrt(var + bn_eps)
    if bn_weight is not None:
        a = a * bn_weight.to(opmath)
    u_mean = (plane_mean - mean) * a
    if bn_bias is not None:
        u_mean = u_mean + bn_bias.to(opmath)
    u_var = plane_var * a.square()
    # Group stage: the planes' moments combined over the C/G channels of each (sample, group).
    per_group = (n, num_groups, channels // num_groups)
    u_mean, u_var = u_mean.view(per_group), u_var.view(per_group)
    group_mean = u_mean.mean(-1, keepdim=True)
    group_var = u_var.mean(-1, keepdim=True) + (u_mean - group_mean).square().mean(-1, keepdim=True)
    group_scale = torch.rsqrt(group_var + eps)
    if weight is not None:
        group_scale = group_scale * weight.to(opmath).reshape(1, num_groups, 1)
    # y = (x − plane_mean)·scale + shift, centred at the plane mean so that nothing cancels (see plane_affine).
    scale = a.view(1, num_groups, channels // num_groups) * group_scale
    shift = (u_mean - group_mean) * group_scale
    if bias is not None:
        shift = shift + bias.to(opmath).reshape(1, num_groups, 1)
    return _ops_channel.plane_affine(input, plane_mean, scale.reshape(n, channels), shift.reshape(n, channels))


# ----------------------------------------------------------------------------------------------------------------------
# Weight Standardization
# ----------------------------------------------------------------------------------------------------------------------


_IntOrPair = Union[int, tuple[int, int]]

# Biased variance, eps inside the square root: the paper's v2 formula, which the authors agreed is the safe placement
# (WeightStandardization#1, #16: eps outside gives NaN gradients and fp16 NaNs) and what timm's StdConv2d computes.
# The authors' released layer is variant="qiao" (spec B §1.2, §1.7).
WS_DEFAULT_VARIANT = "timm"


def _ws_variant(variant: object) -> _ref_ws.WSVariant:
    if not isinstance(variant, str) or variant not in _ref_ws.WS_VARIANTS:
        raise ValueError(f"variant must be one of {tuple(_ref_ws.WS_VARIANTS)}, got {variant!r}")
    return _ref_ws.WS_VARIANTS[variant]


def _check_ws_eps(eps: object) -> float:
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    return float(eps)


def _check_ws_finite(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_ws_weight(weight: Tensor, correction: int, variant: str) -> None:
    """``variant`` names the variant in the error for ``correction`` = 1 (unused for the biased ones)."""
    _check_float_tensor("weight", weight)
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (out_channels, in_channels / groups, *kernel_size), got "
                         f"shape {list(weight.shape)}")
    fan_in = _ref_ws.fan_in(weight)
    if fan_in == 0:
        raise ValueError(f"weight has no elements per output filter (shape {list(weight.shape)}): nothing to "
                         "standardize")
    if fan_in <= correction:
        # spec B §1.6: the unbiased std of a single element divides by I − 1 = 0
        raise ValueError(f"variant {variant!r} divides the variance by fan_in - 1, which is 0 for a weight of shape "
                         f"{list(weight.shape)} (fan_in = in_channels / groups * kh * kw = {fan_in}); use a biased "
                         "variant ('timm' or 'bit'), which standardizes such a filter to 0")


def _check_ws_gain(gain: Tensor, weight: Tensor) -> None:
    _check_float_tensor("gain", gain)
    if gain.numel() != weight.shape[0] or (gain.dim() > 1 and gain.shape[0] != weight.shape[0]):
        raise ValueError(f"gain must hold one value per output filter, of shape (out_channels, 1, 1, 1) or "
                         f"(out_channels,) = ({weight.shape[0]},); got gain of shape {list(gain.shape)}")
    if gain.device != weight.device:
        raise ValueError(f"gain is on {gain.device} but weight is on {weight.device}")


def _check_conv_input(input: Tensor, weight: Tensor, groups: int) -> None:
    _check_float_tensor("input", input)
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be 4-D (N, C, H, W) or 3-D unbatched (C, H, W), got {input.dim()}-D input of "
                         f"shape {list(input.shape)}")
    channels = weight.shape[1] * groups
    if input.shape[-3] != channels:
        raise ValueError(f"input must have in_channels = {channels} channels (dim -3 of (N, C, H, W)), got input of "
                         f"shape {list(input.shape)}")


def weight_standardize(weight: Tensor, eps: Optional[float] = None, *, variant: str = WS_DEFAULT_VARIANT) -> Tensor:
    r"""Weight Standardization (Qiao et al., arXiv 1903.10520; spec B §1) of a conv weight ``(O, I_g, *kernel)``.

    Each output filter is standardized over its fan-in ``I = I_g·prod(kernel)``:

    .. math::
        \hat W_o = \frac{W_o - \mu_o}{D_o}, \qquad
        D_o = \begin{cases} \sqrt{\sigma_o^2 + \epsilon} & \text{eps inside} \\
                            \sigma_o + \epsilon & \text{eps outside} \end{cases}

    The published implementations differ in ``σ²`` (biased ``/I`` or unbiased ``/(I − 1)``), in where ``eps`` goes
    and in its value (spec B §1.2); ``variant`` names them:

    * ``"qiao"``: unbiased, eps outside, ``1e-5``: the WS README layer and its GN+WS checkpoints.
    * ``"qiao_bcn"``: unbiased, eps inside, ``1e-5``: the WS conv of the BCN ImageNet models.
    * ``"timm"`` (the default): biased, eps inside, ``1e-6``: timm's ``StdConv2d``; the paper's v2 formula.
    * ``"bit"``: biased, eps inside, ``1e-10``: BiT's official code (timm's BiT models pass ``eps=1e-8``).

    Statistics in fp32 (fp64 for fp64 weights); the result has the weight's dtype. Works for any weight with an
    output dim first (Conv1d/2d/3d, Linear).

    Args:
        weight: ``(O, ...)``, floating.
        eps: ``None`` takes the variant's. Default: ``None``.
        variant: see the table. Default: ``"timm"`` (:data:`WS_DEFAULT_VARIANT`).

    A fan-in of 1 (e.g. a depthwise 1x1 conv) is rejected by the unbiased variants (``I − 1 = 0``); the biased ones
    standardize such a filter to 0 (spec B §1.6).
    """
    spec = _ws_variant(variant)
    _check_ws_weight(weight, spec.correction, variant)
    eps = spec.eps if eps is None else _check_ws_eps(eps)
    return _ref_ws.weight_standardize(weight, correction=spec.correction, eps_inside=spec.eps_inside, eps=eps)


def scaled_weight_standardize(weight: Tensor, gain: Optional[Tensor] = None, gamma: float = 1.0,
                              eps: float = 1e-6) -> Tensor:
    r"""Scaled Weight Standardization (NF-ResNets / NFNets, Brock et al.; spec B §1.4), as timm's ``ScaledStdConv2d``:

    .. math:: \hat W_o = g_o \cdot \frac{\gamma}{\sqrt{I}} \cdot \frac{W_o - \mu_o}{\sqrt{\sigma_o^2 + \epsilon}}

    with the biased variance over each filter's fan-in ``I``. Statistics in fp32 (fp64 for fp64 weights); the result
    has the weight's dtype.

    Args:
        weight: ``(O, ...)``, floating.
        gain: the learnable per-filter gain ``g``, ``(O, 1, 1, 1)`` or ``(O,)``; ``None`` means 1. Default: ``None``.
        gamma: the activation's variance-preserving constant (e.g. 1.7139588594436646 for ReLU). Default: ``1.0``.
        eps: added to the variance. Default: ``1e-6`` (timm's; timm's NFNet configs pass 1e-5).
    """
    _check_ws_weight(weight, 0, "")
    if gain is not None:
        _check_ws_gain(gain, weight)
    return _ref_ws.weight_standardize(weight, correction=0, eps_inside=True, eps=_check_ws_eps(eps), gain=gain,
                                      scale=_ref_ws.fan_in_scale(weight, _check_ws_finite("gamma", gamma)))


def ws_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _IntOrPair = 1,
              padding: Union[str, _IntOrPair] = 0, dilation: _IntOrPair = 1, groups: int = 1, *,
              eps: Optional[float] = None, variant: str = WS_DEFAULT_VARIANT) -> Tensor:
    """:func:`torch.nn.functional.conv2d` with the weight standardized by :func:`weight_standardize` first.

    ``input`` is ``(N, C, H, W)`` or unbatched ``(C, H, W)`` with ``C = weight.shape[1] * groups``.
    """
    standardized = weight_standardize(weight, eps, variant=variant)
    _check_conv_input(input, weight, groups)
    return torch.nn.functional.conv2d(input, standardized, bias, stride, padding, dilation, groups)


def scaled_ws_conv2d(input: Tensor, weight: Tensor, gain: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     stride: _IntOrPair = 1, padding: Union[str, _IntOrPair] = 0, dilation: _IntOrPair = 1,
                     groups: int = 1, *, gamma: float = 1.0, eps: float = 1e-6) -> Tensor:
    """:func:`torch.nn.functional.conv2d` with the weight standardized by :func:`scaled_weight_standardize` first."""
    standardized = scaled_weight_standardize(weight, gain, gamma, eps)
    _check_conv_input(input, weight, groups)
    return torch.nn.functional.conv2d(input, standardized, bias, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------------------------------------------------
# EvoNorm
# ----------------------------------------------------------------------------------------------------------------------


def _evo_check_args(input: Tensor, per_channel: dict[str, Optional[Tensor]], eps: float, *,
                    groups: Optional[int] = None, momentum: Optional[float] = None) -> None:
    _check_float_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got {input.dim()}-D input of shape {list(input.shape)}")
    channels = input.shape[1]
    for name, t in per_channel.items():
        if t is None:
            continue
        _check_float_tensor(name, t)
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},), the channel count of input (N, C, H, W) = "
                             f"{list(input.shape)}; got {name} of shape {list(t.shape)}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if groups is not None:
        if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups <= 0:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if channels % groups != 0:
            raise ValueError(f"groups ({groups}) must divide the number of channels (C = input.shape[1] = {channels}); "
                             f"input has shape {list(input.shape)}")
    _evo_check_scalars(eps, momentum)


def _evo_check_scalars(eps: float, momentum: Optional[float] = None) -> None:
    """``eps`` finite and ≥ 0; ``momentum`` (when given) in [0, 1]. Also used by the modules' constructors."""
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    if momentum is not None and (not isinstance(momentum, numbers.Real) or isinstance(momentum, bool)
                                 or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")


def _evo_norm_b(variant: str, input: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor],
                bias: Optional[Tensor], v: Optional[Tensor], training: bool, momentum: float, eps: float,
                apply_act: bool, sync_stats: bool = False, process_group: Optional[Any] = None) -> Tensor:
    """The B sub-family (``variant`` in ``"b0"``, ``"b1"``, ``"b2"``): checks, then the Triton ops or the reference."""
    _evo_check_args(input, {"running_var": running_var, "weight": weight, "bias": bias, "v": v}, eps,
                    momentum=momentum)
    sync = moment_sync(sync_stats, process_group, training) if apply_act else None
    if apply_act:
        if variant == "b0" and v is None:
            raise ValueError("evo_norm2d_b0 with apply_act=True needs v, the (C,) parameter of its nonlinearity")
        if running_var is None and not training:
            raise ValueError("running_var is required in eval mode (training=False): it is the variance used")
        values_per_channel = input.shape[0] * input.shape[2] * input.shape[3]
        # With synced statistics only the global count matters, and reading it would be a host sync: not checked.
        if sync is None and training and running_var is not None and values_per_channel == 1:
            raise ValueError(f"Expected more than 1 value per channel when training (N·H·W = {values_per_channel} for "
                             f"input of shape {list(input.shape)}): the running-variance update divides by N·H·W − 1, "
                             "as torch.nn.BatchNorm2d refuses to")
    if input.numel() == 0 and sync is None:
        return _empty_batch_output(input, weight, bias, v)
    if apply_act and use_triton(input):
        return _evo_norm_b_planes(variant, input, running_var, weight, bias, v, training, float(momentum), float(eps),
                                  sync)
    return _ref_evo.evo_norm_b(input, running_var, weight, bias, v, variant=variant, training=training,
                               momentum=float(momentum), eps=float(eps), apply_act=apply_act, sync=sync)


def _evo_norm_s(variant: str, input: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                v: Optional[Tensor], activation: Optional[Callable[[Tensor], Tensor]], eps: float, apply_act: bool,
                always_normalize: bool) -> Tensor:
    """The S sub-family (``variant`` in ``"s0"``, ``"s1"``, ``"s2"``; ``always_normalize`` for timm's "a"
    variants): checks, then the Triton ops or the reference."""
    _evo_check_args(input, {"weight": weight, "bias": bias, "v": v}, eps, groups=groups)
    if apply_act and variant == "s0" and v is None:
        raise ValueError("evo_norm2d_s0/s0a with apply_act=True need v, the (C,) parameter of their nonlinearity")
    if activation is not None and not callable(activation):
        raise TypeError(f"activation must be a callable (Tensor -> Tensor) or None, got {type(activation).__name__}")
    if input.numel() == 0:
        return _empty_batch_output(input, weight, bias, v)
    if (apply_act or always_normalize) and use_triton(input):
        return _evo_norm_s_planes(variant, input, int(groups), weight, bias, v, activation, float(eps), apply_act)
    return _ref_evo.evo_norm_s(input, int(groups), weight, bias, v, variant=variant, activation=activation,
                               eps=float(eps), apply_act=apply_act, always_normalize=always_normalize)


def _evo_affine_coefficients(weight: Optional[Tensor], bias: Optional[Tensor], scale: Tensor
                             ) -> tuple[Tensor, Tensor]:
    """``(scale·γ, β)`` as ``(N, C)`` coefficients of the plane ops, from a per-plane ``scale`` (``(N, C)``)."""
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = bias.to(scale.dtype).expand(scale.shape) if bias is not None else scale.new_zeros(scale.shape)
    return scale, shift


def _evo_norm_b_planes(variant: str, input: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], v: Optional[Tensor], training: bool, momentum: float,
                       eps: float, sync: Optional[MomentSync]) -> Tensor:
    """The B family through the Triton ops: ``plane_moments``, then ``(N, C)`` torch ops, then one fused pass.

    Every statistic follows exactly from the planes' ``(mean, var)``: the batch variance of a channel is the mean of
    its planes' variances plus the variance of their means (equal counts); a plane's ``mean(x²)`` is ``var + mean²``.
    Each variant's right-hand side is affine in ``x`` within a plane — B0 ``v·x + std``, B1 ``rms·x + rms``,
    B2 ``−x + rms`` — which is what :func:`~normlayers.ops.evo_norm.plane_max_div_affine` takes. Autograd of the
    small ops links the fused pass's backward to ``plane_moments``'s. Same semantics as the reference, buffer included.
    """
    n, channels, height, width = input.shape
    plane_mean, plane_var = _ops_channel.plane_moments(input)
    opmath = plane_mean.dtype
    if training:
        batch_mean, var = _batch_moments_from_planes(plane_mean, plane_var)
        count: Union[int, Tensor] = n * height * width
        if sync is not None:
            _, var, count = sync(batch_mean, var, count)
        if running_var is not None:
            _ref_evo.update_running_var_(running_var, var, count, momentum)
    else:
        var = running_var.to(opmath)
    left = torch.sqrt(var + eps).expand(n, channels)
    if variant == "b0":
        slope, offset = v.to(opmath).expand(n, channels), torch.sqrt(plane_var + eps)
    else:
        rms = torch.sqrt(plane_var + plane_mean.square() + eps)
        slope, offset = (rms if variant == "b1" else torch.full_like(rms, -1.0)), rms
    scale, shift = _evo_affine_coefficients(weight, bias, plane_mean.new_ones(n, channels))
    return _ops_evo.plane_max_div_affine(input, left, slope, offset, scale, shift)


def _evo_is_silu(activation: Optional[Callable[[Tensor], Tensor]]) -> bool:
    return activation is torch.nn.functional.silu or type(activation) is torch.nn.SiLU


def _evo_norm_s_planes(variant: str, input: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                       v: Optional[Tensor], activation: Optional[Callable[[Tensor], Tensor]], eps: float,
                       apply_act: bool) -> Tensor:
    """The S family through the Triton ops: ``plane_moments``, the group statistic by ``(N, C)`` torch ops (the mean
    of the planes' variances plus the variance of their means; S2: the mean of ``var + mean²``), then one fused pass.

    The numerator ``x·sigmoid(v·x)`` (S0, and SiLU, ``v = 1``) is fused into
    :func:`~normlayers.ops.evo_norm.plane_swish_affine`; the identity (no activation, or timm's "a" variants with
    ``apply_act=False``) is :func:`~normlayers.ops.channel_stats.plane_affine`; any other activation runs as torch ops
    on the fp32 (fp64) input and its result goes through ``plane_affine``.
    """
    n, channels = input.shape[:2]
    plane_mean, plane_var = _ops_channel.plane_moments(input)
    per_group = (n, groups, channels // groups)
    group_mean, group_var = plane_mean.view(per_group), plane_var.view(per_group)
    if variant == "s2":
        statistic = (group_var + group_mean.square()).mean(-1, keepdim=True)
    else:
        statistic = group_var.mean(-1, keepdim=True) + (
            group_mean - group_mean.mean(-1, keepdim=True)).square().mean(-1, keepdim=True)
    inv_denominator = torch.rsqrt(statistic + eps).expand(per_group).reshape(n, channels)
    scale, shift = _evo_affine_coefficients(weight, bias, inv_denominator)
    if apply_act and (variant == "s0" or _evo_is_silu(activation)):
        slope = v.to(scale.dtype).expand(n, channels) if variant == "s0" else torch.ones_like(scale)
        return _ops_evo.plane_swish_affine(input, slope, scale, shift)
    if apply_act and activation is not None:
        numerator = activation(input.to(scale.dtype))
        return _ops_channel.plane_affine(numerator, torch.zeros_like(scale), scale, shift).to(input.dtype)
    return _ops_channel.plane_affine(input, torch.zeros_like(scale), scale, shift)


def _evo_append_doc(*sections: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Append the Args sections the EvoNorm functional forms share to a function's own docstring."""
    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        fn.__doc__ = (fn.__doc__ or "") + "".join(sections)
        return fn
    return decorate


_EVO_B_DOC = """
    Args:
        input: ``(N, C, H, W)``, any float dtype; statistics in fp32 (fp64 for fp64 input), output in ``input``'s
            dtype.
        running_var: ``(C,)``, the running (unbiased) variance. Used in eval; updated in place in training as
            ``running_var ← (1 − momentum)·running_var + momentum·var·n/(n − 1)`` with ``n = N·H·W`` (timm's rule,
            spec B §4.3), which needs ``n > 1``; an empty input (``n = 0``) gives an empty output and leaves it
            alone, as ``nn.BatchNorm2d``. May be ``None`` in training (no update).
        weight, bias: the ``(C,)`` affine ``γ``, ``β``. Default: ``None`` (none).
        training: batch variance (with gradient) and the running update when ``True``. Default: ``False``.
        momentum: the running-variance rate in [0, 1]. Default: ``0.1``.
        eps: added inside every square root (both sides of the ``max``); its default is the layer's, above.
        apply_act (keyword-only): ``False`` is affine only — no normalization, ``running_var`` untouched — as timm's
            ``apply_act=False`` (and TF's ``nonlinearity=False``). Default: ``True``.
        sync_stats, process_group (keyword-only): in training, with ``torch.distributed`` initialized and more than
            one rank in ``process_group`` (default: the world), take the batch variance over the global batch
            (:mod:`normlayers.distributed`); every rank must then call this, also with an empty batch.
            Default: ``False``.

    At an exact tie of the two sides of the ``max`` the gradient is split half/half, PyTorch's rule for
    :func:`torch.maximum` (spec B §4.5).
"""

_EVO_S_DOC = """
    Args:
        input: ``(N, C, H, W)``, any float dtype; statistics in fp32 (fp64 for fp64 input), output in ``input``'s
            dtype.
        groups: the number of channel groups; must divide ``C``. Default: ``32``.
        weight, bias: the ``(C,)`` affine ``γ``, ``β``. Default: ``None`` (none).
        eps: added inside the square root of the group statistic; its default is the layer's, above.
        apply_act (keyword-only): whether the nonlinearity is applied; see above for what ``False`` means.
            Default: ``True``.
"""

_EVO_ACTIVATION_DOC = """        activation (keyword-only): the nonlinearity ``a``, a callable on the fp32 (fp64) tensor, or ``None`` for
            the identity. Default: :func:`torch.nn.functional.silu`.
"""


@_evo_append_doc(_EVO_B_DOC)
def evo_norm2d_b0(input: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, v: Optional[Tensor] = None, training: bool = False,
                  momentum: float = 0.1, eps: float = 1e-3, *, apply_act: bool = True, sync_stats: bool = False,
                  process_group: Optional[Any] = None) -> Tensor:
    r"""EvoNorm-B0 (Liu et al., NeurIPS 2020; spec B §4.1, timm's ``EvoNorm2dB0``):

    .. math::
        y = \frac{x}{\max\left(\sqrt{\sigma^2_{n,h,w} + \epsilon},\ v x + \sqrt{s^2_{h,w}(x) + \epsilon}\right)}
            \cdot \gamma + \beta

    ``σ²`` is the biased batch variance of each channel in training, ``running_var`` in eval; ``s²_{h,w}`` the
    biased variance of each (sample, channel) over H, W. ``v`` is the ``(C,)`` parameter of the nonlinearity,
    required with ``apply_act=True``. ``eps`` (default ``1e-3``, timm's) goes inside both square roots.
    """
    return _evo_norm_b("b0", input, running_var, weight, bias, v, training, momentum, eps, apply_act, sync_stats,
                       process_group)


@_evo_append_doc(_EVO_B_DOC)
def evo_norm2d_b1(input: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                  *, apply_act: bool = True, sync_stats: bool = False, process_group: Optional[Any] = None) -> Tensor:
    r"""EvoNorm-B1 (timm's ``EvoNorm2dB1``; spec B §4.1):

    .. math::
        y = \frac{x}{\max\left(\sqrt{\sigma^2_{n,h,w} + \epsilon},\ (x + 1)\sqrt{\mathrm{mean}_{h,w}(x^2) + \epsilon}
            \right)} \cdot \gamma + \beta

    ``σ²`` as in :func:`evo_norm2d_b0`; ``eps`` defaults to ``1e-5``.
    """
    return _evo_norm_b("b1", input, running_var, weight, bias, None, training, momentum, eps, apply_act, sync_stats,
                       process_group)


@_evo_append_doc(_EVO_B_DOC)
def evo_norm2d_b2(input: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                  *, apply_act: bool = True, sync_stats: bool = False, process_group: Optional[Any] = None) -> Tensor:
    r"""EvoNorm-B2 (timm's ``EvoNorm2dB2``; spec B §4.1):

    .. math::
        y = \frac{x}{\max\left(\sqrt{\sigma^2_{n,h,w} + \epsilon},\ \sqrt{\mathrm{mean}_{h,w}(x^2) + \epsilon} - x
            \right)} \cdot \gamma + \beta

    ``σ²`` as in :func:`evo_norm2d_b0`; ``eps`` defaults to ``1e-5``.
    """
    return _evo_norm_b("b2", input, running_var, weight, bias, None, training, momentum, eps, apply_act, sync_stats,
                       process_group)


@_evo_append_doc(_EVO_S_DOC)
def evo_norm2d_s0(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  v: Optional[Tensor] = None, eps: float = 1e-5, *, apply_act: bool = True) -> Tensor:
    r"""EvoNorm-S0 (Liu et al., NeurIPS 2020; spec B §4.1, timm's ``EvoNorm2dS0``):

    .. math:: y = \frac{x \cdot \mathrm{sigmoid}(v x)}{\sqrt{s^2_{g,h,w}(x) + \epsilon}} \cdot \gamma + \beta

    with the biased variance over each sample's group of ``C/groups`` channels and all of H, W. ``v``: ``(C,)``,
    required with ``apply_act=True``. ``apply_act=False`` is affine only. Batch-independent: no running statistics.
    """
    return _evo_norm_s("s0", input, groups, weight, bias, v, None, eps, apply_act, False)


@_evo_append_doc(_EVO_S_DOC)
def evo_norm2d_s0a(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   v: Optional[Tensor] = None, eps: float = 1e-3, *, apply_act: bool = True) -> Tensor:
    r"""timm's EvoNorm-S0a: :func:`evo_norm2d_s0` with ``eps=1e-3``, whose ``apply_act=False`` still normalizes:
    ``y = x / sqrt(s²_{g,h,w}(x) + eps) · γ + β`` (spec B §4.1; timm-only, not in the paper).
    """
    return _evo_norm_s("s0", input, groups, weight, bias, v, None, eps, apply_act, True)


@_evo_append_doc(_EVO_S_DOC, _EVO_ACTIVATION_DOC)
def evo_norm2d_s1(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  eps: float = 1e-5, *, activation: Optional[Callable[[Tensor], Tensor]] = torch.nn.functional.silu,
                  apply_act: bool = True) -> Tensor:
    r"""EvoNorm-S1 (timm's ``EvoNorm2dS1``; spec B §4.1):

    .. math:: y = \frac{a(x)}{\sqrt{s^2_{g,h,w}(x) + \epsilon}} \cdot \gamma + \beta

    ``a`` defaults to SiLU; the denominator is a statistic of ``x``, not of ``a(x)``. ``apply_act=False`` is affine
    only.
    """
    return _evo_norm_s("s1", input, groups, weight, bias, None, activation, eps, apply_act, False)


@_evo_append_doc(_EVO_S_DOC, _EVO_ACTIVATION_DOC)
def evo_norm2d_s1a(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-3, *, activation: Optional[Callable[[Tensor], Tensor]] = torch.nn.functional.silu,
                   apply_act: bool = True) -> Tensor:
    r"""timm's EvoNorm-S1a: :func:`evo_norm2d_s1` with ``eps=1e-3``, whose ``apply_act=False`` still normalizes
    (without ``a``): ``y = x / sqrt(s²_{g,h,w}(x) + eps) · γ + β`` (timm-only, spec B §4.1).
    """
    return _evo_norm_s("s1", input, groups, weight, bias, None, activation, eps, apply_act, True)


@_evo_append_doc(_EVO_S_DOC, _EVO_ACTIVATION_DOC)
def evo_norm2d_s2(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  eps: float = 1e-5, *, activation: Optional[Callable[[Tensor], Tensor]] = torch.nn.functional.silu,
                  apply_act: bool = True) -> Tensor:
    r"""EvoNorm-S2 (timm's ``EvoNorm2dS2``; spec B §4.1):

    .. math:: y = \frac{a(x)}{\sqrt{\mathrm{mean}_{g,h,w}(x^2) + \epsilon}} \cdot \gamma + \beta

    the group RMS (not the variance) of ``x``; ``a`` defaults to SiLU. ``apply_act=False`` is affine only.
    """
    return _evo_norm_s("s2", input, groups, weight, bias, None, activation, eps, apply_act, False)


@_evo_append_doc(_EVO_S_DOC, _EVO_ACTIVATION_DOC)
def evo_norm2d_s2a(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-3, *, activation: Optional[Callable[[Tensor], Tensor]] = torch.nn.functional.silu,
                   apply_act: bool = True) -> Tensor:
    r"""timm's EvoNorm-S2a: :func:`evo_norm2d_s2` with ``eps=1e-3``, whose ``apply_act=False`` still normalizes
    (without ``a``): ``y = x / sqrt(mean_{g,h,w}(x²) + eps) · γ + β`` (timm-only, spec B §4.1).
    """
    return _evo_norm_s("s2", input, groups, weight, bias, None, activation, eps, apply_act, True)


# ----------------------------------------------------------------------------------------------------------------------
# SPD batch normalization (Generalized Bures–Wasserstein)
# ----------------------------------------------------------------------------------------------------------------------


def _spd_check_matrices(input: Tensor) -> None:
    """Eager-mode value checks of an SPD batch (one host sync; skipped under torch.compile and on meta tensors).

    Asymmetry up to ``sqrt(finfo.eps)`` relative to the largest entry is accepted (rounding in an upstream BiMap
    ``WᵀXW``) and the layer symmetrizes; more is an error. Positive definiteness is checked on fp64 eigenvalues, which
    resolve every SPD matrix of condition number below ~1e15. (Not ``cholesky_ex``: its ``tril`` opens an OpenMP
    parallel region, which on a busy 2-core CPU took 7–15 ms per call for a (4, 2, 3, 3) batch against 0.01 ms for
    ``eigvalsh``; with one thread Cholesky is 2.5 µs and eigvalsh 14 µs.)
    """
    if input.is_meta or torch.compiler.is_compiling() or input.numel() == 0:
        return
    with torch.no_grad():
        scale = input.abs().amax((-2, -1)).clamp_min(torch.finfo(input.dtype).tiny)
        asymmetry = (input - input.mT).abs().amax((-2, -1)) / scale
        finite = torch.isfinite(input).all()
        not_pd = torch.linalg.eigvalsh(torch.where(finite, input, 1.0).to(torch.float64)).amin(-1) <= 0
        bad = torch.stack([(asymmetry > torch.finfo(input.dtype).eps ** 0.5).any(), not_pd.any(),
                           ~finite]).tolist()
    if bad[2]:
        raise ValueError("input must be finite SPD matrices, got NaN or inf entries")
    if bad[0]:
        raise ValueError(f"input must be symmetric matrices: the largest relative asymmetry |X − Xᵀ|/|X| is "
                         f"{asymmetry.max().item():.3g} (more than rounding)")
    if bad[1]:
        raise ValueError(f"input must be symmetric positive definite: {int(not_pd.sum())} of the "
                         f"{not_pd.numel()} matrices have a non-positive eigenvalue")


def _check_spd_batch_norm_args(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                               weight: Optional[Tensor], metric: Optional[Tensor], shift: Optional[Tensor],
                               training: bool, momentum: float, eps: float, theta: float, variance: str,
                               karcher_steps: int, compute_dtype: Optional[torch.dtype], synced: bool) -> bool:
    """Validates the arguments of :func:`spd_batch_norm`; returns whether the state is per channel."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"input must be float32 or float64 (eigendecompositions need them), got {input.dtype}")
    if input.dim() < 3 or input.shape[-1] != input.shape[-2]:
        raise ValueError(f"input must be a batch of square matrices (*, n, n) with at least one batch dim, got shape "
                         f"{list(input.shape)}")
    n = input.shape[-1]
    tensors = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "metric": metric,
               "shift": shift}
    for name, t in tensors.items():
        if t is not None:
            _check_float_tensor(name, t)
            if t.device != input.device:
                raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    matrix_state = [t for t in (running_mean, weight) if t is not None]
    per_channel = any(t.dim() == 3 for t in matrix_state) or any(
        t is not None and t.dim() == 1 for t in (running_var, shift))
    if per_channel:
        if input.dim() < 4:
            raise ValueError(f"per-channel state needs input of shape (*, C, n, n) with a batch dim, got shape "
                             f"{list(input.shape)}")
        channels = input.shape[-3]
        matrix_shape, scalar_shape = (channels, n, n), (channels,)
        layout = f"per-channel state for input (*, C, n, n) = {list(input.shape)}"
    else:
        matrix_shape, scalar_shape = (n, n), ()
        layout = f"statistics pooled over all leading dims of input {list(input.shape)}"
    for name, t, expected in (("running_mean", running_mean, matrix_shape), ("weight", weight, matrix_shape),
                              ("running_var", running_var, scalar_shape), ("shift", shift, scalar_shape)):
        if t is not None and tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape {list(expected)} ({layout}), got {list(t.shape)}")
    if metric is not None and tuple(metric.shape) not in ((n, n), matrix_shape):
        raise ValueError(f"metric must have shape {[n, n]} or {list(matrix_shape)} ({layout}), got "
                         f"{list(metric.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if running_mean is None and not training:
        raise ValueError("running_mean and running_var are required in eval mode (training=False)")
    samples = input.numel() // (n * n * (input.shape[-3] if per_channel else 1)) if input.numel() else 0
    # With synced statistics only the global count matters, and reading it would be a host sync: not checked.
    if training and samples < 2 and not synced:
        raise ValueError(f"Expected more than 1 matrix per statistics group when training (input of shape "
                         f"{list(input.shape)}): the batch dispersion of one matrix is 0; use eval mode")
    _check_unit_interval("momentum", momentum)
    _check_epsilon("eps", eps)
    if not isinstance(theta, numbers.Real) or isinstance(theta, bool) or theta == 0 or not math.isfinite(theta):
        raise ValueError(f"theta must be a finite non-zero number (the power deformation X^theta), got {theta!r}")
    if variance not in _ref_spd.VARIANCES:
        raise ValueError(f"variance must be one of {_ref_spd.VARIANCES}, got {variance!r}")
    if not isinstance(karcher_steps, numbers.Integral) or isinstance(karcher_steps, bool) or karcher_steps < 0:
        raise ValueError(f"karcher_steps must be a non-negative int, got {karcher_steps!r}")
    if compute_dtype not in (None, torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be torch.float64, torch.float32 or None (the input's), got "
                        f"{compute_dtype!r}")
    _spd_check_matrices(input)
    return per_channel


def spd_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, metric: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *, theta: float = 1.0,
                   variance: str = "frechet", karcher_steps: int = 1, reference_roundtrip: bool = False,
                   compute_dtype: Optional[torch.dtype] = torch.float64, sync_stats: bool = False,
                   process_group: Optional[Any] = None) -> Tensor:
    r"""SPD batch normalization under the (θ, M)-Generalized Bures–Wasserstein geometry (GBWBN; spec
    ``spd_gbw_batchnorm.md`` §3.2). In the deformed coordinates :math:`\tilde X = M^{-1/2} X^\theta M^{-1/2}`:

    .. math::
        Y_i = \mathrm{Exp}_{\tilde W}\Big(\Gamma_{I\to\tilde W}\,\frac{s}{\sqrt{v + \epsilon}}\,
              \Gamma_{B\to I}\,\mathrm{Log}_B \tilde X_i\Big), \qquad
        \mathrm{out}_i = (M^{1/2} Y_i M^{1/2})^{1/\theta}

    with ``B`` the batch BW barycenter (``karcher_steps`` fixed-point steps from the arithmetic mean) and ``v`` the
    batch dispersion in training, ``running_mean``/``running_var`` in eval. See :class:`normlayers.SPDBatchNorm`.

    Args:
        input: SPD matrices ``(*, n, n)`` (statistics pooled over all leading dims), or ``(*, C, n, n)`` with
            per-channel state. float32 or float64; symmetrized (asymmetry beyond rounding is an error).
        running_mean, running_var: ``(n, n)``/``()`` or ``(C, n, n)``/``(C,)`` buffers, updated in place in training
            (running mean along the BW geodesic). May be ``None`` only in training.
        weight: the SPD bias ``W``, ``(n, n)`` or ``(C, n, n)``; ``None`` is the identity.
        metric: the SPD metric parameter ``M``, ``(n, n)`` or ``(C, n, n)``; ``None`` is the identity (plain BW).
        shift: the dispersion ``s``, ``()`` or ``(C,)``; ``None`` is 1.
        training: batch statistics and running updates when ``True``. Default: ``False``.
        momentum: the running-statistics rate. Default: ``0.1``.
        eps: added to the dispersion. Default: ``1e-5``.
        theta: the power deformation θ (non-zero). Default: ``1.0``.
        variance: ``"frechet"`` (mean squared distance to the batch mean) or ``"reference"`` (the authors' code:
            around the identity). Default: ``"frechet"``.
        karcher_steps: barycenter fixed-point steps. Default: ``1`` (the authors').
        reference_roundtrip: reproduce the authors' Exp_I/Log_I round trip (spec §2.3). Default: ``False``.
        compute_dtype: the dtype of the per-sample eigendecompositions; ``None`` is the input's. Parameter-side and
            statistics-side ones are always float64. The output has the input's dtype. Default: ``torch.float64``.
        sync_stats, process_group: in training, with ``torch.distributed`` initialized and more than one rank in
            ``process_group`` (``None``: the world), the barycenter and the dispersion are the global batch's: the
            batch sums of the barycenter's start and of every fixed-point step, and of the dispersion, are
            all-reduced and divided by the global count (docs/distributed.md). Default: ``False``, ``None``.

    The per-channel layout is inferred from the state's shapes; statistics are detached, as in the authors' code.
    In eager mode the input is checked to be symmetric positive definite (one host sync; skipped under
    ``torch.compile``). Runs the plain-PyTorch reference on every device and backend (there is no Triton path).
    """
    group = sync_group(sync_stats, process_group, training)
    per_channel = _check_spd_batch_norm_args(input, running_mean, running_var, weight, metric, shift, training,
                                             momentum, eps, theta, variance, karcher_steps, compute_dtype,
                                             synced=group is not None)
    return _ref_spd.spd_batch_norm(
        input, running_mean, running_var, weight, metric, shift, training=training, momentum=float(momentum),
        eps=float(eps), theta=float(theta), variance=variance, karcher_steps=int(karcher_steps),
        reference_roundtrip=bool(reference_roundtrip), per_channel=per_channel, compute_dtype=compute_dtype,
        sum_over_ranks=None if group is None else lambda t: all_reduce_sum(t, group))


# ----------------------------------------------------------------------------------------------------------------------
# Region Normalization
# ----------------------------------------------------------------------------------------------------------------------

_REGION_STATS = ("batch", "instance")
_REGION_EPS_MODES = ("official", "plain")
_REGION_AFFINES = ("masked", "official")


def _region_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _region_eps_mode(eps_mode: Optional[str], stats: str) -> str:
    """``None`` follows ``stats``: the official code's effective epsilon with its batch statistics, the paper's plain
    epsilon with per-sample statistics (spec B §3.3 item 2)."""
    if eps_mode is None:
        return "official" if stats == "batch" else "plain"
    return _region_choice("eps_mode", eps_mode, _REGION_EPS_MODES)


def _check_region_eps(eps: object) -> float:
    # eps > 0, not >= 0: a region whose values are all equal (one pixel, for one) has zero variance.
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite positive number (a region of equal values has zero variance), "
                         f"got {eps!r}")
    return float(eps)


def _check_region_input(input: Tensor, mask: Tensor) -> None:
    _check_float_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got {input.dim()}-D input of shape {list(input.shape)}")
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or real floating (nonzero = hole), got {mask.dtype}")
    n, channels = input.shape[:2]
    if mask.dim() != 4 or mask.shape[0] != n or mask.shape[1] not in (1, channels):
        raise ValueError(f"mask must have shape (N, 1, H', W') or (N, C, H', W') for input (N, C, H, W) = "
                         f"{list(input.shape)}, got mask of shape {list(mask.shape)}")
    if input.shape[2] * input.shape[3] > 0 and mask.shape[2] * mask.shape[3] == 0:
        raise ValueError(f"mask has no pixels (shape {list(mask.shape)}) to resize to input's {list(input.shape[2:])}")
    if mask.device != input.device:
        raise ValueError(f"mask is on {mask.device} but input is on {input.device}")


def _check_region_params(input: Tensor, params: dict[str, Optional[Tensor]]) -> None:
    channels = input.shape[1]
    for name, t in params.items():
        if t is None:
            continue
        if tuple(_check_float_tensor(name, t).shape) != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},), the channel count of input (N, C, H, W) = "
                             f"{list(input.shape)}; got {name} of shape {list(t.shape)}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")


def region_norm(input: Tensor, mask: Tensor, foreground_gamma: Optional[Tensor] = None,
                foreground_beta: Optional[Tensor] = None, background_gamma: Optional[Tensor] = None,
                background_beta: Optional[Tensor] = None, eps: float = 1e-5, stats: str = "batch", *,
                eps_mode: Optional[str] = None, affine: str = "masked", sync_stats: bool = False,
                process_group: Optional[Any] = None) -> Tensor:
    r"""Region Normalization with a given mask, RN-B (Yu et al., AAAI 2020; spec B §3).

    Each channel is standardized separately in the hole region (``mask`` nonzero, the authors' "foreground") and in
    the valid region, then a ``(1 + γ)`` region affine follows:

    .. math::
        y = \sum_{r \in \{\text{hole}, \text{valid}\}} w_r \cdot \frac{x - \mu_r}{\sqrt{\sigma^2_r + \epsilon_r}}
            \cdot (1 + \gamma_r) + \text{shift}

    where ``w_hole = m``, ``w_valid = 1 − m`` and ``μ_r``, ``σ²_r`` (biased) are the region's mean and variance of
    each channel over ``(N, H, W)`` (``stats="batch"``, the official code) or over ``(H, W)`` of each sample
    (``stats="instance"``, the paper). ``shift = Σ_r w_r·β_r`` (``affine="masked"``) or ``β_hole + β_valid`` at
    every pixel (``affine="official"``, the official code). An empty region contributes exactly 0.

    Args:
        input: ``(N, C, H, W)``, any float dtype; statistics in fp32 (fp64 for fp64 input), output in ``input``'s
            dtype.
        mask: ``(N, 1, H', W')`` or ``(N, C, H', W')``, bool or numeric: **nonzero = hole** (the authors binarize
            masks with ``> 0``); resized to ``(H, W)`` by nearest interpolation. No gradient flows into it.
        foreground_gamma, foreground_beta: the hole region's ``(C,)`` affine (``None``: 0). Default: ``None``.
        background_gamma, background_beta: the valid region's ``(C,)`` affine (``None``: 0). Default: ``None``.
        eps: a positive number. Default: ``1e-5``.
        stats: ``"batch"`` or ``"instance"``. Default: ``"batch"``.
        eps_mode (keyword-only): ``"official"``: ``ε_r = ε·V/S_r`` with ``S_r`` the region's value count and ``V``
            the values per statistic (``N·H·W`` or ``H·W``), the official code's effective epsilon (spec §3.2);
            ``"plain"``: ``ε_r = ε``. Default ``None``: ``"official"`` with ``stats="batch"``, ``"plain"`` with
            ``"instance"``.
        affine (keyword-only): how the betas apply, ``"masked"`` or ``"official"`` (see above). Default:
            ``"masked"``.
        sync_stats, process_group (keyword-only): with ``stats="batch"``, ``torch.distributed`` initialized and more
            than one rank in ``process_group`` (``None``: the world), the statistics are those of the global batch:
            every rank's per-(channel, region) ``(count, mean, M2)`` combined with Chan's formula, and the effective
            epsilon from the global counts (see docs/distributed.md). A no-op with ``stats="instance"``. Unlike the
            batch norms this functional has no ``training`` flag: it syncs whenever asked (the modules ask only in
            training). Default: ``False``, ``None``.
    """
    _check_region_input(input, mask)
    _check_region_params(input, {"foreground_gamma": foreground_gamma, "foreground_beta": foreground_beta,
                                 "background_gamma": background_gamma, "background_beta": background_beta})
    eps = _check_region_eps(eps)
    stats = _region_choice("stats", stats, _REGION_STATS)
    eps_mode = _region_eps_mode(eps_mode, stats)
    affine = _region_choice("affine", affine, _REGION_AFFINES)
    sync = _region_sync(stats, sync_stats, process_group)
    if use_triton(input):
        hole = _ref_region.prepare_mask(mask, input.shape[2:])
        return _region_norm_planes(input, hole, foreground_gamma, foreground_beta, background_gamma,
                                   background_beta, eps=eps, stats=stats, eps_mode=eps_mode, affine=affine, sync=sync)
    return _ref_region.region_norm(input, mask, foreground_gamma, foreground_beta, background_gamma, background_beta,
                                   eps=eps, stats=stats, eps_mode=eps_mode, affine=affine, sync=sync)


def _region_sync(stats: str, sync_stats: bool, process_group: Optional[Any]
                 ) -> Optional[_ref_region.MaskedMomentSync]:
    """The combiner of per-(channel, region) moments over the ranks, or ``None``: per-sample statistics
    (``stats="instance"``) need none, and the functional syncs whenever asked (the module asks only in training)."""
    group = sync_group(sync_stats, process_group, True) if stats == "batch" else None
    if group is None:
        return None
    return lambda mean, var, count: sync_masked_moments(mean, var, count, group)


def _region_pair(hole: Optional[Tensor], valid: Optional[Tensor], center: Tensor) -> Optional[Tensor]:
    """The ``(C, 2)`` stack, in ``center``'s dtype, of a hole and a valid per-channel parameter (a missing one is 0);
    ``None`` if both are missing."""
    if hole is None and valid is None:
        return None
    zeros = center.new_zeros(center.shape[1])
    return torch.stack([(zeros if hole is None else hole.to(center.dtype)),
                        (zeros if valid is None else valid.to(center.dtype))], dim=-1)


def _region_norm_planes(input: Tensor, hole: Tensor, foreground_gamma: Optional[Tensor],
                        foreground_beta: Optional[Tensor], background_gamma: Optional[Tensor],
                        background_beta: Optional[Tensor], *, eps: float, stats: str, eps_mode: str,
                        affine: str, sync: Optional[_ref_region.MaskedMomentSync] = None) -> Tensor:
    """RN through the Triton ops: two :func:`~normlayers.ops.region_norm.region_moments` passes (sums, then centred
    squares at the means), small ``(N, C, 2)`` torch ops for the statistics (pooled over the batch for
    ``stats="batch"``, then over the ranks by ``sync``), then one fused
    :func:`~normlayers.ops.region_norm.region_affine` pass. Autograd of the small ops links the backward kernels, so
    the gradient runs through the region statistics, as the reference's."""
    n, channels = input.shape[:2]
    opmath = torch.float64 if input.dtype == torch.float64 else torch.float32
    count, first, _ = _ops_region.region_moments(input, hole, input.new_zeros((n, channels, 2), dtype=opmath))
    values = math.prod(input.shape[2:])
    if stats == "batch":
        count, first, values = count.sum(0, keepdim=True), first.sum(0, keepdim=True), values * n
    safe_count = torch.where(count == 0, torch.ones_like(count), count)  # the official S[S==0] = 1 (spec §3.2)
    mean = first / safe_count
    _, _, second = _ops_region.region_moments(input, hole, mean.expand(n, channels, 2).contiguous())
    if stats == "batch":
        second = second.sum(0, keepdim=True)
    var = second / safe_count
    if sync is not None:
        # This rank's (count, mean, M2) per (channel, region), combined with Chan's formula; the effective epsilon
        # takes the global counts and V = the global N·H·W (the two regions' counts together).
        mean, var, count = sync(mean, var, count)
        values = count.sum(-1, keepdim=True)
        safe_count = torch.where(count == 0, torch.ones_like(count), count)
    center = mean.expand(n, channels, 2).contiguous()
    region_eps = eps * values / safe_count if eps_mode == "official" else eps
    scale = torch.rsqrt(var + region_eps)
    gamma = _region_pair(foreground_gamma, background_gamma, center)
    if gamma is not None:
        scale = scale * (1 + gamma)
    betas = [beta.to(center.dtype) for beta in (foreground_beta, background_beta) if beta is not None]
    if not betas:
        shift = torch.zeros_like(center)
    elif affine == "official":
        # Both betas at every pixel (spec §3.1), summed from the parameters themselves: the sum over a stacked pair
        # would backward into stride-0 views of one gradient, which autograd stores as both .grad tensors, so that a
        # later backward accumulating into them (gradient accumulation) would add twice into one buffer.
        total = betas[0] if len(betas) == 1 else betas[0] + betas[1]
        shift = torch.stack([total, total], dim=-1)
    else:
        shift = _region_pair(foreground_beta, background_beta, center)
    return _ops_region.region_affine(input, hole, center, scale.expand(n, channels, 2).contiguous(),
                                     shift.expand(n, channels, 2).contiguous())


def _check_learnable_region_args(input: Tensor, conv1_weight: Tensor, gamma_weight: Tensor,
                                 gamma_bias: Optional[Tensor], beta_weight: Tensor, beta_bias: Optional[Tensor],
                                 threshold: float) -> None:
    _check_float_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got {input.dim()}-D input of shape {list(input.shape)}")
    k = conv1_weight.shape[-1] if isinstance(conv1_weight, Tensor) and conv1_weight.dim() == 4 else None
    if k is None or k % 2 == 0 or tuple(conv1_weight.shape) != (1, 2, k, k):
        raise ValueError(f"conv1_weight must have shape (1, 2, k, k) with k odd (the official k is 7 or 3), got "
                         f"{list(conv1_weight.shape) if isinstance(conv1_weight, Tensor) else conv1_weight!r}")
    shapes = {"conv1_weight": (conv1_weight, (1, 2, k, k)), "gamma_weight": (gamma_weight, (1, 1, k, k)),
              "gamma_bias": (gamma_bias, (1,)), "beta_weight": (beta_weight, (1, 1, k, k)),
              "beta_bias": (beta_bias, (1,))}
    for name, (t, shape) in shapes.items():
        if t is None and name.endswith("bias"):
            continue
        if tuple(_check_float_tensor(name, t).shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (kernel size {k} from conv1_weight), got "
                             f"{list(t.shape)}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")


def learnable_region_norm(input: Tensor, conv1_weight: Tensor, gamma_weight: Tensor, gamma_bias: Optional[Tensor],
                          beta_weight: Tensor, beta_bias: Optional[Tensor], threshold: float = 0.8,
                          eps: float = 1e-5, stats: str = "batch", *, eps_mode: Optional[str] = None,
                          sync_stats: bool = False, process_group: Optional[Any] = None) -> Tensor:
    r"""Learnable Region Normalization, RN-L (Yu et al., AAAI 2020; spec B §3.1, the official ``RN_L``):

    .. math::
        s = \mathrm{sigmoid}(\mathrm{conv_1}([\mathrm{mean}_c(x), \max_c(x)])), \quad
        M = [s \ge \text{threshold}], \quad
        y = \mathrm{RN}(x; M) \cdot (1 + \mathrm{conv}_\gamma(s)) + \mathrm{conv}_\beta(s)

    ``RN`` is :func:`region_norm` without region affine, the regions being the thresholded map (``M = 1`` the
    "hole"); no gradient flows through the threshold, so ``conv1`` learns through ``γ`` and ``β`` only. All convs keep
    the spatial size (padding ``k // 2``).

    Args:
        input: ``(N, C, H, W)``, any float dtype.
        conv1_weight: ``(1, 2, k, k)``, ``k`` odd; channel 0 sees the channel mean, channel 1 the channel max.
        gamma_weight, gamma_bias: ``conv_γ``, ``(1, 1, k, k)`` and ``(1,)`` (or ``None``).
        beta_weight, beta_bias: ``conv_β``, ``(1, 1, k, k)`` and ``(1,)`` (or ``None``).
        threshold: the region threshold on ``s``. Default: ``0.8``.
        eps, stats, eps_mode: as :func:`region_norm`. Defaults: ``1e-5``, ``"batch"``, ``None``.
        sync_stats, process_group (keyword-only): global-batch region statistics, as :func:`region_norm`'s (the
            regions come from each sample's own map, so only the statistics are exchanged). Default: ``False``,
            ``None``.
    """
    _check_learnable_region_args(input, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias, threshold)
    eps = _check_region_eps(eps)
    stats = _region_choice("stats", stats, _REGION_STATS)
    eps_mode = _region_eps_mode(eps_mode, stats)
    sync = _region_sync(stats, sync_stats, process_group)
    if not use_triton(input):
        return _ref_region.learnable_region_norm(input, conv1_weight, gamma_weight, gamma_bias, beta_weight,
                                                 beta_bias, threshold=float(threshold), eps=eps, stats=stats,
                                                 eps_mode=eps_mode, sync=sync)
    s, gamma, beta = _ref_region.self_aware_affine(input, conv1_weight, gamma_weight, gamma_bias, beta_weight,
                                                   beta_bias)
    r = _region_norm_planes(input, s.detach() >= threshold, None, None, None, None, eps=eps, stats=stats,
                            eps_mode=eps_mode, affine="masked", sync=sync)
    return (r * (1 + gamma) + beta).to(input.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# PowerNorm and Unified Normalization (transformer batch-statistic norms; spec A §1, §2)
# ----------------------------------------------------------------------------------------------------------------------


def _flat_2d_mask(input: Tensor, pad_mask: Optional[Tensor], official_shape: tuple[int, int]) -> Optional[Tensor]:
    """For 2-D input the official code promotes the input to one token per sample, so its mask has a unit dim
    (``official_shape``); accept that form besides ``(B,)``."""
    if input.dim() == 2 and isinstance(pad_mask, Tensor) and tuple(pad_mask.shape) == official_shape:
        return pad_mask.reshape(-1)
    return pad_mask


def _check_token_norm_input(input: Tensor, pad_mask: Optional[Tensor], mask_shape: tuple[int, ...],
                            layout: str) -> int:
    """Checks shared by both layers; returns the channel count ``C``."""
    _check_float_tensor("input", input)
    if input.dim() not in (2, 3):
        raise ValueError(f"input must be 3-D {layout} or 2-D (B, C), got {input.dim()}-D input of shape "
                         f"{list(input.shape)}")
    if pad_mask is not None:
        if not isinstance(pad_mask, Tensor):
            raise TypeError(f"pad_mask must be a torch.Tensor, got {type(pad_mask).__name__}")
        if pad_mask.dtype != torch.bool:
            # `~` of an integer mask is a bitwise not (~1 = -2), which would silently select the wrong tokens.
            raise TypeError(f"pad_mask must be a bool tensor (True = padding), got {pad_mask.dtype}")
        if tuple(pad_mask.shape) != mask_shape:
            raise ValueError(f"pad_mask must have shape {list(mask_shape)} (True = padding) for input of shape "
                             f"{list(input.shape)} {layout if input.dim() == 3 else '(B, C)'}, got "
                             f"{list(pad_mask.shape)}")
        if pad_mask.device != input.device:
            raise ValueError(f"pad_mask is on {pad_mask.device} but input is on {input.device}")
    return input.shape[-1]


def _check_token_norm_state(input: Tensor, channels: int, per_channel: dict[str, Optional[Tensor]],
                            counters: dict[str, Tensor], windows: Optional[dict[str, Tensor]] = None) -> None:
    windows = windows or {}
    for name, t in per_channel.items():
        if t is None:
            continue
        _check_float_tensor(name, t)
        if t.numel() != channels:
            raise ValueError(f"input (..., C) and {name} must agree on C = num_features: input has C = {channels} "
                             f"(shape {list(input.shape)}), {name} has shape {list(t.shape)}")
    for name, t in windows.items():
        _check_float_tensor(name, t)
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] != channels:
            raise ValueError(f"{name} must have shape (window_size, C) with C = {channels}, got {list(t.shape)}")
    for name, t in counters.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a one-element integer tensor, got {type(t).__name__}")
        if t.numel() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must be a one-element integer tensor, got {t.dtype} of shape {list(t.shape)}")
    for name, t in {**per_channel, **windows, **counters}.items():
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")


def _check_nonnegative_int(name: str, value: object) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def power_norm(input: Tensor, running_phi: Tensor, ema_gz: Tensor, iters: Tensor, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, pad_mask: Optional[Tensor] = None, training: bool = False,
               eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9, warmup_iters: int = 10000,
               group_num: Optional[int] = 1, *, batch_first: bool = False, backward_denominator: str = "batch",
               sync_stats: bool = False, process_group: Optional[Any] = None) -> Tensor:
    r"""PowerNorm (Shen et al., ICML 2020; spec A §1), exactly as the official ``MaskPowerNorm``.

    .. math::
        u = \mathrm{GroupScaling}(x), \qquad y = \gamma \cdot \frac{u}{\sqrt{d + \epsilon}} + \beta

    In training ``d`` is the batch quadratic mean ``q = mean over non-pad tokens of u²`` for the first
    ``warmup_iters`` steps, then ``running_phi`` (before this step's update); the backward is the method's approximate
    one with the running statistic ``ema_gz``. In eval ``d = running_phi``. See :class:`normlayers.PowerNorm`.

    Args:
        input: ``(T, B, C)`` (time-major, as fairseq), ``(B, T, C)`` with ``batch_first=True``, or ``(B, C)``.
        running_phi, ema_gz: buffers with ``C`` elements (officially ``(1, C, 1, 1)``); training updates
            ``running_phi`` in the forward and ``ema_gz`` in the backward, in place.
        iters: one-element integer tensor, incremented in place by every training call (the step counter ``t``).
        weight, bias: ``(C,)`` or ``None``.
        pad_mask: ``(B, T)`` bool, True = padding (``(B,)`` or the official ``(B, 1)`` for 2-D input). Padding is
            left out of the forward statistic only (the backward's means run over all tokens, as the official code).
        training, eps, alpha_fwd, alpha_bkw, warmup_iters, group_num: as the module; ``group_num=None`` skips
            GroupScaling.
        batch_first: input ``(B, T, C)``. Default: ``False``.
        backward_denominator: ``"batch"`` (the official code: ``sqrt(q + eps)``) or ``"running"``
            (``sqrt(running_phi + eps)``, the paper's form as recalled, spec §1.7b). Default: ``"batch"``.
        sync_stats, process_group (keyword-only): in training, with ``torch.distributed`` initialized and more than
            one rank in ``process_group`` (default: the world), the statistics are those of the global batch: ``q``
            over the non-pad tokens of every rank, and the backward's mean for ``ema_gz`` over every rank's tokens
            (one all-reduce each; every rank must call, also with no tokens). Default: ``False``, ``None``.
    """
    if input.dim() == 3:
        mask_shape = tuple(input.shape[:2]) if batch_first else (input.shape[1], input.shape[0])
    else:
        mask_shape = tuple(input.shape[:1])
        pad_mask = _flat_2d_mask(input, pad_mask, (input.shape[0], 1))
    channels = _check_token_norm_input(input, pad_mask, mask_shape, "(B, T, C)" if batch_first else "(T, B, C)")
    _check_token_norm_state(input, channels, {"running_phi": running_phi, "ema_gz": ema_gz, "weight": weight,
                                              "bias": bias}, {"iters": iters})
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},), got {list(t.shape)}")
    _check_epsilon("eps", eps)
    _check_unit_interval("alpha_fwd", alpha_fwd)
    _check_unit_interval("alpha_bkw", alpha_bkw)
    _check_nonnegative_int("warmup_iters", warmup_iters)
    if group_num is not None:
        if not isinstance(group_num, numbers.Integral) or isinstance(group_num, bool) or group_num <= 0:
            raise ValueError(f"group_num must be a positive int or None, got {group_num!r}")
        if channels % group_num != 0:
            raise ValueError(f"group_num ({group_num}) must divide the channel count C = {channels}")
        group_num = int(group_num)
    if backward_denominator not in ("batch", "running"):
        raise ValueError(f"backward_denominator must be 'batch' or 'running', got {backward_denominator!r}")
    kwargs = dict(training=training, eps=float(eps), alpha_fwd=float(alpha_fwd), alpha_bkw=float(alpha_bkw),
                  warmup_iters=int(warmup_iters), group_num=group_num, batch_first=batch_first,
                  backward_denominator=backward_denominator,
                  sync_group=sync_group_name(sync_stats, process_group, training))
    if use_triton(input):
        return _power_norm_triton(input, running_phi, ema_gz, iters, weight, bias, pad_mask, **kwargs)
    return _ref_power.power_norm(input, running_phi, ema_gz, iters, weight, bias, pad_mask, **kwargs)


def _power_norm_triton(input: Tensor, running_phi: Tensor, ema_gz: Tensor, iters: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], pad_mask: Optional[Tensor], *, training: bool, eps: float,
                       alpha_fwd: float, alpha_bkw: float, warmup_iters: int, group_num: Optional[int],
                       batch_first: bool, backward_denominator: str, sync_group: Optional[str]) -> Tensor:
    """PowerNorm on the Triton ops: GroupScaling is the RMSNorm row kernel over groups (eps 1e-5), then the token
    statistics and the normalization; the per-channel steps are the reference's on-device helpers."""
    channels = input.shape[-1]
    u = input
    if group_num is not None:
        # GroupScaling's output u (and its gradient) in fp32 for fp16/bf16 activations, so the layer rounds once, at
        # its output, as the reference does (an fp16/bf16 u would add a rounding to every later step).
        grouped = input.reshape(*input.shape[:-1], group_num, channels // group_num)
        grouped = grouped.to(_ops_token._stats_dtype(input.dtype))
        u = _ops_row.row_norm(grouped, (channels // group_num,), None, None, "rms",
                              _ref_power.GROUP_SCALING_EPS)[0].reshape(input.shape)
    rows, valid = _ref_power.token_rows(u, pad_mask, time_major=not batch_first)
    if training:
        iters.add_(1)
        (step,) = _ref_power.step_snapshot([iters.reshape(1)])
        q, count = _ref_power.mean_over_valid(_ops_token.token_square_sum(rows.detach(), valid), rows.shape[0], valid,
                                              sync_group)
        scale, grad_scale = _ref_power.power_norm_statistics_(
            q, count, running_phi.view(-1), step, eps=eps, alpha_fwd=alpha_fwd, warmup_iters=warmup_iters,
            backward_denominator=backward_denominator)
        y = _ops_token.power_norm_train(rows, weight, bias, scale, grad_scale, ema_gz.view(-1), alpha_bkw,
                                        input.dtype, sync_group)
    else:
        scale = torch.rsqrt(running_phi.reshape(-1).to(_ops_token._stats_dtype(input.dtype)) + eps)
        if weight is not None:
            scale = scale * weight.to(scale.dtype)
        y = _ops_token.channel_affine(rows, scale, bias, input.dtype)
    return y.view(input.shape)


def unified_norm(input: Tensor, running_var: Tensor, ema_gz: Tensor, buffer_x2: Tensor, buffer_gz: Tensor,
                 iters: Tensor, skip_counter: Tensor, weight: Tensor, bias: Tensor, pad_mask: Optional[Tensor] = None,
                 training: bool = False, eps: float = 1e-5, momentum: float = 0.9, warmup_iters: int = 4000,
                 outlier_filtration: bool = False, *, grad_compensation: bool = True, sync_stats: bool = False,
                 process_group: Optional[Any] = None) -> Tensor:
    r"""Unified Normalization (Yang et al., ACM MM 2022; spec A §2), exactly as the official ``UN1d``.

    .. math:: y = \gamma \cdot \frac{x}{\sqrt{v + \epsilon}} + \beta

    In training ``v`` is the batch quadratic mean over non-pad tokens during warm-up (and on outlier-filtered steps),
    else the geometric mean of the last ``M`` batch statistics (the ring buffer ``buffer_x2``); the backward is the
    method's own (arithmetic mean of the last ``M_b`` gradient statistics in ``buffer_gz``, running ``ema_gz``, the
    compensation factor ``r``). In eval ``v = running_var``: a per-channel affine. See :class:`normlayers.UnifiedNorm`.

    Args:
        input: ``(B, N, C)`` or ``(B, C)``.
        running_var, ema_gz: ``(C,)`` buffers; buffer_x2 ``(M, C)``, buffer_gz ``(M_b, C)``: the ring buffers;
            iters, skip_counter: one-element integer tensors. All updated in place in training (``ema_gz`` and
            ``buffer_gz`` by the backward).
        weight, bias: ``(C,)``.
        pad_mask: ``(B, N)`` bool, True = padding (``(B,)`` or the official ``(1, B)`` for 2-D input); left out of
            the forward statistic only.
        training, eps, momentum, warmup_iters, outlier_filtration: as the module.
        grad_compensation: apply the factor ``r`` in the backward (the official code). Default: ``True``.
        sync_stats, process_group (keyword-only): in training, with ``torch.distributed`` initialized and more than
            one rank in ``process_group`` (default: the world), ``q`` is over the non-pad tokens of every rank and the
            backward's ``gz`` over every rank's tokens (one all-reduce each; every rank must call, also with no
            tokens), so the ring buffers and every decision are the global batch's. Default: ``False``, ``None``.
    """
    mask_shape = tuple(input.shape[:-1]) if input.dim() in (2, 3) else ()
    if input.dim() == 2:
        pad_mask = _flat_2d_mask(input, pad_mask, (1, input.shape[0]))
    channels = _check_token_norm_input(input, pad_mask, mask_shape, "(B, N, C)")
    _check_token_norm_state(input, channels, {"running_var": running_var, "ema_gz": ema_gz, "weight": weight,
                                              "bias": bias}, {"iters": iters, "skip_counter": skip_counter},
                            {"buffer_x2": buffer_x2, "buffer_gz": buffer_gz})
    for name, t in (("weight", weight), ("bias", bias), ("running_var", running_var), ("ema_gz", ema_gz)):
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},), got {list(t.shape)}")
    _check_epsilon("eps", eps)
    _check_unit_interval("momentum", momentum)
    _check_nonnegative_int("warmup_iters", warmup_iters)
    kwargs = dict(training=training, eps=float(eps), momentum=float(momentum), warmup_iters=int(warmup_iters),
                  outlier_filtration=bool(outlier_filtration), grad_compensation=bool(grad_compensation),
                  sync_group=sync_group_name(sync_stats, process_group, training))
    state = (running_var, ema_gz, buffer_x2, buffer_gz, iters, skip_counter, weight, bias)
    if use_triton(input):
        return _unified_norm_triton(input, *state, pad_mask, **kwargs)
    return _ref_unified.unified_norm(input, *state, pad_mask, **kwargs)


def _unified_norm_triton(input: Tensor, running_var: Tensor, ema_gz: Tensor, buffer_x2: Tensor, buffer_gz: Tensor,
                         iters: Tensor, skip_counter: Tensor, weight: Tensor, bias: Tensor,
                         pad_mask: Optional[Tensor], *, training: bool, eps: float, momentum: float,
                         warmup_iters: int, outlier_filtration: bool, grad_compensation: bool,
                         sync_group: Optional[str]) -> Tensor:
    """UnifiedNorm on the Triton ops; the per-channel steps are the reference's on-device helpers."""
    rows, valid = _ref_power.token_rows(input, pad_mask, time_major=False)
    if training:
        iters.add_(1)
        (step,) = _ref_power.step_snapshot([iters.reshape(1)])
        q, count = _ref_power.mean_over_valid(_ops_token.token_square_sum(rows.detach(), valid), rows.shape[0], valid,
                                              sync_group)
        var, r, skip = _ref_unified.unified_norm_statistics_(
            q, count, running_var, buffer_x2, skip_counter, step, eps=eps, momentum=momentum,
            warmup_iters=warmup_iters, outlier_filtration=outlier_filtration, grad_compensation=grad_compensation)
        y = _ops_token.unified_norm_train(rows, weight, bias, torch.rsqrt(var + eps), r, ema_gz, buffer_gz, step,
                                          skip, momentum, warmup_iters, sync_group)
    else:
        scale = torch.rsqrt(running_var.to(_ops_token._stats_dtype(input.dtype)) + eps) * weight
        y = _ops_token.channel_affine(rows, scale, bias, input.dtype)
    return y.view(input.shape)
