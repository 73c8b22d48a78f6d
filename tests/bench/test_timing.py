"""``interleaved_times``: the examples' way of comparing models on a shared machine (no timing values asserted)."""

from __future__ import annotations

import pytest

from normlayers.bench.timing import interleaved_times


def test_the_calls_take_turns_and_the_warmup_is_not_counted():
    order = []
    stats = interleaved_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=2)
    assert order == ["a", "b"] * 5  # two untimed rounds, then three timed ones, each round running every call once
    assert {name: s.reps for name, s in stats.items()} == {"a": 3, "b": 3}
    for s in stats.values():
        assert s.p20_ms <= s.median_ms <= s.p80_ms


def test_repeats_below_one_is_refused():
    with pytest.raises(ValueError, match="repeats"):
        interleaved_times({"a": lambda: None}, repeats=0)
