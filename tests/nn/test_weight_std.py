"""Weight Standardization: normlayers.WSConv2d / ScaledWSConv2d and their functional forms (spec B §1).

The oracles are the published implementations themselves, re-typed here from the sources the spec cites (§1.2,
§1.4), so they are written independently of ``normlayers.reference.weight_std``: the WS README layer (successive
means, ``std(dim=1) + eps``), the BCN ImageNet layer (``sqrt(var + eps)``), timm's ``F.batch_norm`` on the reshaped
weight, and BiT's ``var_mean``. Convolutions are checked against ``torch.nn.Conv2d`` carrying the oracle's weight
(so torch's own padding modes are the reference), gradients against autograd through the oracles, against fp64
``gradcheck`` and against the closed-form backward of spec §1.5.

Tolerances come from ``normlayers.testing``: fp32/fp64 with ``assert_close``; fp16/bf16 with the low-precision rule.
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools
import math
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normlayers
from normlayers import functional as NF
from normlayers.testing import assert_close, assert_lowprec_close, tolerance

VARIANTS = ["qiao", "qiao_bcn", "timm", "bit"]
RELU_GAMMA = 1.7139588594436646  # timm nfnet.py's _nonlin_gamma["relu"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------------------------
# Oracles: the authors' code, re-typed (4-D conv weights)
# ----------------------------------------------------------------------------------------------------------------------


def _centred_like_the_authors(w: torch.Tensor) -> torch.Tensor:
    mean = w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
    return w - mean


def qiao_readme(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """WS README PyTorch layer (spec §1.2): ``std = weight.view(O, -1).std(dim=1) + 1e-5`` (unbiased)."""
    c = _centred_like_the_authors(w)
    std = c.view(c.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + eps
    return c / std.expand_as(c)


def qiao_bcn(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BCN imagenet/models/layers.py (spec §1.2): ``sqrt(var(dim=1) + 1e-5)`` (unbiased)."""
    c = _centred_like_the_authors(w)
    std = torch.sqrt(torch.var(c.view(c.size(0), -1), dim=1) + eps).view(-1, 1, 1, 1)
    return c / std.expand_as(c)


def timm_std(w: torch.Tensor, eps: float = 1e-6, gain_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm StdConv2d / ScaledStdConv2d (spec §1.2, §1.4): batch_norm over each filter, biased, eps inside."""
    return TF.batch_norm(w.reshape(1, w.shape[0], -1), None, None, weight=gain_scale, training=True, momentum=0.0,
                         eps=eps).reshape_as(w)


def bit_std(w: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """BiT official bit_pytorch StdConv2d (spec §1.2)."""
    v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
    return (w - m) / torch.sqrt(v + eps)


ORACLES: dict[str, Callable[..., torch.Tensor]] = {"qiao": qiao_readme, "qiao_bcn": qiao_bcn, "timm": timm_std,
                                                   "bit": bit_std}
DEFAULT_EPS = {"qiao": 1e-5, "qiao_bcn": 1e-5, "timm": 1e-6, "bit": 1e-10}


def scaled_oracle(w: torch.Tensor, gain: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """timm ScaledStdConv2d: ``scale = gamma * fan_in ** -0.5``, passed with the gain as batch_norm's weight."""
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    return timm_std(w, eps, (gain * (gamma / math.sqrt(fan_in))).view(-1))


class OracleConv(nn.Module):
    """A plain nn.Conv2d whose weight goes through an oracle first (gradients flow through the oracle)."""

    def __init__(self, conv: nn.Conv2d, standardize: Callable[[nn.Conv2d], torch.Tensor]):
        super().__init__()
        self.conv = conv
        self.standardize = standardize

    def forward(self, x):
        return self.conv._conv_forward(x, self.standardize(self.conv), self.conv.bias)


def _conv_kwargs(m: nn.Conv2d) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size, stride=m.stride,
                padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode)


