"""The plane custom ops (opcheck, fp64 gradcheck) and BatchChannelNorm2d on them against the reference backend.

The BCN Triton path rebuilds every statistic from per-plane moments; the reference computes them directly over the
input (``normlayers.reference.batch_channel``, itself tested against torch's BatchNorm2d + GroupNorm). So agreement
of outputs, all gradients and the running buffers checks the plane algebra, the kernels and the buffer updates.
"""

from __future__ import annotations

import copy

import pytest
import torch

import normlayers
from normlayers import functional as F
from normlayers.ops import batch_channel as ops_bcn
from normlayers.ops import channel_stats as ops
from normlayers.testing import (FAST_GRADCHECK, assert_close, assert_compiled_matches_eager, assert_lowprec_close,
                                run_training_steps)


def _input(shape, device, *, dtype=torch.float64, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = (torch.randn(n, c + 1, h, w, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)
    if layout == "channels_last":
        return x[:, :c].contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":
        return x[:, 1:]
    return x[:, :c].contiguous()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
def test_opcheck(layout, device):
    x = _input((2, 3, 4, 5), device, dtype=torch.float32, layout=layout).requires_grad_()
    gen = torch.Generator().manual_seed(1)
    center, scale, shift = (torch.randn(2, 3, generator=gen).to(device).requires_grad_() for _ in range(3))
    torch.library.opcheck(torch.ops.normlayers.plane_moments.default, (x,))
    torch.library.opcheck(torch.ops.normlayers.plane_affine.default, (x, center, scale, shift))
    mean, _ = ops.plane_moments(x.detach())
    grad = torch.randn(2, 3, generator=gen).to(device)
    torch.library.opcheck(torch.ops.normlayers.plane_moments_bwd.default, (x.detach(), mean, grad, grad))
    torch.library.opcheck(torch.ops.normlayers.plane_moments_bwd.default, (x.detach(), mean, None, grad))
    dy = torch.randn(x.shape, generator=gen).to(device)
    torch.library.opcheck(torch.ops.normlayers.plane_affine_bwd.default,
                          (dy, x.detach(), center.detach(), scale.detach()))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_plane_moments_bwd_with_partial_dx(layout, device):
    x = _input((2, 3, 4, 5), device, dtype=torch.float32, layout=layout)
    gen = torch.Generator().manual_seed(5)
    mean, _ = ops.plane_moments(x)
    grad = torch.randn(2, 3, generator=gen).to(device)
    dx_partial = torch.randn(x.shape, generator=gen).to(device)
    torch.library.opcheck(torch.ops.normlayers.plane_moments_bwd.default, (x, mean, grad, grad, dx_partial))
    # The partial is added to the moments' gradient, elementwise.
    assert_close(ops.plane_moments_bwd(x, mean, grad, grad, dx_partial),
                 ops.plane_moments_bwd(x, mean, grad, grad) + dx_partial)


def _finalize_inputs(device, *, n=3, channels=8, groups=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(6)
    plane_mean = torch.randn(n, channels, generator=gen, dtype=dtype).to(device)
    plane_var = (torch.rand(n, channels, generator=gen, dtype=dtype) + 0.5).to(device)
    running_mean = torch.randn(channels, generator=gen, dtype=dtype).to(device)
    running_var = (torch.rand(channels, generator=gen, dtype=dtype) + 0.5).to(device)
    bn_weight, bn_bias = (torch.randn(channels, generator=gen, dtype=dtype).to(device) for _ in range(2))
    weight, bias = (torch.randn(1, groups, 1, generator=gen, dtype=dtype).to(device) for _ in range(2))
    return plane_mean, plane_var, running_mean, running_var, bn_weight, bn_bias, weight, bias


@pytest.mark.parametrize("statistics", ["BATCH_STATISTICS", "RUNNING_STATISTICS", "ESTIMATED_STATISTICS"])
def test_opcheck_batch_channel_finalize(statistics, device):
    from normlayers.kernels import batch_channel as kernels

    plane_mean, plane_var, running_mean, running_var, bn_weight, bn_bias, weight, bias = _finalize_inputs(device)
    mode = getattr(kernels, statistics)
    rate = torch.tensor(0.25, device=device)
    torch.library.opcheck(torch.ops.normlayers.batch_channel_finalize.default,
                          (plane_mean, plane_var, running_mean, running_var, torch.tensor(2, device=device), rate,
                           bn_weight, bn_bias, weight, bias, mode, 0.1, 0.0, 60, 1e-3, 1e-2, 2))
    scale, shift, mean, var = ops_bcn.batch_channel_finalize(
        plane_mean, plane_var, None, None, None, None, bn_weight, None, weight, None, kernels.BATCH_STATISTICS, 0.1,
        0.0, 60, 1e-3, 1e-2, 2)
    dscale, dshift = torch.randn_like(scale), torch.randn_like(shift)
    if mode == kernels.RUNNING_STATISTICS:
        x = _input((3, 8, 2, 3), device, dtype=torch.float32)
        for store_coefficients in (True, False):
            torch.library.opcheck(torch.ops.normlayers.batch_channel_eval.default,
                                  (x, plane_mean, plane_var, running_mean, running_var, bn_weight, bn_bias, weight,
                                   bias, 1e-3, 1e-2, 2, store_coefficients))
    torch.library.opcheck(torch.ops.normlayers.batch_channel_finalize_bwd.default,
                          (dscale, dshift, plane_mean, plane_var, mean, var, bn_weight, bn_bias, weight, bias,
                           mode == kernels.BATCH_STATISTICS, 1e-3, 1e-2, 2))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_gradcheck_batch_channel_norm_parameters_absent_fp64(momentum, device):
    # Every parameter optional: the kernels' "no parameter" branches, with and without the cumulative rate (which
    # runs the finalize kernel as one program). Fast gradchecks here and below (see FAST_GRADCHECK).
    gen = torch.Generator().manual_seed(7)
    x = _input((3, 6, 2, 3), device).requires_grad_()
    running_mean = torch.randn(6, generator=gen, dtype=torch.float64).to(device)
    running_var = (torch.rand(6, generator=gen, dtype=torch.float64) + 0.5).to(device)

    def fn(x):
        return F.batch_channel_norm(x, running_mean.clone(), running_var.clone(), training=True, momentum=momentum,
                                    num_groups=3, num_batches_tracked=torch.tensor(1, device=device))

    with normlayers.backend("triton"):
        assert torch.autograd.gradcheck(fn, (x,), **FAST_GRADCHECK)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_plane_ops_fp64(layout, device):
    x = _input((2, 3, 2, 3), device, layout=layout).requires_grad_()
    gen = torch.Generator().manual_seed(2)
    center, scale, shift = (torch.randn(2, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
                            for _ in range(3))
    # Both outputs of plane_moments, and each alone (the backward's "one gradient is None" branches).
    assert torch.autograd.gradcheck(lambda t: ops.plane_moments(t), (x,), **FAST_GRADCHECK)
    assert torch.autograd.gradcheck(lambda t: ops.plane_moments(t)[0], (x,), **FAST_GRADCHECK)
    assert torch.autograd.gradcheck(lambda t: ops.plane_moments(t)[1], (x,), **FAST_GRADCHECK)
    assert torch.autograd.gradcheck(ops.plane_affine, (x, center, scale, shift), **FAST_GRADCHECK)


@pytest.mark.parametrize("mode", ["train", "eval", "estimate"])
def test_gradcheck_batch_channel_norm_fp64(mode, device):
    gen = torch.Generator().manual_seed(3)
    x = _input((2, 4, 2, 3), device).requires_grad_()
    params = [(torch.randn(4 if i < 2 else 2, generator=gen, dtype=torch.float64) + (1.0 if i % 2 == 0 else 0.0))
              .to(device).requires_grad_() for i in range(4)]
    running_mean = torch.randn(4, generator=gen, dtype=torch.float64).to(device)
    running_var = torch.rand(4, generator=gen, dtype=torch.float64).to(device) + 0.5

    def fn(x, bn_weight, bn_bias, weight, bias):
        # Fresh buffers per call: gradcheck calls fn many times and training updates them in place. EstBN runs at
        # rate 0: its estimates are outside autograd by definition (spec §2.2), so with a moving estimate the finite
        # differences would see a dependence the gradient rightly lacks (test_module_matches_reference covers r > 0).
        return F.batch_channel_norm(x, running_mean.clone(), running_var.clone(), bn_weight, bn_bias, weight, bias,
                                    training=mode != "eval", num_groups=2, estimate=mode == "estimate",
                                    estimate_rate=0.0)

    with normlayers.backend("triton"):
        assert torch.autograd.gradcheck(fn, (x, *params), **FAST_GRADCHECK)


# ----------------------------------------------------------------------------------------------------------------------
# BatchChannelNorm2d: backend "triton" against backend "reference"
# ----------------------------------------------------------------------------------------------------------------------

# (channels, groups, input shape): batch 1 and 2, H = W = 1, C = 48 with G = 16, one value per group slice.
SHAPES = {
    "batch2": (8, 4, (2, 8, 5, 3)),
    "batch1": (48, 16, (1, 48, 3, 3)),
    "batch2_1x1": (24, 6, (2, 24, 1, 1)),
    "batch1_1x1": (6, 3, (1, 6, 1, 1)),
    "one_value_per_group_slice": (8, 8, (2, 8, 1, 1)),
}


def _module(channels, groups, device, *, estimate=False, momentum=0.1, dtype=torch.float32):
    torch.manual_seed(4)
    module = normlayers.BatchChannelNorm2d(channels, num_groups=groups, eps=1e-3, bn_eps=1e-2, momentum=momentum,
                                           estimate=estimate, estimate_rate=0.25, device=device, dtype=dtype)
    with torch.no_grad():  # parameters and estimates away from their init, so a wrong one shows
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point() and "moving_speed" not in name:
                t.copy_(t.uniform_(0.5, 1.5) if name.endswith(("var", "weight")) else t.normal_())
    return module


@pytest.mark.parametrize("mode", ["train", "eval", "estimate", "estimate_eval"])
@pytest.mark.parametrize("case", SHAPES)
def test_module_matches_reference(case, mode, device):
    channels, groups, shape = SHAPES[case]
    if mode == "train" and shape[0] * shape[2] * shape[3] == 1:
        # One value per channel: both backends refuse, as nn.BatchNorm2d does.
        module = _module(channels, groups, device)
        for name in ("triton", "reference"):
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                run_training_steps(module, [_input(shape, device, dtype=torch.float32, seed=0)], name)
        return
    module = _module(channels, groups, device, estimate=mode.startswith("estimate"))
    module.train(not mode.endswith("eval"))
    xs = [_input(shape, device, dtype=torch.float32, seed=s) for s in range(3)]
    ours, our_buffers = run_training_steps(copy.deepcopy(module), xs, "triton")
    theirs, their_buffers = run_training_steps(copy.deepcopy(module), xs, "reference")
    for step, (a_step, e_step) in enumerate(zip(ours, theirs)):
        for name, a, e in zip(["y", "dx", "dbn_weight", "dbn_bias", "dweight", "dbias"], a_step, e_step):
            assert_close(a, e, msg=f"step {step} {name}")
    for a, e in zip(our_buffers, their_buffers):
        if a.is_floating_point():
            assert_close(a, e)
        else:
            assert torch.equal(a, e)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_statistics_after_several_steps(momentum, device):
    module = _module(12, 3, device, momentum=momentum)
    xs = [_input((2, 12, 4, 3), device, dtype=torch.float32, seed=s) for s in range(4)]
    _, ours = run_training_steps(copy.deepcopy(module), xs, "triton")
    _, theirs = run_training_steps(copy.deepcopy(module), xs, "reference")
    assert ours[2].item() == theirs[2].item() == 4  # num_batches_tracked
    assert_close(ours[0], theirs[0], msg="running_mean")
    assert_close(ours[1], theirs[1], msg="running_var")


@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
def test_module_non_contiguous_input(layout, device):
    module = _module(8, 2, device)
    x = _input((2, 8, 4, 5), device, dtype=torch.float32, layout=layout)
    ours, _ = run_training_steps(copy.deepcopy(module), [x], "triton")
    theirs, _ = run_training_steps(copy.deepcopy(module), [x], "reference")
    y = ours[0][0]
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    for a, e in zip(ours[0], theirs[0]):
        assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_low_precision_input(dtype, device):
    # fp16/bf16 activations, fp32 parameters and state (the usual mixed-precision set-up). The fp64 truth is the
    # reference on the fp64 input; PyTorch's own low-precision error is the reference's (fp32 statistics, one rounding
    # of the output), so ours may be at most twice as far from the truth as that.
    module = _module(16, 4, device)
    x64 = _input((2, 16, 3, 4), device)
    x = x64.to(dtype)
    ours, _ = run_training_steps(copy.deepcopy(module), [x], "triton")
    lowprec, _ = run_training_steps(copy.deepcopy(module), [x], "reference")
    truth, _ = run_training_steps(copy.deepcopy(module).double(), [x.double()], "reference")
    assert ours[0][0].dtype == ours[0][1].dtype == dtype
    # The output gradient is drawn in y's dtype, so the low-precision runs see it rounded and the truth does not: the
    # fp32 parameter gradients are held to the same rule, not to the fp32 tolerance.
    for name, a, t, e in zip(["y", "dx", "dbn_weight", "dbn_bias", "dweight", "dbias"], ours[0], lowprec[0], truth[0]):
        assert_lowprec_close(a, t, e, msg=name)


def test_compile_fullgraph_forward_backward(device):
    assert_compiled_matches_eager(_module(12, 3, device), _input((2, 12, 3, 4), device, dtype=torch.float32))


def test_export_contains_the_plane_ops(device):
    module = _module(8, 2, device).eval()
    with normlayers.backend("triton"):
        exported = torch.export.export(module, (_input((2, 8, 3, 3), device, dtype=torch.float32),))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"normlayers.plane_moments.default", "normlayers.batch_channel_eval.default"} <= targets
