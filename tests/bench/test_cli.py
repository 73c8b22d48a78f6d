"""Tests of the benchmark CLI on tiny CPU shapes (the reference path; no Triton, no torch.compile)."""

from __future__ import annotations

import csv
import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from normlayers.bench import cli
from normlayers.bench.ops import OPS, compose, ideal_bytes
from normlayers.bench.providers import PROVIDERS, Provider, UnsupportedOp

FAST = ["--device", "cpu", "--warmup-ms", "1", "--rep-ms", "2"]


def _run(tmp_path: Path, *args: str) -> tuple[int, list[dict], dict]:
    """Run the CLI into ``tmp_path``; return its exit code, the CSV rows and the JSON document."""
    code = cli.main([*args, *FAST, "--out", str(tmp_path)])
    stem = f"{datetime.date.today().isoformat()}_cpu_row_norms"
    with (tmp_path / f"{stem}.csv").open() as f:
        rows = list(csv.DictReader(f))
    document = json.loads((tmp_path / f"{stem}.json").read_text())
    return code, rows, document


def _scaled_torch_provider(name: str, factor: float) -> Provider:
    """A provider that is torch eager with its output scaled: wrong by a relative ``factor − 1``."""

    def build(op):
        native = {"layer": F.layer_norm, "rms": F.rms_norm}[op.kind]
        return compose(op, lambda *args: native(*args) * factor)

    return Provider(name, f"torch eager x {factor}", build)


