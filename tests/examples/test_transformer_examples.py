"""examples/swap_norms_llama.py and examples/tiny_transformer_norms.py run (--quick) and report what they claim."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_swap_norms_llama_is_exact():
    for dtype in ("fp32", "bf16"):
        result = _load("swap_norms_llama.py").main(["--quick", "--dtype", dtype])
        assert result["swapped"] == 5  # 2 layers x 2 norms + the final norm
        assert result["max_abs_difference"] == 0.0  # same math and casting order as LlamaRMSNorm: bit for bit
        assert result["seconds_before"] > 0 and result["seconds_after"] > 0


def test_tiny_transformer_norms_trains_every_norm_and_saves_the_curves(tmp_path):
    results = _load("tiny_transformer_norms.py").main(["--quick", "--plot", str(tmp_path / "curves.png")])
    assert [r["norm"] for r in results] == ["LayerNorm", "RMSNorm", "CRMSNorm", "PowerNorm", "UnifiedNorm"]
    for r in results:
        assert len(r["curve"]) == 6 and all(0 < loss < 10 for loss in r["curve"]) and 0 < r["val_loss"] < 10
    saved = list(tmp_path.iterdir())
    assert len(saved) == 1 and saved[0].stat().st_size > 0
