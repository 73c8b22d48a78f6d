"""Smoke test of examples/timm_swap.py: the --quick run swaps the ResNet's BN and convs and the ViT's LayerNorms,
trains, evaluates, restores, and prints no timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")

pytestmark = pytest.mark.timm

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "timm_swap.py"


def test_quick_run_swaps_trains_and_restores():
    done = subprocess.run([sys.executable, str(EXAMPLE), "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"resnet26, micro-batch recipe: (\d+) x Conv2d -> WSConv2d, \d+ x BatchNorm2d -> "
                     r"BatchChannelNorm2d", out), out
    assert re.search(r"vit_tiny_patch16_224, default mapping: 5 x LayerNorm -> LayerNorm\n", out), out
    assert "restore_norms: 5 x timm.layers.norm.LayerNorm" in out
    assert out.count("eval logits finite: True") == 4
    assert " ms" not in out and "seconds" not in out  # no timings
