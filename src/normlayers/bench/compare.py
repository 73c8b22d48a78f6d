"""``--compare old.json``: the speed-up or regression of every result that has a match in an earlier run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from normlayers.bench.report import format_table
from normlayers.bench.runner import BenchResult

__all__ = ["Comparison", "compare", "format_comparison", "load_document", "regressions"]

KEY_FIELDS = ("op", "dtype", "mode", "shape", "provider")


def load_document(path: Path) -> dict:
    """A JSON file written by ``--json``; a :class:`ValueError` saying what is wrong otherwise."""
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise ValueError(f"{path} is not a normlayers-bench JSON file (no 'results' list)")
    return document


@dataclass(frozen=True)
class Comparison:
    """One matched row: ``speedup = old median / new median`` (> 1 is faster now). ``verdict`` is ``faster`` or
    ``slower`` only when the p20-p80 ranges of the two runs do not overlap, else ``same``."""

    key: tuple[str, ...]
    old_ms: float
    new_ms: float
    speedup: float
    verdict: str


def compare(old_results: Sequence[dict], new_results: Sequence[BenchResult]) -> list[Comparison]:
    """Match on (op, dtype, mode, shape, provider); only rows timed (``ok``) in both runs."""
    old_by_key = {tuple(r.get(f) for f in KEY_FIELDS): r for r in old_results if r.get("status") == "ok"}
    comparisons = []
    for new in new_results:
        key = tuple(getattr(new, f) for f in KEY_FIELDS)
        old = old_by_key.get(key)
        if new.status != "ok" or old is None:
            continue
        if new.p80_ms < old["p20_ms"]:
            verdict = "faster"
        elif new.p20_ms > old["p80_ms"]:
            verdict = "slower"
        else:
            verdict = "same"
        comparisons.append(Comparison(key, old["median_ms"], new.median_ms, old["median_ms"] / new.median_ms, verdict))
    return comparisons


def format_comparison(comparisons: Sequence[Comparison], old_metadata: dict, new_metadata: dict,
                      path: Path) -> str:
    lines = [f"compared with {path} ({old_metadata.get('date', '?')}, {old_metadata.get('device_name', '?')}, "
             f"git {old_metadata.get('git_sha') or 'unknown'}): speed-up = old median / new median"]
    if old_metadata.get("device_name") != new_metadata.get("device_name"):
        lines.append(f"WARNING: different devices ({old_metadata.get('device_name')} then "
                     f"{new_metadata.get('device_name')}): the speed-ups compare machines, not code")
    if not comparisons:
        return "\n".join(lines + ["  no result of this run has a timed match in that file"])
    rows = [[*c.key, f"{c.old_ms:.4g}", f"{c.new_ms:.4g}", f"{c.speedup:.2f}x", c.verdict] for c in comparisons]
    return "\n".join(lines) + "\n" + format_table([*KEY_FIELDS, "old ms", "new ms", "speed-up", "verdict"], rows)


def regressions(comparisons: Sequence[Comparison], provider: str, threshold_pct: float) -> list[Comparison]:
    """``provider``'s rows that got slower by more than ``threshold_pct`` percent (beyond the p20-p80 noise)."""
    return [c for c in comparisons if c.key[-1] == provider and c.verdict == "slower"
            and c.new_ms > c.old_ms * (1 + threshold_pct / 100)]


