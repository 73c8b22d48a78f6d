"""The CPU tier of GroupNorm: channels-last weight and bias gradients summed accurately where ATen's are not."""

from __future__ import annotations

import pytest
import torch

import normlayers
from normlayers import functional as NF
from normlayers.bench.accuracy import error_bounds, max_abs_error
from normlayers.cpu import _native
from normlayers.cpu import batch_channel as cpu_batch_channel
from normlayers.cpu import group_norm as cpu_group_norm
from normlayers.reference import group_norm as ref

from .conftest import run_backend


def _inputs(shape, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape, generator=generator).contiguous(memory_format=memory_format)
    weight = 1 + 0.1 * torch.randn(shape[1], generator=generator)
    bias = 0.1 * torch.randn(shape[1], generator=generator)
    return [t.to(dtype) for t in (x, weight, bias)]


@pytest.mark.parametrize("shape", [(1, 64, 64, 64), (2, 64, 45, 50)], ids=["64x64", "2x45x50"])
@pytest.mark.parametrize("act", [None, "silu"])
def test_channels_last_parameter_gradients_within_half_the_bench_bound(act, shape):
    """64×64 planes: ATen's channels-last backward adds each plane's 4096 products in one fp32 run, and its dbias
    lands at 0.7 of the benchmark's accuracy bound (2× the fp32 reference's error + the fp32 table's slack) here
    (up to 1.25 at 128×64 planes: WRONG); ours must stay under half of it (0.2 measured), with margin for other
    shapes. 45×50 planes (2250 positions: 8 runs of 256 and one of 202), two samples: the same bound."""
    def fn(*tensors):
        return NF.group_norm(tensors[0], 32, *tensors[1:], 1e-5, act)

    def ref_fn(*tensors):
        return ref.group_norm(tensors[0], 32, *tensors[1:], 1e-5, act)

    names = ("y", "dx", "dweight", "dbias")
    ours = dict(zip(names, run_backend("auto", fn, _inputs(shape))))
    baseline = dict(zip(names, run_backend("reference", ref_fn, _inputs(shape))))
    expected = dict(zip(names, run_backend("reference", ref_fn, _inputs(shape, torch.float64))))
    bounds = error_bounds(baseline, expected, torch.float32)
    assert ours["dx"].is_contiguous(memory_format=torch.channels_last)
    for name in names:
        assert max_abs_error(ours[name], expected[name]) <= 0.5 * bounds[name], name


@pytest.mark.parametrize("shape", [(2, 64, 32, 64), (2, 64, 45, 50), (1, 64, 3, 30, 30)],
                         ids=["2048", "2250", "3d-2700"])
@pytest.mark.parametrize("requires_grad", [(True, False, True), (False, True, False), (True, None, True)],
                         ids=["dx-dbias", "dweight", "no-weight"])
def test_channels_last_gradients_of_any_subset_match_the_reference(requires_grad, shape):
    """The closed-form backward returns exactly the gradients asked for, each matching autograd of the reference, on
    planes of 2048 or more (the accurate path): a whole number of runs, a last shorter run, channels_last_3d, no
    weight (``dx`` without the per-channel scale); ``dx`` in the input's memory format."""
    x, weight, bias = _inputs(shape, torch.float64)
    weight = None if requires_grad[1] is None else weight
    leaves = [t.requires_grad_(bool(need)) for t, need in zip((x, weight, bias), requires_grad) if t is not None]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wanted = [t for t in leaves if t.requires_grad]
    ours = torch.autograd.grad(NF.group_norm(x, 32, weight, bias, 1e-5, "silu"), wanted, dy)
    expected = torch.autograd.grad(ref.group_norm(x, 32, weight, bias, 1e-5, "silu"), wanted, dy)
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e)
    if x.requires_grad:
        memory_format = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert ours[0].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("requires_grad", [(True, False, True), (False, True, False), (True, None, True)],
                         ids=["dx-dbias", "dweight", "no-weight"])
