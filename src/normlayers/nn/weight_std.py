"""Weight Standardization: WSConv2d and ScaledWSConv2d, drop-in subclasses of :class:`torch.nn.Conv2d`.

Both standardize each output filter of the conv weight before convolving (Qiao et al., arXiv 1903.10520). The
standardized weight depends on the parameters only, not on the input, so train and eval compute the same thing and
there are no buffers. In eval mode, when no gradient reaches the parameters, the standardized weight is computed once
and reused until a parameter changes; :meth:`to_conv2d` bakes it into a plain :class:`torch.nn.Conv2d` for
deployment.

No Triton kernel yet: the plain-PyTorch reference runs on every device (the weight is small next to the activations).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from normlayers import functional as F
from normlayers._checks import check_finite, check_positive_epsilon
from normlayers.functional.weight_std import IntOrPair, check_conv_input, check_ws_weight, ws_variant
from normlayers.nn._adopt import adopt_same_names, fill_missing, timm_class_name
from normlayers.nn._scripting import NotScriptable
from normlayers.reference import weight_std as _ref_ws

__all__ = ["WSConv2d", "ScaledWSConv2d"]
# (the parameter, its version counter, its storage address) for each parameter the cached weight was computed from
_CacheKey = tuple[tuple["weakref.ref[Tensor]", int, int], ...]


class _StandardizedConv2d(NotScriptable, nn.Conv2d):
    """What WSConv2d and ScaledWSConv2d share: convolve with a standardized weight, cache it in eval, fold it."""

    _eval_cache: Optional[tuple[_CacheKey, Tensor]] = None

    def _standardize(self) -> Tensor:
        """The standardized weight, through the functional form (with autograd)."""
        raise NotImplementedError

    def _standardize_sources(self) -> tuple[Tensor, ...]:
        """The parameters the standardized weight is computed from."""
        return (self.weight,)

    def _may_use_cache(self) -> bool:
        # A cached weight carries no autograd graph, so it is used only when no gradient has to reach the parameters
        # (eval with frozen parameters or under no_grad / inference_mode; e.g. detection fine-tuning in eval mode
        # still trains the convs). Under torch.compile the cache bookkeeping is skipped: the graph recomputes it.
        if self.training or torch.compiler.is_compiling():
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in self._standardize_sources()))

    def standardized_weight(self) -> Tensor:
        """The weight the conv uses: the standardized ``weight`` (of ``weight``'s dtype).

        In eval mode, when no gradient reaches the parameters, it is cached and recomputed only after a parameter
        changes: an in-place update (optimizer step, ``load_state_dict``, ``with torch.no_grad(): w.mul_(...)``), a
        new ``Parameter``, a move (``.to()``), or ``train()``.
        """
        if not self._may_use_cache():
            return self._standardize()
        sources = self._standardize_sources()
        if self._eval_cache is not None:
            key, cached = self._eval_cache
            if all(ref() is t and version == t._version and address == t.data_ptr()
                   for (ref, version, address), t in zip(key, sources)):
                return cached
        # Computed outside inference mode so that the cached tensor may later be used where autograd records the
        # conv (an input that requires grad, with frozen parameters); an inference tensor could not be saved there.
        with torch.inference_mode(False), torch.no_grad():
            cached = self._standardize()
        self._eval_cache = (tuple((weakref.ref(t), t._version, t.data_ptr()) for t in sources), cached)
        return cached

    def train(self, mode: bool = True) -> "_StandardizedConv2d":
        self._eval_cache = None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        # The cache is derived state (and its weak references do not pickle): copies and checkpoints recompute it.
        state = super().__getstate__()
        state["_eval_cache"] = None
        return state

    def forward(self, input: Tensor) -> Tensor:
        check_conv_input(input, self.weight, self.groups)
        # nn.Conv2d's own convolution, so padding_mode and padding="same" behave exactly as in torch
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def to_conv2d(self) -> nn.Conv2d:
        """A plain :class:`torch.nn.Conv2d` with the standardized weight baked in: the same outputs, no standardization
        at run time (for export and inference). Same configuration, device, dtypes and training flag; new
        parameters (``weight`` holds the standardized values, ``bias`` a copy)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.standardized_weight())
            if self.bias is not None:
                conv.bias = nn.Parameter(self.bias.detach().clone())
        return conv.train(self.training)

    # Standardizing a plain conv's weight changes its function: normlayers.replace_norms swaps a Conv2d for one only
    # when its mapping asks, and does not compare outputs. A module converted from timm's layer of the same math says
    # "rounding" on the instance (from_module).
    conversion_fidelity: ClassVar[str] = "changes"
    # timm's class computing this layer's function (timm/layers/std_conv.py), converted with the same math
    _timm_source: ClassVar[str]

    @classmethod
    def _timm_kwargs(cls, module: nn.Module) -> dict[str, Any]:
        """The keyword-only constructor arguments that reproduce timm's ``module``."""
        raise NotImplementedError

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> "_StandardizedConv2d":
        """A standardized conv of ``module``'s configuration holding its very parameter objects (built on ``meta``,
        nothing copied). ``module`` is

        * a :class:`torch.nn.Conv2d`: the function changes (the weight gets standardized); ``kwargs`` are the
          keyword-only arguments (``eps``, ``variant``, ``gamma``, ...);
        * timm's ``StdConv2d`` (for :class:`WSConv2d`) or ``ScaledStdConv2d`` (for :class:`ScaledWSConv2d`): the same
          function, with timm's padding, ``eps`` and (scaled) ``gamma``/``gain`` read from it; ``kwargs`` override
          them. timm standardizes through ``F.batch_norm``, another reduction order, so the new module's
          ``conversion_fidelity`` is ``"rounding"``.
        """
        same_math = timm_class_name(module) == cls._timm_source
        if type(module) is not nn.Conv2d and not same_math:
            raise TypeError(f"no conversion from {type(module).__name__} to {cls.__name__}; it adopts an nn.Conv2d "
                            f"or timm's {cls._timm_source}")
        if same_math:
            kwargs = {**cls._timm_kwargs(module), **kwargs}
        with torch.device("meta"):
            new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                      module.dilation, module.groups, module.bias is not None, module.padding_mode, **kwargs)
        adopt_same_names(new, module)
        if same_math:
            new.conversion_fidelity = "rounding"
        return new

    def to_torch(self) -> nn.Conv2d:
        """The plain conv computing the same function: :meth:`to_conv2d`."""
        return self.to_conv2d()


