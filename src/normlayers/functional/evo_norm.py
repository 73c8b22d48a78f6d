"""Functional EvoNorm: the batch-dependent B variants and the batch-independent S variants."""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor

from normlayers._checks import (
    check_channel_vectors,
    check_epsilon,
    check_nchw_input,
    check_positive_int,
    check_running_stats_without_grad,
    check_unit_interval,
)
from normlayers.backends import tier
from normlayers.cpu import evo_norm as _cpu_evo
from normlayers.distributed import moment_sync
from normlayers.functional._common import empty_batch_output
from normlayers.ops import evo_norm as _ops_evo
from normlayers.reference import evo_norm as _ref_evo

__all__ = ["evo_norm2d_b0", "evo_norm2d_b1", "evo_norm2d_b2", "evo_norm2d_s0", "evo_norm2d_s0a", "evo_norm2d_s1",
           "evo_norm2d_s1a", "evo_norm2d_s2", "evo_norm2d_s2a"]

_Documented = TypeVar("_Documented")  # a function or a class


def _evo_check_args(input: Tensor, per_channel: dict[str, Optional[Tensor]], eps: float, *,
                    groups: Optional[int] = None, momentum: Optional[float] = None) -> None:
    check_nchw_input(input)
    check_channel_vectors(input, per_channel)
    if groups is not None:
        check_positive_int("groups", groups)
        channels = input.shape[1]
        if channels % groups != 0:
            raise ValueError(f"groups ({groups}) must divide the number of channels (C = input.shape[1] = {channels}); "
                             f"input has shape {list(input.shape)}")
    check_epsilon("eps", eps)
    if momentum is not None:
        check_unit_interval("momentum", momentum)


def check_evo_momentum(momentum: object) -> float:
    """The B family's running-variance rate (also checked by the modules). ``None`` (torch BatchNorm's cumulative
    average) is refused: it needs a ``num_batches_tracked`` counter, which timm's EvoNorm state (and so its
    checkpoints) does not have."""
    if momentum is None:
        raise ValueError("momentum must be a number in [0, 1], got None: EvoNorm-B keeps timm's exponential running "
                         "variance; a cumulative average (torch BatchNorm's momentum=None) is not supported")
    return check_unit_interval("momentum", momentum)


def evo_norm_b(variant: str, input: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor],
               bias: Optional[Tensor], v: Optional[Tensor], training: bool, momentum: float, eps: float,
               apply_act: bool, sync_stats: bool = False, process_group: Optional[Any] = None) -> Tensor:
    """The B sub-family (``variant`` in ``"b0"``, ``"b1"``, ``"b2"``): checks, then the Triton ops or the reference
    (also the modules' forward)."""
    check_evo_momentum(momentum)
    check_running_stats_without_grad(training and apply_act, running_var=running_var)
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
        return empty_batch_output(input, weight, bias, v)
    implementation = tier(input) if apply_act else "reference"  # apply_act=False is one affine: the reference's
    if implementation == "triton":
        return _ops_evo.evo_norm_b(variant, input, running_var, weight, bias, v, training, float(momentum), float(eps),
                                  sync)
    if implementation == "cpu" and sync is None:  # synced statistics: the reference gathers them
        return _cpu_evo.evo_norm_b(input, running_var, weight, bias, v, variant=variant, training=training,
                                   momentum=float(momentum), eps=float(eps))
    return _ref_evo.evo_norm_b(input, running_var, weight, bias, v, variant=variant, training=training,
                               momentum=float(momentum), eps=float(eps), apply_act=apply_act, sync=sync)


def evo_norm_s(variant: str, input: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
               v: Optional[Tensor], activation: Optional[Callable[[Tensor], Tensor]], eps: float, apply_act: bool,
               always_normalize: bool) -> Tensor:
    """The S sub-family (``variant`` in ``"s0"``, ``"s1"``, ``"s2"``; ``always_normalize`` for timm's "a"
    variants): checks, then the Triton ops or the reference (also the modules' forward)."""
    _evo_check_args(input, {"weight": weight, "bias": bias, "v": v}, eps, groups=groups)
    if apply_act and variant == "s0" and v is None:
        raise ValueError("evo_norm2d_s0/s0a with apply_act=True need v, the (C,) parameter of their nonlinearity")
    if activation is not None and not callable(activation):
        raise TypeError(f"activation must be a callable (Tensor -> Tensor) or None, got {type(activation).__name__}")
    if input.numel() == 0:
        return empty_batch_output(input, weight, bias, v)
    implementation = tier(input) if apply_act or always_normalize else "reference"
    if implementation == "triton":
        return _ops_evo.evo_norm_s(variant, input, int(groups), weight, bias, v, activation, float(eps), apply_act)
    if implementation == "cpu" and _cpu_evo.supports_s(variant, activation, apply_act):
        return _cpu_evo.evo_norm_s(input, int(groups), weight, bias, v, variant=variant, activation=activation,
                                   eps=float(eps), apply_act=apply_act)
    return _ref_evo.evo_norm_s(input, int(groups), weight, bias, v, variant=variant, activation=activation,
                               eps=float(eps), apply_act=apply_act, always_normalize=always_normalize)


