"""``--plot FILE.png``: time (median with the p20-p80 range) or GB/s against shape, one line per provider and one panel
per (op, dtype, mode). Needs matplotlib (``pip install 'normlayers[bench]'``)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Sequence

from normlayers.bench.runner import BenchResult

__all__ = ["PLOT_METRICS", "matplotlib_missing", "plot_results"]

PLOT_METRICS = ("time", "gbps")


def matplotlib_missing() -> bool:
    return importlib.util.find_spec("matplotlib") is None


def plot_results(results: Sequence[BenchResult], path: Path, metric: str, title: str) -> None:
    """Draw the timed results (``ok`` and ``WRONG``; the latter marked with an x) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.median_ms is not None]
    panels = list(dict.fromkeys((r.op, r.dtype, r.mode) for r in timed))
    columns = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.8 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        in_panel = [r for r in timed if (r.op, r.dtype, r.mode) == panel]
        shapes = list(dict.fromkeys(r.shape for r in in_panel))
        for provider in dict.fromkeys(r.provider for r in in_panel):
            points = [r for r in in_panel if r.provider == provider]
            x = [shapes.index(r.shape) for r in points]
            if metric == "time":
                y = [r.median_ms for r in points]
                spread = [[r.median_ms - r.p20_ms for r in points], [r.p80_ms - r.median_ms for r in points]]
                line = ax.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=provider)[0]
            else:
                y = [r.gbps for r in points]
                line = ax.plot(x, y, marker="o", label=provider)[0]
            wrong = [(xi, yi) for xi, yi, r in zip(x, y, points) if r.status == "WRONG"]
            if wrong:
                ax.scatter(*zip(*wrong), marker="x", s=80, color=line.get_color())
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
        ax.set_title(" ".join(panel), fontsize=10)
        ax.set_ylabel("median ms (p20-p80)" if metric == "time" else "GB/s (ideal bytes / median)")
        if metric == "time":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title + "  (x: out of tolerance)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
