"""The GroupNorm kernels (with each fused activation) against an fp64 autograd result of torch's own
``F.group_norm`` followed by the activation, and, in fp16/bf16, against PyTorch's error in that dtype; forward and
backward, on edge shapes, in NCHW, channels-last and channel slices, with 0-3 spatial dims.

Runs the launchers directly, so the split reductions (``hw_splits``) and the chunked loops (``max_block_hw``) are
reached on small shapes.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as TF

from normlayers.kernels import group_norm as K
from normlayers.reference.group_norm import ACTIVATIONS
from normlayers.testing import assert_close, assert_lowprec_close

EPS = 1e-5
ACTS = [None, "silu", "gelu", "relu"]
LAYOUTS = ("contiguous", "channels_last", "channel_slice")

# (N, C, spatial, G, hw_splits, max_block_hw): one channel per group, one group (timm's GroupNorm1), C == G, 1x1
# planes, one sample with odd planes, planes wider than a block split over several programs, 1-D, 3-D, no spatial
# dims.
SHAPES = [
    (2, 4, (3, 5), 4, None, None),
    (2, 6, (3, 5), 1, 2, None),
    (3, 3, (2, 3), 3, None, None),
    (2, 8, (1, 1), 2, None, None),
    (1, 6, (5, 7), 3, None, None),
    (2, 4, (9, 10), 2, 3, 16),
    (2, 6, (7,), 3, 2, 4),
    (2, 4, (2, 3, 4), 2, 2, 8),
    (3, 8, (), 4, None, None),
]


def make_input(n: int, c: int, spatial: tuple[int, ...], dtype: torch.dtype, layout: str, *, seed: int = 0,
               offset: float = 1.0) -> torch.Tensor:
    """``(n, c, *spatial)``: 2·N(0, 1) plus a per-group-ish offset, drawn in fp64 and rounded to ``dtype``, in
    ``layout`` (a channel slice of a wider tensor for ``"channel_slice"``)."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(n, c + 2, *spatial, generator=gen, dtype=torch.float64) * 2
    wide = wide + offset * torch.randn(n, c + 2, *([1] * len(spatial)), generator=gen, dtype=torch.float64)
    wide = wide.to(dtype)
    if layout == "channel_slice":
        return wide[:, 1:c + 1]
    x = wide[:, :c].contiguous()
    if layout == "channels_last" and len(spatial) in (2, 3):
        return x.contiguous(memory_format=torch.channels_last if len(spatial) == 2 else torch.channels_last_3d)
    return x


def torch_math(x, num_groups, weight, bias, act):
    if weight is None and bias is not None:  # (torch 2.13's CPU backward of group_norm fails on a bias alone)
        y = TF.group_norm(x, num_groups, None, None, EPS) + bias.reshape(-1, *([1] * (x.dim() - 2)))
    else:
        y = TF.group_norm(x, num_groups, weight, bias, EPS)
    return y if act is None else ACTIVATIONS[act](y)


