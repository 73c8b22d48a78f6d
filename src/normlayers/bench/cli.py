"""``normlayers-bench``: compare normalization-layer implementations for speed, bandwidth, memory and accuracy.

For every (op, dtype, mode, shape) and provider: check outputs, gradients and updated running statistics against an
fp64 reference, time the call (median, p20, p80), and turn the time into achieved GB/s through the op's byte model
and a percentage of the device's copy bandwidth measured in the same run. Prints a table per case, writes CSV + JSON.

Examples::

    normlayers-bench                                   # the default suite for this machine
    normlayers-bench --suite cnn_norms --plot cnn.png
    normlayers-bench --op rms_norm,layer_norm --dtype bf16 --mode fwd,fwd_bwd --shapes 4096x4096,16384x1024 \\
        --providers normlayers,torch,torch_compile,liger --output results.csv --json results.json
    normlayers-bench --suite row_norms --compare benchmarks/results/<earlier run>.json
    normlayers-bench --audit                           # launches, bytes, sm_90 registers/spills (no GPU needed)
    normlayers-bench --list-ops                        # ops, their shapes and byte models (also --list-providers,
                                                       # --list-suites, and --list for all of them)
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import normlayers
from normlayers.bench.accuracy import RULE
from normlayers.bench.audit import add_arguments as add_audit_arguments, run_audit
from normlayers.bench.compare import compare, format_comparison, load_document, regressions
from normlayers.bench.ops import MODES, OPS, Op, Shape, traffic_formula
from normlayers.bench.plot import PLOT_METRICS, matplotlib_missing, plot_results
from normlayers.bench.providers import DEFAULT_PROVIDERS, PROVIDERS, Provider
from normlayers.bench.report import collect_metadata, device_name, format_case_table, free_paths, output_stem, \
    write_csv, write_json
from normlayers.bench.runner import BenchResult, Case, RunSettings, run_case
from normlayers.bench.suites import BUDGETS_MS, SUITES, Suite
from normlayers.bench.timing import make_timer, measure_copy_bandwidth

__all__ = ["DTYPES", "build_parser", "main", "unsupported_dtype_reason"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_OUT = Path("bench-out")
DEFAULT_SUITE = "default"
MODE_HELP = {
    "fwd": "inference forward: eval (running statistics read), no autograd graph",
    "bwd": "backward only, of one untimed training forward",
    "fwd_bwd": "training forward (batch statistics, running statistics updated) + backward",
}


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def _number_type(expected: str, accept: Callable[[float], bool], suffix: str = "") -> Callable[[str], float]:
    """An argparse ``type`` reading a float (an optional ``suffix`` such as ``%`` allowed) that ``accept`` takes."""

    def parse(text: str) -> float:
        try:
            value = float(text[:-len(suffix)] if suffix and text.endswith(suffix) else text)
        except ValueError:
            value = math.nan  # refused by every check below
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_ms = _number_type("a positive number of milliseconds", lambda value: value > 0)
_non_negative_ms = _number_type("a non-negative number of milliseconds", lambda value: value >= 0)
_non_negative_seconds = _number_type("a non-negative number of seconds", lambda value: value >= 0)
_percent = _number_type("a non-negative percentage such as 10 or 10%", lambda value: value >= 0, suffix="%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlayers-bench", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.fill(
            "Lists take commas or spaces (--op rms_norm,layer_norm or --op rms_norm layer_norm). Options left out "
            f"come from the suite (--suite, default {DEFAULT_SUITE!r}); with --op and no --suite or --shapes each op "
            "runs at its own default shapes for the device (see --list-ops). Details: benchmarks/README.md.", 100))
    grid = parser.add_argument_group("what to run")
    grid.add_argument("--suite", choices=list(SUITES), help=f"a named suite (see --list-suites; default "
                                                             f"{DEFAULT_SUITE!r})")
    grid.add_argument("--op", nargs="+", metavar="OP", help="ops, named as in normlayers.functional (see --list-ops)")
    grid.add_argument("--dtype", "--precision", nargs="+", metavar="DTYPE", help=f"from: {', '.join(DTYPES)}")
    grid.add_argument("--mode", nargs="+", metavar="MODE",
                      help="; ".join(f"{m}: {h}" for m, h in MODE_HELP.items()))
    grid.add_argument("--shapes", nargs="+", metavar="SHAPE",
                      help="shapes in each op's form, e.g. 4096x8192 (MxN rows) or 8x256x56x56 (NxCxHxW); "
                           "every shape must fit every selected op")
    grid.add_argument("--providers", nargs="+", metavar="PROVIDER",
                      help=f"from: {', '.join(PROVIDERS)} (default: all that can run here except "
                           f"{', '.join(n for n in PROVIDERS if n not in DEFAULT_PROVIDERS)})")
    grid.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                      help="auto: CUDA when available, else CPU")
    grid.add_argument("--threads", type=int, metavar="N",
                      help="CPU threads for the run (torch.set_num_threads; default: torch's default)")
    grid.add_argument("--warmup-ms", type=_non_negative_ms, help="untimed warmup per call site, ms")
    grid.add_argument("--rep-ms", type=_positive_ms, help="timed budget per call site, ms (at least 10 calls)")
    grid.add_argument("--time-limit", type=_non_negative_seconds, metavar="S",
                      help="start no case after S seconds (the case in progress finishes); the cases left are "
                           "listed in the JSON's metadata. The files are rewritten after every case anyway, so "
                           "a run that is killed keeps what it measured")
    out = parser.add_argument_group("output")
    out.add_argument("--output", type=Path, metavar="FILE.csv", help="write the CSV here")
    out.add_argument("--json", type=Path, metavar="FILE.json", help="write the JSON here")
    out.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                     help=f"with neither --output nor --json: write <date>_<device>_<suite>.csv and .json here "
                          f"(default {DEFAULT_OUT})")
    out.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the results (needs matplotlib)")
    out.add_argument("--plot-metric", choices=PLOT_METRICS, default="time", help="what --plot draws (default time)")
    out.add_argument("--compare", type=Path, metavar="OLD.json", help="print the speed-up against an earlier run")
    out.add_argument("--fail-if-regression", type=_percent, metavar="PCT",
                     help="with --compare: exit 1 if a normlayers result got slower by more than PCT percent")
    out.add_argument("--quiet", action="store_true", help="no progress line on stderr (it is shown only on a TTY)")
    audit = parser.add_argument_group("audit (GPU-free: launches, bytes, sm_90 compile; see normlayers.bench.audit)")
    audit.add_argument("--audit", action="store_true", help="print the kernel audit instead of timing anything")
    add_audit_arguments(audit)
    lists = parser.add_argument_group("listings (print and exit)")
    lists.add_argument("--list-ops", action="store_true", help="ops, their shape forms, default shapes, byte models")
    lists.add_argument("--list-providers", action="store_true", help="providers and whether they can run here")
    lists.add_argument("--list-suites", action="store_true", help="the named suites on this device")
    lists.add_argument("--list", action="store_true", help="all of the above, modes and dtypes")
    return parser


def _resolve_device(parser: argparse.ArgumentParser, choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", torch.cuda.current_device()) if choice == "cuda" else torch.device("cpu")


def unsupported_dtype_reason(dtype_name: str, device: torch.device) -> Optional[str]:
    """Why ``dtype_name`` cannot run on ``device``, or ``None``. Every op here has CPU kernels in fp32, fp16 and bf16
    (slow in the low precisions, but correct), so only bf16 on a GPU before compute capability 8.0 is refused."""
    if device.type == "cuda" and dtype_name == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"bf16 is not supported on {device_name(device)} (it needs compute capability 8.0 or newer)"
    return None


def _names(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    """``["a,b", "c"]`` → ``["a", "b", "c"]``: lists may use commas, spaces or both."""
    if values is None:
        return None
    return [name for value in values for name in value.split(",") if name]


def _checked(parser: argparse.ArgumentParser, option: str, names: list[str], known: Sequence[str],
             what: str) -> list[str]:
    for name in names:
        if name not in known:
            parser.error(f"{option}: unknown {what} {name!r}; choose from: {', '.join(known)}")
    if not names:
        parser.error(f"{option}: give at least one {what}")
    return names


@dataclass(frozen=True)
class Plan:
    """The validated run: what to run, and where the results go."""

    suite: str
    cases: list[Case]
    not_applicable: list[str]  # "op dtype" pairs of the grid that the op does not accept
    providers: list[Provider]
    unavailable: dict[str, str]
    warmup_ms: float
    rep_ms: float


def _shapes_for(parser: argparse.ArgumentParser, op: Op, texts: Optional[list[str]], suite: Optional[Suite],
                device: torch.device) -> list[Shape]:
    """``--shapes``, else the suite's shapes for the op's kind, else the op's own defaults for the device."""
    if texts is None and suite is not None:
        texts = suite.shapes.get(device.type, {}).get(op.shape_kind.name)
    if texts is None:
        return list(op.default_shapes[device.type])
    try:
        return [op.parse_shape(text) for text in texts]
    except ValueError as exc:
        parser.error(f"--shapes: {exc}")


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device) -> Plan:
    suite = SUITES[args.suite or DEFAULT_SUITE]
    ops = _checked(parser, "--op", _names(args.op) or list(suite.ops), list(OPS), "op")
    dtypes = _checked(parser, "--dtype", _names(args.dtype) or list(suite.dtypes[device.type]), list(DTYPES),
                      "dtype")
    for dtype_name in dtypes:
        reason = unsupported_dtype_reason(dtype_name, device)
        if reason is not None:
            parser.error(f"--dtype: {reason}")
    modes = _checked(parser, "--mode", _names(args.mode) or list(suite.modes), MODES, "mode")
    provider_names = _checked(parser, "--providers",
                              _names(args.providers) or list(suite.providers or DEFAULT_PROVIDERS), list(PROVIDERS),
                              "provider")
    shape_texts = _names(args.shapes)
    # --op without --suite: each op at its own default shapes (the default suite's shapes may not be of its kind).
    shape_suite = suite if args.op is None or args.suite is not None else None
    shapes = {name: _shapes_for(parser, OPS[name], shape_texts, shape_suite, device) for name in ops}
    cases = [Case(OPS[op], dtype, DTYPES[dtype], mode, shape)
             for op, dtype, mode in itertools.product(ops, dtypes, modes) if DTYPES[dtype] in OPS[op].dtypes
             for shape in shapes[op]]
    not_applicable = [f"{op} {dtype}" for op, dtype in itertools.product(ops, dtypes)
                      if DTYPES[dtype] not in OPS[op].dtypes]
    if not cases:
        parser.error(f"--dtype: nothing to run, the ops do not accept these dtypes ({', '.join(not_applicable)})")

    providers, unavailable = [], {}
    for name in provider_names:
        reason = PROVIDERS[name].unavailable_reason(device)
        if reason is None:
            providers.append(PROVIDERS[name])
        else:
            unavailable[name] = reason
    warmup_default, rep_default = BUDGETS_MS[device.type]
    return Plan(suite=suite.name if args.op is None else "custom", cases=cases, not_applicable=not_applicable,
                providers=providers, unavailable=unavailable,
                warmup_ms=warmup_default if args.warmup_ms is None else args.warmup_ms,
                rep_ms=rep_default if args.rep_ms is None else args.rep_ms)


