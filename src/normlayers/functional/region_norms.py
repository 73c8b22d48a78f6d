"""Functional Region Normalization: RN-B with a given mask, and the learnable RN-L."""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import Tensor

from normlayers._checks import (
    check_channel_vectors,
    check_choice,
    check_finite,
    check_float_tensor,
    check_nchw_input,
    check_same_device,
    is_real,
)
from normlayers._dtensor import is_dtensor
from normlayers.backends import tier
from normlayers.cpu import region_norm as _cpu_region
from normlayers.distributed import sync_group, sync_masked_moments
from normlayers.functional._common import empty_batch_output
from normlayers.ops import region_norm as _ops_region
from normlayers.reference import region_norm as _ref_region

__all__ = ["region_norm", "learnable_region_norm"]

REGION_STATS = ("batch", "instance")
REGION_EPS_MODES = ("official", "plain")
REGION_AFFINES = ("masked", "official")


def check_region_options(eps: object, stats: object, eps_mode: Optional[str]) -> tuple[float, str, str]:
    """``(eps, stats, eps_mode)`` checked, with ``eps_mode=None`` resolved (also the modules' constructors').

    ``eps > 0``, not ``>= 0``: a region whose values are all equal (one pixel, for one) has zero variance.
    ``eps_mode=None`` follows ``stats``: the official code's effective epsilon with its batch statistics, the paper's
    plain epsilon with per-sample statistics (docs/region_norm.md).
    """
    if not is_real(eps) or not eps > 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite positive number (a region of equal values has zero variance), "
                         f"got {eps!r}")
    stats = check_choice("stats", stats, REGION_STATS)
    if eps_mode is None:
        eps_mode = "official" if stats == "batch" else "plain"
    return float(eps), stats, check_choice("eps_mode", eps_mode, REGION_EPS_MODES)


def _check_region_input(input: Tensor, mask: Tensor) -> None:
    check_nchw_input(input)
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
    check_same_device("mask", mask, input)


def region_norm(input: Tensor, mask: Tensor, foreground_gamma: Optional[Tensor] = None,
                foreground_beta: Optional[Tensor] = None, background_gamma: Optional[Tensor] = None,
                background_beta: Optional[Tensor] = None, eps: float = 1e-5, stats: str = "batch", *,
                eps_mode: Optional[str] = None, affine: str = "masked", sync_stats: bool = False,
                process_group: Optional[Any] = None) -> Tensor:
    r"""Region Normalization with a given mask, RN-B (Yu et al., AAAI 2020; code geekyutao/RN, ``rn.py``).

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
            the values per statistic (``N·H·W`` or ``H·W``), the official code's effective epsilon
            (docs/region_norm.md); ``"plain"``: ``ε_r = ε``. Default ``None``: ``"official"`` with
            ``stats="batch"``, ``"plain"`` with ``"instance"``.
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
    check_channel_vectors(input, {"foreground_gamma": foreground_gamma, "foreground_beta": foreground_beta,
                                  "background_gamma": background_gamma, "background_beta": background_beta})
    eps, stats, eps_mode = check_region_options(eps, stats, eps_mode)
    affine = check_choice("affine", affine, REGION_AFFINES)
    sync = _region_sync(stats, sync_stats, process_group)
    implementation = _implementation(input, sync)
    if implementation == "cpu":
        return _cpu_region.region_norm(input, mask, foreground_gamma, foreground_beta, background_gamma,
                                       background_beta, eps=eps, stats=stats, eps_mode=eps_mode, affine=affine)
    if implementation == "triton":
        return _ops_region.region_norm(input, mask, foreground_gamma, foreground_beta, background_gamma,
                                       background_beta, eps=eps, stats=stats, eps_mode=eps_mode, affine=affine,
                                       sync=sync)
    return _ref_region.region_norm(input, mask, foreground_gamma, foreground_beta, background_gamma, background_beta,
                                   eps=eps, stats=stats, eps_mode=eps_mode, affine=affine, sync=sync)


def _implementation(input: Tensor, sync: Optional[_ref_region.MaskedMomentSync]) -> str:
    """``tier(input)``, except that synced statistics, DTensor inputs and inputs without values leave the CPU tier
    for the reference (which gathers, shards and handles them)."""
    implementation = tier(input)
    if implementation == "cpu" and (sync is not None or is_dtensor(input) or input.numel() == 0):
        return "reference"
    return implementation


def _region_sync(stats: str, sync_stats: bool, process_group: Optional[Any]
                 ) -> Optional[_ref_region.MaskedMomentSync]:
    """The combiner of per-(channel, region) moments over the ranks, or ``None``: per-sample statistics
    (``stats="instance"``) need none, and the functional syncs whenever asked (the module asks only in training)."""
    group = sync_group(sync_stats, process_group, True) if stats == "batch" else None
    if group is None:
        return None
    return lambda mean, var, count: sync_masked_moments(mean, var, count, group)


def _check_learnable_region_args(input: Tensor, conv1_weight: Tensor, gamma_weight: Tensor,
                                 gamma_bias: Optional[Tensor], beta_weight: Tensor, beta_bias: Optional[Tensor],
                                 threshold: float) -> None:
    check_nchw_input(input)
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
        if tuple(check_float_tensor(name, t).shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (kernel size {k} from conv1_weight), got "
                             f"{list(t.shape)}")
        check_same_device(name, t, input)
    check_finite("threshold", threshold)


def learnable_region_norm(input: Tensor, conv1_weight: Tensor, gamma_weight: Tensor, gamma_bias: Optional[Tensor],
                          beta_weight: Tensor, beta_bias: Optional[Tensor], threshold: float = 0.8,
                          eps: float = 1e-5, stats: str = "batch", *, eps_mode: Optional[str] = None,
                          sync_stats: bool = False, process_group: Optional[Any] = None) -> Tensor:
    r"""Learnable Region Normalization, RN-L (Yu et al., AAAI 2020; the official ``RN_L``):

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
    eps, stats, eps_mode = check_region_options(eps, stats, eps_mode)
    sync = _region_sync(stats, sync_stats, process_group)
    if input.shape[2] == 0 or input.shape[3] == 0:
        # No pixel: nothing to normalize (the self-aware convs cannot even run on an empty map).
        return empty_batch_output(input, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias)
    implementation = _implementation(input, sync)
    if implementation == "cpu":
        return _cpu_region.learnable_region_norm(input, conv1_weight, gamma_weight, gamma_bias, beta_weight,
                                                 beta_bias, threshold=float(threshold), eps=eps, stats=stats,
                                                 eps_mode=eps_mode)
    if implementation == "triton":
        return _ops_region.learnable_region_norm(input, conv1_weight, gamma_weight, gamma_bias, beta_weight,
                                                 beta_bias, threshold=float(threshold), eps=eps, stats=stats,
                                                 eps_mode=eps_mode, sync=sync)
    return _ref_region.learnable_region_norm(input, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias,
                                             threshold=float(threshold), eps=eps, stats=stats, eps_mode=eps_mode,
                                             sync=sync)
