"""examples/convert_gpt2.py and examples/fold_norms_cnn.py run (--quick) and report exact conversions."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


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
        assert row["max_abs_diff_fp32"] < 1e-3


def test_fold_norms_cnn_quick(tmp_path, monkeypatch, capsys):
    result = _run("fold_norms_cnn.py", tmp_path, monkeypatch)
    assert "speed-up" not in capsys.readouterr().out  # --quick: a tiny input's times are noise
    assert [row["model"] for row in result["rows"]] == ["conv-bn", "ws-bcn"]
    assert all(row["max_abs_diff_fp32"] < 1e-4 for row in result["rows"])
