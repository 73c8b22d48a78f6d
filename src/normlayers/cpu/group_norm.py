"""CPU tier of Group Normalization: ATen's fused ``group_norm`` followed by the activation, eagerly.

For fp32 and fp64 input these are exactly the ops a model runs (``nn.GroupNorm`` then ``nn.SiLU``), bit for bit;
without autograd the SiLU or ReLU is applied in place to the norm's fresh output (one output buffer where eager
PyTorch allocates two). fp16/bf16 input is normalized and activated in fp32 and rounded once, as
the reference and the kernels do (eager bf16 rounds the norm's output before the activation). Argument checks live in
:mod:`normlayers.functional`.

Contiguous NCHW fp32/bf16 input with no activation, SiLU or ReLU runs a compiled kernel instead
(``csrc/group_norm_nchw.c``, :func:`_nchw_kernel_for`): centred statistics and the activation in one read and one
write, the backward from one read of ``(dy, x)`` and one ``dx`` pass (:class:`_CompiledGroupNormFunction`). fp32/bf16
input whose channels are innermost (channels_last, channels_last_3d, a transposed ``(N, L, C)``) runs
``csrc/group_norm_channels_last.c`` (:func:`_compiled_channels_last`): accurate statistics (two-pass per channel and
block, combined in fp64) and the activation in one read and one write, the backward from one read of ``(dy, x)`` and
one ``dx`` pass (the same Function). Under autograd both run inside the C++ autograd node of ``csrc/autograd.cpp``
(:mod:`normlayers.cpu._extension`) where it builds: the same kernels and fallbacks, without the Python Function's
cost on cold caches. What follows is the ATen path of every other call.

Three exceptions to "ATen's ops", two for channels-last input. First, the forward where ATen's statistics are not
trusted: its channels-last kernel (``GroupNormKernelImplChannelsLastInternal``) takes the variance as E[x²] − E[x]² from
fp32 sums, which cancels when a group's mean is large against its spread; the returned mean and rstd are checked
(:func:`_max_trusted_product`) and, where they fail, :func:`_accurate_group_norm` recomputes the output from centred
two-pass moments. Its NCHW kernel's statistics are two-pass, but it writes ``x·scale + shift``, which rounds at the
scale of ``mean·rstd``: where that is huge (:data:`_TRUSTED_AFFINE_PRODUCT`), :func:`_accurate_group_norm` runs it on
the input centred about its group means — in calls under autograd, which read the statistics anyway; an NCHW inference
call returns ATen's output unchecked (within 1.5× the bound up to offsets of ~1000 standard deviations, where the check
would cost 8-12% of every call). Second, the backward of planes of 2048 values or more, when the weight or bias
gradient is asked for (or of any untrusted forward). There ATen's backward
(aten/src/ATen/native/cpu/group_norm_kernel.cpp, ``GroupNormBackwardKernelImplChannelsLastInternal``) splits the
``N·H·W`` rows among the threads and each thread adds its rows one after another into per-(sample, channel) sums, so on
one thread every sum is a run of ``H·W`` fp32 additions: at 1×512×64×64 its ``dweight`` is 8× further from the fp64
value than the reference's (2.6e-4 against 3.2e-5), more than the twice-the-reference rule allows.
:class:`_GroupNormFunction` keeps the forward, sums in runs of 256 positions (:func:`_per_channel_sums`) and computes
``dweight``, ``dbias`` and ``dx`` (:func:`_input_grad`, two elementwise passes that replace ATen's sums-then-``dx``
pair) from those sums. Third, the backward of contiguous NCHW input whose group means are large against its spread:
ATen's NCHW backward (``GroupNormBackwardKernelImplInternal``) takes ``Σ dy·x − mean·Σ dy``, which cancels; the
forward's statistics are checked (:func:`_max_trusted_gradient_product`) and, where they fail,
:class:`_GroupNormFunction` runs ATen's backward on the input centred about its exact group mean (:func:`_centred`).
"""

from __future__ import annotations

import ctypes
import math
from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers.cpu import _extension
from normlayers.cpu import _native as _compiled  # (``_native`` below: whether ATen takes the dtypes)
from normlayers.cpu._common import host_readable, opmath, params_like, raw_bytes
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
    """Whether autograd would ask ATen's backward of the channels-last ``x`` for ``dweight``/``dbias`` summed in long
    runs. (The plane size is read from the shape: x[0, 0] on an input that requires grad records two selects, 2 µs.)"""
    return (((weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))
            and math.prod(x.shape[2:]) >= _SEQUENTIAL_PLANE_SIZE)


