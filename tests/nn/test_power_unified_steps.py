"""PowerNorm and UnifiedNorm follow the authors' algorithms step by step (spec A §1.4–1.6 and §2.4–2.6).

The oracles here are independent transcriptions of the spec's pseudo-code, written in this file: plain Python state
(``t`` an int, buffers as fp64 tensors), Python ``if`` statements where the implementation uses ``torch.where``, the
GroupScaling moment spread with ``repeat_interleave`` as the official code does, the pad tokens selected by boolean
indexing (``x[~pad_mask.T]``) where the implementation multiplies by a mask, and the approximate backward computed by
hand from a fixed upstream gradient ``dy``. Each test runs ≥ 50 training steps through the layer (both backends: the
reference, and the Triton kernels, under the interpreter on CPU) in fp64, and checks at every step the output, the
input gradient, the parameter gradients and every buffer.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

import normlayers
from normlayers.testing import assert_close

STEPS = 52


def _assert_step(step: int, name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert_close(actual.reshape(expected.shape), expected, msg=f"step {step}: {name}")


def _channel_scales(channels: int, gen: torch.Generator) -> torch.Tensor:
    """Heterogeneous per-channel scales, log-uniform in [0.1, 10] (spec §2.7: the pooled outlier test needs them)."""
    return torch.exp(torch.empty(channels, dtype=torch.float64).uniform_(math.log(0.1), math.log(10), generator=gen))


def _pad_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) True = padding: random lengths, one sample always fully padded, one never."""
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    lengths[0], lengths[-1] = 0, length
    return torch.arange(length)[None, :] >= lengths[:, None]


# ----------------------------------------------------------------------------------------------------------------------
# PowerNorm: transcription of spec §1.4 (forward), §1.5 (backward)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PNState:
    channels: int
    phi: torch.Tensor = None
    ema_gz: torch.Tensor = None
    iters: int = 0

    def __post_init__(self):
        self.phi = torch.ones(self.channels, dtype=torch.float64)
        self.ema_gz = torch.zeros(self.channels, dtype=torch.float64)


