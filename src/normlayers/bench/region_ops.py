"""RegionNorm in the benchmark: RN-B with a given hole mask (``(N, 1, H, W)`` bool, about 30 % holes) and RN-L, whose
mask comes from its own spatial attention; the authors' batch statistics (``stats="batch"``). Neither has a torch op:
the torch provider runs the eager reference.
"""

from __future__ import annotations

from torch import Tensor

import normlayers.functional
from normlayers.bench.ops import NCHW, Op, OpInputs, RandomInputs, Shape, Transfer, read, read_mask, write
from normlayers.reference import region_norm as ref_region

__all__ = ["OPS"]

EPS = 1e-5
STATS = "batch"
THRESHOLD = 0.8  # RN-L's default
KERNEL_SIZE = 7

SHAPES = {"cuda": ((8, 64, 256, 256), (8, 256, 64, 64)), "cpu": ((2, 32, 32, 32),)}


def _region_inputs(shape: Shape, rand: RandomInputs) -> OpInputs:
    n, c, h, w = shape
    x = rand.normal(n, c, h, w, grad=True)
    hole = rand.normal(n, 1, h, w) > 0.5
    params = [rand.normal(c, scale=0.1, grad=True) for _ in range(4)]
    names = ("dforeground_gamma", "dforeground_beta", "dbackground_gamma", "dbackground_beta")
    grads = {"dx": 0, **{name: 2 + i for i, name in enumerate(names)}}
    return OpInputs((x, hole, *params, EPS, STATS), grads, rand.grad_outputs(shape))


def _region_reference(x, mask, fg_gamma, fg_beta, bg_gamma, bg_beta, eps, stats) -> Tensor:
    return ref_region.region_norm(x, mask, fg_gamma, fg_beta, bg_gamma, bg_beta, eps=eps, stats=stats,
                                  eps_mode="official", affine="masked")


def _region_forward(training: bool) -> list[Transfer]:
    transfers = [read("x", "NxCxHxW"), read_mask("mask", "NxHxW"), read("affine", "Cx4"), write("y", "NxCxHxW")]
    return transfers + ([write("region_stats", "Cx4", fp32=True)] if training else [])


def _region_backward() -> list[Transfer]:
    return [read("x", "NxCxHxW"), read("dy", "NxCxHxW"), read_mask("mask", "NxHxW"), read("affine", "Cx4"),
            read("region_stats", "Cx4", fp32=True), write("dx", "NxCxHxW"), write("daffine", "Cx4")]


def _fixed_extents(shape: Shape) -> dict[str, int]:
    """Extents that do not come from the shape: the four (two) region parameters per channel, the conv kernel."""
    return {"4": 4, "2": 2, "K": KERNEL_SIZE}


REGION_NORM = Op(
    name="region_norm", family="region_norms", shape_kind=NCHW, default_shapes=SHAPES,
    make_inputs=_region_inputs, output_names=("y",), reference=_region_reference,
    normlayers=normlayers.functional.region_norm, native_note="no native op: eager reference",
    forward_traffic=_region_forward, backward_traffic=_region_backward, extra_sizes=_fixed_extents,
)


def _learnable_inputs(shape: Shape, rand: RandomInputs) -> OpInputs:
    n, c, h, w = shape
    x = rand.normal(n, c, h, w, grad=True)
    k = KERNEL_SIZE
    # conv1 weights of order one, so that the attention crosses the threshold somewhere (small ones give s = 0.5).
    conv1 = rand.normal(1, 2, k, k, scale=0.5, grad=True)
    gamma_w, beta_w = rand.normal(1, 1, k, k, scale=0.1, grad=True), rand.normal(1, 1, k, k, scale=0.1, grad=True)
    gamma_b, beta_b = rand.normal(1, scale=0.1, grad=True), rand.normal(1, scale=0.1, grad=True)
    args = (x, conv1, gamma_w, gamma_b, beta_w, beta_b, THRESHOLD, EPS, STATS)
    grads = {"dx": 0, "dconv1_weight": 1, "dgamma_weight": 2, "dgamma_bias": 3, "dbeta_weight": 4, "dbeta_bias": 5}
    return OpInputs(args, grads, rand.grad_outputs(shape))


def _learnable_reference(x, conv1, gamma_w, gamma_b, beta_w, beta_b, threshold, eps, stats) -> Tensor:
    return ref_region.learnable_region_norm(x, conv1, gamma_w, gamma_b, beta_w, beta_b, threshold=threshold, eps=eps,
                                            stats=stats, eps_mode="official")


def _learnable_forward(training: bool) -> list[Transfer]:
    # The attention maps (channel mean and max, then s, γ(s), β(s)) are H·W per sample each.
    transfers = [read("x", "NxCxHxW"), read("conv_weights", "2xKxK"), write("attention", "NxHxW"),
                 write("y", "NxCxHxW")]
    return transfers + ([write("region_stats", "Cx2", fp32=True)] if training else [])


def _learnable_backward() -> list[Transfer]:
    return [read("x", "NxCxHxW"), read("dy", "NxCxHxW"), read("attention", "NxHxW"),
            read("region_stats", "Cx2", fp32=True), write("dx", "NxCxHxW"), write("dconv_weights", "2xKxK")]


LEARNABLE_REGION_NORM = Op(
    name="learnable_region_norm", family="region_norms", shape_kind=NCHW, default_shapes=SHAPES,
    make_inputs=_learnable_inputs, output_names=("y",), reference=_learnable_reference,
    normlayers=normlayers.functional.learnable_region_norm, native_note="no native op: eager reference",
    forward_traffic=_learnable_forward, backward_traffic=_learnable_backward, extra_sizes=_fixed_extents,
)

OPS = (REGION_NORM, LEARNABLE_REGION_NORM)