def autograd_result(x, num_groups, weight, bias, dz, act, dtype):
    """(z, dx, dweight, dbias) of :func:`torch_math` by autograd in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, weight, bias)]
    z = torch_math(leaves[0], num_groups, *leaves[1:], act)
    z.backward(dz.to(dtype))
    return z.detach(), *(t.grad if t is not None else None for t in leaves)


def check(x, num_groups, weight, bias, dz, act, hw_splits=None, max_block_hw=None):
    """The forward (with statistics, and without: the no-grad path), the backward, against fp64 autograd."""
    plan = dict(hw_splits=hw_splits, max_block_hw=max_block_hw)
    z, mean, rstd = K.group_norm_fwd(x, num_groups, weight, bias, EPS, act, **plan)
    z_no_grad = K.group_norm_fwd(x, num_groups, weight, bias, EPS, act, statistics=False, **plan)[0]
    dx, dw, db = K.group_norm_bwd(dz, x, weight, bias, mean, rstd, num_groups, act, **plan)
    assert z.dtype == z_no_grad.dtype == dx.dtype == x.dtype
    # the input's memory format is kept
    assert z.stride() == z_no_grad.stride() == dx.stride() == torch.empty_like(x).stride()
    assert mean.shape == rstd.shape == (x.shape[0], num_groups)
    ours = (z, z_no_grad, dx, dw if weight is not None else None, db if bias is not None else None)
    z_true, *grads_true = autograd_result(x, num_groups, weight, bias, dz, act, torch.float64)
    truth = (z_true, z_true, *grads_true)
    names = ("z", "z without statistics", "dx", "dweight", "dbias")
    if x.dtype in (torch.float32, torch.float64):
        for name, a, e in zip(names, ours, truth):
            if e is not None:
                assert_close(a, e, msg=f"act={act} {name}")
        return
    z_low, *grads_low = autograd_result(x, num_groups, weight, bias, dz, act, x.dtype)
    for name, a, t, e in zip(names, ours, (z_low, z_low, *grads_low), truth):
        if e is not None:
            assert_lowprec_close(a, t, e, msg=f"act={act} {name}")


def make_case(n, c, spatial, dtype, layout, *, affine=True, param_dtype: Optional[torch.dtype] = None):
    x = make_input(n, c, spatial, dtype, layout)
    gen = torch.Generator().manual_seed(1)
    param_dtype = param_dtype or dtype
    weight = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1).to(param_dtype) if affine else None
    bias = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(param_dtype) if affine else None
    dz = make_input(n, c, spatial, dtype, "contiguous", seed=3, offset=0.0)
    return x, weight, bias, dz


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_shapes_and_layouts(case, layout):
    n, c, spatial, groups, hw_splits, max_block_hw = SHAPES[case]
    x, weight, bias, dz = make_case(n, c, spatial, torch.float32, layout)
    check(x, groups, weight, bias, dz, ACTS[case % len(ACTS)], hw_splits, max_block_hw)  # each act on some shapes


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_and_activations(dtype, layout, act):
    x, weight, bias, dz = make_case(2, 6, (4, 5), dtype, layout)
    check(x, 3, weight, bias, dz, act, hw_splits=2, max_block_hw=8)


@pytest.mark.parametrize("act", [None, "gelu"])
def test_without_affine_and_weight_without_bias(act):
    x, weight, _, dz = make_case(2, 6, (3, 4), torch.float32, "channels_last", affine=True)
    check(x, 2, None, None, dz, act, hw_splits=2)
    check(x, 2, weight, None, dz, act)
    check(x, 2, None, weight, dz, act)


def test_fp32_parameters_with_bf16_input():
    x, weight, bias, dz = make_case(2, 6, (3, 4), torch.bfloat16, "contiguous", param_dtype=torch.float32)
    check(x, 3, weight, bias, dz, "silu", hw_splits=2)
    _, mean, rstd = K.group_norm_fwd(x, 3, weight, bias, EPS, "silu")
    _, dw, db = K.group_norm_bwd(dz, x, weight, bias, mean, rstd, 3, "silu")
    assert dw.dtype == db.dtype == torch.float32


def test_dz_in_another_layout():
    x, weight, bias, dz = make_case(2, 6, (3, 4), torch.float32, "contiguous")
    check(x, 3, weight, bias, dz.contiguous(memory_format=torch.channels_last), "silu")


def test_large_offset_keeps_centred_variance():
    """Groups whose mean is 3000 times their spread, in fp32: the partial moments are centred and combined with
    Chan's formula, so the result is at most twice as wrong as ATen's fp32 group norm (E[x²] − E[x]² would lose the
    variance)."""
    x = (make_input(2, 4, (6, 7), torch.float64, "contiguous", offset=0.0) + 3e3).float()
    y, _, _ = K.group_norm_fwd(x, 2, None, None, EPS, None, hw_splits=3, max_block_hw=8)
    assert_lowprec_close(y, torch_math(x, 2, None, None, None), torch_math(x.double(), 2, None, None, None))


def test_split_reductions_are_deterministic_and_agree():
    x, weight, bias, dz = make_case(2, 4, (9, 10), torch.float32, "channels_last")
    runs = []
    for _ in range(2):
        z, mean, rstd = K.group_norm_fwd(x, 2, weight, bias, EPS, "silu", hw_splits=3, max_block_hw=16)
        runs.append((z, *K.group_norm_bwd(dz, x, weight, bias, mean, rstd, 2, "silu", hw_splits=3,
                                          max_block_hw=16)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # bit for bit: no atomics, a fixed reduction order


@pytest.mark.parametrize("hw_contiguous", [True, False])
def test_large_groups_spread_over_the_gpu(hw_contiguous, monkeypatch):
    """A VAE activation 1x512x64x64 with 32 groups: the reductions launch at least two programs per SM of an H100
    (132 SMs), not 32 (its 2M values make 512 tiles of 4096)."""
    monkeypatch.setattr(K, "persistent_programs", lambda device, per_sm: 132 * per_sm)
    plan = K.reduce_plan(32, 16, 64 * 64, hw_contiguous, torch.device("cuda"))
    assert 32 * plan.splits >= 2 * 132
    assert plan.hw_splits * plan.hw_per_split >= 64 * 64 > (plan.hw_splits - 1) * plan.hw_per_split


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_no_grad_forward_finalizes_in_the_normalize_pass_at_benchmark_shapes(layout, monkeypatch):
    """Without statistics (no backward follows) the normalize pass finalizes the statistics itself at every
    UNet/VAE shape of the benchmark suite, on an H100's 132 SMs: two launches."""
    from normlayers.bench.ops import OPS  # (first: the op modules import it)
    from normlayers.bench.cnn_ops import GROUPS

    monkeypatch.setattr(K, "persistent_programs", lambda device, per_sm: 132 * per_sm)
    for n, c, h, w in OPS["group_norm_silu"].default_shapes["cuda"]:
        cpg, contiguous = c // GROUPS, layout == "contiguous"
        plan = K.reduce_plan(n * GROUPS, cpg, h * w, contiguous, torch.device("cuda"))
        tile = K.elementwise_tile(c, h * w, contiguous)
        assert K.finalizes_inline(plan, tile, K.groups_per_tile(tile[0], cpg, GROUPS)), (n, c, h, w)


