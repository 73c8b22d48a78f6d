"""CUDA-only checks of the row norms: compiled kernels (not the interpreter) on realistic shapes, and autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normlayers
from normlayers.testing import assert_close, assert_lowprec_close

pytestmark = pytest.mark.gpu

SHAPES = [(4096, 1024), (1024, 4096), (256, 16384), (16, 65536), (8, 262144), (3, 1), (5, 4097)]


def _torch_norm(kind, x, weight, bias=None):
    n = x.shape[-1]
    if kind == "layer":
        return TF.layer_norm(x, (n,), weight, bias, 1e-5)
    return TF.rms_norm(x, (n,), weight, 1e-5)


def _ours(kind, x, weight, bias=None):
    n = x.shape[-1]
    with normlayers.backend("triton"):
        if kind == "layer":
            return normlayers.functional.layer_norm(x, (n,), weight, bias, 1e-5)
        return normlayers.functional.rms_norm(x, (n,), weight, 1e-5)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_match_torch_on_cuda(kind, m, n, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(m, n, device="cuda", generator=gen) * 2 + 0.5).to(dtype)
    w = (torch.randn(n, device="cuda", generator=gen) * 0.5 + 1).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype) if kind == "layer" else None
    dy = torch.randn(m, n, device="cuda", generator=gen).to(dtype)
    leaves = [t for t in (x, w, b) if t is not None]

    def run(norm, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in leaves]
        y = norm(kind, *inputs)
        return [y.detach(), *torch.autograd.grad(y, inputs, dy.to(dtype))]

    ref64 = run(_torch_norm, torch.float64)
    # Long reductions in fp32 too are judged by the relative rule against torch's own error in the same dtype.
    for ours, theirs, expected in zip(run(_ours, dtype), run(_torch_norm, dtype), ref64):
        assert_lowprec_close(ours, theirs, expected)


@pytest.mark.parametrize("cls,torch_cls", [(normlayers.LayerNorm, torch.nn.LayerNorm),
                                           (normlayers.RMSNorm, torch.nn.RMSNorm)])
def test_autocast_output_dtype_matches_torch(cls, torch_cls):
    ours, theirs = cls(256, device="cuda"), torch_cls(256, device="cuda")
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == y_theirs.dtype
    assert_close(y_ours.float(), y_theirs.float(), dtype=torch.bfloat16)


def test_auto_backend_uses_the_kernels_on_cuda(monkeypatch):
    from normlayers.ops import row_norms as ops

    calls = []
    original = ops.row_norm_fwd
    monkeypatch.setattr(ops, "row_norm_fwd", lambda *a: calls.append(1) or original(*a))
    normlayers.LayerNorm(64, device="cuda")(torch.randn(4, 64, device="cuda"))
    assert calls
