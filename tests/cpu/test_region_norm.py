"""The CPU tier of RegionNorm (RN-B's closed-form Function, and RN-L around it) against the reference."""

from __future__ import annotations

import pytest
import torch

import normlayers
import normlayers.functional as NF
from normlayers.testing import nchw_input

from .conftest import assert_cpu_tier_matches_reference

C = 4


def _params(dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(0.3 * torch.randn(C, generator=gen)).to(dtype) for _ in range(4)]


def _mask(n, channels, h, w, kind="random"):
    if kind == "random":
        return torch.rand(n, channels, h, w, generator=torch.Generator().manual_seed(2)) < 0.4
    return torch.full((n, channels, h, w), kind == "all")  # one region empty


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("stats", ["batch", "instance"])
@pytest.mark.parametrize("affine", ["masked", "official"])
@pytest.mark.parametrize("eps_mode", ["official", "plain"])
def test_region_norm_matches_reference(dtype, stats, affine, eps_mode):
    x = nchw_input(3, C, 5, 6, dtype, seed=0, plane_offset=2.0)
    mask = _mask(3, 1, 5, 6)
    assert_cpu_tier_matches_reference(
        lambda t, *p: NF.region_norm(t, mask, *p, stats=stats, eps_mode=eps_mode, affine=affine),
        [x, *_params(dtype)])


@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
@pytest.mark.parametrize("mask", [_mask(2, C, 3, 4), _mask(2, 1, 7, 9), _mask(2, 1, 5, 6, "all"),
                                  _mask(2, 1, 5, 6, "none"), (_mask(2, 1, 5, 6) * 3.5)],
                         ids=["per-channel", "resized", "all-hole", "no-hole", "numeric"])
def test_layouts_and_masks(layout, mask):
    x = nchw_input(2, C, 5, 6, torch.float32, layout, seed=3)
    assert_cpu_tier_matches_reference(lambda t, *p: NF.region_norm(t, mask, *p), [x, *_params(torch.float32)])
    assert_cpu_tier_matches_reference(lambda t: NF.region_norm(t, mask, stats="instance"), [x])  # no affine


@pytest.mark.parametrize("stats", ["batch", "instance"])
def test_learnable_region_norm_matches_reference(stats):
    layer = normlayers.LearnableRegionNorm2d(C, threshold=0.5, kernel_size=3)
    # seeded: drawn from the global generator, the weights depended on the tests run before in the worker (an unseeded
    # draw once put the CPU tier 1.5e-5 from the reference, 1.5x fp32's atol; seeds 0-29 are all within it)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    sa = layer.sa
    weights = [sa.conv1.weight, sa.gamma_conv.weight, sa.gamma_conv.bias, sa.beta_conv.weight, sa.beta_conv.bias]
    x = nchw_input(2, C, 6, 5, torch.float32, seed=4)
    assert_cpu_tier_matches_reference(
        lambda t, *w: NF.learnable_region_norm(t, *w, threshold=0.5, stats=stats), [x, *(w.detach() for w in weights)])


@pytest.mark.parametrize("affine", ["masked", "official"])
def test_gradcheck_fp64(affine):
    x = nchw_input(2, 3, 3, 4, torch.float64, seed=5).requires_grad_()
    mask = _mask(2, 1, 3, 4)
    params = [(0.3 * torch.randn(3, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    for stats in ("batch", "instance"):
        def fn(t, *p):
            return NF.region_norm(t, mask, *p, stats=stats, affine=affine)

        assert torch.autograd.gradcheck(fn, (x, *params))
        assert torch.autograd.gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize("stats", ["batch", "instance"])
def test_compiles_fullgraph(stats):
    torch._dynamo.reset()
    x = nchw_input(2, C, 5, 6, torch.float32, seed=6)
    mask = _mask(2, 1, 5, 6)
    params = _params(torch.float32)

    def step(t, *p):
        return NF.region_norm(t, mask, *p, stats=stats).square().sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [x.clone().requires_grad_(), *(p.clone().requires_grad_() for p in params)]
        loss = fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
