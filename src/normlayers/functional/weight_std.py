"""Functional Weight Standardization and Scaled Weight Standardization, and the convs that use them."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from normlayers._checks import check_float_tensor, check_positive_epsilon
from normlayers.reference import weight_std as _ref_ws

__all__ = ["WS_DEFAULT_VARIANT", "weight_standardize", "scaled_weight_standardize", "ws_conv2d", "scaled_ws_conv2d"]


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
    # eps = 0 turns a constant filter into 0/0 = NaN: refused, as torch's batch_norm refuses it.
    return check_positive_epsilon("eps", eps)


def _check_ws_finite(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_ws_weight(weight: Tensor, correction: int, variant: str) -> None:
    """``variant`` names the variant in the error for ``correction`` = 1 (unused for the biased ones)."""
    check_float_tensor("weight", weight)
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
    check_float_tensor("gain", gain)
    if gain.numel() != weight.shape[0] or (gain.dim() > 1 and gain.shape[0] != weight.shape[0]):
        raise ValueError(f"gain must hold one value per output filter, of shape (out_channels, 1, 1, 1) or "
                         f"(out_channels,) = ({weight.shape[0]},); got gain of shape {list(gain.shape)}")
    if gain.device != weight.device:
        raise ValueError(f"gain is on {gain.device} but weight is on {weight.device}")


def _check_conv_input(input: Tensor, weight: Tensor, groups: int) -> None:
    check_float_tensor("input", input)
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
