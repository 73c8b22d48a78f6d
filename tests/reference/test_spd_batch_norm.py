"""The Bures–Wasserstein geometry of normlayers.reference.spd_batch_norm (spec §1) against independent formulas.

Oracles share no code with the implementation: the BW metric ``g_P(V, W) = ½ tr(𝓛_P[V] W)`` with the Lyapunov
equation solved as a Kronecker linear system; ``tr (A^{1/2} B A^{1/2})^{1/2} = Σ √eig(AB)`` from the (non-symmetric)
eigenvalues of ``AB``; ``(AB)^{1/2}`` by the Denman–Beavers iteration; Han et al.'s GBW distance formula (spec §1.2).
"""

from __future__ import annotations

import pytest
import torch

from normlayers.reference import spd_batch_norm as R
from normlayers.reference import spd_linalg as L

DOUBLE = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_spd(*batch: int, n: int = 4) -> torch.Tensor:
    a = torch.randn(*batch, n, n, dtype=DOUBLE)
    return a @ a.mT / n + 0.3 * torch.eye(n, dtype=DOUBLE)


def lyapunov_solve(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Z with PZ + ZP = V, from the Kronecker system on row-major vec."""
    n = p.shape[-1]
    eye = torch.eye(n, dtype=p.dtype)
    operator = torch.kron(p, eye) + torch.kron(eye, p.T.contiguous())
    return torch.linalg.solve(operator, v.reshape(-1)).reshape(n, n)


def bw_inner(p: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.trace(lyapunov_solve(p, v) @ w)


def trace_sqrt_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tr (A^{1/2} B A^{1/2})^{1/2} = Σ √λ(AB): AB is similar to A^{1/2} B A^{1/2}."""
    return torch.linalg.eigvals(a @ b).real.clamp_min(0).sqrt().sum(-1)


def bw_distance_sq_oracle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.trace(a) + torch.trace(b) - 2 * trace_sqrt_product(a, b)


def denman_beavers_sqrt(a: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """The principal square root of a matrix with positive eigenvalues (here AB), by Denman–Beavers."""
    y, z = a, torch.eye(a.shape[-1], dtype=a.dtype)
    for _ in range(iterations):
        y, z = (y + torch.linalg.inv(z)) / 2, (z + torch.linalg.inv(y)) / 2
    return y


def test_distance_matches_the_eigenvalues_of_ab():
    a, b = random_spd(), random_spd()
    torch.testing.assert_close(R.bw_distance_sq(a, b), bw_distance_sq_oracle(a, b))
    torch.testing.assert_close(R.bw_distance_sq(a, a), torch.zeros((), dtype=DOUBLE), atol=1e-12, rtol=0)


def test_gbw_is_bw_after_the_congruence():
    """Spec §1.2 key fact: d²_GBW,M(X, Y) (Han et al.'s formula) = d²_BW(M^{-1/2} X M^{-1/2}, M^{-1/2} Y M^{-1/2})."""
    x, y, m = random_spd(), random_spd(), random_spd()
    m_inv = torch.linalg.inv(m)
    gbw = torch.trace(m_inv @ x) + torch.trace(m_inv @ y) - 2 * trace_sqrt_product(x, m_inv @ y @ m_inv)
    m_inv_half = L.invsqrtm(m)
    torch.testing.assert_close(R.bw_distance_sq(R.deform(x, 1.0, m_inv_half), R.deform(y, 1.0, m_inv_half)), gbw)


def test_log_exp_and_geodesic():
    """Log_P is the inverse of Exp_P inside the domain, ‖Log_P X‖²_P = d²(P, X), and γ(t) = Exp_A(t Log_A B)."""
    p = random_spd()
    x = p + 0.2 * L.sym(torch.randn(4, 4, dtype=DOUBLE))
    log = R.bw_log(p, x)
    torch.testing.assert_close(R.bw_exp(p, log), x)
    torch.testing.assert_close(bw_inner(p, log, log), bw_distance_sq_oracle(p, x))
    a, b = random_spd(), random_spd()
    for t in (0.0, 0.3, 1.0):
        torch.testing.assert_close(R.bw_geodesic(a, b, t), R.bw_exp(a, t * R.bw_log(a, b)))


def test_transports_preserve_the_metric_norm():
    """Γ_{I→A} = S_A^{1/2} and Γ_{A→I} = S_A^{-1/2} are isometries: g_A(ΓV, ΓV) = g_I(V, V) = ¼‖V‖²_F."""
    a = random_spd()
    eye = torch.eye(4, dtype=DOUBLE)
    v, w = L.sym(torch.randn(4, 4, dtype=DOUBLE)), L.sym(torch.randn(4, 4, dtype=DOUBLE))
    to_a_v, to_a_w = L.lyapunov_power(a, v, 0.5), L.lyapunov_power(a, w, 0.5)
    torch.testing.assert_close(bw_inner(a, to_a_v, to_a_w), bw_inner(eye, v, w))
    torch.testing.assert_close(bw_inner(eye, v, v), (v * v).sum() / 4)
    torch.testing.assert_close(bw_inner(eye, L.lyapunov_power(a, v, -0.5), L.lyapunov_power(a, v, -0.5)),
                               bw_inner(a, v, v))


def test_barycenter_of_two_matrices_is_the_geodesic_midpoint():
    """The converged fixed point of two matrices is γ(½) = ¼(A + B + (AB)^{1/2} + (BA)^{1/2}); one step from the
    arithmetic mean is already close (spec §6)."""
    a, b = random_spd(n=5), random_spd(n=5)
    ab_half = denman_beavers_sqrt(a @ b)
    midpoint = (a + b + ab_half + ab_half.T) / 4
    torch.testing.assert_close(R.bw_geodesic(a, b, 0.5), midpoint)
    torch.testing.assert_close(R.bw_barycenter(torch.stack([a, b]), steps=40), midpoint)
    one_step = R.bw_barycenter(torch.stack([a, b]), steps=1)
    assert (one_step - midpoint).norm() < 0.1 * (torch.stack([a, b]).mean(0) - midpoint).norm()


def test_barycenter_with_zero_steps_is_the_arithmetic_mean():
    x = random_spd(6)
    torch.testing.assert_close(R.bw_barycenter(x, steps=0), x.mean(0))
