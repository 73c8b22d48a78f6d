"""SPDBatchNorm and functional.spd_batch_norm (spec spd_gbw_batchnorm.md §3) against independent computations.

Oracles, none sharing code with the implementation:

* ``diagonal_oracle``: for commuting inputs every step has a scalar closed form — BW on positive reals is Euclidean
  in ``√x``: the barycenter is ``(mean √x̃)²``, ``V = 2(√x̃ − √B)``, ``√Y = √w̃ + f(√x̃ − √B)``, the running mean moves
  on ``((1 − t)√a + t√b)²``.
* ``AuthorsBatchNormSPD``: a step-by-step transcription of the authors' ``BatchNormSPD`` forward (spec §2.2, with the
  maps of §1.1 written as the authors do: ``Log_P X = (PX)^{1/2} + (XP)^{1/2} − 2P``, ``Exp_P V = P + V + 𝓛P𝓛`` with
  a Kronecker Lyapunov solve, ``pal1``/``pal2`` as Hadamard scalings in an eigenbasis, ``Exp_I`` then ``Log_I`` around
  the scaling), in fp64 with plain autograd through ``eigh`` (fine at the distinct eigenvalues used there).
* The output property of spec §3.2 (barycenter ``W̃`` and dispersion ``s²``), checked with Denman–Beavers square
  roots and the eigenvalues of ``AB``.
* ``torch.autograd.gradcheck`` in fp64, with ``W = M = I`` exactly (all eigenvalues repeated).
"""

from __future__ import annotations

import copy
import inspect
import math
import sys

import pytest
import torch

import normlayers
from normlayers import functional as NF
from normlayers.testing import assert_close

DOUBLE = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and small independent helpers
# ----------------------------------------------------------------------------------------------------------------------


def random_orthogonal(n: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DOUBLE))
    return q


def spd_batch(*batch: int, n: int = 4, kappa: float = 10.0, dtype: torch.dtype = DOUBLE) -> torch.Tensor:
    """Wishart samples around a mean of condition ``kappa`` (spec §10.2), trace about n."""
    q = random_orthogonal(n)
    mean = q @ torch.diag(torch.logspace(0, -math.log10(kappa), n, dtype=DOUBLE)) @ q.T
    a = torch.randn(*batch, n, 3 * n, dtype=DOUBLE)
    wishart = a @ a.mT / (3 * n)
    root = torch.linalg.cholesky(mean)
    return (root @ wishart @ root.T).to(dtype)


def eig_fn(a: torch.Tensor, fn) -> torch.Tensor:
    """U fn(Λ) Uᵀ with plain autograd through eigh."""
    lam, u = torch.linalg.eigh((a + a.mT) / 2)
    return u @ torch.diag_embed(fn(lam)) @ u.mT


def mpow(a: torch.Tensor, p: float) -> torch.Tensor:
    return eig_fn(a, lambda lam: lam.clamp_min(0).pow(p) if p > 0 else lam.pow(p))


def denman_beavers_sqrt(a: torch.Tensor, iterations: int = 40) -> torch.Tensor:
    y, z = a, torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
    for _ in range(iterations):
        y, z = (y + torch.linalg.inv(z)) / 2, (z + torch.linalg.inv(y)) / 2
    return y


def set_spd_(module: normlayers.SPDBatchNorm, weight=None, metric=None, shift=None) -> None:
    with torch.no_grad():
        if weight is not None:
            module.weight = weight.to(module.shift.dtype)
        if metric is not None:
            module.metric = metric.to(module.shift.dtype)
        if shift is not None:
            module.shift.copy_(shift)


# ----------------------------------------------------------------------------------------------------------------------
# Diagonal (commuting) closed form
# ----------------------------------------------------------------------------------------------------------------------


def diagonal_oracle(x, w, m, s, rm, rv, *, theta, training, momentum, eps, variance, karcher_steps):
    """All arguments are diagonals: x (N, [C,] n), w ([C,] n), m (n), s () or (C,), rm ([C,] n), rv () or (C,).
    Returns (out, new rm, new rv)."""
    xt, wt = x ** theta / m, w ** theta / m
    if training:
        mean = xt.mean(0) if karcher_steps == 0 else xt.sqrt().mean(0) ** 2
        centre = mean.sqrt() if variance == "frechet" else torch.ones_like(mean)
        var = ((xt.sqrt() - centre) ** 2).sum(-1).mean(0) / theta ** 2
        rm = ((1 - momentum) * rm.sqrt() + momentum * mean.sqrt()) ** 2
        rv = (1 - momentum) * rv + momentum * var
    else:
        mean, var = rm, rv
    f = (s / torch.sqrt(var + eps)).unsqueeze(-1)
    y = (wt.sqrt() + f * (xt.sqrt() - mean.sqrt())) ** 2
    return (m * y) ** (1 / theta), rm, rv


