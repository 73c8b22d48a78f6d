"""The channels-first norms' custom ops (opcheck, fp64 gradcheck, compile, export) and the two layers on them against
the reference backend."""

from __future__ import annotations

import pytest
import torch

import normlayers
from normlayers.ops import channel_norms as ops
from normlayers.testing import NCHW_LAYOUTS, assert_close, assert_compiled_matches_eager, nchw_input

KINDS = ("layer", "rms")


def _params(c, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1
    bias = torch.randn(c, generator=gen, dtype=torch.float64) * 0.5
    return weight.to(dtype).to(device).requires_grad_(), bias.to(dtype).to(device).requires_grad_()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", NCHW_LAYOUTS)
def test_opcheck(kind, layout, device):
    x = nchw_input(2, 5, 3, 4, torch.float32, layout, device).requires_grad_()
    weight, bias = _params(5, device)
    bias = bias if kind == "layer" else None
    torch.library.opcheck(torch.ops.normlayers.channel_norm_fwd.default, (x, weight, bias, kind, 1e-6))
    _, mean, rstd = ops.channel_norm_fwd(x.detach(), weight.detach(), bias, kind, 1e-6)
    dy = nchw_input(2, 5, 3, 4, torch.float32, "contiguous", device, seed=2)
    torch.library.opcheck(torch.ops.normlayers.channel_norm_bwd.default,
                          (dy, x.detach(), weight.detach(), mean, rstd, kind, bias is not None))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_ops_fp64(kind, layout, device):
    x = nchw_input(2, 3, 2, 3, torch.float64, layout, device, plane_offset=1.0).requires_grad_()
    weight, bias = _params(3, device, torch.float64)
    assert torch.autograd.gradcheck(ops.channel_norm, (x, weight, bias if kind == "layer" else None, kind, 1e-6))


@pytest.mark.parametrize("cls", [normlayers.LayerNorm2d, normlayers.RMSNorm2d])
@pytest.mark.parametrize("layout", NCHW_LAYOUTS)
def test_compiled_training_step_matches_eager_and_reference(cls, layout, device):
    module = cls(6).to(device)
    gen = torch.Generator().manual_seed(0)  # not the global RNG: the same parameters whatever ran before
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    assert_compiled_matches_eager(module, nchw_input(2, 6, 3, 5, torch.float32, layout, device))


@pytest.mark.parametrize("cls", [normlayers.LayerNorm2d, normlayers.RMSNorm2d])
def test_export(cls, device):
    module = cls(6).to(device).eval()
    x = nchw_input(2, 6, 3, 5, torch.float32, "channels_last", device)
    with normlayers.backend("triton"):
        exported = torch.export.export(module, (x,))
        assert any("channel_norm_fwd" in str(node.target) for node in exported.graph.nodes)
        assert_close(exported.module()(x), module(x))
