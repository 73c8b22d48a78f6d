"""The CPU tier of Batch-Channel Normalization (the fused statistics/affine passes and closed-form backward; the
F.batch_norm + F.group_norm composite for channels-last input and under torch.compile) against the reference."""

from __future__ import annotations

import pytest
import torch

import normlayers
import normlayers.functional as NF
from normlayers.cpu import _native
from normlayers.cpu import batch_channel as cpu_bcn
from normlayers.testing import assert_close, assert_lowprec_close, max_abs_error, nchw_input, tolerance

from .conftest import assert_cpu_tier_matches_reference

C, G = 8, 4


def _params(dtype):
    gen = torch.Generator().manual_seed(1)
    return [(1 + 0.1 * torch.randn(n, generator=gen)).to(dtype) if i % 2 == 0 else
            (0.1 * torch.randn(n, generator=gen)).to(dtype) for i, n in enumerate((C, C, G, G))]


def _buffers(dtype):
    gen = torch.Generator().manual_seed(2)
    return [(0.1 * torch.randn(C, generator=gen)).to(dtype), (1 + 0.1 * torch.rand(C, generator=gen)).to(dtype),
            torch.tensor(3)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("mode", ["train", "eval", "estimate_train", "estimate_eval"])
def test_matches_reference(mode, dtype, layout):
    x = nchw_input(3, C, 5, 4, dtype, layout)
    estimate = mode.startswith("estimate")
    training = mode.endswith("train")
    # bf16 buffers too, as after module.to(bf16): the opmath copies must be written back
    buffer_dtype = torch.float32 if dtype == torch.float32 else dtype

    def fn(x, bn_w, bn_b, w, b, running_mean, running_var, tracked):
        return NF.batch_channel_norm(x, running_mean, running_var, bn_w, bn_b, w, b, training=training,
                                     num_groups=G, estimate=estimate, estimate_rate=0.3,
                                     num_batches_tracked=tracked)

    assert_cpu_tier_matches_reference(fn, [x, *_params(dtype)], _buffers(buffer_dtype))


def test_training_without_running_statistics():
    x = torch.randn(4, C, 3, 3)
    assert_cpu_tier_matches_reference(
        lambda x, w, b: NF.batch_channel_norm(x, None, None, None, None, w, b, training=True, num_groups=G),
        [x, *_params(torch.float32)[2:]])


def test_channels_last_output():
    x = nchw_input(2, C, 3, 3, torch.float32, "channels_last")
    y = NF.batch_channel_norm(x, None, None, training=True, num_groups=G)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_momentum_none_and_empty_batch():
    """momentum=None (a cumulative average read from num_batches_tracked) runs the reference; an empty batch
    counts in num_batches_tracked and changes nothing else, as on every backend."""
    x = torch.randn(2, C, 3, 3)
    assert_cpu_tier_matches_reference(
        lambda x, rm, rv, t: NF.batch_channel_norm(x, rm, rv, training=True, momentum=None, num_groups=G,
                                                   num_batches_tracked=t), [x], _buffers(torch.float32))
    running_mean, running_var, tracked = _buffers(torch.float32)
    y = NF.batch_channel_norm(torch.randn(0, C, 3, 3), running_mean, running_var, training=True, num_groups=G,
                              num_batches_tracked=tracked)
    assert y.shape == (0, C, 3, 3) and tracked.item() == 4
    assert torch.equal(running_mean, _buffers(torch.float32)[0])


def test_compiles_fullgraph():
    """Under torch.compile the composite is traced (fullgraph); eager runs the fused Function. Both against the fp64
    reference, allowing twice the fp32 reference's own error per tensor (the low-precision rule, applied to fp32):
    with this loss the batch-stage weight gradients are sums that cancel to ~1e-3 of their terms (the group stage
    undoes most of a per-channel scale), so every fp32 ordering, the reference's too, is ~1e-5 off, torch.testing's
    whole atol."""
    torch._dynamo.reset()
    x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(3))

    def step(x, bn_w, bn_b, w, b, running_mean, running_var, tracked):
        y = NF.batch_channel_norm(x, running_mean, running_var, bn_w, bn_b, w, b, training=True, num_groups=G,
                                  num_batches_tracked=tracked)
        return y.square().sum()

    def results(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, *_params(torch.float32))]
        buffers = [b.to(dtype) if b.is_floating_point() else b for b in _buffers(torch.float32)]
        return [*torch.autograd.grad(fn(*leaves, *buffers), leaves), *buffers]

    with normlayers.backend("reference"):
        expected, reference32 = results(step, torch.float64), results(step, torch.float32)
    rtol, atol = tolerance(torch.float32)
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        for i, (a, r, e) in enumerate(zip(results(fn, torch.float32), reference32, expected)):
            if a.is_floating_point():
                bound = 2 * max_abs_error(r, e) + atol + rtol * e.abs().max().item()
                assert max_abs_error(a, e) <= bound, (i, max_abs_error(a, e), bound)
            else:
                assert torch.equal(a, e), i


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["train", "eval", "estimate_train", "estimate_eval"])
def test_low_precision_inference_matches_reference(mode, dtype, layout, monkeypatch):
    """With no gradient to compute, bf16/fp16 input runs the fused forward (per-plane moments, then one affine pass
    from x, rounded once; channels-last input the compiled kernel where it runs, else the composite in fp32): output
    and running buffers (fp32 and, as after module.to(dtype), the input's dtype) by the low-precision rule against the
    fp64 reference. The input has a mean far from 0, where statistics rounded to bf16/fp16 or an intermediate rounded
    between the stages would show."""
    ran = []
    monkeypatch.setattr(cpu_bcn, "_fused_forward", lambda *a, **k: ran.append("numpy") or fused_forward(*a, **k))
    monkeypatch.setattr(cpu_bcn, "_native_forward", lambda *a, **k: ran.append("C") or native_forward(*a, **k))
    x = nchw_input(3, C, 5, 4, dtype, layout)
    x = (3.0 + 2.0 * x.float()).to(dtype)
    for buffer_dtype in (torch.float32, dtype):
        results = {}
        for name, backend, cast in (("auto", "auto", dtype), ("reference", "reference", dtype),
                                    ("reference64", "reference", torch.float64)):
            running_mean, running_var, tracked = (b.to(cast if name == "reference64" else buffer_dtype)
                                                  if b.is_floating_point() else b for b in _buffers(torch.float32))
            with normlayers.backend(backend), torch.no_grad():
                y = NF.batch_channel_norm(x.to(cast), running_mean, running_var,
                                          *(p.to(cast) for p in _params(torch.float32)),
                                          training=mode.endswith("train"), num_groups=G,
                                          estimate=mode.startswith("estimate"), estimate_rate=0.3,
                                          num_batches_tracked=tracked)
            results[name] = (y, running_mean, running_var, tracked)
        ours, reference, reference64 = results["auto"], results["reference"], results["reference64"]
        assert ours[0].dtype == dtype and ours[0].stride() == reference[0].stride()
        assert_lowprec_close(ours[0], reference[0], reference64[0], msg="output")
        for i in (1, 2):
            if buffer_dtype == torch.float32:
                assert_close(ours[i], reference[i], msg=f"buffer {i}")
            else:
                assert_lowprec_close(ours[i], reference[i], reference64[i], msg=f"buffer {i}")
        assert torch.equal(ours[3], reference[3])
    fused = "C" if dtype == torch.bfloat16 and cpu_bcn._native_kernels() is not None else "numpy"
    assert ran == ([] if layout == "channels_last" and fused == "numpy" else [fused, fused])


