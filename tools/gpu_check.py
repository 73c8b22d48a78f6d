"""One call on a CUDA machine, under eight minutes: the versions, the GPU tests, the copy bandwidth, every op
benchmarked, and one result folder. Run it through ``tools/gpu_check.sh`` (which puts ``src`` on the path).

Phases, in order, each under a time limit so that the whole run fits in ``--budget`` seconds and a phase that runs
out still leaves what it wrote:

* ``liger``: ``pip install --no-deps liger-kernel`` when it does not import (from ``.whl/`` when a wheel is there,
  else the package index; with no network it fails quickly and the run goes on without Liger).
* ``env``: Python, torch, triton, CUDA, the GPU, the peer libraries and the device-to-device copy bandwidth
  (``env.json``).
* ``tests``: ``tests/kernels`` and ``tests/ops`` and the ``gpu``-marked tests elsewhere, compiled kernels
  (``TRITON_INTERPRET`` unset), in parallel when pytest-xdist is installed (``tests.log``).
* ``bench``: ``normlayers-bench`` in three passes, most important first, each given a share of the time left:
  every op in bf16 and fp32, fwd and fwd_bwd, against torch eager and the peer libraries (suite ``gpu``); RMSNorm
  and LayerNorm over the row widths against all providers (suite ``row_widths``); then every op against
  ``torch.compile`` (suite ``gpu`` again). Merged into ``bench.csv`` and ``bench.json``, the tables in ``bench.log``.
* ``audit``: ``normlayers-bench --audit --audit-sections launches``, the launch table under the installed torch and
  Triton, when the CLI has it (``audit.txt``).

Then ``summary.md``: each phase's outcome, the failed tests, and per case normlayers' time, its % of the copy
bandwidth and how many times faster it is than each other provider. The folder is
``<out>/<date>_<device>/`` (``--out`` defaults to ``benchmarks/results``), copied into ``$OUT`` when that is set.

``--dry-run`` runs the same phases on the CPU in about two minutes: tiny shapes, two fast kernel tests under the Triton
interpreter, one ``torch.compile`` case, the CPU's copy bandwidth, no install; it is what CI tests.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

GPU_TESTS = ("tests/kernels", "tests/ops")  # plus the gpu-marked tests of every other file
# The dry run's tests: the gpu-marked file (skipped without CUDA) and two quick kernel tests under the interpreter.
DRY_RUN_TESTS = ("tests/kernels/test_row_norms_gpu.py", "tests/kernels/test_row_norms.py::test_empty_rows",
                 "tests/kernels/test_row_norms.py::test_backward_is_deterministic")
# Timing budgets per call site (ms): shorter than the CLI's defaults on CUDA (25, 100), to fit the run in minutes.
TIMING = {"gpu": ("--warmup-ms", "10", "--rep-ms", "50"), "dry": ("--warmup-ms", "0", "--rep-ms", "1")}
# Seconds by which a bench pass stops starting cases before its hard limit: the longest single case (a
# torch.compile of a composite norm's forward and backward) must fit in it. Killed anyway, a pass keeps its files.
PASS_MARGIN_S = {"gpu": 15.0, "dry": 0.0}
PHASE_LIMITS_S = {"liger": 30.0, "env": 60.0, "tests": 130.0, "audit": 90.0}
# The dry run's CPU also runs its kernel tests and bench under the interpreter, beside CI's other work: the launch
# table takes it longer than the GPU machine's faster cores.
DRY_RUN_AUDIT_LIMIT_S = 150.0
SUMMARY_RESERVE_S = 15.0


@dataclass(frozen=True)
class BenchPass:
    """One ``normlayers-bench`` run of the bench phase, with every provider but ``without``; it may start cases until
    ``share`` of the phase's time has passed."""

    name: str
    args: tuple[str, ...]
    share: float
    without: tuple[str, ...] = ()
    dry_run_args: tuple[str, ...] = ()  # added in --dry-run, to keep the CPU run to a minute
    by_default: bool = True  # False: only when --passes names it (a second call)

    def provider_args(self) -> tuple[str, ...]:
        from normlayers.bench.providers import DEFAULT_PROVIDERS

        return ("--providers", ",".join(name for name in DEFAULT_PROVIDERS if name not in self.without)) \
            if self.without else ()