@pytest.mark.parametrize("theta", [1.0, 0.5])
@pytest.mark.parametrize("variance,karcher_steps", [("frechet", 1), ("reference", 1), ("frechet", 0)])
@pytest.mark.parametrize("channels", [None, 3])
def test_commuting_inputs_match_the_scalar_closed_form(theta, variance, karcher_steps, channels):
    """Two training steps then eval, on inputs, bias and metric all diagonal in one random basis Q."""
    n, batch = 4, 5
    group = () if channels is None else (channels,)
    q = random_orthogonal(n)
    lift = lambda d: q @ torch.diag_embed(d) @ q.T  # noqa: E731
    w, m, s = torch.rand(*group, n, dtype=DOUBLE) + 0.5, torch.rand(n, dtype=DOUBLE) + 0.5, 0.8 + 0.2 * torch.rand(
        group, dtype=DOUBLE)
    bn = normlayers.SPDBatchNorm(n, channels=channels, theta=theta, variance=variance, karcher_steps=karcher_steps,
                                 momentum=0.3, dtype=DOUBLE)
    set_spd_(bn, weight=lift(w), metric=lift(m), shift=s)
    rm, rv = torch.ones(*group, n, dtype=DOUBLE), torch.ones(group, dtype=DOUBLE)
    for training in (True, True, False):
        x = torch.exp(torch.randn(batch, *group, n, dtype=DOUBLE))
        expected, rm, rv = diagonal_oracle(x, w, m, s, rm, rv, theta=theta, training=training, momentum=0.3,
                                           eps=1e-5, variance=variance, karcher_steps=karcher_steps)
        out = bn.train(training)(lift(x))
        torch.testing.assert_close(out, lift(expected))
        torch.testing.assert_close(bn.running_mean, lift(rm))
        torch.testing.assert_close(bn.running_var, rv)


@pytest.mark.parametrize("training", [True, False])
def test_per_channel_state_equals_one_pooled_run_per_channel(training):
    """With (C, n, n) state (here also a per-channel metric, which the functional form accepts) channel c of the
    output and of the buffers equals a pooled run on x[..., c, :, :] with channel c's state."""
    channels, n = 3, 4
    x = spd_batch(2, 5, channels, n=n)  # two leading batch dims, pooled together
    state = dict(weight=spd_batch(channels, n=n), metric=spd_batch(channels, n=n),
                 shift=torch.rand(channels, dtype=DOUBLE) + 0.5)
    running_mean, running_var = spd_batch(channels, n=n), torch.rand(channels, dtype=DOUBLE) + 0.5
    per_channel_mean, per_channel_var = running_mean.clone(), running_var.clone()
    out = NF.spd_batch_norm(x, per_channel_mean, per_channel_var, **state, training=training, theta=0.5)
    for c in range(channels):
        mean_c, var_c = running_mean[c].clone(), running_var[c].clone()
        expected = NF.spd_batch_norm(x[..., c, :, :], mean_c, var_c, **{k: v[c] for k, v in state.items()},
                                     training=training, theta=0.5)
        torch.testing.assert_close(out[..., c, :, :], expected)
        torch.testing.assert_close(per_channel_mean[c], mean_c)
        torch.testing.assert_close(per_channel_var[c], var_c)


# ----------------------------------------------------------------------------------------------------------------------
# The authors' algorithm, step by step (spec §2.2), for variance="reference", reference_roundtrip=True
# ----------------------------------------------------------------------------------------------------------------------