# ----------------------------------------------------------------------------------------------------------------------
# Listings
# ----------------------------------------------------------------------------------------------------------------------


def _list_ops(device: torch.device) -> list[str]:
    lines = ["ops (shape form; default shapes on this device; byte model per mode):"]
    for op in OPS.values():
        shapes = " ".join(op.shape_kind.format(s) for s in op.default_shapes[device.type])
        lines.append(f"  {op.name}  [{op.family}]  {op.shape_kind.form} ({op.shape_kind.meaning}); default: {shapes}")
        lines += [f"    {mode:8s} {traffic_formula(op, mode)}" for mode in MODES]
    return lines


def _list_providers(device: torch.device) -> list[str]:
    lines = ["providers:"]
    for provider in PROVIDERS.values():
        reason = provider.unavailable_reason(device)
        lines.append(f"  {provider.name:13s} {provider.description}" + (f"  [unavailable: {reason}]" if reason else ""))
    return lines


def _list_suites(device: torch.device) -> list[str]:
    lines = [f"suites on {device.type} (default: {DEFAULT_SUITE}):"]
    for suite in SUITES.values():
        lines.append(f"  {suite.name}: {suite.description}")
        lines.append(f"    --op {','.join(suite.ops)} --dtype {','.join(suite.dtypes[device.type])} "
                     f"--mode {','.join(suite.modes)}")
        for kind, shapes in suite.shapes.get(device.type, {}).items():
            lines.append(f"    {kind} shapes: {','.join(shapes)}")
    warmup, rep = BUDGETS_MS[device.type]
    lines.append(f"  timing budgets on {device.type}: --warmup-ms {warmup:g} --rep-ms {rep:g}")
    return lines


