"""Running one benchmark case (op, dtype, mode, shape) for every provider: correctness first, then timing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from normlayers.bench.accuracy import check_errors, error_bounds
from normlayers.bench.ops import Op, OpFn, OpInputs, Shape, compute_results, ideal_bytes
from normlayers.bench.providers import Provider, UnsupportedOp
from normlayers.bench.timing import (TimedCall, Timer, TimingStats, first_call_seconds, measure_interleaved,
                                     peak_memory_bytes)

__all__ = ["BASELINE_PROVIDER", "BenchResult", "Case", "RunSettings", "run_case", "timed_call"]

BASELINE_PROVIDER = "torch"  # speed-ups are reported against this provider or, if faster and correct, its fp32 form
_BASELINE_CANDIDATES = (BASELINE_PROVIDER, "torch_fp32")
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class Case:
    """One point of the benchmark grid."""

    op: Op
    dtype_name: str
    dtype: torch.dtype
    mode: str
    shape: Shape

    @property
    def shape_text(self) -> str:
        return self.op.shape_kind.format(self.shape)


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
    reported), ``failed`` (raised; ``note`` says why) or ``unsupported`` (the provider has no such op).
    ``compile_s`` is the first call's time for providers that compile on it; ``peak_mem_mib`` the memory one call
    allocates beyond its inputs (see :func:`~normlayers.bench.timing.peak_memory_bytes`)."""

    op: str
    family: str
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
    peak_mem_mib: Optional[float] = None
    compile_s: Optional[float] = None
    max_abs_err: Optional[float] = None
    err_bound: Optional[float] = None
    err_tensor: Optional[str] = None
    speedup_vs_torch: Optional[float] = None
    note: str = ""


def timed_call(fn: OpFn, inputs: OpInputs, mode: str) -> TimedCall:
    """The call to time. ``fwd``: the forward on inputs that do not require grad (no autograd graph, no saved
    statistics). ``bwd``: the backward alone, of a training forward run untimed in the setup just before it (a call
    with no forward waiting, such as the CPU timer's untimed warmup calls, runs its own). ``fwd_bwd``: forward then
    backward. Gradients are returned, never accumulated into ``.grad``; no graph is retained (``torch.compile``'s
    backward refuses ``retain_graph``)."""
    targets = tuple(inputs.grad_targets.values())
    if mode == "fwd":
        return TimedCall(lambda: fn(*inputs.args))
    if mode == "bwd":
        pending: list = []  # outputs of untimed forwards, each consumed by one backward

        def backward() -> tuple:
            outputs = pending.pop() if pending else fn(*inputs.args)
            return torch.autograd.grad(outputs, targets, inputs.grad_outputs)

        return TimedCall(run=backward, setup=lambda: pending.append(fn(*inputs.args)))
    return TimedCall(lambda: torch.autograd.grad(fn(*inputs.args), targets, inputs.grad_outputs))


def _short_reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:MAX_REASON_CHARS]


def _check_provider(case: Case, provider: Provider, inputs: OpInputs, expected: dict, bounds: dict,
                    settings: RunSettings) -> tuple[BenchResult, Optional[TimedCall]]:
    """Build ``provider``'s function, check its results, and return the call to time (``None`` when it raised or
    has no such op: the result then says why)."""
    result = BenchResult(case.op.name, case.op.family, case.dtype_name, case.mode, case.shape_text, provider.name,
                         status="ok")
    try:
        result.note = provider.note(case.op, settings.device)
        fn = provider.build(case.op)
        inputs = inputs.to()  # its own buffers: a training call updates the running statistics
        actual, first_s = first_call_seconds(settings.device, lambda: compute_results(case.op, fn, inputs, case.mode))
        errors = check_errors(actual, expected, bounds)
    except UnsupportedOp as exc:
        result.status, result.note = "unsupported", str(exc)
        return result, None
    except Exception as exc:  # a provider that breaks (import, compile, run, OOM) is reported, the run goes on
        result.status, result.note = "failed", _short_reason(exc)
        return result, None
    result.status = "ok" if errors.within_bound else "WRONG"
    result.compile_s = first_s if provider.compiles(case.op, settings.device) else None
    result.max_abs_err, result.err_bound, result.err_tensor = errors.max_abs_error, errors.bound, errors.tensor
    return result, timed_call(fn, inputs, case.mode)


def _record_timing(result: BenchResult, case: Case, stats: TimingStats, peak: Optional[int],
                   settings: RunSettings) -> None:
    gbps = ideal_bytes(case.op, case.mode, case.shape, case.dtype) / (stats.median_ms * 1e-3) / 1e9
    result.median_ms, result.p20_ms, result.p80_ms = stats.median_ms, stats.p20_ms, stats.p80_ms
    result.reps = stats.reps
    result.gbps, result.pct_of_copy = gbps, 100 * gbps / settings.copy_gbps
    result.peak_mem_mib = None if peak is None else peak / 2**20


def _add_speedups(results: list[BenchResult]) -> None:
    # The baseline is the fastest torch eager equivalent within the bound: the plain torch call or, where it was run,
    # the same call on fp32 copies of bf16/fp16 inputs (torch_fp32). With neither within the bound, the plain call
    # still counts, being what a user would otherwise run (as torch's two-op BatchChannelNorm in bf16).
    timed = [r for r in results if r.provider in _BASELINE_CANDIDATES and r.median_ms is not None]
    correct = [r for r in timed if r.status == "ok"]
    baseline = min(correct or [r for r in timed if r.provider == BASELINE_PROVIDER], key=lambda r: r.median_ms,
                   default=None)
    if baseline is None:
        return
    for r in results:
        if r.status == "ok":
            r.speedup_vs_torch = baseline.median_ms / r.median_ms


def run_case(case: Case, providers: Sequence[Provider], settings: RunSettings) -> list[BenchResult]:
    """Benchmark ``case`` for each provider: check its outputs, gradients and updated buffers against the fp64
    reference, then time all of them in interleaved rounds; finally the speed-ups against the ``torch`` provider's
    time, or that of the faster correct ``torch_fp32`` (for correct results only)."""
    inputs = case.op.inputs(case.shape, case.dtype, settings.device, training=case.mode != "fwd")
    expected = compute_results(case.op, case.op.reference, inputs.to(torch.float64), case.mode)
    bounds = error_bounds(compute_results(case.op, case.op.reference, inputs.to(), case.mode), expected, case.dtype)
    checked = [_check_provider(case, provider, inputs, expected, bounds, settings) for provider in providers]
    timed = [(result, call) for result, call in checked if call is not None]
    try:
        all_stats = measure_interleaved([call for _, call in timed], settings.timer, settings.warmup_ms,
                                        settings.rep_ms)
        for (result, call), stats in zip(timed, all_stats):
            _record_timing(result, case, stats, peak_memory_bytes(settings.device, call), settings)
    except Exception as exc:  # a call that breaks only when repeated: the case's timings are lost, not the run
        for result, _ in timed:
            result.status, result.note = "failed", _short_reason(exc)
    results = [result for result, _ in checked]
    _add_speedups(results)
    return results
