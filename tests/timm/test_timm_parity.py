"""Parity with timm itself (not a transcription): every EvoNorm variant, ``StdConv2d``, ``ScaledStdConv2d``,
``LayerNorm`` and ``RmsNorm``.

For each pair: the state_dict loads both ways (strictly), and several training steps on both backends give the same
outputs, input gradients, parameter gradients and buffers as timm's module, in train and in eval.

timm takes its statistics in fp32 from ``x.float()`` even for fp64 inputs (``timm/layers/evo_norm.py``:
``instance_std``, ``group_std``, the batch ``var``), so timm has fp32 accuracy whatever the input dtype: the
comparisons run in fp32 with the fp32 tolerance of :mod:`normlayers.testing` (different reduction orders on both
sides; no bit-equality is claimed). ``rms_norm`` in timm computes in the input's dtype, so the low-precision check
uses the rule of :func:`~normlayers.testing.assert_lowprec_close` with timm as the low-precision computation.

These tests skip only where timm is not installed; CI's timm leg sets ``NORMLAYERS_REQUIRE_TIMM=1``, which turns a
skip of a ``timm``-marked test into a failure (``tests/conftest.py``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import normlayers
from normlayers.testing import (assert_close, assert_lowprec_close, assert_state_dict_loads_both_ways,
                                run_training_steps)

timm_layers = pytest.importorskip("timm.layers")

pytestmark = pytest.mark.timm

BACKENDS = ("reference", "triton")
EVO_VARIANTS = ("B0", "B1", "B2", "S0", "S0a", "S1", "S1a", "S2", "S2a")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomize_(module: torch.nn.Module) -> None:
    """Parameters (and floating buffers) away from their initial ones and twos, so a swapped role would show."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)


def _assert_same_steps(ours: torch.nn.Module, theirs: torch.nn.Module, xs: list[torch.Tensor], backend_name: str,
                       *, train: bool) -> None:
    ours.train(train)
    theirs.train(train)
    got, got_buffers = run_training_steps(ours, xs, backend_name)
    want, want_buffers = run_training_steps(theirs, xs, "reference")
    assert len(got_buffers) == len(want_buffers)
    for step, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w)
        for i, (a, b) in enumerate(zip(g, w)):
            assert_close(a, b, msg=f"step {step}, tensor {i} (0: y, 1: dx, then parameter grads)")
    for a, b in zip(got_buffers, want_buffers):
        if a.is_floating_point():
            assert_close(a, b, msg="buffers after the steps")
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("train", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("variant", EVO_VARIANTS)
def test_evo_norm_matches_timm(variant: str, train: bool, backend_name: str) -> None:
    """Defaults included: both constructed with only ``num_features`` and ``groups``."""
    name = f"EvoNorm2d{variant}"
    kwargs = {} if variant.startswith("B") else {"groups": 4}
    theirs = getattr(timm_layers, name)(16, **kwargs)
    ours = getattr(normlayers, name)(16, **kwargs)
    _randomize_(theirs)
    assert_state_dict_loads_both_ways(ours, theirs)
    assert ours.eps == theirs.eps
    xs = [torch.randn(2, 16, 5, 5) * 2 + 0.5 for _ in range(3)]
    _assert_same_steps(ours, theirs, xs, backend_name, train=train)


def _timm_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


@pytest.mark.parametrize("groups", (1, 2))
def test_std_conv2d_matches_timm(groups: int) -> None:
    theirs = timm_layers.StdConv2d(8, 6, 3, groups=groups, bias=True)
    ours = normlayers.WSConv2d(8, 6, 3, padding=_timm_padding(3), groups=groups, bias=True)
    _randomize_(theirs)
    assert_state_dict_loads_both_ways(ours, theirs)
    assert ours.eps == theirs.eps
    xs = [torch.randn(2, 8, 7, 7) for _ in range(2)]
    for train in (True, False):
        _assert_same_steps(ours, theirs, xs, "reference", train=train)


@pytest.mark.parametrize("gamma", (1.0, 1.7139588594436646))
def test_scaled_std_conv2d_matches_timm(gamma: float) -> None:
    """timm stores ``scale = γ/√fan_in``, not ``γ``: ours recovers ``γ = scale·√fan_in``."""
    theirs = timm_layers.ScaledStdConv2d(8, 6, 3, gamma=gamma, eps=1e-5)
    fan_in = theirs.weight[0].numel()
    ours = normlayers.ScaledWSConv2d(8, 6, 3, padding=_timm_padding(3), gamma=theirs.scale * math.sqrt(fan_in),
                                     eps=theirs.eps)
    _randomize_(theirs)
    assert_state_dict_loads_both_ways(ours, theirs)
    assert ours.scale == pytest.approx(theirs.scale, rel=1e-15)
    xs = [torch.randn(2, 8, 7, 7) for _ in range(2)]
    for train in (True, False):
        _assert_same_steps(ours, theirs, xs, "reference", train=train)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_layer_norm_matches_timm(backend_name: str) -> None:
    theirs = timm_layers.LayerNorm(24)
    ours = normlayers.LayerNorm(24, eps=theirs.eps)
    _randomize_(theirs)
    assert_state_dict_loads_both_ways(ours, theirs)
    xs = [torch.randn(3, 5, 24) for _ in range(2)]
    _assert_same_steps(ours, theirs, xs, backend_name, train=True)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_rms_norm_matches_timm(backend_name: str) -> None:
    theirs = timm_layers.RmsNorm(24)
    ours = normlayers.RMSNorm(24, eps=theirs.eps)
    _randomize_(theirs)
    assert_state_dict_loads_both_ways(ours, theirs)
    xs = [torch.randn(3, 5, 24) for _ in range(2)]
    _assert_same_steps(ours, theirs, xs, backend_name, train=True)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_rms_norm_low_precision_vs_timm(backend_name: str, dtype: torch.dtype) -> None:
    """timm computes RMSNorm in the input's dtype; ours takes fp32 statistics, so ours is at most twice timm's error
    against fp64 (the low-precision rule)."""
    theirs = timm_layers.RmsNorm(64)
    _randomize_(theirs)
    ours = normlayers.RMSNorm(64, eps=theirs.eps)
    assert_state_dict_loads_both_ways(ours, theirs)
    exact = copy.deepcopy(theirs).double()
    x = torch.randn(4, 7, 64)
    with normlayers.backend(backend_name):
        got = ours.to(dtype)(x.to(dtype))
    assert_lowprec_close(got, theirs.to(dtype)(x.to(dtype)), exact(x.double()))