def test_no_grad_forward_keeps_the_finalize_kernel_when_tiles_meet_many_groups():
    # One channel per group, channels-last, 2x2 planes split in two: a 128-channel tile of 4 pixels would re-read
    # 128 groups' partials per program, so the finalize kernel runs and its statistics come back.
    x, weight, bias, dz = make_case(2, 128, (2, 2), torch.float32, "channels_last")
    plan = dict(statistics=False, hw_splits=2, max_block_hw=2)
    y, mean, rstd = K.group_norm_fwd(x, 128, weight, bias, EPS, "silu", **plan)
    assert mean is not None and rstd is not None
    assert_close(y, autograd_result(x, 128, weight, bias, dz, "silu", torch.float64)[0])
    assert K.group_norm_fwd(x, 8, weight, bias, EPS, "silu", **plan)[1] is None  # 16 groups per tile


def test_empty_inputs():
    x = torch.empty(0, 4, 3, 3)
    weight = torch.ones(4)
    y, mean, rstd = K.group_norm_fwd(x, 2, weight, None, EPS, "silu")
    dx, dw, db = K.group_norm_bwd(torch.empty_like(x), x, weight, None, mean, rstd, 2, "silu")
    assert y.shape == dx.shape == x.shape and mean.shape == (0, 2)
    assert torch.equal(dw, torch.zeros(4)) and db.numel() == 0
    y, mean, _ = K.group_norm_fwd(torch.empty(2, 4, 0), 2, None, None, EPS, None)
    assert y.shape == (2, 4, 0) and bool(mean.isnan().all())
    assert math.isnan(mean[0, 0].item())
    y, mean, _ = K.group_norm_fwd(x, 2, weight, None, EPS, "silu", statistics=False)
    assert y.shape == x.shape and mean is None
