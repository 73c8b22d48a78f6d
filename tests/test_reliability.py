"""Reliability on every backend: masked values that never leak, one NaN pattern (torch's), right answers at extreme
magnitudes, double backward, clear errors at edges (docs/reliability.md states what holds)."""

from __future__ import annotations

import copy

import pytest
import torch

import normlayers
import normlayers.functional as F
from normlayers.testing import assert_close

BACKENDS = ("reference", "triton", "auto")


def _on(backend_name: str, fn, *args, **kwargs):
    with normlayers.backend(backend_name):
        return fn(*args, **kwargs)


def _token_layer(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "power":
        return normlayers.PowerNorm(6, batch_first=True, warmup_iters=2)
    if name == "power_no_groups":
        return normlayers.PowerNorm(6, batch_first=True, warmup_iters=2, group_num=None)
    return normlayers.UnifiedNorm(6, warmup_iters=2)


def _running_stat(layer: torch.nn.Module) -> torch.Tensor:
    return layer.running_phi if isinstance(layer, normlayers.PowerNorm) else layer.running_var


TOKEN_LAYERS = ("power", "power_no_groups", "unified")


# ----------------------------------------------------------------------------------------------------------------------
# Item 2: a masked-out value never influences anything
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", TOKEN_LAYERS)
def test_nan_in_a_padded_token_leaks_nowhere(backend_name, name):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 6)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    poisoned = x.clone()
    poisoned[1, 4] = float("nan")
    clean = x.clone()
    clean[1, 3:] = 0.0
    layers = {}
    for key, inp in (("poisoned", poisoned), ("clean", clean)):
        layer = _token_layer(name).train()
        inp = inp.requires_grad_()
        y = _on(backend_name, layer, inp, pad)
        _on(backend_name, lambda: y[~pad].square().sum().backward())
        layers[key] = (layer, y, inp.grad)
    (layer, y, grad), (clean_layer, y_clean, grad_clean) = layers["poisoned"], layers["clean"]
    assert torch.isfinite(y[~pad]).all()
    assert_close(y[~pad], y_clean[~pad])
    assert_close(_running_stat(layer), _running_stat(clean_layer))
    # Not compared: ema_gz, and UnifiedNorm's input gradient (which reads this step's ema_gz): both methods' official
    # backward averages g·z over ALL tokens, pads included (docs/reliability.md). PowerNorm's gradient of this step
    # reads the previous ema_gz only.
    if name.startswith("power"):
        assert_close(grad[~pad], grad_clean[~pad])
    layer.eval()
    assert torch.isfinite(_on(backend_name, layer, torch.randn(2, 4, 6))).all()


def _region_inputs():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 1:3, 1:3] = 1.0
    return x, mask


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("stats", ("batch", "instance"))
@pytest.mark.parametrize("region", ("hole", "valid"))
def test_nan_in_one_region_stays_in_that_region(backend_name, stats, region):
    x, mask = _region_inputs()
    layer = normlayers.RegionNorm2d(3, stats=stats)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    inside = mask.bool().expand_as(x) if region == "hole" else ~mask.bool().expand_as(x)
    poisoned = x.clone()
    poisoned[inside.nonzero()[0].unbind()] = float("nan")
    runs = []
    for inp in (poisoned, x):
        inp = inp.clone().requires_grad_()
        layer.zero_grad()
        y = _on(backend_name, layer, inp, mask)
        _on(backend_name, lambda: y[~inside].square().sum().backward())
        other = "background" if region == "hole" else "foreground"
        runs.append((y, inp.grad, [getattr(layer, f"{other}_{p}").grad.clone() for p in ("gamma", "beta")]))
    (y, grad, param_grads), (y_clean, grad_clean, param_grads_clean) = runs
    assert torch.isfinite(y[~inside]).all()
    assert_close(y[~inside], y_clean[~inside])
    assert_close(grad[~inside], grad_clean[~inside])
    for ours, clean in zip(param_grads, param_grads_clean):  # the other region's parameters
        assert_close(ours, clean)


