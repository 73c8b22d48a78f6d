"""Channels-first norms: LayerNorm2d and RMSNorm2d, normalizing an ``(N, C, H, W)`` input over ``C`` at each pixel,
with the constructors, attributes and ``state_dict`` keys of timm's ``LayerNorm2d`` and ``RmsNorm2d``
(timm/layers/norm.py), so the two load each other's checkpoints."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from normlayers import functional as F
from normlayers._checks import check_epsilon, check_positive_int
from normlayers.nn._adopt import adopt_same_names
from normlayers.nn._scripting import NotScriptable
from normlayers.nn.row_norms import ScaleOnlyNorm

__all__ = ["LayerNorm2d", "RMSNorm2d"]


def _timm_layers() -> Any:
    try:
        import timm.layers
    except ImportError as exc:  # timm is optional: only to_torch needs it
        raise ImportError("to_torch() returns timm's class and needs timm installed (pip install timm); "
                          f"importing it failed: {exc}") from exc
    return timm.layers


def _adopt_parameters(new: nn.Module, module: nn.Module) -> nn.Module:
    """``new`` (built on ``meta``) holding ``module``'s very parameter objects, under the same names."""
    adopt_same_names(new, module)
    return new


def _source_channels(cls: type, module: nn.Module) -> int:
    shape = tuple(getattr(module, "normalized_shape", ()))
    if len(shape) != 1:
        raise TypeError(f"no conversion from {type(module).__name__} to {cls.__name__}: it needs a norm over one "
                        f"channel dim (normalized_shape of length 1), got normalized_shape {shape!r}")
    return shape[0]


