"""RN-L's fused kernels (``kernels/region_learnable.py``, two launches forward, four backward) against the
plain-PyTorch reference, forward and every gradient (input, ``conv1``, ``γ``/``β`` conv weights and biases).

The launchers run directly, so the multi-block loops (pixel blocks, channel blocks, several row tiles with their
conv halos, several tiles of partials) are reached on small maps through ``max_block_hw`` / ``max_block_c`` /
``max_tile_rows``. The reference's gradients come from autograd of
torch's own convs, ``torch.amax`` and the region statistics: an independent check of the hand-written backward.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from normlayers.kernels import region_learnable as K
from normlayers.ops.region_norm import statistics_scale_cap
from normlayers.reference import region_norm as R
from normlayers.testing import assert_close, nchw_input

NAMES = ["x", "conv1_weight", "gamma_weight", "gamma_bias", "beta_weight", "beta_bias"]


def _weights(k: int, *, bias: bool = True, seed: int = 6) -> list[Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 2, k, k), (1, 1, k, k), (1,), (1, 1, k, k), (1,)]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.5 for s in shapes]
    return weights if bias else [weights[0], weights[1], None, weights[3], None]


def _input(shape, dtype, layout):
    return nchw_input(*shape, dtype, layout, scale=2.0, plane_offset=0.5)


def between_responses(x: torch.Tensor, weights) -> float:
    """A threshold halfway between the two middle values of the reference's map: no value sits at the threshold,
    where the two sides' last-bit differences could put a pixel in different regions."""
    with torch.no_grad():
        s, _, _ = R.self_aware_affine(x, *weights)
    values = s.double().flatten().sort().values
    if values.numel() < 2:
        return float(values[0]) - 0.25
    middle = values.numel() // 2
    return float((values[middle - 1] + values[middle]) / 2)


def run_both(x, weights, *, threshold, stats="batch", eps_mode="official", max_block_hw=None, max_block_c=None,
             max_tile_rows=None, pool_separately=None, seed=9):
    """``(ours, reference)``: each a list of the output and the gradients of ``NAMES`` (``None`` for a missing
    bias), for one random ``dy``."""
    batch = stats == "batch"
    leaves = [x.detach().clone().requires_grad_()] + [None if w is None else w.to(x.dtype).requires_grad_()
                                                       for w in weights]
    expected = R.learnable_region_norm(leaves[0], *leaves[1:], threshold=threshold, stats=stats, eps_mode=eps_mode)
    dy = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.dtype)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(expected, present, dy))
    reference = [expected.detach()] + [None if t is None else next(grads) for t in leaves]
    params = [None if t is None else t.detach() for t in leaves[1:]]
    y, pool, s, gain, statistics = K.learnable_region_norm_fwd(
        x, *params, threshold=threshold, eps=1e-5, batch=batch, official_eps=eps_mode == "official",
        cap=statistics_scale_cap(x, 1e-5, batch, eps_mode == "official"), max_block_hw=max_block_hw,
        max_block_c=max_block_c, max_tile_rows=max_tile_rows, pool_separately=pool_separately)
    ours = [y, *K.learnable_region_norm_bwd(dy, x, *params, pool, s, gain, statistics, threshold=threshold,
                                            batch=batch, max_block_hw=max_block_hw, max_block_c=max_block_c)]
    return ours, reference


def assert_all_close(ours, reference):
    for name, a, b in zip(["y", *NAMES], ours, reference):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, msg=name)


CASES = [
    # (shape, k, stats, eps_mode, max_block_hw, max_block_c, max_tile_rows)
    ((2, 3, 5, 7), 3, "batch", "official", None, None, None),
    ((2, 3, 5, 7), 3, "instance", "plain", None, None, 2),  # row tiles of 2 rows, a last one of 1
    # several pixel and channel blocks, a 7x7 window on a 5x4 map, one-row tiles (a halo of 3 rows either side)
    ((2, 3, 5, 4), 7, "batch", "official", 8, 2, 1),
    ((1, 5, 7, 3), 3, "instance", "official", 8, 2, 3),  # one sample
    ((3, 2, 1, 1), 3, "batch", "official", None, None, None),  # 1x1 maps: one pixel, the window's centre tap only
]


@pytest.mark.parametrize("shape,k,stats,eps_mode,max_block_hw,max_block_c,max_tile_rows", CASES)
def test_matches_reference_fp64(shape, k, stats, eps_mode, max_block_hw, max_block_c, max_tile_rows):
    x = _input(shape, torch.float64, "contiguous")
    weights = _weights(k)
    ours, reference = run_both(x, weights, threshold=between_responses(x, weights), stats=stats, eps_mode=eps_mode,
                               max_block_hw=max_block_hw, max_block_c=max_block_c, max_tile_rows=max_tile_rows)
    assert_all_close(ours, reference)


@pytest.mark.parametrize("stats", ["batch", "instance"])
def test_three_launch_forward_matches_reference_fp64(stats):
    # The forward taken where the two-launch one's per-row-tile programs would be too few (pools_in_stats).
    x = _input((2, 3, 5, 4), torch.float64, "contiguous")
    weights = _weights(5)
    ours, reference = run_both(x, weights, threshold=between_responses(x, weights), stats=stats, max_block_hw=8,
                               max_block_c=2, pool_separately=True)
    assert_all_close(ours, reference)


@pytest.mark.parametrize("threshold", [2.0, -1.0], ids=["no-hole", "all-hole"])
def test_one_region_empty_without_biases(threshold):
    # sigmoid ∈ (0, 1): threshold 2 leaves the hole region empty, −1 the valid region.
    x = _input((2, 3, 4, 5), torch.float64, "contiguous")
    ours, reference = run_both(x, _weights(3, bias=False), threshold=threshold, max_block_hw=8)
    assert_all_close(ours, reference)


@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
def test_strided_inputs_fp32(layout):
    x = _input((2, 4, 5, 6), torch.float32, layout)
    weights = _weights(3)
    ours, reference = run_both(x, weights, threshold=between_responses(x, weights), max_block_hw=16)
    if layout == "channels_last":  # outputs in the input's memory format
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        assert ours[1].is_contiguous(memory_format=torch.channels_last)
    assert_all_close(ours, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_reference(dtype):
    # Both compute in fp32 from the same low-precision inputs and weights and round each result once: they agree to
    # the dtype's tolerance.
    x = _input((2, 3, 6, 5), dtype, "contiguous")
    weights = [w.to(dtype) for w in _weights(3)]
    ours, reference = run_both(x, weights, threshold=between_responses(x, weights))
    assert_all_close(ours, reference)


def test_tied_channel_maxima_share_the_gradient():
    # Channels 0 and 1 equal everywhere: every pixel's maximum is tied (at least) twice; torch.amax's backward
    # spreads the gradient evenly over the tied channels, and so must the kernels.
    x = _input((2, 3, 4, 5), torch.float64, "contiguous")
    x[:, 1] = x[:, 0]
    x[:, 2] = x[:, 0] - 1.0
    weights = _weights(3)
    ours, reference = run_both(x, weights, threshold=between_responses(x, weights))
    assert_all_close(ours, reference)


def test_deterministic():
    x = _input((2, 3, 4, 5), torch.float32, "contiguous")
    weights = _weights(3)
    threshold = between_responses(x, weights)
    first, _ = run_both(x, weights, threshold=threshold, max_block_hw=8, max_block_c=2, max_tile_rows=2)
    second, _ = run_both(x, weights, threshold=threshold, max_block_hw=8, max_block_c=2, max_tile_rows=2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
