"""Row norms: LayerNorm, RMSNorm (drop-in subclasses of torch's) and CRMSNorm.

Each module's ``forward(x, residual=None)`` returns the normalized tensor; given a ``residual`` it runs the fused
pre-norm step ``h = x + residual`` and returns ``(norm(h), h)``.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from normlayers import functional as F
from normlayers._checks import ShapeLike, as_shape, check_choice, check_real
from normlayers.nn._adopt import adopt_same_names
from normlayers.nn._scripting import NotScriptable

__all__ = ["LayerNorm", "RMSNorm", "CRMSNorm"]

_RMS_CAST_MODES = ("torch", "llama")


class _NormSource:
    """What a row norm's ``from_module`` reads from a torch norm or a look-alike: width, eps and parameters."""

    def __init__(self, module: nn.Module, shape: tuple[int, ...], eps: Optional[float], names: list[str]) -> None:
        self.module, self.shape, self.eps, self.names = module, shape, eps, names

    @classmethod
    def of(cls, target: type, module: nn.Module, allowed: tuple[str, ...]) -> "_NormSource":
        def refuse(why: str) -> TypeError:
            return TypeError(f"no conversion from {type(module).__name__} to normlayers.{target.__name__}: {why}")

        names = [name for name, _ in module.named_parameters(recurse=False)]
        if not set(names) <= set(allowed) or list(module.children()) or list(module.buffers(recurse=False)):
            raise refuse(f"it holds {names or 'no'} parameters, buffers or submodules; a norm to convert holds only "
                         f"{' and/or '.join(allowed)}")
        weight = module._parameters.get("weight")
        shape = getattr(module, "normalized_shape", None)
        if shape is None and weight is not None and weight.dim() == 1:
            shape = tuple(weight.shape)
        if shape is None:
            raise refuse("it has neither a `normalized_shape` nor a 1-D `weight`, so its width is unknown")
        eps = next((value for value in (getattr(module, name, None) for name in ("variance_epsilon", "eps"))
                    if isinstance(value, float)), None)
        return cls(module, as_shape(shape), eps, names)

    def has(self, name: str) -> bool:
        return name in self.names

    def adopted_by(self, new: nn.Module) -> nn.Module:
        """``new`` holding the source's parameter objects; refused if the two do not have the same parameters."""
        new_names = [name for name, _ in new.named_parameters(recurse=False)]
        if sorted(new_names) != sorted(self.names):
            raise TypeError(f"{type(new).__name__}.from_module: the new module would hold parameters {new_names}, "
                            f"{type(self.module).__name__} holds {self.names}; the arguments do not describe it")
        adopt_same_names(new, self.module)
        return new


class LayerNorm(NotScriptable, nn.LayerNorm):
    r"""Layer normalization with fused Triton kernels on CUDA; a drop-in for :class:`torch.nn.LayerNorm`.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Mean and biased variance over the last ``len(normalized_shape)`` dims, computed in fp32 (fp64 for fp64 input);
    the output has the input's dtype. Same constructor, defaults, parameters and ``state_dict`` keys as
    :class:`torch.nn.LayerNorm`, so the two load each other's checkpoints.

    Args:
        normalized_shape (int or list or torch.Size): the trailing shape to normalize over.
        eps (float): added to the variance. Default: ``1e-5``.
        elementwise_affine (bool): learnable ``weight`` (ones) and ``bias`` (zeros). Default: ``True``.
        bias (bool): with ``elementwise_affine``, whether to learn ``bias``. Default: ``True``.
        device, dtype: factory kwargs for the parameters.

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`; ``residual`` (optional): the same shape.
        - Output: the input's shape; with a residual, a tuple ``(normed, x + residual)``.

    ``forward(x, residual=None, *, residual_in_fp32=False)``: see :func:`normlayers.functional.add_layer_norm`.

    Examples::

        >>> ln = normlayers.LayerNorm(1024)
        >>> y = ln(torch.randn(8, 16, 1024))
        >>> y, h = ln(x, residual=h)      # fused pre-norm: h = x + h, y = ln(h)
    """

    def __init__(self, normalized_shape: ShapeLike, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(as_shape(normalized_shape), eps, elementwise_affine, bias, device=device, dtype=dtype)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, *,
                residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        if residual is None:
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                                residual_in_fp32=residual_in_fp32)

    # How normlayers.replace_norms checks a module built by from_module against its source: within rounding, because
    # torch's LayerNorm kernels reduce in another order than ours (bit-for-bit only against a two-pass fp32 source).
    conversion_fidelity: ClassVar[str] = "rounding"

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> "LayerNorm":
        """A LayerNorm holding ``module``'s very ``weight``/``bias`` objects (built on ``meta``, nothing copied).

        ``module`` is a :class:`torch.nn.LayerNorm`, or a look-alike holding only ``weight``/``bias``, with a
        ``normalized_shape`` or 1-D ``weight`` and a float ``eps`` or ``variance_epsilon``. ``kwargs`` override the
        constructor arguments read from it. Whether the math is the same is not checked here:
        :func:`normlayers.replace_norms` probes and verifies that.
        """
        source = _NormSource.of(cls, module, ("weight", "bias"))
        args = {"eps": source.eps, "elementwise_affine": source.has("weight"), "bias": source.has("bias"), **kwargs}
        if not isinstance(args["eps"], numbers.Real):
            raise TypeError(f"no conversion from {type(module).__name__} to normlayers.LayerNorm: it has no float "
                            f"`eps` or `variance_epsilon`; pass eps=")
        with torch.device("meta"):
            new = cls(source.shape, **args)
        return source.adopted_by(new)

    def to_torch(self) -> nn.LayerNorm:
        """A :class:`torch.nn.LayerNorm` of the same configuration holding this module's parameter objects."""
        with torch.device("meta"):
            plain = nn.LayerNorm(self.normalized_shape, self.eps, self.elementwise_affine, self.bias is not None)
        adopt_same_names(plain, self)
        return plain.train(self.training)


