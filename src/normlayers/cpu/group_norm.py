"""CPU tier of Group Normalization: ATen's fused ``group_norm`` followed by the activation, eagerly.

For fp32 and fp64 input these are exactly the ops a model runs (``nn.GroupNorm`` then ``nn.SiLU``), bit for bit;
without autograd the SiLU or ReLU is applied in place to the norm's fresh output (one output buffer where eager
PyTorch allocates two). fp16/bf16 input is normalized and activated in fp32 and rounded once, as
the reference and the kernels do (eager bf16 rounds the norm's output before the activation). Argument checks live in
:mod:`normlayers.functional`.

One exception to "ATen's ops": the backward of a channels-last input with planes of 2048 values or more, when the
weight or bias gradient is asked for. There ATen's backward (aten/src/ATen/native/cpu/group_norm_kernel.cpp,
``GroupNormBackwardKernelImplChannelsLastInternal``) splits the ``N·H·W`` rows among the threads and each thread adds
its rows one after another into per-(sample, channel) sums, so on one thread every sum is a run of ``H·W`` fp32
additions: at 1×512×64×64 its ``dweight`` is 8× further from the fp64 value than the reference's (2.6e-4 against
3.2e-5), more than the twice-the-reference rule allows. :class:`_ChannelsLastGroupNormFunction` keeps ATen's forward,
sums in runs of 256 positions (:func:`_per_channel_sums`) and computes ``dweight``, ``dbias`` and ``dx``
(:func:`_input_grad`, two elementwise passes that replace ATen's sums-then-``dx`` pair) from those sums.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers.cpu._common import opmath, params_like
from normlayers.reference.group_norm import activation

__all__ = ["group_norm"]

_IN_PLACE_ACTIVATIONS = {"silu": partial(F.silu, inplace=True), "relu": F.relu_}


def _native(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """Whether ATen's group_norm takes these as they are: fp32/fp64 input, parameters of its dtype."""
    dtype = input.dtype
    return ((dtype is torch.float32 or dtype is torch.float64) and (weight is None or weight.dtype is dtype)
            and (bias is None or bias.dtype is dtype))


# ATen's channels-last backward switches to one sequential run per thread over a plane's rows from this plane size
# (``feature_map_threshold`` in group_norm_kernel.cpp); below it each run is shorter than 2048 additions.
_SEQUENTIAL_PLANE_SIZE = 2048

