"""Every layer family on inputs offset from zero (``x = offset + N(0, 1)``), on every backend: the output and every
gradient within the fp32 bound against the fp64 reference (docs/reliability.md, "Inputs offset from zero").

The bound is the benchmark's (:func:`normlayers.bench.accuracy.error_bounds`): twice the fp32 reference's own error
against the fp64 reference, plus the fp32 tolerance. A layer whose math is ill-conditioned at an offset loses accuracy
in the fp32 reference too, and its bound widens with it; a raw-moment variance (``E[x²] − E[x]²``) or a backward that
takes the mean off after summing (``Σ dy·x − mean·Σ dy``) loses more than the reference's centred forms and fails.
On the reference backend that bound is its own error (it cannot fail): there the test asks that the reference be at most
twice as far off as the best of the other tiers plus the tolerance, so a reference that cancels where a tier does not
shows. GroupNorm is covered by tests/cpu/test_group_norm.py.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch.func import functional_call

import normlayers
import normlayers.functional as NF
from normlayers.bench.accuracy import error_bounds, max_abs_error
from normlayers.cpu import _native

BACKENDS = ("auto", "triton", "reference")


def _module_case(make: Callable[[], torch.nn.Module], x_shape: tuple[int, ...], *extra: torch.Tensor, seed: int = 0):
    """A module's forward as ``fn(leaves)``: the input ``x`` and the module's parameters (weights perturbed off their
    initial values, so their gradients are not trivially summed) are the leaves; buffers fresh per call."""
    generator = torch.Generator().manual_seed(seed)
    params = {name: p.detach().double() + 0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
              for name, p in make().named_parameters()}

    def fn(leaves: dict[str, torch.Tensor]) -> torch.Tensor:
        layer = make().to(leaves["x"].dtype).train()
        return functional_call(layer, {k: v for k, v in leaves.items() if k != "x"}, (leaves["x"], *extra))

    return fn, {"x": torch.randn(x_shape, generator=generator, dtype=torch.float64), **params}


def _functional_case(call: Callable[..., torch.Tensor], x_shape: tuple[int, ...], seed: int = 0, **vectors: int):
    generator = torch.Generator().manual_seed(seed)
    tensors = {"x": torch.randn(x_shape, generator=generator, dtype=torch.float64)}
    tensors.update({name: 1 + 0.1 * torch.randn(size, generator=generator, dtype=torch.float64)
                    for name, size in vectors.items()})
    return (lambda leaves: call(**leaves)), tensors


def _region_mask() -> torch.Tensor:
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 1:3, :3] = 1.0
    return mask


CASES = {
    "layer_norm": lambda seed: _functional_case(lambda x, w, b: NF.layer_norm(x, (64,), w, b), (32, 64), seed, w=64,
                                                b=64),
    "rms_norm": lambda seed: _functional_case(lambda x, w: NF.rms_norm(x, (64,), w), (4, 64), seed, w=64),
    "crms_norm": lambda seed: _functional_case(lambda x, w: NF.crms_norm(x, (63,), w), (4, 63), seed, w=63),
    "layer_norm2d": lambda seed: _functional_case(lambda x, w, b: NF.layer_norm2d(x, w, b), (4, 32, 4, 4), seed, w=32,
                                                  b=32),
    "batch_channel": lambda seed: _module_case(lambda: normlayers.BatchChannelNorm2d(32, num_groups=8), (4, 32, 3, 3),
                                               seed=seed),
    "weight_standardize": lambda seed: _functional_case(lambda x: NF.weight_standardize(x), (32, 4, 3, 3), seed),
    "scaled_weight_standardize": lambda seed: _functional_case(lambda x, g: NF.scaled_weight_standardize(x, g),
                                                               (8, 4, 3, 3), seed, g=8),
    "evo_norm_b0": lambda seed: _module_case(lambda: normlayers.EvoNorm2dB0(16), (4, 16, 3, 3), seed=seed),
    "evo_norm_b1": lambda seed: _module_case(lambda: normlayers.EvoNorm2dB1(16), (4, 16, 3, 3), seed=seed),
    "evo_norm_b2": lambda seed: _module_case(lambda: normlayers.EvoNorm2dB2(16), (4, 16, 3, 3), seed=seed),
    "evo_norm_s0": lambda seed: _module_case(lambda: normlayers.EvoNorm2dS0(16, groups=4), (2, 16, 3, 3), seed=seed),
    "evo_norm_s0a": lambda seed: _module_case(lambda: normlayers.EvoNorm2dS0a(16, groups=4, apply_act=False),
                                              (2, 16, 3, 3), seed=seed),
    "evo_norm_s1": lambda seed: _module_case(lambda: normlayers.EvoNorm2dS1(16, groups=4), (2, 16, 3, 3), seed=seed),
    "evo_norm_s2": lambda seed: _module_case(lambda: normlayers.EvoNorm2dS2(16, groups=4), (2, 16, 3, 3), seed=seed),
    "power_norm": lambda seed: _module_case(lambda: normlayers.PowerNorm(16, batch_first=True, warmup_iters=2),
                                            (3, 5, 16), seed=seed),
    "unified_norm": lambda seed: _module_case(lambda: normlayers.UnifiedNorm(16, warmup_iters=2), (3, 5, 16),
                                              seed=seed),
    "region_norm": lambda seed: _module_case(lambda: normlayers.RegionNorm2d(8), (2, 8, 4, 4), _region_mask(),
                                             seed=seed),
}


def _run(backend: str, fn, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{"y": output, "d<name>": gradient of every leaf}`` of one forward and a backward with seeded N(0, 1) ``dy``."""
    leaves = {name: t.to(dtype).requires_grad_() for name, t in tensors.items()}
    with normlayers.backend(backend):
        y = fn(leaves)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return {"y": y.detach(), **{f"d{name}": g for name, g in zip(leaves, grads)}}


