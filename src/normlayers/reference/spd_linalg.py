"""Matrix functions of batches of symmetric (positive definite) matrices, with closed-form Daleckii–Krein backwards.

Derivation: docs/spd_batch_norm.md, "The divided-difference gradient". Two kinds of operation, each a small
:class:`torch.autograd.Function`:

* **Spectral functions** ``F(A) = U f(Λ) Uᵀ`` for ``A = U Λ Uᵀ`` (:func:`sqrtm`, :func:`invsqrtm`, :func:`powm`,
  :func:`logm`, :func:`expm`, :func:`absm`, :func:`rectify`): one ``torch.linalg.eigh`` forward; the backward is
  ``dA = U (L ∘ Uᵀ sym(Ḡ) U) Uᵀ`` with the Loewner matrix of divided differences ``L_ij = (f(λ_i) − f(λ_j)) /
  (λ_i − λ_j)``, ``L_ii = f′(λ_i)``, written in closed forms that do not cancel, so that (near-)repeated
  eigenvalues get the correct ``f′(λ)`` rather than 0 or NaN (the authors' bug, Q3 in the docs: with the nan → 0
  rule the gradient w.r.t. ``M`` at ``M = I`` loses its off-diagonal part). Autograd through ``eigh`` is never used:
  its eigenvector backward has ``1/(λ_i − λ_j)`` terms that are infinite at ``A = I``.
* **The Lyapunov operator power** ``S_A^q[X]`` (:func:`lyapunov_power`), where ``S_A(X) = (AX + XA)/2``:
  ``S_A^q[X] = Q (K ∘ QᵀXQ) Qᵀ`` with ``K_ij = ((a_i + a_j)/2)^q``. The BW parallel transports are
  ``Γ_{I→A} = S_A^{1/2}`` and ``Γ_{A→I} = S_A^{-1/2}``, and the Lyapunov solve of ``Exp_A`` is
  ``𝓛_A = ½ S_A^{-1}``. Its derivative w.r.t. ``A`` needs divided differences of ``k(x, a_j)`` in ``x``, a
  third-order tensor; they have the finite limit ``∂k/∂x`` at coincidence.

All operations are batched over every leading dim (no Python loop). Eigenvalues are clamped from below (sqrt,
inverse sqrt, power, log) at a *relative* floor ``finfo(dtype).eps · λ_max`` per matrix, the level below which
``eigh``'s own rounding dominates; the clamped function ``g(x) = f(max(x, floor))`` is differentiated exactly
(``g′ = 0`` below the floor, the floor itself treated as a constant). LieBN and geoopt use absolute floors
(1e-4 fp32, 1e-7 fp64); a relative floor is used instead because this layer's inputs are
ill-conditioned by design, and an absolute 1e-4 would rewrite every eigenvalue of a unit-scale covariance of condition
above 1e4. Inputs are symmetrized (``(A + Aᵀ)/2``) before ``eigh``; the backward returns the symmetric gradient.

The backwards are first-order only: double backward (``create_graph=True``) raises one clear error rather than
silently dropping the terms through the eigenvectors (``once_differentiable`` would leave the input's second derivative
unconnected, so autograd reported it as unused or returned ``None``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from normlayers._autograd import refuse_double_backward

__all__ = ["sym", "eigenvalue_floor", "sqrtm", "invsqrtm", "powm", "logm", "expm", "absm", "rectify",
           "lyapunov_power", "congruence"]

# The functions that are only defined (or only smooth) on positive eigenvalues, hence clamped at the floor.
_CLAMPED = ("sqrt", "invsqrt", "pow", "log", "rectify")


def sym(a: Tensor) -> Tensor:
    """The symmetric part ``(A + Aᵀ)/2`` over the last two dims."""
    return (a + a.mT) / 2


def congruence(c: Tensor, a: Tensor) -> Tensor:
    """``C A Cᵀ`` for a symmetric ``C`` (``C A C``), broadcast over leading dims."""
    return c @ a @ c


def eigenvalue_floor(eigenvalues: Tensor) -> Tensor:
    """The relative clamp floor ``eps · max(λ_max, tiny)`` of each matrix, shape ``(..., 1)``, without gradient."""
    finfo = torch.finfo(eigenvalues.dtype)
    return (eigenvalues[..., -1:].detach().clamp_min(finfo.tiny) * finfo.eps)


def _pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """``(v_i, v_j)`` broadcast to ``(..., n, n)``."""
    return values.unsqueeze(-1), values.unsqueeze(-2)


def _power_divided_difference(a: Tensor, b: Tensor, p: float) -> Tensor:
    """``(a^p − b^p)/(a − b)`` for positive ``a, b`` (``p·a^{p−1}`` at ``a = b``), without cancellation.

    ``p = ±½`` have exact rational forms. Otherwise, with ``hi = max``, ``lo = min`` and ``r = log(hi/lo) ≥ 0``:
    ``hi^{p−1}·expm1(−p r)/expm1(−r)`` for ``p > 0`` and ``lo^{p−1}·expm1(p r)/expm1(r)`` for ``p < 0`` — both
    ``expm1`` arguments have the sign that cannot overflow, and the ratio tends to ``p`` as ``r → 0``.
    """
    if p == 0.5:
        return 1 / (a.sqrt() + b.sqrt())
    if p == -0.5:
        sa, sb = a.sqrt(), b.sqrt()
        return -1 / (sa * sb * (sa + sb))
    hi, lo = torch.maximum(a, b), torch.minimum(a, b)
    r = hi.log() - lo.log()
    tied = r == 0
    r_safe = torch.where(tied, torch.ones_like(r), r)
    if p > 0:
        ratio = torch.expm1(-p * r_safe) / torch.expm1(-r_safe)
        base = hi
    else:
        ratio = torch.expm1(p * r_safe) / torch.expm1(r_safe)
        base = lo
    return base.pow(p - 1) * torch.where(tied, torch.full_like(r, p), ratio)


def _closed_form_loewner(kind: str, lam: Tensor, power: float) -> Tensor:
    """The divided differences ``L_ij`` of ``f`` at eigenvalues ``lam`` (all above the floor), without cancellation."""
    a, b = _pairs(lam)
    if kind == "sqrt":
        return _power_divided_difference(a, b, 0.5)
    if kind == "invsqrt":
        return _power_divided_difference(a, b, -0.5)
    if kind == "pow":
        return _power_divided_difference(a, b, power)
    if kind == "rectify":
        return torch.ones_like(a + b)
    if kind == "log":
        # (log a − log b)/(a − b) = r / (hi·(1 − e^{−r})), r = log(hi/lo); 1/a at a = b.
        hi, lo = torch.maximum(a, b), torch.minimum(a, b)
        r = hi.log() - lo.log()
        tied = r == 0
        r_safe = torch.where(tied, torch.ones_like(r), r)
        return torch.where(tied, 1 / hi, r_safe / (-hi * torch.expm1(-r_safe)))
    if kind == "exp":
        # (e^a − e^b)/(a − b) = e^{(a+b)/2} · sinh(d)/d, d = (a − b)/2.
        d = (a - b) / 2
        small = d.abs() < torch.finfo(d.dtype).eps
        d_safe = torch.where(small, torch.ones_like(d), d)
        return torch.exp((a + b) / 2) * torch.where(small, torch.ones_like(d), torch.sinh(d_safe) / d_safe)
    if kind == "abs":
        # Same sign: the divided difference of |x| is sign(a); opposite signs: (|a| − |b|)/(a − b), a − b ≠ 0
        # unless both are 0, where any subgradient in [−1, 1] is right and 0 is taken.
        same_sign = a * b > 0
        diff = a - b
        diff_safe = torch.where(diff == 0, torch.ones_like(diff), diff)
        return torch.where(same_sign, torch.sign(a), torch.where(diff == 0, torch.zeros_like(diff),
                                                                (a.abs() - b.abs()) / diff_safe))
    raise ValueError(f"unknown spectral function {kind!r}")


def _apply_scalar(kind: str, lam: Tensor, power: float) -> Tensor:
    if kind == "sqrt":
        return lam.sqrt()
    if kind == "invsqrt":
        return lam.rsqrt()
    if kind == "pow":
        return lam.pow(power)
    if kind == "log":
        return lam.log()
    if kind == "exp":
        return lam.exp()
    if kind == "abs":
        return lam.abs()
    if kind == "rectify":
        return lam
    raise ValueError(f"unknown spectral function {kind!r}")


def _reconstruct(u: Tensor, values: Tensor) -> Tensor:
    """``U diag(values) Uᵀ``, symmetrized so that the result is exactly symmetric (the product is not, in rounding)."""
    return sym((u * values.unsqueeze(-2)) @ u.mT)


class _SpectralFunction(torch.autograd.Function):
    """``F(A) = U f(max(Λ, floor)) Uᵀ`` with the exact Daleckii–Krein backward of the clamped function."""

    @staticmethod
    def forward(ctx: FunctionCtx, a: Tensor, kind: str, power: float, floor: Optional[float]) -> Tensor:
        lam, u = torch.linalg.eigh(sym(a))
        if kind in _CLAMPED:
            lower = eigenvalue_floor(lam) if floor is None else torch.full_like(lam[..., -1:], floor)
            clamped = lam < lower
            lam_used = torch.maximum(lam, lower)
        else:
            clamped = torch.zeros_like(lam, dtype=torch.bool)
            lam_used = lam
        values = _apply_scalar(kind, lam_used, power)
        ctx.save_for_backward(u, lam, lam_used, values, clamped)
        ctx.kind, ctx.power = kind, power
        return _reconstruct(u, values)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        refuse_double_backward("The SPD spectral functions' backward (eigendecomposition, SPDBatchNorm)")
        u, lam, lam_used, values, clamped = ctx.saved_tensors
        loewner = _closed_form_loewner(ctx.kind, lam_used, ctx.power)
        # Pairs with a clamped eigenvalue: the divided difference of g(x) = f(max(x, floor)) at the *unclamped*
        # eigenvalues (exact; 0 when both are clamped, where g is constant).
        ci, cj = _pairs(clamped)
        li, lj = _pairs(lam)
        gi, gj = _pairs(values)
        gap = li - lj
        gap_safe = torch.where(gap == 0, torch.ones_like(gap), gap)
        mixed = torch.where(gap == 0, torch.zeros_like(gap), (gi - gj) / gap_safe)
        loewner = torch.where(ci & cj, torch.zeros_like(loewner), torch.where(ci | cj, mixed, loewner))
        inner = u.mT @ sym(grad) @ u
        return u @ (loewner * inner) @ u.mT, None, None, None


def sqrtm(a: Tensor) -> Tensor:
    """Principal square root ``A^{1/2}`` of symmetric PSD matrices (eigenvalues clamped at the relative floor)."""
    return _SpectralFunction.apply(a, "sqrt", 0.5, None)


def invsqrtm(a: Tensor) -> Tensor:
    """``A^{-1/2}`` of SPD matrices (eigenvalues clamped at the relative floor)."""
    return _SpectralFunction.apply(a, "invsqrt", -0.5, None)


def powm(a: Tensor, power: float) -> Tensor:
    """``A^p`` of SPD matrices for a real ``p`` (eigenvalues clamped at the relative floor)."""
    return _SpectralFunction.apply(a, "pow", float(power), None)


def logm(a: Tensor) -> Tensor:
    """Principal logarithm of SPD matrices (eigenvalues clamped at the relative floor)."""
    return _SpectralFunction.apply(a, "log", 1.0, None)


def expm(a: Tensor) -> Tensor:
    """Exponential of symmetric matrices (no clamping)."""
    return _SpectralFunction.apply(a, "exp", 1.0, None)


def absm(a: Tensor) -> Tensor:
    """Matrix absolute value ``|A| = U |Λ| Uᵀ`` of symmetric matrices (the authors' Exp_I/Log_I round trip)."""
    return _SpectralFunction.apply(a, "abs", 1.0, None)


def rectify(a: Tensor, threshold: float) -> Tensor:
    """``U max(Λ, threshold) Uᵀ`` (SPDNet's ReEig), with gradient 0 along clamped eigenvalues."""
    return _SpectralFunction.apply(a, "rectify", 1.0, float(threshold))


class _LyapunovPower(torch.autograd.Function):
    """``S_A^q[X] = Q (K ∘ QᵀXQ) Qᵀ``, ``K_ij = ((a_i + a_j)/2)^q``, for SPD ``A`` of shape ``(*S, n, n)`` and ``X``
    of shape ``(*R, *S, n, n)``; ``A``'s gradient is summed over the extra leading dims ``R``.

    Backward. ``S_A^q[X] = Σ_ij k(a_i, a_j) P_i X P_j`` is a double operator sum; perturbing ``A``
    by ``H`` gives, in ``A``'s eigenbasis (tildes), ``dF̃_ij = Σ_k D_ikj H̃_ik X̃_kj + Σ_k D_jki X̃_ik H̃_kj`` with
    ``D_ikj = (k(a_i, a_j) − k(a_k, a_j)) / (a_i − a_k)`` (the divided difference in the first argument, ``∂k/∂x``
    at ``a_i = a_k``). Its adjoint, for the cotangent ``G̃``, is ``T + T2`` with ``T_ab = Σ_j D_abj G̃_aj X̃_bj`` and
    ``T2_ab = Σ_i D_abi G̃_ib X̃_ia``; the gradient w.r.t. ``X`` is ``Q (K ∘ G̃) Qᵀ``.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, a: Tensor, x: Tensor, power: float) -> Tensor:
        lam, q = torch.linalg.eigh(sym(a))
        half_sums = (lam.unsqueeze(-1) + lam.unsqueeze(-2)) / 2
        kernel = half_sums.pow(power)
        qx, kx = q.to(x.dtype), kernel.to(x.dtype)
        ctx.save_for_backward(lam, q, x)
        ctx.power = power
        return qx @ (kx * (qx.mT @ x @ qx)) @ qx.mT

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None]:
        refuse_double_backward("The SPD Lyapunov-operator backward (BW parallel transport, SPDBatchNorm)")
        lam, q, x = ctx.saved_tensors
        power = ctx.power
        grad_a = grad_x = None
        if ctx.needs_input_grad[1]:
            kernel = ((lam.unsqueeze(-1) + lam.unsqueeze(-2)) / 2).pow(power).to(grad.dtype)
            qg = q.to(grad.dtype)
            grad_x = qg @ (kernel * (qg.mT @ grad @ qg)) @ qg.mT
        if ctx.needs_input_grad[0]:
            # The third-order tensor of divided differences, in A's (fp64 when A is fp64) precision:
            # k(x, c) = ((x + c)/2)^q: with u = (x + c)/2 the first-argument difference is ½(u_i^q − u_k^q)/(u_i − u_k).
            u_first = (lam.unsqueeze(-1).unsqueeze(-1) + lam.unsqueeze(-2).unsqueeze(-2)) / 2  # [..., i, 1, j]
            u_second = u_first.transpose(-3, -2)                                                # [..., 1, k, j]
            dd = _power_divided_difference(u_first, u_second, power) / 2                         # [..., i, k, j]
            qa = q.to(lam.dtype)
            x_t = (qa.mT @ x.to(lam.dtype) @ qa).reshape(-1, *lam.shape, lam.shape[-1])
            g_t = (qa.mT @ grad.to(lam.dtype) @ qa).reshape(-1, *lam.shape, lam.shape[-1])
            # R_abj = Σ_batch G̃_aj X̃_bj and R2_abi = Σ_batch G̃_ib X̃_ia.
            r = torch.einsum("z...aj,z...bj->...abj", g_t, x_t)
            r2 = torch.einsum("z...ib,z...ia->...abi", g_t, x_t)
            t = (dd * (r + r2)).sum(-1)
            grad_a = sym(qa @ t @ qa.mT).to(lam.dtype)
        return grad_a, grad_x, None


def lyapunov_power(a: Tensor, x: Tensor, power: float) -> Tensor:
    """``S_A^q[X]`` where ``S_A(X) = (AX + XA)/2``: ``Q (((a_i + a_j)/2)^q ∘ QᵀXQ) Qᵀ``.

    ``A`` (SPD, shape ``(*S, n, n)``, typically fp64) is one matrix per statistics group; ``X`` has shape
    ``(*R, *S, n, n)`` and any float dtype, and the result has ``X``'s dtype. ``q = 1/2`` is the BW parallel
    transport ``Γ_{I→A}``, ``q = −1/2`` is ``Γ_{A→I}``. Differentiable w.r.t. both (see :class:`_LyapunovPower`).
    """
    if a.shape[-2:] != x.shape[-2:] or x.shape[x.dim() - a.dim():] != a.shape:
        raise ValueError(f"lyapunov_power: A of shape {list(a.shape)} must equal the trailing dims of X of shape "
                         f"{list(x.shape)}")
    return _LyapunovPower.apply(a, x, float(power))
