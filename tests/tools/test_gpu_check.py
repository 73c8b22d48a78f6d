"""``tools/gpu_check.sh --dry-run``, end to end on the CPU: the one-call GPU check (benchmarks/README.md) runs every
phase and writes a result folder whose files parse and hold every op, provider and mode it should, so that it
cannot arrive broken on the GPU machine."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normlayers.bench.ops import OPS
from normlayers.bench.report import CSV_FIELDS
from normlayers.bench.suites import SUITES

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_FILES = {"env.json", "tests.log", "bench.csv", "bench.json", "bench.log", "summary.md"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """The dry run's process, its result folder and the copy of it in ``$OUT``."""
    base = tmp_path_factory.mktemp("gpu_check")
    (base / "device_out").mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(base / "device_out")}
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(base / "results")],
                          env=env, capture_output=True, text=True, timeout=600)
    folders = list((base / "results").iterdir())
    assert len(folders) == 1, (folders, done.stdout[-3000:], done.stderr[-3000:])
    return done, folders[0], base / "device_out" / folders[0].name


def test_the_dry_run_succeeds_and_writes_one_folder_copied_to_out(dry_run):
    done, folder, copy = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_cpu", folder.name)
    names = {p.name for p in folder.iterdir()}
    assert EXPECTED_FILES <= names <= EXPECTED_FILES | {"audit.txt"}
    assert len(names) <= 8  # the device tool brings back at most 8 files
    for name in names:
        assert (copy / name).read_bytes() == (folder / name).read_bytes()
    assert f"result folder: {folder}" in done.stdout


def test_env_reports_the_versions_and_the_copy_bandwidth(dry_run):
    env = json.loads((dry_run[1] / "env.json").read_text())
    assert (env["device_type"], env["torch"], env["python"]) == ("cpu", torch.__version__, sys.version.split()[0])
    assert env["triton"] and env["copy_bandwidth_gbps"] > 0
    assert env["triton_interpret"] == "1"  # the dry run's kernels run under the interpreter


def test_the_tests_ran_and_passed(dry_run):
    log = (dry_run[1] / "tests.log").read_text()
    closing = log.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", closing) and "failed" not in closing and "error" not in closing, closing


def test_bench_holds_every_op_provider_and_mode(dry_run):
    folder = dry_run[1]
    document = json.loads((folder / "bench.json").read_text())
    with (folder / "bench.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == CSV_FIELDS
    assert [(r["op"], r["dtype"], r["mode"], r["shape"], r["provider"]) for r in rows] == \
        [(r["op"], r["dtype"], r["mode"], r["shape"], r["provider"]) for r in document["results"]]

    ok = {(r["op"], r["dtype"], r["mode"], r["provider"]) for r in rows if r["status"] == "ok"}
    every_op = {(op, "fp32", mode, provider) for op in OPS for mode in SUITES["gpu"].modes
                for provider in ("normlayers", "torch")}
    assert every_op <= ok, sorted(every_op - ok)
    row_widths = {(op, "fp32", mode, "normlayers") for op in SUITES["row_widths"].ops
                  for mode in SUITES["row_widths"].modes}
    assert row_widths <= ok, sorted(row_widths - ok)
    assert ("rms_norm", "fp32", "fwd", "torch_compile") in ok
    assert all(float(r["pct_of_copy"]) > 0 for r in rows if r["status"] == "ok")
    # The bandwidth sweep's widths, each once per provider although the passes overlap.
    assert {r["shape"] for r in rows if r["mode"] == "bwd"} == set(SUITES["row_widths"].shapes["cpu"]["rows"])
    assert len({(r["op"], r["dtype"], r["mode"], r["shape"], r["provider"]) for r in rows}) == len(rows)

    metadata = document["metadata"]
    assert list(metadata["passes"]) == ["every_op", "row_widths", "compiled"]
    assert metadata["finished"] and metadata["cases_not_run"] == []
    assert all(p["finished"] and p["copy_bandwidth_gbps"] > 0 for p in metadata["passes"].values())


def test_the_summary_gives_every_phase_and_a_row_per_case(dry_run):
    summary = (dry_run[1] / "summary.md").read_text()
    for phase in ("liger", "env", "tests", "bench", "audit"):
        assert re.search(rf"^\| {phase} \| (ok|skipped) \|", summary, re.M), phase
    for op in OPS:
        row = rf"^\| {op} \| fp32 \| fwd_bwd \| [\dx]+ \| [\d.e+-]+ \| \d+ \| [\d.]+x\*? \|"  # ms, % copy, vs torch
        assert re.search(row, summary, re.M), op
    # Printed last, where a remote call's output tail shows it, less the long per-case table.
    assert summary.split("'vs X'")[0] in dry_run[0].stdout and "| op | dtype |" not in dry_run[0].stdout


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has ended
    except (FileNotFoundError, IndexError):
        return False


def test_a_phase_past_its_limit_is_stopped_with_its_children(tmp_path):
    gpu_check = _gpu_check_module()
    log, pid_file = tmp_path / "phase.log", tmp_path / "child.pid"
    started = time.monotonic()
    # A child in the background, as pytest-xdist's workers: it is stopped too (else it would also hold the output
    # pipe open, and the run would wait for it).
    code, timed_out = gpu_check.run_logged(
        ["bash", "-c", f"echo started; sleep 60 & echo $! > {pid_file}; wait"], log, 1.0, dict(os.environ),
        echo=False)

    assert timed_out and code != 0
    assert time.monotonic() - started < 9  # the limit, not the child's 60 s nor the 10 s wait for the output
    assert log.read_text().splitlines()[1:] == ["started", "", "[gpu_check: stopped after 1 s, its time limit]"]
    deadline = time.monotonic() + 5
    while _alive(int(pid_file.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(int(pid_file.read_text()))


def test_the_outcome_of_a_stopped_test_run_is_counted_from_its_verbose_lines(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("$ python -m pytest -n 8 -v tests/kernels\n"
                   "[gw0] [  1%] PASSED tests/kernels/test_a.py::test_x[fp32]\n"
                   "[gw1] [  2%] FAILED tests/kernels/test_a.py::test_y[bf16]\n"
                   "[gw0] [  3%] PASSED tests/kernels/test_b.py::test_z\n"
                   "\n[gpu_check: stopped after 130 s, its time limit]\n")

    assert _gpu_check_module()._test_outcome(log) == [
        "- 2 passed, 1 failed before it was stopped after 130 s, its time limit",
        "- FAILED tests/kernels/test_a.py::test_y[bf16]"]