# Spatial positions per partial sum of the per-(sample, channel) sums: ATen's batch-norm backward adds the rows of its
# input one after another per column, so each partial sum is a run of at most 256 fp32 additions (dweight at
# 1×512×64×64, the benchmark's inputs: 6.7e-5 from fp64, against 3.3e-4 for ATen's group norm and 3.2e-5 for the fp32
# reference; with other inputs of that shape runs of 1024 gave 1.5e-4, 256 6.6e-5, 128 6.4e-5 at 0.05 ms more).
_RUN_LENGTH = 256


def _run_blocks(positions: int) -> list[tuple[slice, int, int]]:
    """A sample's ``positions`` split for summing in runs of at most :data:`_RUN_LENGTH`: ``(rows, length, copies)``,
    the first ``copies · 256`` positions viewed as ``length = 256`` rows of ``copies`` position blocks (each column a
    run of 256), then the last ``positions mod 256`` as one run (``copies = 1``)."""
    runs = positions // _RUN_LENGTH
    head = runs * _RUN_LENGTH
    return ([(slice(0, head), _RUN_LENGTH, runs)] if runs else []) + (
        [(slice(head, positions), positions - head, 1)] if head < positions else [])


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
    dy_rows, x_rows = (t.movedim(1, -1).reshape(n, positions, c) for t in (dy, x))  # (N, positions, C) views

    statistics = torch.stack((mean, rstd))

    def per_column(copies: int) -> Tensor:  # (2, N, G) -> (2, N, copies · C): each channel's, `copies` times
        # (contiguous: batch norm reads its statistics as dense vectors, and the expanded view has zero strides)
        return (statistics[:, :, None, :, None].expand(2, n, copies, num_groups, c // num_groups).contiguous()
                .view(2, n, copies * c))

    blocks = [(rows, length, copies, per_column(copies)) for rows, length, copies in _run_blocks(positions)]
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


# ATen's channels-last forward (``GroupNormKernelImplChannelsLastInternal``) takes each (sample, group)'s variance as
# E[x²] − E[x]² from fp32 sums, the sums of a plane's positions added one after another: its relative error in the
# variance grows with k = mean²/(var + eps) (the cancellation) and with the run length. Fitted to its measured output
# errors (fp32, one thread; 1×512×64×64, 2×320×32×32, 1×64×64×64, 8×1280×8×8, 1×128×128×128, inputs N(0, 1) + shift,
# docs/group_norm.md), the error relative to the fp32 bound of the tests (2× the reference's + the fp32 tolerance)
# follows (1 + k)·(8 + sqrt(H·W·G/C)): at most 0.37 of the bound where that product is ≤ 64 (up to 0.83 from 68 to
# 146, over the bound at 179 and from 237 up); checked after the fit at 1×512×128×128 (0.21 at k = 0, 0.53 at
# k = 0.25: product 50, the worst trusted case measured) and 2×64×16×16×16 (0.16 at k = 0, 0.47 at 1.07: untrusted).
# Two threads gave the same or smaller errors. Above _TRUSTED_SPREAD the accurate path recomputes the statistics.
_TRUSTED_SPREAD = 64.0
# fp64 (ATen's same kernel in fp64; the tests' fp64 tolerance is 1e-7): measured at 1×64×64×64, the product 5.3e7
# (k = 1e6) gave 1.1e-8 from the exact result, 5.3e9 (k = 1e8) 1.2e-6.
_DTYPE_SPREAD = {torch.float32: _TRUSTED_SPREAD, torch.float64: 2.0 ** 26}


def _is_channels_last(x: Tensor) -> bool:
    """Whether ATen's group norm reads ``x`` as channels-last (4-D or 5-D, not also NCHW-contiguous)."""
    memory_format = _CHANNELS_LAST_FORMATS.get(x.dim())
    return memory_format is not None and not x.is_contiguous() and x.is_contiguous(memory_format=memory_format)


def _max_abs_product(mean: Tensor, rstd: Tensor) -> float:
    """``max |mean| · max rstd`` (at least ``max |mean·rstd|``) of ATen's fresh, contiguous ``(N, G)`` statistics.
    Right after the big kernel every cache holds its data and whatever runs next pays for that: at 2×320×32×32
    ``float((mean * rstd).abs().max())`` cost the call 29-37 µs, ``max |mean·rstd|`` of the values read from raw memory
    (as :func:`normlayers.cpu._common.all_positive_finite` reads its own) 18-27 µs, this 10-13 µs (medians of 201-301
    interleaved calls, load average 0.2-0.8)."""
    raw_means, raw_rstds = raw_bytes(mean), raw_bytes(rstd)
    if raw_means is None or raw_rstds is None:  # (a subclass, or no storage): its values through torch
        return float(mean.abs().max() * rstd.max())
    means = memoryview(raw_means).cast(_TYPECODES[mean.dtype])
    return max(max(means), -min(means)) * max(memoryview(raw_rstds).cast(_TYPECODES[rstd.dtype]))


_TYPECODES = {torch.float32: "f", torch.float64: "d"}


def _max_trusted_product(x: Tensor, num_groups: int) -> float:
    """The largest ``max |mean·rstd|`` of ATen's channels-last statistics of ``x`` that :data:`_TRUSTED_SPREAD`
    trusts: ``(1 + k)·(8 + sqrt(H·W·G/C)) ≤ 64``, ``k = (mean·rstd)²``, solved for ``sqrt(k)`` (computed before the
    kernel, while the interpreter's caches are warm)."""
    n, c = x.shape[:2]
    run_spread = 8.0 + math.sqrt(x.numel() // (n * c) * num_groups / c)
    return math.sqrt(max(_DTYPE_SPREAD[x.dtype] / run_spread - 1.0, 0.0))


def _group_moments(centred: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance, ``(N, G)``, of each (sample, group) of a channels-last tensor, from two-pass
    per-column moments: a sample's first ``runs · 256`` positions, viewed as a ``(256, runs · C)`` matrix as in
    :func:`_per_channel_sums`, and its last ``positions mod 256`` as ``(rest, C)``, go through ATen's batch-norm
    statistics (``batch_norm_update_stats``: the column means, then the mean squared deviations from them, runs of at
    most 256 additions), and the parts of a group combine by the law of total variance (equal-weighted parts of their
    counts: no cancellation)."""
    n, c = centred.shape[:2]
    positions = centred.numel() // (n * c)
    rows = centred.movedim(1, -1).reshape(n, positions, c)  # (N, positions, C) view
    blocks = _run_blocks(positions)
    means, variances = [], []
    for sample in range(n):
        for block, length, copies in blocks:
            mean, var = torch.batch_norm_update_stats(rows[sample, block].view(length, copies * c), None, None, 0.0)
            means.append(mean)
            variances.append(var)
    # (N, parts, G, C/G), each part's count ÷ the group's
    weights = centred.new_tensor([length for _, length, copies in blocks for _ in range(copies)])
    weights = weights.div_(positions * (c // num_groups)).view(1, -1, 1, 1)
    means, variances = (torch.cat(t).view(n, -1, num_groups, c // num_groups) for t in (means, variances))
    group_mean = (means * weights).sum((1, 3))
    deviations = means - group_mean[:, None, :, None]
    group_var = (torch.addcmul(variances, deviations, deviations) * weights).sum((1, 3))
    return group_mean, group_var


def _per_channel(x: Tensor, statistic: Tensor) -> Tensor:
    """A ``(N, G)`` group statistic of ``x`` as ``(N, C, 1, …)``: each channel's group's value."""
    n, c = x.shape[:2]
    return statistic.repeat_interleave(c // statistic.shape[1], 1).view(n, c, *([1] * (x.dim() - 2)))


def _centred(x: Tensor, mean: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``x − mean`` (into ``out`` if given), each group's rounded ``(N, G)`` mean taken off (exact where ``x`` is within
    a factor 2 of it: Sterbenz): an input with the group norm of ``x`` whose group means are small against its
    spread."""
    return torch.sub(x, _per_channel(x, mean), out=out)


def _accurate_group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                         y: Tensor, mean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The group norm of ``x`` with no term of the size of its group means rounded, given ATen's output ``y`` and
    group ``mean`` (off by a few ulps at most: a sum, without the variance's cancellation): ``(y, mean, rstd)``, the
    ``(N, G)`` statistics of ``x``.

    ``x`` is centred about ``mean`` first (:func:`_centred`). NCHW: ATen's forward of the centred input (two-pass
    statistics of small values; its ``x·scale + shift`` rounds at their scale, not the mean's), one more pass and a
    new output. Channels-last (ATen's statistics are E[x²] − E[x]²): ``y`` is overwritten, ``y = x − mean`` there,
    the moments of :func:`_group_moments` and the affine map ``y = A·y + B`` of those centred values; three passes
    over ``y`` and two reads of it for the moments."""
    n, c = x.shape[:2]
    if not _is_channels_last(x):
        y, offset, rstd = torch.native_group_norm(_centred(x, mean), weight, bias, n, c, x.numel() // (n * c),
                                                  num_groups, eps)
        return y, mean + offset, rstd
    spatial = [1] * (x.dim() - 2)
    per_channel = partial(_per_channel, x)
    centred = _centred(x, mean, out=y)
    offset, var = _group_moments(centred, num_groups)
    rstd = var.add_(eps).rsqrt_()
    scale = per_channel(rstd)
    if weight is not None:
        scale = scale * weight.view(c, *spatial)
    shift = -scale * per_channel(offset)
    if bias is not None:
        shift = shift.add_(bias.view(c, *spatial))
    torch.addcmul(shift, centred, scale, out=centred)
    return y, mean + offset, rstd


# ATen's NCHW backward (``GroupNormBackwardKernelImplInternal``) sums ``Σ dy·x`` and ``Σ dy`` over each plane and
# takes ``dweight`` as ``Σ_n (Σ dy·x − mean·Σ dy)·rstd`` (and ``dx`` from the same sums): the subtraction cancels when
# a group's mean is large against its spread, and the rounding of ``Σ dy·x`` grows with the plane. Measured
# (docs/group_norm.md; fp32, one thread, input N(0, 1) + offset), its ``dweight`` error in units of the bound is
# about 0.005·sqrt(k·H·W) above its error at offset 0 (0.06-0.36 on 8×1280×8×8 to 1×512×64×64, 0.69 at
# 1×512×128×128), k = (mean·rstd)²: over the bound from sqrt(k·H·W) ≈ 130. ATen's backward is kept where
# sqrt(k·H·W) ≤ 20, i.e. max |mean·rstd| ≤ 20 / sqrt(H·W) (the worst offset case measured there 0.16 of the bound).
# fp64 (tolerance 1e-7): 2²⁰ times that; at 1×64×64×64 ATen's fp64 dweight is 0.065 of the tolerance from the fp64
# reference at sqrt(k·H·W) = 6.5e7 (offset 10⁶), 0.61 at 6.5e8.
_TRUSTED_GRADIENT_SPREAD = {torch.float32: 20.0, torch.float64: 20.0 * 2.0 ** 20}


def _max_trusted_gradient_product(x: Tensor) -> float:
    """The largest ``max |mean·rstd|`` of ATen's NCHW statistics of ``x`` for which its backward is kept
    (:data:`_TRUSTED_GRADIENT_SPREAD`)."""
    n, c = x.shape[:2]
    return _TRUSTED_GRADIENT_SPREAD[x.dtype] / math.sqrt(x.numel() // (n * c))


# ATen's NCHW forward takes two-pass statistics but writes ``y = x·scale + shift`` (``scale = γ·rstd``,
# ``shift = β − mean·scale``): both terms are of the size of ``mean·rstd`` and round at that scale. Measured (fp32,
# one thread, input N(0, 1) + offset; 2×320×32×32, 8×1280×8×8, 2×64×12×10, 4×64×8×8, three inputs each), its output
# error in units of the bound is 0.12-0.16 at max |mean·rstd| 10-12, 0.21-0.30 at 31-35, 0.31-0.44 at 51-59,
# 0.47-0.62 at 102-118, 0.69-0.97 at 306-355, 0.85-1.35 at 1021-1182 (the fp32 reference's mean rounds at the
# offset's scale too, so the ratio levels off near 1). ATen's output is kept where max |mean·rstd| ≤ 64; above it
# is recomputed from the centred input (:func:`_accurate_group_norm`). fp64: 2²⁰ times that (0.15-0.29 of the fp64
# bound at 1.1-1.2e8, 1.3-1.9 at 1.1-1.2e9). Above every NCHW backward threshold: such an input is recomputed
# under autograd by :class:`_GroupNormFunction`.
_TRUSTED_AFFINE_PRODUCT = {torch.float32: 64.0, torch.float64: 64.0 * 2.0 ** 20}


def _aten_forward(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float) -> tuple[Tensor, Tensor, Tensor, bool, bool]:
    """ATen's group norm of ``x`` (recorded by autograd where its inputs require grad), and whether its statistics
    are trusted for its output and for its backward (NaN statistics give a NaN output either way):
    ``(y, mean, rstd, forward_trusted, backward_trusted)``. Channels-last: both by :func:`_max_trusted_product`; NCHW,
    whose forward statistics are two-pass: its output by :data:`_TRUSTED_AFFINE_PRODUCT`, its backward by
    :func:`_max_trusted_gradient_product`."""
    n, c = x.shape[:2]
    if _is_channels_last(x):
        max_forward_product = max_backward_product = _max_trusted_product(x, num_groups)
    else:
        max_forward_product, max_backward_product = _TRUSTED_AFFINE_PRODUCT[x.dtype], _max_trusted_gradient_product(x)
    y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, x.numel() // (n * c), num_groups, eps)
    product = _max_abs_product(mean, rstd)
    return y, mean, rstd, product <= max_forward_product, product <= max_backward_product


class _GroupNormFunction(torch.autograd.Function):
    """An input under autograd whose ATen backward is not trusted. The forward is ATen's (given, detached: ``aten``,
    with whether its statistics are trusted), redone by :func:`_accurate_group_norm` where untrusted.

    Channels-last input whose forward statistics are not trusted or whose parameter gradients ATen would sum in long
    runs (:func:`_needs_accurate_param_grads`): the backward from per-(sample, channel) sums in short runs
    (:func:`_per_channel_sums`), ``dweight``, ``dbias`` and ``dx`` (:func:`_input_grad`), from the forward's
    statistics. Contiguous NCHW input whose backward would cancel (:func:`_max_trusted_gradient_product`): ATen's
    backward of the centred input (:func:`_centred`, about the group means the forward saved), one more elementwise
    pass and a reduction."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                aten: tuple[Tensor, Tensor, Tensor, bool]) -> Tensor:
        y, mean, rstd, trusted = aten
        if not trusted:
            y, mean, rstd = _accurate_group_norm(x, num_groups, weight, bias, eps, y, mean)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.eps = num_groups, eps
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        needs_dx, _, needs_dweight, needs_dbias, _, _ = ctx.needs_input_grad
        if torch.is_grad_enabled():  # a double backward: the saved statistics hold no graph, so autograd from x
            leaves = [t for t, need in zip((x, weight, bias), (needs_dx, needs_dweight, needs_dbias)) if need]
            with torch.enable_grad():
                y = torch.group_norm(x, ctx.num_groups, weight, bias, ctx.eps, True)
                grads = iter(torch.autograd.grad(y, leaves, dy, create_graph=True))
            return (next(grads) if needs_dx else None, None, next(grads) if needs_dweight else None,
                    next(grads) if needs_dbias else None, None, None)
        if not _is_channels_last(x):  # ATen's backward of x − mean about its exact group mean: nothing cancels
            n, c = x.shape[:2]
            centred = _centred(x, mean)  # and its group means: with ``mean``, x's without the rounding of ``mean``
            offset = centred.view(n, ctx.num_groups, -1).mean(2)
            dy = dy.contiguous()
            dx, dweight, dbias = torch.ops.aten.native_group_norm_backward(
                dy, centred, offset, rstd, weight, n, c, x.numel() // (n * c), ctx.num_groups,
                [needs_dx, needs_dweight, needs_dbias and weight is not None])
            if needs_dbias and weight is None:  # (ATen's backward fails when asked for it without a weight)
                dbias = dy.sum([0, *range(2, dy.dim())])
            return dx, None, dweight, dbias, None, None
        dy = dy.contiguous(memory_format=_CHANNELS_LAST_FORMATS[x.dim()])
        xhat_sums, dy_sums = _per_channel_sums(dy, x, mean, rstd)
        dx = _input_grad(dy, x, weight, mean, rstd, xhat_sums, dy_sums) if needs_dx else None
        return (dx, None, xhat_sums.sum(0) if needs_dweight else None, dy_sums.sum(0) if needs_dbias else None,
                None, None)


def _has_storage(x: Tensor) -> bool:
    """Whether ``x`` has storage: not a tensor of a ``torch.func`` transform (whose statistics ``vmap`` cannot read as
    numbers, and which :class:`_GroupNormFunction`, an autograd.Function without ``setup_context``, cannot take: NCHW
    input there runs ATen's forward and backward unchecked)."""
    try:
        x.data_ptr()
    except RuntimeError:
        return False
    return True


# The compiled NCHW kernel (csrc/group_norm_nchw.c): its dtype flags and activation codes.
_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_KERNEL_ACTIVATIONS = {None: 0, "silu": 1, "relu": 2}


def _nchw_forward_kernel() -> Any:
    return _compiled.function("group_norm_nchw", "group_norm_nchw_fwd", None, ctypes.c_void_p, ctypes.c_int,
                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                            ctypes.c_float, ctypes.c_int, ctypes.c_int)


def _nchw_backward_kernel() -> Any:
    return _compiled.function("group_norm_nchw", "group_norm_nchw_bwd", None, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int)


def _nchw_kernel_for(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], act: Optional[str]) -> Any:
    """The compiled NCHW forward if it runs this call, else ``None``: contiguous fp32 or bf16 input, an activation it
    fuses, contiguous parameters of one dtype (fp32 or bf16), plain tensors outside ``torch.compile``, and the kernel
    built. (Plain conditions: this runs on every call, and a set or generator of the dtypes cost a microsecond.)"""
    if not (act in _KERNEL_ACTIVATIONS and x.dtype in _KERNEL_DTYPES and x.is_contiguous()):
        return None
    param = weight if weight is not None else bias
    if param is not None and not (
            param.dtype in _KERNEL_DTYPES and (weight is None or weight.is_contiguous())
            and (bias is None or (bias.dtype is param.dtype and bias.is_contiguous()))):
        return None
    if torch.compiler.is_compiling() or not host_readable(x, weight, bias):
        return None
    return _nchw_forward_kernel()


def _nchw_kernel_forward(kernel: Any, x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float, act: Optional[str], statistics: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``(y, statistics)`` of the compiled forward ``kernel``: with ``statistics``, a ``(2, N, G)`` fp32 tensor of
    the mean and the rstd, else ``None``."""
    n, c = x.shape[:2]
    param = weight if weight is not None else bias
    y = torch.empty_like(x)
    stats = torch.empty((2, n, num_groups), dtype=torch.float32) if statistics else None
    mean = None if stats is None else stats.data_ptr()
    kernel(x.data_ptr(), _KERNEL_DTYPES[x.dtype], _compiled.ptr(weight), _compiled.ptr(bias),
           param is not None and param.dtype is torch.bfloat16, y.data_ptr(), mean,
           None if mean is None else mean + 4 * n * num_groups, n, c, x.numel() // (n * c), num_groups, eps,
           _KERNEL_ACTIVATIONS[act], _compiled.threads())
    return y, stats


def _nchw_backward(dy: Tensor, x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                   act: Optional[str], statistics: Tensor, needs: tuple[bool, bool, bool]) -> list[Optional[Tensor]]:
    """``[dx, dweight, dbias]`` (``None`` where not in ``needs``) of contiguous NCHW ``x`` by the compiled backward,
    from the forward's ``(2, N, G)`` fp32 ``statistics``; ``dweight``/``dbias`` in the parameters' dtype."""
    n, c = x.shape[:2]
    dy = dy.contiguous()
    param = weight if weight is not None else bias
    sums = torch.empty((n, c, 2), dtype=torch.float64)
    dx = torch.empty_like(x) if needs[0] else None
    dweight, dbias = (torch.empty(c, dtype=torch.float32) if need else None for need in needs[1:])
    mean = statistics.data_ptr()
    _nchw_backward_kernel()(dy.data_ptr(), x.data_ptr(), _KERNEL_DTYPES[x.dtype], _compiled.ptr(weight),
                            _compiled.ptr(bias), param is not None and param.dtype is torch.bfloat16, mean,
                            mean + 4 * n * num_groups, _compiled.ptr(dx), _compiled.ptr(dweight), _compiled.ptr(dbias),
                            sums.data_ptr(), n, c, x.numel() // (n * c), num_groups, _KERNEL_ACTIVATIONS[act],
                            _compiled.threads())
    return [dx, _param_grad(dweight, weight), _param_grad(dbias, bias)]


def _differentiable(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """Whether autograd records a call on these."""
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


# The compiled channels-last kernels (csrc/group_norm_channels_last.c) take the NCHW kernel's dtype flags and
# activation codes (GELU runs after them, on their fp32 output).
_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64


def _forward_kernel() -> Any:
    return _compiled.function("group_norm_channels_last", "group_norm_cl_fwd", ctypes.c_int, _POINTER, _POINTER,
                              ctypes.c_int, _POINTER, _POINTER, _POINTER, _POINTER, _SIZE, _SIZE, _SIZE, _SIZE,
                              ctypes.c_double, ctypes.c_int, ctypes.c_int)


def _backward_kernel() -> Any:
    return _compiled.function("group_norm_channels_last", "group_norm_cl_bwd", ctypes.c_int, _POINTER, _POINTER,
                              _POINTER, ctypes.c_int, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER,
                              _SIZE, _SIZE, _SIZE, _SIZE, ctypes.c_int, ctypes.c_int)


def _kernel_param(p: Optional[Tensor]) -> Optional[Tensor]:
    """A weight or bias as the kernels read it: ``C`` contiguous fp32 values (``p`` itself where it is)."""
    if p is None or (p.dtype is torch.float32 and p.is_contiguous()):
        return p
    return p.detach().to(torch.float32).contiguous()


def _param_grad(grad: Optional[Tensor], param: Optional[Tensor]) -> Optional[Tensor]:
    """The kernel's fp32 gradient of a weight or bias, in the parameter's dtype."""
    return grad if grad is None or param.dtype is torch.float32 else grad.to(param.dtype)


def _channels_last_forward(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                           act: Optional[str], statistics: bool) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """``(y, statistics)`` of the compiled forward of ``x`` (channels innermost and dense: :func:`_channels_innermost`),
    ``act`` fused: ``y`` in ``x``'s dtype and memory format; with ``statistics``, the mean and rstd as ``(2, N, G)``
    fp64, else ``None``. ``None`` where the kernel is unavailable or could not allocate its scratch memory."""
    kernel = _forward_kernel()
    if kernel is None:
        return None
    n, c = x.shape[:2]
    y = torch.empty_like(x)  # (x's strides: it is dense)
    stats = torch.empty((2, n, num_groups), dtype=torch.float64) if statistics else None
    mean = None if stats is None else stats.data_ptr()
    weight, bias = _kernel_param(weight), _kernel_param(bias)  # (alive until the call returns)
    failed = kernel(x.data_ptr(), y.data_ptr(), _KERNEL_DTYPES[x.dtype], _compiled.ptr(weight), _compiled.ptr(bias),
                    mean, None if mean is None else mean + n * num_groups * 8, n, x.numel() // (n * c), c,
                    num_groups, eps, _KERNEL_ACTIVATIONS[act], _compiled.threads())
    return None if failed else (y, stats)


def _channels_innermost(x: Tensor) -> bool:
    """Whether ``x``'s channels are innermost and dense, and it is not also NCHW-contiguous: channels_last,
    channels_last_3d, or a transposed ``(N, L, C)`` (its ``(N, *spatial, C)`` view is contiguous)."""
    if x.dim() < 3 or x.is_contiguous():
        return False
    memory_format = _CHANNELS_LAST_FORMATS.get(x.dim())
    return x.is_contiguous(memory_format=memory_format) if memory_format else x.movedim(1, -1).is_contiguous()


def _composite_grads(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     act: Optional[str], dy: Tensor, needs: tuple[bool, bool, bool]) -> list[Optional[Tensor]]:
    """``[dx, dweight, dbias]`` (``None`` where not in ``needs``) by autograd of ATen's group norm and the activation,
    graphs kept when grad mode is on: a double backward (the saved statistics hold no graph)."""
    leaves = [t for t, need in zip((x, weight, bias), needs) if need]
    with torch.enable_grad():
        y = activation(torch.group_norm(opmath(x), num_groups, *params_like(x, weight, bias), eps, True), act)
        grads = iter(torch.autograd.grad(y, leaves, dy, create_graph=torch.is_grad_enabled()))
    return [next(grads) if need else None for need in needs]


def _channels_last_backward(dy: Tensor, x: Tensor, num_groups: int, weight: Optional[Tensor],
                            bias: Optional[Tensor], act: Optional[str], statistics: Tensor,
                            needs: tuple[bool, bool, bool]) -> Optional[list[Optional[Tensor]]]:
    """``[dx, dweight, dbias]`` (``None`` where not in ``needs``) of channels-last ``x`` by the compiled backward,
    from the forward's ``(2, N, G)`` fp64 ``statistics``, or ``None`` where the kernel is unavailable or could not
    allocate its scratch memory."""
    kernel = _backward_kernel()
    if kernel is None:
        return None
    if dy.dtype is not x.dtype or dy.stride() != x.stride():  # (else as it is: x's layout)
        dy = dy.to(x.dtype).movedim(1, -1).contiguous().movedim(-1, 1)
    n, c = x.shape[:2]
    dx = torch.empty_like(x) if needs[0] else None
    dweight, dbias = (torch.empty(c, dtype=torch.float32) if need else None for need in needs[1:])
    kernel_weight, kernel_bias = _kernel_param(weight), _kernel_param(bias)  # (alive until the call returns)
    failed = kernel(dy.data_ptr(), x.data_ptr(), _compiled.ptr(dx), _KERNEL_DTYPES[x.dtype],
                    _compiled.ptr(kernel_weight), _compiled.ptr(kernel_bias), statistics.data_ptr(),
                    statistics.data_ptr() + n * num_groups * 8, _compiled.ptr(dweight), _compiled.ptr(dbias), n,
                    x.numel() // (n * c), c, num_groups, _KERNEL_ACTIVATIONS[act], _compiled.threads())
    return None if failed else [dx, _param_grad(dweight, weight), _param_grad(dbias, bias)]


class _CompiledGroupNormFunction(torch.autograd.Function):
    """fp32/bf16 input under autograd through a compiled kernel pair where the C++ node (csrc/autograd.cpp, the same
    forward and backward) is unavailable, NCHW (:func:`_nchw_backward`) or channels-last
    (:func:`_channels_last_backward`): the forward (run before: ``forward``, the compiled forward's
    ``(y, statistics)``) saves the ``(N, G)`` statistics beside the input, and the backward recomputes the activation's
    input from them (nothing else of the input's size is saved). A double backward (the saved statistics hold no
    graph), a gradient the kernel cannot read, or a kernel that could not run: autograd of ATen's ops from ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                act: Optional[str], backward: Any, forward: tuple[Tensor, Tensor]) -> Tensor:
        y, statistics = forward
        ctx.save_for_backward(x, weight, bias, statistics)
        ctx.num_groups, ctx.eps, ctx.act, ctx.kernel_backward = num_groups, eps, act, backward
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, bias, statistics = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        grads = None
        if not torch.is_grad_enabled() and host_readable(dy):
            grads = ctx.kernel_backward(dy, x, ctx.num_groups, weight, bias, ctx.act, statistics, needs)
        if grads is None:
            grads = _composite_grads(x, ctx.num_groups, weight, bias, ctx.eps, ctx.act, dy, needs)
        dx, dweight, dbias = grads
        return dx, None, dweight, dbias, None, None, None, None


def _compiled_channels_last(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                            eps: float, act: Optional[str]) -> Optional[Tensor]:
    """The group norm of fp32/bf16 ``input`` whose channels are innermost and dense (channels_last,
    channels_last_3d, a transposed ``(N, L, C)``; not also NCHW-contiguous) by the compiled kernels, the activation
    fused (GELU after them, on fp32), or ``None`` where they do not take it: another dtype or layout,
    ``torch.compile``, a tensor subclass or a ``torch.func`` transform, bf16 with GELU (which would round twice), no
    kernels."""
    if (input.dtype not in _KERNEL_DTYPES or input.is_contiguous()  # (first: NCHW calls leave at once)
            or (act == "gelu" and input.dtype is not torch.float32) or torch.compiler.is_compiling()
            or not host_readable(input, weight, bias)  # (before the layout query, which vmap's tensors refuse)
            or not _channels_innermost(input)):
        return None
    fused = act if act in _KERNEL_ACTIVATIONS else None
    differentiable = _differentiable(input, weight, bias)
    extension = _extension.module() if differentiable else None
    if extension is not None:
        y = extension.group_norm(input, weight, bias, num_groups, eps, _KERNEL_ACTIVATIONS[fused], True)
        return y if fused == act else activation(y, act)
    forward = _channels_last_forward(input, num_groups, weight, bias, eps, fused, statistics=differentiable)
    if forward is None:
        return None
    if differentiable:
        y = _CompiledGroupNormFunction.apply(input, num_groups, weight, bias, eps, fused, _channels_last_backward,
                                             forward)
    else:
        y = forward[0]
    return y if fused == act else activation(y, act)


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               act: Optional[str]) -> Tensor:
    """``act(F.group_norm(input, num_groups, weight, bias, eps))`` in the compute dtype, in ``input``'s dtype."""
    compiled = _compiled_channels_last(input, num_groups, weight, bias, eps, act)
    if compiled is not None:
        return compiled
    differentiable = _differentiable(input, weight, bias)
    kernel = _nchw_kernel_for(input, weight, bias, act)
    if kernel is not None:
        extension = _extension.module() if differentiable else None
        if extension is not None:
            return extension.group_norm(input, weight, bias, num_groups, eps, _KERNEL_ACTIVATIONS[act], False)
        forward = _nchw_kernel_forward(kernel, input, num_groups, weight, bias, eps, act, statistics=differentiable)
        if not differentiable:
            return forward[0]
        return _CompiledGroupNormFunction.apply(input, num_groups, weight, bias, eps, act, _nchw_backward, forward)
    x = input
    if not _native(input, weight, bias):  # low-precision input or parameters of another dtype: the compute dtype
        x, (weight, bias) = opmath(input), params_like(input, weight, bias)
    # torch.group_norm is F.group_norm without its Python-side checks, which normlayers.functional has made (its
    # last argument, cudnn_enabled, is deprecated and unused by ATen: F.group_norm's read of the flag is skipped).
    channels_last = _is_channels_last(x)
    # NCHW: checked where contiguous and under autograd (its backward, and then its output), except tensors of
    # torch.func transforms. An inference call is ATen's as it is: its output is within the bound up to
    # max|mean·rstd| ≈ 350 (0.85-1.35 of it at ~1000), and the check, reading the statistics right after the kernel,
    # cost 8-12% of the call there (docs/group_norm.md, "Inputs offset from zero").
    if torch.compiler.is_compiling() or not (
            channels_last or (differentiable and x.is_contiguous() and _has_storage(x))):
        y = torch.group_norm(x, num_groups, weight, bias, eps, True)  # (inductor compiles its own statistics)
    else:
        y, mean, rstd, forward_trusted, backward_trusted = _aten_forward(x, num_groups, weight, bias, eps)
        if y.requires_grad and not (backward_trusted and not (channels_last and
                                                              _needs_accurate_param_grads(x, weight, bias))):
            # ATen's autograd graph is dropped; the Function's forward starts from its (detached) results
            y = _GroupNormFunction.apply(x, num_groups, weight, bias, eps,
                                         (y.detach(), mean.detach(), rstd.detach(), forward_trusted))
        elif not forward_trusted:  # (outside autograd: an untrusted backward is one of an untrusted forward)
            y = _accurate_group_norm(x, num_groups, weight, bias, eps, y, mean)[0]
    if act in _IN_PLACE_ACTIVATIONS and not y.requires_grad:
        # Outside autograd nothing else reads the norm's output: activate it in place, saving a buffer and its
        # traffic.
        y = _IN_PLACE_ACTIVATIONS[act](y)
    elif act is not None:
        y = activation(y, act)
    return y if y.dtype is input.dtype else y.to(input.dtype)
