"""The compiled BatchChannelNorm kernels (normlayers/cpu/csrc/batch_channel.c) against the reference: edge shapes
(planes of one value, shorter than a vector, longer than a summation block), every mode, fp32 and bf16, inputs far
from zero, NaN, and the same bits on one and two threads. Skipped where the kernels cannot run (no compiler, or
NORMLAYERS_CPU_KERNELS=0: then tests/cpu/test_batch_channel.py covers the ATen path)."""

from __future__ import annotations

import pytest
import torch

import normlayers
import normlayers.functional as NF
from normlayers.cpu import batch_channel as cpu_bcn
from normlayers.testing import max_abs_error, nchw_input, tolerance

from .conftest import run_backend

pytestmark = pytest.mark.skipif(cpu_bcn._native_kernels() is None, reason="the compiled kernels are unavailable")

DTYPES = [torch.float32, torch.bfloat16]


def _params(c, g, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(shift + 0.1 * torch.randn(n, generator=gen)).to(dtype) for shift, n in ((1, c), (0, c), (1, g), (0, g))]


def _buffers(c, dtype, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [(0.1 * torch.randn(c, generator=gen)).to(dtype), (1 + 0.1 * torch.rand(c, generator=gen)).to(dtype),
            torch.tensor(3)]


def _call(mode, groups):
    def fn(x, bn_w, bn_b, w, b, running_mean, running_var, tracked):
        return NF.batch_channel_norm(x, running_mean, running_var, bn_w, bn_b, w, b, training=mode.endswith("train"),
                                     num_groups=groups, estimate=mode.startswith("estimate"), estimate_rate=0.3,
                                     num_batches_tracked=tracked)
    return fn


def _assert_within_reference_bound(fn, tensors, buffers):
    """Output, every gradient and the buffers after the call within the benchmark's bound against the fp64 reference:
    twice the reference's own error in the input's dtype, plus the tolerance table's atol (and, fp32, its rtol of the
    largest value). Not the fp32 reference's tolerance around its own values: where its sums cancel (the batch-stage
    parameter gradients at a few values per channel) the kernel's fp64 algebra is the closer of the two."""
    ours = run_backend("auto", fn, tensors, buffers)
    reference = run_backend("reference", fn, tensors, buffers)
    reference64 = run_backend("reference", fn, [t.double() if t.is_floating_point() else t for t in tensors],
                              [b.double() if b.is_floating_point() else b for b in buffers])
    _assert_results_within_bound(ours, reference, reference64)


def _assert_results_within_bound(ours, reference, reference64):
    for i, (a, r, e) in enumerate(zip(ours, reference, reference64)):
        assert (a is None) == (r is None), i
        if a is None:
            continue
        assert a.dtype == r.dtype and a.shape == r.shape, i
        if not a.is_floating_point():
            assert torch.equal(a, r), i
            continue
        rtol, atol = tolerance(a.dtype)
        bound = 2 * max_abs_error(r, e) + atol + (rtol * e.abs().max().item() if a.dtype == torch.float32 else 0.0)
        assert max_abs_error(a, e) <= bound, (i, max_abs_error(a, e), bound)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the compiled entry points each call ran."""
    calls = []
    for name in ("_native_forward", "_native_backward"):
        original = getattr(cpu_bcn, name)
        monkeypatch.setattr(cpu_bcn, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    return calls


# (N, C, H, W, G): planes of 1, 15 (all scalar), 16 (vectors only), 17 and 35 (a masked last vector), 2500 values
# (three summation blocks); one sample; one group; one channel per group
SHAPES = [(3, 8, 1, 1, 4), (2, 6, 3, 5, 3), (2, 8, 4, 4, 4), (3, 4, 1, 17, 2), (2, 8, 5, 7, 4), (2, 4, 50, 50, 2),
          (1, 8, 3, 5, 2), (2, 8, 3, 3, 1), (2, 6, 3, 3, 6)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["train", "eval", "estimate_train", "estimate_eval"])
def test_matches_reference(mode, shape, dtype, kernel_calls):
    """Output, every gradient and the buffers (fp32 and, as after module.to(dtype), the input's dtype) against the
    reference, through the compiled forward and backward."""
    n, c, h, w, g = shape
    if mode == "train" and n * h * w == 1:
        pytest.skip("one value per channel: batch statistics are refused")
    x = nchw_input(n, c, h, w, torch.float32, plane_offset=2.0).to(dtype)
    for buffer_dtype in {torch.float32, dtype}:
        _assert_within_reference_bound(_call(mode, g), [x, *_params(c, g, dtype)], _buffers(c, buffer_dtype))
    assert kernel_calls.count("_native_backward") >= 1 and "_native_forward" in kernel_calls


# (N, C, H, W, G) for channels-last: C under one vector (all channels one by one), 40 (two vectors and 8), 16 (vectors
# only); planes of 1, 12 and 81 rows (under NL_VL, two row blocks), 2500 (forty)
CHANNELS_LAST_SHAPES = [(3, 8, 1, 1, 4), (2, 40, 3, 4, 8), (2, 16, 9, 9, 4), (1, 6, 9, 9, 3), (2, 16, 50, 50, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["train", "eval", "estimate_train", "estimate_eval"])
def test_channels_last(mode, shape, dtype, kernel_calls):
    """Channels-last input runs the compiled forward and backward on its NHWC memory: without a gradient (inference)
    the output (channels-last) and buffers, with one every gradient too (``dx`` channels-last), within the bound of
    :func:`_assert_within_reference_bound`."""
    n, c, h, w, g = shape
    if mode == "train" and n * h * w == 1:
        pytest.skip("one value per channel: batch statistics are refused")
    x = nchw_input(n, c, h, w, torch.float32, "channels_last", plane_offset=2.0).to(dtype)
    fn = _call(mode, g)
    tensors, buffers = [x, *_params(c, g, dtype)], _buffers(c, torch.float32)
    results = {}
    for name, backend, cast in (("ours", "auto", dtype), ("reference", "reference", dtype),
                                ("reference64", "reference", torch.float64)):
        copies = [b.to(cast) if b.is_floating_point() and name == "reference64" else b.clone() for b in buffers]
        with normlayers.backend(backend), torch.no_grad():
            y = fn(*(t.to(cast) for t in tensors), *copies)
        results[name] = [y, *copies]
    assert results["ours"][0].is_contiguous(memory_format=torch.channels_last)
    _assert_results_within_bound(*results.values())
    assert kernel_calls == ["_native_forward"]
    _assert_within_reference_bound(fn, tensors, buffers)
    assert kernel_calls == ["_native_forward", "_native_forward", "_native_backward"]
    leaf = x.clone().requires_grad_()
    y = fn(leaf, *_params(c, g, dtype), *_buffers(c, torch.float32))
    (dx,) = torch.autograd.grad(y, leaf, torch.randn(y.shape, dtype=dtype))  # an NCHW dy
    assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("order", ["random", "sorted"])
@pytest.mark.parametrize("offset", [30.0, 1e3])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_planes_far_from_zero_within_the_reference_bound(mode, offset, order):
    """Planes at ``offset ± 1``: the plane moments (about the mean of a plane's first values; sorted planes, whose
    first values are their smallest, summed again about the mean) keep the output and every gradient within twice the
    fp32 reference's own error against the fp64 reference, plus the fp32 tolerance (the benchmark's bound)."""
    n, c, h, w, g = 2, 8, 6, 6, 4
    x = (offset + nchw_input(n, c, h, w, torch.float64)).float()
    if order == "sorted":
        x = x.flatten(2).sort(-1).values.view(x.shape)
    buffers = _buffers(c, torch.float32)
    buffers[0] += offset  # eval: running statistics near the data's, as after training on it
    _assert_within_reference_bound(_call(mode, g), [x, *_params(c, g, torch.float32)], buffers)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("head", [4.0, 64.0])
def test_plane_variance_where_the_first_values_are_far_from_the_mean(head, layout):
    """A plane of 1024 values at 100 ± 1 whose first 16 sit ``head`` higher: the sums about those first values
    cancel (mean²/M2 up to ~64 here), so the block is summed again about its mean. The variance (one sample: the
    batch variance is the plane's) stays within 8 fp32 roundoffs of the fp64 one, the two-pass form's accuracy (without
    the second sum: 1.3e-6 and 6.2e-6, 21 and 103 roundoffs)."""
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, :, 0, :16] += head
    x = (x + 100).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    config = cpu_bcn._Config(True, False, 0.1, 0.0, 2, 1e-5, 1e-5)
    params = (None, None, None, None)
    _, statistics = cpu_bcn._native_forward(x, None, None, None, params, config,
                                            cpu_bcn._native_small_bf16(x, None, None, params))
    var = cpu_bcn._native_batch_statistics(statistics, x, config)[1].double()
    var64 = x.double().var((0, 2, 3), correction=0)
    assert ((var - var64).abs() <= 8 * 2.0 ** -24 * var64).all(), ((var - var64) / var64).abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_finite_value_spreads_as_in_the_reference(training, value, dtype):
    """A NaN or inf in one plane: training, its channel's batch statistics, so its group in every sample; eval, its
    own (sample, group) block only. The non-finite outputs are where the reference has them."""
    x = nchw_input(3, 8, 4, 4, torch.float32).to(dtype)
    x[1, 2, 0, 0] = value
    running_mean, running_var, _ = _buffers(8, torch.float32)
    finite = []
    for backend in ("auto", "reference"):
        with normlayers.backend(backend):
            y = NF.batch_channel_norm(x, running_mean.clone(), running_var.clone(), *_params(8, 4, dtype),
                                      training=training, num_groups=4)
        finite.append(y.isfinite())
    assert torch.equal(finite[0], finite[1]) and not finite[0].all() and finite[0].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_same_bits_on_one_and_two_threads(mode, dtype):
    """Threads split planes, channels and (sample, group) blocks, never a sum: the results do not depend on their
    number (the input large enough for two threads' shares)."""
    x = nchw_input(4, 16, 33, 33, torch.float32).to(dtype)
    tensors, buffers = [x, *_params(16, 4, dtype)], _buffers(16, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert cpu_bcn._native_threads(x) == count
            results.append(run_backend("auto", _call(mode, 4), tensors, buffers))
    finally:
        torch.set_num_threads(threads)
    for i, (one, two) in enumerate(zip(*results)):
        assert torch.equal(one, two), i


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_expanded_output_gradient(dtype, layout, kernel_calls):
    """``y.sum()``'s gradient is one value expanded over ``y`` (every stride 0): the backward reads it as a dense
    tensor of ones."""
    x = nchw_input(2, 8, 5, 5, torch.float32, layout).to(dtype)
    grads = []
    for backend in ("auto", "reference"):
        leaf = x.clone().requires_grad_()
        with normlayers.backend(backend):
            y = NF.batch_channel_norm(leaf, None, None, *_params(8, 4, dtype), training=True, num_groups=4)
            grads.append(torch.autograd.grad(y.float().sum() if dtype == torch.float32 else y.sum(), leaf)[0])
    assert grads[0].isfinite().all()
    # the table's atol alone: dx of a sum of normalized values is ~0 everywhere, where rtol means nothing
    torch.testing.assert_close(grads[0].float(), grads[1].float(), atol=tolerance(dtype)[1], rtol=0.0)
    assert kernel_calls == ["_native_forward", "_native_backward"]


def test_mixed_parameter_and_input_dtypes(kernel_calls):
    """bf16 input with fp32 parameters and buffers (a module kept in fp32 under a bf16 activation), fp32 input with
    bf16 parameters: each small tensor is read in its own dtype and its gradient written in it."""
    x = nchw_input(2, 8, 5, 5, torch.float32)
    _assert_within_reference_bound(_call("train", 4), [x.bfloat16(), *_params(8, 4, torch.float32)],
                                   _buffers(8, torch.float32))
    _assert_within_reference_bound(_call("train", 4), [x, *_params(8, 4, torch.bfloat16)], _buffers(8, torch.bfloat16))
    assert kernel_calls.count("_native_backward") == 2


def test_buffers_updated_in_place_under_inference_mode():
    """Under torch.inference_mode the kernel updates normal buffers in place (their version counters move) and
    inference-mode buffers too (they have no version counter)."""
    x = nchw_input(2, 8, 3, 3, torch.float32)
    expected = _buffers(8, torch.float32)
    with normlayers.backend("reference"):
        NF.batch_channel_norm(x, *expected[:2], training=True, num_groups=4, num_batches_tracked=expected[2])
    buffers = _buffers(8, torch.float32)
    with torch.inference_mode():
        inference_buffers = _buffers(8, torch.float32)
        for running_mean, running_var, tracked in (buffers, inference_buffers):
            NF.batch_channel_norm(x, running_mean, running_var, training=True, num_groups=4,
                                  num_batches_tracked=tracked)
    for updated in (buffers, inference_buffers):
        for ours, reference in zip(updated, expected):
            torch.testing.assert_close(ours, reference)