# ----------------------------------------------------------------------------------------------------------------------
# Item 3: both backends, one NaN pattern: torch's
# ----------------------------------------------------------------------------------------------------------------------


def _nan_run(backend_name: str, layer: torch.nn.Module, x: torch.Tensor, *args):
    layer = copy.deepcopy(layer)
    y_train = _on(backend_name, layer.train(), x, *args)
    stats = {k: v.clone() for k, v in layer.named_buffers() if v.is_floating_point()}
    y_eval = _on(backend_name, layer.eval(), torch.randn_like(x), *args)
    return y_train, stats, y_eval


def _assert_same_nan_pattern(layer: torch.nn.Module, x: torch.Tensor, *args) -> tuple:
    torch.manual_seed(3)
    ref = _nan_run("reference", layer, x, *args)
    torch.manual_seed(3)
    tri = _nan_run("triton", layer, x, *args)
    assert torch.equal(ref[0].isnan(), tri[0].isnan())
    for key in ref[1]:
        assert torch.equal(ref[1][key].isnan(), tri[1][key].isnan()), key
    assert torch.equal(ref[2].isnan(), tri[2].isnan())
    return ref


@pytest.mark.parametrize("cls", (normlayers.EvoNorm2dB0, normlayers.EvoNorm2dB1, normlayers.EvoNorm2dB2))
def test_evo_norm_b_nan_poisons_its_channel_on_both_backends(cls):
    torch.manual_seed(4)
    layer = cls(4)
    x = torch.randn(2, 4, 3, 3)
    x[0, 1, 1, 1] = float("nan")
    y_train, stats, y_eval = _assert_same_nan_pattern(layer, x)
    # torch's semantics: the NaN batch variance of channel 1 makes every output of the channel, and the running
    # variance, NaN; the other channels are untouched.
    assert y_train[:, 1].isnan().all() and not y_train[:, [0, 2, 3]].isnan().any()
    assert stats["running_var"][1].isnan() and not stats["running_var"][[0, 2, 3]].isnan().any()
    assert y_eval[:, 1].isnan().all() and not y_eval[:, [0, 2, 3]].isnan().any()


@pytest.mark.parametrize("name", TOKEN_LAYERS)
def test_token_norm_nan_pattern_is_the_same_on_both_backends(name):
    torch.manual_seed(5)
    x = torch.randn(3, 5, 6)
    x[0, 2, 4] = float("nan")
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[2, 3:] = True
    x[2, 4, 1] = float("nan")  # in a padded token: no influence
    y_train, stats, _ = _assert_same_nan_pattern(_token_layer(name), x, pad)
    channels = list(range(6)) if name == "power" else [4]  # GroupScaling spreads a token's NaN over its channels
    assert y_train[~pad][:, channels].isnan().all()
    if name != "power":
        assert not y_train[~pad][:, [0, 1, 2, 3, 5]].isnan().any()
    assert _running_stat_name(name) in stats and stats[_running_stat_name(name)].reshape(-1)[channels].isnan().all()


def _running_stat_name(name: str) -> str:
    return "running_phi" if name.startswith("power") else "running_var"


@pytest.mark.parametrize("stats", ("batch", "instance"))
def test_region_norm_nan_pattern_is_the_same_on_both_backends(stats):
    x, mask = _region_inputs()
    x[0, 1, 0, 0] = float("nan")  # a valid-region pixel
    layer = normlayers.RegionNorm2d(3, stats=stats)
    y, _, _ = _assert_same_nan_pattern(layer, x, mask)
    valid = ~mask.bool().expand_as(x)
    samples = slice(None) if stats == "batch" else slice(0, 1)
    assert y[samples, 1][valid[samples, 1]].isnan().all()
    assert not y[:, 1][~valid[:, 1]].isnan().any()  # the hole region of the channel is another statistic