def test_tiny_run_writes_csv_and_json_with_sane_values(tmp_path):
    code, rows, document = _run(tmp_path, "--op", "rms_norm", "layer_norm", "--shapes", "4x64", "--dtype", "fp32",
                                "--providers", "normlayers", "torch", "--mode", "fwd", "fwd_bwd")

    assert code == 0
    expected = {(op, mode, provider) for op in ("rms_norm", "layer_norm") for mode in ("fwd", "fwd_bwd")
                for provider in ("normlayers", "torch")}
    assert {(r["op"], r["mode"], r["provider"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert (r["dtype"], r["shape"], r["status"]) == ("fp32", "4x64", "ok"), r
        p20, median, p80 = float(r["p20_ms"]), float(r["median_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= median <= p80, r
        assert int(r["reps"]) >= 10
        assert float(r["gbps"]) > 0 and float(r["pct_of_copy"]) > 0
        assert 0 <= float(r["max_abs_err"]) <= float(r["err_bound"]) < 1e-3, r
        if r["mode"] == "fwd_bwd":
            assert r["err_tensor"] in {"y", "dx", "dweight", "dbias"}
    assert all(float(r["speedup_vs_torch"]) == 1.0 for r in rows if r["provider"] == "torch")
    assert all("reference path" in r["note"] for r in rows if r["provider"] == "normlayers")

    metadata = document["metadata"]
    assert metadata["device_type"] == "cpu"
    assert metadata["torch"] == torch.__version__
    assert metadata["copy_bandwidth_gbps"] > 0
    assert {"git_sha", "date", "device_name", "triton", "timer", "byte_models"} <= metadata.keys()
    assert metadata["byte_models"]["rms_norm/fwd"] == "read x[MxN] + read weight[N] + write y[MxN]"
    assert [(r["op"], r["mode"], r["provider"]) for r in document["results"]] == \
        [(r["op"], r["mode"], r["provider"]) for r in rows]


def test_fused_add_and_crms_backward_are_checked(tmp_path):
    code, rows, _ = _run(tmp_path, "--op", "add_rms_norm", "crms_norm", "--shapes", "3x40", "--dtype", "bf16",
                         "--providers", "normlayers", "torch", "--mode", "bwd")

    assert code == 0
    assert len(rows) == 4
    assert all(r["status"] == "ok" and float(r["max_abs_err"]) <= float(r["err_bound"]) for r in rows), rows
    torch_crms = next(r for r in rows if r["op"] == "crms_norm" and r["provider"] == "torch")
    assert "no native op" in torch_crms["note"]


def test_wrong_provider_is_flagged_and_gets_no_speedup(tmp_path, monkeypatch):
    monkeypatch.setitem(PROVIDERS, "scaled", _scaled_torch_provider("scaled", 1.01))
    code, rows, _ = _run(tmp_path, "--op", "rms_norm", "--shapes", "4x64", "--dtype", "fp32",
                         "--providers", "torch", "scaled", "--mode", "fwd")

    scaled = next(r for r in rows if r["provider"] == "scaled")
    assert scaled["status"] == "WRONG"
    assert float(scaled["max_abs_err"]) > float(scaled["err_bound"])
    assert scaled["speedup_vs_torch"] == ""
    assert float(scaled["median_ms"]) > 0  # still timed, only not credited
    assert code == 0  # a peer's wrong answer is reported, not fatal


def test_wrong_normlayers_sets_exit_code(tmp_path, monkeypatch):
    monkeypatch.setitem(PROVIDERS, "normlayers", _scaled_torch_provider("normlayers", 1.01))
    code, rows, _ = _run(tmp_path, "--op", "rms_norm", "--shapes", "4x64", "--providers", "normlayers",
                         "--mode", "fwd", "--dtype", "fp32")

    assert [r["status"] for r in rows] == ["WRONG"]
    assert code == 1


def _raising_provider(name: str, exc: Exception, when: str) -> Provider:
    """A provider that raises ``exc`` when built (``when="build"``) or when called (``when="run"``)."""

    def run(x, residual, weight, bias):
        raise exc

    def build(op):
        if when == "build":
            raise exc
        return run

    return Provider(name, f"raises at {when}", build)


@pytest.mark.parametrize("when", ["build", "run"])
def test_failing_provider_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, when):
    monkeypatch.setitem(PROVIDERS, "broken", _raising_provider("broken", ImportError("no module named peer"), when))
    code, rows, _ = _run(tmp_path, "--op", "layer_norm", "--shapes", "4x64", "--providers", "broken", "torch",
                         "--mode", "fwd", "--dtype", "fp32")

    by_provider = {r["provider"]: r for r in rows}
    assert by_provider["broken"]["status"] == "failed"
    assert by_provider["broken"]["note"] == "ImportError: no module named peer"
    assert by_provider["broken"]["median_ms"] == ""
    assert by_provider["torch"]["status"] == "ok"
    assert code == 0


def test_unsupported_op_is_a_row_not_a_failure(tmp_path, monkeypatch):
    unsupported = UnsupportedOp("rms_only has no layer_norm")
    monkeypatch.setitem(PROVIDERS, "rms_only", _raising_provider("rms_only", unsupported, "build"))
    code, rows, _ = _run(tmp_path, "--op", "layer_norm", "--shapes", "4x64", "--providers", "rms_only",
                         "--mode", "fwd", "--dtype", "fp32")

    assert [(r["status"], r["note"]) for r in rows] == [("unsupported", "rms_only has no layer_norm")]
    assert code == 0


def test_unavailable_peer_is_listed_not_run(tmp_path):
    code, rows, document = _run(tmp_path, "--op", "rms_norm", "--shapes", "4x64", "--providers", "torch", "liger",
                                "--mode", "fwd", "--dtype", "fp32")

    assert code == 0
    assert [r["provider"] for r in rows] == ["torch"]
    assert document["metadata"]["unavailable_providers"] == {"liger": "needs CUDA"}


def test_list_prints_ops_providers_and_suite_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--list", "--device", "cpu"]) == 0

    out = capsys.readouterr().out
    for name in [*OPS, *PROVIDERS]:
        assert name in out
    assert "liger_kernel.transformers.functional  [unavailable: needs CUDA]" in out
    assert "default suite on cpu: --op rms_norm layer_norm --dtype fp32" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--op", "group_norm"], "invalid choice: 'group_norm'"),
    (["--shapes", "4096by8192"], "bad shape '4096by8192': expected ROWSxCOLS"),
    (["--shapes", "0x64"], "bad shape '0x64'"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--rep-ms", "-1"], "expected a positive number of milliseconds"),
])
def test_bad_arguments_exit_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as exc_info:
        cli.main([*args, "--device", "cpu"])

    assert exc_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_shape():
    assert cli.parse_shape("4096x8192") == (4096, 8192)
    assert cli.parse_shape("1X7") == (1, 7)


@pytest.mark.parametrize("op, mode, expected", [
    # read x + write y (4·64 fp32 each) + read weight (64 fp32)
    ("rms_norm", "fwd", (2 * 4 * 64 + 64) * 4),
    # read x, dy; write dx; read weight; write dweight; read rstd (4 rows, fp32)
    ("rms_norm", "bwd", (3 * 4 * 64 + 2 * 64) * 4 + 4 * 4),
    # forward: x, residual, y, h + weight, bias; write mean, rstd; backward: h, dy, dh, dx + weight, dweight, dbias;
    # read mean, rstd
    ("add_layer_norm", "fwd_bwd", (4 * 4 * 64 + 2 * 64) * 4 + 2 * 4 * 4 + (4 * 4 * 64 + 3 * 64) * 4 + 2 * 4 * 4),
])
def test_byte_model(op, mode, expected):
    assert ideal_bytes(OPS[op], mode, 4, 64, torch.float32) == expected
    assert ideal_bytes(OPS[op], mode, 4, 64, torch.bfloat16) < expected


def test_python_dash_m_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "normlayers.bench", "--list", "--device", "cpu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert "providers:" in done.stdout
