"""The RegionNorm custom ops (opcheck, fp64 gradcheck, torch.compile) and RN-B / RN-L on them against the reference.

The fused Triton path takes per-plane scaled region sums, finalizes the statistics in one small kernel (pooled over
the batch for ``stats="batch"``) and applies them in one pass, with a hand-written three-kernel backward; the
synced path composes region moments, small ``(N, C, 2)`` torch ops and a two-region affine pass. The reference
computes the closed form directly (itself tested against the official algorithm in tests/reference). Agreement of
outputs and of all gradients checks the algebra, the kernels and the gradient through the region statistics.
"""

from __future__ import annotations

import pytest
import torch

import normlayers
from normlayers import functional as F
from normlayers.ops import region_norm as ops
from normlayers.testing import FAST_GRADCHECK, assert_close, assert_lowprec_close


def _input(shape, *, dtype=torch.float64, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = (torch.randn(n, c + 1, h, w, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        return x[:, :c].contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":
        return x[:, 1:]
    return x[:, :c].contiguous()


def _mask(shape, kind="random", *, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(shape, generator=gen) < 0.4
    mask = torch.full(shape, kind == "all")
    if kind == "one":
        mask[..., 0, -1] = True
    return mask


def _params(c, dtype=torch.float64, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(dtype) for _ in range(4)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
@pytest.mark.parametrize("mask_channels", [1, 3])
def test_opcheck(layout, mask_channels):
    x = _input((2, 3, 4, 5), dtype=torch.float32, layout=layout).requires_grad_()
    hole = _mask((2, mask_channels, 4, 5))
    gen = torch.Generator().manual_seed(3)
    center, scale, shift = (torch.randn(2, 3, 2, generator=gen).requires_grad_() for _ in range(3))
    torch.library.opcheck(torch.ops.normlayers.region_moments.default, (x, hole, center))
    torch.library.opcheck(torch.ops.normlayers.region_affine.default, (x, hole, center, scale, shift))
    grads = torch.randn(2, 3, 2, generator=gen)
    torch.library.opcheck(torch.ops.normlayers.region_moments_bwd.default,
                          (x.detach(), hole, center.detach(), grads, grads))
    dy = torch.randn(x.shape, generator=gen)
    torch.library.opcheck(torch.ops.normlayers.region_affine_bwd.default,
                          (dy, x.detach(), hole, center.detach(), scale.detach()))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
@pytest.mark.parametrize("mask_channels", [1, 3])
@pytest.mark.parametrize("batch", [True, False])
def test_opcheck_fused_ops(layout, mask_channels, batch):
    x = _input((2, 3, 4, 5), dtype=torch.float32, layout=layout)
    hole = _mask((2, mask_channels, 4, 5))
    params = _params(3, torch.float32)
    cap = ops.statistics_scale_cap(x, 1e-5, batch, True)
    partials = ops.region_stats(x, hole, cap)
    stats = ops.region_finalize(partials, batch, 1e-5, True)
    torch.library.opcheck(torch.ops.normlayers.region_stats.default, (x, hole, cap))
    torch.library.opcheck(torch.ops.normlayers.region_finalize.default, (partials, batch, 1e-5, True))
    torch.library.opcheck(torch.ops.normlayers.region_normalize.default, (x, hole, stats, *params, batch, False))
    torch.library.opcheck(torch.ops.normlayers.region_normalize.default,
                          (x, hole, partials, *params, batch, True, True, 1e-5, True))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.library.opcheck(torch.ops.normlayers.region_normalize_bwd.default,
                          (dy, x, hole, stats, params[0], None, None, params[3], batch, False))


@pytest.mark.parametrize("stats", ["batch", "instance"])
@pytest.mark.parametrize("affine", ["masked", "official"])
def test_gradcheck_fused_layer_fp64(stats, affine):
    x = _input((2, 2, 3, 3)).requires_grad_()
    hole = _mask((2, 1, 3, 3))
    params = [p.requires_grad_() for p in _params(2)]
    with normlayers.backend("triton"):
        assert torch.autograd.gradcheck(lambda t, *p: F.region_norm(t, hole, *p, stats=stats, affine=affine),
                                        (x, *params), **FAST_GRADCHECK)


@pytest.mark.parametrize("stats", ["batch", "instance"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (5, 3, 2, 3)])  # 8·N ≤ H·W: finalized in the pass; else not
def test_inference_matches_reference(stats, shape):
    # Without a backward the statistics may be finalized inside the elementwise pass (two launches): both ways match.
    x = _input(shape, dtype=torch.float32)
    hole = _mask((shape[0], 1, *shape[2:]))
    params = _params(shape[1], torch.float32)
    with torch.no_grad():
        with normlayers.backend("reference"):
            expected = F.region_norm(x, hole, *params, stats=stats)
        with normlayers.backend("triton"):
            actual = F.region_norm(x, hole, *params, stats=stats)
    assert_close(actual, expected)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_region_ops_fp64(layout):
    x = _input((2, 2, 2, 3), layout=layout).requires_grad_()
    hole = _mask((2, 1, 2, 3))
    gen = torch.Generator().manual_seed(4)
    center, scale, shift = (torch.randn(2, 2, 2, generator=gen, dtype=torch.float64).requires_grad_()
                            for _ in range(3))
    # The differentiable outputs together and alone (the backward's "a gradient is None" branches), as fast
    # gradchecks (FAST_GRADCHECK: each interpreter launch is slow).
    checks = [lambda t, c: ops.region_moments(t, hole, c)[1:], lambda t, c: ops.region_moments(t, hole, c)[1],
              lambda t, c: ops.region_moments(t, hole, c)[2]]
    for fn in checks:
        assert torch.autograd.gradcheck(fn, (x, center), **FAST_GRADCHECK)
    assert torch.autograd.gradcheck(lambda t, c, a, b: ops.region_affine(t, hole, c, a, b), (x, center, scale, shift),
                                    **FAST_GRADCHECK)


def _both_backends(fn, leaves):
    results = []
    for name in ("reference", "triton"):
        copies = [t.detach().clone().requires_grad_() for t in leaves]
        with normlayers.backend(name):
            out = fn(*copies)
        gen = torch.Generator().manual_seed(9)
        out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype))
        results.append((out.detach(), [t.grad for t in copies]))
    return results


CASES = [
    # (shape, mask shape, mask kind)
    ((2, 3, 5, 7), (2, 1, 10, 14), "random"),  # a mask larger than the feature map
    ((2, 3, 5, 7), (2, 3, 3, 4), "random"),  # smaller, per channel
    ((3, 2, 1, 1), (3, 1, 4, 4), "random"),  # 1x1 feature maps
    ((1, 4, 6, 5), (1, 1, 6, 5), "all"),  # an empty valid region
    ((2, 4, 6, 5), (2, 1, 6, 5), "none"),  # an empty hole region
    ((2, 3, 6, 5), (2, 1, 6, 5), "one"),  # one-pixel hole regions
]


@pytest.mark.parametrize("shape,mask_shape,kind", CASES)
@pytest.mark.parametrize("stats", ["batch", "instance"])
@pytest.mark.parametrize("affine", ["masked", "official"])
def test_region_norm_triton_matches_reference_fp64(shape, mask_shape, kind, stats, affine):
    x, mask = _input(shape), _mask(mask_shape, kind)
    (ref, ref_grads), (ours, our_grads) = _both_backends(
        lambda t, *p: F.region_norm(t, mask, *p, stats=stats, affine=affine), [x, *_params(shape[1])])
    assert_close(ours, ref)
    for name, a, b in zip(["x", "fg_gamma", "fg_beta", "bg_gamma", "bg_beta"], our_grads, ref_grads):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("eps_mode", ["official", "plain"])
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
def test_region_norm_triton_eps_modes_and_layouts_fp32(eps_mode, layout):
    x, mask = _input((2, 3, 5, 6), dtype=torch.float32, layout=layout), _mask((2, 1, 5, 6))
    (ref, ref_grads), (ours, our_grads) = _both_backends(
        lambda t, *p: F.region_norm(t, mask, *p, eps_mode=eps_mode), [x, *_params(3, torch.float32)])
    if layout == "channels_last":  # the kernels write the output in the input's memory format
        assert ours.is_contiguous(memory_format=torch.channels_last)
    assert_close(ours, ref)
    for a, b in zip(our_grads, ref_grads):
        assert_close(a, b)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16, torch.uint8])
def test_region_norm_triton_numeric_masks_match_bool(mask_dtype):
    """Float and integer masks (nonzero = hole, at a larger size than the input) give the bool mask's result."""
    x, hole = _input((2, 3, 4, 5)), _mask((2, 1, 8, 10))
    numeric = hole.to(mask_dtype) * (3 if mask_dtype == torch.uint8 else 0.75)
    params = _params(3)
    with normlayers.backend("triton"):
        assert torch.equal(F.region_norm(x, numeric, *params), F.region_norm(x, hole, *params))
    with normlayers.backend("reference"):
        assert_close(F.region_norm(x, numeric, *params), F.region_norm(x, hole, *params))


def test_region_norm_without_parameters():
    x, mask = _input((2, 3, 4, 5)), _mask((2, 1, 4, 5))
    (ref, ref_grads), (ours, our_grads) = _both_backends(lambda t: F.region_norm(t, mask, stats="instance"), [x])
    assert_close(ours, ref)
    assert_close(our_grads[0], ref_grads[0])


@pytest.mark.parametrize("affine", ["masked", "official"])
def test_gradients_accumulate_over_two_backward_passes(affine):
    # Gradient accumulation: two backward passes into the same .grad tensors give twice one pass. (The Triton path's
    # affine="official" once handed both betas aliased views of one gradient, so the second pass added twice.)
    module = normlayers.RegionNorm2d(3, affine=affine, dtype=torch.float64)
    with torch.no_grad():
        for p, value in zip(module.parameters(), _params(3)):
            p.copy_(value)
    x, mask = _input((2, 3, 4, 5)), _mask((2, 1, 4, 5))
    with normlayers.backend("triton"):
        module(x, mask).square().sum().backward()
        once = [p.grad.clone() for p in module.parameters()]
        module(x, mask).square().sum().backward()
    for p, grad in zip(module.parameters(), once):
        assert_close(p.grad, 2 * grad)


def _closed_form_in(dtype, x, hole, params, *, stats):
    """The closed form (spec §3.2, official affine) with every op in ``dtype``: PyTorch's own low-precision error."""
    dims = (0, 2, 3) if stats == "batch" else (2, 3)
    values = x.shape[2] * x.shape[3] * (x.shape[0] if stats == "batch" else 1)
    w_hole = hole.to(dtype)
    out = torch.zeros_like(x)
    for w, gamma in ((w_hole, params[0]), (1 - w_hole, params[2])):
        count = w.expand_as(x).sum(dims, keepdim=True).clamp_min(1)
        mean = (w * x).sum(dims, keepdim=True) / count
        var = (w * (x - mean).square()).sum(dims, keepdim=True) / count
        out = out + w * (x - mean) * torch.rsqrt(var + 1e-5 * values / count) * (1 + gamma[:, None, None])
    return out + (params[1] + params[3])[:, None, None]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stats", ["batch", "instance"])
def test_region_norm_low_precision(dtype, stats):
    """Our fp16/bf16 output and input gradient: at most twice as far from fp64 as the closed form computed by torch
    in fp16/bf16 throughout, plus the table's atol."""
    x64, hole = _input((2, 3, 6, 7)), _mask((2, 1, 6, 7))
    params64 = _params(3)

    def run(x, params, *, torch_lowprec=False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
        if torch_lowprec:
            out = _closed_form_in(dtype, leaves[0], hole, leaves[1:], stats=stats)
        else:
            with normlayers.backend("triton"):
                out = F.region_norm(leaves[0], hole, *leaves[1:], stats=stats, eps_mode="official",
                                    affine="official")
        gen = torch.Generator().manual_seed(5)
        out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype))
        return out.detach(), leaves[0].grad

    x_low, params_low = x64.to(dtype), [p.to(dtype) for p in params64]
    ours, ours_dx = run(x_low, params_low)
    ref64, ref64_dx = run(x_low.double(), [p.double() for p in params_low])
    theirs, theirs_dx = run(x_low, params_low, torch_lowprec=True)
    assert ours.dtype == dtype and ours_dx.dtype == dtype
    assert_lowprec_close(ours, theirs, ref64, msg="y")
    assert_lowprec_close(ours_dx, theirs_dx, ref64_dx, msg="dx")


