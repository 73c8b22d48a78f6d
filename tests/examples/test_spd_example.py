"""Smoke test of examples/spd_classification.py: the --quick run trains every model variant and reports accuracies.

Run in-process (the script's ``main``) rather than in a subprocess, which would import torch a second time.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "spd_classification.py"


def test_spd_classification_quick_runs(capsys):
    spec = importlib.util.spec_from_file_location("spd_classification", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The example's matrices are tiny: one intra-op thread avoids OpenMP oversubscription (measured on a busy 2-core
    # machine: 3.4 s with one thread, 16.5 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accuracies = module.main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    assert set(accuracies) == {"SPDNet", "GBW-BN", "GBW-BN theta=0.5", "BW-BN (M = I)"}
    assert all(0.0 <= a <= 1.0 and not math.isnan(a) for a in accuracies.values())
    printed = capsys.readouterr().out
    assert all(name in printed for name in accuracies) and "test accuracy" in printed
