"""Gradients of the row-norm op when some of its outputs get none: the backward receives ``None`` for them (no
zero-filled gradient tensors) and must still give what the reference gives."""

from __future__ import annotations

import pytest
import torch

import normlayers
from normlayers import functional as F
from normlayers.testing import assert_close


def _grads(backend_name, use_normed, use_summed, residual_in_fp32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=gen, requires_grad=True)
    residual = torch.randn(5, 24, generator=gen, requires_grad=True)
    weight = torch.randn(24, generator=gen, requires_grad=True)
    with normlayers.backend(backend_name):
        normed, summed = F.add_rms_norm(x, residual, (24,), weight, 1e-6, residual_in_fp32=residual_in_fp32)
    loss = 0.0
    if use_normed:
        loss = loss + (normed * torch.linspace(-1, 1, 24)).sum()
    if use_summed:
        loss = loss + (summed.float() ** 2).sum()
    loss.backward()
    return x.grad, residual.grad, weight.grad


@pytest.mark.parametrize("use_normed,use_summed", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_gradients_with_unused_outputs(use_normed, use_summed, residual_in_fp32):
    ours = _grads("triton", use_normed, use_summed, residual_in_fp32)
    reference = _grads("reference", use_normed, use_summed, residual_in_fp32)
    for got, want in zip(ours, reference):
        if want is None:
            assert got is None or not got.any()
        else:
            assert_close(got, want)
