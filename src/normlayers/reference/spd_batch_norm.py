"""Plain-PyTorch reference of SPD batch normalization under the (θ, M)-Generalized Bures–Wasserstein geometry (GBWBN).

Wang, Jin, Chen, Luo, Wu, "Learning to Normalize on the SPD Manifold under Bures-Wasserstein Geometry", CVPR 2025.
The authors' code (github.com/jjscc/GBWBN, ``GBWBN_SPDNet/spd/nn.py`` ``BatchNormSPD`` and ``spd/functional.py``) is
the ground truth where the paper could not be read; docs/spd_batch_norm.md explains each step and departure.

Geometry (the authors' ``functional.py``: ``LogG``, ``ExpG``, ``pal1``, ``pal2``). BW on SPD(n):
``d²(A, B) = tr A + tr B − 2 tr (A^{1/2} B A^{1/2})^{1/2}``, ``Log_P X = (PX)^{1/2} + (XP)^{1/2} − 2P``,
``Exp_P V = (I + 𝓛_P[V]) P (I + 𝓛_P[V])``, transports between the identity and a point ``Γ_{I→A} = S_A^{1/2}``,
``Γ_{A→I} = S_A^{-1/2}`` with ``S_A(V) = (AV + VA)/2``. The (θ, M)-GBW metric is the pullback of BW by
``φ(X) = M^{-1/2} X^θ M^{-1/2}``, scaled by ``1/θ²`` (Han et al., arXiv 2110.10464, for ``M``), so the layer maps
everything through ``φ``, works in BW, and maps back with ``φ⁻¹(Y) = (M^{1/2} Y M^{1/2})^{1/θ}``.

The layer (``nn.py`` L101–123), for inputs ``X_i``, bias ``W``, metric ``M``, dispersion ``s``:

1. ``X̃_i = φ(X_i)``, ``W̃ = φ(W)``.
2. Batch mean ``B`` (detached): the arithmetic mean, then ``karcher_steps`` fixed-point steps
   ``B ← B^{-1/2} (mean_i (B^{1/2} X̃_i B^{1/2})^{1/2})² B^{-1/2}`` (Álvarez-Esteban et al., the authors' ``BaryGeom``).
3. ``V_i = Γ_{B→I}(Log_B X̃_i)`` in closed form (docs/spd_batch_norm.md): in ``B = P diag(b) Pᵀ``'s eigenbasis,
   ``V̂_i = √(2(b_i + b_j)/(b_i b_j)) ∘ (B̂^{1/2} X̂_i B̂^{1/2})^{1/2} − 2 diag(√b)``.
4. Dispersion (detached): ``"frechet"`` — ``v = mean_i d²(X̃_i, B)/θ² = mean_i ¼‖V_i‖²_F/θ²``; ``"reference"`` — the
   authors' ``v = mean_i d²(X̃_i, I)/θ²`` (around the identity, on un-centred data; docs, Q1).
5. ``U_i = f·V_i`` with ``f = s/√(v + eps)``; or, with ``reference_roundtrip``, the authors' Exp_I/Log_I round trip
   ``U_i = 2|(1 − f) I + f |I + V_i/2|| − 2I`` (equal to ``f·V_i`` inside the Exp domain).
6. ``Y_i = Exp_{W̃}(Γ_{I→W̃} U_i) = (I + Z_i) W̃ (I + Z_i)`` with ``Z_i = ½ S_{W̃}^{-1/2}[U_i]`` (PSD by
   construction).
7. Output ``φ⁻¹(Y_i)``.
8. Training: ``B_run ← γ_{B_run→B}(momentum)`` (BW geodesic), ``v_run ← (1 − momentum) v_run + momentum·v``.
   Eval uses ``(B_run, v_run)`` in steps 3–5 and updates nothing. ``B_run`` lives in the φ coordinates of the step
   that updated it (as the authors' code).

Precision: everything on the parameter / statistics side (``M^{±1/2}``, ``W̃``, ``B``, its eigendecomposition, the
running-mean geodesic) runs in fp64; the per-sample work in ``compute_dtype``, fp64 by default as the authors'
code. fp32 per-sample eigendecompositions lose the small
eigenvalues of ill-conditioned deformed inputs ``M^{-1/2} X M^{-1/2}`` (measured: 8e-3 absolute output error against
fp64 for a κ ≈ 1e3 batch and a κ ≈ 40 metric, where rounding the input to fp32 alone costs 1e-7); the output is
cast back to the input's dtype. Statistics are
pooled over every leading dim (the authors' ``(N·h, 1, n, n)`` reshape) or, with per-channel state of shape
``(C, n, n)``, over every leading dim but the channel dim just before the matrix. Argument checks live in
:mod:`normlayers.functional`.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from normlayers.reference.spd_linalg import (
    absm,
    congruence,
    invsqrtm,
    lyapunov_power,
    powm,
    sqrtm,
    sym,
)

__all__ = ["VARIANCES", "bw_distance_sq", "bw_log", "bw_exp", "bw_geodesic", "bw_barycenter", "deform",
           "global_batch_mean", "undeform", "spd_batch_norm"]

Variance = Literal["frechet", "reference"]
VARIANCES = ("frechet", "reference")

_PARAM_DTYPE = torch.float64

# The mean over dim 0 of a batch of statistics-side values: of this rank's batch, or of every rank's.
BatchMean = Callable[[Tensor], Tensor]


def _eye_like(a: Tensor) -> Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


# ----------------------------------------------------------------------------------------------------------------------
# Bures–Wasserstein geometry, batched over leading dims; used by the layer's running update and by tests
# ----------------------------------------------------------------------------------------------------------------------


def bw_distance_sq(a: Tensor, b: Tensor) -> Tensor:
    """``d²_BW(A, B) = tr A + tr B − 2 tr (A^{1/2} B A^{1/2})^{1/2}``, shape ``(...)``."""
    a_half = sqrtm(a)
    cross = torch.linalg.eigvalsh(sym(congruence(a_half, b))).clamp_min(0).sqrt().sum(-1)
    return a.diagonal(dim1=-2, dim2=-1).sum(-1) + b.diagonal(dim1=-2, dim2=-1).sum(-1) - 2 * cross


def _sqrt_products(a: Tensor, b: Tensor) -> Tensor:
    """``(AB)^{1/2} + (BA)^{1/2}`` with ``(AB)^{1/2} = A^{1/2} (A^{1/2} B A^{1/2})^{1/2} A^{-1/2}``."""
    a_half, a_inv_half = sqrtm(a), invsqrtm(a)
    ab_half = a_half @ sqrtm(congruence(a_half, b)) @ a_inv_half
    return ab_half + ab_half.mT


def bw_log(p: Tensor, x: Tensor) -> Tensor:
    """``Log_P X = (PX)^{1/2} + (XP)^{1/2} − 2P`` (the authors' ``LogG``)."""
    return _sqrt_products(p, x) - 2 * p


def bw_exp(p: Tensor, v: Tensor) -> Tensor:
    """``Exp_P V = (I + 𝓛_P[V]) P (I + 𝓛_P[V])``, ``𝓛_P[V] = ½ S_P^{-1}[V]`` solving ``PZ + ZP = V``."""
    factor = _eye_like(p) + lyapunov_power(p, v, -1.0) / 2
    return factor @ p @ factor.mT


def bw_geodesic(a: Tensor, b: Tensor, t: float) -> Tensor:
    """``γ(t) = (1 − t)² A + t² B + t(1 − t)[(AB)^{1/2} + (BA)^{1/2}]`` from ``A`` (t = 0) to ``B`` (t = 1)."""
    return sym((1 - t) ** 2 * a + t ** 2 * b + t * (1 - t) * _sqrt_products(a, b))


def _local_mean(t: Tensor) -> Tensor:
    return t.mean(0)


def global_batch_mean(sum_over_ranks: Callable[[Tensor], Tensor], local_count: int, device: torch.device
                      ) -> BatchMean:
    """The mean over dim 0 of the batch of all ranks: ``Σ_ranks Σ_i t_i / Σ_ranks count`` (one ``sum_over_ranks``
    here for the global count, and one per call); a rank with no samples contributes zeros."""
    total = sum_over_ranks(torch.full((), local_count, dtype=_PARAM_DTYPE, device=device))
    return lambda t: sum_over_ranks(t.sum(0)) / total.to(t.dtype)


def bw_barycenter(x: Tensor, steps: int, start: Optional[Tensor] = None, batch_mean: BatchMean = _local_mean
                  ) -> Tensor:
    """The BW barycenter of ``x`` over dim 0 (statistics side, no gradient, fp64 result).

    ``steps`` fixed-point steps ``G ← G^{-1/2} (mean_i (G^{1/2} X_i G^{1/2})^{1/2})² G^{-1/2}`` from ``start``
    (default: the arithmetic mean), exactly the authors' ``BaryGeom`` iteration. The per-sample
    square roots run in ``x``'s dtype, the per-group matrices in fp64. ``batch_mean`` takes the means over the batch
    (:func:`global_batch_mean`: over every rank's, so each fixed-point step sums the tangent-side square roots of the
    global batch).
    """
    with torch.no_grad():
        g = batch_mean(x.to(_PARAM_DTYPE)) if start is None else start.to(_PARAM_DTYPE)
        for _ in range(steps):
            g_half, g_inv_half = sqrtm(g), invsqrtm(g)
            root_mean = batch_mean(sqrtm(congruence(g_half.to(x.dtype), x)).to(_PARAM_DTYPE))
            g = sym(congruence(g_inv_half, root_mean @ root_mean))
        return g


# ----------------------------------------------------------------------------------------------------------------------
# The (θ, M) deformation (the authors' ``nn.py`` L104–122)
# ----------------------------------------------------------------------------------------------------------------------


def deform(x: Tensor, theta: float, metric_inv_sqrt: Optional[Tensor]) -> Tensor:
    """``φ(X) = M^{-1/2} X^θ M^{-1/2}`` (power first, then congruence; the power is skipped at θ = 1 and the
    congruence when ``M`` is the identity, i.e. ``metric_inv_sqrt is None``)."""
    x = powm(x, theta) if theta != 1.0 else sym(x)
    if metric_inv_sqrt is not None:
        x = congruence(metric_inv_sqrt.to(x.dtype), x)
    return x


def undeform(y: Tensor, theta: float, metric_sqrt: Optional[Tensor]) -> Tensor:
    """``φ⁻¹(Y) = (M^{1/2} Y M^{1/2})^{1/θ}``."""
    if metric_sqrt is not None:
        y = congruence(metric_sqrt.to(y.dtype), y)
    return powm(y, 1.0 / theta) if theta != 1.0 else sym(y)


# ----------------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------------


def _centre(x: Tensor, mean: Tensor) -> Tensor:
    """``V_i = Γ_{B→I}(Log_B X̃_i)`` for every sample of ``x`` (closed form), in ``x``'s dtype.

    In ``B = P diag(b) Pᵀ``'s eigenbasis, with ``T_i = B^{-1/2}(B^{1/2} X̃_i B^{1/2})^{1/2} B^{-1/2}`` and
    ``Log_B X̃_i = 2 S_B(T_i − I)``, the transport ``S_B^{-1/2}`` leaves ``V_i = 2 S_B^{1/2}(T_i − I)``, i.e.
    ``V̂_ij = √(2(b_i + b_j)) T̂_ij − 2√b_i δ_ij`` with ``T̂_ij = R̂_ij/√(b_i b_j)`` and
    ``R̂_i = (diag(√b) X̂_i diag(√b))^{1/2}``. Only the square root carries gradient (``B`` is detached).
    """
    b, p = torch.linalg.eigh(mean)
    b = b.clamp_min(torch.finfo(b.dtype).tiny)
    root_b = b.sqrt()
    coefficient = torch.sqrt(2 * (b.unsqueeze(-1) + b.unsqueeze(-2))) / (root_b.unsqueeze(-1) * root_b.unsqueeze(-2))
    p_x, root_b_x, coefficient_x = p.to(x.dtype), root_b.to(x.dtype), coefficient.to(x.dtype)
    x_hat = p_x.mT @ x @ p_x
    r_hat = sqrtm(root_b_x.unsqueeze(-1) * x_hat * root_b_x.unsqueeze(-2))
    v_hat = coefficient_x * r_hat - torch.diag_embed(2 * root_b_x).expand_as(r_hat)
    return p_x @ v_hat @ p_x.mT


def _dispersion(x: Tensor, v: Tensor, variance: Variance, theta: float, batch_mean: BatchMean) -> Tensor:
    """The detached batch dispersion per statistics group (fp64), as ``variance`` asks, averaged by
    ``batch_mean`` (over the local or the global batch)."""
    with torch.no_grad():
        if variance == "frechet":
            # d²(X̃_i, B) = g_B(Log, Log) = g_I(V_i, V_i) = ¼‖V_i‖²_F (the transport is an isometry).
            per_sample = v.to(_PARAM_DTYPE).square().sum((-2, -1)) / 4
        else:
            # The authors' cal_var: d²(X̃_i, I) = tr X̃_i + n − 2 tr X̃_i^{1/2}.
            x64 = x.to(_PARAM_DTYPE)
            roots = torch.linalg.eigvalsh(sym(x64)).clamp_min(0).sqrt().sum(-1)
            per_sample = x64.diagonal(dim1=-2, dim2=-1).sum(-1) + x.shape[-1] - 2 * roots
        return batch_mean(per_sample) / theta ** 2


def _scale(v: Tensor, factor: Tensor, reference_roundtrip: bool) -> Tensor:
    """``U_i = f·V_i``, or the authors' round trip ``2|(1 − f)I + f|I + V_i/2|| − 2I``."""
    if not reference_roundtrip:
        return factor * v
    eye = _eye_like(v)
    return 2 * absm((1 - factor) * eye + factor * absm(eye + v / 2)) - 2 * eye


def _bias(u: Tensor, bias: Tensor) -> Tensor:
    """``Y_i = Exp_{W̃}(Γ_{I→W̃} U_i) = (I + Z_i) W̃ (I + Z_i)``, ``Z_i = 𝓛_{W̃}[S_{W̃}^{1/2} U_i] = ½ S_{W̃}^{-1/2}[U_i]``
    (the biasing closed form); ``bias`` is ``W̃`` in fp64."""
    factor = _eye_like(u) + lyapunov_power(bias, u, -0.5) / 2
    return factor @ bias.to(u.dtype) @ factor


@torch.no_grad()
def _update_running_(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float) -> None:
    """``B_run ← γ_{B_run→B}(momentum)`` on the BW geodesic, ``v_run ← (1 − momentum) v_run + momentum·v``, computed in
    fp64 and stored in the buffers' dtype."""
    running_mean.copy_(bw_geodesic(running_mean.to(_PARAM_DTYPE), mean, momentum))
    # Through a 1-D view: torch.compile (2.13, aot_eager and inductor) drops a copy_ of a graph value into a 0-d
    # buffer (the pooled layout's running_var), and keeps it into a view of it.
    running_var.view(-1).copy_((running_var.to(_PARAM_DTYPE) * (1 - momentum) + var * momentum).reshape(-1))


def spd_batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor], metric: Optional[Tensor], shift: Optional[Tensor], *, training: bool,
                   momentum: float, eps: float, theta: float, variance: Variance, karcher_steps: int,
                   reference_roundtrip: bool, per_channel: bool,
                   compute_dtype: Optional[torch.dtype] = torch.float64,
                   sum_over_ranks: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """GBW batch normalization of ``x`` (``(*, n, n)``, or ``(*, C, n, n)`` when ``per_channel``).

    ``weight`` (the SPD bias ``W``) is ``(n, n)`` or ``(C, n, n)`` (``None``: the identity); ``metric`` (``M``) is
    ``(n, n)`` or ``(C, n, n)`` (``None``: the identity, plain BW); ``shift`` (``s``) is a scalar or ``(C,)``
    (``None``: 1). Running buffers (``(n, n)``/``(C, n, n)`` and ``()``/``(C,)``) are updated in place in training.
    The per-sample work runs in ``compute_dtype`` (``None``: the input's dtype). Returns ``x``'s shape and dtype.

    ``sum_over_ranks`` (training only; synced statistics): sums a tensor over the ranks. The barycenter's arithmetic
    start and each fixed-point step's mean of square roots, and the dispersion's mean, are then means over the global
    batch (sums over the ranks divided by the global count), so ``B``, ``v`` and the running buffers are the global
    batch's on every rank. Both statistics are detached, so each sample's gradient needs no further exchange.
    """
    n = x.shape[-1]
    group_shape = (x.shape[-3],) if per_channel else ()
    leading = math.prod(x.shape[:x.dim() - 2 - len(group_shape)])  # not reshape(-1, ...): an empty batch is allowed
    samples = x.reshape(leading, *group_shape, n, n).to(compute_dtype or x.dtype)
    per_group = (-1, 1, 1) if per_channel else ()

    metric_inv_sqrt = metric_sqrt = None
    if metric is not None:
        metric64 = metric.to(_PARAM_DTYPE)
        metric_inv_sqrt, metric_sqrt = invsqrtm(metric64), sqrtm(metric64)
    x_tilde = deform(samples, theta, metric_inv_sqrt)
    if weight is None:
        weight = torch.eye(n, dtype=_PARAM_DTYPE, device=x.device).expand(*group_shape, n, n)
    weight_tilde = deform(weight.to(_PARAM_DTYPE), theta, metric_inv_sqrt)

    batch_mean = _local_mean
    if training and sum_over_ranks is not None:
        batch_mean = global_batch_mean(sum_over_ranks, leading, x.device)
    if training:
        mean = bw_barycenter(x_tilde.detach(), karcher_steps, batch_mean=batch_mean)
    else:
        mean = running_mean.to(_PARAM_DTYPE)
    v = _centre(x_tilde, mean)
    if training:
        var = _dispersion(x_tilde, v, variance, theta, batch_mean)
        if running_mean is not None and running_var is not None:
            _update_running_(running_mean, running_var, mean, var, momentum)
    else:
        var = running_var.to(_PARAM_DTYPE)
    factor = torch.rsqrt(var + eps).to(samples.dtype)
    if shift is not None:
        factor = factor * shift.to(samples.dtype)
    u = _scale(v, factor.reshape(per_group), reference_roundtrip)
    y = _bias(u, weight_tilde)
    return undeform(y, theta, metric_sqrt).to(x.dtype).reshape(x.shape)
