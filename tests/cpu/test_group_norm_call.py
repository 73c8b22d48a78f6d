"""The one-step C++ entry of the CPU tier's GroupNorm (``group_norm_call`` in cpu/csrc/autograd.cpp): it gives the
Python path's results to the bit where it takes a call, and declines (``None``: the Python path, its checks and its
errors) every call it must not take."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normlayers
from normlayers import functional as NF
from normlayers.cpu import _extension, _native
from normlayers.cpu import group_norm as cpu_group_norm

from .conftest import use_autograd_node

pytestmark = pytest.mark.skipif(_native.load("group_norm_channels_last") is None or
                                _native.load("group_norm_nchw") is None,
                                reason="no C compiler (or NORMLAYERS_CPU_KERNELS=0): the ATen path runs")


@pytest.fixture
def extension(monkeypatch):
    use_autograd_node("cpp", monkeypatch)  # (skips, or fails under CI, where the extension cannot be built)
    return _extension.module()


LAYOUTS = {
    "nchw": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "transposed_nlc": lambda t: t.flatten(2).transpose(1, 2).contiguous().transpose(1, 2),
}


def _inputs(layout, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = LAYOUTS[layout](torch.randn(2, 32, 5, 7, generator=generator).to(dtype))
    weight = (1 + 0.1 * torch.randn(32, generator=generator)).to(dtype)
    bias = (0.1 * torch.randn(32, generator=generator)).to(dtype)
    return x, weight, bias


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("act", [None, "silu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_entry_gives_the_python_paths_results(extension, monkeypatch, layout, dtype, act, training):
    """Output, memory format and gradients of ``NF.group_norm`` through the entry equal those of the Python path to
    the same kernels (the entry switched off) exactly: one kernel's results, reached by another route."""
    def run():
        torch.manual_seed(0)  # (the same output gradient for both routes, whatever ran before)
        x, weight, bias = (t.requires_grad_(training) for t in _inputs(layout, dtype))
        y = NF.group_norm(x, 8, weight, bias, 1e-5, act)
        grads = torch.autograd.grad(y, (x, weight, bias), torch.randn_like(y)) if training else ()
        return y, grads

    y, grads = run()
    assert y.requires_grad == training and y.stride() == _inputs(layout, dtype)[0].stride()
    assert y.grad_fn is None or "CompiledGroupNorm" in y.grad_fn.name()
    monkeypatch.setattr(extension, "group_norm_call", lambda *args: None)
    y_python, grads_python = run()
    torch.testing.assert_close(y, y_python, rtol=0, atol=0)  # the same kernel by another route: exact equality
    for grad, grad_python in zip(grads, grads_python):
        torch.testing.assert_close(grad, grad_python, rtol=0, atol=0)  # its backward, as exactly


def test_a_module_call_takes_the_entry(extension, monkeypatch):
    """``normlayers.GroupNorm`` (fused SiLU) in a model's forward runs the entry: the Python path is never reached."""
    def python_path(*args):
        raise AssertionError("the Python path ran")

    monkeypatch.setattr(cpu_group_norm, "group_norm", python_path)
    norm = normlayers.GroupNorm(8, 32, act="silu")
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = norm(x)
    y_train = norm(x.requires_grad_())
    expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 8, norm.weight, norm.bias, norm.eps))
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y_train, expected)


class _Subclass(torch.Tensor):
    pass


class _RecordingMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _declined_calls():
    """``(x, num_groups, weight, bias, eps, act)`` of calls the entry must leave to the Python path."""
    x, weight, bias = _inputs("channels_last", torch.float32)
    nchw = x.contiguous()
    return {
        "gelu": (x, 8, weight, bias, 1e-5, "gelu"),  # (runs after the kernel, in Python)
        "unknown act": (x, 8, weight, bias, 1e-5, "tanh"),
        "fp16": (x.half(), 8, weight, bias, 1e-5, None),
        "fp64": (x.double(), 8, weight, bias, 1e-5, None),
        "strided": (nchw[:, :, ::2], 8, weight, bias, 1e-5, None),
        "subclass input": (x.as_subclass(_Subclass), 8, weight, bias, 1e-5, None),
        "subclass weight": (x, 8, weight.as_subclass(_Subclass), bias, 1e-5, None),
        "weight of another width": (x, 8, weight[:16], bias, 1e-5, None),
        "integer weight": (x, 8, weight.long(), bias, 1e-5, None),
        "weight not a tensor": (x, 8, [1.0] * 32, bias, 1e-5, None),
        "NCHW, fp16 weight": (nchw, 8, weight.half(), bias.half(), 1e-5, None),
        "NCHW, weight and bias of two dtypes": (nchw, 8, weight, bias.bfloat16(), 1e-5, None),
        "NCHW, strided weight": (nchw, 8, torch.randn(64)[::2], bias, 1e-5, None),
        "groups not dividing C": (x, 5, weight, bias, 1e-5, None),
        "zero groups": (x, 0, weight, bias, 1e-5, None),
        "bool groups": (x, True, weight, bias, 1e-5, None),
        "numpy groups": (x, np.int64(8), weight, bias, 1e-5, None),
        "groups beyond int64": (x, 2**70, weight, bias, 1e-5, None),
        "integer eps": (x, 8, weight, bias, 0, None),
        "negative eps": (x, 8, weight, bias, -1e-5, None),
        "infinite eps": (x, 8, weight, bias, math.inf, None),
        "NaN eps": (x, 8, weight, bias, math.nan, None),
        "empty batch": (x[:0], 8, weight, bias, 1e-5, None),
        "one value per group": (torch.randn(1, 8), 8, None, None, 1e-5, None),
        "1-D input": (torch.randn(32), 8, None, None, 1e-5, None),
        "meta input": (x.to("meta"), 8, None, None, 1e-5, None),
        "input not a tensor": ([1.0] * 32, 8, None, None, 1e-5, None),
    }


@pytest.mark.parametrize("name", list(_declined_calls()))
def test_the_entry_declines_what_it_must_not_take(extension, name):
    assert extension.group_norm_call(*_declined_calls()[name]) is None


def test_the_entry_declines_inside_torch_func_and_dispatch_modes(extension):
    """Inside a ``torch.func`` transform (even on a plain tensor it closes over) and under a ``TorchDispatchMode``
    the entry declines, so the transform or the mode sees the Python path's ops."""
    x, weight, bias = _inputs("nchw", torch.float32)
    declined = []

    def call(t):
        declined.append(extension.group_norm_call(x, 8, weight, bias, 1e-5, None) is None)
        return t

    torch.func.vmap(call)(torch.randn(3))
    torch.func.grad(lambda t: call(t).sum())(torch.randn(3))
    with _RecordingMode():
        declined.append(extension.group_norm_call(x, 8, weight, bias, 1e-5, None) is None)
    assert declined == [True, True, True]


def test_other_backends_do_not_take_the_entry(extension, monkeypatch):
    """With the ``reference`` backend the entry is not called: backend ``auto`` alone runs the CPU tier."""
    def entry(*args):
        raise AssertionError("the entry ran")

    monkeypatch.setattr(extension, "group_norm_call", entry)
    x, weight, bias = _inputs("channels_last", torch.float32)
    with normlayers.backend("reference"):
        y = NF.group_norm(x, 8, weight, bias, 1e-5, "silu")
    expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 8, weight, bias, 1e-5))
    torch.testing.assert_close(y, expected)
