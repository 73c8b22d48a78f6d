"""The CNN norms in the benchmark: Batch-Channel Normalization, the nine EvoNorms, and Weight Standardization.

Activations are ``NxCxHxW``; the grouped norms use ``G = 32`` groups (every layer's default), so ``C`` must be a
multiple of 32. Parameters are in the benchmark dtype; EvoNorm-B's ``running_var`` is fp32, as the module keeps it
(``nn/evo_norm.py``), and BCN's running statistics are in the benchmark dtype, as ``nn.BatchNorm2d`` keeps them.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import normlayers.functional
from normlayers.bench.ops import CONV_WEIGHT, NCHW, Op, OpFn, OpInputs, RandomInputs, Shape, Transfer, read, write
from normlayers.reference import batch_channel as ref_bcn
from normlayers.reference import evo_norm as ref_evo
from normlayers.reference import weight_std as ref_ws

__all__ = ["OPS"]

GROUPS = 32
MOMENTUM = 0.1
BCN_EPS = 1e-5  # both stages, the layer's defaults
WS_VARIANT = normlayers.functional.WS_DEFAULT_VARIANT

ACTIVATION_SHAPES = {
    # ResNet-50 stage outputs at batch 32 (and one smaller batch): the channel-norm shapes kernel benchmarks use.
    "cuda": ((8, 256, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7)),
    "cpu": ((8, 64, 28, 28), (2, 512, 28, 28)),
}
WEIGHT_SHAPES = {
    # ResNet-50 3x3 convs of stages 1-4 and its widest 1x1
    "cuda": ((64, 64, 3, 3), (256, 256, 3, 3), (512, 512, 3, 3), (2048, 512, 1, 1)),
    "cpu": ((64, 64, 3, 3), (256, 256, 3, 3)),
}


def _groups_divide(shape: Shape) -> Optional[str]:
    if shape[1] % GROUPS:
        return f"C = {shape[1]} must be a multiple of the {GROUPS} groups"
    return None


def _no_constraint(shape: Shape) -> Optional[str]:
    return None


def _group_count(shape: Shape) -> dict[str, int]:
    return {"G": GROUPS}


def _default(fn: Callable[..., object], parameter: str) -> object:
    """A default of a functional (so that the benchmark runs each variant with its own eps)."""
    return inspect.signature(fn).parameters[parameter].default


def _per_channel_params(rand: RandomInputs, channels: int, names: tuple[str, ...]) -> list[Tensor]:
    """``weight``-like names ~ 1 + 0.1·N(0, 1), the rest (biases, ``v``) ~ 0.1·N(0, 1), with gradients."""
    return [rand.normal(channels, scale=0.1, shift=1.0 if "weight" in n else 0.0, grad=True) for n in names]


# ----------------------------------------------------------------------------------------------------------------------
# Batch-Channel Normalization
# ----------------------------------------------------------------------------------------------------------------------


def _bcn_inputs(shape: Shape, rand: RandomInputs) -> OpInputs:
    """``x``, ``dy`` ~ N(0, 1); running mean ~ 0.1·N(0, 1) and variance ~ 1 + 0.1·N(0, 1) (plausible for that x)."""
    n, c, h, w = shape
    x = rand.normal(n, c, h, w, grad=True)
    running_mean, running_var = rand.normal(c, scale=0.1), rand.normal(c, scale=0.1, shift=1.0)
    bn_weight, bn_bias = _per_channel_params(rand, c, ("bn_weight", "bn_bias"))
    weight, bias = _per_channel_params(rand, GROUPS, ("weight", "bias"))
    args = (x, running_mean, running_var, bn_weight, bn_bias, weight, bias, rand.training, MOMENTUM, BCN_EPS, GROUPS,
            BCN_EPS)
    grads = {"dx": 0, "dbn_weight": 3, "dbn_bias": 4, "dweight": 5, "dbias": 6}
    return OpInputs(args, grads, rand.grad_outputs(shape), state={"running_mean": 1, "running_var": 2})


def _bcn_reference(x, running_mean, running_var, bn_weight, bn_bias, weight, bias, training, momentum, eps,
                   num_groups, bn_eps) -> Tensor:
    return ref_bcn.batch_channel_norm(x, running_mean, running_var, bn_weight, bn_bias, weight, bias,
                                      training=training, momentum=momentum, eps=eps, num_groups=num_groups,
                                      bn_eps=bn_eps)


def _bcn_torch(x, running_mean, running_var, bn_weight, bn_bias, weight, bias, training, momentum, eps, num_groups,
               bn_eps) -> Tensor:
    """torch's own ops: ``F.batch_norm``, then ``F.group_norm`` with the per-group affine spread to the channels."""
    u = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, bn_eps)
    per_group = x.shape[1] // num_groups
    return F.group_norm(u, num_groups, weight.repeat_interleave(per_group), bias.repeat_interleave(per_group), eps)


