"""normlayers.GroupNorm: nn.GroupNorm's constructor, attributes, repr and state_dict; every backend against torch's
``nn.GroupNorm`` followed by the activation module; argument checks naming the argument; module plumbing."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import nn

import normlayers
from normlayers import functional as NF
from normlayers.cpu import _native
from normlayers.cpu import group_norm as cpu_group_norm
from normlayers.reference import group_norm as ref
from normlayers.testing import NCHW_LAYOUTS, assert_close, assert_lowprec_close, nchw_input

BACKENDS = ("auto", "reference", "triton")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ACTIVATION_MODULES = {None: nn.Identity, "silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


def _make(act=None, groups=3, channels=6, **kwargs):
    module = normlayers.GroupNorm(groups, channels, act=act, **kwargs)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) + 0.5)
    return module


def _torch_pair(module, dtype):
    """``nn.GroupNorm`` (a copy of ``module``'s parameters in ``dtype``) then the activation module."""
    plain = nn.GroupNorm(module.num_groups, module.num_channels, module.eps, module.affine).to(dtype)
    if module.affine:
        plain.load_state_dict({k: v.to(dtype) for k, v in module.state_dict().items()})
    return nn.Sequential(plain, ACTIVATION_MODULES[module.act]())


def _step(module, x, backend):
    """(y, dx, *parameter grads) of one forward/backward with a fixed output gradient."""
    module = copy.deepcopy(module)
    leaf = x.detach().clone().requires_grad_()
    with normlayers.backend(backend):
        y = module(leaf)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(y.dtype)
    y.backward(dy)
    return [y.detach(), leaf.grad, *(p.grad for p in module.parameters())]


# ----------------------------------------------------------------------------------------------------------------------
# nn.GroupNorm's interface
# ----------------------------------------------------------------------------------------------------------------------


def test_signature_is_nn_group_norm_plus_act():
    ours = list(inspect.signature(normlayers.GroupNorm).parameters.values())
    torch_params = list(inspect.signature(nn.GroupNorm).parameters.values())
    assert [(p.name, p.default, p.kind) for p in ours if p.name != "act"] == \
        [(p.name, p.default, p.kind) for p in torch_params]
    act = inspect.signature(normlayers.GroupNorm).parameters["act"]
    assert act.kind == act.KEYWORD_ONLY and act.default is None


@pytest.mark.parametrize("affine", [True, False])
def test_is_an_nn_group_norm_with_its_repr_and_state_dict(affine):
    m = normlayers.GroupNorm(2, 6, 1e-3, affine)
    plain = nn.GroupNorm(2, 6, 1e-3, affine)
    assert isinstance(m, nn.GroupNorm) and (m.num_groups, m.num_channels, m.eps, m.affine) == (2, 6, 1e-3, affine)
    assert repr(m) == repr(plain)
    assert repr(normlayers.GroupNorm(2, 6, act="silu")) == repr(nn.GroupNorm(2, 6))[:-1] + ", act='silu')"
    assert list(m.state_dict()) == list(plain.state_dict())
    if affine:
        m.load_state_dict(plain.state_dict())  # loads torch's checkpoint as it is


def test_state_dict_round_trip_deepcopy_to_dtype_meta():
    m = _make("silu")
    fresh = normlayers.GroupNorm(3, 6, act="silu")
    fresh.load_state_dict(m.state_dict(), strict=True)
    x = nchw_input(2, 6, 3, 4, torch.float32)
    assert torch.equal(fresh(x), m(x))
    twin = copy.deepcopy(m)
    assert torch.equal(twin(x), m(x)) and twin.weight is not m.weight and twin.act == "silu"
    half = copy.deepcopy(m).to(torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16 and half(x.bfloat16()).dtype == torch.bfloat16
    meta = normlayers.GroupNorm(3, 6, act="gelu", device="meta")
    assert all(p.is_meta for p in meta.parameters())
    y = meta(torch.empty(2, 6, 3, 4, device="meta", dtype=torch.bfloat16))
    assert y.is_meta and y.shape == (2, 6, 3, 4) and y.dtype == torch.bfloat16


def test_refuses_torchscript_clearly():
    with pytest.raises(RuntimeError, match="torch.jit.script is not supported for normlayers.GroupNorm"):
        torch.jit.script(normlayers.GroupNorm(2, 4))


def test_to_torch_and_from_module_share_parameters():
    m = _make("silu")
    plain = m.to_torch()
    assert isinstance(plain, nn.Sequential) and type(plain[1]) is nn.SiLU and plain[0].weight is m.weight
    x = nchw_input(2, 6, 3, 4, torch.float32)
    assert_close(plain(x), m(x))
    back = normlayers.GroupNorm.from_module(plain[0], act="silu")
    assert back.weight is m.weight and back.bias is m.bias and back.act == "silu"
    assert type(_make().to_torch()) is nn.GroupNorm


# ----------------------------------------------------------------------------------------------------------------------
# The math: every backend against nn.GroupNorm + the activation module
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", NCHW_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_match_torch(act, backend, layout, dtype):
    module = _make(act).to(dtype)
    x = nchw_input(2, 6, 3, 5, dtype, layout, scale=2.0, plane_offset=1.0)
    ours = _step(module, x, backend)
    truth = _step(_torch_pair(module, torch.float64), x.double(), "reference")
    if dtype in (torch.float32, torch.float64):
        for a, e in zip(ours, truth):
            assert_close(a, e)
        return
    lowprec = _step(_torch_pair(module, dtype), x, "reference")
    for a, t, e in zip(ours, lowprec, truth):
        assert a.dtype == dtype
        assert_lowprec_close(a, t, e)


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_activations_match_torch(act, backend):
    module = _make(act)
    x = nchw_input(2, 6, 3, 5, torch.float32, "channels_last", scale=2.0, plane_offset=1.0)
    for a, e in zip(_step(module, x, backend), _step(_torch_pair(module, torch.float64), x.double(), "reference")):
        assert_close(a, e)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [None, "silu", "relu"])
def test_cpu_tier_is_torch_eager_bit_for_bit_in_fp32(act, layout):
    """Backend auto on CPU runs F.group_norm and the activation: exactly what nn.GroupNorm + nn.SiLU computes. Where
    a compiled kernel takes the call (contiguous and channels-last input: every call; docs/group_norm.md) it is the
    same math within fp32 rounding instead: its statistics and sums are centred and merged in fp64, ATen's are
    not."""
    module = _make(act)
    x = nchw_input(2, 6, 5, 5, torch.float32, layout, scale=2.0)

    def check(a, e, kernel):
        if kernel:
            assert_close(a, e)
        else:
            assert torch.equal(a, e)

    channels_last_kernel = layout == "channels_last" and _native.load("group_norm_channels_last") is not None
    kernel = cpu_group_norm._nchw_kernel_for(x, module.weight, module.bias, act) is not None or channels_last_kernel
    for a, e in zip(_step(module, x, "auto"), _step(_torch_pair(module, torch.float32), x, "reference")):
        check(a, e, kernel)
    with torch.no_grad():  # without autograd the activation runs in place on the norm's output, not on the input
        x_before = x.clone()
        check(module(x), _torch_pair(module, torch.float32)(x), kernel)
        assert torch.equal(x, x_before)


@pytest.mark.parametrize("spatial", [(), (7,), (2, 3, 4)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_number_of_spatial_dims(spatial, backend):
    module = _make("silu")
    x = torch.randn(2, 6, *spatial, generator=torch.Generator().manual_seed(0)) * 2 + 1
    for a, e in zip(_step(module, x, backend), _step(_torch_pair(module, torch.float64), x.double(), "reference")):
        assert_close(a, e)


def test_reference_gradcheck_fp64():
    x = nchw_input(2, 4, 2, 3, torch.float64, "channels_last", plane_offset=1.0).requires_grad_()
    weight = torch.rand(4, dtype=torch.float64, requires_grad=True)
    bias = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ref.group_norm(*a[:1], 2, *a[1:], 1e-5, "gelu"), (x, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_empty_output_and_zero_parameter_gradients(backend):
    module = _make("silu")
    x = torch.empty(0, 6, 3, 3, requires_grad=True)
    with normlayers.backend(backend):
        y = module(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(module.weight.grad, torch.zeros(6))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: the same error on every backend, naming the argument
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_naming_the_argument(backend):
    x = torch.randn(2, 6, 3, 3)
    cases = [
        (lambda: NF.group_norm(x, 4), ValueError, r"num_groups \(4\) must divide the number of channels"),
        (lambda: NF.group_norm(x, 0), ValueError, "num_groups must be a positive int"),
        (lambda: NF.group_norm(x, 3, act="tanh"), ValueError, "act must be None or one of"),
        (lambda: NF.group_norm(x, 3, torch.ones(5)), ValueError, r"weight must have shape \(C,\) = \(6,\)"),
        (lambda: NF.group_norm(x, 3, None, torch.ones(6, 1)), ValueError, r"bias must have shape \(C,\)"),
        (lambda: NF.group_norm(x, 3, eps=-1.0), ValueError, "eps must be a finite non-negative number"),
        (lambda: NF.group_norm(x, 3, eps=math.nan), ValueError, "eps must be a finite non-negative number"),
        (lambda: NF.group_norm(x, 3, eps=math.inf), ValueError, "eps must be a finite non-negative number"),
        (lambda: NF.group_norm(x, True), ValueError, "num_groups must be a positive int"),
        (lambda: NF.group_norm(x, 3, torch.ones(6, dtype=torch.long)), TypeError, "weight must have a floating"),
        (lambda: NF.group_norm(x, 3, None, torch.ones(6, device="meta")), ValueError, "bias is on meta"),
        (lambda: NF.group_norm(torch.randn(6), 3), ValueError, "input must be"),
        (lambda: NF.group_norm(x.long(), 3), TypeError, "input must have a floating dtype"),
        (lambda: NF.group_norm(torch.randn(1, 3, 1), 3), ValueError, "Expected more than 1 value per group"),
        (lambda: normlayers.GroupNorm(4, 6), ValueError, r"num_groups \(4\) must divide num_channels \(6\)"),
        (lambda: normlayers.GroupNorm(3, 6, act="swish"), ValueError, "act must be None or one of"),
    ]
    with normlayers.backend(backend):
        for call, error, message in cases:
            with pytest.raises(error, match=message):
                call()


def test_support_probe_records_one_op_each_way():
    from normlayers import support

    probed = support.probe(support.LAYERS["GroupNorm"])
    assert (probed["triton_fwd"], probed["triton_bwd"]) == (("group_norm_fwd",), ("group_norm_bwd",))
    assert probed["reference"] and not probed["sync_stats"]
