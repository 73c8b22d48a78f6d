"""The token-statistics custom ops: torch.library.opcheck, and torch.compile(fullgraph=True) of PowerNorm and
UnifiedNorm (training and eval, both backends) against eager, buffers included.

These tests check plumbing, not the numbers: where they compare the Triton backend with the reference, both run the
same per-channel statistics code (``normlayers.reference.power_norm`` / ``unified_norm``: the window, the outlier
test, the running updates), so a bug there would pass them. Neither torch nor timm has PowerNorm or UnifiedNorm, so
the numbers' oracle is the independent step-by-step transcription of the authors' algorithms in
``tests/nn/test_power_unified_steps.py`` (both backends, every step, every buffer), and the eval formula in
``tests/nn/test_power_unified.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import normlayers
from normlayers.testing import assert_close


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("strided", [False, True])
def test_opcheck_statistics_and_affine_ops(strided):
    x = _randn(7, 10, seed=1)[:, :5] if strided else _randn(7, 5, seed=1)
    dy = _randn(7, 5, seed=2)
    valid = torch.tensor([True, False, True, True, False, True, True])
    p, q, s = _randn(5, seed=3), _randn(5, seed=4), _randn(5, seed=5)
    torch.library.opcheck(torch.ops.normlayers.token_square_sum.default, (x, valid))
    torch.library.opcheck(torch.ops.normlayers.token_square_sum.default, (x, None))
    torch.library.opcheck(torch.ops.normlayers.token_grad_sums.default, (dy, x, None, None))
    torch.library.opcheck(torch.ops.normlayers.token_grad_sums.default, (dy, x, p, q))
    torch.library.opcheck(torch.ops.normlayers.channel_affine2.default, (dy, p, x, q))
    torch.library.opcheck(torch.ops.normlayers.channel_affine.default,
                          (x.clone().requires_grad_(), p.requires_grad_(), s.requires_grad_(), torch.bfloat16))
    torch.library.opcheck(torch.ops.normlayers.channel_affine.default, (x, p.detach(), None, torch.float32))


def test_opcheck_training_ops():
    # The training ops' backward updates the backward statistics in place (the method's definition); opcheck runs
    # the backward several times, so each check gets buffers it may change. Their gradients are not autograd's
    # gradients of the forward by design, so only the forward's schema, fake tensor and dispatch checks apply to the
    # autograd test ("test_autograd_registration" checks only that autograd is registered).
    u, w, b = _randn(6, 4, seed=1), _randn(4, seed=2) + 2, _randn(4, seed=3)
    scale, grad_scale = _randn(4, seed=4).abs() + 0.5, _randn(4, seed=5).abs() + 0.5
    torch.library.opcheck(torch.ops.normlayers.power_norm_train.default,
                          (u.requires_grad_(), w.requires_grad_(), b.requires_grad_(), scale, grad_scale,
                           torch.zeros(4), 0.9, torch.float32))
    x = _randn(6, 4, seed=6)
    t, skip = torch.tensor([7]), torch.tensor([False])
    torch.library.opcheck(torch.ops.normlayers.unified_norm_train.default,
                          (x.requires_grad_(), w, b, scale, torch.ones(4), torch.zeros(4), torch.zeros(2, 4), t, skip,
                           0.9, 3))


@pytest.mark.parametrize("groups, time_major", [(2, True), (None, False)])
def test_opcheck_fused_ops(groups, time_major):
    """The fused layers' ops (``_PowerNormFused``/``_UnifiedNormFused`` and eval's ``token_affine``). The finalize
    ops update buffers in place (declared in their schemas); each check gets its own copies."""
    ops = torch.ops.normlayers
    x = _randn(5, 3, 4, seed=1)  # (T, B, C) when time_major, else (B, N, C)
    pad = torch.tensor([[False, False, True, True, False], [False, True, False, False, False],
                        [False, False, False, False, True]])
    pad = pad if time_major else pad.T[:, :3].contiguous()
    dy, w, b = _randn(5, 3, 4, seed=2), _randn(4, seed=3) + 2, _randn(4, seed=4)
    scale, grad_scale, running = (_randn(4, seed=s).abs() + 0.5 for s in (5, 6, 7))
    torch.library.opcheck(ops.token_moments.default, (x, pad, time_major, groups, 1e-5))
    torch.library.opcheck(ops.token_moments.default, (x, None, time_major, groups, 1e-5))
    partials = ops.token_moments(x, pad, time_major, groups, 1e-5)
    torch.library.opcheck(ops.power_norm_finalize.default, (partials, running.clone(), torch.tensor([3]), 1e-5, 0.9,
                                                            4, groups is None))
    for outlier_filtration in (False, True):
        torch.library.opcheck(ops.unified_norm_finalize.default,
                              (partials, running.clone(), running.expand(3, 4).clone(), torch.tensor([0]),
                               torch.tensor([5]), 1e-5, 0.9, 2, outlier_filtration, True))
    for running_eps in (None, 1e-5):
        torch.library.opcheck(ops.token_affine.default, (x.clone().requires_grad_(), scale, w.clone().requires_grad_(),
                                                         b.clone().requires_grad_(), groups, running_eps,
                                                         torch.bfloat16))
    torch.library.opcheck(ops.token_affine.default, (x, scale, None, None, groups, None, torch.float32))
    torch.library.opcheck(ops.token_grad.default, (x, dy, scale, w, running, 0.1, grad_scale, groups))
    torch.library.opcheck(ops.token_grad.default, (x, dy, scale, None, None, 0.0, None, None))
    grad_partials = ops.token_grad(x, dy, scale, w, running, 0.1, grad_scale, groups)[1]
    torch.library.opcheck(ops.power_norm_finalize_bwd.default, (grad_partials, running.clone(), w, b, 15))
    torch.library.opcheck(ops.power_norm_finalize_bwd.default, (grad_partials, running.clone(), None, None, 15))
    step, skip = torch.tensor([6]), torch.tensor([0], dtype=torch.int8)
    torch.library.opcheck(ops.unified_norm_finalize_bwd.default,
                          (grad_partials, w, grad_scale, step, skip, running.clone(), running.expand(2, 4).clone(), 15,
                           0.9, 2))
    torch.library.opcheck(ops.unified_norm_dx.default, (x, dy, scale, w, grad_scale, running))


def _pair(kind: str, training: bool):
    if kind == "power":
        m = normlayers.PowerNorm(8, group_num=2, warmup_iters=3)
    elif kind == "unified":
        m = normlayers.UnifiedNorm(8, window_size=2, warmup_iters=3)
    else:
        m = normlayers.UnifiedNorm(8, window_size=(3, 2), warmup_iters=2, outlier_filtration=True)
    m.train(training)
    return m, copy.deepcopy(m)


@pytest.mark.parametrize("backend, kind, training", [
    ("triton", "power", True), ("triton", "unified_filtration", True), ("triton", "unified", True),
    ("reference", "power", True), ("reference", "unified_filtration", True),
    ("triton", "power", False), ("triton", "unified", False),
])
def test_compile_fullgraph_matches_eager(backend, kind, training):
    # fp64, so that eager and compiled (which may fuse and reorder the small torch ops) agree to fp64's tolerance.
    # The training steps read and write the buffers on device, inside the graph; the backward's buffer updates run in
    # the compiled backward. Six steps cross warm-up (and, with filtration, a ×30 outlier batch at step 4).
    torch._dynamo.reset()
    eager, compiled_layer = (m.double() for m in _pair(kind, training))
    compiled = torch.compile(compiled_layer, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 1, 8, dtype=torch.float64)
    with normlayers.backend(backend):
        for step in range(6):
            x = torch.randn(5, 3, 8, generator=gen, dtype=torch.float64) * scales * (30 if step == 4 else 1)
            mask = torch.rand(3, 5, generator=gen) < 0.3 if kind == "power" else torch.rand(5, 3, generator=gen) < 0.3
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = eager(xa, mask), compiled(xb, mask)
            dy = torch.randn(5, 3, 8, generator=gen, dtype=torch.float64)
            ya.backward(dy)
            yb.backward(dy)
            assert_close(yb, ya, msg=f"step {step}: y")
            assert_close(xb.grad, xa.grad, msg=f"step {step}: dx")
            assert_close(compiled_layer.weight.grad, eager.weight.grad, msg=f"step {step}: dweight")
            for key, value in eager.state_dict().items():
                assert_close(compiled_layer.state_dict()[key].double(), value.double(), msg=f"step {step}: {key}")
    if kind == "unified_filtration" and training:
        assert eager.skip_counter.item() >= 1


def test_non_contiguous_buffers_are_updated_right():
    """The fused finalize kernels index buffers as contiguous arrays; a strided ring buffer takes the composition."""
    x = _randn(3, 5, 4, seed=8)
    results = []
    for backend in ("triton", "reference"):
        m = normlayers.UnifiedNorm(4, window_size=3, warmup_iters=1, outlier_filtration=True)
        m.buffer_x2 = torch.ones(4, 3).T  # (M, C) with strides (1, M)
        with normlayers.backend(backend):
            for _ in range(4):
                y = m(x.requires_grad_())
                y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad, m.buffer_x2.clone(), m.running_var.clone()))
        x.grad = None
    for a, b in zip(*results):
        assert_close(a, b)
