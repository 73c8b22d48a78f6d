"""SPD batch normalization (GBW) in the benchmark: ``B`` SPD matrices of ``N x N``, well conditioned, with an SPD
bias and metric near the identity. Compute-bound (batched eigendecompositions in float64 by default), so its GB/s is
small by nature; it runs plain PyTorch on every backend (no Triton path) and has no torch op. fp16/bf16 are refused by
the layer (``torch.linalg.eigh`` has no half-precision kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor

import normlayers.functional
from normlayers.bench.ops import SPD_MATRICES, Op, OpInputs, RandomInputs, Shape, Transfer, read, write
from normlayers.reference import spd_batch_norm as ref_spd

__all__ = ["OPS"]

MOMENTUM, EPS = 0.1, 1e-5
SHAPES = {"cuda": ((1024, 32), (256, 64)), "cpu": ((64, 16),)}


def _near_identity(rand: RandomInputs, n: int) -> Tensor:
    a = rand.normal(n, n, scale=0.05)
    return (torch.eye(n, device=rand.device, dtype=rand.dtype) + (a + a.mT) / 2).requires_grad_(rand.training)


def _spd_inputs(shape: Shape, rand: RandomInputs) -> OpInputs:
    b, n = shape
    a = rand.normal(b, n, n)
    x = (a @ a.mT / n + 0.5 * torch.eye(n, device=rand.device, dtype=rand.dtype)).requires_grad_(rand.training)
    running_mean = torch.eye(n, device=rand.device, dtype=rand.dtype)
    running_var = torch.ones((), device=rand.device, dtype=rand.dtype)
    shift = torch.ones((), device=rand.device, dtype=rand.dtype).requires_grad_(rand.training)
    args = (x, running_mean, running_var, _near_identity(rand, n), _near_identity(rand, n), shift, rand.training,
            MOMENTUM, EPS)
    grads = {"dx": 0, "dweight": 3, "dmetric": 4, "dshift": 5}
    return OpInputs(args, grads, rand.grad_outputs((b, n, n)), state={"running_mean": 1, "running_var": 2})


def _spd_reference(x, running_mean, running_var, weight, metric, shift, training, momentum, eps) -> Tensor:
    return ref_spd.spd_batch_norm(x, running_mean, running_var, weight, metric, shift, training=training,
                                  momentum=momentum, eps=eps, theta=1.0, variance="frechet", karcher_steps=1,
                                  reference_roundtrip=False, per_channel=False)


def _spd_forward(training: bool) -> list[Transfer]:
    transfers = [read("x", "BxNxN"), read("running_mean", "NxN"), read("weight", "NxN"), read("metric", "NxN"),
                 write("y", "BxNxN")]
    return transfers + ([write("running_mean", "NxN")] if training else [])


def _spd_backward() -> list[Transfer]:
    return [read("x", "BxNxN"), read("dy", "BxNxN"), read("weight", "NxN"), read("metric", "NxN"),
            write("dx", "BxNxN"), write("dweight", "NxN"), write("dmetric", "NxN")]


SPD_BATCH_NORM = Op(
    name="spd_batch_norm", family="spd", shape_kind=SPD_MATRICES, default_shapes=SHAPES,
    make_inputs=_spd_inputs, output_names=("y",), reference=_spd_reference,
    normlayers=normlayers.functional.spd_batch_norm, native_note="no native op: eager reference",
    has_kernels=False, dtypes=(torch.float32,), forward_traffic=_spd_forward, backward_traffic=_spd_backward,
)

OPS = (SPD_BATCH_NORM,)
