"""Tests of benchmarks/make_tables.py on the JSON of a tiny CPU run (see conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "make_tables.py"
_spec = importlib.util.spec_from_file_location("make_tables", _SCRIPT)
make_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tables)

CPU_MARKER = "<!-- bench-table: ops=rms_norm,layer_norm mode=fwd device=cpu -->\nold text\n<!-- /bench-table -->\n"
GPU_MARKER = "<!-- bench-table: ops=rms_norm dtype=bf16 -->\n<!-- /bench-table -->\n"


@pytest.fixture
def results_dir(tmp_path, tiny_run) -> Path:
    directory = tmp_path / "results"
    directory.mkdir()
    shutil.copy(tiny_run[1], directory / "2026-11-24_cpu_custom.json")
    return directory


def test_tables_are_generated_between_the_markers(tmp_path, results_dir, tiny_run):
    doc = tmp_path / "docs" / "perf.md"
    doc.parent.mkdir()
    doc.write_text("# Performance\n\n" + CPU_MARKER + "\ntext after\n")

    assert make_tables.main(["--results", str(results_dir), str(doc)]) == 0

    text = doc.read_text()
    assert "old text" not in text and text.startswith("# Performance\n\n<!-- bench-table:")
    assert text.endswith("<!-- /bench-table -->\n\ntext after\n")
    assert make_tables.GENERATED_NOTE in text
    assert "| op | dtype | mode | shape | normlayers | torch | normlayers vs torch |" in text
    assert "(../results/2026-11-24_cpu_custom.json)" in text  # linked relative to the document
    results = {(r["op"], r["provider"]): r for r in tiny_run[2]["results"]}
    for op in ("rms_norm", "layer_norm"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {op} |"))
        assert f"{results[(op, 'normlayers')]['median_ms']:.3g} ms" in row
        assert f"{results[(op, 'torch')]['gbps']:.3g} GB/s" in row
        assert row.endswith(f"| {results[(op, 'normlayers')]['speedup_vs_torch']:.2f}x |")


def test_a_ratio_column_compares_two_providers(tmp_path, results_dir, tiny_run):
    doc = tmp_path / "README.md"
    doc.write_text("<!-- bench-table: ops=rms_norm,layer_norm mode=fwd device=cpu ratio=torch/normlayers -->\n"
                   "<!-- /bench-table -->\n")
    make_tables.main(["--results", str(results_dir), str(doc)])

    text = doc.read_text()
    assert "| torch ÷ normlayers (time) |" in text
    results = {(r["op"], r["provider"]): r for r in tiny_run[2]["results"]}
    for op in ("rms_norm", "layer_norm"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {op} |"))
        expected = results[(op, "torch")]["median_ms"] / results[(op, "normlayers")]["median_ms"]
        assert row.endswith(f"| {expected:.2f} |")


def test_a_newer_run_of_other_providers_does_not_hide_the_table(tmp_path, results_dir, tiny_run):
    other = json.loads(json.dumps(tiny_run[2]))
    other["metadata"]["date"] = "2999-01-01T00:00:00+00:00"
    for r in other["results"]:
        r["provider"], r["median_ms"] = "torch_compile", 12345.0
    (results_dir / "2999-01-01_cpu_custom.json").write_text(json.dumps(other))
    doc = tmp_path / "README.md"
    doc.write_text("<!-- bench-table: ops=rms_norm mode=fwd device=cpu providers=normlayers,torch -->\n"
                   "<!-- /bench-table -->\n")
    make_tables.main(["--results", str(results_dir), str(doc)])

    text = doc.read_text()
    assert "2026-11-24_cpu_custom.json" in text and "1.23e+04 ms" not in text


def test_a_ratio_needs_two_providers(tmp_path, results_dir, capsys):
    doc = tmp_path / "README.md"
    doc.write_text("<!-- bench-table: ratio=torch -->\n<!-- /bench-table -->\n")
    with pytest.raises(SystemExit):
        make_tables.main(["--results", str(results_dir), str(doc)])
    assert "expected ratio=A/B" in capsys.readouterr().err


def test_check_passes_when_up_to_date_and_fails_after_a_hand_edit(tmp_path, results_dir, capsys):
    doc = tmp_path / "README.md"
    doc.write_text(CPU_MARKER)
    make_tables.main(["--results", str(results_dir), str(doc)])
    assert make_tables.main(["--results", str(results_dir), "--check", str(doc)]) == 0

    doc.write_text(doc.read_text().replace(" ms,", " ms (typed),", 1))
    edited = doc.read_text()
    assert make_tables.main(["--results", str(results_dir), "--check", str(doc)]) == 1
    assert doc.read_text() == edited  # --check changes nothing
    assert f"out of date: {doc}" in capsys.readouterr().out


def test_no_gpu_results_is_said_not_left_empty(tmp_path, results_dir):
    doc = tmp_path / "README.md"
    doc.write_text(GPU_MARKER)
    make_tables.main(["--results", str(results_dir), str(doc)])

    text = doc.read_text()
    assert "_No GPU results committed yet (ops=rms_norm dtype=bf16)" in text
    assert "| op |" not in text


def test_newest_run_per_device_wins(tmp_path, results_dir, tiny_run):
    older = json.loads(json.dumps(tiny_run[2]))
    older["metadata"]["date"] = "2000-01-01T00:00:00+00:00"
    for r in older["results"]:
        r["median_ms"] = 12345.0
    (results_dir / "2000-01-01_cpu_custom.json").write_text(json.dumps(older))
    doc = tmp_path / "README.md"
    doc.write_text(CPU_MARKER)
    make_tables.main(["--results", str(results_dir), str(doc)])

    assert "1.23e+04 ms" not in doc.read_text()


def test_a_run_in_its_own_folder_is_found(tmp_path, tiny_run):
    # tools/gpu_check.sh writes results/<date>_<device>/bench.json
    results_dir = tmp_path / "results"
    (results_dir / "2026-12-06_cpu").mkdir(parents=True)
    shutil.copy(tiny_run[1], results_dir / "2026-12-06_cpu" / "bench.json")
    doc = tmp_path / "README.md"
    doc.write_text(CPU_MARKER)
    make_tables.main(["--results", str(results_dir), str(doc)])

    assert "([2026-12-06_cpu/bench.json](results/2026-12-06_cpu/bench.json))" in doc.read_text()


def test_bad_marker_key_is_an_error(tmp_path, results_dir, capsys):
    doc = tmp_path / "README.md"
    doc.write_text("<!-- bench-table: op=rms_norm -->\n<!-- /bench-table -->\n")
    with pytest.raises(SystemExit) as exc_info:
        make_tables.main(["--results", str(results_dir), str(doc)])
    assert exc_info.value.code == 2
    assert "bad bench-table key 'op=rms_norm'" in capsys.readouterr().err


def test_the_repository_tables_are_up_to_date():
    # README.md and docs/*.md against the committed benchmarks/results/: regenerate with benchmarks/make_tables.py.
    assert make_tables.main(["--check"]) == 0
