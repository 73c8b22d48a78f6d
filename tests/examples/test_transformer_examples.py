"""examples/swap_norms_llama.py, examples/tiny_transformer_norms.py and examples/power_unified_transformer.py run
(--quick) and report what they claim; --quick prints no timing (a tiny model's times are noise)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_swap_norms_llama_is_exact(capsys):
    for dtype in ("fp32", "bf16"):
        result = _load("swap_norms_llama.py").main(["--quick", "--dtype", dtype])
        assert result["swapped"] == 5  # 2 layers x 2 norms + the final norm
        assert result["max_abs_difference"] == 0.0  # same math and casting order as LlamaRMSNorm: bit for bit
        assert result["seconds_before"] > 0 and result["seconds_after"] > 0
        assert " ms" not in capsys.readouterr().out


def test_tiny_transformer_norms_trains_every_norm_and_saves_the_curves(tmp_path):
    results = _load("tiny_transformer_norms.py").main(["--quick", "--plot", str(tmp_path / "curves.png")])
    assert [r["norm"] for r in results] == ["LayerNorm", "RMSNorm", "CRMSNorm", "PowerNorm", "UnifiedNorm"]
    for r in results:
        assert len(r["curve"]) == 6 and all(0 < loss < 10 for loss in r["curve"]) and 0 < r["val_loss"] < 10
    saved = list(tmp_path.iterdir())
    assert len(saved) == 1 and saved[0].stat().st_size > 0


def test_power_unified_transformer_quick_trains_and_folds(capsys):
    result = _load("power_unified_transformer.py").main(["--quick"])
    assert set(result["final_loss"]) == {"LayerNorm", "PowerNorm", "UnifiedNorm"}
    assert all(0 < loss < 10 for loss in result["final_loss"].values())
    assert result["fold_max_abs_difference"] < 1e-4  # folding an eval-mode UnifiedNorm is exact up to rounding
    assert "step   10" in capsys.readouterr().out
