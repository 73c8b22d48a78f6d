"""The channels-first norm kernels (LayerNorm2d, RMSNorm2d) against an fp64 autograd reference and against timm's math
done by PyTorch in the input's dtype, forward and backward.

Runs the launchers directly, so the chunked loops (C wider than one block) are reached on small C through
``max_block_c``. The expected values are timm's formulas written here with torch ops (``F.layer_norm`` on the
channels-last view; the mean square over dim 1), not our reference, so the reference is checked separately.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as TF

from normlayers.kernels import channel_norms as K
from normlayers.testing import NCHW_LAYOUTS, assert_close, assert_lowprec_close, nchw_input

EPS = 1e-6
KINDS = ["layer", "rms"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (N, C, H, W, max_block_c): C = 1, odd C and odd pixel counts, one pixel, several tiles per backward program
# (4 programs on CPU), and C wider than one block (the chunked loops: 37 channels in blocks of 8, 70 in blocks of 16).
SHAPES = [
    (3, 1, 2, 3, None),
    (2, 5, 3, 7, None),
    (1, 37, 1, 1, None),
    (5, 24, 4, 4, None),
    (2, 37, 3, 5, 8),
    (4, 70, 9, 10, 16),
]


def timm_math(kind: str, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """timm's LayerNorm2d / rms_norm2d (timm/layers/norm.py, fast_norm.py) in ``x``'s dtype."""
    if kind == "layer":
        return TF.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, EPS).permute(0, 3, 1, 2)
    y = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + EPS)
    return y * weight.reshape(1, -1, 1, 1) if weight is not None else y


def autograd_result(kind, x, weight, bias, dy, compute):
    """(y, dx, dweight, dbias) of :func:`timm_math` by autograd, computed in ``compute``."""
    leaves = [t.detach().to(compute).requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = timm_math(kind, *leaves)
    y.backward(dy.to(compute))
    return y.detach(), *(t.grad if t is not None else None for t in leaves)


def check(kind, x, weight, bias, dy, max_block_c):
    y, mean, rstd = K.channel_norm_fwd(x, weight, bias, kind, EPS, max_block_c=max_block_c)
    dx, dw, db = K.channel_norm_bwd(dy, x, weight, mean, rstd, kind, bias is not None, max_block_c=max_block_c)
    assert y.dtype == dx.dtype == x.dtype
    assert y.stride() == dx.stride() == torch.empty_like(x).stride()  # the input's memory format is kept
    ours = (y, dx, dw if weight is not None else None, db if bias is not None else None)
    truth = autograd_result(kind, x, weight, bias, dy, torch.float64)
    names = ("y", "dx", "dweight", "dbias")
    if x.dtype in (torch.float32, torch.float64):
        for name, a, e in zip(names, ours, truth):
            if e is not None:
                assert_close(a, e, msg=f"{kind} {name}")
        return
    lowprec = autograd_result(kind, x, weight, bias, dy, x.dtype)
    for name, a, t, e in zip(names, ours, lowprec, truth):
        if e is not None:
            assert_lowprec_close(a, t, e, msg=f"{kind} {name}")


def make_case(kind, n, c, h, w, dtype, layout, device, *, affine=True):
    # A per-pixel offset is not drawn (nchw_input offsets planes); a per-plane offset still gives each pixel's channel
    # vector a non-zero mean, so LayerNorm's centring matters.
    x = nchw_input(n, c, h, w, dtype, layout, device, scale=2.0, plane_offset=1.0)
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1).to(dtype).to(device) if affine else None
    bias = ((torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(dtype).to(device)
            if affine and kind == "layer" else None)
    dy = nchw_input(n, c, h, w, dtype, "contiguous", device, seed=3)
    return x, weight, bias, dy


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,c,h,w,max_block_c", SHAPES)
@pytest.mark.parametrize("layout", NCHW_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward(kind, n, c, h, w, max_block_c, layout, dtype, device):
    check(kind, *make_case(kind, n, c, h, w, dtype, layout, device), max_block_c)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_block_c", [None, 8])
def test_without_affine(kind, max_block_c, device):
    check(kind, *make_case(kind, 2, 19, 3, 4, torch.float32, "channels_last", device, affine=False), max_block_c)


def test_weight_without_bias_and_fp32_weight_with_bf16_input(device):
    x, weight, _, dy = make_case("layer", 2, 19, 3, 4, torch.bfloat16, "contiguous", device)
    check("layer", x, weight.float(), None, dy, 8)


def test_dy_in_another_layout(device):
    x, weight, bias, dy = make_case("layer", 2, 19, 3, 4, torch.float32, "contiguous", device)
    check("layer", x, weight, bias, dy.contiguous(memory_format=torch.channels_last), None)
    # a dy whose pixels do not flatten to one stride (every other column of a wider tensor) is copied once
    wide = nchw_input(2, 19, 3, 8, torch.float32, "contiguous", device, seed=4)
    check("layer", x, weight, bias, wide[:, :, :, ::2], 8)


def test_large_offset_keeps_centred_variance(device):
    """Channel vectors with a mean 3000 times their spread, in fp32: the chunked pass combines centred moments
    (Chan's formula), so the result is at most twice as wrong as ATen's fp32 layer norm (where E[x²] − E[x]² would
    lose every digit of the variance)."""
    x = (nchw_input(2, 40, 3, 3, torch.float64, "contiguous", device) + 3e3).float()
    y, _, _ = K.channel_norm_fwd(x, None, None, "layer", EPS, max_block_c=8)
    assert_lowprec_close(y, timm_math("layer", x, None, None), timm_math("layer", x.double(), None, None))


def test_empty_batch(device):
    x = torch.empty(0, 4, 3, 3, device=device)
    y, mean, rstd = K.channel_norm_fwd(x, torch.ones(4, device=device), None, "layer", EPS)
    dx, dw, _ = K.channel_norm_bwd(torch.empty_like(x), x, torch.ones(4, device=device), mean, rstd, "layer", False)
    assert y.shape == dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(4, device=device))
