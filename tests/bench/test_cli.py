"""Tests of the benchmark CLI on tiny CPU shapes (the reference path; torch.compile in one test only)."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normlayers
import normlayers.functional
from normlayers.bench import cli, timing
from normlayers.bench.compare import Comparison, compare, regressions
from normlayers.bench.ops import OPS, ideal_bytes
from normlayers.bench.providers import PROVIDERS, Provider, UnsupportedOp
from normlayers.bench.report import CSV_FIELDS
from normlayers.bench.runner import BenchResult, run_case, timed_call
from normlayers.bench.suites import SUITES

from .conftest import FAST

TINY_SHAPES = {"rows": "3x40", "nchw": "2x32x3x3", "conv_weight": "4x3x3x3", "tokens_tbc": "6x3x8",
               "tokens_bnc": "3x6x8", "spd": "5x3"}


def _run(tmp_path: Path, *args: str) -> tuple[int, list[dict], dict]:
    """Run the CLI into ``tmp_path`` (default file names); return its exit code, the CSV rows and the JSON."""
    code = cli.main([*args, *FAST, "--out", str(tmp_path)])
    stem = f"{datetime.date.today().isoformat()}_cpu_custom"
    with (tmp_path / f"{stem}.csv").open() as f:
        rows = list(csv.DictReader(f))
    return code, rows, json.loads((tmp_path / f"{stem}.json").read_text())


def _scaled_torch_provider(name: str, factor: float) -> Provider:
    """A provider that is torch eager with its output scaled: wrong by a relative ``factor − 1``."""
    return Provider(name, f"torch eager x {factor}", lambda op: lambda *args: op.native(*args) * factor)


def _raising_provider(name: str, exc: Exception, when: str) -> Provider:
    """A provider that raises ``exc`` when built (``when="build"``) or when called (``when="run"``)."""

    def run(*args):
        raise exc

    def build(op):
        if when == "build":
            raise exc
        return run

    return Provider(name, f"raises at {when}", build)


# ----------------------------------------------------------------------------------------------------------------------
# Files and values
# ----------------------------------------------------------------------------------------------------------------------


def test_tiny_run_writes_csv_and_json_with_sane_values(tiny_run):
    csv_path, json_path, document = tiny_run
    with csv_path.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == CSV_FIELDS

    expected = {(op, provider) for op in ("rms_norm", "layer_norm") for provider in ("normlayers", "torch")}
    assert {(r["op"], r["provider"]) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        assert (r["family"], r["dtype"], r["mode"], r["shape"], r["status"]) == \
            ("row_norms", "fp32", "fwd", "4x64", "ok"), r
        p20, median, p80 = float(r["p20_ms"]), float(r["median_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= median <= p80, r
        assert int(r["reps"]) >= timing.MIN_REPS
        assert float(r["gbps"]) > 0 and float(r["pct_of_copy"]) > 0
        assert 0 <= float(r["max_abs_err"]) <= float(r["err_bound"]) < 1e-3, r
        assert float(r["peak_mem_mib"]) > 0  # CPU: the profiler's allocation events; every call allocates its output
        assert r["compile_s"] == ""  # neither compiles on CPU
        assert (r["device_name"], r["torch"]) == (document["metadata"]["device_name"], torch.__version__)
    assert all(float(r["speedup_vs_torch"]) == 1.0 for r in rows if r["provider"] == "torch")
    assert all("cpu tier" in r["note"] for r in rows if r["provider"] == "normlayers")

    metadata = document["metadata"]
    assert metadata["device_type"] == "cpu" and metadata["suite"] == "custom"
    assert metadata["torch"] == torch.__version__ and metadata["copy_bandwidth_gbps"] > 0
    assert metadata["torch_num_threads"] == torch.get_num_threads()
    assert 0 <= metadata["load_average_start"] <= metadata["load_average_max"]  # the machine's load beside the times
    assert {"git_sha", "date", "device_name", "triton", "normlayers", "timer", "byte_models"} <= metadata.keys()
    assert metadata["byte_models"]["rms_norm/fwd"] == "read x[MxN] + read weight[N] + write y[MxN]"
    assert [(r["op"], r["provider"]) for r in document["results"]] == [(r["op"], r["provider"]) for r in rows]


def test_time_limit_stops_starting_cases_and_lists_the_ones_not_run(tmp_path, capsys):
    code, rows, document = _run(tmp_path, "--op", "rms_norm,layer_norm", "--shapes", "3x40", "--dtype", "fp32",
                                "--mode", "fwd", "--providers", "torch", "--time-limit", "0")

    assert code == 0 and rows == [] and document["results"] == []
    metadata = document["metadata"]
    assert metadata["cases_not_run"] == ["rms_norm fp32 fwd 3x40", "layer_norm fp32 fwd 3x40"]
    assert (metadata["time_limit_s"], metadata["cases_planned"], metadata["finished"]) == (0, 2, True)
    assert "time limit of 0 s reached: 2 of 2 cases not run" in capsys.readouterr().out


def test_a_run_that_dies_part_way_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    finished = []

    def run_case_then_die(case, providers, settings):
        if finished:
            raise KeyboardInterrupt  # as a run stopped from outside
        finished.append(case)
        return run_case(case, providers, settings)

    monkeypatch.setattr(cli, "run_case", run_case_then_die)
    json_path = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--op", "rms_norm,layer_norm", "--shapes", "3x40", "--dtype", "fp32", "--mode", "fwd",
                  "--providers", "torch", "--json", str(json_path), *FAST])

    document = json.loads(json_path.read_text())
    assert [r["op"] for r in document["results"]] == ["rms_norm"]
    assert document["metadata"]["finished"] is False


def test_dtypes_an_op_does_not_accept_are_left_out_and_said(tmp_path, capsys):
    code, rows, document = _run(tmp_path, "--op", "spd_batch_norm,rms_norm", "--shapes", "5x3", "--dtype",
                                "fp32,bf16", "--mode", "fwd", "--providers", "torch")

    assert code == 0
    assert sorted((r["op"], r["dtype"]) for r in rows) == \
        [("rms_norm", "bf16"), ("rms_norm", "fp32"), ("spd_batch_norm", "fp32")]
    assert document["metadata"]["not_applicable"] == ["spd_batch_norm bf16"]
    assert "not run, the op does not accept the dtype: spd_batch_norm bf16" in capsys.readouterr().out


def test_the_gpu_suite_runs_every_registered_op_at_shapes_that_fit_it():
    # tools/gpu_check.sh benchmarks every op through this suite: a new op (or shape kind) must be added to it.
    assert sorted(SUITES["gpu"].ops) == sorted(OPS)
    for shapes_by_kind in SUITES["gpu"].shapes.values():
        for op in OPS.values():
            for shape in shapes_by_kind[op.shape_kind.name]:
                op.parse_shape(shape)  # raises when the shape does not fit the op
    assert {c.op.name for c in _plan("--suite", "gpu").cases} == set(OPS)


@pytest.mark.parametrize("kind", sorted(TINY_SHAPES))
def test_every_registered_op_runs_through_normlayers_and_torch(tmp_path, kind):
    ops = [name for name, op in OPS.items() if op.shape_kind.name == kind]
    code, rows, _ = _run(tmp_path, "--op", ",".join(ops), "--shapes", TINY_SHAPES[kind], "--dtype", "fp32",
                         "--mode", "fwd,fwd_bwd", "--providers", "normlayers,torch")

    assert code == 0
    assert {(r["op"], r["mode"], r["provider"]) for r in rows} == \
        {(op, mode, p) for op in ops for mode in ("fwd", "fwd_bwd") for p in ("normlayers", "torch")}
    bad = [(r["op"], r["mode"], r["provider"], r["status"], r["note"]) for r in rows if r["status"] != "ok"]
    assert bad == []


def test_every_op_is_a_functional_and_every_functional_is_benchmarked():
    # Functions that are compositions of a benchmarked op with a convolution (or its scaled twin), not norms of their
    # own. A new family's functions land here as failures until its bench module is added (benchmarks/README.md).
    not_benchmarked = {"ws_conv2d", "scaled_ws_conv2d", "scaled_weight_standardize"}
    functions = {name for name in normlayers.functional.__all__ if callable(getattr(normlayers.functional, name))
                 and name.islower()}
    # An op is named after its functional, or after it and what it fixes (group_norm_silu_cl: act, layout).
    def functional_of(op_name: str) -> str:
        return max((f for f in functions if op_name == f or op_name.startswith(f + "_")), key=len, default=op_name)

    benchmarked = {functional_of(name) for name in OPS}
    assert benchmarked <= functions
    assert functions - benchmarked - not_benchmarked == set(), "add these ops to a bench module"


def test_each_ops_default_shapes_fit_it():
    for op in OPS.values():
        for device_type in ("cpu", "cuda"):
            for shape in op.default_shapes[device_type]:
                assert op.parse_shape(op.shape_kind.format(shape)) == shape


def test_training_buffers_are_checked_and_each_provider_gets_its_own(tmp_path):
    op = OPS["batch_channel_norm"]
    inputs = op.inputs((2, 32, 3, 3), torch.float32, torch.device("cpu"), training=True)
    copy = inputs.to()
    op.normlayers(*copy.args)

    running_mean = inputs.state["running_mean"]
    assert not torch.equal(copy.args[running_mean], inputs.args[running_mean])  # the copy was updated, not the original
    assert copy.args[0].requires_grad and copy.args[0] is not inputs.args[0]
    assert inputs.to(torch.float64).args[1].dtype == torch.float64


def _frozen_statistics_provider(name: str) -> Provider:
    """normlayers, but its running statistics are copies: the buffers the caller passed are never updated."""

    def build(op):
        def run(*args):
            frozen = list(args)
            for i in op.inputs((2, 32, 3, 3), torch.float32, torch.device("cpu"), training=True).state.values():
                frozen[i] = args[i].clone()
            return op.normlayers(*frozen)

        return run

    return Provider(name, "running statistics not updated", build)


@pytest.mark.parametrize("op", ["batch_channel_norm", "evo_norm2d_b2"])
def test_running_statistics_that_are_not_updated_are_flagged(tmp_path, monkeypatch, op):
    monkeypatch.setitem(PROVIDERS, "frozen", _frozen_statistics_provider("frozen"))
    code, rows, _ = _run(tmp_path, "--op", op, "--shapes", "2x32x3x3", "--dtype", "fp32", "--mode", "fwd_bwd",
                         "--providers", "normlayers,frozen")

    by_provider = {r["provider"]: r for r in rows}
    assert by_provider["normlayers"]["status"] == "ok"
    assert by_provider["frozen"]["status"] == "WRONG"
    assert by_provider["frozen"]["err_tensor"] in ("running_mean", "running_var")


def test_bf16_batch_channel_norm_backward_and_evo_state(tmp_path):
    code, rows, _ = _run(tmp_path, "--op", "batch_channel_norm,evo_norm2d_b0", "--shapes", "2x32x3x3", "--dtype",
                         "bf16", "--mode", "bwd", "--providers", "normlayers,torch")

    assert code == 0
    normlayers_rows = [r for r in rows if r["provider"] == "normlayers"]
    assert [r["status"] for r in normlayers_rows] == ["ok", "ok"]
    evo_torch = next(r for r in rows if r["op"] == "evo_norm2d_b0" and r["provider"] == "torch")
    assert evo_torch["note"] == "timm's EvoNorm in eager torch (no native op)"


def test_torch_fp32_writes_the_running_statistics_back(tmp_path):
    """bf16 BatchChannelNorm training: the torch_fp32 row updates fp32 copies of the bf16 running statistics and
    stores them back, so its updated buffers are checked like every provider's (and it is within the bound, where the
    plain bf16 call is not)."""
    code, rows, _ = _run(tmp_path, "--op", "batch_channel_norm", "--shapes", "2x32x3x3", "--dtype", "bf16", "--mode",
                         "fwd_bwd", "--providers", "normlayers,torch,torch_fp32")

    assert code == 0
    assert {r["provider"]: r["status"] for r in rows}["torch_fp32"] == "ok"
    assert OPS["batch_channel_norm"].updated_args == (1, 2)


def test_fused_add_and_crms_backward_are_checked(tmp_path):
    code, rows, _ = _run(tmp_path, "--op", "add_rms_norm", "crms_norm", "--shapes", "3x40", "--dtype", "bf16",
                         "--providers", "normlayers", "torch", "--mode", "bwd")

    assert code == 0 and len(rows) == 4
    assert all(r["status"] == "ok" and float(r["max_abs_err"]) <= float(r["err_bound"]) for r in rows), rows
    torch_crms = next(r for r in rows if r["op"] == "crms_norm" and r["provider"] == "torch")
    assert "F.rms_norm of the restored" in torch_crms["note"]


def test_torch_compile_backward_is_timed_with_its_compile_time(tmp_path):
    code, rows, _ = _run(tmp_path, "--op", "rms_norm", "--shapes", "4x64", "--dtype", "fp32", "--mode", "bwd",
                         "--providers", "torch_compile")

    assert code == 0
    (row,) = rows
    assert row["status"] == "ok", row["note"]
    assert float(row["compile_s"]) > 0 and float(row["median_ms"]) > 0


def test_compiled_normlayers_runs_only_when_named(tmp_path):
    (tmp_path / "default").mkdir(), (tmp_path / "named").mkdir()
    code, rows, _ = _run(tmp_path / "default", "--op", "evo_norm2d_s0", "--shapes", "2x32x3x3", "--dtype", "fp32",
                         "--mode", "fwd_bwd")
    assert code == 0 and "normlayers_compile" not in {r["provider"] for r in rows}

    code, rows, _ = _run(tmp_path / "named", "--op", "evo_norm2d_s0", "--shapes", "2x32x3x3", "--dtype", "fp32",
                         "--mode", "fwd_bwd", "--providers", "normlayers_compile")
    assert code == 0
    (row,) = rows
    assert row["status"] == "ok", row["note"]
    assert float(row["compile_s"]) > 0 and row["note"] == "backend 'auto': cpu tier"


# ----------------------------------------------------------------------------------------------------------------------
# Providers: wrong, failing, unsupported, unavailable
# ----------------------------------------------------------------------------------------------------------------------


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


def test_peers_cover_only_the_row_norms_they_have():
    with pytest.raises(UnsupportedOp, match="liger has no batch_channel_norm"):
        PROVIDERS["liger"].build(OPS["batch_channel_norm"])
    with pytest.raises(UnsupportedOp, match="quack has no layer_norm"):
        PROVIDERS["quack"].build(OPS["layer_norm"])
    assert PROVIDERS["liger"].unavailable_reason(torch.device("cpu")) == "needs CUDA"


def test_unavailable_peer_is_listed_not_run(tmp_path):
    code, rows, document = _run(tmp_path, "--op", "rms_norm", "--shapes", "4x64", "--providers", "torch,liger",
                                "--mode", "fwd", "--dtype", "fp32")

    assert code == 0
    assert [r["provider"] for r in rows] == ["torch"]
    assert document["metadata"]["unavailable_providers"] == {"liger": "needs CUDA"}


# ----------------------------------------------------------------------------------------------------------------------
# --compare, --plot, explicit output paths, progress
# ----------------------------------------------------------------------------------------------------------------------


def _old_result(provider: str, median_ms: float) -> dict:
    return {"op": "rms_norm", "dtype": "fp32", "mode": "fwd", "shape": "4x64", "provider": provider, "status": "ok",
            "median_ms": median_ms, "p20_ms": median_ms, "p80_ms": median_ms}


def test_compare_prints_speedups_and_fails_on_a_regression(tmp_path, capsys):
    # normlayers was "1000x faster" before (a regression now), torch "1000x slower" (a speed-up now).
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"metadata": {"device_name": "another machine", "date": "2026-01-01"},
                               "results": [_old_result("normlayers", 1e-6), _old_result("torch", 1e6)]}))
    code = cli.main(["--op", "rms_norm", "--shapes", "4x64", "--dtype", "fp32", "--mode", "fwd", "--providers",
                     "normlayers,torch", "--compare", str(old), "--fail-if-regression", "10%",
                     "--json", str(tmp_path / "new.json"), *FAST])

    out = capsys.readouterr().out
    assert f"compared with {old}" in out
    assert "WARNING: different devices" in out
    normlayers_line = next(line for line in out.splitlines() if "normlayers" in line and "slower" in line)
    torch_line = next(line for line in out.splitlines() if " torch " in line and "faster" in line)
    assert "rms_norm" in normlayers_line and "rms_norm" in torch_line
    assert "1 normlayers result(s) slower by more than 10%" in out
    assert code == 1


def test_compare_verdicts_use_the_p20_p80_ranges():
    new = BenchResult("rms_norm", "row_norms", "fp32", "fwd", "4x64", "torch", "ok", median_ms=1.0, p20_ms=0.9,
                      p80_ms=1.1)
    overlapping = {**_old_result("torch", 1.05), "p20_ms": 1.0, "p80_ms": 1.2}
    (same,) = compare([overlapping], [new])
    assert same.verdict == "same" and same.speedup == pytest.approx(1.05)
    (slower,) = compare([_old_result("torch", 0.5)], [new])
    assert slower.verdict == "slower"
    assert regressions([slower], "torch", 50) == [slower] and regressions([slower], "torch", 150) == []
    assert compare([_old_result("normlayers", 1.0)], [new]) == []  # no match: another provider
    assert isinstance(slower, Comparison)


def test_plot_and_explicit_output_paths_and_progress_on_a_tty(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    fake_tty = io.StringIO()
    fake_tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", fake_tty)
    out_dir = tmp_path / "default-dir"
    code = cli.main(["--op", "rms_norm", "--shapes", "4x64,8x64", "--dtype", "fp32", "--mode", "fwd", "--providers",
                     "normlayers,torch", "--plot", str(tmp_path / "plot.png"), "--output", str(tmp_path / "r.csv"),
                     "--out", str(out_dir), *FAST])

    assert code == 0
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "r.csv").exists() and not (tmp_path / "r.json").exists()
    assert not out_dir.exists()  # --output given: nothing in the default directory
    assert "[2/2] rms_norm fp32 fwd 8x64" in fake_tty.getvalue()
    assert "[2/2]" not in capsys.readouterr().out


def test_no_progress_with_quiet_or_without_a_tty(tmp_path, monkeypatch, capsys):
    fake_tty = io.StringIO()
    fake_tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", fake_tty)
    assert cli.main(["--op", "rms_norm", "--shapes", "4x64", "--mode", "fwd", "--providers", "torch", "--quiet",
                     "--out", str(tmp_path), *FAST]) == 0
    assert fake_tty.getvalue() == ""


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "matplotlib_missing", lambda: True)
    with pytest.raises(SystemExit) as exc_info:
        cli.main(["--plot", "x.png", "--device", "cpu"])
    assert exc_info.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Arguments, suites, listings
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--op", "instance_norm"],
     "--op: unknown op 'instance_norm'; choose from: layer_norm2d, rms_norm2d, batch_channel_norm,"),
    (["--op", "rms_norm", "--shapes", "4096by8192"], "bad shape '4096by8192' for rms_norm: expected MxN"),
    (["--op", "rms_norm", "--shapes", "0x64"], "bad shape '0x64' for rms_norm"),
    (["--op", "batch_channel_norm", "--shapes", "64x64"],
     "bad shape '64x64' for batch_channel_norm: expected NxCxHxW (batch x channels x height x width)"),
    (["--op", "evo_norm2d_s0", "--shapes", "2x48x4x4"], "C = 48 must be a multiple of the 32 groups"),
    (["--op", "rms_norm,weight_standardize", "--shapes", "4x64"], "bad shape '4x64' for weight_standardize"),
    (["--dtype", "fp8"], "--dtype: unknown dtype 'fp8'; choose from: fp32, fp16, bf16"),
    (["--mode", "forward"], "--mode: unknown mode 'forward'"),
    (["--providers", "triton"], "--providers: unknown provider 'triton'"),
    (["--rep-ms", "-1"], "expected a positive number of milliseconds"),
    (["--time-limit", "soon"], "--time-limit: expected a non-negative number of seconds, got 'soon'"),
    (["--op", "spd_batch_norm", "--dtype", "bf16"],
     "--dtype: nothing to run, the ops do not accept these dtypes (spd_batch_norm bf16)"),
    (["--fail-if-regression", "5"], "--fail-if-regression needs --compare"),
    (["--compare", "/nonexistent/old.json"], "--compare: cannot read /nonexistent/old.json"),
    (["--suite", "nope"], "invalid choice: 'nope'"),
])
def test_bad_arguments_exit_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as exc_info:
        cli.main([*args, "--device", "cpu"])

    assert exc_info.value.code == 2
    assert message in capsys.readouterr().err


def test_dtype_not_supported_on_the_device_is_refused(monkeypatch, capsys):
    # A pre-Ampere GPU, faked: the check runs before anything touches the device.
    monkeypatch.setattr(cli, "_resolve_device", lambda parser, choice: torch.device("cuda", 0))
    monkeypatch.setattr(cli, "device_name", lambda device: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(SystemExit) as exc_info:
        cli.main(["--op", "rms_norm", "--dtype", "fp32,bf16"])

    assert exc_info.value.code == 2
    assert "--dtype: bf16 is not supported on Tesla V100-SXM2-16GB" in capsys.readouterr().err
    assert cli.unsupported_dtype_reason("fp16", torch.device("cpu")) is None
    assert cli.unsupported_dtype_reason("bf16", torch.device("cpu")) is None


def _plan(*args: str):
    parser = cli.build_parser()
    return cli._plan(parser, parser.parse_args([*args, "--device", "cpu"]), torch.device("cpu"))


def test_suites_and_overrides_resolve_to_cases():
    default = _plan()
    assert default.suite == "default"
    assert {c.op.name for c in default.cases} == set(SUITES["default"].ops)
    assert {c.shape_text for c in default.cases} == \
        {s for shapes in SUITES["default"].shapes["cpu"].values() for s in shapes}

    cnn = _plan("--suite", "cnn_norms", "--mode", "fwd")
    ws_shapes = {c.shape for c in cnn.cases if c.op.name == "weight_standardize"}
    assert ws_shapes == set(OPS["weight_standardize"].default_shapes["cpu"])
    assert {c.mode for c in cnn.cases} == {"fwd"}

    custom = _plan("--op", "layer_norm", "rms_norm,crms_norm", "--dtype", "bf16")
    assert custom.suite == "custom"
    assert list(dict.fromkeys(c.op.name for c in custom.cases)) == ["layer_norm", "rms_norm", "crms_norm"]
    assert {c.shape for c in custom.cases} == set(OPS["rms_norm"].default_shapes["cpu"])
    assert {c.dtype for c in custom.cases} == {torch.bfloat16}


def test_listings_print_and_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in [*OPS, *PROVIDERS, *SUITES]:
        assert name in out
    assert "liger_kernel.transformers.functional  [unavailable: needs CUDA]" in out
    assert list(tmp_path.iterdir()) == []

    assert cli.main(["--list-ops", "--device", "cpu"]) == 0
    ops_out = capsys.readouterr().out
    assert "weight_standardize  [cnn_norms]  OxIxKHxKW" in ops_out and "providers:" not in ops_out
    assert cli.main(["--list-providers", "--device", "cpu"]) == 0
    assert "torch_compile" in capsys.readouterr().out
    assert cli.main(["--list-suites", "--device", "cpu"]) == 0
    assert "cnn_norms: " in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# Byte model, timer
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op, mode, shape, expected", [
    # read x + write y (4·64 fp32 each) + read weight (64 fp32)
    ("rms_norm", "fwd", (4, 64), (2 * 4 * 64 + 64) * 4),
    # read x, dy; write dx; read weight; write dweight; read rstd (4 rows, fp32)
    ("rms_norm", "bwd", (4, 64), (3 * 4 * 64 + 2 * 64) * 4 + 4 * 4),
    # forward: x, residual, y, h + weight, bias; write mean, rstd; backward: h, dy, dh, dx + weight, dweight, dbias;
    # read mean, rstd
    ("add_layer_norm", "fwd_bwd", (4, 64),
     (4 * 4 * 64 + 2 * 64) * 4 + 2 * 4 * 4 + (4 * 4 * 64 + 3 * 64) * 4 + 2 * 4 * 4),
    # eval: read x, write y (2·32·3·3 each); running mean/var, bn weight/bias (32 each); group weight, bias (32)
    ("batch_channel_norm", "fwd", (2, 32, 3, 3), (2 * 2 * 32 * 9 + 4 * 32 + 2 * 32) * 4),
    # read weight, write the standardized weight; training adds mean and rstd per filter (fp32)
    ("weight_standardize", "fwd", (8, 4, 3, 3), 2 * 8 * 4 * 9 * 4),
])
def test_byte_model(op, mode, shape, expected):
    assert ideal_bytes(OPS[op], mode, shape, torch.float32) == expected
    assert ideal_bytes(OPS[op], mode, shape, torch.bfloat16) < expected


def test_evo_b_running_var_counts_as_fp32_in_every_dtype():
    op, shape = OPS["evo_norm2d_b1"], (2, 32, 3, 3)
    # read x + write y at 2 bytes, weight/bias at 2 bytes, running_var at 4 bytes
    assert ideal_bytes(op, "fwd", shape, torch.bfloat16) == 2 * (2 * 2 * 32 * 9) + 2 * 2 * 32 + 4 * 32


def test_cpu_timer_runs_at_the_process_thread_count_with_one_untimed_setup_per_call():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen, setups = [], []
        call = timing.TimedCall(run=lambda: seen.append(torch.get_num_threads()), setup=lambda: setups.append(1))
        times = timing.make_timer(torch.device("cpu")).times_ms(call, 4)
    finally:
        torch.set_num_threads(before)
    assert len(times) == 4 and all(t > 0 for t in times)
    assert seen == [2] * 4 and len(setups) == 4


def test_bwd_call_runs_one_forward_per_backward():
    op = OPS["rms_norm"]
    inputs = op.inputs((4, 64), torch.float32, torch.device("cpu"), training=True)
    forwards = []

    def counted(*args):
        forwards.append(1)
        return op.reference(*args)

    call = timed_call(counted, inputs, "bwd")
    call.prepare()
    call.run()
    call.run()  # nothing prepared: runs its own forward (the CPU timer's untimed warmup calls do this)
    assert len(forwards) == 2


def test_python_dash_m_entry_point(tmp_path):
    # The package under test, whichever checkout that is (a relative PYTHONPATH would not survive the cwd change).
    source_root = str(Path(normlayers.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source_root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "normlayers.bench", "--list-providers", "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)

    assert done.returncode == 0, done.stderr
    assert "providers:" in done.stdout


def test_speedups_divide_the_quickest_correct_torch_equivalent():
    """bf16 LayerNorm: torch's plain call is out of tolerance (its bf16 backward sums dW/dB in bf16), the same call on
    fp32 copies is not; the speed-ups divide the torch_fp32 time. In fp32, torch_fp32 is the torch call: not run."""
    from normlayers.bench.runner import _add_speedups

    def result(provider, status, ms):
        return BenchResult("layer_norm", "row_norms", "bf16", "fwd_bwd", "4x64", provider, status, median_ms=ms)

    results = [result("normlayers", "ok", 1.0), result("torch", "WRONG", 0.5), result("torch_fp32", "ok", 2.0)]
    _add_speedups(results)
    assert [r.speedup_vs_torch for r in results] == [2.0, None, 1.0]
    results = [result("normlayers", "ok", 1.0), result("torch", "ok", 0.5), result("torch_fp32", "ok", 2.0)]
    _add_speedups(results)
    assert [r.speedup_vs_torch for r in results] == [0.5, 1.0, 0.25]
    results = [result("normlayers", "ok", 1.0), result("torch", "WRONG", 0.5)]  # no correct one: the plain call
    _add_speedups(results)
    assert results[0].speedup_vs_torch == 0.5

    op = OPS["layer_norm"]
    run = PROVIDERS["torch_fp32"].build(op)
    inputs = op.inputs((4, 64), torch.bfloat16, torch.device("cpu"), training=True)
    y = run(*inputs.args)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, op.native(*(a.float() if isinstance(a, torch.Tensor) else a for a in inputs.args)).bfloat16())
    with pytest.raises(UnsupportedOp):
        run(*op.inputs((4, 64), torch.float32, torch.device("cpu"), training=False).args)
