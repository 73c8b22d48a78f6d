"""``normlayers-bench``: compare row-norm implementations for speed and accuracy.

For every (op, dtype, mode, shape) and provider: check outputs (and gradients) against an fp64 reference, time the
call (median, p20, p80), and turn the time into achieved GB/s through an explicit byte model and a percentage of the
device's measured copy bandwidth. Prints a table, writes CSV and JSON under ``--out``.

Examples::

    normlayers-bench                                   # the default suite for this machine
    normlayers-bench --op rms_norm --dtype bf16 --mode fwd bwd --shapes 4096x8192 16384x4096
    normlayers-bench --list                            # ops, providers (and which can run here), byte models
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

import normlayers
from normlayers.bench.accuracy import RULE
from normlayers.bench.ops import MODES, OPS, traffic_formula
from normlayers.bench.providers import PROVIDERS, Provider
from normlayers.bench.report import collect_metadata, device_name, format_case_table, output_stem, write_results
from normlayers.bench.runner import BenchResult, Case, RunSettings, run_case
from normlayers.bench.timing import make_timer, measure_copy_bandwidth

__all__ = ["main"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_OUT = Path("bench-out")
MODE_HELP = {
    "fwd": "forward only, no autograd graph (inference)",
    "bwd": "backward only, of one untimed training forward",
    "fwd_bwd": "training forward + backward",
}


@dataclass(frozen=True)
class Suite:
    """The grid and time budgets used for every option left out on the command line."""

    ops: tuple[str, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    warmup_ms: float
    rep_ms: float


DEFAULT_SUITES = {
    "cuda": Suite(ops=("rms_norm", "layer_norm"), dtypes=("bf16",), modes=("fwd", "fwd_bwd"),
                  shapes=((4096, 1024), (4096, 4096), (4096, 8192), (4096, 16384)), warmup_ms=25, rep_ms=100),
    # Small enough to finish in well under two minutes on a 2-core machine, torch.compile's first compile included.
    "cpu": Suite(ops=("rms_norm", "layer_norm"), dtypes=("fp32",), modes=("fwd", "fwd_bwd"),
                 shapes=((256, 1024), (1024, 4096)), warmup_ms=5, rep_ms=50),
}


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x8192"`` → ``(4096, 8192)``: rows × normalized width, both positive."""
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if match is None or 0 in (int(match[1]), int(match[2])):
        raise argparse.ArgumentTypeError(
            f"bad shape {text!r}: expected ROWSxCOLS with positive integers, e.g. 4096x8192")
    return int(match[1]), int(match[2])


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of milliseconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlayers-bench", description=__doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options left out take the default suite of the device (see --list).")
    parser.add_argument("--op", nargs="+", choices=list(OPS), metavar="OP",
                        help=f"ops to run, from: {', '.join(OPS)}")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="input/parameter dtypes")
    parser.add_argument("--mode", nargs="+", choices=MODES, help="; ".join(f"{m}: {h}" for m, h in MODE_HELP.items()))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="ROWSxCOLS",
                        help="input shapes, normalized over COLS, e.g. 4096x8192")
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), metavar="PROVIDER",
                        help=f"from: {', '.join(PROVIDERS)} (default: all that can run here)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available, else CPU")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for the run (torch.set_num_threads; default: torch's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"directory for CSV/JSON (default {DEFAULT_OUT})")
    parser.add_argument("--warmup-ms", type=_positive_ms, help="untimed warmup per call site, ms")
    parser.add_argument("--rep-ms", type=_positive_ms, help="timed budget per call site, ms (at least 10 calls)")
    parser.add_argument("--list", action="store_true", help="list ops, byte models, providers and the default suite")
    return parser


def _resolve_device(parser: argparse.ArgumentParser, choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice, torch.cuda.current_device()) if choice == "cuda" else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------------
# --list
# ----------------------------------------------------------------------------------------------------------------------


def _listing(device: torch.device, suite: Suite) -> str:
    lines = [f"device: {device.type} ({device_name(device)})", "", "ops and their byte models (M rows, N columns):"]
    for name in OPS:
        lines.append(f"  {name}")
        lines += [f"    {mode:8s} {traffic_formula(OPS[name], mode)}" for mode in MODES]
    lines += ["", "modes:"] + [f"  {mode:8s} {text}" for mode, text in MODE_HELP.items()]
    lines += ["", f"dtypes: {', '.join(DTYPES)}", "", "providers:"]
    for provider in PROVIDERS.values():
        reason = provider.unavailable_reason(device)
        lines.append(f"  {provider.name:11s} {provider.description}" + (f"  [unavailable: {reason}]" if reason else ""))
    shapes = " ".join(f"{m}x{n}" for m, n in suite.shapes)
    lines += ["", f"default suite on {device.type}: --op {' '.join(suite.ops)} --dtype {' '.join(suite.dtypes)} "
                  f"--mode {' '.join(suite.modes)} --shapes {shapes} "
                  f"--warmup-ms {suite.warmup_ms:g} --rep-ms {suite.rep_ms:g}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def _split_available(names: Sequence[str], device: torch.device) -> tuple[list[Provider], dict[str, str]]:
    """The providers that can run on ``device``, and the reasons of those that cannot."""
    available, unavailable = [], {}
    for name in names:
        reason = PROVIDERS[name].unavailable_reason(device)
        if reason is None:
            available.append(PROVIDERS[name])
        else:
            unavailable[name] = reason
    return available, unavailable


def _cases(ops: Sequence[str], dtypes: Sequence[str], modes: Sequence[str],
           shapes: Sequence[tuple[int, int]]) -> list[Case]:
    return [Case(OPS[op], dtype, DTYPES[dtype], mode, rows, cols)
            for op, dtype, mode, (rows, cols) in itertools.product(ops, dtypes, modes, shapes)]


def _header(metadata: dict, unavailable: dict[str, str]) -> str:
    lines = [
        f"normlayers-bench (row norms) on {metadata['device_type']}: {metadata['device_name']}",
        f"torch {metadata['torch']}, triton {metadata['triton']}, normlayers {metadata['normlayers']}, "
        f"git {metadata['git_sha'] or 'unknown'}{' (dirty)' if metadata['git_dirty'] else ''}",
        f"copy bandwidth: {metadata['copy_bandwidth_gbps']:.1f} GB/s "
        f"(dst.copy_(src), {metadata['copy_buffer_bytes'] // 2**20} MiB, read + write counted)",
        f"timer: {metadata['timer']}; warmup {metadata['warmup_ms']:g} ms, timed {metadata['rep_ms']:g} ms per call "
        f"site; {metadata['torch_num_threads']} CPU threads",
        f"accuracy vs fp64 reference: {RULE}",
        "speed-ups: only for correct results, against a correct torch result",
    ]
    if unavailable:
        lines.append("unavailable providers: " + ", ".join(f"{n} ({r})" for n, r in unavailable.items()))
    return "\n".join(lines)


def _exit_code(results: Sequence[BenchResult]) -> int:
    """1 when normlayers itself gave a wrong answer or failed, else 0 (peers' failures are reported, not fatal)."""
    return int(any(r.provider == "normlayers" and r.status in ("WRONG", "failed") for r in results))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``normlayers-bench`` and ``python -m normlayers.bench``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _resolve_device(parser, args.device)
    suite = DEFAULT_SUITES[device.type]
    if args.list:
        print(_listing(device, suite))
        return 0

    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads_before)
    try:
        return _run(args, device, suite, command=[parser.prog, *(sys.argv[1:] if argv is None else argv)])
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, device: torch.device, suite: Suite, command: list[str]) -> int:
    """Measure the copy bandwidth, run every case, print the tables and write the files."""
    started = time.perf_counter()
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else suite.warmup_ms
    rep_ms = args.rep_ms if args.rep_ms is not None else suite.rep_ms
    timer = make_timer(device)
    copy_gbps, copy_bytes = measure_copy_bandwidth(device, timer, warmup_ms, rep_ms)
    providers, unavailable = _split_available(args.providers or list(PROVIDERS), device)
    cases = _cases(args.op or suite.ops, args.dtype or suite.dtypes, args.mode or suite.modes,
                   args.shapes or suite.shapes)
    byte_models = {f"{c.op.name}/{c.mode}": traffic_formula(c.op, c.mode) for c in cases}
    metadata = collect_metadata(device, copy_gbps, copy_bytes, timer.description, {
        "warmup_ms": warmup_ms, "rep_ms": rep_ms, "command": command, "providers": [p.name for p in providers],
        "unavailable_providers": unavailable, "accuracy_rule": RULE, "byte_models": byte_models})
    print(_header(metadata, unavailable), flush=True)

    settings = RunSettings(device, timer, warmup_ms, rep_ms, copy_gbps)
    results: list[BenchResult] = []
    with normlayers.backend("auto"):
        for case in cases:
            case_results = run_case(case, providers, settings)
            print("\n" + format_case_table(case_results), flush=True)
            results += case_results

    metadata["wall_time_s"] = round(time.perf_counter() - started, 1)
    csv_path, json_path = write_results(args.out, output_stem(device, datetime.date.today()), metadata, results)
    print(f"\nwrote {csv_path} and {json_path} ({len(results)} results, {metadata['wall_time_s']} s)")
    return _exit_code(results)