def offset_errors(name: str, offset: float, seed: int = 0) -> dict[str, dict[str, tuple[float, float]]]:
    """``{backend: {tensor: (max error against fp64, bound)}}`` of layer ``name``, its input offset by ``offset``."""
    fn, tensors = CASES[name](seed)
    tensors["x"] = (tensors["x"] + offset).float().double()  # the fp32 input, exactly, for every precision
    expected = _run("reference", fn, tensors, torch.float64)
    results = {backend: _run(backend, fn, tensors, torch.float32) for backend in BACKENDS}
    errors = {backend: {k: max_abs_error(v, expected[k]) for k, v in result.items()}
              for backend, result in results.items()}
    bounds = {backend: error_bounds(results["reference"], expected, torch.float32) for backend in BACKENDS}
    for k, bound in error_bounds({k: expected[k] for k in expected}, expected, torch.float32).items():
        best_other = min(errors[backend][k] for backend in BACKENDS if backend != "reference")
        bounds["reference"][k] = 2 * best_other + bound  # ``bound`` here is the tolerance alone (zero own error)
    return {backend: {k: (errors[backend][k], bounds[backend][k]) for k in expected} for backend in BACKENDS}


# (layer, backend, offset) measured over the bound and not fixed: the reason holds the measured ratios.
KNOWN_OVER_BOUND: dict[tuple[str, str, float], str] = {
    ("evo_norm_s0", "triton", 100.0): "dx 2.9e-4 > 1.83e-4 (1.6x; up to 3.7x over seeds 0-7): the group variance is "
                                      "taken from fp32 plane means, each rounded on its own (mean·2⁻²⁴)",
    ("evo_norm_s0", "triton", 1000.0): "y 3.3x, dx 8.6x (up to 30x over seeds 0-7), dweight 2.7x: as at 100",
    ("evo_norm_s0a", "triton", 100.0): "dx 3.03e-4 > 1.35e-4 (2.3x): as S0",
    ("evo_norm_s0a", "triton", 1000.0): "y 3.9x, dx 17x, dweight 5.5x: as S0",
    ("evo_norm_s1", "triton", 100.0): "dx 2.81e-4 > 1.34e-4 (2.1x): as S0",
    ("evo_norm_s1", "triton", 1000.0): "y 3.8x, dx 17x, dweight 5.5x: as S0",
    ("evo_norm_b2", "auto", 100.0): "dx 3.85e-3 > 3.72e-3 (1.03x; 0.5-1.3x over seeds 0-7, the kernels 1.2x): B2's "
                                    "rms − x cancels in the math itself, its error of the reference's own size",
    ("layer_norm2d", "reference", 100.0): "dw 1.63e-4, 4.4x the CPU tier's 2x + tol: the reference's x − mean "
                                          "carries the fp32 mean's rounding, the tiers centre it off",
    ("layer_norm2d", "reference", 1000.0): "y 1.4x, dx 3.4x, dw 19x (7.0e-4 vs 3.6e-5): as at 100",
    ("batch_channel", "reference", 1000.0): "dbn.weight 1.19e-3 > 6.88e-4 (1.7x the CPU tier's 2x + tol)",
    ("region_norm", "reference", 100.0): "dbackground_gamma 7.80e-5 > 7.73e-5 (1.01x the best tier's 2x + tol)",
}
if _native.load("row_norms") is not None:  # the CPU tier's compiled LayerNorm backward, more accurate than both
    KNOWN_OVER_BOUND[("layer_norm", "reference", 1000.0)] = (
        "dw 6.15e-4 > 5.10e-4 (1.2x the CPU tier's 2x + tol), dx 1.03x: the compiled backward sums dw over blocks "
        "of 64 rows into fp64, the reference over all rows at once")

# Of those, the ones within a few percent of the bound at seed 0 (and on either side of it over seeds): a strict xfail
# there would flip with a summation order (another thread count, another CPU), so they are not strict; the reason still
# shows in the report, and a pass shows as XPASS.
BORDERLINE = {("evo_norm_b2", "auto", 100.0), ("region_norm", "reference", 100.0)}

OFFSETS = (5.0, 100.0, 1000.0)


def _params():
    for name in CASES:
        for offset in OFFSETS:
            for backend in BACKENDS:
                reason = KNOWN_OVER_BOUND.get((name, backend, offset))
                strict = (name, backend, offset) not in BORDERLINE
                marks = [pytest.mark.xfail(strict=strict, reason=reason)] if reason else []
                yield pytest.param(name, backend, offset, marks=marks, id=f"{name}-{backend}-{offset:g}")


_CACHE: dict[tuple[str, float], dict] = {}


@pytest.mark.parametrize(("name", "backend", "offset"), list(_params()))
def test_offset_input_within_the_bound(name, backend, offset):
    """The output and every gradient of ``name`` on ``backend`` within the bound (module docstring)."""
    if (name, offset) not in _CACHE:  # one fp64 reference and one run per backend serve the three backends' tests
        _CACHE[(name, offset)] = offset_errors(name, offset)
    over = {k: f"{error:.3g} > {bound:.3g} ({error / bound:.2g}x)"
            for k, (error, bound) in _CACHE[(name, offset)][backend].items() if not error <= bound}
    assert not over, over
