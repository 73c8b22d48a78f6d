"""The CPU tier of PowerNorm and UnifiedNorm (closed-form GroupScaling and training-step Functions) against the
reference."""

from __future__ import annotations

import pytest
import torch

import normlayers
import normlayers.functional as NF
from normlayers.reference import power_norm as _ref_power
from normlayers.reference import unified_norm as _ref_unified
from normlayers.testing import assert_close

from .conftest import assert_cpu_tier_matches_reference

C = 8
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _tokens(shape, dtype, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3).to(dtype)


def _affine(dtype):
    gen = torch.Generator().manual_seed(1)
    return [(1 + 0.1 * torch.randn(C, generator=gen)).to(dtype), (0.1 * torch.randn(C, generator=gen)).to(dtype)]


def _pad(batch, length, seed=3):
    pad = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) > 0.6
    pad[0] = False  # at least one token
    return pad


def _power_buffers(step):
    gen = torch.Generator().manual_seed(2)
    return [1 + 0.2 * torch.rand(1, C, 1, 1, generator=gen), 0.1 * torch.randn(1, C, 1, 1, generator=gen),
            torch.tensor([step])]


def _unified_buffers(step, window=(3, 2)):
    gen = torch.Generator().manual_seed(2)
    return [1 + 0.2 * torch.rand(C, generator=gen), 0.1 * torch.randn(C, generator=gen),
            1 + 0.2 * torch.rand(window[0], C, generator=gen), 0.1 * torch.randn(window[1], C, generator=gen),
            torch.tensor([step]), torch.tensor([0])]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("step", [0, 5], ids=["warmup", "running"])
@pytest.mark.parametrize("group_num", [1, 2, None])
@pytest.mark.parametrize("batch_first, masked", [(False, False), (True, True), (False, True)])
def test_power_norm_matches_reference(group_num, step, training, dtype, batch_first, masked):
    shape = (3, 5, C) if batch_first else (5, 3, C)
    pad = _pad(3, 5) if masked else None

    def call(x, weight, bias, running_phi, ema_gz, iters):
        return NF.power_norm(x, running_phi, ema_gz, iters, weight, bias, pad, training=training, warmup_iters=2,
                             alpha_fwd=0.8, alpha_bkw=0.7, group_num=group_num, batch_first=batch_first)

    assert_cpu_tier_matches_reference(call, [_tokens(shape, dtype), *_affine(dtype)], _power_buffers(step))


def test_power_norm_options():
    """No affine parameters, the running backward denominator, 2-D input, an all-pad batch, an empty batch."""
    x = _tokens((5, 3, C), torch.float32)
    for kwargs, inputs in [(dict(backward_denominator="running"), [x]), (dict(group_num=None), [x[0]]),
                           (dict(pad_mask=torch.ones(3, 5, dtype=torch.bool)), [x]), ({}, [x[:0]])]:
        def call(x, running_phi, ema_gz, iters, kwargs=kwargs):
            return NF.power_norm(x, running_phi, ema_gz, iters, training=True, warmup_iters=2, **kwargs)

        assert_cpu_tier_matches_reference(call, inputs, _power_buffers(5))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("step", [0, 4, 1500], ids=["warmup", "window", "clamped"])
