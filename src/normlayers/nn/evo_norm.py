"""EvoNorm: normalization-activation layers for NCHW feature maps (Liu, Brock, Simonyan, Le, NeurIPS 2020).

Nine classes with timm's names, constructor arguments, defaults, parameter/buffer names and semantics
(``timm/layers/evo_norm.py``; docs/evo_norm.md), so a timm model's ``state_dict`` loads with
``strict=True`` and gives the same outputs. They are thin: two parametrised base classes carry the work.

* B family (``EvoNorm2dB0``, ``B1``, ``B2``): batch-dependent, with a ``running_var`` buffer.
* S family (``EvoNorm2dS0``, ``S0a``, ``S1``, ``S1a``, ``S2``, ``S2a``): per-sample group statistics, no buffers.

Differences from timm, all on inputs timm mishandles or does not check: bad arguments raise ``ValueError``/
``TypeError`` (timm asserts, or swallows unknown keywords with ``**_``); B training on ``N·H·W = 1`` values raises as
``nn.BatchNorm2d`` does (timm writes inf into ``running_var``); fp16/bf16 inputs are normalized in fp32
and rounded once (timm rounds its fp32 statistics to the input dtype first).

On CUDA tensors they run on Triton ops (``normlayers::plane_moments`` and one fused normalize + activation + affine
pass, ``kernels/evo_norm.py``), elsewhere on the plain-PyTorch reference; see :mod:`normlayers.backends`.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from normlayers._checks import check_epsilon, check_positive_int
from normlayers._dtypes import compute_dtype
from normlayers.functional.evo_norm import append_doc, check_evo_momentum, evo_norm_b, evo_norm_s
from normlayers.nn._adopt import adopt
from normlayers.nn._scripting import NotScriptable

__all__ = ["EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dB2", "EvoNorm2dS0", "EvoNorm2dS0a", "EvoNorm2dS1", "EvoNorm2dS1a",
           "EvoNorm2dS2", "EvoNorm2dS2a"]

ActLayer = Union[str, type[nn.Module], Callable[[], nn.Module], None]

# timm's create_act_layer accepts names; these are the ones with a torch.nn module of the same meaning.
_ACTIVATIONS_BY_NAME: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "mish": nn.Mish, "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh, "identity": nn.Identity,
}


def _resolve_groups(num_features: int, groups: object, group_size: object) -> int:
    """timm's rule: ``group_size``, when given, overrides ``groups`` with ``num_features // group_size``;
    either way the group count must divide ``num_features`` (no TF-style decrement)."""
    if group_size is not None:
        check_positive_int("group_size", group_size, or_none=True)
        if num_features % group_size != 0:
            raise ValueError(f"group_size ({group_size}) must divide num_features ({num_features})")
        return num_features // int(group_size)
    check_positive_int("groups", groups)
    if num_features % groups != 0:
        raise ValueError(f"groups ({groups}) must divide num_features ({num_features}); pass a dividing group count "
                         "or group_size")
    return int(groups)


def _make_activation(act_layer: ActLayer) -> nn.Module:
    """The S1/S2 nonlinearity: ``None`` is SiLU (timm's default); a name from :data:`_ACTIVATIONS_BY_NAME`; or a
    module class / zero-argument factory (e.g. ``functools.partial(nn.LeakyReLU, 0.2)``)."""
    if act_layer is None:
        return nn.SiLU()
    if isinstance(act_layer, str):
        if act_layer.lower() not in _ACTIVATIONS_BY_NAME:
            raise ValueError(f"act_layer {act_layer!r} is not a known name; use one of "
                             f"{sorted(_ACTIVATIONS_BY_NAME)} or pass an nn.Module class")
        return _ACTIVATIONS_BY_NAME[act_layer.lower()]()
    if not callable(act_layer):
        raise TypeError(f"act_layer must be None, a name, or an nn.Module class/factory, got "
                        f"{type(act_layer).__name__}")
    module = act_layer()
    if not isinstance(module, nn.Module):
        raise TypeError(f"act_layer() must return an nn.Module, got {type(module).__name__}")
    return module


def _check_channels(input: Tensor, num_features: int) -> None:
    """The module's own check: its channel count (the rest is checked by the functional form)."""
    if isinstance(input, Tensor) and input.dim() == 4 and input.shape[1] != num_features:
        raise ValueError(f"expected input of shape (N, {num_features}, H, W) (num_features = {num_features}), got "
                         f"input of shape {list(input.shape)}")


# ----------------------------------------------------------------------------------------------------------------------
# Conversion to and from timm's classes of the same names
# ----------------------------------------------------------------------------------------------------------------------


def _take_over(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` holding ``old``'s very parameters, buffers and ``act`` submodule (S1/S2); refused if they differ."""
    tensors = [name for name, _ in old.named_parameters(recurse=False)]
    tensors += [name for name, _ in old.named_buffers(recurse=False)]
    wanted = [name for name, _ in new.named_parameters(recurse=False)]
    wanted += [name for name, _ in new.named_buffers(recurse=False)]
    if sorted(tensors) != sorted(wanted):
        raise TypeError(f"{type(old).__name__} holds {tensors}, the new {type(new).__name__} would hold {wanted}; "
                        f"the arguments do not describe it")
    adopt(new, old, {name: name for name in tensors})
    if "act" in old._modules:
        new.act = old.act
    return new


class _TimmConvertible:
    """``from_module`` and ``to_torch`` for the EvoNorms: timm's class of the same name (``timm/layers/evo_norm.py``)
    computes the same function with the same parameters and buffers, in another op order."""

    num_features: int
    training: bool
    # the constructor arguments after num_features, read from the source (timm's names and meanings are ours)
    _TIMM_ATTRIBUTES: ClassVar[tuple[str, ...]]

    # normlayers.replace_norms checks a swap with timm's class within rounding, not bit-for-bit: timm rounds its fp32
    # statistics and runs the max/sigmoid/division in another order.
    conversion_fidelity: ClassVar[str] = "rounding"

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> nn.Module:
        """An instance holding ``module``'s very ``weight``, ``bias``, ``v``, ``running_var`` and ``act`` objects
        (built on ``meta``, nothing copied). ``module`` is timm's class of the same name (or ours); its
        ``apply_act``, ``momentum``, ``groups`` and ``eps`` are read, ``kwargs`` override them."""
        if type(module).__name__ != cls.__name__ or not isinstance(getattr(module, "weight", None), Tensor):
            raise TypeError(f"no conversion from {type(module).__name__} to normlayers.{cls.__name__}; it adopts "
                            f"timm's {cls.__name__}")
        args = {name: getattr(module, name) for name in cls._TIMM_ATTRIBUTES}
        with torch.device("meta"):
            new = cls(module.weight.shape[0], **{**args, **kwargs})
        return _take_over(new, module)

    def to_torch(self) -> nn.Module:
        """timm's class of the same name holding this module's parameter, buffer and ``act`` objects: the module
        without normlayers that computes the same function (to rounding), for :func:`normlayers.restore_norms`.
        Raises ``ImportError`` when timm is not installed."""
        try:
            from timm import layers as timm_layers
        except ImportError as error:
            raise ImportError(f"{type(self).__name__}.to_torch builds timm's {type(self).__name__}, and timm is not "
                              f"installed") from error
        with torch.device("meta"):
            plain = getattr(timm_layers, type(self).__name__)(
                self.num_features, **{name: getattr(self, name) for name in self._TIMM_ATTRIBUTES})
        return _take_over(plain, self).train(self.training)


# ----------------------------------------------------------------------------------------------------------------------
# B family
# ----------------------------------------------------------------------------------------------------------------------


class _EvoNorm2dB(_TimmConvertible, NotScriptable):
    """The B family; subclasses set ``_variant`` and their ``eps`` default."""

    _TIMM_ATTRIBUTES: ClassVar[tuple[str, ...]] = ("apply_act", "momentum", "eps")

    __constants__ = ["num_features", "apply_act", "momentum", "eps"]
    _variant: str
    num_features: int
    apply_act: bool
    momentum: float
    eps: float

    def __init__(self, num_features: int, apply_act: bool, momentum: float, eps: float, *, sync_stats: bool,
                 process_group: Optional[Any], device=None, dtype=None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        check_epsilon("eps", eps)
        self.num_features = check_positive_int("num_features", num_features)
        self.apply_act = bool(apply_act)
        self.momentum = check_evo_momentum(momentum)
        self.eps = float(eps)
        self.sync_stats = bool(sync_stats)
        self.process_group = process_group
        self.weight = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        if self._variant == "b0" and self.apply_act:
            self.v = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        else:
            self.register_parameter("v", None)
        # Registered whatever apply_act is, as timm does, so state_dict keys do not depend on it.
        # running_var is kept in the compute dtype whatever the parameters' dtype, as TF's EvoNorm keeps it in fp32:
        # an fp16 running variance would lose the small per-step updates.
        self.register_buffer("running_var", torch.empty(self.num_features, device=device, dtype=compute_dtype(dtype)))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        nn.init.ones_(self.running_var)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.v is not None:
            nn.init.ones_(self.v)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, apply_act={self.apply_act}, momentum={self.momentum}, eps={self.eps}"
        return text + (", sync_stats=True" if self.sync_stats else "")

    def forward(self, input: Tensor) -> Tensor:
        _check_channels(input, self.num_features)
        return evo_norm_b(self._variant, input, self.running_var, self.weight, self.bias, self.v, self.training,
                          self.momentum, self.eps, self.apply_act, self.sync_stats, self.process_group)


_B_DOC = r"""
    ``σ²`` is the biased variance of each channel over the batch (N, H, W) in training, with gradient, and the
    ``running_var`` buffer in eval. In training ``running_var`` is updated with the *unbiased* batch variance,
    ``running_var ← (1 − momentum)·running_var + momentum·σ²·n/(n − 1)``, ``n = N·H·W`` (timm's rule; TF stores
    the biased one); training needs ``n > 1``. All statistics in fp32 (fp64 for fp64 input); the output
    has the input's dtype. At an exact tie of the ``max`` the gradient is split half/half between the two sides, as
    autograd does for :func:`torch.maximum`.

    Args:
        num_features (int): :math:`C`, the number of channels.
        apply_act (bool): ``False`` makes the layer affine only (``y = x·γ + β``: no normalization, no running
            update), as timm's ``apply_act=False`` and TF's ``nonlinearity=False``. Default: ``True``.
        momentum (float): the running-variance rate, in [0, 1]. Default: ``0.1``.
        eps (float): added inside every square root. Default: see above.
        sync_stats, process_group (keyword-only): ``sync_stats=True`` takes the batch variance over the global
            batch of ``process_group`` (default: the world) in training when ``torch.distributed`` is initialized
            with more than one rank (:mod:`normlayers.distributed`). Default: ``False``.
        device, dtype (keyword-only): factory kwargs for the parameters; ``running_var`` is fp32 (fp64 when
            ``dtype`` is fp64).

    Parameters and buffers (timm's names): ``weight`` :math:`\gamma` (ones), ``bias`` :math:`\beta` (zeros), each
    ``(C,)``; buffer ``running_var`` (ones, ``(C,)``).

    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: :math:`(N, C, H, W)` (same shape and dtype as the input)
"""


@append_doc(_B_DOC, r"""
    Examples::

        >>> norm = normlayers.EvoNorm2dB0(64)
        >>> y = norm(torch.randn(2, 64, 32, 32))
""")
class EvoNorm2dB0(_EvoNorm2dB):
    r"""EvoNorm-B0 (Liu et al., "Evolving Normalization-Activation Layers", NeurIPS 2020), as timm's class.

    .. math::
        y = \frac{x}{\max\left(\sqrt{\sigma^2 + \epsilon},\ v x + \sqrt{s^2_{h,w}(x) + \epsilon}\right)}
            \cdot \gamma + \beta

    ``s²_{h,w}`` is the biased variance of each (sample, channel) over H, W (0, not NaN, at H = W = 1).
    ``v`` (ones, ``(C,)``) is a parameter only with ``apply_act=True``. ``eps`` defaults to ``1e-3`` (timm's since
    2022; the paper's TF code uses ``1e-5``).
    """

    _variant = "b0"

    def __init__(self, num_features: int, apply_act: bool = True, momentum: float = 0.1, eps: float = 1e-3, *,
                 sync_stats: bool = False, process_group: Optional[Any] = None, device=None, dtype=None) -> None:
        super().__init__(num_features, apply_act, momentum, eps, sync_stats=sync_stats, process_group=process_group,
                         device=device, dtype=dtype)


@append_doc(_B_DOC, r"""
    Examples::

        >>> norm = normlayers.EvoNorm2dB1(64)
        >>> y = norm(torch.randn(2, 64, 32, 32))
""")
class EvoNorm2dB1(_EvoNorm2dB):
    r"""EvoNorm-B1, as timm's class (docs/evo_norm.md).

    .. math::
        y = \frac{x}{\max\left(\sqrt{\sigma^2 + \epsilon},\ (x + 1)\sqrt{\mathrm{mean}_{h,w}(x^2) + \epsilon}\right)}
            \cdot \gamma + \beta

    No ``v`` parameter. ``eps`` defaults to ``1e-5``.
    """

    _variant = "b1"

    def __init__(self, num_features: int, apply_act: bool = True, momentum: float = 0.1, eps: float = 1e-5, *,
                 sync_stats: bool = False, process_group: Optional[Any] = None, device=None, dtype=None) -> None:
        super().__init__(num_features, apply_act, momentum, eps, sync_stats=sync_stats, process_group=process_group,
                         device=device, dtype=dtype)


@append_doc(_B_DOC, r"""
    Examples::

        >>> norm = normlayers.EvoNorm2dB2(64)
        >>> y = norm(torch.randn(2, 64, 32, 32))
""")
class EvoNorm2dB2(_EvoNorm2dB):
    r"""EvoNorm-B2, as timm's class (docs/evo_norm.md).

    .. math::
        y = \frac{x}{\max\left(\sqrt{\sigma^2 + \epsilon},\ \sqrt{\mathrm{mean}_{h,w}(x^2) + \epsilon} - x\right)}
            \cdot \gamma + \beta

    No ``v`` parameter. ``eps`` defaults to ``1e-5``.
    """

    _variant = "b2"

    def __init__(self, num_features: int, apply_act: bool = True, momentum: float = 0.1, eps: float = 1e-5, *,
                 sync_stats: bool = False, process_group: Optional[Any] = None, device=None, dtype=None) -> None:
        super().__init__(num_features, apply_act, momentum, eps, sync_stats=sync_stats, process_group=process_group,
                         device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# S family
# ----------------------------------------------------------------------------------------------------------------------


class _EvoNorm2dS(_TimmConvertible, NotScriptable):
    """The S family; subclasses set ``_variant`` (``"s0"``, ``"s1"``, ``"s2"``), ``_always_normalize`` (the timm
    "a" variants) and their defaults."""

    _TIMM_ATTRIBUTES: ClassVar[tuple[str, ...]] = ("groups", "apply_act", "eps")

    __constants__ = ["num_features", "groups", "apply_act", "eps"]
    _variant: str
    _always_normalize: bool
    num_features: int
    groups: int
    apply_act: bool
    eps: float

    def __init__(self, num_features: int, groups: int, group_size: Optional[int], apply_act: bool,
                 act_layer: ActLayer, eps: float, *, device=None, dtype=None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        check_epsilon("eps", eps)
        self.num_features = check_positive_int("num_features", num_features)
        self.groups = _resolve_groups(self.num_features, groups, group_size)
        self.apply_act = bool(apply_act)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        if self._variant == "s0" and self.apply_act:
            self.v = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        else:
            self.register_parameter("v", None)
        if self._variant != "s0":
            # timm's S1/S2 hold the nonlinearity as the submodule ``act`` (Identity when apply_act=False), so an
            # activation with parameters keeps timm's state_dict keys (``act.*``).
            self.act = _make_activation(act_layer) if self.apply_act else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.v is not None:
            nn.init.ones_(self.v)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, apply_act={self.apply_act}, eps={self.eps}"

    def forward(self, input: Tensor) -> Tensor:
        _check_channels(input, self.num_features)
        activation = None if self._variant == "s0" else self.act
        return evo_norm_s(self._variant, input, self.groups, self.weight, self.bias, self.v, activation, self.eps,
                          self.apply_act, self._always_normalize)


_S_DOC = r"""
    The group statistic is taken per sample over ``C/groups`` consecutive channels and all of H, W, with the biased
    variance, in fp32 (fp64 for fp64 input); the output has the input's dtype. Batch-independent: training and eval
    are the same and there are no buffers.

    Args:
        num_features (int): :math:`C`, the number of channels.
        groups (int): the number of channel groups; must divide ``num_features`` (timm's rule, no TF-style
            decrement). Default: ``32``.
        group_size (int, optional): channels per group; when given it overrides ``groups`` with
            ``num_features // group_size`` and must divide ``num_features``. Default: ``None``.
        apply_act (bool): see above for what ``False`` means. Default: ``True``.
"""

_S_ACT_DOC = r"""        act_layer (optional): the nonlinearity ``a``, held as the submodule ``act``: an
            ``nn.Module`` class or zero-argument factory, or one of the names ``"silu"``/``"swish"``, ``"relu"``,
            ``"gelu"``, ``"mish"``, ``"sigmoid"``, ``"tanh"``, ``"identity"``. ``None`` is SiLU. It is applied to the
            fp32 (fp64) tensor. Default: ``None``.
"""

_S_TAIL_DOC = r"""        eps (float): added inside the square root of the group statistic. Default: see above.
        device, dtype (keyword-only): factory kwargs for the parameters.

    Parameters (timm's names): ``weight`` :math:`\gamma` (ones), ``bias`` :math:`\beta` (zeros), each ``(C,)``.

    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: :math:`(N, C, H, W)` (same shape and dtype as the input)
"""


@append_doc(_S_DOC, _S_TAIL_DOC, r"""
    Examples::

        >>> norm = normlayers.EvoNorm2dS0(64, groups=8)
        >>> y = norm(torch.randn(1, 64, 32, 32))
""")
class EvoNorm2dS0(_EvoNorm2dS):
    r"""EvoNorm-S0 (Liu et al., "Evolving Normalization-Activation Layers", NeurIPS 2020), as timm's class.

    .. math:: y = \frac{x \cdot \mathrm{sigmoid}(v x)}{\sqrt{s^2_{g,h,w}(x) + \epsilon}} \cdot \gamma + \beta

    ``v`` (ones, ``(C,)``) is a parameter only with ``apply_act=True``; ``apply_act=False`` is affine only
    (``y = x·γ + β``), as TF's ``nonlinearity=False``. ``eps`` defaults to ``1e-5``.
    """

    _variant = "s0"
    _always_normalize = False

    def __init__(self, num_features: int, groups: int = 32, group_size: Optional[int] = None, apply_act: bool = True,
                 eps: float = 1e-5, *, device=None, dtype=None) -> None:
        super().__init__(num_features, groups, group_size, apply_act, None, eps, device=device, dtype=dtype)


@append_doc(_S_DOC, _S_TAIL_DOC, r"""
    Examples::

        >>> norm = normlayers.EvoNorm2dS0a(64, group_size=16)
        >>> y = norm(torch.randn(1, 64, 32, 32))
""")
class EvoNorm2dS0a(_EvoNorm2dS):
    r"""timm's EvoNorm-S0a: EvoNorm-S0 with ``eps=1e-3`` whose ``apply_act=False`` still normalizes (timm-only).

    .. math::
        y = \frac{x \cdot \mathrm{sigmoid}(v x)}{\sqrt{s^2_{g,h,w}(x) + \epsilon}} \cdot \gamma + \beta
        \quad\text{or, with apply\_act=False,}\quad
        y = \frac{x}{\sqrt{s^2_{g,h,w}(x) + \epsilon}} \cdot \gamma + \beta

    ``v`` (ones, ``(C,)``) is a parameter only with ``apply_act=True``. ``eps`` defaults to ``1e-3``.
    """

    _variant = "s0"
    _always_normalize = True

    def __init__(self, num_features: int, groups: int = 32, group_size: Optional[int] = None, apply_act: bool = True,
                 eps: float = 1e-3, *, device=None, dtype=None) -> None:
        super().__init__(num_features, groups, group_size, apply_act, None, eps, device=device, dtype=dtype)


@append_doc(_S_DOC, _S_ACT_DOC, _S_TAIL_DOC, r"""
    Examples::

        >>> norm = normlayers.EvoNorm2dS1(64, groups=8)
        >>> y = norm(torch.randn(1, 64, 32, 32))
""")
class EvoNorm2dS1(_EvoNorm2dS):
    r"""EvoNorm-S1, as timm's class (docs/evo_norm.md).

    .. math:: y = \frac{a(x)}{\sqrt{s^2_{g,h,w}(x) + \epsilon}} \cdot \gamma + \beta

    ``a`` is ``act_layer`` (SiLU by default); the denominator is a statistic of ``x``, not of ``a(x)``.
    ``apply_act=False`` is affine only. ``eps`` defaults to ``1e-5``.
    """

    _variant = "s1"
    _always_normalize = False

    def __init__(self, num_features: int, groups: int = 32, group_size: Optional[int] = None, apply_act: bool = True,
                 act_layer: ActLayer = None, eps: float = 1e-5, *, device=None, dtype=None) -> None:
        super().__init__(num_features, groups, group_size, apply_act, act_layer, eps, device=device, dtype=dtype)


@append_doc(_S_DOC, _S_ACT_DOC, _S_TAIL_DOC, r"""
    Examples::

        >>> norm = normlayers.EvoNorm2dS1a(64, groups=8)
        >>> y = norm(torch.randn(1, 64, 32, 32))
""")
class EvoNorm2dS1a(_EvoNorm2dS):
    r"""timm's EvoNorm-S1a: EvoNorm-S1 with ``eps=1e-3`` whose ``apply_act=False`` still normalizes, without ``a``
    (timm-only).

    .. math:: y = \frac{a(x)}{\sqrt{s^2_{g,h,w}(x) + \epsilon}} \cdot \gamma + \beta

    with ``a`` the identity when ``apply_act=False``. ``eps`` defaults to ``1e-3``.
    """

    _variant = "s1"
    _always_normalize = True

    def __init__(self, num_features: int, groups: int = 32, group_size: Optional[int] = None, apply_act: bool = True,
                 act_layer: ActLayer = None, eps: float = 1e-3, *, device=None, dtype=None) -> None:
        super().__init__(num_features, groups, group_size, apply_act, act_layer, eps, device=device, dtype=dtype)


@append_doc(_S_DOC, _S_ACT_DOC, _S_TAIL_DOC, r"""
    Examples::

        >>> norm = normlayers.EvoNorm2dS2(64, groups=8)
        >>> y = norm(torch.randn(1, 64, 32, 32))
""")
class EvoNorm2dS2(_EvoNorm2dS):
    r"""EvoNorm-S2, as timm's class (docs/evo_norm.md).

    .. math:: y = \frac{a(x)}{\sqrt{\mathrm{mean}_{g,h,w}(x^2) + \epsilon}} \cdot \gamma + \beta

    the group RMS of ``x`` (not its variance); ``a`` is ``act_layer`` (SiLU by default). ``apply_act=False`` is
    affine only. ``eps`` defaults to ``1e-5``.
    """

    _variant = "s2"
    _always_normalize = False

    def __init__(self, num_features: int, groups: int = 32, group_size: Optional[int] = None, apply_act: bool = True,
                 act_layer: ActLayer = None, eps: float = 1e-5, *, device=None, dtype=None) -> None:
        super().__init__(num_features, groups, group_size, apply_act, act_layer, eps, device=device, dtype=dtype)


@append_doc(_S_DOC, _S_ACT_DOC, _S_TAIL_DOC, r"""
    Examples::

        >>> norm = normlayers.EvoNorm2dS2a(64, groups=8)
        >>> y = norm(torch.randn(1, 64, 32, 32))
""")
class EvoNorm2dS2a(_EvoNorm2dS):
    r"""timm's EvoNorm-S2a: EvoNorm-S2 with ``eps=1e-3`` whose ``apply_act=False`` still normalizes, without ``a``
    (timm-only).

    .. math:: y = \frac{a(x)}{\sqrt{\mathrm{mean}_{g,h,w}(x^2) + \epsilon}} \cdot \gamma + \beta

    with ``a`` the identity when ``apply_act=False``. ``eps`` defaults to ``1e-3``.
    """

    _variant = "s2"
    _always_normalize = True

    def __init__(self, num_features: int, groups: int = 32, group_size: Optional[int] = None, apply_act: bool = True,
                 act_layer: ActLayer = None, eps: float = 1e-3, *, device=None, dtype=None) -> None:
        super().__init__(num_features, groups, group_size, apply_act, act_layer, eps, device=device, dtype=dtype)
