r"""CPU tier of SPD batch normalization under the (θ, M)-Generalized Bures–Wasserstein geometry (Wang et al., CVPR
2025; the math of :mod:`normlayers.reference.spd_batch_norm`, whose docstring walks through the steps).

The reference maps every sample through each step in turn: the deformation ``M^{-1/2} X M^{-1/2}``, the barycenter's
congruence and per-sample square root (reconstructed matrix by matrix), the centring's rotation into ``B``'s
eigenbasis and back, the transport, the bias and the deformation back — 18 batched matrix products, and a
symmetrization after most of them. This tier does the same math with fewer passes over the batch:

* the metric's congruence is folded into the centring: ``diag(√b) Pᵀ (M^{-1/2} X M^{-1/2}) P diag(√b) = Aᵀ X A``
  with one ``n×n`` matrix ``A = M^{-1/2} P diag(√b)`` (two products per sample instead of four);
* the barycenter's congruence likewise (``C = M^{-1/2} G^{1/2}``), its arithmetic start is the congruence of the
  mean instead of the mean of the congruences, and its mean of square roots is one product
  ``Σ_i U_i Λ_i^{1/2} U_iᵀ = W Wᵀ`` with ``W = [U_1 Λ_1^{1/4}, U_2 Λ_2^{1/4}, …]`` instead of a reconstruction per
  sample (the barycenter is detached, so its eigendecompositions need no Function);
* the Fréchet dispersion ``¼‖V_i‖²`` is read in ``B``'s eigenbasis (the rotation is an isometry);
* the bias and the deformation back are one congruence ``H W̃ Hᵀ`` with ``H = M^{1/2} (I + Z)``.

Per sample, one eigendecomposition per barycenter step and one for the centring, as in the reference (each is a
different matrix); gradients flow through the reference's Daleckii–Krein square root and Lyapunov transport
Functions (no autograd through ``eigh``), so the closed-form backwards are the reference's own.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from normlayers.reference import spd_batch_norm as _ref_spd
from normlayers.reference.spd_linalg import eigenvalue_floor, invsqrtm, lyapunov_power, powm, sqrtm, sym

__all__ = ["spd_batch_norm"]

_PARAM_DTYPE = torch.float64


def _root_sum(samples: Tensor) -> Tensor:
    """``Σ_i S_i^{1/2}`` over dim 0 of a batch of symmetric PSD matrices (no gradient; fp64), from one
    eigendecomposition per sample and one product: ``Σ_i U_i Λ_i^{1/2} U_iᵀ = W Wᵀ`` with the ``U_i Λ_i^{1/4}`` side
    by side in ``W``. Eigenvalues are clamped at the relative floor of
    :func:`~normlayers.reference.spd_linalg.sqrtm`."""
    lam, u = torch.linalg.eigh(samples)
    quarter = torch.maximum(lam, eigenvalue_floor(lam)).to(_PARAM_DTYPE).pow(0.25)
    scaled = u.to(_PARAM_DTYPE) * quarter.unsqueeze(-2)  # (L, *S, n, n)
    side_by_side = scaled.movedim(0, -2).reshape(*samples.shape[1:-1], -1)  # (*S, n, L·n)
    return side_by_side @ side_by_side.mT


def _barycenter(samples: Tensor, metric_inv_sqrt: Optional[Tensor], steps: int) -> Tensor:
    """The BW barycenter of the deformed samples ``M^{-1/2} X_i M^{-1/2}`` (fp64, no gradient), the reference's
    fixed-point iteration with the congruence by ``M^{-1/2}`` folded into each step's."""
    with torch.no_grad():
        count = samples.shape[0]
        g = samples.to(_PARAM_DTYPE).mean(0)
        if metric_inv_sqrt is not None:
            g = metric_inv_sqrt @ g @ metric_inv_sqrt
        for _ in range(steps):
            lam, p = torch.linalg.eigh(sym(g))
            lam = torch.maximum(lam, eigenvalue_floor(lam))
            g_half = (p * lam.sqrt().unsqueeze(-2)) @ p.mT
            g_inv_half = (p * lam.rsqrt().unsqueeze(-2)) @ p.mT
            c = g_half if metric_inv_sqrt is None else metric_inv_sqrt @ g_half
            c = c.to(samples.dtype)
            root_mean = _root_sum(c.mT @ samples @ c) / count
            g = sym(g_inv_half @ root_mean @ root_mean @ g_inv_half)
        return g