def _bcn_forward(training: bool) -> list[Transfer]:
    transfers = [read("x", "NxCxHxW"), read("running_mean", "C"), read("running_var", "C"), read("bn_weight", "C"),
                 read("bn_bias", "C"), read("weight", "G"), read("bias", "G"), write("y", "NxCxHxW")]
    if training:
        transfers += [write("running_mean", "C"), write("running_var", "C"), write("mean", "C", fp32=True),
                      write("rstd", "C", fp32=True), write("group_mean", "NxG", fp32=True),
                      write("group_rstd", "NxG", fp32=True)]
    return transfers


def _bcn_backward() -> list[Transfer]:
    return [read("x", "NxCxHxW"), read("dy", "NxCxHxW"), read("bn_weight", "C"), read("weight", "G"),
            read("mean", "C", fp32=True), read("rstd", "C", fp32=True), read("group_mean", "NxG", fp32=True),
            read("group_rstd", "NxG", fp32=True), write("dx", "NxCxHxW"), write("dbn_weight", "C"),
            write("dbn_bias", "C"), write("dweight", "G"), write("dbias", "G")]


BATCH_CHANNEL_NORM = Op(
    name="batch_channel_norm", family="cnn_norms", shape_kind=NCHW, default_shapes=ACTIVATION_SHAPES,
    make_inputs=_bcn_inputs, output_names=("y",), reference=_bcn_reference,
    normlayers=normlayers.functional.batch_channel_norm, native=_bcn_torch,
    native_note="F.batch_norm + F.group_norm (two passes, rounded in between)",
    forward_traffic=_bcn_forward, backward_traffic=_bcn_backward, updated_args=(1, 2),
    extra_sizes=_group_count, check_shape=_groups_divide,
)


# ----------------------------------------------------------------------------------------------------------------------
# EvoNorm: B0-B2 (batch variance, running_var) and S0-S2 with timm's "a" variants (group statistics)
# ----------------------------------------------------------------------------------------------------------------------


# EvoNorm-B divides by max(left, right): at the kink the gradient jumps, and where the two sides are within rounding
# of each other any fp32 implementation (eager, compiled, a kernel) takes a side at random, which moves the gradient
# of the whole (sample, channel) plane through the instance statistic. The fp64 gate would call that tie-break an
# error, so a training input moves the few values within KINK_MARGIN of a tie by KINK_STEP away from it.
KINK_MARGIN = 1e-3  # relative to the left side
KINK_STEP = 0.05  # more than a bf16 ulp for |x| < 4


def _evo_b_right(variant: str, x: Tensor, v: Optional[Tensor], eps: float) -> Tensor:
    if variant == "b0":
        return x * v.view(1, -1, 1, 1) + ref_evo.instance_std(x, eps)
    rms = ref_evo.instance_rms(x, eps)
    return (x + 1.0) * rms if variant == "b1" else rms - x