_CHANNELS_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _needs_accurate_param_grads(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """Whether autograd will ask ATen's channels-last backward for ``dweight``/``dbias`` summed in long runs."""
    # Cheapest first: an NCHW input, or a call outside autograd, is answered by the first test (0.1 µs). (The plane
    # size is read from the shape: x[0, 0] on an input that requires grad records two selects, 2 µs.)
    if x.is_contiguous() or not torch.is_grad_enabled():
        return False
    if not ((weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)):
        return False
    memory_format = _CHANNELS_LAST_FORMATS.get(x.dim())
    return (memory_format is not None and math.prod(x.shape[2:]) >= _SEQUENTIAL_PLANE_SIZE
            and x.is_contiguous(memory_format=memory_format))


# Spatial positions per partial sum of the per-(sample, channel) sums: ATen's batch-norm backward adds the rows of its
# input one after another per column, so each partial sum is a run of at most 256 fp32 additions (dweight at
# 1×512×64×64, the benchmark's inputs: 6.7e-5 from fp64, against 3.3e-4 for ATen's group norm and 3.2e-5 for the fp32
# reference; with other inputs of that shape runs of 1024 gave 1.5e-4, 256 6.6e-5, 128 6.4e-5 at 0.05 ms more).
_RUN_LENGTH = 256


def _per_channel_sums(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ dy·x̂, Σ dy)`` per (sample, channel), two ``(N, C)`` tensors, of channels-last ``dy`` and ``x``, with
    ``x̂ = (x − mean)·rstd`` from the ``(N, G)`` group statistics, each sum split into runs of at most
    :data:`_RUN_LENGTH` positions.

    A sample's first ``runs · 256`` positions, ``(positions, C)`` rows with the channels innermost, are viewed as a
    ``(256, runs · C)`` matrix (row ``i`` holds positions ``i · runs`` to ``i · runs + runs − 1``), whose column
    ``(r, c)`` holds channel ``c`` at positions ``r, r + runs, …``: one call of ATen's batch-norm backward
    (reductions only, no temporary) sums every column, each a run of 256; the last ``positions mod 256`` positions
    are one more run. One or two calls per sample, whatever the plane size; the ``runs`` partial sums of a channel
    are then added by torch's sum."""
    n, c = x.shape[:2]
    num_groups = mean.shape[1]
    positions = x.numel() // (n * c)
    runs = positions // _RUN_LENGTH
    head = runs * _RUN_LENGTH
    dy_rows, x_rows = (t.movedim(1, -1).reshape(n, positions, c) for t in (dy, x))  # (N, positions, C) views

    statistics = torch.stack((mean, rstd))

    def per_column(copies: int) -> Tensor:  # (2, N, G) -> (2, N, copies · C): each channel's, `copies` times
        # (contiguous: batch norm reads its statistics as dense vectors, and the expanded view has zero strides)
        return (statistics[:, :, None, :, None].expand(2, n, copies, num_groups, c // num_groups).contiguous()
                .view(2, n, copies * c))

    blocks = [(slice(0, head), _RUN_LENGTH, runs)] if runs else []
    if head < positions:
        blocks.append((slice(head, positions), positions - head, 1))
    blocks = [(rows, length, copies, per_column(copies)) for rows, length, copies in blocks]
    xhat_sums, dy_sums = [], []  # per sample and block: (copies · C,) partial sums
    for sample in range(n):
        for rows, length, copies, (column_mean, column_rstd) in blocks:
            _, xhat_sum, dy_sum = torch.ops.aten.native_batch_norm_backward(
                dy_rows[sample, rows].view(length, copies * c), x_rows[sample, rows].view(length, copies * c),
                None, None, None, column_mean[sample], column_rstd[sample], True, 0.0, [False, True, True])
            xhat_sums.append(xhat_sum)
            dy_sums.append(dy_sum)
    return torch.cat(xhat_sums).view(n, -1, c).sum(1), torch.cat(dy_sums).view(n, -1, c).sum(1)


def _input_grad(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, xhat_sums: Tensor,
                dy_sums: Tensor) -> Tensor:
    """Group norm's ``dx`` from the per-(sample, channel) sums of :func:`_per_channel_sums`, in two elementwise ATen
    passes over the input's memory format.

    With ``x̂ = (x − μ)·r`` and ``g = γ·dy`` (Wu & He, 2018, eq. 1 differentiated), ``dx = r·(g − E[g] − x̂·E[g·x̂])``,
    the means over the (sample, group): ``dx = A·dy + B·x + C`` with ``A = r·γ`` per (sample, channel) and
    ``B = −r²·E[g·x̂]``, ``C = −B·μ − r·E[g]`` per (sample, group) — the closed form ATen's kernel evaluates too, here
    from the accurate sums: ``C + A·dy`` is written, then ``B·x`` added in place."""
    n, c = x.shape[:2]
    num_groups = mean.shape[1]
    sums = torch.stack((xhat_sums, dy_sums))  # (2, N, C)
    if weight is not None:
        sums = sums * weight
    # E[g·x̂], E[g] per (sample, group): the sums of its channels over its C/G · positions values
    mean_g_xhat, mean_g = sums.view(2, n, num_groups, -1).sum(3).div_(x.numel() // (n * num_groups))
    x_coef = -rstd * rstd * mean_g_xhat
    shift = -x_coef * mean - rstd * mean_g
    # (3, N, G) -> 3 × (N, C, 1, …): each channel's group values
    dy_coef, shift, x_coef = (torch.stack((rstd, shift, x_coef)).repeat_interleave(c // num_groups, 2)
                              .view(3, n, c, *([1] * (x.dim() - 2))))
    if weight is not None:
        dy_coef = dy_coef * weight.view(c, *([1] * (x.dim() - 2)))
    return torch.addcmul(shift, dy_coef, dy).addcmul_(x_coef, x)


class _ChannelsLastGroupNormFunction(torch.autograd.Function):
    """ATen's forward; the backward from per-(sample, channel) sums in short runs (:func:`_per_channel_sums`):
    ``dweight``, ``dbias`` and ``dx`` (:func:`_input_grad`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> Tensor:
        n, c = x.shape[:2]
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, math.prod(x.shape[2:]), num_groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.eps = num_groups, eps
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        needs_dx, _, needs_dweight, needs_dbias, _ = ctx.needs_input_grad
        if torch.is_grad_enabled():  # a double backward: the saved statistics hold no graph, so autograd from x
            leaves = [t for t, need in zip((x, weight, bias), (needs_dx, needs_dweight, needs_dbias)) if need]
            with torch.enable_grad():
                y = torch.group_norm(x, ctx.num_groups, weight, bias, ctx.eps, True)
                grads = iter(torch.autograd.grad(y, leaves, dy, create_graph=True))
            return (next(grads) if needs_dx else None, None, next(grads) if needs_dweight else None,
                    next(grads) if needs_dbias else None, None)
        dy = dy.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        xhat_sums, dy_sums = _per_channel_sums(dy, x, mean, rstd)
        dx = _input_grad(dy, x, weight, mean, rstd, xhat_sums, dy_sums) if needs_dx else None
        return (dx, None, xhat_sums.sum(0) if needs_dweight else None, dy_sums.sum(0) if needs_dbias else None,
                None)


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               act: Optional[str]) -> Tensor:
    """``act(F.group_norm(input, num_groups, weight, bias, eps))`` in the compute dtype, in ``input``'s dtype."""
    x = input
    if not _native(input, weight, bias):  # low-precision input or parameters of another dtype: the compute dtype
        x, (weight, bias) = opmath(input), params_like(input, weight, bias)
    # torch.group_norm is F.group_norm without its Python-side checks, which normlayers.functional has made (its
    # last argument, cudnn_enabled, is deprecated and unused by ATen: F.group_norm's read of the flag is skipped).
    if _needs_accurate_param_grads(x, weight, bias):
        y = _ChannelsLastGroupNormFunction.apply(x, num_groups, weight, bias, eps)
    else:
        y = torch.group_norm(x, num_groups, weight, bias, eps, True)
    if act in _IN_PLACE_ACTIVATIONS and not y.requires_grad:
        # Outside autograd nothing else reads the norm's output: activate it in place, saving a buffer and its
        # traffic.
        y = _IN_PLACE_ACTIVATIONS[act](y)
    elif act is not None:
        y = activation(y, act)
    return y if y.dtype is input.dtype else y.to(input.dtype)
