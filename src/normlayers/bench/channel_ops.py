"""The channels-first norms in the benchmark: LayerNorm2d and RMSNorm2d (normalizing over C at each pixel).

Arguments, as ``normlayers.functional`` takes them: ``(x, weight, [bias,] eps)`` with ``x`` an NCHW activation.
The torch provider runs timm's eager math (timm/layers/norm.py, fast_norm.py): LayerNorm2d as ``permute`` +
``F.layer_norm`` + ``permute`` (ATen copies the permuted NCHW view to run it), RMSNorm2d as the mean square over
``dim=1`` in the input's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import normlayers.functional
from normlayers.bench.ops import NCHW, Op, OpInputs, RandomInputs, Shape, Transfer, read, write
from normlayers.reference import channel_norms as reference

__all__ = ["OPS"]

EPS = 1e-6  # timm's default for both

ACTIVATION_SHAPES = {
    # ConvNeXt-T's four stages at batch 32 (widths 96-768), and ConvNeXt-XL's widest stage (C = 2048).
    "cuda": ((32, 96, 56, 56), (32, 192, 28, 28), (32, 384, 14, 14), (32, 768, 7, 7), (32, 2048, 7, 7)),
    "cpu": ((4, 96, 28, 28), (4, 768, 7, 7)),
}


def _inputs(has_bias: bool) -> Callable[[Shape, RandomInputs], OpInputs]:
    """``x``, ``dy`` ~ N(0, 1); ``weight`` ~ 1 + 0.1·N(0, 1); ``bias`` ~ 0.1·N(0, 1); all in the benchmark dtype."""

    def make(shape: Shape, rand: RandomInputs) -> OpInputs:
        n, c, h, w = shape
        x = rand.normal(n, c, h, w, grad=True)
        weight = rand.normal(c, scale=0.1, shift=1.0, grad=True)
        params = (weight, rand.normal(c, scale=0.1, grad=True)) if has_bias else (weight,)
        grads = {"dx": 0, "dweight": 1, **({"dbias": 2} if has_bias else {})}
        return OpInputs((x, *params, EPS), grads, rand.grad_outputs(shape))

    return make


def _timm_layer_norm2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, eps).permute(0, 3, 1, 2)


def _timm_rms_norm2d(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps) * weight.reshape(1, -1, 1, 1)


def _forward_traffic(stats: tuple[str, ...], has_bias: bool) -> Callable[[bool], list[Transfer]]:
    def forward(training: bool) -> list[Transfer]:
        transfers = [read("x", "NxCxHxW"), read("weight", "C")] + ([read("bias", "C")] if has_bias else [])
        transfers += [write("y", "NxCxHxW")]
        if training:  # the per-pixel statistics the backward reads
            transfers += [write(stat, "NxHxW", fp32=True) for stat in stats]
        return transfers

    return forward


def _backward_traffic(stats: tuple[str, ...], has_bias: bool) -> Callable[[], list[Transfer]]:
    def backward() -> list[Transfer]:
        transfers = [read("x", "NxCxHxW"), read("dy", "NxCxHxW"), read("weight", "C")]
        transfers += [read(stat, "NxHxW", fp32=True) for stat in stats]
        transfers += [write("dx", "NxCxHxW"), write("dweight", "C")]
        return transfers + ([write("dbias", "C")] if has_bias else [])

    return backward


def _op(name: str, stats: tuple[str, ...], has_bias: bool, reference_fn: Callable[..., Tensor],
        normlayers_fn: Callable[..., Tensor], native: Callable[..., Tensor], note: str) -> Op:
    return Op(name=name, family="channel_norms", shape_kind=NCHW, default_shapes=ACTIVATION_SHAPES,
              make_inputs=_inputs(has_bias), output_names=("y",), reference=reference_fn,
              normlayers=normlayers_fn, native=native, native_note=note,
              forward_traffic=_forward_traffic(stats, has_bias), backward_traffic=_backward_traffic(stats, has_bias))


OPS = (
    _op("layer_norm2d", ("mean", "rstd"), True, reference.layer_norm2d, normlayers.functional.layer_norm2d,
        _timm_layer_norm2d, "timm's LayerNorm2d: permute + F.layer_norm + permute"),
    _op("rms_norm2d", ("rstd",), False, reference.rms_norm2d, normlayers.functional.rms_norm2d, _timm_rms_norm2d,
        "timm's rms_norm2d: mean of x² over dim 1 in the input dtype"),
)