def test_nchw_accurate_path_of_any_subset_matches_the_reference(requires_grad, monkeypatch):
    """NCHW input through the accurate forward and backward (forced: no statistics trusted; fp64, offset 3) returns
    the reference's output, training and inference, and exactly the gradients asked for, each matching autograd of the
    reference, 3-D input included; double backward too."""
    monkeypatch.setitem(cpu_group_norm._TRUSTED_GRADIENT_SPREAD, torch.float64, 0.0)
    monkeypatch.setitem(cpu_group_norm._TRUSTED_AFFINE_PRODUCT, torch.float64, 0.0)
    for shape in [(2, 64, 12, 10), (1, 64, 3, 5, 6)]:
        x, weight, bias = _inputs(shape, torch.float64)
        x = (x + 3).contiguous()
        weight = None if requires_grad[1] is None else weight
        leaves = [t.requires_grad_(bool(need)) for t, need in zip((x, weight, bias), requires_grad) if t is not None]
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        wanted = [t for t in leaves if t.requires_grad]
        y = NF.group_norm(x, 32, weight, bias, 1e-5, "silu")
        assert "_GroupNormFunction" in type(y.grad_fn.next_functions[0][0]).__name__ + type(y.grad_fn).__name__
        y_expected = ref.group_norm(x, 32, weight, bias, 1e-5, "silu")
        ours = torch.autograd.grad(y, wanted, dy)
        expected = torch.autograd.grad(y_expected, wanted, dy)
        with torch.no_grad():
            y_no_grad = NF.group_norm(x, 32, weight, bias, 1e-5, "silu")
        for a, e in zip((y, y_no_grad, *ours), (y_expected, y_expected, *expected)):
            torch.testing.assert_close(a, e)
    assert torch.autograd.gradgradcheck(lambda *a: NF.group_norm(a[0], 1, *a[1:], 1e-5, "silu"),
                                        [t.detach().requires_grad_() for t in _inputs((1, 2, 4, 6), torch.float64)],
                                        fast_mode=True)


def test_nchw_offset_input_under_torch_func_is_atens():
    """Under ``torch.func.grad`` (wrapped tensors, no storage: the autograd.Function cannot take them) NCHW input offset
    by 5 keeps ATen's backward: the gradient of ``F.group_norm``, bit for bit; under ``torch.func.vmap`` (whose
    statistics cannot be read as numbers) input offset by 1000 keeps ATen's forward."""
    x, weight, bias = _inputs((2, 64, 12, 10))
    x = (x + 5).contiguous()
    ours = torch.func.grad(lambda t: NF.group_norm(t, 32, weight, bias, 1e-5, None).pow(2).sum())(x)
    expected = torch.func.grad(lambda t: torch.nn.functional.group_norm(t, 32, weight, bias, 1e-5).pow(2).sum())(x)
    assert torch.equal(ours, expected)
    batch = torch.stack((x, x)) + 995
    with torch.no_grad():
        ours = torch.func.vmap(lambda t: NF.group_norm(t, 32, weight, bias, 1e-5, None))(batch)
        expected = torch.func.vmap(lambda t: torch.nn.functional.group_norm(t, 32, weight, bias, 1e-5))(batch)
    assert torch.equal(ours, expected)


def _input_grad_closed_form(x, dy, weight, mean, rstd, dtype):
    """Group norm's ``dx = r·(g − E[g] − x̂·E[g·x̂])``, ``g = γ·dy``, ``x̂ = (x − μ)·r``, from the given ``(N, G)``
    statistics, evaluated in ``dtype`` (centred first, means by torch's reductions)."""
    n, c = x.shape[:2]

    def per_channel(stat):
        return stat.to(dtype).repeat_interleave(c // mean.shape[1], 1)[:, :, None, None]

    def group_mean(t):
        return per_channel(t.reshape(n, mean.shape[1], -1).mean(-1))

    x_hat = (x.to(dtype) - per_channel(mean)) * per_channel(rstd)
    scaled_dy = weight.to(dtype)[:, None, None] * dy.to(dtype)
    return per_channel(rstd) * (scaled_dy - group_mean(scaled_dy) - x_hat * group_mean(scaled_dy * x_hat))


@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("shape", [(1, 64, 64, 64), (2, 64, 45, 50)], ids=["64x64", "2x45x50"])
def test_channels_last_input_gradient_from_given_statistics_within_twice_the_reference(shape, offset):
    """``dx`` of the accurate path from the same fp32 statistics as the closed form it is checked against (fp64), at
    most twice as far off as that closed form evaluated in fp32, inputs centred or offset by 100 standard deviations.
    ATen's backward from those statistics is 20× further off at the offset (its sums are of ``dy·x``, the mean taken
    off afterwards; ours centre ``x`` first). The end-to-end tests cannot offset the input: ATen's channels-last
    forward, which both paths share, loses its statistics there."""
    x, weight, _ = _inputs(shape)
    x = (x + offset).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=torch.channels_last)
    n, c = x.shape[:2]
    _, mean, rstd = torch.native_group_norm(x, weight, None, n, c, x.shape[2] * x.shape[3], 32, 1e-5)
    ours = cpu_group_norm._input_grad(dy, x, weight, mean, rstd,
                                      *cpu_group_norm._per_channel_sums(dy, x, mean, rstd))
    expected = _input_grad_closed_form(x, dy, weight, mean, rstd, torch.float64)
    baseline = _input_grad_closed_form(x, dy, weight, mean, rstd, torch.float32)
    assert max_abs_error(ours, expected) <= 2 * max_abs_error(baseline, expected)


