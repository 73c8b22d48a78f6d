"""normlayers.LayerNorm2d and normlayers.RMSNorm2d: timm's constructors, attributes and state_dict; the three backends
against each other and against timm's math written here with torch ops; argument checks; module plumbing.

Parity with timm's own classes (where timm is installed) is in ``tests/timm/test_timm_channel_norms.py``.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normlayers
from normlayers import functional as NF
from normlayers.convert.fold import is_foldable
from normlayers.reference import channel_norms as ref
from normlayers.testing import NCHW_LAYOUTS, assert_close, assert_lowprec_close, nchw_input

CLASSES = {"layer": normlayers.LayerNorm2d, "rms": normlayers.RMSNorm2d}
BACKENDS = ("auto", "reference", "triton")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _make(kind, channels=6, **kwargs):
    module = CLASSES[kind](channels, **kwargs)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) + 0.5)
    return module


def _timm_math(kind, x, weight, bias, eps):
    """timm's LayerNorm2d forward and rms_norm2d (timm/layers/norm.py, fast_norm.py), in x's dtype."""
    if kind == "layer":
        return TF.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, eps).permute(0, 3, 1, 2)
    y = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps)
    return y * weight.reshape(1, -1, 1, 1) if weight is not None else y


def _step(module, x, backend):
    """(y, dx, *parameter grads) of one forward/backward with a fixed output gradient."""
    module = copy.deepcopy(module)
    leaf = x.detach().clone().requires_grad_()
    with normlayers.backend(backend):
        y = module(leaf)
    dy = nchw_input(*x.shape, torch.float64, "contiguous", seed=7).to(y.dtype)
    y.backward(dy)
    return [y.detach(), leaf.grad, *(p.grad for p in module.parameters())]


# ----------------------------------------------------------------------------------------------------------------------
# timm's interface
# ----------------------------------------------------------------------------------------------------------------------

# timm's signatures (timm/layers/norm.py; LayerNorm2d passes **kwargs on to nn.LayerNorm: bias, device, dtype).
TIMM_SIGNATURES = {"layer": [("num_channels", inspect.Parameter.empty), ("eps", 1e-6), ("affine", True)],
                   "rms": [("channels", inspect.Parameter.empty), ("eps", 1e-6), ("affine", True)]}


@pytest.mark.parametrize("kind", CLASSES)
def test_constructor_matches_timm(kind):
    params = list(inspect.signature(CLASSES[kind]).parameters.values())
    positional = [(p.name, p.default) for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == TIMM_SIGNATURES[kind]
    assert {"device", "dtype"} <= {p.name for p in params if p.kind == p.KEYWORD_ONLY}


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm2d_is_an_nn_layer_norm_over_the_channels(affine):
    m = normlayers.LayerNorm2d(5, 1e-3, affine)
    plain = nn.LayerNorm(5, 1e-3, affine)
    assert isinstance(m, nn.LayerNorm) and m.normalized_shape == (5,) and m.eps == 1e-3
    assert repr(m) == "LayerNorm2d" + repr(plain)[len("LayerNorm"):]
    assert list(m.state_dict()) == list(plain.state_dict()) == (["weight", "bias"] if affine else [])
    assert list(normlayers.LayerNorm2d(5, bias=False).state_dict()) == ["weight"]


@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm2d_attributes_repr_state_dict(affine):
    m = normlayers.RMSNorm2d(5, 1e-3, affine)
    assert (m.normalized_shape, m.eps, m.elementwise_affine) == ((5,), 1e-3, affine)
    assert repr(m) == f"RMSNorm2d((5,), eps=0.001, elementwise_affine={affine})"
    assert list(m.state_dict()) == (["weight"] if affine else [])
    if affine:
        with torch.no_grad():
            m.weight.fill_(3.0)
        m.reset_parameters()
        assert torch.equal(m.weight, torch.ones(5))


@pytest.mark.parametrize("kind", CLASSES)
def test_state_dict_round_trip_deepcopy_to_dtype_meta(kind):
    m = _make(kind)
    fresh = CLASSES[kind](6)
    fresh.load_state_dict(m.state_dict(), strict=True)
    x = nchw_input(2, 6, 3, 4, torch.float32)
    assert torch.equal(fresh(x), m(x))
    twin = copy.deepcopy(m)
    assert torch.equal(twin(x), m(x)) and twin.weight is not m.weight
    half = copy.deepcopy(m).to(torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16 and half(x.bfloat16()).dtype == torch.bfloat16
    meta = CLASSES[kind](6, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    y = meta(torch.empty(2, 6, 3, 4, device="meta", dtype=torch.bfloat16))
    assert y.is_meta and y.shape == (2, 6, 3, 4) and y.dtype == torch.bfloat16


def test_layer_norm2d_is_not_folded_as_a_row_layer_norm():
    """fold_norms folds an nn.LayerNorm's affine into the Linear layers reading it, which act on the last dim; a
    LayerNorm2d's affine acts on the channels, dim 1."""
    assert is_foldable(nn.LayerNorm(4)) and not is_foldable(normlayers.LayerNorm2d(4))


# ----------------------------------------------------------------------------------------------------------------------
# The math: every backend against timm's formulas
# ----------------------------------------------------------------------------------------------------------------------