class RMSNorm(NotScriptable, nn.RMSNorm):
    r"""RMS normalization with fused Triton kernels on CUDA; a drop-in for :class:`torch.nn.RMSNorm`.

    .. math:: y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \cdot (\gamma + \text{weight\_offset})

    Same constructor, defaults, parameters and ``state_dict`` keys as :class:`torch.nn.RMSNorm`.

    Args:
        normalized_shape (int or list or torch.Size): the trailing shape to normalize over.
        eps (float, optional): added to the mean square. Default: ``None``, which is fp32's machine epsilon
            (fp64's for fp64 input), as in torch.
        elementwise_affine (bool): learnable ``weight``. Default: ``True``.
        device, dtype: factory kwargs for the parameters.
        weight_offset (float, keyword-only): the scale is ``weight + weight_offset``; ``1.0`` gives Gemma's
            ``(1 + w)`` norm. ``reset_parameters`` sets ``weight`` to ``1 − weight_offset`` so a fresh layer scales
            by one. Default: ``0.0``.
        cast_mode (str, keyword-only): where the result is rounded to the input dtype. ``"torch"``: the scale is
            applied in fp32 and the result rounded once, as :class:`torch.nn.RMSNorm` and Hugging Face's
            ``GemmaRMSNorm``. ``"llama"``: the normalized input is rounded to the input dtype first, then multiplied
            by the scale with torch's type promotion, as Hugging Face's ``LlamaRMSNorm`` (so a bf16 input with an
            fp32 weight gives an fp32 output); the scale is then a separate elementwise multiply. The two agree
            exactly in fp32 and fp64. :func:`normlayers.replace_norms` picks the mode of the norm it replaces.
            Default: ``"torch"``.

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`; ``residual`` (optional): the same shape.
        - Output: the input's shape; with a residual, a tuple ``(normed, x + residual)``.

    ``forward(x, residual=None, *, residual_in_fp32=False)``: see :func:`normlayers.functional.add_rms_norm`.

    Examples::

        >>> norm = normlayers.RMSNorm(4096, eps=1e-6, weight_offset=1.0)   # Gemma-style
        >>> y = norm(torch.randn(2, 128, 4096))
    """

    def __init__(self, normalized_shape: ShapeLike, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, weight_offset: float = 0.0, cast_mode: str = "torch") -> None:
        weight_offset = check_real("weight_offset", weight_offset)
        check_choice("cast_mode", cast_mode, _RMS_CAST_MODES)
        super().__init__(as_shape(normalized_shape), eps, elementwise_affine, device=device, dtype=dtype)
        self.weight_offset = float(weight_offset)
        self.cast_mode = cast_mode
        if self.weight_offset != 0.0 and not elementwise_affine:
            raise ValueError("weight_offset scales the weight (weight + weight_offset); it needs "
                             "elementwise_affine=True")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - getattr(self, "weight_offset", 0.0))

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.weight_offset:
            text += f", weight_offset={self.weight_offset}"
        return text + f", cast_mode={self.cast_mode!r}" if self.cast_mode != "torch" else text

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, *,
                residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        if self.cast_mode == "llama" and self.weight is not None:
            return self._forward_llama(input, residual, residual_in_fp32)
        if residual is None:
            return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, weight_offset=self.weight_offset)
        return F.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps,
                              weight_offset=self.weight_offset, residual_in_fp32=residual_in_fp32)

    def _forward_llama(self, input: Tensor, residual: Optional[Tensor],
                       residual_in_fp32: bool) -> Union[Tensor, tuple[Tensor, Tensor]]:
        # Hugging Face LlamaRMSNorm: `weight * normalized.to(input_dtype)`, the scale after the rounding.
        scale = self.weight + self.weight_offset if self.weight_offset else self.weight
        if residual is None:
            return scale * F.rms_norm(input, self.normalized_shape, None, self.eps)
        normed, summed = F.add_rms_norm(input, residual, self.normalized_shape, None, self.eps,
                                        residual_in_fp32=residual_in_fp32)
        return scale * normed, summed

    # normlayers.replace_norms checks a module built by from_module against its source bit-for-bit, and probes a
    # foreign RMSNorm class with each of these variants (offset, then rounding order) to find the one it computes.
    conversion_fidelity: ClassVar[str] = "exact"
    conversion_variants: ClassVar[tuple[dict[str, Any], ...]] = tuple(
        {"weight_offset": offset, "cast_mode": cast_mode} for offset in (0.0, 1.0) for cast_mode in _RMS_CAST_MODES)

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> "RMSNorm":
        """An RMSNorm holding ``module``'s very ``weight`` object (built on ``meta``, nothing copied).

        ``module`` is a :class:`torch.nn.RMSNorm`, or a look-alike (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``,
        ...) holding only ``weight``, with a ``normalized_shape`` or 1-D ``weight`` and a float ``variance_epsilon``
        or ``eps`` (none: ``eps=None``). ``kwargs`` override the constructor arguments read from it, e.g.
        ``weight_offset=1.0, cast_mode="torch"`` for Gemma's norm. Whether the math is the same is not checked here:
        :func:`normlayers.replace_norms` probes the variants and verifies the result.
        """
        source = _NormSource.of(cls, module, ("weight",))
        with torch.device("meta"):
            new = cls(source.shape, **{"eps": source.eps, "elementwise_affine": source.has("weight"), **kwargs})
        return source.adopted_by(new)

    def to_torch(self) -> nn.RMSNorm:
        """A :class:`torch.nn.RMSNorm` computing the same function in fp32 and fp64 (``cast_mode="llama"`` becomes
        torch's single rounding). It holds this module's ``weight`` object, or with a ``weight_offset`` a new
        ``weight = weight + weight_offset``, since torch's RMSNorm has no offset."""
        with torch.device("meta"):
            plain = nn.RMSNorm(self.normalized_shape, self.eps, self.elementwise_affine)
        if self.weight_offset and self.weight is not None:
            plain.weight = nn.Parameter((self.weight + self.weight_offset).detach(), self.weight.requires_grad)
        else:
            adopt_same_names(plain, self)
        return plain.train(self.training)


