"""The CPU tier of Weight Standardization (F.layer_norm over each filter's fan-in; F.batch_norm with a per-filter gain)
against the reference."""

from __future__ import annotations

import pytest
import torch

import normlayers.functional as NF
from normlayers.cpu import weight_std as cpu_ws

from .conftest import assert_cpu_tier_matches_reference

VARIANTS = ["timm", "bit", "qiao", "qiao_bcn"]
SHAPES = [(8, 3, 3, 3), (5, 4), (4, 1, 1, 1), (6, 2, 1, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_weight_standardize_matches_reference(variant, shape, dtype):
    if variant.startswith("qiao") and shape[1:] == (1, 1, 1):
        pytest.skip("the unbiased variants reject a fan-in of 1 (tested in tests/nn/test_weight_std.py)")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if dtype in (torch.bfloat16, torch.float16):
        # a mean far from 0: statistics rounded to bf16/fp16 would be visibly off (they must be fp32)
        w = 1.0 + 0.05 * w
    w = w.to(dtype)
    assert_cpu_tier_matches_reference(lambda w: NF.weight_standardize(w, variant=variant), [w])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("with_gain", [True, False])
def test_scaled_weight_standardize_matches_reference(with_gain, dtype):
    gen = torch.Generator().manual_seed(1)
    w = (0.05 * torch.randn(6, 4, 3, 3, generator=gen)).to(dtype)
    gain = (1 + 0.1 * torch.randn(6, 1, 1, 1, generator=gen)).to(dtype)
    if with_gain:
        assert_cpu_tier_matches_reference(lambda w, g: NF.scaled_weight_standardize(w, g, 1.7139588594436646),
                                          [w, gain])
    else:
        assert_cpu_tier_matches_reference(lambda w: NF.scaled_weight_standardize(w, None, 1.7, eps=1e-5), [w])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inference_is_the_training_forward(dtype):
    """With no gradient to compute a bf16/fp16 weight goes through ATen's layer norm without the fp32 ones (its
    reduced-precision forward computes in fp32 and rounds once too): the same output, bit for bit."""
    w = (1.0 + 0.05 * torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(4))).to(dtype)
    with torch.no_grad():
        inference = NF.weight_standardize(w)
    training = NF.weight_standardize(w.clone().requires_grad_())
    assert torch.equal(inference, training.detach())


def test_dispatch():
    """The eps-inside variants run ATen's layer norm over the filters (batch norm with a per-filter gain), whose
    backward is ATen's; eps outside ("qiao") and a fan-in of 1 run the reference."""
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    assert "LayerNorm" in type(NF.weight_standardize(w).grad_fn.next_functions[0][0]).__name__
    gain = torch.ones(4, 1, 1, 1, requires_grad=True)
    assert "BatchNorm" in type(NF.scaled_weight_standardize(w, gain).grad_fn.next_functions[0][0]).__name__
    assert cpu_ws.supports(w, eps_inside=True)
    assert not cpu_ws.supports(w, eps_inside=False)
    assert not cpu_ws.supports(torch.randn(4, 1, 1, 1), eps_inside=True)


def test_ws_conv2d_compiles_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)

    def step(x, w):
        return NF.scaled_ws_conv2d(x, w, None, padding=1, gamma=1.7).square().sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        results.append(torch.autograd.grad(fn(*leaves), leaves))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c)


def test_plain_call_fast_path_accepts_only_valid_calls():
    """The functional's plain-call test (which skips the full checks) holds for the plain calls, and for none that
    the full checks refuse: each of those still raises its error."""
    from normlayers.functional import weight_std as F_ws

    weight = torch.randn(4, 3, 3, 3)
    assert F_ws._is_plain_ws_call(weight, None, 0) and F_ws._is_plain_ws_call(weight, 1e-5, 1)
    for (w, eps, correction), error in (((torch.randn(4), 1e-5, 0), ValueError),
                                        ((torch.randn(4, 1), 1e-5, 1), ValueError),
                                        ((weight, 0.0, 0), ValueError), ((weight, float("inf"), 0), ValueError),
                                        ((weight, float("nan"), 0), ValueError), ((weight, -1e-5, 0), ValueError),
                                        ((weight.int(), 1e-5, 0), TypeError), (([1.0], 1e-5, 0), TypeError)):
        assert not F_ws._is_plain_ws_call(w, eps, correction)
        with pytest.raises(error):
            NF.weight_standardize(w, eps, variant="qiao_bcn" if correction else "timm")
    for variant in ("tim", ["timm"]):
        with pytest.raises(ValueError, match="variant"):
            NF.weight_standardize(weight, variant=variant)