# ----------------------------------------------------------------------------------------------------------------------
# Item 4: no silently wrong finite output at extreme magnitudes
# ----------------------------------------------------------------------------------------------------------------------


def _row_norm_fp64(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The exact answer from the fp64 reference of a rescaled input (normalization is scale invariant, eps aside)."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-300)
    xs = x.double() / scale.double()
    with normlayers.backend("reference"):
        fn = {"layer": F.layer_norm, "rms": F.rms_norm, "crms": F.crms_norm}[kind]
        return fn(xs, (x.shape[-1],), eps=0.0)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("kind", ("layer", "rms", "crms"))
@pytest.mark.parametrize("magnitude", (1e30, 3e19, 1e38, 1e-30))
@pytest.mark.parametrize("width", (8, 37, 20000))  # 20000 > the widest single block: the chunked kernel path
def test_row_norms_are_right_at_extreme_magnitudes(backend_name, kind, magnitude, width):
    torch.manual_seed(6)
    rows = 1 if width > 1000 else 3
    x = torch.randn(rows, width)
    x = x / x.abs().amax() * magnitude  # the largest value is exactly `magnitude`, finite
    fn = {"layer": F.layer_norm, "rms": F.rms_norm, "crms": F.crms_norm}[kind]
    # eps=0: with eps > 0 a tiny input is dominated by eps, so only eps=0 tests the scaling at 1e-30.
    y = _on(backend_name, fn, x, (width,), eps=0.0 if magnitude < 1 else None if kind != "layer" else 1e-5)
    assert_close(y, _row_norm_fp64(kind, x).float())


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_layer_norm_at_1e30_as_in_the_issue(backend_name):
    torch.manual_seed(0)
    x = torch.randn(2, 8) * 1e30
    y = _on(backend_name, normlayers.LayerNorm(8), x)
    assert_close(y, _row_norm_fp64("layer", x).float())


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_row_norms_low_precision_at_their_largest_values(backend_name, dtype):
    torch.manual_seed(7)
    x = torch.randn(4, 64)
    x = (x / x.abs().amax() * torch.finfo(dtype).max).to(dtype)
    y = _on(backend_name, F.rms_norm, x, (64,))
    assert_close(y, _row_norm_fp64("rms", x).to(dtype), dtype=dtype)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_power_norm_group_scaling_at_large_magnitude(backend_name):
    torch.manual_seed(8)
    x = torch.randn(3, 5, 6) * 2.0 ** 100  # its square overflows fp32 (GroupScaling is x / RMS of its group)
    layer = normlayers.PowerNorm(6, batch_first=True, warmup_iters=2, group_num=2)
    expected = _on("reference", copy.deepcopy(layer), x.double())  # fp64: no overflow
    assert_close(_on(backend_name, copy.deepcopy(layer), x), expected.float())


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", ("power_no_groups", "unified"))
def test_token_norms_at_large_magnitude_are_nan_not_zero(backend_name, name):
    """The mean square over tokens lives in fp32 running buffers, which cannot hold it once it overflows: every output
    of that channel, and its running statistic, is then NaN (as torch's), never the silent 0 of x·rsqrt(inf)."""
    torch.manual_seed(9)
    x = torch.randn(3, 5, 6)
    big = x.clone()
    big[0, 0, 2] = 3e19  # its square overflows fp32
    layer = _token_layer(name).train()
    y = _on(backend_name, layer, big)
    assert y[..., 2].isnan().all() and _running_stat(layer).reshape(-1)[2].isnan()
    expected = _on(backend_name, _token_layer(name).train(), x)
    assert_close(y[..., [0, 1, 3, 4, 5]], expected[..., [0, 1, 3, 4, 5]])  # the other channels are untouched


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("stats", ("batch", "instance"))
@pytest.mark.parametrize("affine", ("masked", "official"))
@pytest.mark.parametrize("magnitude", (1e30, 3e19, 1e-30))
def test_region_norm_is_right_at_extreme_magnitudes(backend_name, stats, affine, magnitude):
    """Each region's statistics are taken of its values scaled by a power of two: at 3e19 and 1e30 the fp32 squares
    overflow, at 1e-30 they underflow, and the output and every gradient still match fp64 (where nothing overflows).
    eps = 1e-70 at 1e-30: a larger eps would dominate the variance (1e-60), and only a negligible one tests the
    scaling there."""
    x, mask = _region_inputs()
    eps = 1e-70 if magnitude < 1 else 1e-5
    layer = normlayers.RegionNorm2d(3, stats=stats, affine=affine, eps=eps)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    dy = torch.randn_like(x)
    results = []
    for dtype, module in ((torch.float32, layer), (torch.float64, copy.deepcopy(layer).double())):
        inp = (x.to(dtype) * magnitude).requires_grad_()
        backend_name_here = backend_name if dtype == torch.float32 else "reference"
        y = _on(backend_name_here, module, inp, mask)
        grads = _on(backend_name_here, torch.autograd.grad, y, [inp, *module.parameters()], dy.to(dtype))
        results.append((y, grads))
    (y, grads), (y64, grads64) = results
    assert torch.isfinite(y).all()
    assert_close(y, y64.float())
    assert_close(grads[0] * magnitude, (grads64[0] * magnitude).float())  # dx is of size 1/magnitude
    for ours, expected in zip(grads[1:], grads64[1:]):
        assert_close(ours, expected.float())


# ----------------------------------------------------------------------------------------------------------------------
# Item 6: edges that used to fail with unrelated errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", (normlayers.EvoNorm2dB0, normlayers.EvoNorm2dB1, normlayers.EvoNorm2dB2))
def test_evo_norm_b_momentum_none_is_rejected_clearly(cls):
    # A cumulative average would need num_batches_tracked, which timm's EvoNorm state does not have.
    with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\], got None.*cumulative average"):
        cls(8, momentum=None)
    layer = cls(8)
    layer.momentum = None
    with pytest.raises(ValueError, match="momentum must be a number in \\[0, 1\\], got None"):
        layer(torch.randn(2, 8, 3, 3))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_weight_standardize_zero_size_weight(backend_name):
    w = torch.randn(0, 3, 3, 3, requires_grad=True)  # no filters: nothing to do, an empty result
    y = _on(backend_name, F.weight_standardize, w)
    assert y.shape == w.shape
    y.sum().backward()
    for shape in ((4, 0, 3, 3), (4, 3, 0, 0)):  # empty filters: no statistic exists
        with pytest.raises(ValueError, match="weight has no elements per output filter"):
            _on(backend_name, F.weight_standardize, torch.randn(shape))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_region_norms_at_zero_spatial_size(backend_name):
    x = torch.randn(2, 4, 0, 0, requires_grad=True)
    y = _on(backend_name, normlayers.RegionNorm2d(4), x, torch.zeros(2, 1, 0, 0))
    assert y.shape == x.shape
    y = _on(backend_name, normlayers.LearnableRegionNorm2d(4), x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


SCRIPTABLE = (
    lambda: normlayers.LayerNorm(8), lambda: normlayers.RMSNorm(8), lambda: normlayers.CRMSNorm(8),
    lambda: normlayers.BatchChannelNorm2d(8, num_groups=2), lambda: normlayers.WSConv2d(8, 8, 3),
    lambda: normlayers.EvoNorm2dB0(8), lambda: normlayers.EvoNorm2dS0(8, groups=2),
    lambda: normlayers.PowerNorm(8), lambda: normlayers.UnifiedNorm(8), lambda: normlayers.RegionNorm2d(8),
    lambda: normlayers.SPDBatchNorm(3),
)


@pytest.mark.parametrize("make", SCRIPTABLE)
def test_jit_script_raises_one_clear_error(make):
    with pytest.raises(RuntimeError, match="torch.jit.script is not supported.*torch.compile"):
        torch.jit.script(make())


# ----------------------------------------------------------------------------------------------------------------------
# Item 7: what torch's BatchNorm rejects, we reject too
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", (
    lambda: normlayers.BatchChannelNorm2d(4, num_groups=2, eps=0.0),
    lambda: normlayers.BatchChannelNorm2d(4, num_groups=2, bn_eps=0.0),
    lambda: normlayers.WSConv2d(4, 4, 3, eps=0.0),
    lambda: normlayers.ScaledWSConv2d(4, 4, 3, eps=0.0),
))
def test_zero_eps_is_rejected_where_torch_rejects_it(make):
    with pytest.raises(ValueError, match="eps must be positive"):
        make()


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("make,args", (
    (lambda: normlayers.BatchChannelNorm2d(4, num_groups=2), lambda: (torch.randn(2, 4, 3, 3),)),
    (lambda: normlayers.EvoNorm2dB0(4), lambda: (torch.randn(2, 4, 3, 3),)),
    (lambda: normlayers.PowerNorm(4), lambda: (torch.randn(3, 2, 4),)),
    (lambda: normlayers.UnifiedNorm(4), lambda: (torch.randn(2, 3, 4),)),
    (lambda: normlayers.SPDBatchNorm(3), lambda: (torch.eye(3) * torch.rand(4, 1, 1) + 0.1 * torch.eye(3),)),
))
def test_running_buffers_that_require_grad_are_rejected(backend_name, make, args):
    layer = make().train()
    for name, buf in layer.named_buffers():
        if buf.is_floating_point() and "running" in name:
            buf.requires_grad_()
    with pytest.raises(ValueError, match="running_.* requires grad"):
        _on(backend_name, layer, *args())