def append_doc(*sections: str) -> Callable[[_Documented], _Documented]:
    """Append the sections (Args, Shape, ...) that the EvoNorm functional forms, or the classes of a sub-family, share
    to a function's or class's own docstring."""
    def decorate(obj: _Documented) -> _Documented:
        obj.__doc__ = (obj.__doc__ or "") + "".join(sections)
        return obj
    return decorate


_EVO_B_DOC = """
    Args:
        input: ``(N, C, H, W)``, any float dtype; statistics in fp32 (fp64 for fp64 input), output in ``input``'s
            dtype.
        running_var: ``(C,)``, the running (unbiased) variance. Used in eval; updated in place in training as
            ``running_var ← (1 − momentum)·running_var + momentum·var·n/(n − 1)`` with ``n = N·H·W`` (timm's rule,
            ``timm/layers/evo_norm.py``), which needs ``n > 1``; an empty input (``n = 0``) gives an empty output
            and leaves it alone, as ``nn.BatchNorm2d``. May be ``None`` in training (no update).
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
    :func:`torch.maximum`.
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

_EVO_ACTIVATION_DOC = """        activation (keyword-only): the nonlinearity ``a``, a callable on the fp32 (fp64)
            tensor, or ``None`` for the identity. Default: :func:`torch.nn.functional.silu`.
