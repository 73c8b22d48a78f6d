"""Test set-up: the Triton interpreter on machines without CUDA, the device to test on, hypothesis profiles.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci": a fixed, small set of examples so CI runs are reproducible and bounded; "dev": more, random examples.
settings.register_profile("ci", max_examples=12, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