class WSConv2d(_StandardizedConv2d):
    r"""Conv2d with Weight Standardization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
    Weight Standardization", arXiv 1903.10520); a drop-in for :class:`torch.nn.Conv2d`.

    Each output filter ``W_o`` of the weight ``(out_channels, in_channels / groups, kh, kw)`` is standardized over its
    fan-in ``I = in_channels / groups · kh · kw`` before the convolution:

    .. math::
        \hat W_o = \frac{W_o - \mu_o}{D_o}, \qquad y = \mathrm{conv2d}(x, \hat W) + b, \qquad
        D_o = \sqrt{\sigma_o^2 + \epsilon}\ \text{(eps inside)} \ \text{or}\ \sigma_o + \epsilon\ \text{(eps outside)}

    There is no affine on ``Ŵ``; use it before a BatchNorm/GroupNorm, as the paper does. The published
    implementations disagree on ``D`` (docs/weight_std.md, "The variants"), by more than rounding (up to ~6% for 3x3
    depthwise filters), so the variant is named:

    * ``"qiao"``: unbiased ``σ`` (``torch.std``), eps outside, ``1e-5``: the WS README layer, for the authors' GN+WS
      checkpoints.
    * ``"qiao_bcn"``: unbiased, eps inside, ``1e-5``: the WS conv of the BCN ImageNet models.
    * ``"timm"`` (default): biased, eps inside, ``1e-6``: timm's ``StdConv2d``; the paper's v2 formula.
    * ``"bit"``: biased, eps inside, ``1e-10``: BiT's official code (timm's BiT models pass ``eps=1e-8``).

    The default puts eps inside the square root, where the authors agreed it belongs (eps outside gives NaN gradients
    for constant filters in older PyTorch and NaNs in fp16; WeightStandardization#1, #16), with timm's biased
    variance and eps, so timm ``StdConv2d`` checkpoints and outputs carry over unchanged.

    Same constructor (plus keyword-only ``eps`` and ``variant``), attributes, parameters and ``state_dict`` keys as
    :class:`torch.nn.Conv2d`, so the two load each other's checkpoints. Statistics in fp32 (fp64 for fp64 weights);
    the standardized weight has the weight's dtype.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype:
            as :class:`torch.nn.Conv2d` (defaults ``stride=1, padding=0, dilation=1, groups=1, bias=True,
            padding_mode='zeros'``).
        eps (float, optional, keyword-only): ``None`` takes the variant's. Default: ``None``.
        variant (str, keyword-only): ``"qiao"``, ``"qiao_bcn"``, ``"timm"`` or ``"bit"``. Default: ``"timm"``.

    A fan-in of 1 (``in_channels / groups == 1`` with a 1x1 kernel) is rejected by the unbiased variants (the std of
    one element divides by ``I − 1 = 0``); the biased ones standardize such a filter to 0, so the output is the bias.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)` or :math:`(C_{in}, H, W)`.
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`, as nn.Conv2d.

    Examples::

        >>> conv = normlayers.WSConv2d(64, 128, 3, padding=1, bias=False)
        >>> y = conv(torch.randn(2, 64, 56, 56))
        >>> qiao = normlayers.WSConv2d(64, 128, 3, padding=1, variant="qiao")   # the authors' released layer
        >>> plain = conv.eval().to_conv2d()                                    # for deployment
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: Union[str, IntOrPair] = 0, dilation: IntOrPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, eps: Optional[float] = None,
                 variant: str = F.WS_DEFAULT_VARIANT) -> None:
        spec = ws_variant(variant)
        resolved_eps = spec.eps if eps is None else check_positive_epsilon("eps", eps)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        check_ws_weight(self.weight, spec.correction, variant)
        self.variant = variant
        self.eps = resolved_eps

    _timm_source: ClassVar[str] = "StdConv2d"

    @classmethod
    def _timm_kwargs(cls, module: nn.Module) -> dict[str, Any]:
        return {"variant": "timm", "eps": module.eps}

    def _standardize(self) -> Tensor:
        return F.weight_standardize(self.weight, self.eps, variant=self.variant)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", variant={self.variant!r}, eps={self.eps}"


class ScaledWSConv2d(_StandardizedConv2d):
    r"""Conv2d with Scaled Weight Standardization (Brock et al., NF-ResNets / NFNets, arXiv 2101.08692), as timm's
    ``ScaledStdConv2d``; a drop-in for :class:`torch.nn.Conv2d` with one more parameter, ``gain``.

    .. math::
        \hat W_o = g_o \cdot \frac{\gamma}{\sqrt{I}} \cdot \frac{W_o - \mu_o}{\sqrt{\sigma_o^2 + \epsilon}},
        \qquad y = \mathrm{conv2d}(x, \hat W) + b

    with the biased variance over each filter's fan-in ``I = in_channels / groups · kh · kw``, a learnable per-filter
    ``gain`` ``g`` of shape ``(out_channels, 1, 1, 1)`` and the activation's gain ``γ`` (timm ``ScaledStdConv2d``,
    ``timm/layers/std_conv.py``). Parameter names (``weight``, ``bias``, ``gain``), attributes (``gamma``, ``eps``,
    ``gain_init``, ``scale = γ/√I``) and formula are timm's, so ``ScaledStdConv2d`` checkpoints load. Two differences
    from timm: ``padding`` defaults to ``0`` as in ``nn.Conv2d`` (timm's ``None`` means
    ``((stride − 1) + dilation·(k − 1)) // 2``; pass that value), and ``gamma``/``eps``/``gain_init`` are
    keyword-only. DeepMind's NFNet code floors ``var·I`` at ``1e-4`` instead of adding eps; that form is not
    provided.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype:
            as :class:`torch.nn.Conv2d`.
        gamma (float, keyword-only): the nonlinearity's constant, e.g. ``1.7139588594436646`` for ReLU,
            ``1.7881293296813965`` for SiLU. Default: ``1.0``.
        eps (float, keyword-only): added to the variance. Default: ``1e-6`` (timm's NFNet configs pass ``1e-5``).
        gain_init (float, keyword-only): the initial value of ``gain``. Default: ``1.0``.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)` or :math:`(C_{in}, H, W)`.
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`.

    Examples::

        >>> conv = normlayers.ScaledWSConv2d(64, 128, 3, padding=1, gamma=1.7139588594436646, eps=1e-5)
        >>> y = conv(torch.randn(2, 64, 56, 56))
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: Union[str, IntOrPair] = 0, dilation: IntOrPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, gamma: float = 1.0, eps: float = 1e-6,
                 gain_init: float = 1.0) -> None:
        checked = (check_finite("gamma", gamma), check_positive_epsilon("eps", eps),
                   check_finite("gain_init", gain_init))
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        check_ws_weight(self.weight, 0, "")
        self.gamma, self.eps, self.gain_init = checked
        self.gain = nn.Parameter(torch.empty((out_channels, 1, 1, 1), device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def scale(self) -> float:
        """``γ / sqrt(I)``, the fan-in scale (timm's ``scale`` attribute)."""
        return _ref_ws.fan_in_scale(self.weight, self.gamma)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # nn.Conv2d.__init__ calls reset_parameters before gain exists
        if getattr(self, "gain", None) is not None:
            nn.init.constant_(self.gain, self.gain_init)

    _timm_source: ClassVar[str] = "ScaledStdConv2d"

    @classmethod
    def _timm_kwargs(cls, module: nn.Module) -> dict[str, Any]:
        # timm stores scale = γ/√fan_in, not γ
        return {"gamma": module.scale * math.sqrt(module.weight[0].numel()), "eps": module.eps,
                "gain_init": module.gain_init}

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> "ScaledWSConv2d":
        new = super().from_module(module, **kwargs)
        if "gain" not in module._parameters:
            fill_missing(new, module, {"gain": new.gain_init})  # a plain conv has no gain: it starts at gain_init
        return new

    def _standardize_sources(self) -> tuple[Tensor, ...]:
        return (self.weight, self.gain)

    def _standardize(self) -> Tensor:
        return F.scaled_weight_standardize(self.weight, self.gain, self.gamma, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma}, eps={self.eps}, gain_init={self.gain_init}"