class _TimmMath(nn.Module):
    """timm's math (:func:`_timm_math`) with a copy of ``module``'s parameters in ``dtype``."""

    def __init__(self, kind, module, dtype):
        super().__init__()
        self.kind, self.eps = kind, module.eps
        self.weight = nn.Parameter(module.weight.detach().to(dtype))
        self.bias = nn.Parameter(module.bias.detach().to(dtype)) if getattr(module, "bias", None) is not None else None

    def forward(self, x):
        return _timm_math(self.kind, x, self.weight, self.bias, self.eps)


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", NCHW_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_match_timm_math(kind, backend, layout, dtype):
    module = _make(kind, 6).to(dtype)
    x = nchw_input(2, 6, 3, 5, dtype, layout, scale=2.0, plane_offset=1.0)
    ours = _step(module, x, backend)
    truth = _step(_TimmMath(kind, module, torch.float64), x.double(), "reference")
    if dtype in (torch.float32, torch.float64):
        for a, e in zip(ours, truth):
            assert_close(a, e)
        return
    lowprec = _step(_TimmMath(kind, module, dtype), x, "reference")
    for a, t, e in zip(ours, lowprec, truth):
        assert a.dtype == dtype
        assert_lowprec_close(a, t, e)


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32])
def test_bf16_parameter_gradients_over_many_pixels_are_accumulated_in_fp32(kind, param_dtype):
    """bf16 activations over 3136 pixels, with bf16 parameters (after .to()) or fp32 ones: every backend accumulates
    dW and dB in fp32 and rounds once, so they agree within bf16 rounding. (ATen's CPU layer norm backward with bf16
    parameters accumulates them in bf16 and is wrong by more than the gradient's size here.)"""
    module = _make(kind, 16).to(param_dtype)
    x = nchw_input(4, 16, 28, 28, torch.bfloat16, "contiguous")
    results = {backend: _step(module, x, backend) for backend in BACKENDS}
    for backend in ("auto", "triton"):
        for a, e in zip(results[backend], results["reference"]):
            assert a.dtype == e.dtype
            assert_close(a, e, dtype=torch.bfloat16)


def test_reference_gradcheck_fp64():
    x = nchw_input(2, 3, 2, 3, torch.float64, "channels_last", plane_offset=1.0).requires_grad_()
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ref.layer_norm2d(*a, 1e-6), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: ref.rms_norm2d(*a, 1e-6), (x, weight))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_tier_gradcheck_fp64(layout):
    """The CPU tier's hand-written RMSNorm2d backward (and ATen's layer norm one), by finite differences."""
    x = nchw_input(2, 3, 2, 3, torch.float64, layout, plane_offset=1.0).requires_grad_()
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.rand(3, dtype=torch.float64, requires_grad=True)
    with normlayers.backend("auto"):
        assert torch.autograd.gradcheck(lambda *a: NF.layer_norm2d(*a, 1e-6), (x, weight, bias))
        assert torch.autograd.gradcheck(lambda *a: NF.rms_norm2d(*a, 1e-6), (x, weight))
        assert torch.autograd.gradcheck(lambda a: NF.rms_norm2d(a, None, 1e-6), (x,))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: the same error on every backend, naming the argument
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_naming_the_argument(backend):
    x = torch.randn(2, 4, 3, 3)
    cases = [
        (lambda: NF.layer_norm2d(torch.randn(2, 4, 3)), ValueError, "input must be 4-D"),
        (lambda: NF.rms_norm2d(x.long()), TypeError, "input must have a floating dtype"),
        (lambda: NF.layer_norm2d(x, torch.ones(5)), ValueError, "weight must have shape"),
        (lambda: NF.layer_norm2d(x, None, torch.ones(4, 1)), ValueError, "bias must have shape"),
        (lambda: NF.rms_norm2d(x, torch.ones(4), eps=-1.0), ValueError, "eps must be"),
        (lambda: normlayers.LayerNorm2d(0), ValueError, "num_channels must be a positive int"),
        (lambda: normlayers.RMSNorm2d(4, eps=float("nan")), ValueError, "eps must be"),
        (lambda: normlayers.RMSNorm2d(4)(torch.randn(2, 5, 3, 3)), ValueError, "weight must have shape"),
    ]
    with normlayers.backend(backend):
        for call, error, message in cases:
            with pytest.raises(error, match=message):
                call()


# ----------------------------------------------------------------------------------------------------------------------
# Conversions from and to timm's classes (timm itself: tests/timm)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLASSES)
def test_from_module_adopts_the_parameter_objects(kind):
    """A timm-shaped source: an nn.LayerNorm over one dim (timm's LayerNorm2d is one), or an object with
    normalized_shape, eps and weight (timm's RmsNorm2d)."""
    source = nn.LayerNorm(6, eps=1e-3) if kind == "layer" else normlayers.RMSNorm2d(6, eps=1e-3)
    new = CLASSES[kind].from_module(source)
    assert type(new) is CLASSES[kind] and new.eps == 1e-3 and new.weight is source.weight
    if kind == "layer":
        assert new.bias is source.bias
    with pytest.raises(TypeError, match="normalized_shape of length 1"):
        CLASSES[kind].from_module(nn.LayerNorm((2, 3)))


def test_to_torch_without_timm_says_it_needs_timm():
    try:
        import timm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("timm is installed; tests/timm checks to_torch")
    for kind in CLASSES:
        with pytest.raises(ImportError, match="needs timm installed"):
            _make(kind).to_torch()


@pytest.mark.parametrize("kind", CLASSES)
def test_cpu_tier_compiles_fullgraph(kind):
    """Backend ``auto`` on CPU (ATen's layer norm; RMSNorm2d's autograd.Function) traces without graph breaks and
    gives eager's training step."""
    torch._dynamo.reset()
    module = _make(kind, 6)
    x = nchw_input(2, 6, 3, 5, torch.float32, "channels_last")
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True, backend="aot_eager")
    for a, e in zip(_step(compiled, x, "auto"), _step(module, x, "auto")):
        assert_close(a, e)
