"""Timing: per-call times from CUDA events (L2 flushed before each call) or ``torch.utils.benchmark.Timer`` on CPU,
summarized as median and p20/p80; the first call's time (compilation); peak memory; and the device's measured copy
bandwidth (the practical roofline).

Why not ``triton.testing.do_bench`` on CUDA: it is the same method (CUDA events per call, a 256 MiB L2 flush before
each, quantiles of the per-call times), but it has no untimed per-call setup, and the ``bwd`` mode needs one — a
fresh training forward before each timed backward. :class:`CudaEventTimer` is that method with the setup hook.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Protocol, Sequence, Union

import torch
import torch.utils.benchmark

__all__ = ["CpuTimer", "CudaEventTimer", "TimedCall", "Timer", "TimingStats", "first_call_seconds",
           "interleaved_times", "make_timer", "measure", "measure_copy_bandwidth", "measure_interleaved",
           "peak_memory_bytes"]

MIN_REPS = 15
MAX_REPS = 10_000
ESTIMATE_REPS = 3
L2_FLUSH_BYTES = 256 * 1024**2  # larger than any current GPU's L2 (H100: 50 MB), as triton.testing.do_bench
COPY_BYTES = {"cuda": 1024**3, "cpu": 64 * 1024**2}  # each way; far larger than the caches


@dataclass(frozen=True)
class TimedCall:
    """``run`` is timed; ``setup``, when given, runs untimed before each ``run`` (e.g. the forward pass whose
    backward is timed)."""

    run: Callable[[], object]
    setup: Optional[Callable[[], object]] = None

    def prepare(self) -> None:
        if self.setup is not None:
            self.setup()


class Timer(Protocol):
    """Times ``reps`` consecutive calls and returns each call's time in ms."""

    description: str

    def times_ms(self, call: TimedCall, reps: int) -> list[float]: ...


class CpuTimer:
    """``torch.utils.benchmark.Timer`` at the process's thread count (its own default is one thread), one
    ``timeit(number=1)`` per call so that every call's time is kept and ``setup`` runs untimed before it. Each
    ``timeit`` first runs the statement twice untimed (torch's warmup), so a timed call costs three (the ``bwd``
    call runs its own forward when the setup's has been used: see :func:`~normlayers.bench.runner.timed_call`).
    Caches are not flushed: on CPU the numbers are a smoke test, not a roofline measurement."""

    description = "torch.utils.benchmark.Timer, timeit(number=1) per call, no cache flush"

    def times_ms(self, call: TimedCall, reps: int) -> list[float]:
        timer = torch.utils.benchmark.Timer(stmt="run()", setup="prepare()",
                                            globals={"run": call.run, "prepare": call.prepare},
                                            num_threads=torch.get_num_threads())
        return [timer.timeit(number=1).median * 1e3 for _ in range(reps)]


