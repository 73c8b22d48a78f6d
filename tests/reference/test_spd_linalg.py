"""The eigh-based matrix functions of normlayers.reference.spd_linalg (spec §5.2) against independent computations.

Oracles: algebraic identities (``sqrtm(A)² = A``, ``expm`` vs ``torch.linalg.matrix_exp``, integer powers vs
``torch.linalg.matrix_power``), the defining equation of the Lyapunov operator ``S_A(X) = (AX + XA)/2``, the analytic
derivative of a spectral function at the identity (``f′(1)·sym(G)``), and ``torch.autograd.gradcheck`` (finite
differences) in fp64 — at random SPD matrices, at the identity and at repeated and nearly repeated eigenvalues, where
autograd through ``eigh`` would be infinite or NaN.
"""

from __future__ import annotations

import pytest
import torch

from normlayers.reference import spd_linalg as L

DOUBLE = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_spd(*batch: int, n: int = 4, dtype: torch.dtype = DOUBLE) -> torch.Tensor:
    a = torch.randn(*batch, n, n, dtype=DOUBLE)
    return (a @ a.mT / n + 0.3 * torch.eye(n, dtype=DOUBLE)).to(dtype)


def rotated_diag(values: list[float]) -> torch.Tensor:
    """``Q diag(values) Qᵀ`` for a random orthogonal ``Q`` (repeated values give a repeated eigenvalue)."""
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), dtype=DOUBLE))
    return q @ torch.diag(torch.tensor(values, dtype=DOUBLE)) @ q.T


FUNCTIONS = {
    "sqrtm": L.sqrtm,
    "invsqrtm": L.invsqrtm,
    "logm": L.logm,
    "expm": L.expm,
    "powm(0.3)": lambda a: L.powm(a, 0.3),
    "powm(-1.7)": lambda a: L.powm(a, -1.7),
    "powm(2.5)": lambda a: L.powm(a, 2.5),
    "absm": L.absm,
}
# f′(1) of each function, for the derivative at the identity.
DERIVATIVE_AT_ONE = {"sqrtm": 0.5, "invsqrtm": -0.5, "logm": 1.0, "expm": torch.e, "powm(0.3)": 0.3,
                     "powm(-1.7)": -1.7, "powm(2.5)": 2.5, "absm": 1.0}
POINTS = {
    "random": lambda: random_spd(2),
    "identity": lambda: torch.eye(4, dtype=DOUBLE).repeat(2, 1, 1),
    "repeated": lambda: rotated_diag([0.5, 0.5, 2.0, 2.0]),
    "nearly_repeated": lambda: rotated_diag([1.0, 1.0 + 1e-9, 3.0, 3.0 - 1e-10]),
}
# |x| is used on indefinite matrices (the reference round trip); powers and logs only on SPD ones.
INDEFINITE = rotated_diag([-1.5, -0.5, 0.7, 2.0])


def test_forward_identities():
    a = random_spd(3)
    eye = torch.eye(4, dtype=DOUBLE)
    torch.testing.assert_close(L.sqrtm(a) @ L.sqrtm(a), a)
    torch.testing.assert_close(L.invsqrtm(a) @ L.sqrtm(a), eye.expand_as(a))
    torch.testing.assert_close(L.powm(a, 3.0), torch.linalg.matrix_power(a, 3))
    torch.testing.assert_close(L.powm(a, -1.0), torch.linalg.inv(a))
    torch.testing.assert_close(L.powm(a, 0.5), L.sqrtm(a))
    s = L.sym(torch.randn(3, 4, 4, dtype=DOUBLE))
    torch.testing.assert_close(L.expm(s), torch.linalg.matrix_exp(s))
    torch.testing.assert_close(L.logm(L.expm(s)), s)
    torch.testing.assert_close(L.absm(s) @ L.absm(s), s @ s)
    torch.testing.assert_close(L.rectify(s, 0.1), L.rectify(L.rectify(s, 0.1), 0.1))
    assert torch.linalg.eigvalsh(L.rectify(s, 0.1)).min() >= 0.1 - 1e-12


@pytest.mark.parametrize("point", sorted(POINTS))
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_gradcheck_fp64(name, point):
    """Finite differences agree with the closed-form Loewner backward, including at repeated eigenvalues."""
    a = POINTS[point]().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: FUNCTIONS[name](L.sym(t)), (a,))


def test_absm_gradcheck_on_an_indefinite_matrix():
    assert torch.autograd.gradcheck(lambda t: L.absm(L.sym(t)), (INDEFINITE.clone().requires_grad_(),))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_derivative_at_identity_is_f_prime_times_sym(name):
    """At A = I every eigenvalue is repeated: d tr(G F(A)) / dA = f′(1)·sym(G). The authors' nan → 0 rule (spec §4
    Q3) would lose every off-diagonal entry here."""
    g = torch.randn(4, 4, dtype=DOUBLE)
    a = torch.eye(4, dtype=DOUBLE, requires_grad=True)
    (FUNCTIONS[name](a) * g).sum().backward()
    torch.testing.assert_close(a.grad, DERIVATIVE_AT_ONE[name] * L.sym(g))


