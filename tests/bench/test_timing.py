"""``measure_interleaved``: the calls take turns (the benchmark's and the examples' way of comparing on a shared
machine); no timing values asserted."""

from __future__ import annotations

import pytest
import torch

from normlayers.bench.timing import TimedCall, WallClockTimer, measure_interleaved, peak_memory_bytes


def test_the_calls_take_turns_and_the_warmup_is_not_counted():
    order = []
    calls = [TimedCall(lambda: order.append("a")),
             TimedCall(lambda: order.append("b"), setup=lambda: order.append("s"))]
    stats = measure_interleaved(calls, WallClockTimer(), rounds=3, warmup_rounds=2)
    # two untimed rounds, then three timed ones, each round running every call once (b's setup before each b) and
    # starting one call further on (so that no call always follows the same one)
    assert order == ["a", "s", "b"] * 3 + ["s", "b", "a"] + ["a", "s", "b"]
    assert [s.reps for s in stats] == [3, 3]
    for s in stats:
        assert s.p20_ms <= s.median_ms <= s.p80_ms


def test_by_budget_runs_at_least_the_minimum_rounds_for_every_call():
    counts = {"a": 0, "b": 0}
    calls = [TimedCall(lambda: counts.__setitem__("a", counts["a"] + 1)),
             TimedCall(lambda: counts.__setitem__("b", counts["b"] + 1))]
    stats = measure_interleaved(calls, WallClockTimer(), warmup_ms=0, rep_ms=1e-6)
    assert [s.reps for s in stats] == [15, 15]
    assert counts == {"a": 3 + 15, "b": 3 + 15}  # the estimate's calls, then the rounds


def test_rounds_below_one_is_refused():
    with pytest.raises(ValueError, match="rounds"):
        measure_interleaved([TimedCall(lambda: None)], WallClockTimer(), rounds=0)


def test_cpu_peak_memory_counts_the_tensors_alive_together():
    """Two 4 MiB temporaries alive at once, then a third after the first is freed: a peak of 8 MiB (plus the
    scalar result), whatever the process held before."""
    x = torch.ones(1024, 1024)

    def run():
        a = x * 2
        b = a + 1
        del a
        c = b * 3
        return c.sum()

    peak = peak_memory_bytes(torch.device("cpu"), TimedCall(run))
    assert 8 * 2**20 <= peak < 9 * 2**20
