"""Shared set-up of the benchmark tests: a small copy-bandwidth buffer, and one tiny CPU run reused by the tests that
only read its files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from normlayers.bench import cli, timing

FAST = ["--device", "cpu", "--warmup-ms", "0", "--rep-ms", "1"]


@pytest.fixture(autouse=True)
def small_copy_buffer(monkeypatch):
    """The copy-bandwidth measurement on 1 MiB instead of 64 MiB: the tests check the plumbing, not the number."""
    monkeypatch.setitem(timing.COPY_BYTES, "cpu", 2**20)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """rms_norm and layer_norm, fwd, fp32, 4x64, normlayers and torch: the CSV, the JSON and the JSON's document."""
    directory = tmp_path_factory.mktemp("tiny_run")
    csv_path, json_path = directory / "tiny.csv", directory / "tiny.json"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setitem(timing.COPY_BYTES, "cpu", 2**20)
        code = cli.main(["--op", "rms_norm,layer_norm", "--shapes", "4x64", "--dtype", "fp32", "--mode", "fwd",
                         "--providers", "normlayers,torch", "--output", str(csv_path), "--json", str(json_path),
                         *FAST])
    assert code == 0
    return csv_path, json_path, json.loads(json_path.read_text())
