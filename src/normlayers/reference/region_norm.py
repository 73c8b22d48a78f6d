"""Plain-PyTorch reference of Region Normalization (RN-B, RN-L): the ground truth the kernels are tested against.

It follows the official code (geekyutao/RN @ b0a9476, rn.py). A binary mask splits every feature map
into two regions, the **hole** (mask 1, the authors' "foreground") and the **valid** pixels (mask 0, "background");
each channel is standardized separately inside each region. With ``w_hole = m``, ``w_valid = 1 − m`` and, per
region ``r`` and channel ``c`` (and per sample with ``stats="instance"``),

    S_r  = Σ w_r                      (0 is replaced by 1, as the official ``S[S==0] = 1``)
    μ_r  = Σ w_r·x / S_r
    σ²_r = Σ w_r·(x − μ_r)² / S_r     (biased)
    RN(x) = Σ_r w_r·(x − μ_r) / sqrt(σ²_r + ε_r)

with the sums over ``(N, H, W)`` for ``stats="batch"`` (the official code: BN-style statistics pooled over the batch,
geekyutao/RN issue #12) or over ``(H, W)`` for ``stats="instance"`` (the paper's per-sample RN). The epsilon is
``ε_r = ε·V/S_r`` with ``eps_mode="official"`` (``V`` = the values per statistic, ``N·H·W`` or ``H·W``): the official
code's effective epsilon, a consequence of running BatchNorm on the region-filled tensor (derived in
docs/region_norm.md); or plainly
``ε_r = ε`` with ``eps_mode="plain"`` (the paper's).

An empty region (``S_r = 0``) has no pixel to write: its ``w_r`` is zero everywhere, so it contributes exactly 0 and
the other region reduces the layer to BatchNorm (InstanceNorm) up to the effective epsilon.

Region affine (RN-B, rn.py ``RN_B``), the authors' ``(1 + γ)`` parametrization with zero-initialized parameters:

* ``affine="masked"``: ``y = Σ_r w_r·(n_r·(1 + γ_r) + β_r)`` with ``n_r = (x − μ_r)/sqrt(σ²_r + ε_r)``: each region
  has its own scale and shift (the paper's region-specific affine).
* ``affine="official"``: ``y = Σ_r w_r·n_r·(1 + γ_r) + β_hole + β_valid``: the official code adds both betas to every
  pixel (rn.py ``RN_B.forward``), so only the scale is region-specific.

RN-L (rn.py ``SelfAware_Affine`` and ``RN_L``): ``s = sigmoid(conv1([mean_c(x), max_c(x)]))``,
``M = (s ≥ threshold)`` (no gradient through the threshold), ``y = RN(x; M)·(1 + gamma_conv(s)) + beta_conv(s)``.

Masks: bool, or any dtype where every nonzero value marks a hole (the authors binarize masks with ``mask > 0``,
dataset.py L86-90; the layer itself assumes binary masks), of shape ``(N, 1, H', W')`` or
``(N, C, H', W')``; resized to the feature map's ``(H, W)`` by ``F.interpolate(mode="nearest")`` (rn.py L62). No
gradient flows into the mask.

The statistics of each region are taken of its values scaled by a power of two, with ``ε_r·s²`` (normalization is
scale invariant; docs/reliability.md), so inputs whose squares overflow or underflow the dtype still normalize
correctly; ordinary inputs give the same result, bit for bit.

Written for reading, not speed. Arithmetic in fp32 (fp64 for fp64 input); the output is rounded once, to the input's
dtype. Gradients come from autograd, so they are an independent check of the hand-written backward kernels. Argument
checks live in :mod:`normlayers.functional`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers._dtypes import compute_dtype
from normlayers.reference.row_norms import overflow_to_nan, power_of_two_scale

__all__ = ["prepare_mask", "region_norm", "self_aware_affine", "learnable_region_norm"]

_PER_CHANNEL = (1, -1, 1, 1)

# (local mean, local biased var, local count) -> global (mean, var, count), elementwise; counts may be 0 anywhere.
MaskedMomentSync = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def prepare_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """The hole indicator as a ``bool`` tensor of spatial ``size``: nonzero = hole, detached, resized by legacy
    nearest interpolation (source index ``floor(i·in/out)``, rn.py L62) when its size differs."""
    holes = mask.detach() != 0
    if tuple(holes.shape[2:]) != tuple(size):
        holes = F.interpolate(holes.to(torch.uint8), size=tuple(size), mode="nearest") != 0
    return holes


def region_norm(x: Tensor, mask: Tensor, foreground_gamma: Optional[Tensor] = None,
                foreground_beta: Optional[Tensor] = None, background_gamma: Optional[Tensor] = None,
                background_beta: Optional[Tensor] = None, *, eps: float = 1e-5, stats: str = "batch",
                eps_mode: str = "official", affine: str = "masked", sync: Optional[MaskedMomentSync] = None
                ) -> Tensor:
    """RN of a 4-D ``x`` with the hole ``mask`` (see the module docstring), then the optional region affine.

    ``foreground_*`` belong to the hole region (mask 1), ``background_*`` to the valid region, as in the official
    ``RN_B``; a missing ``gamma`` is ``γ = 0`` and a missing ``beta`` is ``β = 0``. Output: ``x``'s dtype and shape.

    ``sync`` (``stats="batch"`` only): combines this rank's per-(region, channel) ``(mean, var, count)`` into the
    global batch's (:func:`normlayers.distributed.sync_masked_moments`); the effective epsilon then uses the global
    counts, ``V`` being the global ``N·H·W`` (the two regions' counts together).
    """
    opmath = compute_dtype(x.dtype)
    xf = x.to(opmath)
    hole = prepare_mask(mask, x.shape[2:]).expand_as(xf)
    dims = (0, 2, 3) if stats == "batch" else (2, 3)
    values = math.prod([x.shape[d] for d in dims])
    # Each region selects its values (torch.where), never multiplies by a 0/1 weight: a NaN or inf in one region
    # must not reach the other region's statistics or outputs (NaN·0 = NaN), nor any gradient (0·NaN).
    # The statistics are those of the region's values scaled by a power of two (from the region's largest magnitude,
    # :func:`normlayers.reference.row_norms.power_of_two_scale`), with the epsilon scaled by s²: exact for ordinary
    # inputs, and right where the squares of the values would overflow or underflow (3e19, 1e30 in fp32).
    largest_eps = eps * max(values, 1) if eps_mode == "official" else eps  # keeps every ε_r·s² ≤ 1
    regions = (hole, ~hole)
    counts, means, variances, scales = [], [], [], []
    for inside in regions:
        count = inside.sum(dims, keepdim=True).to(opmath)
        safe_count = torch.where(count == 0, torch.ones_like(count), count)  # the official S[S==0] = 1
        scale = (power_of_two_scale(torch.where(inside, xf, 0.0), dims, largest_eps) if xf.numel() else
                 torch.ones_like(count))  # no value: nothing to scale (and no maximum to take)
        scaled = torch.where(inside, xf, 0.0) * scale
        mean = scaled.sum(dims, keepdim=True) / safe_count
        centred = torch.where(inside, scaled - mean, 0.0)
        counts.append(count)
        means.append(mean)
        scales.append(scale)
        variances.append(centred.square().sum(dims, keepdim=True) / safe_count)
    if sync is not None:
        # The ranks exchange unscaled moments (a variance beyond the dtype's range is NaN, never a silent 0 output).
        mean, var, count = sync(torch.stack(means) / torch.stack(scales),
                                overflow_to_nan(torch.stack(variances) / torch.stack(scales).square()),
                                torch.stack(counts))
        means, variances, counts = list(mean.unbind(0)), list(var.unbind(0)), list(count.unbind(0))
        scales = [torch.ones_like(m) for m in means]
        values = counts[0] + counts[1]  # the global N·H·W of each channel
    out = torch.zeros_like(xf)
    betas = []
    for inside, count, mean, var, scale, gamma, beta in zip(regions, counts, means, variances, scales,
                                                             (foreground_gamma, background_gamma),
                                                             (foreground_beta, background_beta)):
        count = torch.where(count == 0, torch.ones_like(count), count)
        region_eps = eps * values / count if eps_mode == "official" else eps
        normalized = torch.where(inside, torch.where(inside, xf, 0.0) * scale - mean, 0.0) * torch.rsqrt(
            var + region_eps * scale * scale)
        if gamma is not None:
            normalized = normalized * (1 + gamma.to(opmath).view(_PER_CHANNEL))
        if beta is not None:
            beta = beta.to(opmath).view(_PER_CHANNEL)
            if affine == "official":
                betas.append(beta)  # added to every pixel, outside the region weight
            else:
                normalized = normalized + beta
        out = torch.where(inside, normalized, out)
    for beta in betas:
        out = out + beta
    return out.to(x.dtype)


def self_aware_affine(x: Tensor, conv1_weight: Tensor, gamma_weight: Tensor, gamma_bias: Optional[Tensor],
                      beta_weight: Tensor, beta_bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The official ``SelfAware_Affine`` (rn.py L71–95): ``(s, gamma, beta)``, each ``(N, 1, H, W)`` in opmath.

    ``s = sigmoid(conv1(cat[mean over channels, max over channels]))`` (average first, then max), then
    ``gamma = gamma_conv(s)`` and ``beta = beta_conv(s)``; every conv keeps the spatial size (padding ``k // 2``).
    """
    opmath = compute_dtype(x.dtype)
    xf = x.to(opmath)
    pooled = torch.cat([xf.mean(1, keepdim=True), xf.amax(1, keepdim=True)], dim=1)
    padding = conv1_weight.shape[-1] // 2
    s = torch.sigmoid(F.conv2d(pooled, conv1_weight.to(opmath), padding=padding))

    def conv(weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.conv2d(s, weight.to(opmath), None if bias is None else bias.to(opmath), padding=padding)

    return s, conv(gamma_weight, gamma_bias), conv(beta_weight, beta_bias)


def learnable_region_norm(x: Tensor, conv1_weight: Tensor, gamma_weight: Tensor, gamma_bias: Optional[Tensor],
                          beta_weight: Tensor, beta_bias: Optional[Tensor], *, threshold: float = 0.8,
                          eps: float = 1e-5, stats: str = "batch", eps_mode: str = "official",
                          sync: Optional[MaskedMomentSync] = None,
                          normalize: Callable[..., Tensor] = region_norm) -> Tensor:
    """RN-L (official ``RN_L``, rn.py L97–130): regions from the thresholded self-aware map, RN without region affine,
    then the learned spatial affine ``r·(1 + gamma) + beta``; ``sync`` as :func:`region_norm`'s. Output: ``x``'s
    dtype. ``normalize`` is the RN it runs (:func:`region_norm`; the CPU tier passes its own)."""
    s, gamma, beta = self_aware_affine(x, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias)
    # ">=" on the detached map: the mask carries no gradient, conv1 learns only through gamma and beta.
    regions = s.detach() >= threshold
    r = normalize(x.to(s.dtype), regions, eps=eps, stats=stats, eps_mode=eps_mode, sync=sync)
    return (r * (1 + gamma) + beta).to(x.dtype)
