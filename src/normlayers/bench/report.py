"""Results out: the run's metadata (device, versions, git sha, copy bandwidth), a readable table, CSV and JSON."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib.metadata
import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import torch

import normlayers
from normlayers.bench.runner import BenchResult

__all__ = ["CSV_FIELDS", "RESULT_FIELDS", "collect_metadata", "device_name", "device_slug", "format_case_table",
           "free_paths", "output_stem", "write_csv", "write_json"]

RESULT_FIELDS = [f.name for f in dataclasses.fields(BenchResult)]
_PACKAGE_DIR = Path(__file__).resolve().parent


def _run_quietly(command: Sequence[str]) -> Optional[str]:
    """stdout of ``command`` (stripped), or ``None`` if it cannot run or fails."""
    try:
        done = subprocess.run(command, cwd=_PACKAGE_DIR, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name for CUDA, the processor's for CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def _gpu_details(device: torch.device) -> dict:
    properties = torch.cuda.get_device_properties(device)
    query = "driver_version,clocks.sm,clocks.mem,ecc.mode.current"
    smi = _run_quietly(["nvidia-smi", f"--id={device.index or 0}", f"--query-gpu={query}", "--format=csv,noheader"])
    return {
        "cuda_version": torch.version.cuda,
        "sm_count": properties.multi_processor_count,
        "memory_bytes": properties.total_memory,
        "nvidia_smi": dict(zip(query.split(","), (v.strip() for v in smi.split(",")))) if smi else None,
    }


def collect_metadata(device: torch.device, copy_gbps: float, copy_bytes: int, timer_description: str,
                     extra: dict) -> dict:
    """Everything needed to judge and reproduce the numbers."""
    git_status = _run_quietly(["git", "status", "--porcelain", "--untracked-files=no"])
    metadata = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device_name": device_name(device),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "normlayers": normlayers.__version__,  # the imported one, also when run from a checkout (PYTHONPATH=src)
        "git_sha": _run_quietly(["git", "rev-parse", "HEAD"]),
        "git_dirty": None if git_status is None else bool(git_status),
        "torch_num_threads": torch.get_num_threads(),
        "copy_bandwidth_gbps": copy_gbps,
        "copy_buffer_bytes": copy_bytes,
        "timer": timer_description,
    }
    if device.type == "cuda":
        metadata.update(_gpu_details(device))
    metadata.update(extra)
    return metadata


def device_slug(device: torch.device) -> str:
    """The device in result file names: ``cpu``, or the GPU's name in lower case and dashes
    (``nvidia-h100-80gb-hbm3``)."""
    return "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def output_stem(device: torch.device, date: datetime.date, suite: str) -> str:
    """``<date>_<device>_<suite>``, e.g. ``2026-11-24_cpu_default`` or ``..._nvidia-h100-80gb-hbm3_row_norms``."""
    return f"{date.isoformat()}_{device_slug(device)}_{suite}"


def free_paths(directory: Path, stem: str, suffixes: Sequence[str]) -> list[Path]:
    """``directory/<stem><suffix>`` for each suffix, with ``stem-2``, ``stem-3``, ... so that no earlier result file is
    overwritten."""
    candidate, n = stem, 1
    while any((directory / f"{candidate}{s}").exists() for s in suffixes):
        n += 1
        candidate = f"{stem}-{n}"
    return [directory / f"{candidate}{s}" for s in suffixes]


# The environment repeated on every CSV row, so that CSVs of several runs can be concatenated (as Liger's are).
CSV_ENVIRONMENT = ("device_name", "torch", "triton", "normlayers", "git_sha", "date")
CSV_FIELDS = RESULT_FIELDS + list(CSV_ENVIRONMENT)


def write_csv(path: Path, metadata: dict, results: Sequence[BenchResult]) -> None:
    """Long format: one row per (op, dtype, mode, shape, provider), every metric a column, plus the environment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    environment = {key: metadata.get(key) for key in CSV_ENVIRONMENT}
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({**dataclasses.asdict(r), **environment} for r in results)


def write_json(path: Path, metadata: dict, results: Sequence[BenchResult]) -> None:
    """``{"metadata": {...}, "results": [...]}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"metadata": metadata, "results": [dataclasses.asdict(r) for r in results]}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# The table on stdout
# ----------------------------------------------------------------------------------------------------------------------


def _number(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table_row(r: BenchResult) -> list[str]:
    spread = "-" if r.p20_ms is None else f"{r.p20_ms:.4g}-{r.p80_ms:.4g}"
    error = "-" if r.max_abs_err is None else f"{r.max_abs_err:.1e} ({r.err_tensor} <= {r.err_bound:.1e})"
    speedup = _number(r.speedup_vs_torch, ".2f") + ("x" if r.speedup_vs_torch is not None else "")
    return [r.provider, _number(r.median_ms, ".4g"), spread, _number(r.gbps, ".1f"), _number(r.pct_of_copy, ".0f"),
            _number(r.peak_mem_mib, ".1f"), _number(r.compile_s, ".2f"), error, speedup, r.status, r.note]


_HEADER = ["provider", "median ms", "p20-p80 ms", "GB/s", "% copy", "peak MiB", "compile s", "max err (worst <= bound)",
           "vs torch", "status", "note"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    """An aligned text table."""
    rows = [list(header), *map(list, rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def format_case_table(results: Sequence[BenchResult]) -> str:
    """The results of one case as an aligned text table under a title line."""
    first = results[0]
    title = f"{first.op}  {first.dtype}  {first.mode}  {first.shape}"
    return title + "\n" + format_table(_HEADER, [_table_row(r) for r in results])