def spd_batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor], metric: Optional[Tensor], shift: Optional[Tensor], *, training: bool,
                   momentum: float, eps: float, theta: float, variance: _ref_spd.Variance, karcher_steps: int,
                   reference_roundtrip: bool, per_channel: bool,
                   compute_dtype: Optional[torch.dtype] = torch.float64) -> Tensor:
    """As :func:`normlayers.reference.spd_batch_norm.spd_batch_norm` without synced statistics."""
    n = x.shape[-1]
    group_shape = (x.shape[-3],) if per_channel else ()
    leading = math.prod(x.shape[:x.dim() - 2 - len(group_shape)])
    samples = x.reshape(leading, *group_shape, n, n).to(compute_dtype or x.dtype)
    if theta != 1.0:
        samples = powm(samples, theta)
    per_group = (-1, 1, 1) if per_channel else ()

    metric_inv_sqrt = metric_sqrt = None
    if metric is not None:
        metric64 = metric.to(_PARAM_DTYPE)
        metric_inv_sqrt, metric_sqrt = invsqrtm(metric64), sqrtm(metric64)
    if weight is None:
        weight = torch.eye(n, dtype=_PARAM_DTYPE, device=x.device).expand(*group_shape, n, n)
    weight_tilde = _ref_spd.deform(weight.to(_PARAM_DTYPE), theta, metric_inv_sqrt)

    if training:
        mean = _barycenter(samples.detach(), None if metric_inv_sqrt is None else metric_inv_sqrt.detach(),
                           karcher_steps)
    else:
        mean = running_mean.to(_PARAM_DTYPE)

    # V̂_i = Γ_{B→I}(Log_B X̃_i) in B = P diag(b) Pᵀ's eigenbasis (the reference's _centre), with
    # diag(√b) Pᵀ X̃_i P diag(√b) = Aᵀ X_i A, A = M^{-1/2} P diag(√b).
    b, p = torch.linalg.eigh(mean)
    b = b.clamp_min(torch.finfo(b.dtype).tiny)
    root_b = b.sqrt()
    coefficient = torch.sqrt(2 * (b.unsqueeze(-1) + b.unsqueeze(-2))) / (root_b.unsqueeze(-1) * root_b.unsqueeze(-2))
    a = p * root_b.unsqueeze(-2)
    if metric_inv_sqrt is not None:
        a = metric_inv_sqrt @ a
    a = a.to(samples.dtype)
    r_hat = sqrtm(a.mT @ samples @ a)
    v_hat = coefficient.to(samples.dtype) * r_hat - torch.diag_embed(2 * root_b.to(samples.dtype))

    if training:
        with torch.no_grad():
            if variance == "frechet":
                var = (v_hat.to(_PARAM_DTYPE).square().sum((-2, -1)) / 4).mean(0) / theta ** 2
            else:
                x_tilde = _ref_spd.deform(samples, 1.0, metric_inv_sqrt)  # samples are already X^θ
                var = _ref_spd._dispersion(x_tilde, v_hat, variance, theta, _ref_spd._local_mean)
        if running_mean is not None and running_var is not None:
            _ref_spd._update_running_(running_mean, running_var, mean, var, momentum)
    else:
        var = running_var.to(_PARAM_DTYPE)
    factor = torch.rsqrt(var + eps).to(samples.dtype)
    if shift is not None:
        factor = factor * shift.to(samples.dtype)
    # The scaling commutes with the rotation (the round trip's |·| is a spectral function), so it runs in P's basis.
    u_hat = _ref_spd._scale(v_hat, factor.reshape(per_group), reference_roundtrip)
    p_x = p.to(samples.dtype)
    u = p_x @ u_hat @ p_x.mT
    # Y_i = (I + Z_i) W̃ (I + Z_i), Z_i = ½ S_{W̃}^{-1/2}[U_i]; out_i = (M^{1/2} Y_i M^{1/2})^{1/θ} = (H W̃ Hᵀ)^{1/θ}
    # with H = M^{1/2} (I + Z_i).
    h = torch.eye(n, dtype=samples.dtype, device=x.device) + lyapunov_power(weight_tilde, u, -0.5) / 2
    if metric_sqrt is not None:
        h = metric_sqrt.to(samples.dtype) @ h
    y = sym(h @ weight_tilde.to(samples.dtype) @ h.mT)
    if theta != 1.0:
        y = powm(y, 1.0 / theta)
    return y.to(x.dtype).reshape(x.shape)