def _away_from_the_kink(variant: str, x: Tensor, v: Optional[Tensor], eps: float) -> Tensor:
    """``x`` (a training input) with no value within ``KINK_MARGIN`` of a tie of the max, in fp64 on the values as
    rounded to ``x.dtype``; ``v ≈ 1 > 0``, so ``right`` grows with ``x`` except in B2 (``right = rms − x``)."""
    towards_right = -1.0 if variant == "b2" else 1.0
    moved = x.detach().double()
    v64 = None if v is None else v.detach().double()
    for _ in range(4):
        left = torch.sqrt(ref_evo.batch_variance(moved) + eps).view(1, -1, 1, 1)
        gap = _evo_b_right(variant, moved, v64, eps) - left
        near = gap.abs() < KINK_MARGIN * left
        if not bool(near.any()):
            break
        step = torch.where(gap >= 0, KINK_STEP, -KINK_STEP) * towards_right
        moved = (moved + near * step).to(x.dtype).double()
    return moved.to(x.dtype).requires_grad_(x.requires_grad)


def _evo_b_inputs(variant: str) -> Callable[[Shape, RandomInputs], OpInputs]:
    fn = getattr(normlayers.functional, f"evo_norm2d_{variant}")

    def make(shape: Shape, rand: RandomInputs) -> OpInputs:
        """``x`` ~ N(0, 1) (moved off the kink in training, above); ``v`` ~ 1 + 0.1·N(0, 1) (timm initializes it
        to ones)."""
        n, c, h, w = shape
        x = rand.normal(n, c, h, w, grad=True)
        running_var = rand.normal(c, scale=0.1, shift=1.0, dtype=torch.float32)  # fp32, as the module keeps it
        names = ("weight", "bias", "v") if variant == "b0" else ("weight", "bias")
        params = _per_channel_params(rand, c, names)
        if variant == "b0":
            params[2] = (params[2].detach() + 1.0).requires_grad_(params[2].requires_grad)
        if rand.training:
            x = _away_from_the_kink(variant, x, params[2] if variant == "b0" else None, _default(fn, "eps"))
        args = (x, running_var, *params, rand.training, MOMENTUM, _default(fn, "eps"))
        grads = {"dx": 0, **{f"d{name}": 2 + i for i, name in enumerate(names)}}
        return OpInputs(args, grads, rand.grad_outputs(shape), state={"running_var": 1})

    return make


def _evo_b_reference(variant: str) -> OpFn:
    def run(x, running_var, weight, bias, *rest) -> Tensor:
        v, (training, momentum, eps) = (rest[0], rest[1:]) if variant == "b0" else (None, rest)
        return ref_evo.evo_norm_b(x, running_var, weight, bias, v, variant=variant, training=training,
                                  momentum=momentum, eps=eps, apply_act=True)

    return run


def _evo_b_forward(variant: str) -> Callable[[bool], list[Transfer]]:
    def forward(training: bool) -> list[Transfer]:
        transfers = [read("x", "NxCxHxW"), read("running_var", "C", fp32=True), read("weight", "C"),
                     read("bias", "C")] + ([read("v", "C")] if variant == "b0" else []) + [write("y", "NxCxHxW")]
        if training:
            instance_stat = "instance_std" if variant == "b0" else "instance_rms"
            transfers += [write("running_var", "C", fp32=True), write("batch_var", "C", fp32=True),
                          write(instance_stat, "NxC", fp32=True)]
        return transfers

    return forward


def _evo_b_backward(variant: str) -> Callable[[], list[Transfer]]:
    def backward() -> list[Transfer]:
        instance_stat = "instance_std" if variant == "b0" else "instance_rms"
        v = [read("v", "C")] if variant == "b0" else []
        dv = [write("dv", "C")] if variant == "b0" else []
        return ([read("x", "NxCxHxW"), read("dy", "NxCxHxW"), read("weight", "C")] + v
                + [read("batch_var", "C", fp32=True), read(instance_stat, "NxC", fp32=True), write("dx", "NxCxHxW"),
                   write("dweight", "C"), write("dbias", "C")] + dv)

    return backward


def _evo_s_inputs(variant: str) -> Callable[[Shape, RandomInputs], OpInputs]:
    fn = getattr(normlayers.functional, f"evo_norm2d_{variant}")

    def make(shape: Shape, rand: RandomInputs) -> OpInputs:
        n, c, h, w = shape
        x = rand.normal(n, c, h, w, grad=True)
        names = ("weight", "bias", "v") if variant.startswith("s0") else ("weight", "bias")
        params = _per_channel_params(rand, c, names)
        args = (x, GROUPS, *params, _default(fn, "eps"))
        grads = {"dx": 0, **{f"d{name}": 2 + i for i, name in enumerate(names)}}
        return OpInputs(args, grads, rand.grad_outputs(shape))

    return make


