"""Group Normalization with an optional fused activation: a drop-in :class:`torch.nn.GroupNorm` (same constructor,
defaults, attributes and ``state_dict`` keys) whose keyword-only ``act`` fuses the SiLU, GELU or ReLU that follows it
in diffusion UNets, VAEs and timm's ``GroupNormAct``."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from normlayers import functional as F
from normlayers._checks import check_epsilon, check_positive_int
from normlayers.functional.group_norm import check_activation
from normlayers.nn._adopt import adopt, timm_class_name
from normlayers.nn._scripting import NotScriptable

__all__ = ["GroupNorm", "activation_name"]

# The activation modules `act` can stand for, by exact type; nn.GELU only with approximate="none" (the erf form).
_ACTIVATION_MODULES: dict[type, Optional[str]] = {nn.Identity: None, nn.SiLU: "silu", nn.GELU: "gelu",
                                                  nn.ReLU: "relu"}


def activation_name(module: nn.Module) -> Optional[str]:
    """The ``act`` name computing what the activation ``module`` computes (``None`` for ``nn.Identity``; timm's
    ``GELU`` is ``F.gelu``, exact); raises ``TypeError`` for any other module (a tanh-approximated GELU, a LeakyReLU,
    a subclass)."""
    kind = type(module)
    if kind in _ACTIVATION_MODULES and getattr(module, "approximate", "none") == "none":
        return _ACTIVATION_MODULES[kind]
    if timm_class_name(module) == "GELU":
        return "gelu"
    raise TypeError(f"no fused activation computes {module!r}: GroupNorm fuses nn.SiLU, nn.GELU() (exact) and "
                    f"nn.ReLU (or nn.Identity for none)")


class GroupNorm(NotScriptable, nn.GroupNorm):
    r"""Group Normalization (Wu & He, 2018) of an ``(N, C, *)`` input, with an optional fused activation.

    .. math:: y = \mathrm{act}\left(\frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}}
              \cdot \gamma + \beta\right)

    The ``C`` channels are split into ``num_groups`` groups of consecutive channels; mean and biased variance are
    taken over each sample's group (its ``C / num_groups`` channels and all spatial positions), in fp32 (fp64 for
    fp64 input). A subclass of :class:`torch.nn.GroupNorm` with the same constructor, defaults, attributes and
    ``state_dict`` keys (``weight``, ``bias``): with ``act=None`` it computes ``nn.GroupNorm``'s function. ``act``
    applies SiLU, GELU (exact) or ReLU inside the same kernels, forward and backward, before the one rounding to the
    input's dtype: ``act="silu"`` replaces ``nn.GroupNorm`` followed by ``nn.SiLU``. On CUDA the Triton kernels read
    NCHW and channels-last inputs in place, spread large groups over many programs and keep the backward
    deterministic (docs/group_norm.md); on CPU it runs ``F.group_norm`` and the activation.

    Args:
        num_groups (int): ``G``, the number of groups; must divide ``num_channels``.
        num_channels (int): ``C``, the number of channels.
        eps (float): added to the variance. Default: ``1e-5``.
        affine (bool): learnable per-channel ``weight`` (ones) and ``bias`` (zeros). Default: ``True``.
        device, dtype: factory kwargs for the parameters.
        bias (bool, keyword-only): with ``affine``, whether to learn ``bias``. Default: ``True``.
        act (str, keyword-only): ``None``, ``"silu"``, ``"gelu"`` or ``"relu"``, applied after the affine map.
            Default: ``None``.

    Shape:
        - Input: :math:`(N, C, *)`: any number of spatial dims; NCHW, channels-last or a channel slice.
        - Output: :math:`(N, C, *)`, same shape (on CUDA in the input's memory format when it is dense).

    Examples::

        >>> norm = normlayers.GroupNorm(32, 320, act="silu")      # nn.GroupNorm(32, 320) then nn.SiLU()
        >>> y = norm(torch.randn(2, 320, 64, 64))
        >>> norm.load_state_dict(nn.GroupNorm(32, 320).state_dict())
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine", "act"]
    act: Optional[str]

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None, *, bias: bool = True, act: Optional[str] = None) -> None:
        num_groups = check_positive_int("num_groups", num_groups)
        num_channels = check_positive_int("num_channels", num_channels)
        if num_channels % num_groups != 0:
            raise ValueError(f"num_groups ({num_groups}) must divide num_channels ({num_channels})")
        super().__init__(num_groups, num_channels, check_epsilon("eps", eps), affine, device=device, dtype=dtype,
                         bias=bias)
        self.act = check_activation(act)

    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act!r}" if self.act is not None else "")

    # How normlayers.replace_norms checks a module built by from_module against its source: within rounding (our
    # reference reduces in another order than ATen's group_norm; the CPU tier runs ATen's, bit for bit in fp32).
    conversion_fidelity: ClassVar[str] = "rounding"

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> "GroupNorm":
        """A GroupNorm holding ``module``'s very ``weight``/``bias`` objects (built on ``meta``, nothing copied).

        ``module`` is an :class:`torch.nn.GroupNorm` or one of timm's ``GroupNorm``, ``GroupNorm1``,
        ``GroupNormAct`` and ``GroupNorm1Act`` (whose ``act`` module, SiLU, exact GELU, ReLU or Identity, becomes
        ``act``; its ``drop`` must be an Identity); ``kwargs`` override the constructor arguments read from it.
        """
        act = getattr(module, "act", None)
        drop = getattr(module, "drop", None)
        if drop is not None and type(drop) is not nn.Identity:
            raise TypeError(f"no conversion from {type(module).__name__} to GroupNorm: it applies {drop!r} between "
                            f"the norm and its activation")
        args = {"eps": module.eps, "affine": module.weight is not None,
                "bias": getattr(module, "bias", None) is not None or module.weight is None,
                "act": activation_name(act) if isinstance(act, nn.Module) else None, **kwargs}
        with torch.device("meta"):
            new = cls(module.num_groups, module.num_channels, **args)
        adopt(new, module, {name: name for name in ("weight", "bias") if getattr(new, name) is not None})
        return new

    def to_torch(self) -> nn.Module:
        """``nn.GroupNorm`` of the same configuration holding this module's parameter objects; with ``act``,
        ``nn.Sequential(nn.GroupNorm, <activation>)`` (its ``state_dict`` keys gain the prefix ``0.``)."""
        with torch.device("meta"):
            plain = nn.GroupNorm(self.num_groups, self.num_channels, self.eps, self.affine,
                                 bias=self.bias is not None or not self.affine)
        adopt(plain, self, {name: name for name in ("weight", "bias") if getattr(self, name) is not None})
        plain.train(self.training)
        if self.act is None:
            return plain
        activation = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}[self.act]()
        return nn.Sequential(plain, activation)
