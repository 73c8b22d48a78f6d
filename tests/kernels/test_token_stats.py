"""The token-statistics kernels (shared by PowerNorm and UnifiedNorm) against torch, and both layers on them against
the reference backend: edge shapes (one row, one channel, odd widths, wider than a channel block, more row tiles than
programs), strided inputs, fp32/fp16/bf16 (fp64 for the exactness checks), masks with fully padded samples, 2-D input.

On CPU the kernels run under the Triton interpreter (tests/conftest.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

import normlayers
from normlayers.kernels import token_stats as K
from normlayers.testing import assert_close, assert_lowprec_close

# (rows, channels): one row, one channel, odd sizes, wider than MAX_BLOCK_C (128), more row tiles than programs.
SHAPES = [(1, 1), (1, 7), (5, 1), (13, 7), (37, 130), (300, 3)]


def _rows(shape, dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    r, c = shape
    base = torch.randn(r, c + 3, generator=gen, dtype=torch.float64) * 2 + 0.3
    if layout == "row_strided":
        return base[:, 1:c + 1].to(dtype) if dtype == torch.float64 else base.to(dtype)[:, 1:c + 1]
    if layout == "transposed":
        return base[:, :c].t().contiguous().t().to(dtype).t().contiguous().t()
    return base[:, :c].to(dtype).contiguous()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_sums_against_torch(shape, layout, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = _rows(shape, dtype, layout, gen)
    dy = _rows(shape, dtype, "contiguous", gen)
    valid = torch.rand(shape[0], generator=gen) < 0.6
    x64, dy64 = x.double(), dy.double()
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    masked, _ = K.token_sums(x, None, valid)
    assert masked.dtype == stats and masked.shape == (1, shape[1])
    assert_close(masked[0], (x64.square() * valid[:, None]).sum(0), dtype=stats)
    strided_valid = torch.stack([valid, ~valid], 1)[:, 0]  # a mask with stride 2
    assert torch.equal(K.token_sums(x, None, strided_valid)[0], masked)
    p, q = torch.randn(shape[1], generator=gen, dtype=stats), torch.randn(shape[1], generator=gen, dtype=stats)
    sums, out = K.token_sums(x, dy, None, p, q)
    expected = torch.stack([x64.square().sum(0), (dy64 * x64).sum(0), dy64.sum(0)])
    assert_close(sums, expected, dtype=stats)
    expected_out = dy64 * p.double() + x64 * q.double()
    if dtype == torch.bfloat16:
        # Computed in fp32 and rounded once: at most torch's own bf16 result's error, which rounds after each op.
        assert_lowprec_close(out, dy * p.to(dtype) + x * q.to(dtype), expected_out)
    else:
        assert_close(out, expected_out)
    assert torch.equal(K.token_sums(x, dy, None)[0], sums), "the fused output must not change the sums"


def test_token_sums_without_valid_rows_is_zero():
    x = torch.randn(6, 5)
    assert torch.equal(K.token_sums(x, None, torch.zeros(6, dtype=torch.bool))[0], torch.zeros(1, 5))
    assert torch.equal(K.token_sums(x[:0], None, None)[0], torch.zeros(1, 5))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_affine_against_torch(shape, layout, dtype):
    gen = torch.Generator().manual_seed(1 + sum(shape))
    x = _rows(shape, dtype, layout, gen)
    x2 = _rows(shape, dtype, "row_strided", gen)
    p, q, s = (torch.randn(shape[1], generator=gen) for _ in range(3))
    out = K.channel_affine(x, p, s)
    assert out.dtype == dtype and out.is_contiguous()
    expected = x.double() * p.double() + s.double()
    out2 = K.channel_affine(x, p, None, x2, q)
    expected2 = x.double() * p.double() + x2.double() * q.double()
    if dtype == torch.float32:
        assert_close(out, expected)
        assert_close(out2, expected2)
    else:
        # Computed in fp32 and rounded once: at most torch's own bf16 result's error, which rounds after each op.
        assert_lowprec_close(out, x * p.to(dtype) + s.to(dtype), expected)
        assert_lowprec_close(out2, x * p.to(dtype) + x2 * q.to(dtype), expected2)


# ----------------------------------------------------------------------------------------------------------------------
# The layers on the kernels against the reference backend
# ----------------------------------------------------------------------------------------------------------------------


def _steps(layer: torch.nn.Module, backend: str, inputs, masks, dys):
    """Training steps (forward + backward) then one eval forward; returns per step (y, dx, dweight, dbias) and the
    final state."""
    layer = copy.deepcopy(layer)
    results = []
    with normlayers.backend(backend):
        for x, mask, dy in zip(inputs, masks, dys):
            x = x.clone().requires_grad_()
            y = layer(x, pad_mask=mask)
            y.backward(dy)
            results.append((y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
            layer.zero_grad()
        layer.eval()
        results.append((layer(inputs[0], pad_mask=masks[0]),))
    return results, layer.state_dict()


def _make(kind: str, channels: int, dtype=None):
    if kind == "power":
        return normlayers.PowerNorm(channels, group_num=2 if channels % 2 == 0 else 1, warmup_iters=2,
                                    alpha_bkw=0.7, dtype=dtype)
    return normlayers.UnifiedNorm(channels, window_size=2, warmup_iters=3, outlier_filtration=True, dtype=dtype)


def _inputs(kind: str, shape, dtype, masked: bool, steps: int, gen: torch.Generator):
    scales = torch.logspace(-1, 1, shape[-1], dtype=torch.float64)
    inputs = [(torch.randn(shape, generator=gen, dtype=torch.float64) * scales).to(dtype) for _ in range(steps)]
    dys = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(steps)]
    if not masked:
        return inputs, [None] * steps, dys
    if len(shape) == 2:
        mask_shape = shape[:1]
    else:
        mask_shape = (shape[1], shape[0]) if kind == "power" else shape[:2]
    masks = []
    for _ in range(steps):
        mask = torch.rand(mask_shape, generator=gen) < 0.3
        if len(shape) == 3:
            mask[0] = True  # a fully padded sample
        masks.append(mask)
    return inputs, masks, dys


@pytest.mark.parametrize("kind", ["power", "unified"])
@pytest.mark.parametrize("shape, masked", [((4, 3, 6), True), ((3, 2, 5), False), ((7, 130), True),
                                           ((1, 1, 1), False)])
def test_layer_on_kernels_matches_reference_fp32(kind, shape, masked):
    gen = torch.Generator().manual_seed(7)
    inputs, masks, dys = _inputs(kind, shape, torch.float32, masked, 5, gen)
    layer = _make(kind, shape[-1])
    ours, our_state = _steps(layer, "triton", inputs, masks, dys)
    # Against the reference in fp64 (same inputs, same initial state), with fp32's tolerance.
    ref, ref_state = _steps(layer.double(), "reference", [x.double() for x in inputs], masks,
                            [d.double() for d in dys])
    for step, (a, b) in enumerate(zip(ours, ref)):
        for name, u, v in zip(("y", "dx", "dweight", "dbias"), a, b):
            assert_close(u, v, msg=f"step {step}: {name}")
    for key, value in ref_state.items():
        assert_close(our_state[key].double(), value, dtype=torch.float32, msg=key)


@pytest.mark.parametrize("kind", ["power", "unified"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_on_kernels_low_precision(kind, dtype):
    # The layer is fp32 (parameters, buffers); only the activations are low precision. Oracle: the same layer in
    # fp64 on the same (rounded) inputs. "torch's own" low-precision result of the low-precision rule is the
    # reference backend on the low-precision input (fp32 arithmetic, output rounded once to the dtype).
    gen = torch.Generator().manual_seed(3)
    shape = (6, 3, 8)
    inputs, masks, dys = _inputs(kind, shape, dtype, True, 4, gen)
    layer = _make(kind, shape[-1])
    ours, our_state = _steps(layer, "triton", inputs, masks, dys)
    lowprec, _ = _steps(layer, "reference", inputs, masks, dys)
    ref64, ref64_state = _steps(layer.double(), "reference", [x.double() for x in inputs], masks,
                                [d.double() for d in dys])
    for step, (a, b, c) in enumerate(zip(ours, lowprec, ref64)):
        for name, u, v, w in zip(("y", "dx", "dweight", "dbias"), a, b, c):
            assert u.dtype == v.dtype, name
            # The parameter gradients are fp32 sums over the tokens: fp32's atol (1e-5), relative to their size.
            assert_lowprec_close(u, v, w, msg=f"step {step}: {name}",
                                 atol=None if u.dtype == dtype else 1e-5 * max(1.0, w.abs().max().item()))
    for key, value in ref64_state.items():
        # Statistics are fp32 from the same rounded inputs (PowerNorm's GroupScaling output stays fp32 too).
        assert_close(our_state[key].double(), value.double(), dtype=torch.float32, msg=key)


@pytest.mark.parametrize("kind", ["power", "unified"])
@pytest.mark.parametrize("layout", ["channel_slice", "transposed"])
def test_layer_on_kernels_non_contiguous_input(kind, layout):
    # A channel slice of a wider tensor is read in place (row stride > C); a transposed (T, B) pair is copied by
    # reshape. Either way the result equals the contiguous input's, on the kernels.
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(4, 3, 11, generator=gen)
    x = wide[..., 2:8] if layout == "channel_slice" else wide[..., :6].transpose(0, 1)
    assert not x.is_contiguous()
    layer = _make(kind, 6)
    mask_shape = (x.shape[1], x.shape[0]) if kind == "power" else x.shape[:2]
    mask = torch.rand(mask_shape, generator=gen) < 0.3
    dy = torch.randn(x.shape, generator=gen)
    ours, our_state = _steps(layer, "triton", [x] * 3, [mask] * 3, [dy] * 3)
    ref, ref_state = _steps(layer, "triton", [x.contiguous()] * 3, [mask] * 3, [dy] * 3)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for name, u, v in zip(("y", "dx", "dweight", "dbias"), a, b):
            assert torch.equal(u, v), f"step {step}: {name}"
    for key, value in ref_state.items():
        assert torch.equal(our_state[key], value), key