class LayerNorm2d(NotScriptable, nn.LayerNorm):
    r"""Layer normalization over the channels of an ``(N, C, H, W)`` input, at each pixel (ConvNeXt's norm).

    .. math:: y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mathrm{E}_c[x_{n,:,h,w}]}
              {\sqrt{\mathrm{Var}_c[x_{n,:,h,w}] + \epsilon}} \cdot \gamma + \beta

    Mean and biased variance over the ``C`` channels of each pixel, computed in fp32 (fp64 for fp64 input); the
    output has the input's dtype. timm's ``LayerNorm2d``: a subclass of :class:`torch.nn.LayerNorm` with
    ``normalized_shape = (C,)``, the same constructor, defaults, attributes and ``state_dict`` keys (``weight``,
    ``bias``). On CUDA a Triton kernel reads NCHW and channels-last inputs in place (timm permutes, and
    ``F.layer_norm`` then copies an NCHW input); on CPU it runs timm's math, ``F.layer_norm`` on the permuted view.

    Args:
        num_channels (int): ``C``, the number of channels.
        eps (float): added to the variance. Default: ``1e-6`` (timm's).
        affine (bool): learnable per-channel ``weight`` (ones) and ``bias`` (zeros). Default: ``True``.
        bias (bool, keyword-only): with ``affine``, whether to learn ``bias``. Default: ``True``.
        device, dtype (keyword-only): factory kwargs for the parameters.

    Shape:
        - Input: :math:`(N, C, H, W)`, NCHW, channels-last or a channel slice of a wider tensor.
        - Output: :math:`(N, C, H, W)`; on CUDA in the input's memory format (NCHW for a slice), on CPU
          channels-last, as timm's.

    Examples::

        >>> norm = normlayers.LayerNorm2d(96)
        >>> y = norm(torch.randn(8, 96, 56, 56))
        >>> norm.load_state_dict(timm.layers.LayerNorm2d(96).state_dict())
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, *, bias: bool = True,
                 device=None, dtype=None) -> None:
        num_channels = check_positive_int("num_channels", num_channels)
        super().__init__(num_channels, check_epsilon("eps", eps), affine, bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm2d(input, self.weight, self.bias, self.eps)

    # How normlayers.replace_norms checks a module built by from_module against its source: within rounding, because
    # our reference reduces in another order than F.layer_norm (bit-for-bit on the CPU tier, which runs timm's ops).
    conversion_fidelity: ClassVar[str] = "rounding"

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> "LayerNorm2d":
        """A LayerNorm2d holding ``module``'s very ``weight``/``bias`` objects (built on ``meta``, nothing copied).

        ``module`` is timm's ``LayerNorm2d`` (or any :class:`torch.nn.LayerNorm` over one channel dim that is applied
        channels-first); ``kwargs`` override the constructor arguments read from it.
        """
        args = {"eps": module.eps, "affine": module.weight is not None,
                "bias": getattr(module, "bias", None) is not None, **kwargs}
        with torch.device("meta"):
            new = cls(_source_channels(cls, module), **args)
        return _adopt_parameters(new, module)

    def to_torch(self) -> nn.Module:
        """timm's ``LayerNorm2d`` of the same configuration holding this module's parameter objects (needs timm)."""
        with torch.device("meta"):
            plain = _timm_layers().LayerNorm2d(self.normalized_shape[0], self.eps, self.elementwise_affine,
                                               bias=self.bias is not None)
        return _adopt_parameters(plain, self)


class RMSNorm2d(ScaleOnlyNorm):
    r"""RMS normalization over the channels of an ``(N, C, H, W)`` input, at each pixel.

    .. math:: y_{n,:,h,w} = \frac{x_{n,:,h,w}}{\sqrt{\mathrm{mean}_c(x_{n,:,h,w}^2) + \epsilon}} \cdot \gamma

    The mean square over the ``C`` channels of each pixel, computed in fp32 (fp64 for fp64 input) where timm's
    ``RmsNorm2d`` computes in the input's dtype; the output has the input's dtype. Same constructor, defaults,
    attributes (``normalized_shape = (C,)``, ``eps``, ``elementwise_affine``) and ``state_dict`` key (``weight``)
    as timm's ``RmsNorm2d``. On CUDA a Triton kernel reads NCHW and channels-last inputs in place.

    Args:
        channels (int): ``C``, the number of channels.
        eps (float): added to the mean square. Default: ``1e-6`` (timm's).
        affine (bool): learnable per-channel ``weight`` (ones). Default: ``True``.
        device, dtype (keyword-only): factory kwargs for the parameters.

    Shape:
        - Input: :math:`(N, C, H, W)`, NCHW, channels-last or a channel slice of a wider tensor.
        - Output: :math:`(N, C, H, W)`.

    Examples::

        >>> norm = normlayers.RMSNorm2d(64)
        >>> y = norm(torch.randn(8, 64, 56, 56).to(memory_format=torch.channels_last))
    """

    eps: float

    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True, *, device=None, dtype=None) -> None:
        super().__init__((check_positive_int("channels", channels),), check_epsilon("eps", eps), affine,
                         device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm2d(input, self.weight, self.eps)

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> "RMSNorm2d":
        """An RMSNorm2d holding ``module``'s very ``weight`` object (built on ``meta``, nothing copied); ``module`` is
        timm's ``RmsNorm2d`` (or a look-alike with ``normalized_shape``, ``eps`` and ``weight``); ``kwargs`` override
        the constructor arguments read from it."""
        args = {"eps": module.eps, "affine": getattr(module, "weight", None) is not None, **kwargs}
        with torch.device("meta"):
            new = cls(_source_channels(cls, module), **args)
        return _adopt_parameters(new, module)

    def to_torch(self) -> nn.Module:
        """timm's ``RmsNorm2d`` of the same configuration holding this module's ``weight`` object (needs timm). It
        computes in the input's dtype: the same function in fp32 and fp64, rounded differently in fp16/bf16."""
        with torch.device("meta"):
            plain = _timm_layers().RmsNorm2d(self.normalized_shape[0], self.eps, self.elementwise_affine)
        return _adopt_parameters(plain, self)
