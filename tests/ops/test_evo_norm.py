"""EvoNorm's custom ops (opcheck, fp64 gradcheck) and the nine EvoNorm layers on them against the reference backend.

The Triton path rebuilds every statistic from per-plane moments and fuses the nonlinearity and the affine into one
pass; the reference computes each statistic directly over the input with autograd's gradients (and is itself tested
against an independent re-derivation of timm's formulas in ``tests/nn/test_evo_norm.py``). Agreement of outputs,
input and parameter gradients and the running variance over several steps checks the plane algebra, the kernels, the
tie rule of the ``max`` and the buffer update.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import normlayers
from normlayers import functional as F
from normlayers.ops import evo_norm as ops
from normlayers.testing import (FAST_GRADCHECK, assert_close, assert_compiled_matches_eager, assert_lowprec_close,
                                run_training_steps)

CLASSES = {
    "B0": normlayers.EvoNorm2dB0, "B1": normlayers.EvoNorm2dB1, "B2": normlayers.EvoNorm2dB2,
    "S0": normlayers.EvoNorm2dS0, "S0a": normlayers.EvoNorm2dS0a, "S1": normlayers.EvoNorm2dS1,
    "S1a": normlayers.EvoNorm2dS1a, "S2": normlayers.EvoNorm2dS2, "S2a": normlayers.EvoNorm2dS2a,
}
NAMES = list(CLASSES)


def _input(shape, device, *, dtype=torch.float64, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    # A per-plane offset beside the spread, so means, variances and the two sides of the B max all matter.
    x = torch.randn(n, c + 1, h, w, generator=gen, dtype=torch.float64) * 1.5 + torch.randn(
        n, c + 1, 1, 1, generator=gen, dtype=torch.float64)
    x = x.to(dtype).to(device)
    if layout == "channels_last":
        return x[:, :c].contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":
        return x[:, 1:]
    return x[:, :c].contiguous()


def _plane_coefficients(n, c, device, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    left, offset = (torch.rand(n, c, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    slope, scale, shift = (torch.randn(n, c, generator=gen, dtype=torch.float64) for _ in range(3))
    return [t.to(dtype).to(device).requires_grad_() for t in (left, slope, offset, scale, shift)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
def test_opcheck(layout, device):
    x = _input((2, 3, 4, 5), device, dtype=torch.float32, layout=layout).requires_grad_()
    left, slope, offset, scale, shift = _plane_coefficients(2, 3, device, torch.float32)
    torch.library.opcheck(torch.ops.normlayers.plane_swish_affine.default, (x, slope, scale, shift))
    torch.library.opcheck(torch.ops.normlayers.plane_max_div_affine.default, (x, left, slope, offset, scale, shift))
    dy = torch.randn(x.shape).to(device)
    detached = [t.detach() for t in (x, left, slope, offset, scale, shift)]
    torch.library.opcheck(torch.ops.normlayers.plane_swish_affine_bwd.default,
                          (dy, detached[0], detached[2], detached[4]))
    torch.library.opcheck(torch.ops.normlayers.plane_max_div_affine_bwd.default, (dy, *detached[:-1]))


@pytest.mark.parametrize("numerator", ["NUMERATOR_IDENTITY", "NUMERATOR_SWISH", "NUMERATOR_SILU"])
@pytest.mark.parametrize("statistic", ["GROUP_VARIANCE", "GROUP_MEAN_SQUARE"])
def test_opcheck_s_pass_and_finalize_bwd(statistic, numerator, device):
    from normlayers.kernels import evo_norm as kernels

    gen = torch.Generator().manual_seed(8)
    x = _input((3, 8, 2, 3), device)
    plane_mean = torch.randn(3, 8, generator=gen).to(device)
    plane_var = (torch.rand(3, 8, generator=gen) + 0.5).to(device)
    weight, bias, v = (torch.randn(8, generator=gen).to(device) for _ in range(3))
    options = (2, 1e-3, getattr(kernels, statistic), getattr(kernels, numerator))
    for store_coefficients in (True, False):
        torch.library.opcheck(torch.ops.normlayers.evo_norm_s_pass.default,
                              (x, plane_mean, plane_var, weight, bias, v, *options, store_coefficients))
    dslope, dscale, dshift = (torch.randn(3, 8, generator=gen).to(device) for _ in range(3))
    torch.library.opcheck(torch.ops.normlayers.evo_norm_s_finalize_bwd.default,
                          (dslope, dscale, dshift, plane_mean, plane_var, weight, bias, v, *options))


@pytest.mark.parametrize("variant", ["VARIANT_B0", "VARIANT_B1", "VARIANT_B2"])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_b_finalize(variant, training, device):
    from normlayers.kernels import evo_norm as kernels

    gen = torch.Generator().manual_seed(9)
    plane_mean = torch.randn(3, 8, generator=gen).to(device)
    plane_var = (torch.rand(3, 8, generator=gen) + 0.5).to(device)
    running_var = (torch.rand(8, generator=gen) + 0.5).to(device)
    weight, bias, v = (torch.randn(8, generator=gen).to(device) for _ in range(3))
    mode = getattr(kernels, variant)
    torch.library.opcheck(torch.ops.normlayers.evo_norm_b_finalize.default,
                          (plane_mean, plane_var, running_var, weight, bias, v, training, mode, 0.1, 60, 1e-3))
    if not training:
        x = _input((3, 8, 2, 3), device)
        for store_coefficients in (True, False):
            torch.library.opcheck(torch.ops.normlayers.evo_norm_b_eval.default,
                                  (x, plane_mean, plane_var, running_var, weight, bias, v, mode, 1e-3,
                                   store_coefficients))
    var = (torch.rand(8, generator=gen) + 0.5).to(device)
    grads = [torch.randn(3, 8, generator=gen).to(device) for _ in range(5)]
    torch.library.opcheck(torch.ops.normlayers.evo_norm_b_finalize_bwd.default,
                          (*grads, plane_mean, plane_var, var, weight, bias, v, training, mode, 1e-3))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_ops_fp64(layout, device):
    # Fast gradchecks here and below: see FAST_GRADCHECK (the full ones took half of CI's time under the interpreter)
    x = _input((2, 3, 2, 3), device, layout=layout).requires_grad_()
    left, slope, offset, scale, shift = _plane_coefficients(2, 3, device)
    assert torch.autograd.gradcheck(ops.plane_swish_affine, (x, slope, scale, shift), **FAST_GRADCHECK)
    assert torch.autograd.gradcheck(ops.plane_max_div_affine, (x, left, slope, offset, scale, shift),
                                    **FAST_GRADCHECK)


# ----------------------------------------------------------------------------------------------------------------------
# The layers: backend "triton" against backend "reference"
# ----------------------------------------------------------------------------------------------------------------------

# (channels, groups, input shape): batch 1 and 2, H = W = 1, C = 48 (not a multiple of 32) with 16 groups.
SHAPES = {
    "batch2": (8, 4, (2, 8, 5, 3)),
    "batch1": (48, 16, (1, 48, 3, 3)),
    "batch2_1x1": (24, 6, (2, 24, 1, 1)),
    "batch1_1x1": (6, 3, (1, 6, 1, 1)),
}


def _module(name, channels, groups, device, *, dtype=torch.float32, **kwargs):
    torch.manual_seed(4)
    cls = CLASSES[name]
    if name.startswith("B"):
        module = cls(channels, momentum=0.3, device=device, dtype=dtype, **kwargs)
    else:
        module = cls(channels, groups=groups, device=device, dtype=dtype, **kwargs)
    with torch.no_grad():  # parameters and the running variance away from their init, so a wrong one shows
        for param_name, t in list(module.named_parameters()) + list(module.named_buffers()):
            t.copy_(t.uniform_(0.5, 1.5) if param_name.endswith(("var", "weight", "v")) else t.normal_())
    return module


def _assert_same_run(module, xs):
    ours, our_buffers = run_training_steps(copy.deepcopy(module), xs, "triton")
    theirs, their_buffers = run_training_steps(copy.deepcopy(module), xs, "reference")
    names = ["y", "dx", *(name for name, _ in module.named_parameters())]
    for step, (a_step, e_step) in enumerate(zip(ours, theirs)):
        for name, a, e in zip(names, a_step, e_step):
            assert_close(a, e, msg=f"step {step} {name}")
    for a, e in zip(our_buffers, their_buffers):
        assert_close(a, e, msg="running_var")
    return ours


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_module_matches_reference(name, case, training, device):
    channels, groups, shape = SHAPES[case]
    module = _module(name, channels, groups, device).train(training)
    xs = [_input(shape, device, dtype=torch.float32, seed=s) for s in range(3)]
    if name.startswith("B") and training and shape[0] * shape[2] * shape[3] == 1:
        # One value per channel: both backends refuse, as nn.BatchNorm2d does.
        for backend_name in ("triton", "reference"):
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                run_training_steps(copy.deepcopy(module), xs, backend_name)
        return
    # Three steps: in training the running variance moves, and the later steps of eval see the same buffer.
    _assert_same_run(module, xs)


# Every numerator branch of the S path: fused swish (SiLU given as class or name), an unfused activation, identity.
@pytest.mark.parametrize("name, act_layer", [("S1", nn.SiLU), ("S2", "swish"), ("S1", nn.GELU),
                                             ("S2", functools.partial(nn.LeakyReLU, 0.2)), ("S1", "identity")])
def test_s_activations_match_reference(name, act_layer, device):
    module = _module(name, 8, 2, device, act_layer=act_layer)
    _assert_same_run(module, [_input((2, 8, 3, 4), device, dtype=torch.float32, seed=s) for s in range(2)])


@pytest.mark.parametrize("name", NAMES)
def test_module_without_activation_matches_reference(name, device):
    # apply_act=False: affine only (the reference runs), or, for the "a" variants, normalization through plane_affine.
    module = _module(name, 8, 2, device, apply_act=False).train()
    _assert_same_run(module, [_input((2, 8, 3, 4), device, dtype=torch.float32, seed=s) for s in range(2)])


def test_b0_tie_gradient_matches_reference(device):
    """An exact tie on both backends (spec §4.5): constant planes (instance variance 0), v = 0 and, in eval, a running
    variance of 0, so left = sqrt(eps) = 0·x + sqrt(0 + eps) = right in every plane. Only v's gradient sees the tie
    (left depends on the buffer alone, and right on x only through v·x): with y = x / m, m = sqrt(eps) = 0.5,
    PyTorch's half/half rule gives dv = Σ ½·(−x/m²)·x = −2·x²·8 per channel over 8 values; all to the left side
    would give 0 and all to the right twice that."""
    module = normlayers.EvoNorm2dB0(3, eps=0.25, device=device, dtype=torch.float64).eval()
    with torch.no_grad():
        module.v.zero_()
        module.running_var.zero_()
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    _assert_same_run(module, [x.to(device)])
    with normlayers.backend("triton"):
        module(x.to(device)).sum().backward()
    assert_close(module.v.grad.cpu(), -16 * torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).square())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
def test_module_non_contiguous_input(name, layout, device):
    module = _module(name, 8, 2, device)
    x = _input((2, 8, 4, 5), device, dtype=torch.float32, layout=layout)
    ours = _assert_same_run(module, [x])
    assert ours[0][0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_low_precision_input(name, dtype, device):
    # fp16/bf16 activations, fp32 parameters and state. The fp64 truth is the reference on the fp64 input; PyTorch's
    # own low-precision error is the reference's (fp32 statistics, one rounding of the output), so ours may be at most
    # twice as far from the truth as that.
    module = _module(name, 16, 4, device)
    x = _input((2, 16, 3, 4), device).to(dtype)
    ours, our_buffers = run_training_steps(copy.deepcopy(module), [x], "triton")
    lowprec, _ = run_training_steps(copy.deepcopy(module), [x], "reference")
    truth, truth_buffers = run_training_steps(copy.deepcopy(module).double(), [x.double()], "reference")
    assert ours[0][0].dtype == ours[0][1].dtype == dtype
    # The output gradient is drawn in y's dtype, so the low-precision runs see it rounded and the truth does not: the
    # fp32 parameter gradients are held to the same rule, not to the fp32 tolerance.
    for a, t, e in zip(ours[0], lowprec[0], truth[0]):
        assert_lowprec_close(a, t, e)
    for a, e in zip(our_buffers, truth_buffers):  # the running variance: fp32 statistics of the same rounded input
        assert_close(a, e.float())


def _functional(name, training):
    fn = getattr(F, f"evo_norm2d_{name.lower()}")
    if name.startswith("B"):
        running_var = torch.rand(4, dtype=torch.float64) + 0.5
        if name == "B0":
            return lambda x, w, b, v: fn(x, running_var.clone().to(x.device), w, b, v, training=training)
        return lambda x, w, b: fn(x, running_var.clone().to(x.device), w, b, training=training)
    if name.startswith("S0"):
        return lambda x, w, b, v: fn(x, 2, w, b, v)
    return lambda x, w, b: fn(x, 2, w, b)


GRADCHECK_CASES = [(n, True) for n in NAMES] + [(n, False) for n in ("B0", "B1", "B2")]


@pytest.mark.parametrize("name, training", GRADCHECK_CASES,
                         ids=[f"{n}-{'train' if t else 'eval'}" for n, t in GRADCHECK_CASES])
def test_gradcheck_functional_fp64(name, training, device):
    gen = torch.Generator().manual_seed(3)
    x = _input((2, 4, 2, 3), device).requires_grad_()
    params = [(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
              for _ in range(3 if name in ("B0", "S0", "S0a") else 2)]
    with normlayers.backend("triton"):
        assert torch.autograd.gradcheck(_functional(name, training), (x, *params), **FAST_GRADCHECK)


@pytest.mark.parametrize("fn", [functools.partial(F.evo_norm2d_s1, activation=None),
                                functools.partial(F.evo_norm2d_s2a, apply_act=False),
                                functools.partial(F.evo_norm2d_s1, activation=torch.tanh)],
                         ids=["S1-no-activation", "S2a-no-act", "S1-tanh"])
def test_gradcheck_s_numerators_fp64(fn, device):
    # The identity numerator (its pass centred at the plane mean) and an activation that is not fused.
    gen = torch.Generator().manual_seed(10)
    x = _input((2, 4, 2, 3), device).requires_grad_()
    weight, bias = ((torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
                    for _ in range(2))
    with normlayers.backend("triton"):
        assert torch.autograd.gradcheck(lambda x, w, b: fn(x, 2, w, b), (x, weight, bias), **FAST_GRADCHECK)


@pytest.mark.parametrize("name", ["B0", "B2", "S0", "S1", "S2a"])
def test_compile_fullgraph_forward_backward(name, device):
    assert_compiled_matches_eager(_module(name, 12, 3, device), _input((2, 12, 3, 4), device, dtype=torch.float32))


@pytest.mark.parametrize("name, op", [("B1", "evo_norm_b_eval"), ("S0", "evo_norm_s_pass")])
def test_export_contains_the_fused_op(name, op, device):
    module = _module(name, 8, 2, device).eval()
    with normlayers.backend("triton"):
        exported = torch.export.export(module, (_input((2, 8, 3, 3), device, dtype=torch.float32),))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"normlayers.plane_moments.default", f"normlayers.{op}.default"} <= targets