class CudaEventTimer:
    """CUDA events around each call, with the L2 cache flushed (a 256 MiB memset) before each, outside the timed
    region; one synchronization at the end so host overhead overlaps as in a training step."""

    description = "CUDA events per call, L2 flushed (256 MiB memset) before each"

    def __init__(self, device: torch.device) -> None:
        self._flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def times_ms(self, call: TimedCall, reps: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            call.prepare()
            self._flush_buffer.zero_()
            start.record()
            call.run()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def make_timer(device: torch.device) -> Timer:
    """The timer for ``device``."""
    return CudaEventTimer(device) if device.type == "cuda" else CpuTimer()


@dataclass(frozen=True)
class TimingStats:
    """Per-call times in ms over ``reps`` timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (as ``torch.quantile`` and ``triton.testing.do_bench``)."""
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def measure(call: TimedCall, timer: Timer, warmup_ms: float, rep_ms: float) -> TimingStats:
    """Time ``call``: a short estimate (which also warms up), ``warmup_ms`` of untimed calls (none for 0), then about
    ``rep_ms`` of timed calls (at least ``MIN_REPS``, at most ``MAX_REPS``)."""
    estimate_ms = max(sorted(timer.times_ms(call, ESTIMATE_REPS))[ESTIMATE_REPS // 2], 1e-4)
    if warmup_ms > 0:
        timer.times_ms(call, math.ceil(warmup_ms / estimate_ms))
    reps = min(MAX_REPS, max(MIN_REPS, math.ceil(rep_ms / estimate_ms)))
    return _stats(timer.times_ms(call, reps))


def _stats(times_ms: list[float]) -> TimingStats:
    ordered = sorted(times_ms)
    return TimingStats(_quantile(ordered, 0.5), _quantile(ordered, 0.2), _quantile(ordered, 0.8), len(ordered))


def interleaved_times(calls: Mapping[str, Callable[[], object]], repeats: int,
                      device: Union[torch.device, str] = "cpu", warmup: int = 1) -> dict[str, TimingStats]:
    """Wall time of each of ``calls`` (ms per call, median and p20/p80 over ``repeats`` calls), for comparing whole
    models in the examples. The calls take turns — ``warmup`` untimed rounds, then ``repeats`` timed ones — so that
    a change in the machine's load hits all of them alike instead of whichever ran during it."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + repeats):
        for name, call in calls.items():
            _synchronize(device)
            start = time.perf_counter()
            call()
            _synchronize(device)
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _stats(t) for name, t in times.items()}


def measure_interleaved(calls: Sequence[TimedCall], timer: Timer, warmup_ms: float, rep_ms: float
                        ) -> list[TimingStats]:
    """Time several calls of one case in interleaved rounds (each round times every call once, in turn), so that a
    change of machine load over the run hits them all alike and their ratios stay fair. Each call is first estimated
    and warmed up as in :func:`measure`; the number of rounds fits ``rep_ms`` to the slowest call, at least
    ``MIN_REPS``."""
    estimates = [max(sorted(timer.times_ms(call, ESTIMATE_REPS))[ESTIMATE_REPS // 2], 1e-4) for call in calls]
    if warmup_ms > 0:
        for call, estimate_ms in zip(calls, estimates):
            timer.times_ms(call, math.ceil(warmup_ms / estimate_ms))
    rounds = min(MAX_REPS, max(MIN_REPS, math.ceil(rep_ms / max(estimates, default=1.0))))
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, call_times in zip(calls, times):
            call_times.extend(timer.times_ms(call, 1))
    return [TimingStats(_quantile(sorted(t), 0.5), _quantile(sorted(t), 0.2), _quantile(sorted(t), 0.8), rounds)
            for t in times]


def measure_copy_bandwidth(device: torch.device, timer: Timer, warmup_ms: float, rep_ms: float) -> tuple[float, int]:
    """Achieved GB/s of ``dst.copy_(src)`` on a large buffer (read + write counted), and the buffer's size in bytes."""
    nbytes = COPY_BYTES[device.type]
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    stats = measure(TimedCall(lambda: dst.copy_(src)), timer, warmup_ms, rep_ms)
    return 2 * nbytes / (stats.median_ms * 1e-3) / 1e9, nbytes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_seconds(device: torch.device, call: Callable[[], object]) -> tuple[object, float]:
    """``call()``'s result and its wall time in seconds, device work included: for a function that compiles on its
    first call (``torch.compile``, a Triton JIT) that is the compile time, or the time to load it from the cache."""
    _synchronize(device)
    start = time.perf_counter()
    result = call()
    _synchronize(device)
    return result, time.perf_counter() - start


def peak_memory_bytes(device: torch.device, call: TimedCall) -> Optional[int]:
    """The most memory one ``call.run()`` allocates on top of what is allocated before it (its inputs, and for
    ``bwd`` the saved tensors of the setup's forward): ``torch.cuda.max_memory_allocated`` during the call minus
    ``memory_allocated`` before. ``None`` on CPU, where torch keeps no allocator statistics."""
    if device.type != "cuda":
        return None
    call.prepare()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call.run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