def oracle_of(module: nn.Module) -> OracleConv:
    """The oracle for one of our modules, with a copy of its parameters."""
    conv = nn.Conv2d(**_conv_kwargs(module), dtype=module.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(module.weight)
        if module.bias is not None:
            conv.bias.copy_(module.bias)
    if isinstance(module, normlayers.ScaledWSConv2d):
        conv.gain = nn.Parameter(module.gain.detach().clone())
        gamma, eps = module.gamma, module.eps
        return OracleConv(conv, lambda c: scaled_oracle(c.weight, c.gain, gamma, eps))
    oracle, eps = ORACLES[module.variant], module.eps
    return OracleConv(conv, lambda c: oracle(c.weight, eps))


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """y = module(x) and the gradients of x and of each parameter (names without the oracle's "conv." prefix)."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad_out)
    grads = {"input": x.grad}
    grads.update({name.removeprefix("conv."): p.grad for name, p in module.named_parameters()})
    return y.detach(), grads


def randomize_(module: nn.Module) -> nn.Module:
    """Gains and biases away from their init, so a test sees a wrong one."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "gain":
                p.uniform_(0.5, 1.5)
            elif name == "bias":
                p.normal_(0.0, 0.5)
    return module


# ----------------------------------------------------------------------------------------------------------------------
# Drop-in compatibility with nn.Conv2d
# ----------------------------------------------------------------------------------------------------------------------


def _params(fn) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_signatures_are_conv2d_plus_keyword_only_additions():
    kw = inspect.Parameter.KEYWORD_ONLY
    conv = _params(nn.Conv2d.__init__)
    assert issubclass(normlayers.WSConv2d, nn.Conv2d) and issubclass(normlayers.ScaledWSConv2d, nn.Conv2d)
    assert _params(normlayers.WSConv2d.__init__) == conv + [("eps", kw, None), ("variant", kw, "timm")]
    assert _params(normlayers.ScaledWSConv2d.__init__) == conv + [("gamma", kw, 1.0), ("eps", kw, 1e-6),
                                                                  ("gain_init", kw, 1.0)]


def test_default_variant_is_timm_biased_eps_inside_1e6():
    """The documented default: timm's formula. The same weight through the three other variants gives outputs that
    differ by far more than the tolerance (test_variants_differ), so this pins the default."""
    m = normlayers.WSConv2d(3, 4, 3)
    assert m.variant == "timm" and m.eps == 1e-6
    assert '``"timm"`` (default)' in normlayers.WSConv2d.__doc__
    x = torch.randn(2, 3, 6, 6)
    assert_close(m(x), TF.conv2d(x, timm_std(m.weight.detach(), 1e-6), m.bias))
    assert_close(NF.weight_standardize(m.weight), timm_std(m.weight, 1e-6))


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"groups": 3, "stride": 2, "padding": 1},
                                    {"padding": "same", "padding_mode": "reflect", "dilation": 2}])
def test_init_attributes_and_state_dict_equal_conv2d(kwargs):
    torch.manual_seed(1)
    ours = normlayers.WSConv2d(6, 9, 3, **kwargs)
    torch.manual_seed(1)
    theirs = nn.Conv2d(6, 9, 3, **kwargs)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "transposed", "output_padding"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # exact: nn.Conv2d's own initialisation, same seed
    assert repr(ours) == "WS" + repr(theirs)[:-1] + ", variant='timm', eps=1e-06)"


