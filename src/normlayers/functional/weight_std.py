"""Functional Weight Standardization and Scaled Weight Standardization, and the convs that use them."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from normlayers._checks import (
    FLOAT_DTYPE_SET,
    check_choice,
    check_finite,
    check_float_tensor,
    check_positive_epsilon,
    check_same_device,
)
from normlayers.backends import tier
from normlayers.cpu import weight_std as _cpu_ws
from normlayers.reference import weight_std as _ref_ws

__all__ = ["WS_DEFAULT_VARIANT", "weight_standardize", "scaled_weight_standardize", "ws_conv2d", "scaled_ws_conv2d"]

IntOrPair = Union[int, tuple[int, int]]

# Biased variance, eps inside the square root: the paper's v2 formula, which the authors agreed is the safe placement
# (WeightStandardization#1, #16: eps outside gives NaN gradients and fp16 NaNs) and what timm's StdConv2d computes.
# The authors' released layer is variant="qiao" (docs/weight_std.md compares the variants).
WS_DEFAULT_VARIANT = "timm"


def ws_variant(variant: object) -> _ref_ws.WSVariant:
    """The standardization a variant name stands for (also checked by :class:`normlayers.WSConv2d`)."""
    return _ref_ws.WS_VARIANTS[check_choice("variant", variant, tuple(_ref_ws.WS_VARIANTS))]


def check_ws_weight(weight: Tensor, correction: int, variant: str) -> None:
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
        # the unbiased std of a single element divides by I − 1 = 0
        raise ValueError(f"variant {variant!r} divides the variance by fan_in - 1, which is 0 for a weight of shape "
                         f"{list(weight.shape)} (fan_in = in_channels / groups * kh * kw = {fan_in}); use a biased "
                         "variant ('timm' or 'bit'), which standardizes such a filter to 0")


def _check_ws_gain(gain: Tensor, weight: Tensor) -> None:
    check_float_tensor("gain", gain)
    if gain.numel() != weight.shape[0] or (gain.dim() > 1 and gain.shape[0] != weight.shape[0]):
        raise ValueError(f"gain must hold one value per output filter, of shape (out_channels, 1, 1, 1) or "
                         f"(out_channels,) = ({weight.shape[0]},); got gain of shape {list(gain.shape)}")
    check_same_device("gain", gain, weight, "weight")


def check_conv_input(input: Tensor, weight: Tensor, groups: int) -> None:
    check_float_tensor("input", input)
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be 4-D (N, C, H, W) or 3-D unbatched (C, H, W), got {input.dim()}-D input of "
                         f"shape {list(input.shape)}")
    channels = weight.shape[1] * groups
    if input.shape[-3] != channels:
        raise ValueError(f"input must have in_channels = {channels} channels (dim -3 of (N, C, H, W)), got input of "
                         f"shape {list(input.shape)}")


def _standardize(weight: Tensor, *, correction: int, eps_inside: bool, eps: float, gain: Optional[Tensor] = None,
                 scale: float = 1.0) -> Tensor:
    """The CPU tier where it applies (there is no Triton kernel: the weight is small next to the conv), else the
    reference."""
    if tier(weight, has_kernels=False) == "cpu" and _cpu_ws.supports(weight, eps_inside):
        return _cpu_ws.weight_standardize(weight, correction=correction, eps=eps, gain=gain, scale=scale)
    return _ref_ws.weight_standardize(weight, correction=correction, eps_inside=eps_inside, eps=eps, gain=gain,
                                      scale=scale)


def weight_standardize(weight: Tensor, eps: Optional[float] = None, *, variant: str = WS_DEFAULT_VARIANT) -> Tensor:
    r"""Weight Standardization (Qiao et al., arXiv 1903.10520) of a conv weight ``(O, I_g, *kernel)``.

    Each output filter is standardized over its fan-in ``I = I_g·prod(kernel)``:

    .. math::
        \hat W_o = \frac{W_o - \mu_o}{D_o}, \qquad
        D_o = \begin{cases} \sqrt{\sigma_o^2 + \epsilon} & \text{eps inside} \\
                            \sigma_o + \epsilon & \text{eps outside} \end{cases}

    The published implementations differ in ``σ²`` (biased ``/I`` or unbiased ``/(I − 1)``), in where ``eps`` goes
    and in its value (docs/weight_std.md); ``variant`` names them:

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
    standardize such a filter to 0.
    """
    spec = _ref_ws.WS_VARIANTS.get(variant) if type(variant) is str else None
    if spec is None or not _is_plain_ws_call(weight, eps, spec.correction):
        spec = ws_variant(variant)
        check_ws_weight(weight, spec.correction, variant)
        # eps = 0 turns a constant filter into 0/0 = NaN: refused, as torch's batch_norm refuses it.
        if eps is not None:
            check_positive_epsilon("eps", eps)
    return _standardize(weight, correction=spec.correction, eps_inside=spec.eps_inside,
                        eps=spec.eps if eps is None else float(eps))


def _is_plain_ws_call(weight: object, eps: object, correction: int) -> bool:
    """Whether the arguments are valid in the plain form a conv's call passes (a floating weight of at least 2 dims
    with more than ``correction`` values per filter; ``eps`` ``None`` or a positive finite ``float``): it passes only
    calls that the full checks pass too, without their per-call cost (which, run right after the previous layer's
    kernel, was 6% of a 256x256x3x3 bf16 standardization here)."""
    return (isinstance(weight, Tensor) and weight.dtype in FLOAT_DTYPE_SET and weight.dim() >= 2
            and (eps is None or (type(eps) is float and 0.0 < eps < math.inf)) and _ref_ws.fan_in(weight) > correction)


def scaled_weight_standardize(weight: Tensor, gain: Optional[Tensor] = None, gamma: float = 1.0,
                              eps: float = 1e-6) -> Tensor:
    r"""Scaled Weight Standardization (NF-ResNets / NFNets, Brock et al., arXiv 2101.08692), as timm's
    ``ScaledStdConv2d``:

    .. math:: \hat W_o = g_o \cdot \frac{\gamma}{\sqrt{I}} \cdot \frac{W_o - \mu_o}{\sqrt{\sigma_o^2 + \epsilon}}

    with the biased variance over each filter's fan-in ``I``. Statistics in fp32 (fp64 for fp64 weights); the result
    has the weight's dtype.

    Args:
        weight: ``(O, ...)``, floating.
        gain: the learnable per-filter gain ``g``, ``(O, 1, 1, 1)`` or ``(O,)``; ``None`` means 1. Default: ``None``.
        gamma: the activation's variance-preserving constant (e.g. 1.7139588594436646 for ReLU). Default: ``1.0``.
        eps: added to the variance. Default: ``1e-6`` (timm's; timm's NFNet configs pass 1e-5).
    """
    check_ws_weight(weight, 0, "")
    if gain is not None:
        _check_ws_gain(gain, weight)
    return _standardize(weight, correction=0, eps_inside=True, eps=check_positive_epsilon("eps", eps), gain=gain,
                        scale=_ref_ws.fan_in_scale(weight, check_finite("gamma", gamma)))


def ws_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrPair = 1,
              padding: Union[str, IntOrPair] = 0, dilation: IntOrPair = 1, groups: int = 1, *,
              eps: Optional[float] = None, variant: str = WS_DEFAULT_VARIANT) -> Tensor:
    """:func:`torch.nn.functional.conv2d` with the weight standardized by :func:`weight_standardize` first.

    ``input`` is ``(N, C, H, W)`` or unbatched ``(C, H, W)`` with ``C = weight.shape[1] * groups``.
    """
    standardized = weight_standardize(weight, eps, variant=variant)
    check_conv_input(input, weight, groups)
    return torch.nn.functional.conv2d(input, standardized, bias, stride, padding, dilation, groups)


def scaled_ws_conv2d(input: Tensor, weight: Tensor, gain: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                     stride: IntOrPair = 1, padding: Union[str, IntOrPair] = 0, dilation: IntOrPair = 1,
                     groups: int = 1, *, gamma: float = 1.0, eps: float = 1e-6) -> Tensor:
    """:func:`torch.nn.functional.conv2d` with the weight standardized by :func:`scaled_weight_standardize` first."""
    standardized = scaled_weight_standardize(weight, gain, gamma, eps)
    check_conv_input(input, weight, groups)
    return torch.nn.functional.conv2d(input, standardized, bias, stride, padding, dilation, groups)
