"""Parity of normlayers.LayerNorm2d / RMSNorm2d with timm's own LayerNorm2d / RmsNorm2d (timm/layers/norm.py).

For each pair: the state_dict loads both ways (strictly), from_module adopts timm's module and to_torch gives timm's
class back, and several training steps give the same outputs, input gradients and parameter gradients as timm's
module on every backend, in fp32 and fp64 with the tolerances of :mod:`normlayers.testing` (different reduction
orders; timm computes fp64 input in fp64, as F.layer_norm does). On backend ``auto`` on CPU, LayerNorm2d runs timm's
very ops (``F.layer_norm`` on the permuted view), so its fp32 results are bit-identical there; RMSNorm2d's forward
runs timm's ops in timm's order (bit-identical output), its closed-form backward not (gradients within fp32
rounding). timm's rms_norm2d computes fp16/bf16 input in that dtype, so in bf16 the rule of
:func:`~normlayers.testing.assert_lowprec_close` applies, with timm as the low-precision computation.

Run with a torch that imports timm (CI's timm leg); the tests skip only where timm is absent.
"""

from __future__ import annotations

import copy

import pytest
import torch

import normlayers
from normlayers.testing import (NCHW_LAYOUTS, assert_close, assert_lowprec_close, assert_state_dict_loads_both_ways,
                                nchw_input, run_training_steps)

timm_layers = pytest.importorskip("timm.layers")

pytestmark = pytest.mark.timm

BACKENDS = ("auto", "reference", "triton")
PAIRS = {"layer": (normlayers.LayerNorm2d, timm_layers.LayerNorm2d),
         "rms": (normlayers.RMSNorm2d, timm_layers.RmsNorm2d)}


def _pair(kind, channels=6, dtype=torch.float32, **kwargs):
    ours_cls, timm_cls = PAIRS[kind]
    theirs = timm_cls(channels, **kwargs).to(dtype)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in theirs.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).to(dtype) + 0.5)
    ours = ours_cls(channels, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _inputs(dtype, layout, steps=3):
    return [nchw_input(2, 6, 3, 5, dtype, layout, seed=s, scale=2.0, plane_offset=1.0) for s in range(steps)]


@pytest.mark.parametrize("kind", PAIRS)
@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_loads_both_ways(kind, affine):
    ours, theirs = _pair(kind, affine=affine)
    assert_state_dict_loads_both_ways(ours, theirs)
    assert (ours.normalized_shape, ours.eps, ours.elementwise_affine) == (
        tuple(theirs.normalized_shape), theirs.eps, theirs.elementwise_affine)


@pytest.mark.parametrize("kind", PAIRS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", NCHW_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("train", [True, False])
def test_training_steps_match_timm(kind, backend, layout, dtype, train):
    ours, theirs = _pair(kind, dtype=dtype)
    xs = _inputs(dtype, layout)
    got, _ = run_training_steps(ours.train(train), xs, backend)
    want, _ = run_training_steps(theirs.train(train), xs, "reference")
    exact = backend == "auto" and dtype == torch.float32
    for step_got, step_want in zip(got, want):
        for i, (a, e) in enumerate(zip(step_got, step_want)):
            if exact and (kind == "layer" or i == 0):  # the same ATen ops in the same order (module docstring)
                assert torch.equal(a, e)
            else:
                assert_close(a, e)


@pytest.mark.parametrize("kind", PAIRS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_is_at_least_as_accurate_as_timm(kind, backend):
    ours, theirs = _pair(kind, dtype=torch.bfloat16)
    truth_module = copy.deepcopy(theirs).double()
    xs = _inputs(torch.bfloat16, "channels_last", steps=1)
    got, _ = run_training_steps(ours, xs, backend)
    lowprec, _ = run_training_steps(theirs, xs, "reference")
    truth, _ = run_training_steps(truth_module, [x.double() for x in xs], "reference")
    for a, t, e in zip(got[0], lowprec[0], truth[0]):
        assert a.dtype == torch.bfloat16
        assert_lowprec_close(a, t, e)


@pytest.mark.parametrize("kind", PAIRS)
def test_from_module_and_to_torch(kind):
    ours_cls, timm_cls = PAIRS[kind]
    _, theirs = _pair(kind)
    theirs.eps = 1e-4
    adopted = ours_cls.from_module(theirs)
    assert type(adopted) is ours_cls and adopted.eps == 1e-4 and adopted.weight is theirs.weight
    back = adopted.to_torch()
    assert type(back) is timm_cls and back.eps == 1e-4 and back.weight is theirs.weight
    if kind == "layer":
        assert adopted.bias is theirs.bias and back.bias is theirs.bias
    x = nchw_input(2, 6, 3, 5, torch.float32, "contiguous")
    assert_close(adopted(x), theirs(x))
    assert_close(back(x), theirs(x))
