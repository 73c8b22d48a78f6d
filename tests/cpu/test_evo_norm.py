"""The CPU tier of EvoNorm (closed-form B and S Functions) against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normlayers.functional as NF
from normlayers.cpu import evo_norm as cpu_evo
from normlayers.testing import assert_lowprec_close, nchw_input

from .conftest import assert_cpu_tier_matches_reference, run_backend

C = 8
B_VARIANTS = ["b0", "b1", "b2"]
S_VARIANTS = ["s0", "s0a", "s1", "s1a", "s2", "s2a"]
# (N, C, H, W): H = W = 1 (instance variance 0), one sample, an odd plane
SHAPES = [(3, C, 5, 4), (4, C, 1, 1), (1, C, 3, 7)]


def _params(variant, dtype):
    gen = torch.Generator().manual_seed(1)
    weight = (1 + 0.1 * torch.randn(C, generator=gen)).to(dtype)
    bias = (0.1 * torch.randn(C, generator=gen)).to(dtype)
    v = (1 + 0.3 * torch.randn(C, generator=gen)).to(dtype)
    return [weight, bias, v] if variant.startswith(("b0", "s0")) else [weight, bias]


def _call(variant, training=True, groups=4, **kwargs):
    fn = getattr(NF, f"evo_norm2d_{variant}")
    if variant.startswith("b"):
        return lambda x, *params_and_buffer: fn(x, params_and_buffer[-1], *params_and_buffer[:-1],
                                                training=training, **kwargs)
    return lambda x, *params: fn(x, groups, *params, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", B_VARIANTS)
def test_b_matches_reference(variant, training, shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 0.3).to(dtype)
    running_var = 1 + 0.2 * torch.rand(C, generator=torch.Generator().manual_seed(2))  # fp32, as the module keeps it
    assert_cpu_tier_matches_reference(_call(variant, training), [x, *_params(variant, dtype)], [running_var])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", S_VARIANTS)
def test_s_matches_reference(variant, shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 0.3).to(dtype)
    assert_cpu_tier_matches_reference(_call(variant), [x, *_params(variant, dtype)])
    if variant.endswith("a"):  # apply_act=False still normalizes
        assert_cpu_tier_matches_reference(_call(variant, apply_act=False), [x, *_params(variant, dtype)])


@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
@pytest.mark.parametrize("variant", ["b0", "b2", "s0", "s2"])
def test_layouts(variant, layout):
    x = nchw_input(2, C, 3, 5, torch.float32, layout)
    buffers = [torch.ones(C)] if variant.startswith("b") else []
    assert_cpu_tier_matches_reference(_call(variant), [x, *_params(variant, torch.float32)], buffers)


def test_dispatch():
    """The closed forms run for SiLU (F.silu or nn.SiLU), S0 and the identity; another activation, and synced
    statistics, run the reference."""
    x = torch.randn(2, C, 3, 3, requires_grad=True)
    assert type(NF.evo_norm2d_s1(x, 4, activation=torch.nn.SiLU()).grad_fn).__name__ == "_EvoSFunctionBackward"
    assert type(NF.evo_norm2d_b1(x, None, training=True).grad_fn).__name__ == "_EvoBFunctionBackward"
    assert not cpu_evo.supports_s("s1", F.gelu, True)
    assert cpu_evo.supports_s("s1", F.gelu, False) and cpu_evo.supports_s("s0", None, True)
    assert_cpu_tier_matches_reference(lambda x: NF.evo_norm2d_s2(x, 4, activation=F.gelu), [x])


def test_tie_splits_the_gradient_like_torch_maximum():
    """At an exact tie of B2's max the gradient is split half/half, as the reference's torch.maximum does. With
    eps = 0, x = −1 everywhere and running_var = 4 (eval): right = sqrt(mean(x²)) − x = 2 = sqrt(4) = left."""
    x = -torch.ones(2, C, 2, 2)
    assert_cpu_tier_matches_reference(_call("b2", training=False, eps=0.0), [x, *_params("b2", torch.float32)],
                                      [torch.full((C,), 4.0)])


@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "s0", "s1", "s2", "s0a"])
def test_gradcheck_fp64(variant):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 4, 3, 2, dtype=torch.float64, generator=gen) + 0.2).requires_grad_()
    params = [p.detach().to(torch.float64).requires_grad_() for p in _params(variant, torch.float64)]
    params = [p[:4].detach().requires_grad_() for p in params]
    if variant.startswith("b"):
        running_var = torch.rand(4, dtype=torch.float64, generator=gen) + 0.5
        for training in (True, False):
            def fn(x, *params, training=training):
                return getattr(NF, f"evo_norm2d_{variant}")(x, running_var.clone(), *params, training=training)
            assert torch.autograd.gradcheck(fn, (x, *params))
            assert torch.autograd.gradgradcheck(fn, (x, *params))
    else:
        def fn(x, *params):
            return getattr(NF, f"evo_norm2d_{variant}")(x, 2, *params)
        assert torch.autograd.gradcheck(fn, (x, *params))
        assert torch.autograd.gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize("variant", ["b0", "b1", "s0", "s1", "s2"])
def test_compiles_fullgraph(variant):
    torch._dynamo.reset()
    x = torch.randn(2, C, 4, 4)
    params = [p.requires_grad_() for p in _params(variant, torch.float32)]
    call = _call(variant)

    def step(x, *buffers):
        return call(x, *params, *buffers).square().sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaf = x.clone().requires_grad_()
        buffers = [torch.ones(C)] if variant.startswith("b") else []
        results.append([*torch.autograd.grad(fn(leaf, *buffers), [leaf, *params]), *buffers])
    for a, c in zip(*results):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("case", ["b0-train", "b0-eval", "s0", "s1", "s0a"])
def test_dx_of_near_constant_planes_far_from_zero(case):
    """Planes of 100 ± 1e-3 in fp32: the mean's rounding (an ulp of 100, 8e-6) is not small next to x − E[x], and a
    dx formed from x − mean alone is off by 1e-3 relative. The CPU tier's fp32 dx must be as close to the fp64
    reference as the fp32 reference's is (which removes that rounding through the gradient of the mean)."""
    variant, _, mode = case.partition("-")
    gen = torch.Generator().manual_seed(5)
    x = 100.0 + 1e-3 * torch.randn(4, C, 6, 6, generator=gen)
    params = _params(variant, torch.float32)
    buffers = [torch.full((C,), 1e-6)] if variant.startswith("b") else []  # eval: the instance side wins the max
    fn = _call(variant, training=mode != "eval")
    dx_ours = run_backend("auto", fn, [x, *params], buffers)[1]
    dx_ref32 = run_backend("reference", fn, [x, *params], buffers)[1]
    dx_ref64 = run_backend("reference", fn, [x.double(), *[p.double() for p in params]],
                           [b.double() for b in buffers])[1]
    assert_lowprec_close(dx_ours, dx_ref32, dx_ref64, atol=0.0)  # no atol: stricter than the table (dx is ~1e-2 for B0)
