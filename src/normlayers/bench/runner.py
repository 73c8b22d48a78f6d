"""Running one benchmark case (op, dtype, mode, shape) for every provider: correctness first, then timing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from normlayers.bench.accuracy import check_errors, error_bounds
from normlayers.bench.ops import RowNormFn, RowNormInputs, RowNormOp, compute_results, ideal_bytes, make_inputs, \
    reference_fn
from normlayers.bench.providers import Provider, UnsupportedOp
from normlayers.bench.timing import TimedCall, Timer, measure

__all__ = ["BASELINE_PROVIDER", "BenchResult", "Case", "RunSettings", "run_case"]

BASELINE_PROVIDER = "torch"  # speed-ups are reported against this provider
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class Case:
    """One point of the benchmark grid."""

    op: RowNormOp
    dtype_name: str
    dtype: torch.dtype
    mode: str
    rows: int
    cols: int

    @property
    def shape(self) -> str:
        return f"{self.rows}x{self.cols}"


@dataclass(frozen=True)
class RunSettings:
    """How to time: the device, its timer, the warmup and measurement budgets per call site, and the copy bandwidth
    the results are compared with."""

    device: torch.device
    timer: Timer
    warmup_ms: float
    rep_ms: float
    copy_gbps: float


@dataclass
class BenchResult:
    """One row of the results. ``status`` is ``ok``, ``WRONG`` (error above the bound: timed, but no speed-up
    reported), ``failed`` (raised; ``note`` says why) or ``unsupported`` (the provider has no such op)."""

    op: str
    dtype: str
    mode: str
    shape: str
    provider: str
    status: str
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    reps: Optional[int] = None
    gbps: Optional[float] = None
    pct_of_copy: Optional[float] = None
    max_abs_err: Optional[float] = None
    err_bound: Optional[float] = None
    err_tensor: Optional[str] = None
    speedup_vs_torch: Optional[float] = None
    note: str = ""


def timed_call(fn: RowNormFn, inputs: RowNormInputs, mode: str) -> TimedCall:
    """The call to time. ``fwd``: the forward on inputs that do not require grad (no autograd graph, no saved
    statistics). ``bwd``: the backward alone, each time of a fresh training forward run untimed just before it.
    ``fwd_bwd``: forward then backward. Gradients are returned, never accumulated into ``.grad``."""
    targets = tuple(inputs.grad_targets.values())
    if mode == "fwd":
        return TimedCall(lambda: fn(*inputs.args))
    if mode == "bwd":
        pending: list[tuple] = []  # the outputs of the untimed forward, consumed by the timed backward
        return TimedCall(run=lambda: torch.autograd.grad(pending.pop(), targets, inputs.grad_outputs),
                         setup=lambda: pending.append(fn(*inputs.args)))
    return TimedCall(lambda: torch.autograd.grad(fn(*inputs.args), targets, inputs.grad_outputs))


def _short_reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:MAX_REASON_CHARS]


def _run_provider(case: Case, provider: Provider, inputs: RowNormInputs, expected: dict, bounds: dict,
                  settings: RunSettings) -> BenchResult:
    result = BenchResult(case.op.name, case.dtype_name, case.mode, case.shape, provider.name, status="ok",
                         note=provider.note(case.op, settings.device))
    try:
        fn = provider.build(case.op)
        errors = check_errors(compute_results(case.op, fn, inputs, case.mode), expected, bounds)
        stats = measure(timed_call(fn, inputs, case.mode), settings.timer, settings.warmup_ms, settings.rep_ms)
    except UnsupportedOp as exc:
        result.status, result.note = "unsupported", str(exc)
        return result
    except Exception as exc:  # a provider that breaks (import, compile, run) is reported, the run goes on
        result.status, result.note = "failed", _short_reason(exc)
        return result
    gbps = ideal_bytes(case.op, case.mode, case.rows, case.cols, case.dtype) / (stats.median_ms * 1e-3) / 1e9
    result.status = "ok" if errors.within_bound else "WRONG"
    result.median_ms, result.p20_ms, result.p80_ms = stats.median_ms, stats.p20_ms, stats.p80_ms
    result.reps = stats.reps
    result.gbps, result.pct_of_copy = gbps, 100 * gbps / settings.copy_gbps
    result.max_abs_err, result.err_bound, result.err_tensor = errors.max_abs_error, errors.bound, errors.tensor
    return result


def _add_speedups(results: list[BenchResult]) -> None:
    baseline = next((r for r in results if r.provider == BASELINE_PROVIDER and r.status == "ok"), None)
    if baseline is None:
        return
    for r in results:
        if r.status == "ok":
            r.speedup_vs_torch = baseline.median_ms / r.median_ms


def run_case(case: Case, providers: Sequence[Provider], settings: RunSettings) -> list[BenchResult]:
    """Benchmark ``case`` for each provider: check its outputs (and gradients) against the fp64 reference, then time
    it; finally the speed-ups against the ``torch`` provider (for correct results only)."""
    inputs = make_inputs(case.op, case.dtype, case.rows, case.cols, settings.device,
                         requires_grad=case.mode != "fwd")
    reference = reference_fn(case.op)
    expected = compute_results(case.op, reference, inputs.to(torch.float64), case.mode)
    bounds = error_bounds(compute_results(case.op, reference, inputs, case.mode), expected, case.dtype)
    results = [_run_provider(case, provider, inputs, expected, bounds, settings) for provider in providers]
    _add_speedups(results)
    return results
