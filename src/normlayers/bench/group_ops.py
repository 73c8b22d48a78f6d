"""GroupNorm in the benchmark, alone and with the SiLU that follows it in every ResNet block of a diffusion UNet or
VAE, in NCHW and in channels-last (the ``_cl`` ops: input and output gradient channels-last).

Arguments, as ``normlayers.functional.group_norm`` takes them: ``(x, num_groups, weight, bias, eps, act)``, with
``G = 32`` groups (the UNet/VAE default), so ``C`` must be a multiple of 32. The torch provider runs
``F.group_norm`` then ``F.silu``, eagerly: what ``nn.GroupNorm`` followed by ``nn.SiLU`` runs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import normlayers.functional
from normlayers.bench.cnn_ops import GROUPS, _group_count, _groups_divide
from normlayers.bench.ops import NCHW, Op, OpInputs, RandomInputs, Shape, Transfer, read, write
from normlayers.reference import group_norm as reference

__all__ = ["OPS"]

EPS = 1e-5  # nn.GroupNorm's default

ACTIVATION_SHAPES = {
    # Stable Diffusion's UNet at 512x512 (latents 64x64, its 320-channel stage, batch 2 for guidance), its VAE
    # decoder's 512-channel 128x128 stage at batch 1, and the UNet's 1280-channel 8x8 bottleneck at batch 8.
    "cuda": ((2, 320, 64, 64), (1, 512, 128, 128), (8, 1280, 8, 8)),
    "cpu": ((2, 64, 16, 16), (1, 128, 32, 32)),
}


def _inputs(act: Optional[str], channels_last: bool) -> Callable[[Shape, RandomInputs], OpInputs]:
    """``x``, ``dy`` ~ N(0, 1); ``weight`` ~ 1 + 0.1·N(0, 1); ``bias`` ~ 0.1·N(0, 1); all in the benchmark dtype."""
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def make(shape: Shape, rand: RandomInputs) -> OpInputs:
        n, c, h, w = shape
        x = rand.normal(n, c, h, w).contiguous(memory_format=layout).requires_grad_(rand.training)
        weight = rand.normal(c, scale=0.1, shift=1.0, grad=True)
        bias = rand.normal(c, scale=0.1, grad=True)
        grad_outputs = tuple(g.contiguous(memory_format=layout) for g in rand.grad_outputs(shape))
        return OpInputs((x, GROUPS, weight, bias, EPS, act), {"dx": 0, "dweight": 2, "dbias": 3}, grad_outputs)

    return make


def _torch(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float, act: Optional[str]) -> Tensor:
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return y if act is None else reference.ACTIVATIONS[act](y)


def _forward(training: bool) -> list[Transfer]:
    transfers = [read("x", "NxCxHxW"), read("weight", "C"), read("bias", "C"), write("y", "NxCxHxW")]
    if training:  # the per-group statistics the backward reads
        transfers += [write("mean", "NxG", fp32=True), write("rstd", "NxG", fp32=True)]
    return transfers


def _backward() -> list[Transfer]:
    # The bias is read again: the activation's derivative is taken at the recomputed pre-activation.
    return [read("x", "NxCxHxW"), read("dy", "NxCxHxW"), read("weight", "C"), read("bias", "C"),
            read("mean", "NxG", fp32=True), read("rstd", "NxG", fp32=True), write("dx", "NxCxHxW"),
            write("dweight", "C"), write("dbias", "C")]


def _op(act: Optional[str], channels_last: bool) -> Op:
    name = "group_norm" + (f"_{act}" if act else "") + ("_cl" if channels_last else "")
    note = "F.group_norm" + (f" then F.{act}" if act else "") + (", channels-last" if channels_last else "")
    return Op(name=name, family="group_norm", shape_kind=NCHW, default_shapes=ACTIVATION_SHAPES,
              make_inputs=_inputs(act, channels_last), output_names=("y",), reference=reference.group_norm,
              normlayers=normlayers.functional.group_norm, native=_torch, native_note=note,
              forward_traffic=_forward, backward_traffic=_backward, extra_sizes=_group_count,
              check_shape=_groups_divide)


OPS = tuple(_op(act, channels_last) for act in (None, "silu") for channels_last in (False, True))
