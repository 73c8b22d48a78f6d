"""GroupNorm's custom ops: opcheck, fp64 gradcheck and double backward, torch.compile(fullgraph=True), torch.export,
and launches per layer call (≤ 3 forward, ≤ 4 backward, ≤ 2 forward without autograd, no host sync) under the Triton
interpreter."""

from __future__ import annotations

import pytest
import torch

import normlayers
from normlayers.bench.audit import count_call_launches
from normlayers.ops import group_norm as ops
from normlayers.testing import FAST_GRADCHECK, assert_close, assert_compiled_matches_eager, nchw_input

LAYOUTS = ("contiguous", "channels_last", "channel_slice")


def _params(c, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1
    bias = torch.randn(c, generator=gen, dtype=torch.float64) * 0.5
    return weight.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_()


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, act, device):
    x = nchw_input(2, 6, 3, 4, torch.float32, layout, device, plane_offset=1.0).requires_grad_()
    weight, bias = (p.to(device) for p in _params(6))
    torch.library.opcheck(torch.ops.normlayers.group_norm_fwd.default, (x, weight, bias, 3, 1e-5, act))
    torch.library.opcheck(torch.ops.normlayers.group_norm_inference.default,
                          (x.detach(), weight.detach(), bias.detach(), 3, 1e-5, act))
    _, mean, rstd = ops.group_norm_fwd(x.detach(), weight.detach(), bias.detach(), 3, 1e-5, act)
    dy = nchw_input(2, 6, 3, 4, torch.float32, "contiguous", device, seed=2)
    torch.library.opcheck(torch.ops.normlayers.group_norm_bwd.default,
                          (dy, x.detach(), weight.detach(), None, mean, rstd, 3, act))


@pytest.mark.parametrize("layout,act", [("contiguous", None), ("channels_last", "silu"), ("contiguous", "gelu"),
                                        ("channels_last", "relu")])
def test_gradcheck_fp64(layout, act, device):
    x = nchw_input(1, 4, 2, 3, torch.float64, layout, device, plane_offset=1.0).requires_grad_()
    weight, bias = (p.to(device) for p in _params(4, torch.float64))
    # FAST_GRADCHECK: the full Jacobian takes minutes under the interpreter
    assert torch.autograd.gradcheck(ops.group_norm, (x, 2, weight, bias, 1e-5, act), **FAST_GRADCHECK)


def test_double_backward_fp64(device):
    """create_graph=True takes autograd of the reference formula (a gradient penalty works through the op)."""
    x = nchw_input(1, 4, 2, 2, torch.float64, "channels_last", device, plane_offset=1.0).requires_grad_()
    weight, bias = (p.to(device) for p in _params(4, torch.float64))
    assert torch.autograd.gradgradcheck(ops.group_norm, (x, 2, weight, bias, 1e-5, "silu"), **FAST_GRADCHECK)


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_training_step_matches_eager_and_reference(layout, act, device):
    module = normlayers.GroupNorm(2, 6, act=act).to(device)
    gen = torch.Generator().manual_seed(0)  # not the global RNG: the same parameters whatever ran before
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    assert_compiled_matches_eager(module, nchw_input(2, 6, 3, 5, torch.float32, layout, device))


def test_export(device):
    module = normlayers.GroupNorm(2, 6, act="silu").to(device).eval()
    x = nchw_input(2, 6, 3, 5, torch.float32, "channels_last", device)
    with normlayers.backend("triton"):
        exported = torch.export.export(module, (x,))
        assert any("group_norm_fwd" in str(node.target) for node in exported.graph.nodes)
        assert_close(exported.module()(x), module(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts interpreted Triton launches; on CUDA the interpreter "
                                                      "is off")
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_launches_per_call_within_budget(layout, act, affine):
    # bf16 module and input: outputs and parameter gradients in bf16 must come out of the kernels, not from casts.
    module = normlayers.GroupNorm(4, 16, affine=affine, act=act).to(torch.bfloat16)
    x = nchw_input(2, 16, 5, 6, torch.bfloat16, layout).requires_grad_()
    with normlayers.backend("triton"):
        module(x).sum().backward()  # one-time work (parameter .grad creation) not counted
        for t in (x, *module.parameters()):
            t.grad = None
        forward = count_call_launches(lambda: module(x))
        y = module(x)
        dy = torch.randn_like(y)
        backward = count_call_launches(lambda: y.backward(dy))
        module.eval()
        with torch.no_grad():
            evaluation = count_call_launches(lambda: module(x))
    for phase, count, budget in [("fwd", forward, 3), ("bwd", backward, 4 if affine else 3),
                                 ("eval fwd", evaluation, 2)]:
        assert count.triton, f"{phase}: no Triton launch seen (is the interpreter on?)"
        assert count.launches <= budget, f"{phase}: {count.launches} launches: {count.triton} + {count.aten}"
        assert not count.syncs, f"{phase}: host syncs {count.syncs}"
