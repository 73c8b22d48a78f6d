"""Helpers of the CPU-tier tests: run a functional call on one backend and collect its results."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import pytest
import torch

import normlayers
from normlayers.testing import assert_close, assert_lowprec_close


def run_backend(backend_name: str, fn: Callable[..., object], tensors: Sequence[torch.Tensor],
                buffers: Sequence[torch.Tensor] = (), seed: int = 7) -> list[torch.Tensor]:
    """``fn(*leaves, *buffer_copies)`` on ``backend_name`` with fresh leaves (fresh buffer copies), then a backward
    with seeded N(0, 1) output gradients: ``[*outputs, *input gradients, *buffers after the call]``."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    buffer_copies = [b.clone() for b in buffers]
    with normlayers.backend(backend_name):
        outputs = fn(*leaves, *buffer_copies)
        outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
        generator = torch.Generator().manual_seed(seed)
        grads_out = [torch.randn(o.shape, generator=generator).to(o.dtype) for o in outputs]
        grads = torch.autograd.grad(outputs, leaves, grads_out, allow_unused=True)
    return [*(o.detach() for o in outputs), *grads, *buffer_copies]


def assert_cpu_tier_matches_reference(fn: Callable[..., object], tensors: Sequence[torch.Tensor],
                                      buffers: Sequence[torch.Tensor] = ()) -> None:
    """The CPU tier (backend "auto" on CPU) against the reference: outputs, every gradient and the buffers after the
    call. fp32/fp64: the tolerance table; bf16/fp16: at most twice as far from the fp64 reference as the reference
    itself run in that dtype (which rounds once), plus the table's atol."""
    ours = run_backend("auto", fn, tensors, buffers)
    reference = run_backend("reference", fn, tensors, buffers)
    low_precision = any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)
    reference64 = run_backend("reference", fn, [t.double() if t.is_floating_point() else t for t in tensors],
                              [b.double() if b.is_floating_point() else b for b in buffers]) if low_precision else None
    for i, (a, b) in enumerate(zip(ours, reference)):
        assert (a is None) == (b is None), f"result {i}: a gradient on one side only"
        if a is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"result {i}: {a.dtype}{list(a.shape)} vs {b.dtype}" \
                                                           f"{list(b.shape)}"
        if not a.is_floating_point():
            assert torch.equal(a, b), f"result {i}"
        elif a.dtype in (torch.bfloat16, torch.float16):
            assert_lowprec_close(a, b, reference64[i], msg=f"result {i}")
        else:
            assert_close(a, b, msg=f"result {i}")


@pytest.fixture(autouse=True)
def _auto_backend():
    with normlayers.backend("auto"):
        yield


def use_autograd_node(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the compiled kernels' training calls run through the C++ autograd node (``kind="cpp"``,
    cpu/csrc/autograd.cpp; skipped where it cannot be built) or the Python autograd.Function (``"python"``, what runs
    where it cannot)."""
    from normlayers.cpu import _extension, _native

    if kind == "cpp" and _native.enabled() and _extension.module() is None:
        reason = "the C++ autograd node could not be built here (no ninja or C++ compiler)"
        if os.environ.get("CI") == "true":  # CI has both (.ci/run checks): a failed build is a failure there
            pytest.fail(reason)
        pytest.skip(reason)
    if kind == "python":
        monkeypatch.setattr(_extension, "module", lambda: None)