def lyapunov_solve(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Z with PZ + ZP = V (batched V), via the Kronecker system on row-major vec."""
    n = p.shape[-1]
    eye = torch.eye(n, dtype=p.dtype)
    operator = torch.kron(p, eye) + torch.kron(eye, p.T.contiguous())
    return torch.linalg.solve(operator, v.reshape(*v.shape[:-2], n * n, 1)).reshape(v.shape)


def authors_log(p, x):
    """LogG: (PX)^{1/2} + (XP)^{1/2} − 2P, (PX)^{1/2} = P^{1/2} (P^{1/2} X P^{1/2})^{1/2} P^{-1/2}."""
    p_half, p_inv_half = mpow(p, 0.5), mpow(p, -0.5)
    px_half = p_half @ mpow(p_half @ x @ p_half, 0.5) @ p_inv_half
    return px_half + px_half.mT - 2 * p


def authors_exp(p, v):
    """ExpG: P + V + 𝓛_P[V] P 𝓛_P[V]."""
    z = lyapunov_solve(p, v)
    return p + v + z @ p @ z


def authors_geodesic(a, b, t):
    ab_half = mpow(a, 0.5) @ mpow(mpow(a, 0.5) @ b @ mpow(a, 0.5), 0.5) @ mpow(a, -0.5)
    return (1 - t) ** 2 * a + t ** 2 * b + t * (1 - t) * (ab_half + ab_half.mT)


def eigen_hadamard(a, v, kernel):
    """U [kernel(a_i, a_j) ∘ UᵀVU] Uᵀ in A's eigenbasis (the authors' pal1/pal2 through th.svd)."""
    lam, u = torch.linalg.eigh(a)
    return u @ (kernel(lam.unsqueeze(-1), lam.unsqueeze(-2)) * (u.mT @ v @ u)) @ u.mT


def exp_at_identity(v):
    eye = torch.eye(v.shape[-1], dtype=v.dtype)
    return eye + v + v @ v / 4


def log_at_identity(x):
    return 2 * mpow(x, 0.5) - 2 * torch.eye(x.shape[-1], dtype=x.dtype)


class AuthorsBatchNormSPD:
    """GBWBN_SPDNet/spd/nn.py BatchNormSPD.forward as spec §2.2 describes it, for (N, n, n) inputs."""

    def __init__(self, n, theta, momentum=0.1, eps=1e-5):
        self.theta, self.momentum, self.eps = theta, momentum, eps
        self.running_mean = torch.eye(n, dtype=DOUBLE)
        self.running_var = torch.ones(n, dtype=DOUBLE)  # a vector of equal values, as the authors'

    def forward(self, x, weight, metric, shift, training):
        m_inv_half, m_half = mpow(metric, -0.5), mpow(metric, 0.5)
        x_d = m_inv_half @ mpow(x, self.theta) @ m_inv_half                       # 1. deform the input
        w_d = m_inv_half @ mpow(weight, self.theta) @ m_inv_half                  # 2. deform the bias
        if training:
            with torch.no_grad():
                g0 = x_d.mean(0)                                                  # 3. BaryGeom, one step
                g0_half, g0_inv_half = mpow(g0, 0.5), mpow(g0, -0.5)
                root_mean = mpow(g0_half @ x_d @ g0_half, 0.5).mean(0)
                mean = g0_inv_half @ root_mean @ root_mean @ g0_inv_half
                dist_to_identity = (x_d.diagonal(dim1=-2, dim2=-1).sum(-1) + x.shape[-1]   # 4. cal_var
                                    - 2 * mpow(x_d, 0.5).diagonal(dim1=-2, dim2=-1).sum(-1))
                var = dist_to_identity.mean() / self.theta ** 2
                self.running_mean = authors_geodesic(self.running_mean, mean, self.momentum)  # 5.
                self.running_var = (1 - self.momentum) * self.running_var + self.momentum * var
        else:
            mean, var = self.running_mean, self.running_var[0]
        centred = exp_at_identity(eigen_hadamard(mean, authors_log(mean, x_d),            # 6. pal1 + Exp_I
                                                 lambda a, b: torch.sqrt(2 / (a + b))))
        factor = shift / torch.sqrt(var + self.eps)
        scaled = exp_at_identity(factor * log_at_identity(centred))                         # 7. scale1
        biased = authors_exp(w_d, eigen_hadamard(w_d, log_at_identity(scaled),              # 8. pal2 + ExpG
                                                 lambda a, b: torch.sqrt((a + b) / 2)))
        return mpow(m_half @ biased @ m_half, 1 / self.theta)                              # 9. undeform


@pytest.mark.parametrize("theta", [1.0, 0.5])
@pytest.mark.parametrize("kappa", [10.0, 1e3])
def test_reference_variance_matches_the_authors_algorithm(theta, kappa):
    """variance="reference", reference_roundtrip=True, karcher_steps=1: outputs and running statistics over two
    training steps and an eval step; gradients of input, W, M and s at θ = 1 (spec §4 Q2: the authors' power
    backward is wrong at θ ≠ 1, so their gradients are only comparable there). κ = 1e3 leaves the BW Exp domain for
    a good fraction of samples (spec §3.3), which is where the round trip's |·| matters."""
    n = 5
    weight, metric = spd_batch(n=n, kappa=4.0), spd_batch(n=n, kappa=4.0)
    shift = torch.tensor(0.9, dtype=DOUBLE)
    theirs = AuthorsBatchNormSPD(n, theta)
    running_mean, running_var = torch.eye(n, dtype=DOUBLE), torch.ones((), dtype=DOUBLE)
    for training in (True, True, False):
        x = spd_batch(8, n=n, kappa=kappa)
        leaves = [t.clone().requires_grad_() for t in (x, weight, metric, shift)]
        ours = NF.spd_batch_norm(leaves[0], running_mean, running_var, *leaves[1:], training=training,
                                 theta=theta, variance="reference", reference_roundtrip=True)
        their_leaves = [t.clone().requires_grad_() for t in (x, weight, metric, shift)]
        expected = theirs.forward(*their_leaves, training=training)
        torch.testing.assert_close(ours, expected)
        torch.testing.assert_close(running_mean, theirs.running_mean)
        torch.testing.assert_close(running_var, theirs.running_var[0])
        if theta == 1.0:
            g = torch.randn_like(x)
            grads = torch.autograd.grad(ours, leaves, g)
            expected_grads = torch.autograd.grad(expected, their_leaves, g)
            for name, a, e in zip(("input", "weight", "metric", "shift"), grads, expected_grads):
                # Our gradient w.r.t. a symmetric matrix is the symmetric one; autograd through eigh's symmetrized
                # input gives the same. Compared at rtol 1e-6: two fp64 paths of ~10 eigendecompositions each.
                torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-8, msg=name)