def _evo_s_reference(variant: str) -> OpFn:
    base, always_normalize = variant[:2], variant.endswith("a")

    def run(x, groups, weight, bias, *rest) -> Tensor:
        v, eps = rest if base == "s0" else (None, rest[0])
        return ref_evo.evo_norm_s(x, groups, weight, bias, v, variant=base,
                                  activation=None if base == "s0" else F.silu, eps=eps, apply_act=True,
                                  always_normalize=always_normalize)

    return run


def _evo_s_forward(variant: str) -> Callable[[bool], list[Transfer]]:
    def forward(training: bool) -> list[Transfer]:
        transfers = [read("x", "NxCxHxW"), read("weight", "C"), read("bias", "C")]
        transfers += [read("v", "C")] if variant.startswith("s0") else []
        transfers += [write("y", "NxCxHxW")]
        return transfers + ([write("group_stat", "NxG", fp32=True)] if training else [])

    return forward


def _evo_s_backward(variant: str) -> Callable[[], list[Transfer]]:
    def backward() -> list[Transfer]:
        v = [read("v", "C")] if variant.startswith("s0") else []
        dv = [write("dv", "C")] if variant.startswith("s0") else []
        return ([read("x", "NxCxHxW"), read("dy", "NxCxHxW"), read("weight", "C")] + v
                + [read("group_stat", "NxG", fp32=True), write("dx", "NxCxHxW"), write("dweight", "C"),
                   write("dbias", "C")] + dv)

    return backward


# timm's EvoNorm forward in eager torch (timm/layers/evo_norm.py: instance_std, instance_rms, group_std, group_rms and
# the layers' forward), the plain-torch equivalent a user would otherwise run: statistics in fp32, rounded to the
# input's dtype before the elementwise work.


def _timm_instance_stat(x: Tensor, eps: float, rms: bool) -> Tensor:
    xf = x.float()
    stat = xf.square().mean(dim=(2, 3), keepdim=True) if rms else xf.var(dim=(2, 3), unbiased=False, keepdim=True)
    return stat.add(eps).sqrt().to(x.dtype).expand(x.shape)


