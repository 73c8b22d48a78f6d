"""Smoke test of examples/micro_batch_cnn.py: the --quick run finishes and prints one row per normalization."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "micro_batch_cnn.py"


def test_quick_run_prints_the_table():
    done = subprocess.run([sys.executable, str(EXAMPLE), "--quick"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| normalization | train loss (last 10 steps) |" in done.stdout  # the quick run has 10 steps, not 50
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| norm")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["BatchNorm2d", "GroupNorm", "WSConv2d + BatchChannelNorm2d", "EvoNorm2dS0", "EvoNorm2dB0"]
    for row in rows:
        loss, accuracy = (float(cell) for cell in row.split("|")[2:4])
        assert loss > 0 and 0 <= accuracy <= 1, row
