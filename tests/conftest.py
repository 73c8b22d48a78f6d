"""Test set-up: the Triton interpreter on machines without CUDA, the device to test on, hypothesis profiles.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (README's `-n auto`) each worker is its own process: give each its share of the cores, so the
# workers' ATen thread pools together do not oversubscribe the machine (a 2-core machine runs 2 one-thread workers).
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS))


def _round_bf16_like_the_gpu() -> None:
    """Make the Triton interpreter round float → bf16 casts to nearest-even, as compiled kernels do.

    The interpreter (triton 3.9, ``InterpreterBuilder.cast_impl``) converts fp32 → bf16 by truncating the mantissa
    (and fp64 → bf16 by an integer ``astype``), where a GPU's ``arith.truncf`` rounds to nearest even. Without this,
    every bf16 output of a kernel is up to one ulp low under the interpreter and the bf16 checks would test the
    interpreter, not our kernels. Only these casts are replaced; all others go to triton's own code.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float64):
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_like_the_gpu()

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" (the default): derandomized, so every run checks the same 100 generated examples (plus each test's explicit
# @examples) and a failure reproduces; 100 keeps the property tests under a minute under the Triton interpreter.
# "dev": random examples, 500 per test, for finding new failures locally (docs/testing.md); a failure it finds is
# committed as an @example of its test, so CI keeps checking it.
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present, else CPU (where the kernels run under the Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _restore_backend():
    """Each test starts and ends on the default backend."""
    import normlayers

    previous = normlayers.get_backend()
    yield
    normlayers.set_backend(previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# CI's timm leg sets NORMLAYERS_REQUIRE_TIMM=1: there the timm tests must run, so a skipped one fails the session.
_REQUIRE_TIMM = os.environ.get("NORMLAYERS_REQUIRE_TIMM") == "1"
_timm_outcomes: dict[str, list[str]] = {"passed": [], "skipped": []}


def _is_timm_report(report) -> bool:
    return "/timm/" in report.nodeid.replace("\\", "/") or "timm" in getattr(report, "keywords", {})


def pytest_collectreport(report):
    if _REQUIRE_TIMM and report.skipped and _is_timm_report(report):
        _timm_outcomes["skipped"].append(report.nodeid)


def pytest_runtest_logreport(report):
    if not (_REQUIRE_TIMM and _is_timm_report(report)):
        return
    if report.skipped:
        _timm_outcomes["skipped"].append(report.nodeid)
    elif report.when == "call" and report.passed:
        _timm_outcomes["passed"].append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if not _REQUIRE_TIMM:
        return
    # A session that collects no timm test (a subset, e.g. tools/gpu_check.sh's own test run) has nothing to require.
    skipped, passed = _timm_outcomes["skipped"], _timm_outcomes["passed"]
    if skipped:
        print(f"\nNORMLAYERS_REQUIRE_TIMM=1 but {len(skipped)} timm test(s) skipped and {len(passed)} passed: "
              + ", ".join(skipped[:5]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
