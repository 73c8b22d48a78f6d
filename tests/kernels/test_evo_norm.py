"""EvoNorm's fused plane kernel (both modes) against autograd of the same expression in torch, forward and backward.

Runs the launchers directly, so the chunked backward loop (planes wider than one block) is reached on small planes
through ``max_block_hw``. Expected values: the torch expression with ``torch.maximum`` / ``torch.sigmoid`` in fp64
(the truth) and, for fp16/bf16 inputs, in the input's dtype (PyTorch's own low-precision error).
"""

from __future__ import annotations

import pytest
import torch

from normlayers.kernels import evo_norm as K
from normlayers.testing import NCHW_LAYOUTS, PLANE_KERNEL_SHAPES, assert_close, assert_lowprec_close, nchw_input

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Contiguous 7×7 planes: the flat tile (tests/kernels/test_channel_stats.py).
SHAPES = list(PLANE_KERNEL_SHAPES) + [(2, 24, 7, 7, None)]
LAYOUTS = list(NCHW_LAYOUTS)


def _input(n, c, h, w, dtype, layout, device, *, seed=0):
    return nchw_input(n, c, h, w, dtype, layout, device, seed=seed, scale=1.5)


def _coefficients(mode, n, c, stats, device):
    """Per-plane coefficients; for MAX_DIV, ``left`` and ``offset`` positive and of the size of ``slope·x`` so that
    both sides of the max win somewhere in every plane."""
    gen = torch.Generator().manual_seed(5)
    out = {name: torch.randn(n, c, generator=gen, dtype=torch.float64) for name in K.MODE_COEFFICIENTS[mode]}
    if mode == K.MODE_MAX_DIV:
        out["left"] = out["left"].abs() + 0.5
        out["offset"] = out["offset"].abs() + 0.5
        out["slope"] = out["slope"] * 0.5
    return {name: t.to(stats).to(device) for name, t in out.items()}


def _without_shift(coefficients):
    """The backward's coefficients: the forward's less ``shift`` (whose gradient is Σ dy)."""
    return {name: t for name, t in coefficients.items() if name != "shift"}


def _torch_expression(mode, x, coefficients):
    per_plane = {name: t[:, :, None, None] for name, t in coefficients.items()}
    if mode == K.MODE_SWISH:
        f = x * torch.sigmoid(per_plane["slope"] * x)
    else:
        f = x / torch.maximum(per_plane["left"], per_plane["slope"] * x + per_plane["offset"])
    return f * per_plane["scale"] + per_plane["shift"]


@pytest.mark.parametrize("mode", [K.MODE_SWISH, K.MODE_MAX_DIV], ids=["swish", "max_div"])
@pytest.mark.parametrize("n,c,h,w,max_block_hw", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward(mode, n, c, h, w, max_block_hw, layout, dtype, device):
    x = _input(n, c, h, w, dtype, layout, device)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    coefficients = _coefficients(mode, n, c, stats, device)
    dy = _input(n, c, h, w, dtype, "contiguous", device, seed=3)

    y = K.evo_plane_fwd(x, mode, max_block_hw=max_block_hw, **coefficients)
    dx, *dcoefficients = K.evo_plane_bwd(dy, x, mode, max_block_hw=max_block_hw, **_without_shift(coefficients))
    assert y.dtype == dx.dtype == dtype
    assert y.stride() == dx.stride() == torch.empty_like(x).stride()  # the input's memory format is kept
    assert all(g.dtype == stats and g.shape == (n, c) for g in dcoefficients)

    def autograd_result(compute):
        leaf = x.detach().to(compute).requires_grad_()
        coeffs = {name: t.detach().to(compute).requires_grad_() for name, t in coefficients.items()}
        out = _torch_expression(mode, leaf, coeffs)
        out.backward(dy.to(compute))
        return out.detach(), leaf.grad, *(coeffs[name].grad for name in K.MODE_COEFFICIENTS[mode])

    truth = autograd_result(torch.float64)
    if dtype in (torch.float16, torch.bfloat16):
        lowprec = autograd_result(dtype)
        assert_lowprec_close(y, lowprec[0], truth[0], msg="y")
        assert_lowprec_close(dx, lowprec[1], truth[1], msg="dx")
    else:
        assert_close(y, truth[0], msg="y")
        assert_close(dx, truth[1], msg="dx")
    # The coefficient gradients are fp32 sums of products of (exact) low-precision values: fp32 tolerance.
    for name, actual, expected in zip(K.MODE_COEFFICIENTS[mode], dcoefficients, truth[2:]):
        assert_close(actual, expected, msg=f"d{name}")


def test_max_div_tie_splits_the_gradient_half_half(device):
    # left = 1.5 = slope·x + offset at x = 1 (slope 1, offset 0.5), exact in binary; x = 3 has no tie.
    x = torch.tensor([1.0, 3.0, 1.0, 3.0], dtype=torch.float64).view(1, 1, 2, 2).to(device)
    coefficients = {name: torch.full((1, 1), value, dtype=torch.float64, device=device)
                    for name, value in [("left", 1.5), ("slope", 1.0), ("offset", 0.5), ("scale", 1.0), ("shift", 0.0)]}
    dx, dleft, dslope, doffset, _, _ = K.evo_plane_bwd(torch.ones_like(x), x, K.MODE_MAX_DIV,
                                                       **_without_shift(coefficients))
    d_denominator_at_tie = -1.0 / 1.5**2  # d(x/m)/dm at x = 1, m = 1.5
    d_right_at_3 = -3.0 / 3.5**2
    assert_close(dleft, torch.full_like(dleft, 2 * 0.5 * d_denominator_at_tie))
    assert_close(doffset, torch.full_like(doffset, 2 * 0.5 * d_denominator_at_tie + 2 * d_right_at_3))
    assert_close(dslope, torch.full_like(dslope, 2 * 0.5 * d_denominator_at_tie * 1.0 + 2 * d_right_at_3 * 3.0))
    expected_dx = torch.tensor([1 / 1.5 + 0.5 * d_denominator_at_tie, 1 / 3.5 + d_right_at_3] * 2,
                               dtype=torch.float64).view(1, 1, 2, 2)
    assert_close(dx, expected_dx.to(device))


def test_backward_is_deterministic(device):
    x = _input(2, 8, 9, 9, torch.float32, "channels_last", device)
    coefficients = _coefficients(K.MODE_MAX_DIV, 2, 8, torch.float32, device)
    dy = torch.randn_like(x)
    first = K.evo_plane_bwd(dy, x, K.MODE_MAX_DIV, max_block_hw=16, **_without_shift(coefficients))
    second = K.evo_plane_bwd(dy, x, K.MODE_MAX_DIV, max_block_hw=16, **_without_shift(coefficients))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_planes(device):
    x = torch.empty(2, 3, 0, 4, device=device)
    coefficients = _coefficients(K.MODE_SWISH, 2, 3, torch.float32, device)
    assert K.evo_plane_fwd(x, K.MODE_SWISH, **coefficients).shape == x.shape
    dx, *grads = K.evo_plane_bwd(x, x, K.MODE_SWISH, **_without_shift(coefficients))
    assert dx.shape == x.shape and all(torch.equal(g, torch.zeros(2, 3, device=device)) for g in grads)


def test_wrong_coefficients_are_refused(device):
    x = torch.randn(1, 2, 3, 3, device=device)
    coefficients = _coefficients(K.MODE_SWISH, 1, 2, torch.float32, device)
    with pytest.raises(ValueError, match="takes coefficients"):
        K.evo_plane_fwd(x, K.MODE_MAX_DIV, **coefficients)
