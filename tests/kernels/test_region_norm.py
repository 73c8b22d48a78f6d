"""RegionNorm's kernels against torch's own ops, forward and backward: the masked region moments
(``kernels/region_norm.py``) and the two-region plane affine (``plane_affine`` with a hole mask, ``REGIONS = 2``).

Runs the launchers directly, so the chunked path (planes wider than one block) is reached on small planes through
``max_block_hw``. The expected values are the defining sums written with torch ops on an explicit 0/1 weight, and
autograd of them, in fp64 (the reference) and, for fp16/bf16 inputs, in the input's dtype (PyTorch's own error).
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from normlayers.kernels import channel_stats as KC
from normlayers.kernels import region_norm as K
from normlayers.testing import PLANE_KERNEL_SHAPES, assert_close, assert_lowprec_close, nchw_input

SHAPES = list(PLANE_KERNEL_SHAPES)
LOWPREC = [torch.float16, torch.bfloat16]


def make_input(n, c, h, w, dtype, layout="contiguous", *, seed=0):
    return nchw_input(n, c, h, w, dtype, layout, seed=seed, plane_offset=3.0)


def make_mask(n, c, h, w, kind, *, seed=1):
    """A bool hole mask of ``(n, 1 or c, h, w)``: ``kind`` is ``"random"`` / ``"random_c"`` (one or c channels),
    ``"all"`` (every value a hole), ``"none"``, ``"one"`` (a single hole pixel per sample)."""
    gen = torch.Generator().manual_seed(seed)
    channels = c if kind == "random_c" else 1
    if kind in ("random", "random_c"):
        return torch.rand(n, channels, h, w, generator=gen) < 0.4
    mask = torch.full((n, 1, h, w), kind == "all")
    if kind == "one":
        mask[:, :, h // 2, w - 1] = True
    return mask


def torch_moments(x, hole, center):
    """(count, Σ w(x − c), Σ w(x − c)²) per plane and region from an explicit 0/1 weight, in x's dtype."""
    w_hole = hole.expand(x.shape).to(x.dtype)
    outs = []
    for r, w in enumerate((w_hole, 1 - w_hole)):
        d = x - center[:, :, r, None, None]
        outs.append((w.sum((2, 3)), (w * d).sum((2, 3)), (w * d * d).sum((2, 3))))
    return tuple(torch.stack([a, b], dim=-1) for a, b in zip(*outs))


def check(actual, expected64, lowprec: Optional[torch.Tensor], msg: str):
    if lowprec is None:
        assert_close(actual, expected64, msg=msg)
    else:
        assert_lowprec_close(actual, lowprec, expected64, msg=msg)


def _run_moments(x, hole, max_block_hw, seed=2):
    n, c = x.shape[:2]
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    center, dfirst, dsecond = (torch.randn(n, c, 2, generator=gen, dtype=torch.float64) for _ in range(3))
    count, first, second = K.region_moments_fwd(x, hole, center.to(stats), max_block_hw=max_block_hw)
    assert count.dtype == first.dtype == second.dtype == stats and count.shape == (n, c, 2)
    exp_count, exp_first, exp_second = torch_moments(x.double(), hole, center)
    assert torch.equal(count.double(), exp_count), "count"
    # Statistics are fp32 whatever the input (the centre too: rounded to fp32 before the kernel sees it).
    c32 = center.to(stats).double()
    _, exp_first, exp_second = torch_moments(x.double(), hole, c32)
    assert_close(first, exp_first, msg="first")
    assert_close(second, exp_second, msg="second")

    dx, dcenter = K.region_moments_bwd(x, hole, center.to(stats), dfirst.to(stats), dsecond.to(stats),
                                       max_block_hw=max_block_hw)
    assert dx.dtype == x.dtype and dx.stride() == torch.empty_like(x).stride() and dcenter.dtype == stats

    def autograd(compute):
        leaf = x.detach().to(compute).clone().requires_grad_()
        centre = c32.to(compute).detach().clone().requires_grad_()
        _, f, s = torch_moments(leaf, hole, centre)
        torch.autograd.backward([f, s], [dfirst.to(stats).to(compute), dsecond.to(stats).to(compute)])
        return leaf.grad, centre.grad

    dx64, dcenter64 = autograd(torch.float64)
    check(dx, dx64, autograd(x.dtype)[0].to(x.dtype) if x.dtype in LOWPREC else None, "dx")
    assert_close(dcenter, dcenter64, msg="dcenter")


@pytest.mark.parametrize("n,c,h,w,max_block_hw", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOWPREC])
def test_region_moments_forward_backward(n, c, h, w, max_block_hw, dtype):
    _run_moments(make_input(n, c, h, w, dtype), make_mask(n, c, h, w, "random"), max_block_hw)