"""


@append_doc(_EVO_B_DOC)
def evo_norm2d_b0(input: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, v: Optional[Tensor] = None, training: bool = False,
                  momentum: float = 0.1, eps: float = 1e-3, *, apply_act: bool = True, sync_stats: bool = False,
                  process_group: Optional[Any] = None) -> Tensor:
    r"""EvoNorm-B0 (Liu et al., NeurIPS 2020; timm's ``EvoNorm2dB0``):

    .. math::
        y = \frac{x}{\max\left(\sqrt{\sigma^2_{n,h,w} + \epsilon},\ v x + \sqrt{s^2_{h,w}(x) + \epsilon}\right)}
            \cdot \gamma + \beta

    ``σ²`` is the biased batch variance of each channel in training, ``running_var`` in eval; ``s²_{h,w}`` the
    biased variance of each (sample, channel) over H, W. ``v`` is the ``(C,)`` parameter of the nonlinearity,
    required with ``apply_act=True``. ``eps`` (default ``1e-3``, timm's) goes inside both square roots.
    """
    return evo_norm_b("b0", input, running_var, weight, bias, v, training, momentum, eps, apply_act, sync_stats,
                      process_group)


@append_doc(_EVO_B_DOC)
def evo_norm2d_b1(input: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                  *, apply_act: bool = True, sync_stats: bool = False, process_group: Optional[Any] = None) -> Tensor:
    r"""EvoNorm-B1 (timm's ``EvoNorm2dB1``):

    .. math::
        y = \frac{x}{\max\left(\sqrt{\sigma^2_{n,h,w} + \epsilon},\ (x + 1)\sqrt{\mathrm{mean}_{h,w}(x^2) + \epsilon}
            \right)} \cdot \gamma + \beta

    ``σ²`` as in :func:`evo_norm2d_b0`; ``eps`` defaults to ``1e-5``.
    """
    return evo_norm_b("b1", input, running_var, weight, bias, None, training, momentum, eps, apply_act, sync_stats,
                      process_group)


@append_doc(_EVO_B_DOC)
def evo_norm2d_b2(input: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                  *, apply_act: bool = True, sync_stats: bool = False, process_group: Optional[Any] = None) -> Tensor:
    r"""EvoNorm-B2 (timm's ``EvoNorm2dB2``):

    .. math::
        y = \frac{x}{\max\left(\sqrt{\sigma^2_{n,h,w} + \epsilon},\ \sqrt{\mathrm{mean}_{h,w}(x^2) + \epsilon} - x
            \right)} \cdot \gamma + \beta

    ``σ²`` as in :func:`evo_norm2d_b0`; ``eps`` defaults to ``1e-5``.
    """
    return evo_norm_b("b2", input, running_var, weight, bias, None, training, momentum, eps, apply_act, sync_stats,
                      process_group)


@append_doc(_EVO_S_DOC)
def evo_norm2d_s0(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  v: Optional[Tensor] = None, eps: float = 1e-5, *, apply_act: bool = True) -> Tensor:
    r"""EvoNorm-S0 (Liu et al., NeurIPS 2020; timm's ``EvoNorm2dS0``):

    .. math:: y = \frac{x \cdot \mathrm{sigmoid}(v x)}{\sqrt{s^2_{g,h,w}(x) + \epsilon}} \cdot \gamma + \beta

    with the biased variance over each sample's group of ``C/groups`` channels and all of H, W. ``v``: ``(C,)``,
    required with ``apply_act=True``. ``apply_act=False`` is affine only. Batch-independent: no running statistics.
    """
    return evo_norm_s("s0", input, groups, weight, bias, v, None, eps, apply_act, False)


@append_doc(_EVO_S_DOC)
def evo_norm2d_s0a(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   v: Optional[Tensor] = None, eps: float = 1e-3, *, apply_act: bool = True) -> Tensor:
    r"""timm's EvoNorm-S0a: :func:`evo_norm2d_s0` with ``eps=1e-3``, whose ``apply_act=False`` still normalizes:
    ``y = x / sqrt(s²_{g,h,w}(x) + eps) · γ + β`` (timm-only, not in the paper).
    """
    return evo_norm_s("s0", input, groups, weight, bias, v, None, eps, apply_act, True)


@append_doc(_EVO_S_DOC, _EVO_ACTIVATION_DOC)
def evo_norm2d_s1(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  eps: float = 1e-5, *, activation: Optional[Callable[[Tensor], Tensor]] = torch.nn.functional.silu,
                  apply_act: bool = True) -> Tensor:
    r"""EvoNorm-S1 (timm's ``EvoNorm2dS1``):

    .. math:: y = \frac{a(x)}{\sqrt{s^2_{g,h,w}(x) + \epsilon}} \cdot \gamma + \beta

    ``a`` defaults to SiLU; the denominator is a statistic of ``x``, not of ``a(x)``. ``apply_act=False`` is affine
    only.
    """
    return evo_norm_s("s1", input, groups, weight, bias, None, activation, eps, apply_act, False)


@append_doc(_EVO_S_DOC, _EVO_ACTIVATION_DOC)
def evo_norm2d_s1a(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-3, *, activation: Optional[Callable[[Tensor], Tensor]] = torch.nn.functional.silu,
                   apply_act: bool = True) -> Tensor:
    r"""timm's EvoNorm-S1a: :func:`evo_norm2d_s1` with ``eps=1e-3``, whose ``apply_act=False`` still normalizes
    (without ``a``): ``y = x / sqrt(s²_{g,h,w}(x) + eps) · γ + β`` (timm-only).
    """
    return evo_norm_s("s1", input, groups, weight, bias, None, activation, eps, apply_act, True)


@append_doc(_EVO_S_DOC, _EVO_ACTIVATION_DOC)
def evo_norm2d_s2(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  eps: float = 1e-5, *, activation: Optional[Callable[[Tensor], Tensor]] = torch.nn.functional.silu,
                  apply_act: bool = True) -> Tensor:
    r"""EvoNorm-S2 (timm's ``EvoNorm2dS2``):

    .. math:: y = \frac{a(x)}{\sqrt{\mathrm{mean}_{g,h,w}(x^2) + \epsilon}} \cdot \gamma + \beta

    the group RMS (not the variance) of ``x``; ``a`` defaults to SiLU. ``apply_act=False`` is affine only.
    """
    return evo_norm_s("s2", input, groups, weight, bias, None, activation, eps, apply_act, False)


@append_doc(_EVO_S_DOC, _EVO_ACTIVATION_DOC)
def evo_norm2d_s2a(input: Tensor, groups: int = 32, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-3, *, activation: Optional[Callable[[Tensor], Tensor]] = torch.nn.functional.silu,
                   apply_act: bool = True) -> Tensor:
    r"""timm's EvoNorm-S2a: :func:`evo_norm2d_s2` with ``eps=1e-3``, whose ``apply_act=False`` still normalizes
    (without ``a``): ``y = x / sqrt(mean_{g,h,w}(x²) + eps) · γ + β`` (timm-only).
    """
    return evo_norm_s("s2", input, groups, weight, bias, None, activation, eps, apply_act, True)
