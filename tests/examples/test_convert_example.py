"""examples/convert_gpt2.py and examples/fold_norms_cnn.py run (--quick) and report exact conversions."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from normlayers.testing import tolerance

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FP32_ATOL = tolerance(torch.float32)[1]


def _run(script: str, tmp_path: Path, monkeypatch, *args: str) -> dict:
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--repeats", "1", "--output-json", str(out), *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return json.loads(out.read_text())


def test_convert_gpt2_quick(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    result = _run("convert_gpt2.py", tmp_path, monkeypatch)
    assert "forward times not printed" in capsys.readouterr().out  # --quick: a tiny model's times are noise
    rows = {row["variant"]: row for row in result["rows"]}
    assert len(rows) == 4 and all(row["forward_ms"] > 0 for row in rows.values())
    for row in rows.values():
        assert row["max_abs_diff_fp64"] < 1e-9  # the conversion is exact up to rounding
        # fp32: rounding only (the fp64 line shows the conversion exact); fp32's atol of normlayers.testing, ~20x the
        # 3.3e-7 to 4.8e-7 measured on the quick model's logits (CPU, torch 2.13)
        assert row["max_abs_diff_fp32"] < FP32_ATOL


def test_fold_norms_cnn_quick(tmp_path, monkeypatch, capsys):
    result = _run("fold_norms_cnn.py", tmp_path, monkeypatch)
    assert "speed-up" not in capsys.readouterr().out  # --quick: a tiny input's times are noise
    assert [row["model"] for row in result["rows"]] == ["conv-bn", "ws-bcn"]
    # rounding only (folding is exact in fp64: tests/convert/test_fold.py); fp32's atol of normlayers.testing, ~7x the
    # 3.3e-7 (conv-bn) and 1.4e-6 (ws-bcn: baked standardized weights, GroupNorm) measured (CPU, torch 2.13)
    assert all(row["max_abs_diff_fp32"] < FP32_ATOL for row in result["rows"])