def pn_spec_step(s: PNState, x: torch.Tensor, pad_mask: Optional[torch.Tensor], dy: torch.Tensor, w: torch.Tensor,
                 b: torch.Tensor, *, eps: float, alpha_fwd: float, alpha_bkw: float, warmup: int,
                 group_num: Optional[int], backward_denominator: str):
    """One training step of MaskPowerNorm on x (T, B, C); returns (y, dx, dw, db) and updates ``s``."""
    s.iters += 1
    t = s.iters
    x = x.detach().requires_grad_()
    T, B, C = x.shape
    if group_num is not None:  # GroupScaling1D (L28–37)
        cg = C // group_num
        moment2 = torch.repeat_interleave((x.reshape(T, B, group_num, cg) ** 2).mean(3, keepdim=True), cg, dim=-1)
        u = x / torch.sqrt(moment2.reshape(T, B, C) + 1e-5)
    else:
        u = x * 1
    masked = u[~pad_mask.T] if pad_mask is not None else u.reshape(-1, C)
    if masked.shape[0] == 0:
        q = s.phi.clone()  # the documented guard (spec §1.8); the official code would produce NaN
    else:
        q = (masked.detach() ** 2).mean(0)
    phi_before = s.phi.clone()
    denom = q if t <= warmup else phi_before
    z = u.detach() / torch.sqrt(denom + eps)
    y = w * z + b
    if t < warmup:
        s.phi = s.phi * (t - 1) / t + q / t
    s.phi = alpha_fwd * s.phi + (1 - alpha_fwd) * q
    # backward (L74–95)
    g = dy * w
    approx = g - (1 - alpha_bkw) * s.ema_gz * z
    s.ema_gz = s.ema_gz + (approx * z).reshape(-1, C).mean(0)
    grad_denom = q if backward_denominator == "batch" else phi_before
    du = approx / torch.sqrt(grad_denom + eps)
    (dx,) = torch.autograd.grad(u, x, du)
    return y.detach(), dx, (dy * z).reshape(-1, C).sum(0), dy.reshape(-1, C).sum(0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("group_num, masked, batch_first, backward_denominator", [
    (2, True, False, "batch"),
    (1, False, False, "batch"),
    (None, True, True, "running"),
])
def test_power_norm_matches_spec_step_by_step(backend, group_num, masked, batch_first, backward_denominator):
    gen = torch.Generator().manual_seed(11)
    T, B, C, warmup = 5, 3, 6, 20
    cfg = dict(eps=1e-5, alpha_fwd=0.9, alpha_bkw=0.8, warmup=warmup, group_num=group_num,
               backward_denominator=backward_denominator)
    layer = normlayers.PowerNorm(C, alpha_bkw=0.8, warmup_iters=warmup, group_num=group_num, batch_first=batch_first,
                                 backward_denominator=backward_denominator, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    spec = PNState(C)
    scales = _channel_scales(C, gen)
    with normlayers.backend(backend):
        for step in range(1, STEPS + 1):
            x = torch.randn(T, B, C, generator=gen, dtype=torch.float64) * scales
            dy = torch.randn(T, B, C, generator=gen, dtype=torch.float64)
            pad = _pad_mask(B, T, gen) if masked else None
            y_ref, dx_ref, dw_ref, db_ref = pn_spec_step(spec, x, pad, dy, w, b, **cfg)
            x_in = (x.transpose(0, 1) if batch_first else x).clone().requires_grad_()
            y = layer(x_in, pad_mask=pad)
            y.backward(dy.transpose(0, 1) if batch_first else dy)
            to_tbc = (lambda t: t.transpose(0, 1)) if batch_first else (lambda t: t)
            _assert_step(step, "y", to_tbc(y.detach()), y_ref)
            _assert_step(step, "dx", to_tbc(x_in.grad), dx_ref)
            _assert_step(step, "dweight", layer.weight.grad, dw_ref)
            _assert_step(step, "dbias", layer.bias.grad, db_ref)
            _assert_step(step, "running_phi", layer.running_phi, spec.phi)
            _assert_step(step, "ema_gz", layer.ema_gz, spec.ema_gz)
            assert layer.iters.item() == spec.iters == step
            layer.zero_grad()
    assert layer.running_phi.shape == (1, C, 1, 1) and layer.ema_gz.shape == (1, C, 1, 1)


# ----------------------------------------------------------------------------------------------------------------------
# UnifiedNorm: transcription of spec §2.4 (forward), §2.5 (backward)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class UNState:
    channels: int
    window: int
    window_bwd: int
    running_var: torch.Tensor = None
    ema_gz: torch.Tensor = None
    buffer_x2: torch.Tensor = None
    buffer_gz: torch.Tensor = None
    iters: int = 0
    skip_counter: int = 0
    skipped_steps: list = field(default_factory=list)
    compensated_steps: list = field(default_factory=list)  # steps where r entered the backward
    clamped_steps: list = field(default_factory=list)  # ... and was clamped to [1/5, 5]

    def __post_init__(self):
        self.running_var = torch.ones(self.channels, dtype=torch.float64)
        self.ema_gz = torch.zeros(self.channels, dtype=torch.float64)
        self.buffer_x2 = torch.zeros(self.window, self.channels, dtype=torch.float64)
        self.buffer_gz = torch.zeros(self.window_bwd, self.channels, dtype=torch.float64)


def un_spec_step(s: UNState, x: torch.Tensor, pad_mask: Optional[torch.Tensor], dy: torch.Tensor, w: torch.Tensor,
                 b: torch.Tensor, *, eps: float, momentum: float, warmup: int, filtration: bool,
                 grad_compensation: bool):
    """One training step of UN1d on x (B, N, C); returns (y, dx, dw, db) and updates ``s``."""
    s.iters += 1
    t, M, Mb = s.iters, s.window, s.window_bwd
    C = x.shape[-1]
    valid = x[~pad_mask] if pad_mask is not None else x.reshape(-1, C)
    q = (valid ** 2).mean(0) if valid.shape[0] > 0 else s.running_var.clone()  # guard, spec §2.8
    rvar = torch.var(torch.sqrt(s.buffer_x2))
    s.buffer_x2[t % M] = q
    skip = M <= 1
    if filtration and t >= warmup:
        am = s.buffer_x2.mean(0)
        gm = torch.exp(torch.log(s.buffer_x2).mean(0))
        if bool(((am - gm) > rvar * M).any()):
            s.buffer_x2[t % M] = s.running_var
            skip = True
            s.skip_counter += 1
            s.skipped_steps.append(t)
    if t <= M or t < warmup or skip:
        var = q
    else:
        var = torch.exp(torch.log(s.buffer_x2).mean(0))
    r = torch.sqrt(var + eps) / torch.sqrt(s.running_var + eps)
    if t <= max(1000, warmup) or skip or not grad_compensation:
        r = torch.ones_like(r)
    else:
        s.compensated_steps.append(t)
        if bool(((r < 1 / 5) | (r > 5)).any()):
            s.clamped_steps.append(t)
        r = r.clamp(1 / 5, 5)
    z = x / torch.sqrt(var + eps)
    y = w * z + b
    s.running_var = momentum * s.running_var + (1 - momentum) * var
    # backward
    g = dy * w * r
    gz = (g * z).reshape(-1, C).mean(0)
    s.buffer_gz[t % Mb] = s.ema_gz if skip else gz
    if t <= Mb or t < warmup or skip:
        mean_gz = gz
    else:
        mean_gz = s.buffer_gz.mean(0)
    s.ema_gz = momentum * s.ema_gz + (1 - momentum) * mean_gz
    c = mean_gz if skip else s.ema_gz
    dx = (g - c * z) / torch.sqrt(var + eps)
    return y, dx, (dy * r * z).reshape(-1, C).sum(0), dy.reshape(-1, C).sum(0)


def _run_un(backend: str, *, window, warmup: int, filtration: bool, masked: bool, start_iters: int = 0,
            grad_compensation: bool = True, outlier_steps=(), outlier_scale: float = 30.0, steps: int = STEPS,
            seed: int = 5) -> UNState:
    gen = torch.Generator().manual_seed(seed)
    B, N, C = 2, 5, 6
    layer = normlayers.UnifiedNorm(C, window_size=window, warmup_iters=warmup, outlier_filtration=filtration,
                                   grad_compensation=grad_compensation, dtype=torch.float64)
    m, mb = layer.window_size
    spec = UNState(C, m, mb)
    scales = _channel_scales(C, gen)
    if start_iters:
        # Resume from a trained-looking state (buffers of plausible statistics), to reach the r-clamp region.
        spec.iters = start_iters
        spec.running_var = scales ** 2 * (1 + 0.1 * torch.rand(C, generator=gen, dtype=torch.float64))
        spec.buffer_x2 = scales ** 2 * (1 + 0.1 * torch.rand(m, C, generator=gen, dtype=torch.float64))
        spec.ema_gz = 0.1 * torch.randn(C, generator=gen, dtype=torch.float64)
        spec.buffer_gz = 0.1 * torch.randn(mb, C, generator=gen, dtype=torch.float64)
        layer.load_state_dict({**layer.state_dict(), "iters": torch.tensor([start_iters]),
                               "running_var": spec.running_var, "buffer_x2": spec.buffer_x2,
                               "ema_gz": spec.ema_gz, "buffer_gz": spec.buffer_gz})
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    cfg = dict(eps=1e-5, momentum=0.9, warmup=warmup, filtration=filtration, grad_compensation=grad_compensation)
    with normlayers.backend(backend):
        for step in range(start_iters + 1, start_iters + steps + 1):
            x = torch.randn(B, N, C, generator=gen, dtype=torch.float64) * scales
            if step in outlier_steps:
                x = x * outlier_scale  # an injected outlier batch
            dy = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
            pad = _pad_mask(B, N, gen) if masked else None
            y_ref, dx_ref, dw_ref, db_ref = un_spec_step(spec, x, pad, dy, w, b, **cfg)
            x_in = x.clone().requires_grad_()
            y = layer(x_in, pad_mask=pad)
            y.backward(dy)
            _assert_step(step, "y", y.detach(), y_ref)
            _assert_step(step, "dx", x_in.grad, dx_ref)
            _assert_step(step, "dweight", layer.weight.grad, dw_ref)
            _assert_step(step, "dbias", layer.bias.grad, db_ref)
            for name in ("running_var", "ema_gz", "buffer_x2", "buffer_gz"):
                _assert_step(step, name, getattr(layer, name), getattr(spec, name))
            assert layer.iters.item() == spec.iters == step
            assert layer.skip_counter.item() == spec.skip_counter, f"step {step}: skip_counter"
            layer.zero_grad()
    return spec


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("masked", [False, True])
def test_unified_norm_matches_spec_without_filtration(backend, masked):
    spec = _run_un(backend, window=4, warmup=20, filtration=False, masked=masked)
    assert spec.skip_counter == 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unified_norm_matches_spec_with_filtration_firing(backend):
    # Heterogeneous channel scales keep the pooled test quiet on ordinary batches; the ×30 batches are outliers.
    spec = _run_un(backend, window=(3, 2), warmup=20, filtration=True, masked=True, outlier_steps=(30, 41))
    assert spec.skipped_steps and len(spec.skipped_steps) < STEPS - 20, spec.skipped_steps
    assert 30 in spec.skipped_steps and 41 in spec.skipped_steps


@pytest.mark.parametrize("grad_compensation", [True, False])
def test_unified_norm_matches_spec_across_r_clamp_start(grad_compensation):
    # Resumed at step 975 with warmup_iters=990: crosses the end of warm-up and the hard-coded step 1000 after which
    # r = sqrt(var+eps)/sqrt(running_var+eps), clamped to [1/5, 5], enters the backward. Without filtration, a ×1000
    # batch at step 1010 lifts the geometric mean ~30-fold, so r is clamped there.
    spec = _run_un("reference", window=4, warmup=990, filtration=False, masked=True, start_iters=975,
                   grad_compensation=grad_compensation, outlier_steps=(1010,), outlier_scale=1000.0)
    if grad_compensation:
        assert spec.compensated_steps[0] == 1001 and 1010 in spec.clamped_steps
    else:
        assert not spec.compensated_steps


def test_unified_norm_window_one_is_always_exact():
    # M = 1: every step "skips" (spec §2.4): batch statistic forward, exact gradient backward.
    spec = _run_un("reference", window=1, warmup=5, filtration=False, masked=False, steps=20)
    assert spec.skip_counter == 0


def _am_minus_gm(column: list[float]) -> float:
    return sum(column) / len(column) - math.prod(column) ** (1 / len(column))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("side, margin", [("inside", 0.98), ("outside", 1.02)])
def test_unified_norm_filtration_threshold_edges(backend, side, margin):
    # The outlier test is "AM − GM of the window > M · (unbiased variance of sqrt(buffer_x2), pooled over all M·C
    # entries of the previous window)". The ×30 batches above pass any threshold in a wide band; these steps sit 2%
    # inside and 2% outside it. Channel 0's window is [0.5, 1, 4], channel 1's is flat [1, 1, 1] (AM = GM, and its
    # entries enter the pooled variance); t = 21, warm-up 20, so this step writes slot 21 % 3 = 0. The threshold comes
    # from Python's statistics.variance (n − 1 denominator): the biased variance (n = 6) lowers it by 1/6, a
    # per-channel variance raises it ~2.3-fold, so either mistake moves one of the two cases to the other side.
    window, start, warmup = 3, 20, 20
    column0, column1 = [0.5, 1.0, 4.0], [1.0, 1.0, 1.0]
    pooled = statistics.variance([math.sqrt(v) for v in column0 + column1])
    target = margin * window * pooled
    lo, hi = 2.0, 100.0  # AM − GM of [q, 1, 4] grows with q above its minimum at q = 2: bisect for the target
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _am_minus_gm([mid, 1.0, 4.0]) < target else (lo, mid)
    q = (lo + hi) / 2
    buffer_x2 = torch.tensor([column0, column1], dtype=torch.float64).T.contiguous()
    running_var = torch.tensor([2.0, 1.5], dtype=torch.float64)

    spec = UNState(2, window, window)
    spec.iters, spec.buffer_x2, spec.running_var = start, buffer_x2.clone(), running_var.clone()
    layer = normlayers.UnifiedNorm(2, window_size=window, warmup_iters=warmup, outlier_filtration=True,
                                   dtype=torch.float64)
    layer.load_state_dict({**layer.state_dict(), "iters": torch.tensor([start]), "buffer_x2": buffer_x2.clone(),
                           "running_var": running_var.clone()})
    x = torch.tensor([[[math.sqrt(q), 1.0]]], dtype=torch.float64)  # one token: q per channel is x²
    dy = torch.tensor([[[0.3, -0.7]]], dtype=torch.float64)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    y_ref, dx_ref, _, _ = un_spec_step(spec, x, None, dy, w, b, eps=layer.eps, momentum=layer.momentum,
                                       warmup=warmup, filtration=True, grad_compensation=True)
    assert spec.skip_counter == (side == "outside"), "the case is not on the intended side of the threshold"
    x_in = x.clone().requires_grad_()
    with normlayers.backend(backend):
        y = layer(x_in)
        y.backward(dy)
    assert layer.skip_counter.item() == spec.skip_counter
    _assert_step(start + 1, "y", y.detach(), y_ref)
    _assert_step(start + 1, "dx", x_in.grad, dx_ref)
    for name in ("running_var", "buffer_x2", "ema_gz", "buffer_gz"):
        _assert_step(start + 1, name, getattr(layer, name), getattr(spec, name))