@pytest.mark.parametrize("direction", ["conv_to_ours", "ours_to_conv"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_loads_both_ways(direction, variant):
    ours, conv = randomize_(normlayers.WSConv2d(4, 6, 3, variant=variant)), randomize_(nn.Conv2d(4, 6, 3))
    src, dst = (conv, ours) if direction == "conv_to_ours" else (ours, conv)
    dst.load_state_dict(src.state_dict())  # strict: the keys must match
    x = torch.randn(2, 4, 5, 5)
    assert_close(ours(x), TF.conv2d(x, ORACLES[variant](conv.weight.detach(), DEFAULT_EPS[variant]), conv.bias))


# ----------------------------------------------------------------------------------------------------------------------
# The variants: each is its authors' formula, and they are told apart
# ----------------------------------------------------------------------------------------------------------------------

WEIGHT_SHAPES = [(8, 4, 3, 3), (6, 1, 3, 3), (5, 3, 1, 1), (4, 7, 2, 5), (3, 2, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_weight_standardize_equals_the_authors_code(variant, shape, dtype):
    w = torch.randn(shape, dtype=torch.float64) * 0.05 + 0.01
    ours = NF.weight_standardize(w.to(dtype), variant=variant)
    assert ours.dtype == dtype
    assert_close(ours, ORACLES[variant](w, DEFAULT_EPS[variant]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_eps_overrides_the_variant_default(variant):
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64) * 0.02
    assert_close(NF.weight_standardize(w, 1e-3, variant=variant), ORACLES[variant](w, 1e-3))
    m = normlayers.WSConv2d(2, 6, 3, eps=1e-3, variant=variant).double()
    assert m.eps == 1e-3
    with torch.no_grad():
        m.weight.copy_(w)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    assert_close(m(x), TF.conv2d(x, ORACLES[variant](w, 1e-3), m.bias))


def test_variants_differ_by_far_more_than_the_tolerance():
    """Small 3x3 depthwise filters (I = 9, std 0.01: a weight-decayed layer): biased vs unbiased differ by ~6%,
    eps inside vs outside and 1e-6 vs 1e-10 by ~3% (spec §1.6), so every test above tells the variants apart."""
    w = torch.randn(8, 1, 3, 3) * 1e-2
    outs = {v: NF.weight_standardize(w, variant=v) for v in VARIANTS}
    rtol, atol = tolerance(torch.float32)
    for a, b in itertools.combinations(VARIANTS, 2):
        assert (outs[a] - outs[b]).abs().max() > 100 * (atol + rtol), (a, b)


# ----------------------------------------------------------------------------------------------------------------------
# Convolutions, forward and backward, against nn.Conv2d with the oracle's weight
# ----------------------------------------------------------------------------------------------------------------------

# (in, out, kernel, constructor kwargs, input spatial size)
CONV_CASES = {
    "3x3": (4, 6, 3, {"padding": 1}, (5, 5)),
    "stride_dilation": (3, 5, 3, {"stride": 2, "dilation": 2, "padding": 2}, (9, 8)),
    "groups": (6, 4, 3, {"groups": 2}, (5, 6)),
    "depthwise": (5, 5, 3, {"groups": 5, "padding": 1}, (4, 4)),
    "1x1": (5, 7, 1, {}, (3, 3)),
    "channels_20_groups_4": (20, 8, (3, 1), {"groups": 4, "padding": (1, 0)}, (4, 3)),
    "no_bias": (4, 6, 3, {"bias": False}, (5, 5)),
    "same": (3, 4, (3, 5), {"padding": "same"}, (5, 6)),
    "reflect": (3, 4, 3, {"padding": 1, "padding_mode": "reflect"}, (5, 5)),
    "replicate": (3, 4, 3, {"padding": 2, "padding_mode": "replicate"}, (4, 5)),
    "circular": (3, 4, 3, {"padding": 1, "padding_mode": "circular"}, (5, 4)),
    "hw_1": (4, 6, 3, {"padding": 1}, (1, 1)),
}
LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "sliced": lambda x: torch.cat([x, x], dim=-1)[..., ::2],  # a strided (non-contiguous) view of the same values
    "unbatched": lambda x: x[0],
}


def _make(kind: str, cin: int, cout: int, k, kwargs: dict, variant: str = "timm") -> nn.Module:
    if kind == "scaled":
        return randomize_(normlayers.ScaledWSConv2d(cin, cout, k, gamma=RELU_GAMMA, eps=1e-5, **kwargs))
    return randomize_(normlayers.WSConv2d(cin, cout, k, variant=variant, **kwargs))


def _check_module_against_oracle(m: nn.Module, x: torch.Tensor, layout: Callable = lambda t: t) -> None:
    """Output and gradients of ``m`` on ``layout(x)`` against the oracle.

    The weight gradient is a difference of sums of size ~ fan-in · N·H·W (spec §1.5: ``g − mean(g) − Ŵ·mean(gŴ)``),
    scaled by 1/σ ~ 10: two fp32 computations summing in different orders differ by ~1e-5 there. So the fp32 results
    are held to the rule of ``assert_lowprec_close``: at most twice the oracle's own fp32 error against its fp64
    computation, plus fp32's atol.
    """
    oracle = oracle_of(m)
    oracle64 = copy.deepcopy(oracle).double()
    g = torch.randn_like(oracle(x))
    view = (lambda t: t[0]) if layout is LAYOUTS["unbatched"] else layout
    y, grads = fwd_bwd(m, layout(x), view(g))
    y_ref, grads_ref = fwd_bwd(oracle, layout(x), view(g))
    y_64, grads_64 = fwd_bwd(oracle64, layout(x).double(), view(g).double())
    assert_lowprec_close(y, y_ref, y_64, msg="output")
    assert set(grads) == set(grads_ref)
    for name in grads:
        assert_lowprec_close(grads[name], grads_ref[name], grads_64[name], msg=f"grad of {name}")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("kind", ["ws", "scaled"])
def test_conv_matches_conv2d_with_standardized_weight(kind, case, batch):
    cin, cout, k, kwargs, hw = CONV_CASES[case]
    m = _make(kind, cin, cout, k, kwargs)
    _check_module_against_oracle(m, torch.randn(batch, cin, *hw))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ["groups", "depthwise", "reflect"])
@pytest.mark.parametrize("train", [True, False])
def test_each_variant_conv_in_train_and_eval(variant, case, train):
    cin, cout, k, kwargs, hw = CONV_CASES[case]
    m = _make("ws", cin, cout, k, kwargs, variant).train(train)
    _check_module_against_oracle(m, torch.randn(2, cin, *hw))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["ws", "scaled"])
def test_input_layouts(kind, layout):
    m = _make(kind, 4, 6, 3, {"padding": 1})
    _check_module_against_oracle(m, torch.randn(2, 4, 5, 5), LAYOUTS[layout])


def test_channels_last_weight():
    """A channels_last module (its weight is a non-contiguous (O, kh, kw, I) layout underneath)."""
    m = _make("ws", 4, 6, 3, {"padding": 1}).to(memory_format=torch.channels_last)
    assert not m.weight.is_contiguous()
    _check_module_against_oracle(m, torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("variant", VARIANTS)
def test_ws_conv2d_functional(variant):
    w, b = torch.randn(6, 2, 3, 3, requires_grad=True), torch.randn(6, requires_grad=True)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    y = NF.ws_conv2d(x, w, b, stride=2, padding=1, dilation=1, groups=2, variant=variant)
    y_ref = TF.conv2d(x, ORACLES[variant](w, DEFAULT_EPS[variant]), b, 2, 1, 1, 2)
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        assert_close(a, e)


def test_scaled_ws_conv2d_functional():
    w, gain = torch.randn(6, 4, 3, 3), torch.rand(6, 1, 1, 1) + 0.5
    x = torch.randn(2, 4, 5, 5)
    assert_close(NF.scaled_ws_conv2d(x, w, gain, None, 1, "same", gamma=RELU_GAMMA, eps=1e-5),
                 TF.conv2d(x, scaled_oracle(w, gain, RELU_GAMMA, 1e-5), None, 1, "same"))
    # gain None means 1; gain of shape (O,) is accepted as well
    assert_close(NF.scaled_weight_standardize(w), scaled_oracle(w, torch.ones(6), 1.0, 1e-6))
    assert_close(NF.scaled_weight_standardize(w, gain.view(6)), scaled_oracle(w, gain, 1.0, 1e-6))


# ----------------------------------------------------------------------------------------------------------------------
# Gradients: fp64 gradcheck and the closed forms of spec §1.5
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_weight_standardize_and_conv(variant):
    w = torch.randn(4, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w_: NF.weight_standardize(w_, variant=variant), (w,))
    assert torch.autograd.gradcheck(lambda x_, w_, b_: NF.ws_conv2d(x_, w_, b_, padding=1, groups=2, variant=variant),
                                    (x, w, b))


def test_gradcheck_scaled():
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    gain = (torch.rand(3, 1, 1, 1, dtype=torch.float64) + 0.5).requires_grad_(True)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w_, g_: NF.scaled_weight_standardize(w_, g_, RELU_GAMMA, 1e-5), (w, gain))
    assert torch.autograd.gradcheck(lambda x_, w_, g_: NF.scaled_ws_conv2d(x_, w_, g_, gamma=RELU_GAMMA), (x, w, gain))


def _closed_form_grad(variant: str, w: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """dL/dW from dL/dŴ = g, per filter, as spec §1.5 writes it (fp64)."""
    o = w.shape[0]
    wf, gf = w.reshape(o, -1), g.reshape(o, -1)
    n = wf.shape[1]
    c = wf - wf.mean(1, keepdim=True)
    g_mean = gf.mean(1, keepdim=True)
    if variant in ("timm", "bit"):
        s = torch.sqrt((c * c).sum(1, keepdim=True) / n + eps)
        w_hat = c / s
        dw = (gf - g_mean - w_hat * (gf * w_hat).mean(1, keepdim=True)) / s
    elif variant == "qiao":
        sigma_u = torch.sqrt((c * c).sum(1, keepdim=True) / (n - 1))
        s = sigma_u + eps
        dw = (gf - g_mean) / s - c * (gf * c).sum(1, keepdim=True) / (s * s * (n - 1) * sigma_u)
    else:
        s = torch.sqrt((c * c).sum(1, keepdim=True) / (n - 1) + eps)
        dw = (gf - g_mean) / s - c * (gf * c).sum(1, keepdim=True) / ((n - 1) * s ** 3)
    return dw.reshape(w.shape)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_equals_the_closed_form_of_the_spec(variant):
    """The formulas a fused backward kernel will implement (spec §1.5) agree with the reference's autograd."""
    w = (torch.randn(5, 3, 3, 3, dtype=torch.float64) * 0.1).requires_grad_(True)
    g = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    (dw,) = torch.autograd.grad(NF.weight_standardize(w, variant=variant), w, g)
    assert_close(dw, _closed_form_grad(variant, w.detach(), g, DEFAULT_EPS[variant]))


def test_scaled_backward_equals_the_closed_form_of_the_spec():
    """Spec §1.5 for Scaled WS: dW is the eps-inside form of g·gain·scale; d gain = scale · Σ g · W_std."""
    w = torch.randn(5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    gain = (torch.rand(5, 1, 1, 1, dtype=torch.float64) + 0.5).requires_grad_(True)
    g = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    dw, dgain = torch.autograd.grad(NF.scaled_weight_standardize(w, gain, RELU_GAMMA, 1e-5), (w, gain), g)
    scale = RELU_GAMMA / math.sqrt(18)
    assert_close(dw, _closed_form_grad("timm", w.detach(), g * gain.detach() * scale, 1e-5))
    w_std = bit_std(w.detach(), 1e-5)
    assert_close(dgain, scale * (g * w_std).sum(dim=(1, 2, 3), keepdim=True))


# ----------------------------------------------------------------------------------------------------------------------
# Edge cases (spec §1.6)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["qiao", "qiao_bcn"])
def test_fan_in_one_is_rejected_by_the_unbiased_variants(variant):
    with pytest.raises(ValueError, match="variant.*fan_in"):
        normlayers.WSConv2d(4, 4, 1, groups=4, variant=variant)
    with pytest.raises(ValueError, match="variant.*fan_in"):
        NF.weight_standardize(torch.randn(3, 1, 1, 1), variant=variant)
    with pytest.raises(ValueError, match="variant.*fan_in"):
        NF.ws_conv2d(torch.randn(1, 4, 2, 2), torch.randn(4, 1, 1, 1), groups=4, variant=variant)


@pytest.mark.parametrize("kind", ["timm", "bit", "scaled"])
def test_fan_in_one_standardizes_to_zero_in_the_biased_variants(kind):
    """A single element minus its mean is exactly 0: the output is the bias, and the weight gradient is 0."""
    m = _make("scaled" if kind == "scaled" else "ws", 4, 4, 1, {"groups": 4}, "timm" if kind == "scaled" else kind)
    x = torch.randn(2, 4, 3, 3)
    y = m(x)
    torch.testing.assert_close(m.standardized_weight(), torch.zeros(4, 1, 1, 1), rtol=0, atol=0)
    torch.testing.assert_close(y, m.bias.view(1, 4, 1, 1).expand(2, 4, 3, 3).detach(), rtol=0, atol=0)
    y.square().sum().backward()
    torch.testing.assert_close(m.weight.grad, torch.zeros_like(m.weight), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_constant_filters_give_zero_weight_and_finite_gradients(variant):
    """All-equal filters (e.g. zero init): σ = 0. With eps outside, torch.std's backward masks the σ gradient, so dW is
    (g − mean g)/eps (spec §1.5, §1.6); every variant stays finite."""
    w = torch.full((3, 2, 2, 2), 0.25, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    w_hat = NF.weight_standardize(w, variant=variant)
    torch.testing.assert_close(w_hat, torch.zeros_like(w_hat), rtol=0, atol=0)
    (dw,) = torch.autograd.grad(w_hat, w, g)
    assert torch.isfinite(dw).all()
    eps = DEFAULT_EPS[variant]
    denominator = eps if variant == "qiao" else math.sqrt(eps)
    assert_close(dw, (g - g.mean(dim=(1, 2, 3), keepdim=True)) / denominator)


# ----------------------------------------------------------------------------------------------------------------------
# Low precision: statistics in fp32
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_low_precision_weight_is_standardized_in_fp32_and_rounded_once(variant, dtype):
    """Weights with a mean far from zero (1 ± 0.05): statistics rounded to bf16 would shift the mean by up to
    2^-9 ≈ 2e-3, i.e. ~0.04 in Ŵ. Computed in fp32 and rounded once, Ŵ is within half an ulp of the fp64 result
    (rtol = eps/2 of the dtype, plus fp32's atol for values near 0)."""
    w = (1.0 + 0.05 * torch.randn(6, 3, 3, 3)).to(dtype)
    ours = NF.weight_standardize(w, variant=variant)
    assert ours.dtype == dtype
    expected = ORACLES[variant](w.double(), DEFAULT_EPS[variant])
    torch.testing.assert_close(ours.double(), expected, rtol=torch.finfo(dtype).eps / 2,
                               atol=tolerance(torch.float32)[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ws", "scaled"])
def test_low_precision_module(kind, dtype):
    m = _make(kind, 4, 6, 3, {"padding": 1})
    x = torch.randn(2, 4, 5, 5)
    oracle64 = oracle_of(m).double()
    lowprec = copy.deepcopy(m).to(dtype)
    y = lowprec(x.to(dtype))
    assert y.dtype == dtype and lowprec.standardized_weight().dtype == dtype
    # torch's own low-precision computation: the oracle run entirely in the dtype
    y_torch = oracle_of(lowprec)(x.to(dtype))
    assert_lowprec_close(y, y_torch, oracle64(x.double()))


# ----------------------------------------------------------------------------------------------------------------------
# The eval cache
# ----------------------------------------------------------------------------------------------------------------------


def _eval_output(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("kind", ["ws", "scaled"])
def test_eval_caches_the_standardized_weight_only_without_gradients(kind):
    m = _make(kind, 4, 6, 3, {})
    with torch.no_grad():
        assert m.standardized_weight() is not m.standardized_weight()  # training: always recomputed
        m.eval()
        first = m.standardized_weight()
        assert m.standardized_weight() is first  # eval, no gradient needed: cached
    assert m.standardized_weight() is not first  # eval with grad enabled and trainable parameters: recomputed
    assert m.standardized_weight().requires_grad
    m.requires_grad_(False)
    assert m.standardized_weight() is first  # frozen parameters: the cache serves grad mode too
    m.train()
    assert m._eval_cache is None  # train() drops it


@pytest.mark.parametrize("kind, change", [
    (kind, change) for kind in ("ws", "scaled")
    for change in ("in_place", "load_state_dict", "optimizer_step", "new_parameter")] + [("scaled", "gain")])
def test_eval_cache_is_invalidated_when_a_parameter_changes(kind, change):
    m = _make(kind, 4, 6, 3, {"padding": 1}).eval()
    x = torch.randn(2, 4, 5, 5)
    before = _eval_output(m, x)
    if change == "in_place":
        with torch.no_grad():
            m.weight[0].mul_(-1.5).add_(0.3)
    elif change == "load_state_dict":
        m.load_state_dict(randomize_(_make(kind, 4, 6, 3, {"padding": 1})).state_dict())
    elif change == "optimizer_step":
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        m(x).square().sum().backward()  # eval mode, grad enabled: the weight gets its gradient
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
        opt.step()
    elif change == "new_parameter":
        m.weight = nn.Parameter(torch.randn_like(m.weight))
    else:
        with torch.no_grad():
            m.gain.mul_(2.0)
    after = _eval_output(m, x)
    assert not torch.allclose(before, after)
    # exact: a stale cache would differ, a correctly recomputed weight is bit for bit the training-mode one
    torch.testing.assert_close(after, _eval_output(copy.deepcopy(m).train(), x), rtol=0, atol=0)


def test_eval_cache_follows_dtype_and_device_moves_and_copies():
    m = _make("ws", 4, 6, 3, {}).eval()
    x = torch.randn(1, 4, 4, 4)
    _eval_output(m, x)
    m.double()
    y = _eval_output(m, x.double())
    assert y.dtype == torch.float64
    assert_close(y, oracle_of(m)(x.double()))
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.weight.mul_(-1.0).add_(0.1)
    assert_close(_eval_output(c, x.double()), oracle_of(c)(x.double()))
    assert_close(_eval_output(m, x.double()), oracle_of(m)(x.double()))  # the original is untouched
    buffer = io.BytesIO()
    torch.save(m, buffer)  # the cache (weak references) is not pickled
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._eval_cache is None
    assert_close(_eval_output(loaded, x.double()), oracle_of(m)(x.double()))


def test_weight_cached_in_inference_mode_serves_an_input_gradient_later():
    """Eval with frozen weights: a weight cached under inference_mode is reused where autograd saves it for the
    input's gradient (saliency, adversarial examples); an inference tensor could not be saved there."""
    m = _make("ws", 4, 6, 3, {}).eval().requires_grad_(False)
    x = torch.randn(1, 4, 5, 5)
    with torch.inference_mode():
        m(x)
    x.requires_grad_(True)
    m(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    oracle_of(m)(x_ref).sum().backward()
    assert_close(x.grad, x_ref.grad)


# ----------------------------------------------------------------------------------------------------------------------
# to_conv2d
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ws", "scaled"])
@pytest.mark.parametrize("case", ["3x3", "groups", "no_bias", "same", "reflect"])
def test_to_conv2d_gives_a_plain_conv_with_the_same_outputs(kind, case):
    cin, cout, k, kwargs, hw = CONV_CASES[case]
    m = _make(kind, cin, cout, k, kwargs).eval()
    conv = m.to_conv2d()
    assert type(conv) is nn.Conv2d and not conv.training
    assert _conv_kwargs(conv) == _conv_kwargs(m)
    assert list(conv.state_dict()) == ["weight"] + (["bias"] if m.bias is not None else [])
    x = torch.randn(2, cin, *hw)
    # exact: the same standardized weight through the same nn.Conv2d convolution
    torch.testing.assert_close(conv(x), _eval_output(m, x), rtol=0, atol=0)
    assert_close(conv(x), oracle_of(m)(x))
    with torch.no_grad():
        conv.weight.zero_()
    assert not torch.allclose(_eval_output(m, x), conv(x))  # new parameters: the module is untouched


def test_to_conv2d_keeps_dtype_device_and_training_flag():
    m = _make("ws", 3, 4, 3, {}).to(torch.float64)
    conv = m.to_conv2d()
    assert conv.training and conv.weight.dtype == torch.float64 and not conv.weight.grad_fn
    meta = normlayers.WSConv2d(3, 4, 3, device="meta").to_conv2d()
    assert meta.weight.is_meta and meta.bias.is_meta


# ----------------------------------------------------------------------------------------------------------------------
# Module life cycle
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ws", "scaled"])
def test_training_steps_match_the_oracle(kind):
    """Three SGD steps (fp64): the parameters follow the same trajectory as the oracle's."""
    m = _make(kind, 4, 6, 3, {"padding": 1}).double()
    oracle = oracle_of(m)
    opts = [torch.optim.SGD(mod.parameters(), lr=0.1, momentum=0.9) for mod in (m, oracle)]
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        for mod, opt in zip((m, oracle), opts):
            opt.zero_grad()
            mod(x).square().mean().backward()
            opt.step()
    for name, p in m.named_parameters():
        assert_close(p, dict(oracle.named_parameters())["conv." + name], msg=name)


@pytest.mark.parametrize("kind", ["ws", "scaled"])
def test_deepcopy_and_to_dtype(kind):
    m = _make(kind, 4, 6, 3, {})
    c = copy.deepcopy(m)
    assert type(c) is type(m) and repr(c) == repr(m)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(m.parameters(), c.parameters()))
    x = torch.randn(2, 4, 5, 5)
    assert_close(c(x), m(x))
    d = c.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in d.parameters())
    assert_close(d(x.double()), oracle_of(m).double()(x.double()))


@pytest.mark.parametrize("kind", ["ws", "scaled"])
def test_meta_device_construction_forward_and_to_empty(kind):
    cls = normlayers.ScaledWSConv2d if kind == "scaled" else normlayers.WSConv2d
    m = cls(4, 6, 3, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta for p in m.parameters())
    y = m(torch.empty(2, 4, 5, 5, device="meta", dtype=torch.bfloat16))
    assert y.is_meta and y.shape == (2, 6, 3, 3) and y.dtype == torch.bfloat16
    m.to_empty(device="cpu")
    m.reset_parameters()
    if kind == "scaled":
        torch.testing.assert_close(m.gain, torch.ones(6, 1, 1, 1, dtype=torch.bfloat16), rtol=0, atol=0)
    assert torch.isfinite(m(torch.randn(1, 4, 3, 3, dtype=torch.bfloat16))).all()


# ----------------------------------------------------------------------------------------------------------------------
# ScaledWSConv2d: timm's ScaledStdConv2d
# ----------------------------------------------------------------------------------------------------------------------


def test_scaled_parameters_attributes_and_timm_state_dict():
    m = normlayers.ScaledWSConv2d(6, 8, 3, groups=2, gamma=RELU_GAMMA, eps=1e-5, gain_init=0.5)
    assert list(m.state_dict()) == ["weight", "bias", "gain"]
    assert m.gain.shape == (8, 1, 1, 1)
    torch.testing.assert_close(m.gain.detach(), torch.full((8, 1, 1, 1), 0.5), rtol=0, atol=0)
    assert m.scale == pytest.approx(RELU_GAMMA / math.sqrt(3 * 3 * 3))
    assert (m.gamma, m.eps, m.gain_init) == (RELU_GAMMA, 1e-5, 0.5)
    # a state dict laid out as timm's ScaledStdConv2d saves it
    timm_state = {"weight": torch.randn(8, 3, 3, 3), "bias": torch.randn(8), "gain": torch.rand(8, 1, 1, 1) + 0.5}
    m.load_state_dict(timm_state)
    x = torch.randn(2, 6, 5, 5)
    expected = TF.conv2d(x, scaled_oracle(timm_state["weight"], timm_state["gain"], RELU_GAMMA, 1e-5),
                         timm_state["bias"], groups=2)
    assert_close(m(x), expected)


# ----------------------------------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["Qiao", "ws", "", None, 1])
def test_unknown_variant(variant):
    with pytest.raises(ValueError, match="variant"):
        normlayers.WSConv2d(4, 4, 3, variant=variant)
    with pytest.raises(ValueError, match="variant"):
        NF.weight_standardize(torch.randn(4, 4, 3, 3), variant=variant)


@pytest.mark.parametrize("bad", [-1e-5, float("nan"), float("inf"), "1e-5", True])
def test_bad_eps_gamma_gain_init(bad):
    with pytest.raises(ValueError, match="eps"):
        normlayers.WSConv2d(4, 4, 3, eps=bad)
    with pytest.raises(ValueError, match="eps"):
        NF.weight_standardize(torch.randn(4, 4, 3, 3), bad)
    with pytest.raises(ValueError, match="eps"):
        normlayers.ScaledWSConv2d(4, 4, 3, eps=bad)
    if bad != -1e-5:
        with pytest.raises(ValueError, match="gamma"):
            normlayers.ScaledWSConv2d(4, 4, 3, gamma=bad)
        with pytest.raises(ValueError, match="gain_init"):
            normlayers.ScaledWSConv2d(4, 4, 3, gain_init=bad)


@pytest.mark.parametrize("kind", ["ws", "scaled"])
def test_bad_input(kind):
    m = _make(kind, 4, 6, 3, {"groups": 2})
    with pytest.raises(ValueError, match=r"input.*in_channels = 4"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="input must be 4-D"):
        m(torch.randn(2, 1, 4, 5, 5))
    with pytest.raises(ValueError, match="input must be 4-D"):
        m(torch.randn(4, 5))
    with pytest.raises(TypeError, match="input"):
        m(torch.ones(2, 4, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"input.*in_channels = 8"):  # weight.shape[1] * groups
        NF.ws_conv2d(torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3), groups=2)


def test_bad_weight_and_gain():
    with pytest.raises(ValueError, match="weight must have at least 2 dims"):
        NF.weight_standardize(torch.randn(6))
    with pytest.raises(TypeError, match="weight"):
        NF.weight_standardize(torch.ones(6, 2, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="gain"):
        NF.scaled_weight_standardize(torch.randn(6, 2, 3, 3), torch.ones(5, 1, 1, 1))
    with pytest.raises(ValueError, match="gain"):
        NF.scaled_weight_standardize(torch.randn(6, 2, 3, 3), torch.ones(3, 2))
    with pytest.raises(TypeError, match="gain"):
        NF.scaled_weight_standardize(torch.randn(6, 2, 3, 3), torch.ones(6, dtype=torch.int64))
