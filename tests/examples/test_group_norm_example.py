"""examples/group_norm_unet.py runs (--quick): every GroupNorm swapped and fused, the outputs and input gradients
unchanged (bit for bit on the CPU tier, which runs ATen's group_norm and SiLU; within fp32 rounding on the
reference)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import torch

from normlayers.testing import tolerance

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "group_norm_unet.py"


def test_group_norm_unet_quick(tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--quick", "--output-json", str(out)])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    result = json.loads(out.read_text())
    assert result["swapped"] == result["fused"] == 3  # two per block, one at the head
    for row in result["rows"]:
        # every backend within fp32 rounding (on CPU the compiled NCHW kernel sums in another order than ATen's)
        assert row["max_abs_diff_y"] <= tolerance(torch.float32)[1], row
        assert row["max_abs_diff_dx"] <= tolerance(torch.float32)[1], row