# ----------------------------------------------------------------------------------------------------------------------
# Item 5: double backward, the same on both backends
# ----------------------------------------------------------------------------------------------------------------------


def _gradgradcheck(backend_name: str, fn, *inputs) -> None:
    # fast_mode: checks the second derivative along random directions, not column by column (the interpreter runs
    # the kernels once per evaluation, so the full Jacobian would take minutes per layer).
    with normlayers.backend(backend_name):
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("kind", ("layer", "rms", "crms"))
def test_row_norms_double_backward(backend_name, kind):
    torch.manual_seed(11)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    if kind == "layer":
        _gradgradcheck(backend_name, lambda x, w, b: F.layer_norm(x, (5,), w, b), x, w, b)
    elif kind == "rms":
        _gradgradcheck(backend_name, lambda x, w: F.rms_norm(x, (5,), w, weight_offset=1.0), x, w)
    else:
        _gradgradcheck(backend_name, lambda x, w: F.crms_norm(x, (5,), w), x, w)
    r = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    _gradgradcheck(backend_name, lambda x, r, w: F.add_rms_norm(x, r, (5,), w), x, r, w)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gradient_penalty_matches_torch(backend_name):
    torch.manual_seed(12)
    x = torch.randn(4, 8, requires_grad=True)
    ours, theirs = normlayers.LayerNorm(8), torch.nn.LayerNorm(8)

    def penalty(layer, inp):
        (g,) = torch.autograd.grad(layer(inp).square().sum(), inp, create_graph=True)
        return torch.autograd.grad(g.square().sum(), inp)[0]

    assert_close(_on(backend_name, penalty, ours, x), penalty(theirs, x))


