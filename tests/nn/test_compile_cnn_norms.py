"""torch.compile(fullgraph=True) of the CNN norms on CPU: same outputs and gradients as eager."""

from __future__ import annotations

import copy

import pytest
import torch

import normlayers
from normlayers.testing import max_abs_error, tolerance

EVO_NORMS = ("EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dB2", "EvoNorm2dS0", "EvoNorm2dS0a", "EvoNorm2dS1", "EvoNorm2dS1a",
             "EvoNorm2dS2", "EvoNorm2dS2a")


def _evo_norm(name: str) -> torch.nn.Module:
    return getattr(normlayers, name)(12, **({"groups": 3} if name.startswith("EvoNorm2dS") else {}))


MODULES = {
    "BatchChannelNorm2d": lambda: normlayers.BatchChannelNorm2d(12, num_groups=3),
    "BatchChannelNorm2d_estimate": lambda: normlayers.BatchChannelNorm2d(12, num_groups=3, estimate=True,
                                                                         estimate_rate=0.1),
    "WSConv2d": lambda: normlayers.WSConv2d(12, 6, 3, padding=1),
    "ScaledWSConv2d": lambda: normlayers.ScaledWSConv2d(12, 6, 3, padding=1),
    **{name: (lambda name=name: _evo_norm(name)) for name in EVO_NORMS},
}


def _step(module, x):
    leaf = x.clone().requires_grad_()
    out = module(leaf)
    out.square().sum().backward()
    return [out.detach(), leaf.grad, *(p.grad.clone() for p in module.parameters()),
            *(b.clone() for b in module.buffers())]


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_matches_eager(name, training):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = MODULES[name]().train(training)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    compiled_module = MODULES[name]().train(training)
    compiled_module.load_state_dict(eager.state_dict())
    x = torch.randn(2, 12, 5, 4)
    if name.startswith("BatchChannelNorm2d"):
        # On CPU eager BCN runs the CPU tier's fused Function and the trace its F.batch_norm + F.group_norm composite:
        # different roundings of the batch-stage weight gradient, a sum that cancels to ~1e-3 of its terms. Both
        # against fp64, within twice the fp32 reference's own error (the low-precision rule) plus the fp32 tolerance.
        reference = [copy.deepcopy(eager) for _ in range(2)]
        with normlayers.backend("reference"):
            expected, reference32 = _step(reference[0].double(), x.double()), _step(reference[1], x)
        rtol, atol = tolerance(torch.float32)
        for results in (_step(eager, x), _step(torch.compile(compiled_module, fullgraph=True, backend="aot_eager"), x)):
            for a, r, e in zip(results, reference32, expected):
                assert max_abs_error(a, e) <= 2 * max_abs_error(r, e) + atol + rtol * e.abs().max().item()
        return
    expected = _step(eager, x)
    actual = _step(torch.compile(compiled_module, fullgraph=True, backend="aot_eager"), x)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)  # torch.testing's defaults: the same ops run, traced or not
