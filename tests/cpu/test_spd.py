"""The CPU tier of SPD batch normalization (folded congruences, one-product barycenter) against the reference."""

from __future__ import annotations

import pytest
import torch

import normlayers.functional as NF
from normlayers.cpu import spd as cpu_spd

from .conftest import assert_cpu_tier_matches_reference

N = 4
DOUBLE = torch.float64


def _spd(*batch: int, n: int = N, dtype: torch.dtype = DOUBLE, seed: int = 0) -> torch.Tensor:
    """Wishart-like SPD matrices of condition ~10–100."""
    a = torch.randn(*batch, n, 2 * n, dtype=DOUBLE, generator=torch.Generator().manual_seed(seed))
    return (a @ a.mT / (2 * n) + 0.1 * torch.eye(n, dtype=DOUBLE)).to(dtype)


def _call(training: bool, **kwargs):
    def fn(x, weight, metric, shift, running_mean, running_var):
        return NF.spd_batch_norm(x, running_mean, running_var, weight, metric, shift, training=training, **kwargs)
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, DOUBLE], ids=["fp32", "fp64"])
@pytest.mark.parametrize("channels", [None, 3], ids=["pooled", "per_channel"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("theta", "variance", "roundtrip", "steps"),
                         [(1.0, "frechet", False, 1), (0.5, "frechet", True, 2), (-1.0, "reference", False, 0),
                          (1.0, "reference", True, 3)])
def test_matches_reference(theta, variance, roundtrip, steps, training, channels, dtype):
    group = () if channels is None else (channels,)
    x = _spd(5, *group, dtype=dtype)
    params = [_spd(*group, seed=1, dtype=dtype), _spd(*group, seed=2, dtype=dtype),
              torch.full(group, 0.9, dtype=dtype)]
    buffers = [_spd(*group, seed=3, dtype=dtype), torch.full(group, 1.3, dtype=dtype)]
    fn = _call(training, theta=theta, variance=variance, reference_roundtrip=roundtrip, karcher_steps=steps)
    assert_cpu_tier_matches_reference(fn, [x, *params], buffers)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32])
def test_compute_dtype_and_identity_parameters(compute_dtype):
    """``weight``/``metric``/``shift`` of ``None`` (the identity, no congruence) and per-sample work in fp32."""
    x = _spd(6, 2, dtype=torch.float32)

    def fn(x, running_mean, running_var):
        return NF.spd_batch_norm(x, running_mean, running_var, training=True, compute_dtype=compute_dtype)
    assert_cpu_tier_matches_reference(fn, [x], [_spd(seed=3, dtype=torch.float32), torch.ones(())])


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_spd, "spd_batch_norm", lambda *args, **kwargs: calls.append(1) or args[0])
    NF.spd_batch_norm(_spd(3), None, None, training=True)
    assert calls == [1]


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_fp64_at_repeated_eigenvalues(training):
    """W = M = I (every eigenvalue repeated) and inputs with repeated eigenvalues, through the CPU tier. In training
    the batch statistics are detached (as the authors'), so only W and s are checked there."""
    x = _spd(4, n=3)
    x[0] = 1.5 * torch.eye(3, dtype=DOUBLE)
    x[1] = torch.diag(torch.tensor([0.5, 0.5, 2.0], dtype=DOUBLE))
    eye = torch.eye(3, dtype=DOUBLE)
    running_mean, running_var = _spd(n=3, seed=3), torch.tensor(0.8, dtype=DOUBLE)
    leaves = [t.clone().requires_grad_(not training or i in (1, 3))
              for i, t in enumerate((x, eye, eye, torch.tensor(0.9, dtype=DOUBLE)))]

    def fn(x, weight, metric, shift):
        x = (x + x.mT) / 2  # gradcheck's one-entry perturbations would fail the input's symmetry check
        return NF.spd_batch_norm(x, None if training else running_mean, None if training else running_var, weight,
                                 metric, shift, training=training, theta=0.5)
    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("training", [True, False])
def test_compiles_fullgraph(training):
    torch._dynamo.reset()
    x, weight, metric = _spd(5, 2, dtype=torch.float32), _spd(2, seed=1), _spd(2, seed=2)
    weight.requires_grad_()

    def step(x, running_mean, running_var):
        out = NF.spd_batch_norm(x, running_mean, running_var, weight, metric, training=training, theta=0.5)
        return out.square().sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaf = x.clone().requires_grad_()
        buffers = [_spd(2, seed=3), torch.ones(2, dtype=DOUBLE)]
        results.append([*torch.autograd.grad(fn(leaf, *buffers), [leaf, weight]), *buffers])
    for a, c in zip(*results):
        torch.testing.assert_close(a, c)