fused_forward, native_forward = cpu_bcn._fused_forward, cpu_bcn._native_forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_runs_the_fused_function(dtype):
    """A contiguous input with a gradient to compute runs the fused autograd.Function (one statistics pass, one
    affine pass), not autograd through the two ATen stages."""
    x = torch.randn(2, C, 3, 3, dtype=dtype, requires_grad=True)
    y = NF.batch_channel_norm(x, None, None, training=True, num_groups=G)
    assert type(y.grad_fn).__name__ == "_BatchChannelNormFunctionBackward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nan_plane_matches_reference(dtype):
    """A NaN in one plane poisons its channel's batch statistics and so that group in every sample, as in the
    reference; the other groups stay finite (bf16: through the low-precision statistics)."""
    x = torch.randn(3, C, 4, 4).to(dtype)
    x[1, 2, 0, 0] = float("nan")
    nan_masks = []
    for backend in ("auto", "reference"):
        with normlayers.backend(backend):
            nan_masks.append(NF.batch_channel_norm(x, None, None, training=True, num_groups=G).isnan())
    assert torch.equal(nan_masks[0], nan_masks[1]) and nan_masks[0].any() and not nan_masks[0].all()


def test_fp16_near_constant_channel_gradient_stays_finite():
    """Two near-constant channels make the dy coefficient of dx (w·R·γ/σ per plane) larger than fp16's range; the
    backward then runs its affine in fp32 (rounded once) rather than rounding that coefficient to fp16 (inf)."""
    x = torch.randn(2, C, 3, 3, generator=torch.Generator().manual_seed(0))
    x[:, :2] = 1.0 + 1e-4 * torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    dy = 1e-3 * torch.randn(2, C, 3, 3, generator=torch.Generator().manual_seed(2))
    grads = {}
    for name, backend, dtype in (("auto", "auto", torch.float16), ("reference", "reference", torch.float16),
                                 ("reference64", "reference", torch.float64)):
        leaf = x.half().to(dtype).requires_grad_()
        with normlayers.backend(backend):
            y = NF.batch_channel_norm(leaf, None, None, training=True, num_groups=G)
            grads[name] = torch.autograd.grad(y, leaf, dy.to(dtype))[0]
    assert grads["auto"].isfinite().all()
    assert_lowprec_close(grads["auto"], grads["reference"], grads["reference64"])