def _double(module: torch.nn.Module) -> torch.nn.Module:
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


CNN_LAYERS = {
    "bcn": lambda: normlayers.BatchChannelNorm2d(4, num_groups=2),
    "evo_b0": lambda: normlayers.EvoNorm2dB0(4),
    "evo_b2": lambda: normlayers.EvoNorm2dB2(4),
    "evo_s0": lambda: normlayers.EvoNorm2dS0(4, groups=2),
    "evo_s1": lambda: normlayers.EvoNorm2dS1(4, groups=2),
    "ws_conv": lambda: normlayers.WSConv2d(4, 3, 2),
}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", tuple(CNN_LAYERS))
@pytest.mark.parametrize("training", (True, False))
def test_cnn_norms_double_backward(backend_name, name, training):
    torch.manual_seed(13)
    layer = _double(CNN_LAYERS[name]()).train(training)
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    if not training and name.startswith("evo_b"):
        layer.running_var.fill_(0.5)
    # Training layers update their running statistics in place at every call; the check only reads outputs.
    _gradgradcheck(backend_name, lambda x: layer(x), x)


BUFFERED_CNN_LAYERS = {
    "bcn": lambda: normlayers.BatchChannelNorm2d(4, num_groups=2),
    "bcn_estimate": lambda: normlayers.BatchChannelNorm2d(4, num_groups=2, estimate=True),
    "evo_b1": lambda: normlayers.EvoNorm2dB1(4),
    "evo_b1_eval": lambda: normlayers.EvoNorm2dB1(4).eval(),
    "bcn_eval": lambda: normlayers.BatchChannelNorm2d(4, num_groups=2).eval(),
}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", tuple(BUFFERED_CNN_LAYERS))
def test_gradient_penalty_updates_running_statistics_once(backend_name, name):
    """A gradient penalty moves the running statistics exactly as the forward alone does (the double backward re-runs
    the layer's math on the statistics the forward used, never its buffer update), and gives the reference's
    gradient (in eval too: the running statistics are constants there)."""
    torch.manual_seed(16)
    layer = _double(BUFFERED_CNN_LAYERS[name]())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    forward_only, penalized, reference = (copy.deepcopy(layer) for _ in range(3))

    def penalty(module, backend):
        with normlayers.backend(backend):
            (g,) = torch.autograd.grad(torch.sin(module(x)).sum(), x, create_graph=True)
            return torch.autograd.grad(g.square().sum(), x)[0]

    _on(backend_name, forward_only, x)
    assert_close(penalty(penalized, backend_name), penalty(reference, "reference"))
    for name_, expected in forward_only.named_buffers():
        torch.testing.assert_close(penalized.get_buffer(name_), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("learnable", (False, True))
def test_region_norms_double_backward(backend_name, learnable):
    torch.manual_seed(14)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)  # (the mask of _region_inputs is 4x4)
    if learnable:
        layer = _double(normlayers.LearnableRegionNorm2d(3, threshold=0.5, kernel_size=3))
        _gradgradcheck(backend_name, lambda x: layer(x), x)
    else:
        _, mask = _region_inputs()
        layer = _double(normlayers.RegionNorm2d(3))
        _gradgradcheck(backend_name, lambda x: layer(x, mask), x)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", ("power", "unified"))
def test_token_norms_double_backward(backend_name, name):
    """Eval (a per-channel affine) is twice differentiable; training's backward is each method's own approximate
    one, with in-place running statistics, which has no derivative: one clear error on both backends."""
    torch.manual_seed(15)
    layer = _double(_token_layer(name)).eval()
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    _gradgradcheck(backend_name, lambda x: layer(x), x)
    layer.train()
    y = _on(backend_name, layer, x)
    with pytest.raises(RuntimeError, match="has no second derivative"):
        _on(backend_name, torch.autograd.grad, y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_spd_batch_norm_second_derivative_is_a_clear_error(backend_name):
    torch.manual_seed(16)
    layer = normlayers.SPDBatchNorm(3, dtype=torch.float64)
    a = torch.randn(4, 3, 3, dtype=torch.float64)
    x = (a @ a.mT + 0.5 * torch.eye(3, dtype=torch.float64)).requires_grad_()
    y = _on(backend_name, layer, x)
    with pytest.raises(RuntimeError, match="has no second derivative"):
        _on(backend_name, torch.autograd.grad, y.square().sum(), x, create_graph=True)
