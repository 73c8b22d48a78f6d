r"""CPU tier of Region Normalization (RN-B and RN-L; Yu et al., AAAI 2020, the official ``rn.py`` of geekyutao/RN):
one closed-form ``autograd.Function`` for the region statistics and the region affine, instead of autograd through
the reference's two dozen elementwise ops.

Per region ``r`` (hole, valid) and statistic group of ``S`` values (a channel over ``(N, H, W)`` with
``stats="batch"``, a plane over ``(H, W)`` with ``"instance"``), the values scaled by a power of two ``s``
(:func:`normlayers.reference.row_norms.power_of_two_scale` of the region's values, so that the statistics are right
at fp32's range limits, as in the reference):

.. math::
    \hat x = (x s - \mu_s)\,\mathrm{rstd}, \quad \mathrm{rstd} = (\sigma^2_s + \epsilon_r s^2)^{-1/2}, \quad
    y = \hat x\,(1 + \gamma_r) + \beta_r

.. math::
    \frac{\partial L}{\partial x} = s\,\mathrm{rstd}\,(1 + \gamma_r)\Big(dy - \tfrac{1}{S}\textstyle\sum_r dy
    - \hat x\,\tfrac{1}{S}\sum_r dy\,\hat x\Big), \quad
    \frac{\partial L}{\partial \gamma_r} = \textstyle\sum_r dy\,\hat x, \quad
    \frac{\partial L}{\partial \beta_r} = \textstyle\sum_r dy

(``ε_r`` depends on the counts only; with ``affine="official"`` each beta's gradient is ``Σ dy`` over every pixel).
A NaN in one region reaches nothing of the other, as in the reference: the forward weights each region by its 0/1
mask (a multiply, 3x faster than ``torch.where`` on CPU) only after one check that every value and sum is finite;
otherwise, under ``torch.compile`` (whose generated code fuses the selections) and in the backward, each region's
sums select its values with ``torch.where``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from normlayers._autograd import recomputed_backward, wants_double_backward
from normlayers._dtypes import compute_dtype
from normlayers.reference import region_norm as _ref_region
from normlayers.reference.row_norms import power_of_two_scale, power_of_two_scale_of_max

__all__ = ["region_norm", "learnable_region_norm"]

_PER_CHANNEL = (1, -1, 1, 1)


def _region_sums(t: Tensor, inside: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``(Σ over the hole, Σ over the valid region)`` of ``t`` over ``dims`` (kept), by selection."""
    return (torch.where(inside, t, 0.0).sum(dims, keepdim=True),
            torch.where(inside, 0.0, t).sum(dims, keepdim=True))


def _gain(gamma: Optional[Tensor], dtype: torch.dtype) -> Tensor | float:
    return 1.0 if gamma is None else 1 + gamma.to(dtype).view(_PER_CHANNEL)