def _timm_group_stat(x: Tensor, groups: int, eps: float, rms: bool) -> Tensor:
    n, c, h, w = x.shape
    xf = x.float().reshape(n, groups, c // groups, h, w)
    stat = (xf.square().mean(dim=(2, 3, 4), keepdim=True) if rms
            else xf.var(dim=(2, 3, 4), unbiased=False, keepdim=True))
    return stat.add(eps).sqrt().to(x.dtype).expand(xf.shape).reshape(n, c, h, w)


def _timm_evo_b(variant: str) -> OpFn:
    def run(x, running_var, weight, bias, *rest) -> Tensor:
        v, (training, momentum, eps) = (rest[0], rest[1:]) if variant == "b0" else (None, rest)
        if training:
            var = x.float().var(dim=(0, 2, 3), unbiased=False)
            count = x.numel() / x.shape[1]
            with torch.no_grad():
                running_var.copy_(running_var * (1 - momentum) + var.detach() * momentum * count / (count - 1))
        else:
            var = running_var
        left = var.add(eps).sqrt_().to(x.dtype).view(1, -1, 1, 1).expand_as(x)
        if variant == "b0":
            right = x * v.to(x.dtype).view(1, -1, 1, 1) + _timm_instance_stat(x, eps, rms=False)
        elif variant == "b1":
            right = (x + 1) * _timm_instance_stat(x, eps, rms=True)
        else:
            right = _timm_instance_stat(x, eps, rms=True) - x
        x = x / left.max(right)
        return x * weight.to(x.dtype).view(1, -1, 1, 1) + bias.to(x.dtype).view(1, -1, 1, 1)

    return run


def _timm_evo_s(variant: str) -> OpFn:
    base = variant[:2]

    def run(x, groups, weight, bias, *rest) -> Tensor:
        v, eps = rest if base == "s0" else (None, rest[0])
        if base == "s0":
            x = x * (x * v.to(x.dtype).view(1, -1, 1, 1)).sigmoid() / _timm_group_stat(x, groups, eps, rms=False)
        else:
            x = F.silu(x) / _timm_group_stat(x, groups, eps, rms=base == "s2")
        return x * weight.to(x.dtype).view(1, -1, 1, 1) + bias.to(x.dtype).view(1, -1, 1, 1)

    return run


def _evo_op(variant: str) -> Op:
    b_family = variant.startswith("b")
    return Op(
        name=f"evo_norm2d_{variant}", family="cnn_norms", shape_kind=NCHW, default_shapes=ACTIVATION_SHAPES,
        make_inputs=(_evo_b_inputs if b_family else _evo_s_inputs)(variant), output_names=("y",),
        reference=(_evo_b_reference if b_family else _evo_s_reference)(variant),
        normlayers=getattr(normlayers.functional, f"evo_norm2d_{variant}"),
        native=(_timm_evo_b if b_family else _timm_evo_s)(variant),
        native_note="timm's EvoNorm in eager torch (no native op)",
        forward_traffic=(_evo_b_forward if b_family else _evo_s_forward)(variant),
        backward_traffic=(_evo_b_backward if b_family else _evo_s_backward)(variant),
        extra_sizes=_group_count, check_shape=_no_constraint if b_family else _groups_divide,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Weight Standardization (the default variant, timm's: biased variance, eps inside the square root)
# ----------------------------------------------------------------------------------------------------------------------


def _ws_inputs(shape: Shape, rand: RandomInputs) -> OpInputs:
    weight = rand.normal(*shape, scale=0.05, grad=True)  # about a Kaiming-initialized 3x3 conv's scale
    return OpInputs((weight, ref_ws.WS_VARIANTS[WS_VARIANT].eps), {"dweight": 0}, rand.grad_outputs(shape))


def _ws_reference(weight: Tensor, eps: float) -> Tensor:
    variant = ref_ws.WS_VARIANTS[WS_VARIANT]
    return ref_ws.weight_standardize(weight, correction=variant.correction, eps_inside=variant.eps_inside, eps=eps)


def _ws_torch(weight: Tensor, eps: float) -> Tensor:
    """timm's ``StdConv2d``: ``F.batch_norm`` over the weight viewed as ``(1, O, fan_in)``."""
    flat = weight.reshape(1, weight.shape[0], -1)
    return F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=eps).reshape_as(weight)


def _ws_forward(training: bool) -> list[Transfer]:
    stats = [write("mean", "O", fp32=True), write("rstd", "O", fp32=True)] if training else []
    return [read("weight", "OxIxKHxKW"), write("standardized", "OxIxKHxKW")] + stats


def _ws_backward() -> list[Transfer]:
    return [read("weight", "OxIxKHxKW"), read("dstandardized", "OxIxKHxKW"), read("mean", "O", fp32=True),
            read("rstd", "O", fp32=True), write("dweight", "OxIxKHxKW")]


WEIGHT_STANDARDIZE = Op(
    name="weight_standardize", family="cnn_norms", shape_kind=CONV_WEIGHT, default_shapes=WEIGHT_SHAPES,
    make_inputs=_ws_inputs, output_names=("standardized",), reference=_ws_reference,
    normlayers=lambda weight, eps: normlayers.functional.weight_standardize(weight, eps, variant=WS_VARIANT),
    native=_ws_torch, native_note="timm StdConv2d's F.batch_norm over the weight", has_kernels=False,
    forward_traffic=_ws_forward, backward_traffic=_ws_backward,
)


OPS = (
    BATCH_CHANNEL_NORM,
    *(_evo_op(v) for v in ("b0", "b1", "b2", "s0", "s0a", "s1", "s1a", "s2", "s2a")),
    WEIGHT_STANDARDIZE,
)