def _run_affine(x, hole, max_block_hw, seed=3):
    n, c = x.shape[:2]
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    center, scale, shift = (torch.randn(n, c, 2, generator=gen, dtype=torch.float64).to(stats) for _ in range(3))
    y = KC.plane_affine_fwd(x, center, scale, shift, hole_mask=hole, max_block_hw=max_block_hw)
    assert y.dtype == x.dtype and y.stride() == torch.empty_like(x).stride()

    def torch_affine(xx, cc, aa, bb):
        per = [(xx - cc[:, :, r, None, None]) * aa[:, :, r, None, None] + bb[:, :, r, None, None] for r in (0, 1)]
        return torch.where(hole, per[0], per[1])

    def autograd(compute):
        leaves = [t.detach().to(compute).clone().requires_grad_() for t in (x, center, scale, shift)]
        out = torch_affine(*leaves)
        out.backward(dy.to(compute))
        return out.detach(), [leaf.grad for leaf in leaves]

    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    y64, grads64 = autograd(torch.float64)
    lowprec = x.dtype in LOWPREC
    y_low, grads_low = autograd(x.dtype) if lowprec else (None, [None] * 4)
    check(y, y64, y_low.to(x.dtype) if lowprec else None, "y")
    dx, dscale, dshift = KC.plane_affine_bwd(dy, x, center, scale, hole_mask=hole, max_block_hw=max_block_hw)
    assert dx.dtype == x.dtype and dscale.shape == dshift.shape == (n, c, 2)
    check(dx, grads64[0], grads_low[0].to(x.dtype) if lowprec else None, "dx")
    assert_close(dscale, grads64[2], msg="dscale")
    assert_close(dshift, grads64[3], msg="dshift")
    assert_close(-scale * dshift, grads64[1], msg="dcenter = -scale * dshift")


@pytest.mark.parametrize("n,c,h,w,max_block_hw", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOWPREC])
def test_region_affine_forward_backward(n, c, h, w, max_block_hw, dtype):
    _run_affine(make_input(n, c, h, w, dtype), make_mask(n, c, h, w, "random"), max_block_hw)


@pytest.mark.parametrize("run", [_run_moments, _run_affine], ids=["region_moments", "region_affine"])
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
@pytest.mark.parametrize("kind", ["random", "random_c", "all", "none", "one"])
def test_layouts_and_masks(run, layout, kind):
    """Strided inputs; one-channel, per-channel, all-hole, hole-free and one-pixel masks; chunked planes."""
    n, c, h, w = 2, 3, 5, 7
    run(make_input(n, c, h, w, torch.float32, layout), make_mask(n, c, h, w, kind), 8)


@pytest.mark.parametrize("run", [_run_moments, _run_affine], ids=["region_moments", "region_affine"])
def test_channels_last_mask(run):
    x = make_input(2, 3, 5, 7, torch.float32)
    run(x, make_mask(2, 3, 5, 7, "random_c").contiguous(memory_format=torch.channels_last), 8)


def test_uint8_mask_is_read_like_bool():
    x = make_input(2, 3, 4, 5, torch.float32)
    hole = make_mask(2, 3, 4, 5, "random")
    center = torch.zeros(2, 3, 2)
    for a, b in zip(K.region_moments_fwd(x, hole, center), K.region_moments_fwd(x, hole.to(torch.uint8), center)):
        assert torch.equal(a, b)


def test_empty_planes():
    x = torch.empty(2, 3, 0, 4)
    hole = torch.empty(2, 1, 0, 4, dtype=torch.bool)
    count, first, second = K.region_moments_fwd(x, hole, torch.zeros(2, 3, 2))
    assert not count.any() and not first.any() and not second.any()
    assert KC.plane_affine_fwd(x, *(torch.zeros(2, 3, 2) for _ in range(3)), hole_mask=hole).shape == x.shape


def _region_moments64(x: torch.Tensor, hole: torch.Tensor, dims: tuple[int, ...]):
    """Per region (hole, valid) ``(count, mean, biased var)`` over ``dims`` in fp64, by selection."""
    x64, inside = x.double(), hole.expand(x.shape)
    result = []
    for region in (inside, ~inside):
        count = region.sum(dims).double()
        mean = torch.where(region, x64, 0.0).sum(dims) / count.clamp(min=1)
        centred = x64 - (mean[..., None, None] if dims == (2, 3) else mean.view(1, -1, 1, 1))
        var = torch.where(region, centred, 0.0).square().sum(dims) / count.clamp(min=1)
        result.append((count, mean, var))
    return result


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("max_block_hw", [None, 4])
def test_fused_statistics_across_chunks_and_magnitudes(batch, layout, max_block_hw):
    # Planes of very different magnitudes (1, 1e30, 1e-30), and within one plane a later chunk 1e25 times larger than
    # the first (the running sums rescale by a power of two): region_stats + region_finalize give every region's
    # count, mean and variance as fp64 does, where fp32 squares overflow and underflow.
    x = make_input(3, 2, 3, 5, torch.float32, layout)
    with torch.no_grad():
        x[1] *= 1e30
        x[2] *= 1e-30
        x[0, 0, 2:] *= 1e25
    hole = make_mask(3, 2, 3, 5, "random")
    # eps = 1e-70 is 0 in fp32: rstd = 1/sqrt(var_s) exactly, which gives the variance back.
    cap = 2.0 ** 126
    stats = K.region_finalize(K.region_stats(x, hole, cap, max_block_hw=max_block_hw), batch=batch, eps=1e-70,
                              official_eps=False)
    expected = _region_moments64(x, hole, (0, 2, 3) if batch else (2, 3))
    for region, (count, mean, var) in enumerate(expected):
        got = stats[..., region, :].double()
        scale = got[..., 1]
        assert torch.equal(got[..., 0], count)
        spread = var > 0  # relative comparisons: the magnitudes span 1e-30 … 1e30
        std = var[spread].sqrt()
        assert_close(((got[..., 2] / scale)[spread] - mean[spread]) / std, torch.zeros_like(std), dtype=torch.float32)
        got_var = 1 / (got[..., 3] * scale).square()
        assert_close(got_var[spread] / var[spread], torch.ones_like(std), dtype=torch.float32)