def test_plain_call_fast_path_accepts_only_valid_calls():
    """The functional's plain-call test (which skips the full checks) holds for a module's plain call, and for none
    that the full checks refuse: each of those still raises its error."""
    from normlayers.functional import batch_channel as F_bcn

    x = torch.randn(2, C, 3, 3)
    running_mean, running_var, tracked = _buffers(torch.float32)
    valid = dict(input=x, running_mean=running_mean, running_var=running_var, bn_weight=torch.ones(C),
                 bn_bias=torch.zeros(C), weight=torch.ones(1, G, 1), bias=torch.zeros(G), training=True, momentum=0.1,
                 eps=1e-5, bn_eps=1e-5, num_groups=G, estimate=False, estimate_rate=0.0, num_batches_tracked=tracked)
    assert F_bcn._is_plain_batch_channel_call(**valid)
    assert F_bcn._is_plain_batch_channel_call(**{**valid, "estimate": True, "estimate_rate": torch.tensor(0.5)})
    invalid = [dict(input=x.int()), dict(input=x[0]), dict(num_groups=3), dict(num_groups=0), dict(num_groups=2.0),
               dict(running_mean=torch.zeros(C + 1)), dict(running_var=None), dict(running_mean=None, running_var=None,
               training=False), dict(bn_weight=torch.ones(C, 1)), dict(bn_bias=torch.zeros(C, dtype=torch.int32)),
               dict(weight=torch.ones(G + 1)), dict(bias=torch.zeros(G).int()), dict(momentum=1.5),
               dict(eps=0.0), dict(bn_eps=float("nan")), dict(estimate_rate=-0.1), dict(estimate_rate=torch.ones(2)),
               dict(num_batches_tracked=torch.tensor(1.0)), dict(input=torch.randn(1, C, 1, 1)),
               dict(running_mean=torch.zeros(C, requires_grad=True))]
    for change in invalid:
        args = {**valid, **change}
        assert not F_bcn._is_plain_batch_channel_call(**args), change
        with pytest.raises((ValueError, TypeError)):
            NF.batch_channel_norm(args.pop("input"), args.pop("running_mean"), args.pop("running_var"), **args)