def _max_abs(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``max |t|`` over ``dims`` (kept), without a temporary ``|t|``: ``max(amax, −amin)``."""
    return torch.maximum(t.amax(dims, keepdim=True), t.amin(dims, keepdim=True).neg())


def _sum_squares(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``Σ t²`` over ``dims`` (kept); a dot product along the contiguous planes where it can (no ``t²`` temporary)."""
    if not t.is_contiguous():
        return t.square().sum(dims, keepdim=True)
    n, channels = t.shape[:2]
    plane = torch.linalg.vecdot(t.view(n, channels, -1), t.view(n, channels, -1)).view(n, channels, 1, 1)
    return plane.sum(0, keepdim=True) if 0 in dims else plane


def _region_eps(eps: float, eps_mode: str, values: int, count: Tensor) -> Tensor | float:
    return eps * values / count if eps_mode == "official" else eps


def _normalize_selected(xf: Tensor, hole: Tensor, dims: tuple[int, ...], eps: float, eps_mode: str,
                        largest_eps: float) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """``(x̂, counts, scales, rstds)``, each region's values chosen by ``torch.where``: the form for any input (a NaN
    or inf stays in its region) and for ``torch.compile``, whose generated code fuses the selections."""
    values = math.prod([xf.shape[d] for d in dims])
    scale_hole = power_of_two_scale(torch.where(hole, xf, 0.0), dims, largest_eps)
    scale_valid = power_of_two_scale(torch.where(hole, 0.0, xf), dims, largest_eps)
    xs = xf * torch.where(hole, scale_hole, scale_valid)
    count_hole = hole.expand_as(xf).sum(dims, keepdim=True).to(xf.dtype)
    counts = [count_hole.clamp(min=1), (values - count_hole).clamp(min=1)]  # the official S[S==0] = 1
    sums = _region_sums(xs, hole, dims)
    centred = xs - torch.where(hole, sums[0] / counts[0], sums[1] / counts[1])
    squares = _region_sums(centred.square(), hole, dims)
    scales = [scale_hole, scale_valid]
    rstds = [torch.rsqrt(square / count + _region_eps(eps, eps_mode, values, count) * scale * scale)
             for count, square, scale in zip(counts, squares, scales)]
    return centred * torch.where(hole, rstds[0], rstds[1]), counts, scales, rstds


def _masked_parts(xf: Tensor, hole: Tensor, dims: tuple[int, ...], eps: float, eps_mode: str,
                  largest_eps: float) -> Optional[tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor],
                                                        list[Tensor]]]:
    """``(centred, weights, counts, scales, rstds)`` per region for finite ``x``, by 0/1 weights instead of
    ``torch.where`` (which is 3x slower than a multiply on CPU): ``centred`` is the region's ``x·s − μ_s``, 0 elsewhere,
    the very values of :func:`_normalize_selected`. ``None`` where a value or a region's sum is not finite (a weight
    of 0 would spread a NaN to the other region: that input takes the selections), or a region's largest magnitude is
    below ``2^−64`` (its sum, taken before the scaling here, could lose bits to subnormals)."""
    inside = hole.to(xf.dtype)
    hole_part = xf * inside
    parts = [hole_part, xf - hole_part]  # exact: each pixel's value in its own region's part, 0 in the other's
    largest = [_max_abs(part, dims) for part in parts]
    sums = [part.sum(dims, keepdim=True) for part in parts]
    magnitudes = torch.cat(largest)
    if not bool(torch.isfinite(torch.cat(sums)).all() & ((magnitudes >= 2.0 ** -64) | (magnitudes == 0)).all()):
        return None
    values = math.prod([xf.shape[d] for d in dims])
    count_hole = inside.sum(dims, keepdim=True).expand_as(sums[0])
    counts = [count_hole.clamp(min=1), (values - count_hole).clamp(min=1)]  # the official S[S==0] = 1
    weights = [inside, 1.0 - inside]
    scales = [power_of_two_scale_of_max(m, largest_eps) for m in largest]
    centred, rstds = [], []
    for part, weight, total, count, scale in zip(parts, weights, sums, counts, scales):
        # Σ(x·s) = s·Σx exactly for a power of two s (the sum is finite and far above the subnormals), so
        # (x − Σx/S)·s is the selections' x·s − μ_s to the last bit
        centred.append(part.addcmul_(weight, total / count, value=-1.0).mul_(scale))  # in place: fresh temporaries
        rstds.append(torch.rsqrt(_sum_squares(part, dims) / count
                                 + _region_eps(eps, eps_mode, values, count) * scale * scale))
    return centred, weights, counts, scales, rstds


def _region_affine_by_weights(centred: list[Tensor], weights: list[Tensor], coefficients: list[Tensor],
                              betas: list[Optional[Tensor]], affine: str) -> Tensor:
    """``Σ_r centred_r·coefficient_r`` plus the region betas (each on its own region, or both everywhere with
    ``affine="official"``), in place in ``centred[0]``."""
    y = centred[0].mul_(coefficients[0]).addcmul_(centred[1], coefficients[1])
    if affine == "official":
        offset = sum(b for b in betas if b is not None)
        return y if isinstance(offset, int) else y.add_(offset)
    for weight, beta in zip(weights, betas):
        if beta is not None:
            y = y.addcmul_(weight, beta)
    return y