def _listing(args: argparse.Namespace, device: torch.device) -> str:
    lines = [f"device: {device.type} ({device_name(device)})"]
    if args.list or args.list_ops:
        lines += ["", *_list_ops(device)]
    if args.list:
        lines += ["", "modes:", *(f"  {mode:8s} {text}" for mode, text in MODE_HELP.items()), "",
                  f"dtypes: {', '.join(DTYPES)}"]
    if args.list or args.list_providers:
        lines += ["", *_list_providers(device)]
    if args.list or args.list_suites:
        lines += ["", *_list_suites(device)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def _header(metadata: dict, unavailable: dict[str, str], not_applicable: list[str]) -> str:
    lines = [
        f"normlayers-bench (suite {metadata['suite']}) on {metadata['device_type']}: {metadata['device_name']}",
        f"torch {metadata['torch']}, triton {metadata['triton']}, normlayers {metadata['normlayers']}, "
        f"git {metadata['git_sha'] or 'unknown'}{' (dirty)' if metadata['git_dirty'] else ''}",
        f"copy bandwidth: {metadata['copy_bandwidth_gbps']:.1f} GB/s "
        f"(dst.copy_(src), {metadata['copy_buffer_bytes'] // 2**20} MiB, read + write counted)",
        f"timer: {metadata['timer']}; warmup {metadata['warmup_ms']:g} ms, timed {metadata['rep_ms']:g} ms per call "
        f"site; {metadata['torch_num_threads']} CPU threads; load average {metadata['load_average_start']:g} at the "
        f"start",
        f"accuracy vs fp64 reference: {RULE}",
        "speed-ups: torch time / provider time, only for results within the bound; the torch time is the quicker of "
        "the torch and torch_fp32 rows within the bound, else torch's; "
        "peak memory: the most one call allocates beyond its inputs (CUDA allocator statistics; on CPU the profiler's "
        "allocation events)",
    ]
    if unavailable:
        lines.append("unavailable providers: " + ", ".join(f"{n} ({r})" for n, r in unavailable.items()))
    if not_applicable:
        lines.append("not run, the op does not accept the dtype: " + ", ".join(not_applicable))
    return "\n".join(lines)


def _load_average() -> float:
    """The 1-minute load average (other processes competing for the cores: timings on a shared machine need it beside
    them); 0 where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return 0.0


def _exit_code(results: Sequence[BenchResult]) -> int:
    """1 when normlayers itself gave a wrong answer or failed, else 0 (peers' failures are reported, not fatal)."""
    return int(any(r.provider == "normlayers" and r.status in ("WRONG", "failed") for r in results))


def _progress(enabled: bool, text: str) -> None:
    if enabled:
        print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``normlayers-bench`` and ``python -m normlayers.bench``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.audit:
        return run_audit(args)
    device = _resolve_device(parser, args.device)
    if args.list or args.list_ops or args.list_providers or args.list_suites:
        print(_listing(args, device))
        return 0
    plan = _plan(parser, args, device)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.plot is not None and matplotlib_missing():
        parser.error("--plot needs matplotlib, which is not installed: pip install 'normlayers[bench]'")
    if args.fail_if_regression is not None and args.compare is None:
        parser.error("--fail-if-regression needs --compare OLD.json")
    old_document = None
    if args.compare is not None:
        try:
            old_document = load_document(args.compare)
        except ValueError as exc:
            parser.error(f"--compare: {exc}")

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads_before)
    try:
        return _run(args, plan, device, old_document,
                    command=[parser.prog, *(sys.argv[1:] if argv is None else argv)])
    finally:
        torch.set_num_threads(threads_before)


def _case_name(case: Case) -> str:
    return f"{case.op.name} {case.dtype_name} {case.mode} {case.shape_text}"


def _run(args: argparse.Namespace, plan: Plan, device: torch.device, old_document: Optional[dict],
         command: list[str]) -> int:
    """Measure the copy bandwidth, run every case (until ``--time-limit``), print the tables and write the files
    (after every case, so that a run killed part-way keeps what it measured; ``finished`` says whether it ended)."""
    started = time.perf_counter()
    show_progress = not args.quiet and sys.stderr.isatty()
    paths = _output_paths(args, plan, device)
    timer = make_timer(device)
    _progress(show_progress, "measuring the copy bandwidth")
    copy_gbps, copy_bytes = measure_copy_bandwidth(device, timer, plan.warmup_ms, plan.rep_ms)
    byte_models = {f"{c.op.name}/{c.mode}": traffic_formula(c.op, c.mode) for c in plan.cases}
    metadata = collect_metadata(device, copy_gbps, copy_bytes, timer.description, {
        "suite": plan.suite, "warmup_ms": plan.warmup_ms, "rep_ms": plan.rep_ms, "command": command,
        "providers": [p.name for p in plan.providers], "unavailable_providers": plan.unavailable,
        "accuracy_rule": RULE, "byte_models": byte_models, "not_applicable": plan.not_applicable,
        "time_limit_s": args.time_limit, "cases_planned": len(plan.cases), "cases_not_run": [], "finished": False,
        "load_average_start": _load_average(), "load_average_max": _load_average()})
    _progress(show_progress, "")
    print(_header(metadata, plan.unavailable, plan.not_applicable), flush=True)

    settings = RunSettings(device, timer, plan.warmup_ms, plan.rep_ms, copy_gbps)
    results: list[BenchResult] = []
    with normlayers.backend("auto"):
        for i, case in enumerate(plan.cases, 1):
            if args.time_limit is not None and time.perf_counter() - started >= args.time_limit:
                metadata["cases_not_run"] = [_case_name(c) for c in plan.cases[i - 1:]]
                print(f"\ntime limit of {args.time_limit:g} s reached: {len(plan.cases) - i + 1} of "
                      f"{len(plan.cases)} cases not run", flush=True)
                break
            _progress(show_progress, f"[{i}/{len(plan.cases)}] {_case_name(case)}")
            case_results = run_case(case, plan.providers, settings)
            _progress(show_progress, "")
            print("\n" + format_case_table(case_results), flush=True)
            results += case_results
            metadata["wall_time_s"] = round(time.perf_counter() - started, 1)
            metadata["load_average_max"] = max(metadata["load_average_max"], _load_average())
            _write_results(paths, metadata, results)

    metadata["wall_time_s"] = round(time.perf_counter() - started, 1)
    metadata["finished"] = True
    _write_results(paths, metadata, results)
    written = [str(path) for path in paths if path is not None]
    if args.plot is not None:
        plot_results(results, args.plot, args.plot_metric,
                     f"normlayers-bench {plan.suite} on {metadata['device_name']} ({metadata['date']})")
        written.append(str(args.plot))
    print(f"\nwrote {' and '.join(written)} ({len(results)} results, {metadata['wall_time_s']} s)")
    code = _exit_code(results)
    if old_document is not None:
        comparisons = compare(old_document["results"], results)
        print("\n" + format_comparison(comparisons, old_document.get("metadata", {}), metadata, args.compare))
        if args.fail_if_regression is not None:
            regressed = regressions(comparisons, "normlayers", args.fail_if_regression)
            if regressed:
                print(f"{len(regressed)} normlayers result(s) slower by more than {args.fail_if_regression:g}%")
                code = 1
    return code


def _output_paths(args: argparse.Namespace, plan: Plan, device: torch.device) -> tuple[Optional[Path], Optional[Path]]:
    """The CSV and JSON paths (either may be ``None``): ``--output``/``--json``, else new files in ``--out``."""
    if args.output is None and args.json is None:
        csv_path, json_path = free_paths(args.out, output_stem(device, datetime.date.today(), plan.suite),
                                         (".csv", ".json"))
        return csv_path, json_path
    return args.output, args.json


def _write_results(paths: tuple[Optional[Path], Optional[Path]], metadata: dict,
                   results: list[BenchResult]) -> None:
    csv_path, json_path = paths
    if csv_path is not None:
        write_csv(csv_path, metadata, results)
    if json_path is not None:
        write_json(json_path, metadata, results)