def test_channels_last_double_backward():
    """create_graph=True differentiates ATen's group_norm from x (the saved statistics hold no graph)."""
    x, weight, bias = (t.requires_grad_() for t in _inputs((1, 2, 32, 64), torch.float64))
    assert torch.autograd.gradgradcheck(lambda *a: NF.group_norm(a[0], 1, *a[1:], 1e-5, "silu"), (x, weight, bias),
                                        fast_mode=True)


def _offset_inputs(shape, offset, layout, dtype):
    """``N(0, 1) + offset`` input in ``layout`` (NCHW or channels-last), weight and bias as :func:`_inputs`."""
    x, weight, bias = _inputs(shape, torch.float64)
    x = x + offset
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    else:
        x = x.contiguous()
    return [t.to(dtype) for t in (x, weight, bias)]


def _results(backend, tensors, act):
    """``[y, dx, dweight, dbias]`` of a forward and backward, and ``y`` of a forward under ``no_grad``."""
    def fn(*leaves):
        return NF.group_norm(leaves[0], 32, *leaves[1:], 1e-5, act)

    results = run_backend(backend, fn, tensors)
    with torch.no_grad(), normlayers.backend(backend):  # the inference call: its own route (activation in place)
        results.append(fn(*tensors))
    return dict(zip(("y", "dx", "dweight", "dbias", "y_no_grad"), results))


@pytest.mark.parametrize("offset", [1.0, 5.0, 100.0])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("shape", [(1, 64, 64, 64), (2, 64, 12, 10), (1, 64, 3, 30, 30)], ids=["64x64", "12x10", "3d"])
@pytest.mark.parametrize("act", [None, "silu"])
def test_offset_input_within_the_bound(act, shape, layout, offset):
    """Inputs offset by 1, 5 and 100 standard deviations (post-activation inputs sit at ~1): the output and every
    gradient, training and inference, within the fp32 bound of the benchmark (2× the fp32 reference's error against
    fp64 + the fp32 tolerance). ATen's channels-last forward takes the variance as E[x²] − E[x]² and is 2-10× over
    that bound at offset 5 and 10³× at 100 (its statistics feed the gradients too); planes of 4096 (the accurate
    backward's), of 120 (ATen's backward) and 3-D. ATen's NCHW backward takes ``dweight`` as
    ``Σ_n (Σ dy·x − mean·Σ dy)·rstd`` and is 1.2-2.2× over the bound at offset 5 and 1.1-8.4× at 100: the CPU tier
    checks the forward's statistics and runs its own backward from centred sums there."""
    ours, expected, bounds = _offset_errors(shape, offset, layout, act)
    for name, bound in bounds.items():
        assert max_abs_error(ours[name], expected[name]) <= bound, name


def _offset_errors(shape, offset, layout, act):
    tensors = _offset_inputs(shape, offset, layout, torch.float32)
    ours = _results("auto", tensors, act)
    baseline = _results("reference", tensors, act)
    expected = _results("reference", _offset_inputs(shape, offset, layout, torch.float64), act)
    return ours, expected, error_bounds(baseline, expected, torch.float32)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("shape", [(4, 64, 6, 6), (4, 64, 8, 8), (2, 64, 12, 10), (1, 64, 3, 30, 30), (1, 64, 64, 64)],
                         ids=["4x6x6", "4x8x8", "12x10", "3d", "64x64"])