def _rn_l_weights(k=3, seed=6):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 2, k, k), (1, 1, k, k), (1,), (1, 1, k, k), (1,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64) * 0.5 for s in shapes]


def _between_responses(x, weights):
    """A threshold halfway between the two middle values of the map: no value at the threshold itself, where the
    fused kernels' last-bit differences from torch's convs could put a pixel in the other region."""
    with torch.no_grad():
        s, _, _ = normlayers.reference.region_norm.self_aware_affine(x, *weights)
    values = s.flatten().sort().values
    return float((values[values.numel() // 2 - 1] + values[values.numel() // 2]) / 2)


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("biases", [True, False])
def test_opcheck_learnable_ops(batch, biases):
    x = _input((2, 3, 4, 5), dtype=torch.float32, layout="channels_last")
    weights = [w.float() for w in _rn_l_weights()]
    if not biases:
        weights[2] = weights[4] = None
    threshold = _between_responses(x, weights)
    args = (x, *weights, threshold, 1e-5, batch, True, ops.statistics_scale_cap(x, 1e-5, batch, True))
    torch.library.opcheck(torch.ops.normlayers.learnable_region_norm_fwd.default, args)
    _, pool, s, gain, stats = ops.learnable_region_norm_fwd(*args)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.library.opcheck(torch.ops.normlayers.learnable_region_norm_bwd.default,
                          (dy, x, *weights, pool, s, gain, stats, threshold, batch))


@pytest.mark.parametrize("stats", ["batch", "instance"])
def test_learnable_region_norm_triton_matches_reference(stats):
    x = _input((2, 3, 6, 5))
    weights = _rn_l_weights()
    threshold = _between_responses(x, weights)
    (ref, ref_grads), (ours, our_grads) = _both_backends(
        lambda t, *w: F.learnable_region_norm(t, *w, threshold=threshold, stats=stats), [x, *weights])
    assert_close(ours, ref)
    for a, b in zip(our_grads, ref_grads):
        assert_close(a, b)


@pytest.mark.parametrize("module_name", ["RegionNorm2d", "LearnableRegionNorm2d"])
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_compile_fullgraph_matches_eager(module_name, backend_name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    kwargs = {"kernel_size": 3, "threshold": 0.5} if module_name == "LearnableRegionNorm2d" else {}
    eager = getattr(normlayers, module_name)(4, **kwargs)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    compiled = getattr(normlayers, module_name)(4, **kwargs)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(2, 4, 5, 6)
    args = (_mask((2, 1, 10, 12)),) if module_name == "RegionNorm2d" else ()

    def step(module):
        leaf = x.clone().requires_grad_()
        out = module(leaf, *args)
        out.square().sum().backward()
        return [out.detach(), leaf.grad, *(p.grad.clone() for p in module.parameters())]

    with normlayers.backend(backend_name):
        expected = step(eager)
        actual = step(torch.compile(compiled, fullgraph=True, backend="aot_eager"))
    for a, b in zip(actual, expected):
        assert_close(a, b)