def test_roundtrip_changes_nothing_inside_the_exp_domain():
    """At κ = 10 with f ≤ 1 no sample leaves the Exp domain (spec §3.3): U = f·V both ways."""
    x = spd_batch(8, n=4, kappa=10.0)
    kwargs = dict(training=True, variance="reference", shift=torch.tensor(0.5, dtype=DOUBLE))
    torch.testing.assert_close(NF.spd_batch_norm(x, None, None, reference_roundtrip=True, **kwargs),
                               NF.spd_batch_norm(x, None, None, reference_roundtrip=False, **kwargs))


# ----------------------------------------------------------------------------------------------------------------------
# The output property (spec §3.2) and numerics
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_frechet_output_has_barycenter_bias_and_dispersion_shift_squared(theta):
    """With a converged barycenter and eps = 0, the outputs in deformed coordinates have BW barycenter W̃
    (Σ Log_W̃ Y_i = 0) and (1/θ²)-Fréchet dispersion s² around it."""
    n, s = 4, 0.7
    bn = normlayers.SPDBatchNorm(n, theta=theta, karcher_steps=30, eps=0.0, dtype=DOUBLE)
    weight, metric = spd_batch(n=n, kappa=3.0), spd_batch(n=n, kappa=3.0)
    set_spd_(bn, weight=weight, metric=metric, shift=torch.tensor(s, dtype=DOUBLE))
    out = bn(spd_batch(16, n=n, kappa=10.0)).detach()
    m_inv_half = mpow(metric, -0.5)
    y, w_tilde = m_inv_half @ mpow(out, theta) @ m_inv_half, m_inv_half @ mpow(weight, theta) @ m_inv_half
    wy_half = denman_beavers_sqrt(w_tilde @ y)
    log_sum = (wy_half + wy_half.mT - 2 * w_tilde).sum(0)
    assert log_sum.abs().max() < 1e-8, log_sum
    d2 = (w_tilde.trace() + y.diagonal(dim1=-2, dim2=-1).sum(-1)
          - 2 * torch.linalg.eigvals(w_tilde @ y).real.sqrt().sum(-1))
    torch.testing.assert_close(d2.mean() / theta ** 2, torch.tensor(s ** 2, dtype=DOUBLE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_outputs_are_spd_for_ill_conditioned_inputs(dtype, theta):
    """Inputs of condition number exactly 1e6 (eigenvalues log-spaced over [1e-6, 1]), random M and W, train and
    eval: outputs finite, exactly symmetric, positive definite (fp64 Cholesky), and gradients finite."""
    n, batch = 6, 12
    spectrum = torch.logspace(-6, 0, n, dtype=DOUBLE)
    x = torch.stack([q @ torch.diag(spectrum) @ q.T for q in (random_orthogonal(n) for _ in range(batch))])
    x = ((x + x.mT) / 2).to(dtype)
    bn = normlayers.SPDBatchNorm(n, theta=theta, dtype=dtype)
    set_spd_(bn, weight=spd_batch(n=n, kappa=100.0), metric=spd_batch(n=n, kappa=100.0))
    for training in (True, False):
        leaf = x.clone().requires_grad_()
        out = bn.train(training)(leaf)
        out.square().sum().backward()
        assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(leaf.grad).all()
        assert torch.equal(out, out.mT)
        assert (torch.linalg.cholesky_ex(out.double()).info == 0).all()
        for p in bn.parameters():
            assert torch.isfinite(p.grad).all()


def test_float32_input_matches_float64():
    """Default compute_dtype=float64: an fp32 input differs from the fp64 run only by its own rounding."""
    x = spd_batch(10, n=5, kappa=100.0)
    bn64 = normlayers.SPDBatchNorm(5, theta=0.5, dtype=DOUBLE)
    set_spd_(bn64, weight=spd_batch(n=5), metric=spd_batch(n=5))
    bn32 = copy.deepcopy(bn64).float()
    for training in (True, False):
        out32 = bn32.train(training)(x.float())
        assert out32.dtype == torch.float32
        assert_close(out32, bn64.train(training)(x))
    assert_close(bn32.running_mean, bn64.running_mean)
    assert_close(bn32.running_var, bn64.running_var)


def test_compute_dtype_float32():
    """compute_dtype=float32 runs the per-sample eigendecompositions in fp32 (parameter side stays fp64)."""
    x = spd_batch(10, n=5, kappa=10.0)
    weight, metric = spd_batch(n=5, kappa=3.0), spd_batch(n=5, kappa=3.0)
    kwargs = dict(training=True, theta=0.5)
    out = NF.spd_batch_norm(x.float(), None, None, weight, metric, compute_dtype=torch.float32, **kwargs)
    expected = NF.spd_batch_norm(x, None, None, weight, metric, **kwargs)
    # fp32 eigh resolves the eigenvalues of the deformed inputs M^{-1/2} X^θ M^{-1/2} (condition ~1e2 here) only to
    # ~κ·u ≈ 1e-5 relative; the layer chains ~4 of them per sample.
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("theta", [1.0, 0.5])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("roundtrip", [False, True])
def test_gradcheck_fp64_at_repeated_eigenvalues(theta, training, roundtrip):
    """W = M = I exactly (every eigenvalue repeated) and inputs with repeated eigenvalues. At M = I the authors' nan →
    0 Loewner rule loses the off-diagonal gradient of M (spec §4 Q3).

    The batch statistics are detached (spec §2.2, as the authors'), so finite differences see their dependence on
    the input and on M while the gradient does not: in training only W and s are checked; eval (fixed running
    statistics, the same differentiable path) checks all four."""
    n = 3
    x = spd_batch(4, n=n)
    x[0] = 1.5 * torch.eye(n, dtype=DOUBLE)
    x[1] = torch.diag(torch.tensor([0.5, 0.5, 2.0], dtype=DOUBLE))
    eye = torch.eye(n, dtype=DOUBLE)
    running_mean, running_var = spd_batch(n=n), torch.tensor(0.8, dtype=DOUBLE)
    leaves = [t.clone().requires_grad_(not training or name in ("weight", "shift")) for name, t in
              (("input", x), ("weight", eye), ("metric", eye), ("shift", torch.tensor(0.9, dtype=DOUBLE)))]

    def fn(x, weight, metric, shift):
        # gradcheck perturbs one entry at a time; the input check rejects asymmetry beyond rounding, so the
        # perturbation is symmetrized here (the layer's gradient w.r.t. a symmetric input is symmetric).
        x = (x + x.mT) / 2
        return NF.spd_batch_norm(x, None if training else running_mean, None if training else running_var, weight,
                                 metric, shift, training=training, theta=theta, reference_roundtrip=roundtrip)

    assert torch.autograd.gradcheck(fn, tuple(leaves))


def test_gradcheck_through_the_parametrization_at_identity():
    """The module's leaves are log W and log M; at log M = 0 (M = I, all eigenvalues repeated) exp's divided
    differences are finite, and the module's metric gets a non-zero gradient."""
    bn = normlayers.SPDBatchNorm(3, channels=2, dtype=DOUBLE)
    x, running_mean = spd_batch(4, 2, n=3), spd_batch(2, n=3)
    exp = normlayers.nn.spd_batch_norm.SymmetricExp()

    def forward(weight_log, metric_log):
        # eval mode: in training the detached batch statistics depend on M (see the test above)
        return NF.spd_batch_norm(x, running_mean, torch.full((2,), 0.7, dtype=DOUBLE), exp(weight_log),
                                 exp(metric_log), bn.shift.detach(), training=False)

    leaves = (bn.parametrizations.weight.original.detach().clone().requires_grad_(),
              torch.zeros(3, 3, dtype=DOUBLE, requires_grad=True))
    assert torch.autograd.gradcheck(forward, leaves)
    bn(x).square().sum().backward()
    assert bn.parametrizations.metric.original.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------------
# Module: constructor, state, parametrization, devices
# ----------------------------------------------------------------------------------------------------------------------


def test_signature():
    params = [(p.name, p.kind, p.default) for p in
              inspect.signature(normlayers.SPDBatchNorm.__init__).parameters.values()][1:]
    keyword = inspect.Parameter.KEYWORD_ONLY
    assert params == [("num_features", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                      ("channels", keyword, None), ("momentum", keyword, 0.1), ("eps", keyword, 1e-5),
                      ("theta", keyword, 1.0), ("learn_metric", keyword, True), ("variance", keyword, "frechet"),
                      ("karcher_steps", keyword, 1), ("reference_roundtrip", keyword, False),
                      ("parametrization", keyword, "expm"), ("compute_dtype", keyword, torch.float64),
                      ("process_group", keyword, None), ("sync_stats", keyword, False), ("device", keyword, None),
                      ("dtype", keyword, None)]


def test_state_init_and_repr():
    bn = normlayers.SPDBatchNorm(4, channels=2, theta=0.5)
    assert sorted(bn.state_dict()) == ["parametrizations.metric.original", "parametrizations.weight.original",
                                       "running_mean", "running_var", "shift"]
    eye = torch.eye(4)
    torch.testing.assert_close(bn.running_mean, eye.expand(2, 4, 4))
    torch.testing.assert_close(bn.running_var, torch.ones(2))
    torch.testing.assert_close(bn.shift, torch.ones(2))
    torch.testing.assert_close(bn.metric, eye)
    # the authors' bias init I + diag(1e-7·k) (rounded to fp32 here)
    torch.testing.assert_close(bn.weight, torch.diag(1 + 1e-7 * torch.arange(1.0, 5.0)).expand(2, 4, 4))
    assert "4, channels=2" in repr(bn) and "theta=0.5" in repr(bn) and "variance='frechet'" in repr(bn)
    plain = normlayers.SPDBatchNorm(4, learn_metric=False)
    assert plain.metric is None and "metric" not in dict(plain.named_parameters())
    assert "learn_metric=False" in repr(plain)


def test_reset_parameters_restores_the_init():
    bn = normlayers.SPDBatchNorm(3, dtype=DOUBLE)
    fresh = copy.deepcopy(bn)
    set_spd_(bn, weight=spd_batch(n=3), metric=spd_batch(n=3), shift=torch.tensor(0.3, dtype=DOUBLE))
    bn(spd_batch(6, n=3))
    bn.reset_parameters()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[key], value, msg=key)


def test_spd_parameters_stay_spd_under_a_plain_optimizer():
    """Any value an optimizer gives the unconstrained leaves (log W, log M; even non-symmetric) is an SPD W, M."""
    bn = normlayers.SPDBatchNorm(4, dtype=DOUBLE)
    optimizer = torch.optim.SGD(bn.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        bn(spd_batch(8, n=4, kappa=100.0)).diagonal(dim1=-2, dim2=-1).sum().backward()
        optimizer.step()
    with torch.no_grad():
        bn.parametrizations.metric.original.copy_(3 * torch.randn(4, 4, dtype=DOUBLE))
    for spd in (bn.weight, bn.metric):
        assert torch.isfinite(spd).all() and torch.equal(spd, spd.mT)
        assert torch.linalg.eigvalsh(spd).min() > 0


def test_assigning_an_spd_matrix_goes_through_the_log():
    bn = normlayers.SPDBatchNorm(3, dtype=DOUBLE)
    w = spd_batch(n=3)
    with torch.no_grad():
        bn.weight = w
    torch.testing.assert_close(bn.weight, w)
    torch.testing.assert_close(torch.linalg.matrix_exp(bn.parametrizations.weight.original), w)


def test_state_dict_round_trip_and_deepcopy():
    src = normlayers.SPDBatchNorm(3, channels=2, theta=0.5, dtype=DOUBLE)
    set_spd_(src, weight=spd_batch(2, n=3), metric=spd_batch(n=3), shift=torch.tensor([0.5, 1.5], dtype=DOUBLE))
    src(spd_batch(5, 2, n=3))  # moves the running statistics
    dst = normlayers.SPDBatchNorm(3, channels=2, theta=0.5, dtype=DOUBLE)
    dst.load_state_dict(src.state_dict(), strict=True)
    clone = copy.deepcopy(src)
    assert clone.running_mean.data_ptr() != src.running_mean.data_ptr()
    x = spd_batch(5, 2, n=3)
    expected = [src.train(training)(x) for training in (False, True, False)]
    for module in (dst, clone):
        for training, e in zip((False, True, False), expected):
            torch.testing.assert_close(module.train(training)(x), e)


def test_to_float64_matches_a_float64_module():
    bn = normlayers.SPDBatchNorm(4)
    moved = copy.deepcopy(bn).to(DOUBLE)
    assert all(t.dtype == DOUBLE for t in moved.state_dict().values())
    assert moved.weight.dtype == DOUBLE and moved.running_mean.dtype == DOUBLE
    x = spd_batch(6, n=4)
    torch.testing.assert_close(moved(x), normlayers.SPDBatchNorm(4, dtype=DOUBLE)(x))


@pytest.mark.parametrize("channels", [None, 2])
def test_meta_device_construction_and_forward(channels):
    bn = normlayers.SPDBatchNorm(4, channels=channels, device="meta")
    assert all(t.is_meta for t in bn.state_dict().values())
    shape = (3, 4, 4) if channels is None else (3, 2, 4, 4)
    for training in (True, False):
        y = bn.train(training)(torch.empty(shape, device="meta"))
        assert y.is_meta and y.shape == shape and y.dtype == torch.float32


def test_runs_the_reference_under_every_backend():
    x = spd_batch(6, n=3)
    expected = normlayers.SPDBatchNorm(3, dtype=DOUBLE)(x)
    for name in ("reference", "triton", "auto"):
        with normlayers.backend(name):
            torch.testing.assert_close(normlayers.SPDBatchNorm(3, dtype=DOUBLE)(x), expected)


def test_geoopt_parametrization_without_geoopt_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "geoopt", None)  # `import geoopt` raises ImportError, installed or not
    with pytest.raises(ImportError, match=r"parametrization='geoopt' needs geoopt \(pip install geoopt\)"):
        normlayers.SPDBatchNorm(3, parametrization="geoopt")


def test_geoopt_parametrization():
    # geoopt is optional (not in the test extra: it imports scipy at import time); without it this shows as skipped.
    geoopt = pytest.importorskip("geoopt")
    bn = normlayers.SPDBatchNorm(3, parametrization="geoopt", dtype=DOUBLE)
    assert isinstance(bn.weight, geoopt.ManifoldParameter) and isinstance(bn.metric, geoopt.ManifoldParameter)
    for param in (bn.weight, bn.metric):
        assert isinstance(param.manifold, geoopt.SymmetricPositiveDefinite)
    expected = normlayers.SPDBatchNorm(3, dtype=DOUBLE)
    x = spd_batch(6, n=3)
    torch.testing.assert_close(bn(x), expected(x))
    # The point of the manifold: a Riemannian step stays SPD where a Euclidean one (I − 2·I = −I) would not.
    optimizer = geoopt.optim.RiemannianSGD([bn.weight], lr=2.0)
    torch.diagonal(bn.weight).sum().backward()
    optimizer.step()
    assert torch.linalg.eigvalsh(bn.weight.detach()).min() > 0


def test_training_moves_the_running_mean_on_the_geodesic_and_eval_uses_it():
    """momentum = 1 replaces the running statistics by the batch's; eval then reproduces the training output."""
    bn = normlayers.SPDBatchNorm(4, momentum=1.0, dtype=DOUBLE)
    x = spd_batch(8, n=4)
    train_out = bn.train()(x)
    torch.testing.assert_close(bn.eval()(x), train_out)
    before = copy.deepcopy(bn.state_dict())
    bn(spd_batch(8, n=4))
    for key, value in before.items():
        assert torch.equal(bn.state_dict()[key], value), key


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("training", "channels"), [(True, 2), (False, 2), (True, None)])
def test_compile_fullgraph_matches_eager(training, channels):
    """eigh and the custom autograd Functions trace into one graph (aot_eager, as the other modules' compile tests);
    the input-value check is skipped while compiling. ``channels=None``: the pooled layout's 0-d ``running_var``,
    whose update torch.compile once dropped."""
    torch._dynamo.reset()
    eager = normlayers.SPDBatchNorm(4, channels=channels, theta=0.5, dtype=DOUBLE).train(training)
    set_spd_(eager, weight=spd_batch(*([2] if channels else []), n=4), metric=spd_batch(n=4))
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    x = spd_batch(6, 2, n=4)

    def step(module, x):
        leaf = x.clone().requires_grad_()
        out = module(leaf)
        out.square().sum().backward()
        return out.detach(), leaf.grad

    for _ in range(2):  # two steps: the running buffers feed the second
        expected, actual = step(eager, x), step(compiled, x)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e)
    for (name, p), q in zip(eager.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, b), c in zip(eager.named_buffers(), compiled_module.buffers()):
        torch.testing.assert_close(c, b, msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    for kwargs, match in [({"num_features": 0}, "num_features"), ({"channels": 0}, "channels"),
                          ({"momentum": 1.5}, "momentum"), ({"eps": -1.0}, "eps"), ({"theta": 0.0}, "theta"),
                          ({"variance": "mean"}, "variance"), ({"karcher_steps": -1}, "karcher_steps"),
                          ({"parametrization": "cayley"}, "parametrization")]:
        with pytest.raises(ValueError, match=match):
            normlayers.SPDBatchNorm(**{"num_features": 3, **kwargs})
    with pytest.raises(TypeError, match="compute_dtype"):
        normlayers.SPDBatchNorm(3, compute_dtype=torch.float16)


def test_bad_input():
    bn = normlayers.SPDBatchNorm(3, dtype=DOUBLE)
    x = spd_batch(4, n=3)
    with pytest.raises(TypeError, match="input"):
        bn(x.half())
    with pytest.raises(TypeError, match="input"):
        bn(x.tolist())
    with pytest.raises(ValueError, match="square"):
        bn(torch.rand(4, 3, 2, dtype=DOUBLE))
    with pytest.raises(ValueError, match="square"):
        bn(x[0])  # no batch dim
    with pytest.raises(ValueError, match="shape"):
        bn(spd_batch(4, n=5))  # n does not match the state
    non_symmetric = x.clone()
    non_symmetric[:, 0, 1] += 0.1
    with pytest.raises(ValueError, match="symmetric"):
        bn(non_symmetric)
    slightly = x.clone()
    slightly[:, 0, 1] += 1e-12  # rounding-level asymmetry is accepted and symmetrized
    torch.testing.assert_close(bn(slightly), bn(x))
    indefinite = x.clone()
    indefinite[1] -= 10 * torch.eye(3, dtype=DOUBLE)
    with pytest.raises(ValueError, match="positive definite"):
        bn(indefinite)
    nan = x.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        bn(nan)
    with pytest.raises(ValueError, match="more than 1 matrix"):
        bn(x[:1])
    bn.eval()(x[:1])  # a single matrix is fine in eval
    per_channel = normlayers.SPDBatchNorm(3, channels=2, dtype=DOUBLE)
    with pytest.raises(ValueError, match=r"\(\*, C, n, n\)"):
        per_channel(x)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        per_channel(spd_batch(4, 3, n=3))


def test_bad_functional_arguments():
    x = spd_batch(4, n=3)
    eye = torch.eye(3, dtype=DOUBLE)
    with pytest.raises(ValueError, match="required in eval"):
        NF.spd_batch_norm(x, None, None)
    with pytest.raises(ValueError, match="together"):
        NF.spd_batch_norm(x, eye, None, training=True)
    with pytest.raises(ValueError, match="metric must have shape"):
        NF.spd_batch_norm(x, None, None, metric=torch.eye(4, dtype=DOUBLE), training=True)
    with pytest.raises(ValueError, match="shift must have shape"):
        NF.spd_batch_norm(x, eye, torch.ones((), dtype=DOUBLE), shift=torch.ones(1, 1, dtype=DOUBLE))
    with pytest.raises(ValueError, match="theta"):
        NF.spd_batch_norm(x, None, None, training=True, theta=float("inf"))
    with pytest.raises(ValueError, match="karcher_steps"):
        NF.spd_batch_norm(x, None, None, training=True, karcher_steps=1.5)
