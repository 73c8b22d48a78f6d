"""Timing: per-call times from CUDA events (L2 flushed before each call) or the wall clock on CPU,
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
from typing import Callable, Optional, Protocol, Sequence, Union

import torch

__all__ = ["CudaEventTimer", "TimedCall", "Timer", "TimingStats", "WallClockTimer", "first_call_seconds",
           "make_timer", "measure", "measure_copy_bandwidth", "measure_interleaved", "peak_memory_bytes"]

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


class WallClockTimer:
    """``time.perf_counter`` around each call (the device synchronized before and after), ``setup`` untimed: the
    benchmark's CPU timer, and the examples' for whole models. Caches are not flushed: on CPU the numbers are a
    smoke test, not a roofline measurement. (Not ``torch.utils.benchmark.Timer``: its ``timeit`` runs the statement
    twice untimed before each timed call, tripling the cost of a run that keeps every call's time.)"""

    description = "time.perf_counter per call, no cache flush"

    def __init__(self, device: Union[torch.device, str] = "cpu") -> None:
        self._device = torch.device(device)

    def times_ms(self, call: TimedCall, reps: int) -> list[float]:
        times = []
        for _ in range(reps):
            call.prepare()
            _synchronize(self._device)
            start = time.perf_counter()
            call.run()
            _synchronize(self._device)
            times.append((time.perf_counter() - start) * 1e3)
        return times


def make_timer(device: torch.device) -> Timer:
    """The timer for ``device``."""
    return CudaEventTimer(device) if device.type == "cuda" else WallClockTimer(device)


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


def measure_interleaved(calls: Sequence[TimedCall], timer: Timer, warmup_ms: float = 0.0, rep_ms: float = 0.0, *,
                        rounds: Optional[int] = None, warmup_rounds: int = 0) -> list[TimingStats]:
    """Time several calls in interleaved rounds (each round times every call once, in turn, starting one call further
    on each round), so that a change of machine load over the run hits them all alike and their ratios stay fair.

    By budget (``rounds=None``, the benchmark's way): each call is first estimated and warmed up as in
    :func:`measure`, and the number of rounds fits ``rep_ms`` to the slowest call, at least ``MIN_REPS``. By count
    (the examples' way, for whole models): ``warmup_rounds`` untimed rounds, then exactly ``rounds`` timed ones."""
    if rounds is not None:
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        for _ in range(warmup_rounds):
            for call in calls:
                timer.times_ms(call, 1)
    else:
        estimates = [max(sorted(timer.times_ms(call, ESTIMATE_REPS))[ESTIMATE_REPS // 2], 1e-4) for call in calls]
        if warmup_ms > 0:
            for call, estimate_ms in zip(calls, estimates):
                timer.times_ms(call, math.ceil(warmup_ms / estimate_ms))
        rounds = min(MAX_REPS, max(MIN_REPS, math.ceil(rep_ms / max(estimates, default=1.0))))
    # Each round starts one call further on, so that no call always runs right after the same one: on a CPU a call
    # pays for the state its predecessor left (freed memory returned to the OS and faulted in again, evicted caches):
    # bf16 LayerNorm 512x4096, 11.3 ms right after its fp32-copy variant against 1.4 ms without (load average 8).
    times: list[list[float]] = [[] for _ in calls]
    for round_index in range(rounds):
        for i in range(len(calls)):
            k = (round_index + i) % len(calls)
            times[k].extend(timer.times_ms(calls[k], 1))
    return [_stats(t) for t in times]


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
    ``bwd`` the saved tensors of the setup's forward).

    CUDA: ``torch.cuda.max_memory_allocated`` during the call minus ``memory_allocated`` before. CPU, where torch's
    allocator keeps no statistics: the running sum of the allocations and frees of tensor storage during the call,
    as ``torch.profiler`` (``profile_memory=True``) records them, and its maximum. That counts exactly what the CUDA
    number counts (the sizes requested from torch's allocator, not the process's resident memory, which the C
    allocator's caching and page reuse blur); it reads the profiler's event tree (an experimental API), and returns
    ``None`` where that is missing."""
    call.prepare()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call.run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        call.run()
    try:
        roots = profiler.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    changes: list[tuple[int, int]] = []
    pending = list(roots)
    while pending:
        node = pending.pop()
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            changes.append((node.start_time_ns, node.extra_fields.alloc_size))
        pending.extend(node.children)
    allocated = peak = 0
    for _, size in sorted(changes):
        allocated += size
        peak = max(peak, allocated)
    return peak
