"""The transformer batch-statistic norms in the benchmark: PowerNorm (``TxBxC``, fairseq's time-major layout) and
UnifiedNorm (``BxLxC``), each with a padding mask (the last quarter of every other sequence is padding).

Both run in their steady state: ``iters`` far past the warm-up, so the forward uses the running statistics and the
training backward is the authors' approximate one with its running gradient statistic. Buffers are in the benchmark
dtype, as the modules keep them. Neither has a torch op: the torch provider runs the eager reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import normlayers.functional
from normlayers.bench.ops import TOKENS_BNC, TOKENS_TBC, Op, OpInputs, RandomInputs, Shape, Transfer, read, \
    read_mask, write
from normlayers.reference import power_norm as ref_power
from normlayers.reference import unified_norm as ref_unified

__all__ = ["OPS"]

EPS = 1e-5
ALPHA = 0.9  # PowerNorm's alpha_fwd and alpha_bkw, UnifiedNorm's momentum: the layers' defaults
POWER_WARMUP, UNIFIED_WARMUP = 10000, 4000
STEADY_STATE_ITERS = 10**6
WINDOW = 4  # UnifiedNorm's default window for both statistics

TBC_SHAPES = {"cuda": ((512, 32, 1024), (2048, 8, 4096)), "cpu": ((64, 4, 256),)}
BLC_SHAPES = {"cuda": ((32, 512, 1024), (8, 2048, 4096)), "cpu": ((4, 64, 256),)}


def _pad_mask(rand: RandomInputs, batch: int, length: int) -> Tensor:
    """``(B, L)``, True = padding: the last quarter of every other sequence."""
    pad = torch.zeros(batch, length, dtype=torch.bool, device=rand.device)
    pad[1::2, length - length // 4:] = True
    return pad


def _positive(rand: RandomInputs, *shape: int) -> Tensor:
    return rand.normal(*shape, scale=0.1).abs() + 1.0


def _iters(rand: RandomInputs) -> Tensor:
    return torch.full((1,), STEADY_STATE_ITERS, dtype=torch.long, device=rand.device)


def _affine(rand: RandomInputs, channels: int) -> tuple[Tensor, Tensor]:
    return (rand.normal(channels, scale=0.1, shift=1.0, grad=True), rand.normal(channels, scale=0.1, grad=True))


# ----------------------------------------------------------------------------------------------------------------------
# PowerNorm
# ----------------------------------------------------------------------------------------------------------------------


def _power_inputs(shape: Shape, rand: RandomInputs) -> OpInputs:
    t, b, c = shape
    x = rand.normal(t, b, c, grad=True)
    running_phi, ema_gz = _positive(rand, 1, c, 1, 1), rand.normal(1, c, 1, 1, scale=0.1)
    weight, bias = _affine(rand, c)
    args = (x, running_phi, ema_gz, _iters(rand), weight, bias, _pad_mask(rand, b, t), rand.training, EPS, ALPHA,
            ALPHA, POWER_WARMUP, 1)
    state = {"running_phi": 1, "ema_gz": 2, "iters": 3}
    return OpInputs(args, {"dx": 0, "dweight": 4, "dbias": 5}, rand.grad_outputs(shape), state)


def _power_reference(x, running_phi, ema_gz, iters, weight, bias, pad_mask, training, eps, alpha_fwd, alpha_bkw,
                     warmup_iters, group_num) -> Tensor:
    return ref_power.power_norm(x, running_phi, ema_gz, iters, weight, bias, pad_mask, training=training, eps=eps,
                                alpha_fwd=alpha_fwd, alpha_bkw=alpha_bkw, warmup_iters=warmup_iters,
                                group_num=group_num)


def _power_forward(training: bool) -> list[Transfer]:
    transfers = [read("x", "TxBxC"), read_mask("pad_mask", "BxT"), read("running_phi", "C"), read("weight", "C"),
                 read("bias", "C"), write("y", "TxBxC")]
    return transfers + ([write("running_phi", "C")] if training else [])


def _power_backward() -> list[Transfer]:
    return [read("x", "TxBxC"), read("dy", "TxBxC"), read_mask("pad_mask", "BxT"), read("running_phi", "C"),
            read("ema_gz", "C"), read("weight", "C"), write("dx", "TxBxC"), write("dweight", "C"),
            write("dbias", "C"), write("ema_gz", "C")]


POWER_NORM = Op(
    name="power_norm", family="token_norms", shape_kind=TOKENS_TBC, default_shapes=TBC_SHAPES,
    make_inputs=_power_inputs, output_names=("y",), reference=_power_reference,
    normlayers=normlayers.functional.power_norm, native_note="no native op: eager reference",
    forward_traffic=_power_forward, backward_traffic=_power_backward,
)


# ----------------------------------------------------------------------------------------------------------------------
# UnifiedNorm
# ----------------------------------------------------------------------------------------------------------------------


def _unified_inputs(shape: Shape, rand: RandomInputs) -> OpInputs:
    b, length, c = shape
    x = rand.normal(b, length, c, grad=True)
    running_var, ema_gz = _positive(rand, c), rand.normal(c, scale=0.1)
    buffer_x2, buffer_gz = _positive(rand, WINDOW, c), rand.normal(WINDOW, c, scale=0.1)
    skip_counter = torch.zeros(1, dtype=torch.long, device=rand.device)
    weight, bias = _affine(rand, c)
    args = (x, running_var, ema_gz, buffer_x2, buffer_gz, _iters(rand), skip_counter, weight, bias,
            _pad_mask(rand, b, length), rand.training, EPS, ALPHA, UNIFIED_WARMUP, False)
    state = {"running_var": 1, "ema_gz": 2, "buffer_x2": 3, "buffer_gz": 4, "iters": 5, "skip_counter": 6}
    return OpInputs(args, {"dx": 0, "dweight": 7, "dbias": 8}, rand.grad_outputs(shape), state)


def _unified_reference(x, running_var, ema_gz, buffer_x2, buffer_gz, iters, skip_counter, weight, bias, pad_mask,
                       training, eps, momentum, warmup_iters, outlier_filtration: Optional[bool]) -> Tensor:
    return ref_unified.unified_norm(x, running_var, ema_gz, buffer_x2, buffer_gz, iters, skip_counter, weight, bias,
                                    pad_mask, training=training, eps=eps, momentum=momentum,
                                    warmup_iters=warmup_iters, outlier_filtration=outlier_filtration)


def _unified_forward(training: bool) -> list[Transfer]:
    transfers = [read("x", "BxLxC"), read_mask("pad_mask", "BxL"), read("running_var", "C"), read("weight", "C"),
                 read("bias", "C"), write("y", "BxLxC")]
    return transfers + ([write("running_var", "C"), write("buffer_x2", "C")] if training else [])


def _unified_backward() -> list[Transfer]:
    return [read("x", "BxLxC"), read("dy", "BxLxC"), read_mask("pad_mask", "BxL"), read("running_var", "C"),
            read("ema_gz", "C"), read("weight", "C"), write("dx", "BxLxC"), write("dweight", "C"),
            write("dbias", "C"), write("ema_gz", "C"), write("buffer_gz", "C")]


UNIFIED_NORM = Op(
    name="unified_norm", family="token_norms", shape_kind=TOKENS_BNC, default_shapes=BLC_SHAPES,
    make_inputs=_unified_inputs, output_names=("y",), reference=_unified_reference,
    normlayers=normlayers.functional.unified_norm, native_note="no native op: eager reference",
    forward_traffic=_unified_forward, backward_traffic=_unified_backward,
)

OPS = (POWER_NORM, UNIFIED_NORM)