def test_singular_and_zero_inputs_give_finite_values_and_gradients():
    """Clamping at the relative floor: a rank-deficient PSD matrix and the zero matrix give no NaN/inf."""
    v = torch.randn(4, 2, dtype=DOUBLE)
    for a in (v @ v.T, torch.zeros(4, 4, dtype=DOUBLE)):
        for fn in (L.sqrtm, L.invsqrtm, L.logm, lambda t: L.powm(t, 0.5)):
            leaf = a.clone().requires_grad_()
            out = fn(leaf)
            out.sum().backward()
            assert torch.isfinite(out).all() and torch.isfinite(leaf.grad).all()


def test_clamped_eigenvalues_get_zero_gradient():
    """g(x) = f(max(x, floor)) is constant below the floor: a perturbation along a clamped eigenvector changes
    nothing, so the gradient has no component there."""
    a = torch.diag(torch.tensor([1e-30, 1.0, 2.0], dtype=DOUBLE)).requires_grad_()
    L.sqrtm(a).sum().backward()
    assert a.grad[0, 0] == 0
    b = torch.diag(torch.tensor([0.05, 1.0, 2.0], dtype=DOUBLE)).requires_grad_()
    L.rectify(b, 0.1).diagonal().sum().backward()  # d tr g(B) = diag(g′(λ)) in B's eigenbasis
    torch.testing.assert_close(b.grad, torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=DOUBLE)))


def test_fp32_keeps_dtype_and_matches_fp64():
    a = random_spd(5)
    for fn in (L.sqrtm, L.invsqrtm, L.logm):
        out32 = fn(a.float())
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32, fn(a).float(), rtol=1e-5, atol=1e-5)  # eigh in fp32: ~1e-6 relative


def kron_lyapunov_operator(a: torch.Tensor) -> torch.Tensor:
    """The matrix of X ↦ (AX + XA)/2 acting on row-major vec(X)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    return (torch.kron(a, eye) + torch.kron(eye, a.T.contiguous())) / 2


def test_lyapunov_power_is_the_operator_power():
    """S_A^1 is (AX + XA)/2; S_A^{1/2} applied twice is S_A; S_A^{-1} solves the Kronecker system; S^{-1/2} inverts
    S^{1/2} (the transports Γ_{A→I}∘Γ_{I→A} = id, spec §1.1)."""
    a, x = random_spd(), torch.randn(4, 4, dtype=DOUBLE)
    torch.testing.assert_close(L.lyapunov_power(a, x, 1.0), (a @ x + x @ a) / 2)
    torch.testing.assert_close(L.lyapunov_power(a, L.lyapunov_power(a, x, 0.5), 0.5), (a @ x + x @ a) / 2)
    solved = torch.linalg.solve(kron_lyapunov_operator(a), x.reshape(-1)).reshape(4, 4)
    torch.testing.assert_close(L.lyapunov_power(a, x, -1.0), solved)
    torch.testing.assert_close(L.lyapunov_power(a, L.lyapunov_power(a, x, 0.5), -0.5), x)


@pytest.mark.parametrize("point", ["random", "identity", "repeated"])
@pytest.mark.parametrize("power", [0.5, -0.5, -1.0, 0.7])
def test_lyapunov_power_gradcheck(power, point):
    """Both arguments, with a batch of X per A (A's gradient summed over it) and per-channel A."""
    a = (random_spd(3) if point == "random" else torch.eye(4, dtype=DOUBLE).repeat(3, 1, 1) if point == "identity"
         else torch.stack([rotated_diag([1.0, 1.0, 2.0, 2.0]) for _ in range(3)])).requires_grad_()
    x = torch.randn(2, 3, 4, 4, dtype=DOUBLE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, u: L.lyapunov_power(L.sym(t), u, power), (a, x))


def test_lyapunov_power_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="trailing dims"):
        L.lyapunov_power(random_spd(3), torch.randn(2, 4, 4, 4, dtype=DOUBLE), 0.5)


def test_double_backward_raises():
    # One clear error as soon as create_graph=True asks for the backward's graph (docs/reliability.md).
    a = random_spd().requires_grad_()
    with pytest.raises(RuntimeError, match="has no second derivative"):
        torch.autograd.grad(L.sqrtm(a).sum(), a, create_graph=True)
    b = random_spd().requires_grad_()
    with pytest.raises(RuntimeError, match="has no second derivative"):
        torch.autograd.grad(L.lyapunov_power(b, torch.randn_like(b, dtype=b.dtype), 0.5).sum(), b, create_graph=True)
