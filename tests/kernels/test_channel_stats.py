"""Per-plane kernels (plane moments, plane affine) against torch's own ops, forward and backward.

Runs the launchers directly, so the chunked path (planes wider than one block) is reached on small planes through
``max_block_hw``. The expected values come from torch: ``torch.var_mean`` over the spatial dims and autograd of the
same expressions, in fp64 (the reference) and, for fp16/bf16 inputs, in the input's dtype (PyTorch's own error).
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from normlayers.kernels import channel_stats as K
from normlayers.testing import NCHW_LAYOUTS, PLANE_KERNEL_SHAPES, assert_close, assert_lowprec_close, nchw_input

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Contiguous 7×7 planes take the flat tile: blocks of planes read as one 16-byte aligned span, per-plane sums by a
# segmented scan (here two blocks per sample for 2-byte types, the second partial).
FLAT_SHAPES = [(2, 24, 7, 7, None)]
SHAPES = list(PLANE_KERNEL_SHAPES) + FLAT_SHAPES
LAYOUTS = list(NCHW_LAYOUTS)


def make_input(n, c, h, w, dtype, layout, device, *, seed=0):
    # A per-plane offset larger than the spread, so the centred variance matters.
    return nchw_input(n, c, h, w, dtype, layout, device, seed=seed, plane_offset=3.0)


def torch_moments(x: torch.Tensor, compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x.to(compute), dim=(2, 3), unbiased=False)
    return mean, var


def check(actual, expected64, lowprec: Optional[torch.Tensor], msg: str):
    if lowprec is None:
        assert_close(actual, expected64, msg=msg)
    else:
        assert actual.dtype == lowprec.dtype, msg
        assert_lowprec_close(actual, lowprec, expected64, msg=msg)


@pytest.mark.parametrize("n,c,h,w,max_block_hw", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plane_moments_forward_backward(n, c, h, w, max_block_hw, layout, dtype, device):
    x = make_input(n, c, h, w, dtype, layout, device)
    mean, var = K.plane_moments_fwd(x, max_block_hw=max_block_hw)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == var.dtype == stats and mean.shape == (n, c)
    mean64, var64 = torch_moments(x, torch.float64)
    # Statistics are fp32 whatever the input: compared with the fp64 truth at fp32 tolerance.
    assert_close(mean, mean64, msg="mean")
    assert_close(var, var64, msg="var")

    gen = torch.Generator().manual_seed(1)
    dmean = torch.randn(n, c, generator=gen, dtype=torch.float64)
    dvar = torch.randn(n, c, generator=gen, dtype=torch.float64)
    dx = K.plane_moments_bwd(x, mean, dmean.to(stats).to(device), dvar.to(stats).to(device), max_block_hw=max_block_hw)
    assert dx.dtype == dtype and dx.stride() == torch.empty_like(x).stride()

    def autograd_dx(compute):
        leaf = x.detach().to(compute).requires_grad_()
        m, v = torch_moments(leaf, compute)
        torch.autograd.backward([m, v], [dmean.to(compute).to(device), dvar.to(compute).to(device)])
        return leaf.grad

    lowprec = autograd_dx(dtype) if dtype in (torch.float16, torch.bfloat16) else None
    check(dx, autograd_dx(torch.float64), lowprec, "dx")


@pytest.mark.parametrize("which", ["dmean", "dvar"])
def test_plane_moments_backward_with_one_gradient(which, device):
    x = make_input(2, 3, 4, 5, torch.float64, "contiguous", device)
    mean, _ = K.plane_moments_fwd(x)
    grad = torch.randn(2, 3, dtype=torch.float64, device=device)
    dx = K.plane_moments_bwd(x, mean, grad if which == "dmean" else None, grad if which == "dvar" else None)
    leaf = x.clone().requires_grad_()
    m, v = torch_moments(leaf, torch.float64)
    (m if which == "dmean" else v).backward(grad)
    assert_close(dx, leaf.grad)


@pytest.mark.parametrize("n,c,h,w,max_block_hw", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plane_affine_forward_backward(n, c, h, w, max_block_hw, layout, dtype, device):
    x = make_input(n, c, h, w, dtype, layout, device)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(2)
    # The centre: near each plane's values (as the plane mean is), but not equal to anything computed from them.
    center64 = x.double().mean(dim=(2, 3)).cpu() + 0.1 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    scale64, shift64 = (torch.randn(n, c, generator=gen, dtype=torch.float64) for _ in range(2))
    dy = make_input(n, c, h, w, dtype, "contiguous", device, seed=3)
    center, scale, shift = (t.to(stats).to(device) for t in (center64, scale64, shift64))

    y = K.plane_affine_fwd(x, center, scale, shift, max_block_hw=max_block_hw)
    dx, dscale, dshift = K.plane_affine_bwd(dy, x, center, scale, max_block_hw=max_block_hw)
    assert y.dtype == dx.dtype == dtype and dscale.dtype == dshift.dtype == stats
    # Outputs keep the input's memory format (channels-last stays channels-last).
    assert y.stride() == dx.stride() == torch.empty_like(x).stride()

    def autograd_result(compute):
        leaves = [t.detach().to(compute).requires_grad_() for t in (x, scale, shift)]
        xs, a, b = leaves
        out = (xs - center.to(compute)[:, :, None, None]) * a[:, :, None, None] + b[:, :, None, None]
        out.backward(dy.to(compute))
        return out.detach(), *(leaf.grad for leaf in leaves)

    ref64 = autograd_result(torch.float64)
    # PyTorch's own low-precision computation: the same expression with every operand in the input's dtype.
    lowprec = autograd_result(dtype) if dtype in (torch.float16, torch.bfloat16) else None
    check(y, ref64[0], lowprec[0] if lowprec else None, "y")
    check(dx, ref64[1], lowprec[1] if lowprec else None, "dx")
    # dscale and dshift are fp32 sums of products of (exact) low-precision values: fp32 tolerance.
    assert_close(dscale, ref64[2], msg="dscale")
    assert_close(dshift, ref64[3], msg="dshift")


@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_tile_only_where_every_span_starts_aligned(dtype):
    x = make_input(2, 24, 7, 7, dtype, "contiguous", "cpu")
    tile = K.channel_tile(K.as_planes(x))
    assert tile.flat and tile.align * x.element_size() == 16 and tile.block_p * 49 % tile.align == 0
    assert tile.block_p * 49 <= tile.block_hw
    # A slice of 24 of 26 channels: its sample stride (26·49 values) must be on the 16-byte grid too (fp64 only).
    sliced = make_input(2, 24, 7, 7, dtype, "channel_slice", "cpu")
    assert K.channel_tile(K.as_planes(sliced)).flat == (26 * 49 % tile.align == 0)
    # Not for planes of a channels-last input, an output in another layout, a capped chunk (tests of the chunked
    # loop), or a kernel without a flat variant.
    last = x.contiguous(memory_format=torch.channels_last)
    assert not K.channel_tile(K.as_planes(last)).flat
    assert not K.channel_tile(K.as_planes(x), others=(K.as_planes(last),)).flat
    assert not K.channel_tile(K.as_planes(x), 64).flat
    assert not K.channel_tile(K.as_planes(x), flat=False).flat


def test_wide_plane_keeps_the_centred_variance(device):
    # A 70000-value plane (many chunks at the default cap) with a large offset (mean 100, std 1). Chan's combination
    # keeps the variance to ~1e-6 relative; fp32 E[x²] − E[x]² loses it (~1e-3 here), so the bound can fail.
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 2, 700, 100, generator=gen, dtype=torch.float64) + 100.0).float()
    _, var = K.plane_moments_fwd(x.to(device))
    var64 = x.double().var(dim=(2, 3), unbiased=False)
    assert ((var.cpu().double() - var64) / var64).abs().max().item() < 1e-5


def test_backward_is_deterministic(device):
    x = make_input(2, 8, 9, 9, torch.float32, "channels_last", device)
    center, scale = torch.randn(2, 8, device=device), torch.randn(2, 8, device=device)
    dy = torch.randn_like(x)
    first = K.plane_affine_bwd(dy, x, center, scale, max_block_hw=16)
    second = K.plane_affine_bwd(dy, x, center, scale, max_block_hw=16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_planes(device):
    x = torch.empty(2, 3, 0, 4, device=device)
    mean, var = K.plane_moments_fwd(x)
    assert mean.shape == (2, 3) and mean.isnan().all() and var.isnan().all()
    ones = torch.ones(2, 3, device=device)
    y = K.plane_affine_fwd(x, ones, ones, ones)
    dx, dscale, dshift = K.plane_affine_bwd(x, x, ones, ones)
    assert y.shape == dx.shape == x.shape
    assert torch.equal(dscale, torch.zeros(2, 3, device=device)) and torch.equal(dshift, dscale)