class ScaleOnlyNorm(NotScriptable):
    """What the norms with only a ``weight`` (CRMSNorm, RMSNorm2d) share: a ``weight`` of ``normalized_shape``
    (ones) when ``elementwise_affine``, torch's ``LayerNorm``-style attributes and ``extra_repr``."""

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]
    normalized_shape: tuple[int, ...]
    elementwise_affine: bool

    def __init__(self, normalized_shape: tuple[int, ...], eps: Optional[float], elementwise_affine: bool, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}".format(**self.__dict__)


class CRMSNorm(ScaleOnlyNorm):
    r"""Compressed RMS normalization (Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers", NeurIPS 2023).

    In a Pre-CRMSNorm Transformer the residual stream is zero-mean and stored compressed: only its first
    ``d − 1`` coordinates ``x'`` are kept, the last being ``−Σx'``. CRMSNorm normalizes by the RMS of the full
    ``d``-vector without restoring it (docs/row_norms.md). With ``n = prod(normalized_shape) = d − 1``:

    .. math:: y = \frac{x'}{\sqrt{\left(\sum_i x_i'^2 + (\sum_i x'_i)^2\right) / (n + 1) + \epsilon}} \cdot \gamma

    i.e. the first ``n`` outputs of RMSNorm on ``[x', −Σx']``, times an elementwise weight of width ``n``.

    Args:
        normalized_shape (int or list or torch.Size): the *compressed* trailing shape (width ``d − 1``).
        eps (float, optional): added to the mean square. Default: ``None`` (fp32's machine epsilon; fp64's for
            fp64 input), as :class:`RMSNorm`.
        elementwise_affine (bool): learnable ``weight`` (ones) of shape ``normalized_shape``. Default: ``True``.
        device, dtype: factory kwargs for the parameters.

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`; ``residual`` (optional): the same shape.
        - Output: the input's shape; with a residual, a tuple ``(normed, x + residual)``.

    Examples::

        >>> norm = normlayers.CRMSNorm(767)      # a d = 768 model, compressed
        >>> y = norm(torch.randn(4, 32, 767))
    """

    eps: Optional[float]

    def __init__(self, normalized_shape: ShapeLike, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(as_shape(normalized_shape), eps, elementwise_affine, device=device, dtype=dtype)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, *,
                residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        if residual is None:
            return F.crms_norm(input, self.normalized_shape, self.weight, self.eps)
        return F.add_crms_norm(input, residual, self.normalized_shape, self.weight, self.eps,
                               residual_in_fp32=residual_in_fp32)