class _RegionNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, foreground_gamma: Optional[Tensor], foreground_beta: Optional[Tensor],
                background_gamma: Optional[Tensor], background_beta: Optional[Tensor], hole: Tensor, eps: float,
                stats: str, eps_mode: str, affine: str) -> Tensor:
        dtype = compute_dtype(x.dtype)
        xf = x.to(dtype)
        dims = (0, 2, 3) if stats == "batch" else (2, 3)
        values = math.prod([x.shape[d] for d in dims])
        largest_eps = eps * max(values, 1) if eps_mode == "official" else eps  # as the reference: every ε_r·s² ≤ 1
        gains = (_gain(foreground_gamma, dtype), _gain(background_gamma, dtype))
        betas = [None if b is None else b.to(dtype).view(_PER_CHANNEL) for b in (foreground_beta, background_beta)]
        parts = None if torch.compiler.is_compiling() or xf.numel() == 0 else _masked_parts(
            xf, hole, dims, eps, eps_mode, largest_eps)
        if parts is not None:
            centred, weights, counts, scales, rstds = parts
            xhat = torch.mul(centred[0], rstds[0]).addcmul_(centred[1], rstds[1]) if any(
                ctx.needs_input_grad[:5]) else None
            y = _region_affine_by_weights(centred, weights, [r * g for r, g in zip(rstds, gains)], betas, affine)
        else:
            xhat, counts, scales, rstds = _normalize_selected(xf, hole, dims, eps, eps_mode, largest_eps)
            y = xhat if foreground_gamma is None and background_gamma is None else xhat * torch.where(hole, *gains)
            if affine == "official":  # both betas at every pixel (the official rn.py)
                for beta in betas:
                    y = y if beta is None else y + beta
            elif foreground_beta is not None or background_beta is not None:
                y = y + torch.where(hole, *[0.0 if b is None else b for b in betas])
        # For the backward: each region's count and its dx coefficient s·rstd·(1 + γ), per statistic.
        per_region = torch.stack([*counts, scales[0] * rstds[0] * gains[0], scales[1] * rstds[1] * gains[1]])
        ctx.save_for_backward(x, foreground_gamma, foreground_beta, background_gamma, background_beta, hole, xhat,
                              per_region)
        ctx.options = (eps, stats, eps_mode, affine)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor):
        x, *parameters, hole, xhat, per_region = ctx.saved_tensors
        eps, stats, eps_mode, affine = ctx.options
        if wants_double_backward():
            def layer(t: Tensor, *params: Optional[Tensor]) -> Tensor:
                return _ref_region.region_norm(t, hole, *params, eps=eps, stats=stats, eps_mode=eps_mode,
                                               affine=affine)

            return recomputed_backward(ctx, layer, (x, *parameters), dy)
        dyf = dy.to(xhat.dtype)
        dims = (0, 2, 3) if stats == "batch" else (2, 3)
        counts, coefficients = per_region[:2], per_region[2:]
        dy_sums = _region_sums(dyf, hole, dims)
        dy_xhat_sums = _region_sums(dyf * xhat, hole, dims)
        mean_dy = torch.where(hole, dy_sums[0] / counts[0], dy_sums[1] / counts[1])
        mean_dy_xhat = torch.where(hole, dy_xhat_sums[0] / counts[0], dy_xhat_sums[1] / counts[1])
        dx = (dyf - mean_dy - xhat * mean_dy_xhat) * torch.where(hole, coefficients[0], coefficients[1])
        dgamma_hole, dgamma_valid = [t.sum((0, 2, 3)) for t in dy_xhat_sums]
        dbeta_hole, dbeta_valid = [t.sum((0, 2, 3)) for t in dy_sums]
        if affine == "official":  # both betas at every pixel
            dbeta_hole = dbeta_valid = dbeta_hole + dbeta_valid
        grads = [g.to(p.dtype) if p is not None and need else None
                 for p, g, need in zip(parameters, (dgamma_hole, dbeta_hole, dgamma_valid, dbeta_valid),
                                       ctx.needs_input_grad[1:5])]
        return (dx.to(x.dtype), *grads) + (None,) * 5


def region_norm(x: Tensor, mask: Tensor, foreground_gamma: Optional[Tensor] = None,
                foreground_beta: Optional[Tensor] = None, background_gamma: Optional[Tensor] = None,
                background_beta: Optional[Tensor] = None, *, eps: float = 1e-5, stats: str = "batch",
                eps_mode: str = "official", affine: str = "masked", sync: None = None) -> Tensor:
    """As :func:`normlayers.reference.region_norm.region_norm` without synced statistics (``sync`` must be
    ``None``: :mod:`normlayers.functional` sends synced calls to the reference, which gathers them)."""
    if sync is not None:
        raise ValueError("the CPU tier of region_norm takes no synced statistics (the reference gathers them)")
    hole = _ref_region.prepare_mask(mask, x.shape[2:])
    return _RegionNormFunction.apply(x, foreground_gamma, foreground_beta, background_gamma, background_beta, hole,
                                     eps, stats, eps_mode, affine)


def learnable_region_norm(x: Tensor, conv1_weight: Tensor, gamma_weight: Tensor, gamma_bias: Optional[Tensor],
                          beta_weight: Tensor, beta_bias: Optional[Tensor], *, threshold: float, eps: float,
                          stats: str, eps_mode: str) -> Tensor:
    """As :func:`normlayers.reference.region_norm.learnable_region_norm` without synced statistics: the reference's
    self-aware affine (small convs, ATen's) around this tier's :func:`region_norm`."""
    return _ref_region.learnable_region_norm(x, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias,
                                             threshold=threshold, eps=eps, stats=stats, eps_mode=eps_mode,
                                             normalize=region_norm)