@pytest.mark.parametrize("outlier_filtration", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_unified_norm_matches_reference(outlier_filtration, step, training, dtype, masked):
    pad = _pad(3, 5) if masked else None

    def call(x, weight, bias, *buffers):
        return NF.unified_norm(x, *buffers, weight, bias, pad, training=training, warmup_iters=2, momentum=0.8,
                               outlier_filtration=outlier_filtration)

    assert_cpu_tier_matches_reference(call, [_tokens((3, 5, C), dtype), *_affine(dtype)], _unified_buffers(step))


def test_unified_norm_options():
    """No gradient compensation, a window of one, 2-D input, an empty batch."""
    x = _tokens((3, 5, C), torch.float32)
    for kwargs, inputs, window in [(dict(grad_compensation=False), [x], (3, 2)), ({}, [x], (1, 1)),
                                   ({}, [x[0]], (3, 2)), ({}, [x[:0]], (3, 2))]:
        def call(x, weight, bias, *buffers, kwargs=kwargs):
            return NF.unified_norm(x, *buffers, weight, bias, training=True, warmup_iters=2, **kwargs)

        assert_cpu_tier_matches_reference(call, [inputs[0], *_affine(torch.float32)], _unified_buffers(1500, window))


def test_dispatch():
    x = _tokens((5, 3, C), torch.float32).requires_grad_()
    y = NF.power_norm(x, *_power_buffers(0), training=True)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_PowerNormStepBackward"
    y = NF.unified_norm(x, *_unified_buffers(0)[:6], *_affine(torch.float32), training=True)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_UnifiedNormStepBackward"


@pytest.mark.parametrize("group_num", [2, None])
def test_eval_gradcheck_fp64(group_num):
    """Eval is an ordinary function of the input and the parameters (the training backward is each method's
    approximation, no gradient to check): first and second derivatives, GroupScaling's included."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen).requires_grad_()
    weight, bias = (torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    running = torch.rand(4, dtype=torch.float64, generator=gen) + 0.5

    def power(x, weight, bias):
        return NF.power_norm(x, running, torch.zeros(4, dtype=torch.float64), torch.tensor([0]), weight, bias,
                             group_num=group_num)

    def unified(x, weight, bias):
        return NF.unified_norm(x, running, running, running.expand(2, 4), running.expand(2, 4), torch.tensor([0]),
                               torch.tensor([0]), weight, bias)

    for fn in (power, unified):
        assert torch.autograd.gradcheck(fn, (x, weight, bias))
        assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("name", ["power", "unified"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiles_fullgraph(name, training):
    torch._dynamo.reset()
    x = _tokens((5, 3, C), torch.float32)
    weight, bias = (p.requires_grad_() for p in _affine(torch.float32))

    def step(x, *buffers):
        if name == "power":
            y = NF.power_norm(x, *buffers, weight, bias, training=training, warmup_iters=2, group_num=2)
        else:
            y = NF.unified_norm(x, *buffers, weight, bias, training=training, warmup_iters=2)
        return y.square().sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaf = x.clone().requires_grad_()
        buffers = _power_buffers(5) if name == "power" else _unified_buffers(1500)[:6]
        results.append([*torch.autograd.grad(fn(leaf, *buffers), [leaf, weight, bias]), *buffers])
    for a, c in zip(*results):
        assert_close(a, c) if a.is_floating_point() else torch.testing.assert_close(a, c)


@pytest.mark.parametrize("outlier_filtration", [False, True])
def test_step_decisions_as_python_values_match_device_ones(outlier_filtration):
    """The CPU tier passes the step as an int in eager (Python branches); under torch.compile as a tensor
    (torch.where): the reference's statistics give the same bits either way, across warm-up, window, outlier and
    clamped steps, forward and backward."""
    gen = torch.Generator().manual_seed(5)
    results = {}
    for as_tensor in (False, True):
        running_var, ema_gz, buffer_x2, buffer_gz = torch.ones(C), torch.zeros(C), torch.ones(3, C), torch.zeros(2, C)
        power_phi, skip_counter, outputs = torch.ones(C), torch.tensor([0]), []
        for t in [1, 2, 3, 4, 5, 6, 1500, 1501]:
            gen.manual_seed(t)
            q = (1 + 0.05 * torch.rand(C, generator=gen)) * (40.0 if t % 3 == 0 else 1.0)  # every third: outlier
            scale = torch.full((C,), 0.5)  # q is passed as q·s², as from masked_square_mean
            q = q * scale * scale
            step = torch.tensor([t]) if as_tensor else t
            inv_std, r, skip = _ref_unified.unified_norm_statistics_(
                q, scale, None, running_var, buffer_x2, skip_counter, step, eps=1e-5, momentum=0.8, warmup_iters=2,
                outlier_filtration=outlier_filtration, grad_compensation=True)
            c = _ref_unified.unified_norm_backward_statistics_(q - 0.5, ema_gz, buffer_gz, step, skip, momentum=0.8,
                                                                warmup_iters=2)
            forward_scale, grad_scale = _ref_power.power_norm_statistics_(
                q, scale, None, power_phi, step, eps=1e-5, alpha_fwd=0.8, warmup_iters=4, backward_denominator="batch")
            outputs += [inv_std, r, torch.as_tensor(skip).reshape(1), c, forward_scale, grad_scale, running_var.clone(),
                        buffer_x2.clone(), buffer_gz.clone(), ema_gz.clone(), power_phi.clone(), skip_counter.clone()]
        results[as_tensor] = outputs
    if outlier_filtration:  # both kinds of step were taken after warm-up
        assert 0 < int(skip_counter) < 7
    for python_value, device_value in zip(results[False], results[True]):
        assert torch.equal(python_value, device_value)


def test_training_under_fake_tensor_mode():
    """The eager CPU tier reads the step number on the host; under a fake-tensor mode (shape propagation, as in
    export tooling) it has no value to read and must take the device path instead."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    modules = [normlayers.PowerNorm(C), normlayers.UnifiedNorm(C)]
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(5, 3, C)
        for module in modules:
            assert module(x).shape == x.shape