BENCH_PASSES = (
    BenchPass("every_op", ("--suite", "gpu"), share=0.45, without=("torch_compile",)),
    BenchPass("row_widths", ("--suite", "row_widths"), share=0.7, dry_run_args=("--providers", "normlayers,torch")),
    BenchPass("compiled", ("--suite", "gpu", "--providers", "torch,torch_compile"), share=1.0,
              dry_run_args=("--op", "rms_norm", "--mode", "fwd")),
    # For a second call: each family at all its suite's shapes, bf16 and fp32, without torch.compile.
    *(BenchPass(suite, ("--suite", suite, "--dtype", "bf16,fp32"), share=1.0, without=("torch_compile",),
                by_default=False)
      for suite in ("row_norms", "cnn_norms", "transformer_norms", "region", "spd")),
)
SKIPPABLE = ("tests", "bench", "audit")


@dataclass
class Phase:
    name: str
    status: str = "not run"  # ok, failed (rc N), timed out, skipped, not run
    seconds: float = 0.0
    limit_s: Optional[float] = None
    note: str = ""


# ----------------------------------------------------------------------------------------------------------------------
# Running commands under a limit, their output teed into a log
# ----------------------------------------------------------------------------------------------------------------------


def _pump(stream, log, echo: bool) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()


def run_logged(command: Sequence[str], log_path: Path, limit_s: float, env: dict,
               echo: bool = True) -> tuple[int, bool]:
    """Run ``command`` from the repository root, its output appended to ``log_path`` (and echoed); past ``limit_s``
    its whole process group (pytest-xdist workers, Inductor's compile workers) is stopped. Returns (exit code,
    whether it timed out)."""
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", start_new_session=True)
        pump = threading.Thread(target=_pump, args=(process.stdout, log, echo), daemon=True)
        pump.start()
        timed_out = False
        try:
            code = process.wait(timeout=max(limit_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=grace_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            code = process.wait()
        pump.join(timeout=10)
        if timed_out:
            log.write(f"\n[gpu_check: stopped after {limit_s:.0f} s, its time limit]\n")
    return code, timed_out


def _status(code: int, timed_out: bool) -> str:
    return "timed out" if timed_out else "ok" if code == 0 else f"failed (rc {code})"


# ----------------------------------------------------------------------------------------------------------------------
# The env phase (run in its own process: it initializes CUDA)
# ----------------------------------------------------------------------------------------------------------------------


def _distribution_version(module: str) -> Optional[str]:
    for distribution in importlib.metadata.packages_distributions().get(module, []):
        return importlib.metadata.version(distribution)
    return None


def env_report(folder: Path, dry_run: bool) -> int:
    """Write ``env.json`` (normlayers-bench's run metadata, with the copy bandwidth measured here) and print it."""
    import torch

    from normlayers.bench.providers import PEERS
    from normlayers.bench.report import collect_metadata, device_slug
    from normlayers.bench.suites import BUDGETS_MS
    from normlayers.bench.timing import make_timer, measure_copy_bandwidth

    if not dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (use --dry-run to check the script on a CPU)")
        return 1
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    timer = make_timer(device)
    copy_gbps, copy_bytes = measure_copy_bandwidth(device, timer, *BUDGETS_MS[device.type])
    extra = {
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "peers": {name: _distribution_version(module) for name, (module, _) in PEERS.items()},
    }
    if device.type == "cuda":
        extra["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    metadata = collect_metadata(device, copy_gbps, copy_bytes, timer.description, extra)
    metadata["result_folder"] = f"{metadata['date'][:10]}_{device_slug(device)}"
    (folder / "env.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    for key, value in metadata.items():
        print(f"{key}: {value}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry_run = args.dry_run
        self.kind = "dry" if args.dry_run else "gpu"
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.phases: list[Phase] = []
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                              os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("TRITON_INTERPRET", None)
        if self.dry_run:
            # One thread: on a small shared CPU, torch's thread pool waiting on busy cores costs more than it gives.
            self.env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
        date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        args.out.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{date}_running-", dir=args.out))
        self.python = sys.executable

    def left_s(self, reserve_s: float = 0.0) -> float:
        return self.deadline - time.monotonic() - reserve_s

    def phase(self, name: str) -> Phase:
        print(f"[gpu_check {time.monotonic() - self.started:.0f} s] {name}", flush=True)
        phase = Phase(name)
        self.phases.append(phase)
        return phase

    def timed(self, phase: Phase, limit_s: float, command: Sequence[str], log: Path, env: Optional[dict] = None,
              echo: bool = True) -> int:
        phase.limit_s = round(limit_s)
        started = time.monotonic()
        code, timed_out = run_logged(command, log, limit_s, env or self.env, echo)
        phase.seconds = round(time.monotonic() - started, 1)
        phase.status = _status(code, timed_out)
        return code

    # -- phases ---------------------------------------------------------------------------------------------------

    def install_liger(self) -> None:
        phase = self.phase("liger")
        if importlib.util.find_spec("liger_kernel") is not None:
            phase.status, phase.note = "skipped", "liger-kernel already imports"
            return
        if self.dry_run:
            phase.status, phase.note = "skipped", "dry run: installs nothing"
            return
        wheels = ROOT / ".whl"
        source = ["--no-index", "--find-links", str(wheels)] if list(wheels.glob("liger_kernel-*.whl")) else []
        command = [self.python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                   "--retries", "0", "--timeout", "5", *source, "liger-kernel"]
        log = self.folder / "liger.log"
        code = self.timed(phase, min(PHASE_LIMITS_S["liger"], self.left_s()), command, log)
        last_line = (log.read_text().strip().splitlines() or [""])[-1]
        log.unlink()  # its outcome goes into the summary
        phase.note = "installed" if code == 0 else f"not installed, the run goes on without Liger: {last_line[:200]}"

    def report_env(self) -> bool:
        phase = self.phase("env")
        command = [self.python, str(Path(__file__).resolve()), "--env-report", str(self.folder)]
        if self.dry_run:
            command.append("--dry-run")
        log = self.folder / "env.log"
        code = self.timed(phase, min(PHASE_LIMITS_S["env"], self.left_s()), command, log)
        output = log.read_text()
        log.unlink()
        if code != 0 or not (self.folder / "env.json").exists():
            phase.note = output.strip().splitlines()[-1] if output.strip() else "no output"
            return False
        metadata = json.loads((self.folder / "env.json").read_text())
        phase.note = f"copy bandwidth {metadata['copy_bandwidth_gbps']:.1f} GB/s"
        self._rename(metadata["result_folder"])
        return True

    def _rename(self, name: str) -> None:
        target, n = self.args.out / name, 1
        while target.exists():
            n += 1
            target = self.args.out / f"{name}-{n}"
        self.folder = self.folder.rename(target)

    def run_tests(self) -> None:
        phase = self.phase("tests")
        log = self.folder / "tests.log"
        limit_s = min(PHASE_LIMITS_S["tests"], self.left_s(SUMMARY_RESERVE_S))
        base = [self.python, "-m", "pytest", "-p", "no:cacheprovider", "-rfE"]
        if self.dry_run:
            self.timed(phase, limit_s, [*base, "-q", *DRY_RUN_TESTS], log)
            return
        env = {**self.env, "TORCHINDUCTOR_COMPILE_THREADS": "1"}  # xdist workers, not Inductor's pools, in parallel
        if importlib.util.find_spec("xdist") is not None:
            base += ["-n", str(min(8, os.cpu_count() or 1))]
        if importlib.util.find_spec("pytest_timeout") is not None:
            base += ["--timeout", "120"]
        commands = [[*base, "-v", *GPU_TESTS]]
        others = _gpu_marked_files_outside(GPU_TESTS)
        if others:
            commands.append([*base, "-v", "-m", "gpu", *others])
        started, worst, timed_out = time.monotonic(), 0, False
        phase.limit_s = round(limit_s)
        for command in commands:
            code, timed_out = run_logged(command, log, limit_s - (time.monotonic() - started), env, echo=False)
            worst = max(worst, code)
            if timed_out:
                break
        phase.seconds = round(time.monotonic() - started, 1)
        phase.status = _status(worst, timed_out)

    def run_bench(self) -> None:
        phase = self.phase("bench")
        passes = [p for p in BENCH_PASSES if p.name in self.args.passes]
        log = self.folder / "bench.log"
        scratch = Path(tempfile.mkdtemp(prefix="gpu_check_bench-"))
        started = time.monotonic()
        audit_s = self.audit_limit_s() if "audit" not in self.args.skip and self.has_audit() else 0.0
        length_s = self.left_s(audit_s + SUMMARY_RESERVE_S)
        phase.limit_s = round(length_s)
        documents, outcomes = [], []
        for bench_pass in passes:
            hard_s = started + bench_pass.share * length_s - time.monotonic()
            soft_s = hard_s - PASS_MARGIN_S[self.kind]
            if soft_s < 1:
                outcomes.append(f"{bench_pass.name}: not started (no time left)")
                continue
            json_path = scratch / f"{bench_pass.name}.json"
            command = [self.python, "-m", "normlayers.bench", *bench_pass.args, *bench_pass.provider_args(),
                       *(bench_pass.dry_run_args if self.dry_run else ()), *TIMING[self.kind],
                       "--device", "cpu" if self.dry_run else "cuda", "--time-limit", f"{soft_s:.0f}", "--quiet",
                       "--json", str(json_path)]
            code, timed_out = run_logged(command, log, hard_s, self.env, echo=False)
            outcomes.append(f"{bench_pass.name}: {_status(code, timed_out)}")
            if json_path.exists():
                document = json.loads(json_path.read_text())
                document["metadata"]["pass"] = bench_pass.name
                documents.append(document)
        shutil.rmtree(scratch, ignore_errors=True)
        phase.seconds = round(time.monotonic() - started, 1)
        phase.note = "; ".join(outcomes)
        if documents:
            write_merged(self.folder, documents)
        failed = not documents or any(not o.endswith(": ok") for o in outcomes)
        phase.status = "ok" if not failed else "failed" if documents else "failed: no results"

    @functools.cache
    def audit_limit_s(self) -> float:
        return DRY_RUN_AUDIT_LIMIT_S if self.dry_run else PHASE_LIMITS_S["audit"]

    def has_audit(self) -> bool:
        """Whether this checkout's ``normlayers-bench`` has ``--audit`` (until it does, the phase is skipped)."""
        from normlayers.bench.cli import build_parser

        return "--audit" in build_parser().format_help()

    def run_audit(self) -> None:
        phase = self.phase("audit")
        if not self.has_audit():
            phase.status, phase.note = "skipped", "normlayers-bench has no --audit yet"
            return
        env = {**self.env, "TRITON_INTERPRET": "1"}  # the audit measures under the interpreter, also beside a GPU
        # The launch table only (about 80 s on one CPU core): the byte and sm_90 tables do not depend on the machine,
        # take minutes, and are committed from CI's (benchmarks/results/*_static_interpreter_audit.md).
        self.timed(phase, min(self.audit_limit_s(), self.left_s(SUMMARY_RESERVE_S)),
                   [self.python, "-m", "normlayers.bench", "--audit", "--audit-sections", "launches"],
                   self.folder / "audit.txt", env,
                   echo=False)

    # -- the whole run --------------------------------------------------------------------------------------------

    def main(self) -> int:
        self.install_liger()
        if self.report_env():
            for name, run in (("tests", self.run_tests), ("bench", self.run_bench), ("audit", self.run_audit)):
                if name in self.args.skip:
                    self.phases.append(Phase(name, status="skipped", note="--skip"))
                else:
                    run()
        summary = write_summary(self.folder, self.phases, self.args, time.monotonic() - self.started)
        print("\n" + summary)
        if os.environ.get("OUT"):
            destination = Path(os.environ["OUT"]) / self.folder.name
            shutil.copytree(self.folder, destination, dirs_exist_ok=True)
            print(f"copied to {destination}")
        print(f"result folder: {self.folder}")
        # 1 when a phase failed or ran out of time; Liger missing is not a failure, the run goes on without it
        return int(any(p.status not in ("ok", "skipped") for p in self.phases if p.name != "liger"))


def _gpu_marked_files_outside(directories: Sequence[str]) -> list[str]:
    """Test files outside ``directories`` that mark tests ``gpu`` (run with ``-m gpu``)."""
    files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if not any(relative.startswith(d + "/") for d in directories) and "mark.gpu" in path.read_text():
            files.append(relative)
    return files


# ----------------------------------------------------------------------------------------------------------------------
# Merging the passes, the summary
# ----------------------------------------------------------------------------------------------------------------------


def write_merged(folder: Path, documents: list[dict]) -> None:
    """``bench.csv`` and ``bench.json``: the passes' results in order, each (op, dtype, mode, shape, provider) once
    (its first measurement); the metadata of the first pass, with each pass's own under ``passes`` (its ``% copy``
    figures are against its own copy bandwidth)."""
    from normlayers.bench.report import write_csv, write_json
    from normlayers.bench.runner import BenchResult

    metadata = {key: value for key, value in documents[0]["metadata"].items() if key != "pass"}
    pass_keys = ("command", "suite", "copy_bandwidth_gbps", "wall_time_s", "time_limit_s", "finished",
                 "cases_planned", "cases_not_run", "providers", "unavailable_providers", "not_applicable")
    metadata["suite"] = "gpu_check"
    metadata["passes"] = {
        d["metadata"]["pass"]: {**{key: d["metadata"].get(key) for key in pass_keys},
                                "cases_run": len({(r["op"], r["dtype"], r["mode"], r["shape"]) for r in d["results"]})}
        for d in documents}
    for key in ("command", "time_limit_s", "cases_planned", "not_applicable", "unavailable_providers"):
        metadata.pop(key, None)
    metadata["providers"] = list(dict.fromkeys(p for d in documents for p in d["metadata"]["providers"]))
    metadata["byte_models"] = {k: v for d in documents for k, v in d["metadata"]["byte_models"].items()}
    metadata["finished"] = all(d["metadata"]["finished"] for d in documents)
    metadata["cases_not_run"] = [c for d in documents for c in d["metadata"]["cases_not_run"]]
    metadata["wall_time_s"] = round(sum(d["metadata"].get("wall_time_s") or 0 for d in documents), 1)
    results, seen = [], set()
    for document in documents:
        for row in document["results"]:
            key = (row["op"], row["dtype"], row["mode"], row["shape"], row["provider"])
            if key not in seen:
                seen.add(key)
                results.append(BenchResult(**row))
    write_csv(folder / "bench.csv", metadata, results)
    write_json(folder / "bench.json", metadata, results)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _test_outcome(log: Path) -> list[str]:
    """pytest's closing lines (or, for a run stopped at its limit, the outcomes counted so far) and its failures, from
    ``tests.log``."""
    if not log.exists():
        return ["- no test log"]
    lines = log.read_text(errors="replace").splitlines()
    closing = [line.strip("= ") for line in lines
               if re.match(r"^(no tests ran|\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b).* in "
                           r"[\d.]+s\b", line.strip("= "))]
    stopped = [line.strip("[]") for line in lines if line.startswith("[gpu_check: stopped")]
    if stopped:  # no closing line from the run that was stopped: count its verbose lines
        counts = collections.Counter(m[1] for line in lines
                                     for m in [re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)] if m)
        closing.append(", ".join(f"{n} {outcome.lower()}" for outcome, n in counts.items()) + " before it was "
                       + stopped[0].removeprefix("gpu_check: "))
    failures = list(dict.fromkeys(m[0] for line in lines for m in [re.search(r"\b(FAILED|ERROR) tests/\S+", line)]
                                  if m))
    return [*(f"- {line}" for line in closing or ["no closing line"]), *(f"- {f}" for f in failures[:40]),
            *([f"- ... and {len(failures) - 40} more"] if len(failures) > 40 else [])]


def _bench_table(document: dict) -> list[str]:
    """Per case: normlayers' time, its share of the copy bandwidth, and each other provider's time ÷ normlayers'."""
    rows = document["results"]
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "normlayers"]
    cases = {}
    for r in rows:
        cases.setdefault((r["op"], r["dtype"], r["mode"], r["shape"]), {})[r["provider"]] = r
    table = []
    for case, by_provider in cases.items():
        ours = by_provider.get("normlayers")
        if ours is None or ours["median_ms"] is None:
            table.append([*case, "-" if ours is None else ours["status"], "-", *("-" for _ in providers)])
            continue
        ratios = []
        for p in providers:
            other = by_provider.get(p)
            ratios.append("-" if other is None or other["median_ms"] is None else
                          f"{other['median_ms'] / ours['median_ms']:.2f}x" + ("" if other["status"] == "ok" else "*"))
        table.append([*case, f"{ours['median_ms']:.4g}" + ("" if ours["status"] == "ok" else f" {ours['status']}"),
                      f"{ours['pct_of_copy']:.0f}", *ratios])
    header = ["op", "dtype", "mode", "shape", "normlayers ms", "% copy", *(f"vs {p}" for p in providers)]
    return _markdown_table(header, table)


def write_summary(folder: Path, phases: list[Phase], args: argparse.Namespace, seconds: float) -> str:
    """Write ``summary.md``; return it less its per-case table, for the console (whose tail is what a remote call
    shows)."""
    head = [f"# gpu_check {'--dry-run ' if args.dry_run else ''}({folder.name})", "",
            f"`tools/gpu_check.sh {' '.join(args.argv)}`: {seconds:.0f} s of a {args.budget:.0f} s budget.", ""]
    env_path = folder / "env.json"
    if env_path.exists():
        env = json.loads(env_path.read_text())
        head += ["## Environment", "",
                 f"- device: {env['device_name']} ({env['device_type']}"
                 + (f", sm_{env['capability'].replace('.', '')}, {env['sm_count']} SMs, "
                    f"{env['memory_bytes'] / 2**30:.0f} GiB" if env["device_type"] == "cuda" else "") + ")",
                 f"- python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']},"
                 f" normlayers {env['normlayers']}, git {env['git_sha']}{' (dirty)' if env['git_dirty'] else ''}",
                 f"- driver and clocks: {env.get('nvidia_smi')}",
                 f"- peers: {', '.join(f'{k} {v}' for k, v in env['peers'].items() if v) or 'none'}",
                 f"- copy bandwidth: {env['copy_bandwidth_gbps']:.1f} GB/s (dst.copy_(src), "
                 f"{env['copy_buffer_bytes'] // 2**20} MiB each way, read + write counted)", ""]
    head += ["## Phases", "", *_markdown_table(
        ["phase", "status", "seconds", "limit s", "note"],
        [[p.name, p.status, f"{p.seconds:g}", "-" if p.limit_s is None else str(p.limit_s), p.note] for p in phases]),
        ""]
    if any(p.name == "tests" for p in phases):
        head += ["## Tests (tests.log)", "", *_test_outcome(folder / "tests.log"), ""]
    table, problems = [], []
    bench_path = folder / "bench.json"
    if bench_path.exists():
        document = json.loads(bench_path.read_text())
        metadata = document["metadata"]
        head += ["## Bench (bench.csv, bench.json, bench.log)", "",
                 *(f"- pass {name}: {p['wall_time_s']} s, {p['cases_run']} of {p['cases_planned']} cases"
                   f"{'' if p['finished'] else ' (killed at its limit)'}; copy bandwidth "
                   f"{p['copy_bandwidth_gbps']:.1f} GB/s; `{' '.join(p['command'])}`"
                   for name, p in metadata["passes"].items()),
                 f"- {len(metadata['cases_not_run'])} cases not run for lack of time"
                 + (f" (first: {metadata['cases_not_run'][0]})" if metadata["cases_not_run"] else ""), ""]
        table = ["'vs X' = X's time ÷ normlayers' time (above 1: normlayers is faster); * = X out of tolerance.", "",
                 *_bench_table(document), ""]
        problems = [f"- {r['op']} {r['dtype']} {r['mode']} {r['shape']} {r['provider']}: {r['status']} {r['note']}"
                    for r in document["results"] if r["status"] in ("WRONG", "failed")]
        problems = ["Wrong or failed:", "", *problems, ""] if problems else []
    (folder / "summary.md").write_text("\n".join(head + table + problems))
    return "\n".join(head + problems + (["The per-case table is in summary.md."] if table else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Phases and files: see benchmarks/README.md (One call on a GPU).")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: tiny shapes, the interpreter, no install")
    parser.add_argument("--out", type=Path, help="where the <date>_<device> folder goes (default benchmarks/results; "
                                                 "bench-out with --dry-run)")
    parser.add_argument("--budget", type=float, default=450.0, metavar="S",
                        help="seconds for the whole run (default 450: 7.5 minutes)")
    parser.add_argument("--skip", nargs="+", default=[], choices=SKIPPABLE, metavar="PHASE",
                        help=f"phases not to run, from: {', '.join(SKIPPABLE)} (e.g. a second call for more bench)")
    pass_names = [p.name for p in BENCH_PASSES]
    parser.add_argument("--passes", nargs="+", default=[p.name for p in BENCH_PASSES if p.by_default],
                        choices=pass_names, metavar="PASS",
                        help=f"the bench passes to run, in this order: {', '.join(pass_names)} (default: "
                             f"{', '.join(p.name for p in BENCH_PASSES if p.by_default)}; the others, each suite at "
                             "all its shapes, for a second call)")
    parser.add_argument("--env-report", type=Path, metavar="DIR", help=argparse.SUPPRESS)  # the env phase's process
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.env_report is not None:
        return env_report(args.env_report, args.dry_run)
    args.argv = argv
    args.out = (args.out or ROOT / ("bench-out" if args.dry_run else "benchmarks/results")).resolve()
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