def test_input_offset_by_1000_within_the_bound(shape, layout):
    """Input offset by 1000 standard deviations: the output (training and inference) and ``dx``, ``dweight``,
    ``dbias`` within the fp32 bound. NCHW: ATen's forward writes ``x·scale + shift``, both terms of the size of
    ``mean·rstd``: 0.82-1.14 of the bound here (1.14 on 4×64×6×6), and its rstd fed ``dx`` at 1.31 on 4×64×8×8 before
    the CPU tier recomputed both from the centred input; ATen's backward has ``dweight`` 2.3-12× over the bound,
    ``dx`` 1.3-3.7×, and ours without centring ``x`` about its exact group mean first, from the rounded fp32 mean,
    ``dweight`` 1.08× on the 3-D input. Channels-last: the backward runs from the recomputed statistics, its saved
    mean rounded (measured at most 0.49 of the bound, ``dweight``)."""
    ours, expected, bounds = _offset_errors(shape, 1000.0, layout, None)
    if layout == "contiguous":
        # an NCHW inference call is ATen's unchecked (its cost, cpu/group_norm.py): 0.82-1.14 of the bound here,
        # so held to 1.5× it, which still fails a raw-moment variance (10³× at offset 100)
        bounds["y_no_grad"] *= 1.5
    for name, bound in bounds.items():
        assert max_abs_error(ours[name], expected[name]) <= bound, name


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
def test_offset_input_of_other_dtypes_within_the_bound(dtype, layout):
    """bf16/fp16 input (normalized in fp32, rounded once) offset by 100, fp64 by 10⁵ (ATen's fp64 channels-last
    forward is 1.4e-4 off there; its NCHW backward is kept, sqrt(k·H·W) = 6.4e6 being within its fp64 threshold):
    within the bound of their dtype (2× the reference's error in that dtype against fp64, + the dtype's tolerance)."""
    offset = 1e5 if dtype is torch.float64 else 100.0
    tensors = _offset_inputs((1, 64, 64, 64), offset, layout, dtype)
    ours = _results("auto", tensors, "silu")
    baseline = _results("reference", tensors, "silu")
    expected = _results("reference", [t.double() for t in tensors], "silu")
    bounds = error_bounds(baseline, expected, dtype)
    for name, bound in bounds.items():
        assert max_abs_error(ours[name], expected[name]) <= bound, name


# On one thread (CI's share per xdist worker) without the compiled kernels, dbn_bias at bn_offset 100 is 6.0e-4 from
# fp64 against a bound of 5.4e-4 (1.1x); on two threads it passes. The group stage's channels-last backward is ATen's
# there (2×64×32×32: planes of 1024, under the accurate path's 2048): with the compiled kernel
# (cpu/csrc/group_norm_channels_last.c, sums in runs of 128 positions) it is 1.7e-4 on one thread.
_ONE_THREAD_OVER_BOUND = pytest.mark.xfail(
    torch.get_num_threads() == 1 and _native.load("group_norm_channels_last") is None, strict=True,
    reason="one thread, ATen path: dbn_bias 6.0e-4 > 5.4e-4 (1.1x), sequential sums (measured; 2 threads pass)")


@pytest.mark.parametrize("bn_offset", [5.0, pytest.param(100.0, marks=_ONE_THREAD_OVER_BOUND)])
def test_batch_channel_norm_channels_last_group_stage_of_offset_batch_output(bn_offset, monkeypatch):
    """BatchChannelNorm's channels-last composite runs the group stage on the batch stage's output ``u``, which carries
    the per-channel ``bn_bias`` (here ``bn_offset`` + small differences): through the CPU tier's group norm its output
    and gradients stay within the fp32 bound (through ``F.group_norm`` the output was 1.6e-4 from fp64 at an offset
    of 5 and 4.2e-2 at 100, against bounds of 2.0e-5 and 5.2e-5). The composite runs where BCN's compiled kernels do
    not, so they are left out here."""
    monkeypatch.setattr(cpu_batch_channel, "_native_kernels", lambda: None)
    generator = torch.Generator().manual_seed(2)
    c, groups = 64, 32
    x = torch.randn(2, c, 32, 32, generator=generator, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    bn_bias = bn_offset + 0.1 * torch.randn(c, generator=generator, dtype=torch.float64)
    tensors = [x, 1 + 0.1 * torch.randn(c, generator=generator, dtype=torch.float64), bn_bias,
               1 + 0.1 * torch.randn(groups, generator=generator, dtype=torch.float64),
               0.1 * torch.randn(groups, generator=generator, dtype=torch.float64)]
    buffers = [torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)]

    def fn(x, bn_weight, bn_bias, weight, bias, running_mean, running_var):
        return NF.batch_channel_norm(x, running_mean, running_var, bn_weight, bn_bias, weight, bias, training=True,
                                     num_groups=groups)

    def run(backend, dtype):
        return run_backend(backend, fn, [t.to(dtype) for t in tensors], [b.to(dtype) for b in buffers])

    names = ("y", "dx", "dbn_weight", "dbn_bias", "dweight", "dbias")
    ours, baseline, expected = (dict(zip(names, run(backend, dtype))) for backend, dtype in
                                (("auto", torch.float32), ("reference", torch.float32),
                                 ("reference", torch.float64)))
    for name, bound in error_bounds(baseline, expected, torch.float32).items():
        assert max_abs_error(ours[name], expected[name]) <= bound, name