def _moments64(x):
    """The fp64 mean and biased variance of each (sample, channel) plane, ``(N, C)``."""
    planes = x.double().flatten(2)
    return planes.mean(-1), planes.var(-1, correction=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hw", [(5, 4), (14, 14), (56, 56)])
def test_raw_plane_moments_within_their_bound(dtype, hw):
    """The raw-moment statistics, where trusted, are within the bound :func:`_raw_moments_limit` states: the variance
    within u/8 (u the dtype's unit roundoff) of the fp64 one, the mean within that of the spread. The planes' offsets
    go up to just below the limit, where the cancellation is largest; an all-zero plane is trusted (variance 0)."""
    h, w = hw
    limit = cpu_bcn._raw_moments_limit(h * w, dtype)
    assert limit > 0
    x = torch.randn(4, 6, h, w, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), correction=0, keepdim=True)  # mean 0, variance 1
    x = (x + torch.linspace(0, (0.95 * limit) ** 0.5, 24, dtype=torch.float64).view(4, 6, 1, 1)).to(dtype)
    x[0, 0] = 0
    moments = cpu_bcn._raw_plane_moments(x)
    assert moments is not None
    mean, var = (torch.from_numpy(m) for m in moments)  # host arrays
    mean64, var64 = _moments64(x)
    roundoff = torch.finfo(dtype).eps / 2
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (4, 6)
    assert ((var.double() - var64).abs() <= roundoff / 8 * var64).all()
    assert ((mean.double() - mean64).abs() <= roundoff / 8 * var64.sqrt() + 1e-30).all()
    assert var[0, 0] == 0 and mean[0, 0] == 0


@pytest.mark.parametrize("dtype, case", [(dtype, case) for dtype in (torch.bfloat16, torch.float16)
                                         for case in ("offset", "nan", "inf", "overflow")
                                         if (dtype, case) != (torch.float16, "overflow")],
                         ids=["bf16-offset", "bf16-nan", "bf16-inf", "bf16-overflow", "fp16-offset", "fp16-nan",
                              "fp16-inf"])
def test_raw_plane_moments_refused(dtype, case):
    """One plane the raw moments cannot give to the bound (mean²/var past the limit), a NaN, an inf, or a plane whose
    Σ x² overflows fp32 (bf16 only: fp16 values square to at most 4.3e9): the raw moments are refused."""
    x = torch.randn(2, 4, 5, 4, generator=torch.Generator().manual_seed(6)).to(dtype)
    assert cpu_bcn._raw_plane_moments(x) is not None
    limit = cpu_bcn._raw_moments_limit(20, dtype)
    plane = torch.randn(5, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    plane = (plane - plane.mean()) / plane.std(correction=0)
    x[1, 2] = {"offset": plane + 1.1 * limit ** 0.5, "nan": plane.masked_fill(plane > 1, float("nan")),
               "inf": plane.masked_fill(plane > 1, float("inf")), "overflow": plane * 1e20}[case].to(dtype)
    assert cpu_bcn._raw_plane_moments(x) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_low_precision_statistics_route(dtype, mode, offset, monkeypatch):
    """bf16/fp16 on the ATen path (no compiled kernels): the forward takes its per-plane statistics from the raw
    moments when they are trusted (planes centred near 0) and from the two-pass group norm when they are not (planes
    at 30 ± 1, mean²/var ~900); both routes by the low-precision rule against the fp64 reference, output and
    (training) every gradient."""
    monkeypatch.setattr(_native, "_ENABLED", False)  # as NORMLAYERS_CPU_KERNELS=0 at import
    taken = []
    monkeypatch.setattr(cpu_bcn, "_plane_moments", lambda x: taken.append("two-pass") or plane_moments(x))
    x = (offset + nchw_input(3, C, 6, 6, torch.float32)).to(dtype)

    def fn(x, bn_w, bn_b, w, b, running_mean, running_var, tracked):
        return NF.batch_channel_norm(x, running_mean, running_var, bn_w, bn_b, w, b, training=mode == "train",
                                     num_groups=G, num_batches_tracked=tracked)

    assert_cpu_tier_matches_reference(fn, [x, *_params(dtype)], _buffers(torch.float32))
    assert taken == ([] if offset == 0 else ["two-pass"])


plane_moments = cpu_bcn._plane_moments


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_training_updates_the_buffers_in_place(dtype, monkeypatch):
    """The fused path's statistics algebra runs on the host; its batch statistics reach the buffers themselves (same
    memory, version counters moved, as F.batch_norm's update), at the reference's values."""
    monkeypatch.setattr(cpu_bcn, "_composite", lambda *args, **kwargs: pytest.fail("the composite ran"))
    x = nchw_input(3, C, 4, 4, torch.float32).to(dtype)
    buffers, expected = _buffers(torch.float32), _buffers(torch.float32)
    pointers, versions = [t.data_ptr() for t in buffers], [t._version for t in buffers]
    for backend, (running_mean, running_var, tracked) in (("auto", buffers), ("reference", expected)):
        with normlayers.backend(backend):
            NF.batch_channel_norm(x, running_mean, running_var, *_params(dtype), training=True, num_groups=G,
                                  num_batches_tracked=tracked)
    assert [t.data_ptr() for t in buffers] == pointers
    assert all(t._version > version for t, version in zip(buffers, versions))
    for ours, reference in zip(buffers[:2], expected[:2]):
        assert_close(ours, reference)
    assert torch.equal(buffers[2], expected[2])


def test_eval_double_backward_reads_the_forward_statistics():
    """In eval the batch stage's statistics are the running buffers: the fused forward keeps copies of them, so an
    update of the buffers between the forward and a (double) backward, e.g. another training call, does not reach
    the gradients."""
    x = nchw_input(2, C, 3, 3, torch.float32).to(torch.bfloat16).requires_grad_()
    running_mean, running_var, _ = _buffers(torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.dtype)
    y = NF.batch_channel_norm(x, running_mean, running_var, *_params(torch.bfloat16), num_groups=G)
    first = torch.autograd.grad(y, x, dy, create_graph=True, retain_graph=True)[0]
    running_mean.add_(1.0)
    running_var.mul_(4.0)
    second = torch.autograd.grad(y, x, dy, create_graph=True)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fake_tensors_run_the_reference(training):
    """A FakeTensor has no values to read on the host: the reference runs (shape and dtype only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, C, 3, 3, dtype=torch.bfloat16)
        running_mean, running_var = torch.zeros(C), torch.ones(C)
        y = NF.batch_channel_norm(x, running_mean, running_var, *_params(torch.bfloat16), training=training,
                                  num_groups=G)
    assert y.shape == x.shape and y.dtype == torch.bfloat16


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vmap_runs_the_reference(training):
    """Under ``torch.func.vmap`` the tensors are wrapped (no storage to read): the reference runs, and each sample's
    output matches a plain call's by the low-precision rule."""
    x = nchw_input(4, C, 3, 3, torch.float32).view(2, 2, C, 3, 3).to(torch.bfloat16)
    running_mean, running_var, _ = _buffers(torch.float32)
    params = _params(torch.bfloat16)

    def call(sample, backend="auto"):
        with normlayers.backend(backend):
            return NF.batch_channel_norm(sample, None if training else running_mean,
                                         None if training else running_var, *params, training=training, num_groups=G)

    mapped = torch.func.vmap(call)(x)
    for i in range(2):
        assert_lowprec_close(mapped[i], call(x[i]), call(x[i].double(), "reference"))


def test_eval_gradient_of_running_statistics_matches_reference():
    """A gradient for the running statistics (eval; ATen's norms refuse one) comes from the reference's autograd."""
    x = nchw_input(2, C, 3, 3, torch.float32).to(torch.bfloat16)
    grads = {}
    for backend in ("auto", "reference"):
        running_mean, running_var = (t.requires_grad_() for t in _buffers(torch.float32)[:2])
        with normlayers.backend(backend):
            y = NF.batch_channel_norm(x, running_mean, running_var, *_params(torch.bfloat16), num_groups=G)
        grads[backend] = torch.autograd.grad(y.float().square().sum(), (running_mean, running_var))
    for ours, reference in zip(grads["auto"], grads["reference"]):
        assert torch.equal(ours, reference)
