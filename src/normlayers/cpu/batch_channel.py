"""CPU tier of Batch-Channel Normalization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", arXiv 1903.10520, Sec. 4): one statistics pass and one affine pass forward, one reduction
pass and one affine pass backward, for every dtype, with the per-channel and per-group algebra on ``(N, C)``
statistics in between.

Both stages are per-channel affine maps of ``x`` whose statistics follow from the per-(sample, channel) mean ``m``
and biased variance ``v`` of ``x`` (law of total variance over equal-sized parts: no cancellation):

    batch:  μ_c = mean_n m_nc,  σ²_c = mean_n (v_nc + (m_nc − μ_c)²)   (or the running statistics)
            u = a_c·(x − μ_c) + β_c,   a_c = γ_c / sqrt(σ²_c + bn_eps)
    group:  mu_nc = a_c·(m_nc − μ_c) + β_c (the plane mean of u),  M_ng = mean_{c∈g} mu_nc,
            V_ng = mean_{c∈g} (a_c²·v_nc + (mu_nc − M_ng)²),  R_ng = 1 / sqrt(V_ng + eps)

so ``y = A_nc·(x − m_nc) + B_nc`` with ``A = w_g·R_ng·a_c`` and ``B = w_g·R_ng·(mu_nc − M_ng) + b_g``. fp32/fp64:
``m`` and ``v`` come from ATen's group norm with one channel per group, whose normalized output
``Y = (x − m)·rstd`` becomes the output buffer, ``y = (A/rstd)·Y + B`` in place. bf16/fp16: from the raw sums
``Σ x`` and ``Σ x²`` of each plane (fp32 sums of exact fp32 products, one read of ``x``; :func:`_raw_plane_moments`)
where a bound on their rounding holds (:func:`_raw_moments_limit`; else that group norm's two-pass statistics, in
fp32), then ``y = A·x + (B − A·m)`` from ``x`` by ATen's eval batch norm over the ``N·C`` planes with fp32 ``A``,
``B`` (computed in fp32, rounded once, as the reference).

Where the compiled kernels run (:mod:`normlayers.cpu._native`; fp32 or bf16 contiguous ``x``, fp32 or bf16 small
tensors; ``csrc/batch_channel.c``), one C call does all of it: the plane moments in one read of ``x`` (fp32 sums
about the mean of a block's first values, again about its mean from L1 where those were far from it; blocks of 1024
values combined in fp64: no trust check and no second route), the ``(N, C)`` algebra and the running updates in fp64,
and ``y`` in one more pass; with constant batch-stage statistics (eval, EstBN) each (sample, group) block's moments and
output in turn, its second read from cache. Its backward is the closed form below, the two passes of ``x`` and ``dy``
in C too. Elsewhere (fp16, fp64, no compiler, ``NORMLAYERS_CPU_KERNELS=0``) the ATen route of this docstring runs.

The backward needs per plane only ``s1 = Σ dy`` and ``s2 = Σ dy·(x − m)`` (one pass of ATen's
``native_batch_norm_backward`` without ``grad_input``): with ``ŷ = R·(u − M)`` and ``K = (C/G)·H·W`` values per
group, the group stage gives ``du = w·R·(dy − (Σ_g dy + ŷ·Σ_g dy·ŷ)/K) = P1·dy + Q1·(x − m) + S1`` per plane
(``Σ_hw dy·ŷ = R·(a·s2 + (mu − M)·s1)``), the batch stage ``dx = a·(du − mean(du) − x̂·mean(du·x̂))`` (batch
statistics; ``dx = a·du`` with running ones), whose sums over ``(N, H, W)`` follow from ``s1``, ``s2`` and ``v``. So
``dx = P·dy + Q·x + S``: ``Q·x + S`` by the same eval batch norm (fp32 coefficients, rounded once), then ``+ P·dy``.
The parameter gradients are sums of those per-plane quantities.

fp32/fp64 eval with BatchNorm's running statistics, where the compiled kernel does not run, takes ATen's two stages
directly (:func:`_inference_stages`): with constant batch-stage statistics they take two passes too, and none of the
small ops. (EstBN keeps the fused path in eval, so that its frozen estimates give bit for bit the training output.)

The ``(N, C)`` algebra between the passes, forward and backward, runs in numpy on the host, in the compute dtype
(fp32 beside bf16/fp16, fp64 for fp64): ATen's statistics are read as numpy views of their memory, the parameters
and running statistics copied in one ``torch.cat`` (:func:`_host_copies`), and the coefficients handed back to the
kernels by ``torch.from_numpy``, without copies; the running statistics are updated by torch ops in place. Each of
some thirty small ops costs about half as much in numpy as in torch (``(8, 256)`` fp32, warm caches: 0.4 against
0.8 µs for a product, 0.7 against 1.4 µs for a reciprocal square root), and the per-tensor casts go.

Under ``torch.compile`` (where inductor fuses the composite itself) and for a tensor that is not NCHW-contiguous
(channels-last: the plane views need contiguous planes), ``F.batch_norm`` then the CPU tier's group norm run in the
compute dtype (:func:`_composite`); so does a double backward, from ``x``. Channels-last input runs the compiled
forward and backward on its NHWC memory instead, where the kernels run. Outside ``torch.compile``, tensors with no
memory to read on the host (a FakeTensor or another subclass, a ``torch.func`` transform's) and a gradient for the
running statistics (eval; ATen's norms refuse one) run the reference.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers._dtypes import compute_dtype
from normlayers.cpu import _native
from normlayers.cpu._common import LOW_PRECISION, host_readable
from normlayers.cpu.group_norm import group_norm as _cpu_group_norm
from normlayers.reference import batch_channel as _ref_batch_channel

__all__ = ["batch_channel_norm", "supports"]


def supports(momentum: Optional[float], sync: object) -> bool:
    """Whether this tier runs the call: not with synced statistics (the reference gathers them) nor with
    ``momentum=None``, whose rate ``1/num_batches_tracked`` would have to be read back to the host for ATen."""
    return sync is None and momentum is not None


def _in(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # dtype by keyword: the positional form tries ``to``'s device overloads first (1.7 against 1.2 µs, warm)
    return t if t is None or t.dtype == dtype else t.to(dtype=dtype)


def batch_channel_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], *, training: bool, momentum: float, eps: float, num_groups: int,
                       bn_eps: float, estimate: bool, estimate_rate: Union[float, Tensor],
                       num_batches_tracked: Optional[Tensor]) -> Tensor:
    """As :func:`normlayers.reference.batch_channel.batch_channel_norm`, for a call :func:`supports` accepts."""
    compiling = torch.compiler.is_compiling()
    params = (bn_weight, bn_bias, weight, bias)
    if (running_mean is not None and (running_mean.requires_grad or running_var.requires_grad)
            and torch.is_grad_enabled()) or not (compiling or host_readable(x, running_mean, running_var, *params)):
        # a gradient for the running statistics (eval; ATen's norms refuse one), or tensors with no memory to read
        return _ref_batch_channel.batch_channel_norm(
            x, running_mean, running_var, *params, training=training, momentum=momentum, eps=eps,
            num_groups=num_groups, bn_eps=bn_eps, estimate=estimate, estimate_rate=estimate_rate,
            num_batches_tracked=num_batches_tracked, sync=None)
    config = _Config(training, estimate, momentum, estimate_rate, num_groups, eps, bn_eps)
    if compiling:
        return _composite(x, running_mean, running_var, num_batches_tracked, *params, config=config)
    small_bf16 = _native_small_bf16(x, running_mean, running_var, params)
    gradient = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
    if not x.is_contiguous() and (small_bf16 is None or not x.is_contiguous(memory_format=torch.channels_last)):
        return _composite(x, running_mean, running_var, num_batches_tracked, *params, config=config)
    if small_bf16 is None and not training and not estimate and x.dtype not in LOW_PRECISION:
        return _inference_stages(x, running_mean, running_var, bn_weight, bn_bias, weight, bias, num_groups=num_groups,
                                 eps=eps, bn_eps=bn_eps)
    if gradient:
        return _BatchChannelNormFunction.apply(x, running_mean, running_var, num_batches_tracked, config, small_bf16,
                                               *params)
    if small_bf16 is not None:
        return _native_forward(x, running_mean, running_var, num_batches_tracked, params, config, small_bf16)[0]
    return _fused_forward(x, running_mean, running_var, num_batches_tracked, params, config)[0]


# The compiled kernels (csrc/batch_channel.c) read fp32 (0) and bf16 (1) memory.
_NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# Values per thread below which another thread costs more than it saves (ATen's at::internal::GRAIN_SIZE): a team's
# start and the kernel's barriers take microseconds.
_GRAIN = 32768
_MODE_FROZEN, _MODE_BATCH, _MODE_ESTIMATE = 0, 1, 2  # the batch stage's statistics: given, the batch's, EstBN's


def _native_small_bf16(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       params: tuple[Optional[Tensor], ...]) -> Optional[int]:
    """Where the compiled kernels take the call (fp32 or bf16 contiguous tensors, plain: the caller checked, a
    non-empty ``x``, the kernels built): the bits of the small tensors that are bf16 (bit ``i`` for the ``i``-th of
    ``bn_weight, bn_bias, weight, bias, running_mean, running_var``); else ``None``."""
    if x.dtype not in _NATIVE_DTYPES or not x.numel() or _native_kernels() is None:
        return None
    small_bf16 = 0
    for i, t in enumerate((*params, running_mean, running_var)):
        if t is not None:
            bf16 = _NATIVE_DTYPES.get(t.dtype)
            if bf16 is None or not t.is_contiguous():
                return None
            small_bf16 |= bf16 << i
    return small_bf16


def _native_kernels() -> Optional[tuple[Any, Any, Any]]:
    """``(workspace_size, forward, backward)`` of ``csrc/batch_channel.c``, or ``None`` without them."""
    return _loaded_kernels() if _native.enabled() else None


@functools.lru_cache(maxsize=1)
def _loaded_kernels() -> Optional[tuple[Any, Any, Any]]:
    i64, ptr, i32, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    kernels = (_native.function("batch_channel", "bcn_workspace_size", i64, i64, i64, i64),
               _native.function("batch_channel", "bcn_forward", i32, ptr, i32, i32, ptr, i64, i64, i64, i64, ptr,
                                ptr, ptr, ptr, ptr, ptr, i32, i32, f64, f64, f64, ptr, i32),
               _native.function("batch_channel", "bcn_backward", i32, ptr, ptr, ptr, i32, i32, i64, i64, i64, i64,
                                i32, ptr, ptr, ptr, ptr, ptr, i32, i32))
    return None if None in kernels else kernels


def _native_forward(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    num_batches_tracked: Optional[Tensor], params: tuple[Optional[Tensor], ...], config: _Config,
                    small_bf16: int) -> tuple[Tensor, Tensor]:
    """The output, after the running updates, and the kernel's fp64 statistics (its backward's input): the compiled
    forward, one read of ``x`` for the plane moments and one that writes ``y`` (with constant batch-stage
    statistics, block by block: the second read from cache). ``x`` is NCHW- or channels-last-contiguous, ``y`` too."""
    workspace_size, forward, _ = _native_kernels()
    n, c = x.shape[:2]
    groups = config.num_groups
    if not config.training:
        mode, rate = _MODE_FROZEN, 0.0
    elif config.estimate:
        mode, rate = _MODE_ESTIMATE, float(config.estimate_rate)
    else:
        mode, rate = _MODE_BATCH, config.momentum
    channels_last = not x.is_contiguous()
    y = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    statistics = torch.empty(workspace_size(n, c, groups), dtype=torch.float64)
    status = forward(x.data_ptr(), _NATIVE_DTYPES[x.dtype], channels_last, y.data_ptr(), n, c, x.numel() // (n * c),
                     groups, *(_native.ptr(t) for t in (*params, running_mean, running_var)), small_bf16, mode, rate,
                     config.eps, config.bn_eps, statistics.data_ptr(), _native_threads(x))
    if status:
        raise MemoryError("normlayers: the compiled BatchChannelNorm forward could not allocate its scratch memory")
    if mode != _MODE_FROZEN and running_mean is not None:
        # written in place by the kernel: their version counters move, as with F.batch_norm's update
        for buffer in (running_mean, running_var):
            if not buffer.is_inference():
                torch.autograd.graph.increment_version(buffer)
    if mode == _MODE_BATCH and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return y, statistics


def _native_threads(x: Tensor) -> int:
    """The threads a kernel call on ``x`` runs on: torch's, at most one per :data:`_GRAIN` values."""
    return max(1, min(_native.threads(), x.numel() // _GRAIN))


def _native_batch_statistics(statistics: Tensor, x: Tensor, config: _Config) -> tuple[Tensor, Tensor]:
    """The batch stage's ``(mean, var)`` the compiled forward normalized with, in the compute dtype: its workspace
    holds them after the per-plane mean, variance and group deviation (``csrc/batch_channel.c``, ``Stats``)."""
    n, c = x.shape[:2]
    start = 3 * n * c
    dtype = compute_dtype(x.dtype)
    return statistics[start:start + c].to(dtype), statistics[start + c:start + 2 * c].to(dtype)


def _native_backward(x: Tensor, dy: Tensor, statistics: Tensor, params: list[Optional[Tensor]], config: _Config,
                     small_bf16: int, needs: tuple[bool, ...]) -> tuple[Optional[Tensor], ...]:
    """The compiled backward from the compiled forward's statistics: one read of ``x`` and ``dy`` (in ``x``'s layout)
    for the per-plane sums, one that writes ``dx``; the parameter gradients in the parameters' dtypes."""
    backward = _native_kernels()[2]
    channels_last = not x.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    # contiguous(), not to(memory_format=): to() may hand back an expanded gradient (y.sum()'s) as it is
    dy = _in(dy, x.dtype).contiguous(memory_format=layout)
    n, c = x.shape[:2]
    dx = torch.empty_like(x, memory_format=layout) if needs[0] else None
    grads = [torch.empty_like(p) if need else None for p, need in zip(params, needs[6:])]
    status = backward(x.data_ptr(), dy.data_ptr(), _native.ptr(dx), _NATIVE_DTYPES[x.dtype], channels_last, n, c,
                      x.numel() // (n * c), config.num_groups, config.batch_stats, statistics.data_ptr(),
                      *(_native.ptr(g) for g in grads), small_bf16, _native_threads(x))
    if status:
        raise MemoryError("normlayers: the compiled BatchChannelNorm backward could not allocate its scratch memory")
    return (dx, None, None, None, None, None, *grads)


def _inference_stages(x: Tensor, running_mean: Tensor, running_var: Tensor, *params: Optional[Tensor],
                      num_groups: int, eps: float, bn_eps: float) -> Tensor:
    """fp32/fp64 inference: ATen's eval batch norm, then its group norm (the per-group affine spread over the group's
    channels), called below their functional wrappers; a gradient, if any, is autograd's through the two. With
    constant batch-stage statistics the two stages are two passes, as the fused forward's statistics and affine
    passes are, without its ``(N, C)`` algebra (some twenty small ops). fp32 ``u`` loses nothing the tolerances see;
    bf16/fp16 would round it, so they run the fused forward. (This is the CPU tier's most frequent call, in every
    CNN's inference: each op here is one that ``F.batch_norm`` then ``F.group_norm`` run too, or cheaper.)"""
    dtype = x.dtype
    bn_weight, bn_bias, weight, bias = (_in(p, dtype) for p in params)
    n, c = x.shape[:2]
    u = torch._native_batch_norm_legit_no_training(x, bn_weight, bn_bias, _in(running_mean, dtype),
                                                   _in(running_var, dtype), 0.0, bn_eps)[0]
    if weight is not None or bias is not None:  # one value per channel: the group's, by index
        index = _constant(_group_of_channel, x, c, num_groups, x.device)
        weight, bias = (None if t is None else t.reshape(num_groups).index_select(0, index) for t in (weight, bias))
    return torch.native_group_norm(u, weight, bias, n, c, x.numel() // (n * c), num_groups, eps)[0]


def _constant(make: Any, x: Tensor, *key: Any) -> Tensor:
    """``make(*key)``, one of the constant tensors below, which ATen calls only read: cached for a plain ``x`` (a
    subclass, e.g. a FakeTensor, may carry a mode its constants must not outlive). Each is made as a normal tensor even
    under ``torch.inference_mode`` (an inference tensor cannot be saved for a backward)."""
    return make(*key) if type(x) is Tensor else make.__wrapped__(*key)


@functools.lru_cache(maxsize=64)
def _group_of_channel(channels: int, groups: int, device: torch.device) -> Tensor:
    """The group index of each channel, ``(C,)`` int64: with ``index_select`` it spreads a per-group affine over the
    channels in one op (``repeat_interleave`` takes several, about 3x the time here)."""
    with torch.inference_mode(False):
        return torch.arange(channels, device=device).div_(channels // groups, rounding_mode="floor")


@functools.lru_cache(maxsize=64)
def _ones(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ones vector, an ATen norm's unit weight or variance (a fresh one per call cost a fill and, on this tier's
    CPUs, an allocation as slow as a few small ops)."""
    with torch.inference_mode(False):
        return torch.ones(numel, dtype=dtype, device=device)


class _Config(NamedTuple):
    """The non-tensor arguments (and ``estimate_rate``, which may be a tensor buffer)."""

    training: bool
    estimate: bool
    momentum: float
    estimate_rate: Union[float, Tensor]
    num_groups: int
    eps: float
    bn_eps: float

    @property
    def batch_stats(self) -> bool:
        """Whether the batch stage normalizes with the batch's statistics (else with the running ones, constants)."""
        return self.training and not self.estimate


def _plane_moments(x: Tensor) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """Mean and standard deviation (biased; compute dtype, ``(N, C)``, on the host) of each (sample, channel) plane,
    with ATen's group norm of one channel per group (beside an fp32 weight for bf16/fp16: its mixed-type path, fp32
    statistics); also its output ``(x − m)·rstd``, the buffer the output is written into. ``eps`` is a tiny 1e-30, far
    below any variance that matters, so that a constant plane gives a finite rstd rather than ``0·inf``."""
    n, c = x.shape[:2]
    ones = _constant(_ones, x, c, torch.float32, x.device) if x.dtype in LOW_PRECISION else None
    normalized, mean, rstd = torch.native_group_norm(x, ones, None, n, c, x.numel() // (n * c), c, 1e-30)
    rstd = rstd.numpy()
    return mean.numpy().reshape(n, c), np.reciprocal(rstd, out=rstd).reshape(n, c), normalized


@functools.lru_cache(maxsize=64)
def _raw_moments_limit(plane_size: int, dtype: torch.dtype) -> float:
    """The largest ``mean²/variance`` of a plane for which :func:`_raw_plane_moments` keeps the variance's relative
    error below ``u/8`` (``u`` the unit roundoff of ``dtype``, 2^-8 bf16, 2^-11 fp16), so the normalized values'
    below ``u/16``; at most 0 where no plane of this size qualifies.

    Each ``x²`` of bf16/fp16 values is exact in fp32; ATen sums ``x`` and ``x²`` in fp32 into one 8- or 16-lane
    accumulator, then adds the lanes and the tail one by one (``ComputeInternalGradients`` in pytorch's
    aten/src/ATen/native/cpu/group_norm_kernel.cpp), so each sum is within ``γ = (size/8 + 64)·2^-24`` of the sum of
    its terms' magnitudes. Then ``E[x²]`` is off by ``γ·(v + m²)`` and ``m²`` by ``2γ·|m|·(|m| + σ)``: in all
    ``γ·v·(2 + 4·m²/v)`` at most, ``≤ v·u/8`` when ``m²/v ≤ u/(32γ) − 1/2``."""
    roundoff = torch.finfo(dtype).eps / 2
    return roundoff / (32 * (plane_size / 8 + 64) * 2.0 ** -24) - 0.5


# The range of ``var − mean²/limit + 2^-100`` in which :func:`_raw_plane_moments` trusts a plane: positive and not
# tiny (an exact zero, an all-zero plane's, sits at 2^-100), finite and below 2^121 (a NaN fails both comparisons):
# the fp32 range that normlayers.cpu._common.all_positive_finite accepts.
_TRUSTED_CHECK_RANGE = (2.0 ** -125, 2.0 ** 121)


def _raw_plane_moments(x: Tensor) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """For bf16/fp16 ``x``: the mean and biased variance (fp32, ``(N, C)``, on the host) of each plane from its raw
    moments ``Σ x`` and ``Σ x²``, or ``None`` where they are not trusted: a plane whose mean is too large for its spread
    (:func:`_raw_moments_limit`), a NaN or inf, or a variance from about ``2^121`` up. Both sums come from one read of
    ``x`` by ATen's group-norm backward over the ``N·C`` planes as the channels of one sample, without ``grad_input``,
    with ``x`` as its own output gradient and a zero mean, unit rstd and unit weight (its weight gradient is then
    ``Σ x·x`` per plane, its bias gradient ``Σ x``; fp32 sums of the bf16/fp16 values, the mixed-type path): 3-4x
    faster than the group norm with one channel per group that :func:`_plane_moments` runs (0.066-0.080 against
    0.26-0.29 ms, 8x256x14x14 bf16, one thread), which also writes an output."""
    n, c = x.shape[:2]
    planes = n * c
    plane_size = x.numel() // planes
    limit = _raw_moments_limit(plane_size, x.dtype)
    if limit <= 0 or plane_size == 1:  # planes of one value are constant: the check below would refuse them
        return None
    values = x.view(1, planes, plane_size)
    zero, one = _constant(_unit_statistics, x, x.device)
    weight = _constant(_ones, x, planes, torch.float32, x.device)
    _, sum_sq, total = torch.ops.aten.native_group_norm_backward.default(
        values, values, zero, one, weight, 1, planes, plane_size, 1, [False, True, True])
    mean, var = total.numpy(), sum_sq.numpy()
    mean /= plane_size
    var /= plane_size
    check = mean * mean
    var -= check
    # var − mean²/limit within the trusted range for every plane: a NaN fails; the shift keeps an exact zero, an
    # all-zero plane's, from reading as tiny
    check *= -1 / limit
    check += var
    check += 2.0 ** -100
    low, high = _TRUSTED_CHECK_RANGE
    if not (np.minimum.reduce(check, None) >= low and np.maximum.reduce(check, None) < high):
        return None
    return mean.reshape(n, c), var.reshape(n, c)


@functools.lru_cache(maxsize=8)
def _unit_statistics(device: torch.device) -> tuple[Tensor, Tensor]:
    """A zero mean and a unit rstd, ``(1, 1)`` fp32: the statistics of one group, for :func:`_raw_plane_moments`."""
    with torch.inference_mode(False):
        return torch.zeros(1, 1, device=device), torch.ones(1, 1, device=device)


def _host_copies(dtype: torch.dtype, *tensors: Optional[Tensor]) -> list[Optional[np.ndarray]]:
    """Copies of the small tensors (parameters, running statistics) in ``dtype``, flattened, as numpy arrays: one
    ``torch.cat`` for all of them (a ``.to()`` and a ``.numpy()`` per tensor took 9.8 µs for six bf16 vectors, one
    ``cat``, ``.float()`` and ``.numpy()`` 3.2 µs; one thread, warm caches), detached (the fused path's gradients are
    its own closed form)."""
    present = [t if t.dim() == 1 else t.reshape(-1) for t in tensors if t is not None]
    if not present:
        return [None] * len(tensors)
    flat = _in(torch.cat(present), dtype).numpy(force=True)
    copies, start = [], 0
    for t in tensors:
        if t is None:
            copies.append(None)
        else:
            copies.append(flat[start:start + t.numel()])
            start += t.numel()
    return copies


def _tensor(array: np.ndarray, *shape: int) -> Tensor:
    """A host array (the statistics' algebra) as a tensor of ``shape``, sharing its memory."""
    return torch.from_numpy(array.reshape(shape))


def _mean(a: np.ndarray, axis: int) -> np.ndarray:
    """``a``'s mean over ``axis`` (its sum divided by the count, as ``Tensor.mean``): ``np.add.reduce`` directly
    (0.9 µs against 3.1 µs for ``ndarray.mean``, whose Python wrapper dominates at ``(8, 256)``)."""
    return np.divide(np.add.reduce(a, axis), a.shape[axis])


def _group_mean(a: np.ndarray) -> np.ndarray:
    """The mean of ``a`` ``(N, G, C/G)`` over each group's channels, ``(N, G, 1)``: ``einsum``'s sum, at half of
    ``np.add.reduce``'s cost over a short last axis."""
    return np.divide(np.einsum("ngc->ng", a)[..., None], a.shape[-1])


def _fused_forward(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   num_batches_tracked: Optional[Tensor], params: tuple[Optional[Tensor], ...],
                   config: _Config) -> tuple[Tensor, tuple[np.ndarray, ...]]:
    """The output, after the running updates, and the statistics and coefficients its backward reads.

    The ``(N, C)`` algebra runs in numpy on the host (module docstring)."""
    dtype = compute_dtype(x.dtype)
    frozen = (None, None) if config.training else (running_mean, running_var)  # eval: the batch stage's statistics
    bn_weight, bn_bias, weight, bias, batch_mean, batch_var = _host_copies(dtype, *params, *frozen)
    groups = config.num_groups
    moments = _raw_plane_moments(x) if x.dtype in LOW_PRECISION else None
    if moments is None:
        plane_mean, plane_std, normalized = _plane_moments(x)
        plane_var = plane_std * plane_std
    else:
        (plane_mean, plane_var), normalized = moments, None
    n, c = plane_mean.shape
    if config.training:
        batch_mean = _mean(plane_mean, 0)
        centred = plane_mean - batch_mean
        batch_var = _mean(plane_var + centred * centred, 0)
        if running_mean is not None or num_batches_tracked is not None:
            _update_running_statistics(running_mean, running_var, num_batches_tracked, batch_mean, batch_var,
                                       count=x.numel() // c, config=config)
        if config.estimate:  # the batch stage normalizes with the updated estimates
            batch_mean, batch_var = _host_copies(dtype, running_mean, running_var)
    if not config.batch_stats:
        centred = plane_mean - batch_mean
    scale = np.reciprocal(np.sqrt(batch_var + config.bn_eps))  # a_c = γ_c·scale_c
    a = scale if bn_weight is None else scale * bn_weight
    u_mean = (centred * a if bn_bias is None else centred * a + bn_bias).reshape(n, groups, -1)  # mu_nc
    u_dev = u_mean - _group_mean(u_mean)  # mu_nc − M_ng
    u_var = (plane_var * (a * a)).reshape(n, groups, -1)  # the plane variance of u
    group_rstd = np.reciprocal(np.sqrt(_group_mean(u_var + u_dev * u_dev) + config.eps))
    w_rstd = group_rstd if weight is None else group_rstd * weight.reshape(1, groups, 1)
    plane_shift = w_rstd * u_dev if bias is None else w_rstd * u_dev + bias.reshape(1, groups, 1)  # B
    plane_scale = w_rstd * a.reshape(groups, -1)  # A
    if x.dtype in LOW_PRECISION:
        y = _plane_affine(x, plane_scale, plane_shift, plane_mean, out=normalized)
    else:  # y = A·(x − m) + B = (A·std)·normalized + B
        y = normalized.mul_(_tensor(plane_scale.reshape(n, c) * plane_std, n, c, 1, 1)).add_(
            _tensor(plane_shift, n, c, 1, 1))
    return y, (plane_mean, plane_var, batch_mean, batch_var, centred, a, scale, u_dev, group_rstd, w_rstd)


def _update_running_statistics(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                               num_batches_tracked: Optional[Tensor], batch_mean: np.ndarray, batch_var: np.ndarray,
                               *, count: int, config: _Config) -> None:
    """The training call's update of the buffers, in place, by torch ops (their version counters move, as with
    ``F.batch_norm``): EstBN's, or BatchNorm's (``num_batches_tracked`` counts the call)."""
    batch_mean, batch_var = torch.from_numpy(batch_mean), torch.from_numpy(batch_var)
    if config.estimate:
        _ref_batch_channel.estimate_update_(running_mean, running_var, batch_mean, batch_var, config.estimate_rate)
    elif running_mean is not None and running_mean.dtype == running_var.dtype == batch_mean.dtype:
        # F.batch_norm's update, one lerp per buffer (the reference's form costs five small ops each)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        running_mean.lerp_(batch_mean, config.momentum)
        running_var.lerp_(batch_var * (count / (count - 1)), config.momentum)
    elif running_mean is not None:
        _ref_batch_channel.update_batch_running_stats_(running_mean, running_var, num_batches_tracked, batch_mean,
                                                       batch_var, count=count, momentum=config.momentum)
    else:
        num_batches_tracked.add_(1)


def _plane_affine(x: Tensor, scale: np.ndarray, shift: np.ndarray, mean: np.ndarray,
                  out: Optional[Tensor] = None) -> Tensor:
    """``scale·(x − mean) + shift`` with one (compute-dtype) coefficient triple per (sample, channel) plane, by ATen's
    eval batch norm over the ``N·C`` planes (variance 1, eps 0: it applies ``scale·x + (shift − mean·scale)``, the
    constant computed in fp32, then for bf16/fp16 ``x`` rounded once)."""
    planes = mean.size
    scale, shift, mean = _tensor(scale, planes), _tensor(shift, planes), _tensor(mean, planes)
    values = x.view(1, planes, -1)
    ones = _constant(_ones, x, planes, mean.dtype, mean.device)
    if out is None:  # made before the kernel: a view of the kernel's output after it costs 7 µs, on cold caches
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    unused = _constant(_ones, x, 0, mean.dtype, mean.device)  # the statistics outputs, left empty in eval
    torch.native_batch_norm(values, scale, shift, mean, ones, False, 0.0, 0.0,
                            out=(out.view(values.shape), unused, unused))
    return out


class _BatchChannelNormFunction(torch.autograd.Function):
    """The fused forward and closed-form backward of the module docstring (its ``(N, C)`` algebra on the host, as
    :func:`_fused_forward`'s)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], config: _Config, small_bf16: Optional[int],
                *params: Optional[Tensor]) -> Tensor:
        if small_bf16 is None:
            y, statistics = _fused_forward(x, running_mean, running_var, num_batches_tracked, params, config)
        else:
            y, statistics = _native_forward(x, running_mean, running_var, num_batches_tracked, params, config,
                                            small_bf16)
        ctx.save_for_backward(x, *params)
        ctx.statistics = statistics  # fresh host arrays (or the kernel's fp64 tensor), no graph: nothing to check
        ctx.config, ctx.small_bf16 = config, small_bf16
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:
        x, *params = ctx.saved_tensors
        config, needs = ctx.config, ctx.needs_input_grad
        if ctx.small_bf16 is not None:
            if torch.is_grad_enabled():
                batch_mean, batch_var = _native_batch_statistics(ctx.statistics, x, config)
                return _differentiable_backward(x, dy, batch_mean, batch_var, params, config, needs)
            return _native_backward(x, dy, ctx.statistics, params, config, ctx.small_bf16, needs)
        plane_mean, plane_var, batch_mean, batch_var, centred, a, scale, u_dev, group_rstd, w_rstd = ctx.statistics
        if torch.is_grad_enabled():  # a double backward: the saved statistics hold no graph, so autograd from x
            return _differentiable_backward(x, dy, torch.from_numpy(batch_mean), torch.from_numpy(batch_var), params,
                                            config, needs)
        groups = config.num_groups
        n, c, h, w = x.shape
        hw, planes = h * w, n * c
        dy = dy.contiguous()
        mean = _tensor(plane_mean, planes)
        ones = _constant(_ones, x, planes, mean.dtype, x.device)
        # s1 = Σ dy, s2 = Σ dy·(x − m) per plane: ATen's batch-norm backward over the N·C planes, reductions only
        _, s2, s1 = torch.ops.aten.native_batch_norm_backward.default(
            dy.view(1, planes, hw), x.view(1, planes, hw), ones, None, None, mean, ones, True, 0.0,
            [False, True, True])
        s1, s2 = s1.numpy().reshape(n, groups, -1), s2.numpy().reshape(n, groups, -1)
        a_g = a.reshape(groups, -1)
        dy_yhat = (a_g * s2 + u_dev * s1) * group_rstd  # Σ_hw dy·ŷ per plane
        count = (c // groups) * hw
        # du = w_rstd·dy + q1·(x − m) + s1_coef per plane, with t = w_rstd·R·mean_g(dy·ŷ) and mean_g(dy) per group:
        # q1 = −t·a, s1_coef = −(w_rstd·mean_g(dy) + t·(mu − M))
        t = w_rstd * group_rstd * np.add.reduce(dy_yhat, -1, keepdims=True) / count
        q1 = -(t * a_g)
        s1_coef = -(w_rstd * (np.add.reduce(s1, -1, keepdims=True) / count) + t * u_dev)
        sum_du = (w_rstd * s1 + s1_coef * hw).reshape(n, c)  # Σ_hw du
        sum_du_dev = (w_rstd * s2 + q1 * plane_var.reshape(n, groups, -1) * hw).reshape(n, c)  # Σ_hw du·(x − m)
        dbn_bias = np.add.reduce(sum_du, 0)
        dbn_weight_unscaled = np.add.reduce(sum_du_dev + centred * sum_du, 0)  # Σ du·(x − μ)
        q1, s1_coef = q1.reshape(n, c), s1_coef.reshape(n, c)
        if config.batch_stats:  # dx = a·(du − mean(du) − x̂·mean(du·x̂))
            total = n * hw
            k = scale * scale * dbn_weight_unscaled / total
            q1 = q1 - k
            s1_coef = s1_coef - (dbn_bias / total + k * centred)
        dx = None
        if needs[0]:
            x_coef, shift = a * q1, a * s1_coef
            dy_coef = w_rstd * a_g
            if dy.dtype == torch.float16 and np.abs(dy_coef).max() > torch.finfo(torch.float16).max:
                # a near-constant channel's coefficient would overflow in fp16: the whole affine in fp32, rounded once
                dx = _plane_affine(x.float(), x_coef, shift, plane_mean).addcmul_(dy.float(),
                                                                                  _tensor(dy_coef, n, c, 1, 1))
                dx = dx.to(x.dtype)
            else:
                dx = _plane_affine(x, x_coef, shift, plane_mean).addcmul_(dy, _in(_tensor(dy_coef, n, c, 1, 1),
                                                                                  dy.dtype))
        grads = (scale * dbn_weight_unscaled, dbn_bias, np.add.reduce(dy_yhat, (0, 2)), np.add.reduce(s1, (0, 2)))
        return (dx, None, None, None, None, None, *(_in(_tensor(g, *p.shape), p.dtype) if need else None
                                                    for g, p, need in zip(grads, params, needs[6:])))


def _differentiable_backward(x: Tensor, dy: Tensor, batch_mean: Tensor, batch_var: Tensor,
                             params: list[Optional[Tensor]], config: _Config,
                             needs: tuple[bool, ...]) -> tuple[Optional[Tensor], ...]:
    """The gradients by autograd through ``F.batch_norm`` and ``F.group_norm`` from ``x`` (with the batch statistics,
    no running update; or the running ones the forward used, as constants), for a double backward."""
    leaves = [t for t, need in zip((x, *params), needs[:1] + needs[6:]) if need]
    with torch.enable_grad():
        bn_weight, bn_bias, weight, bias = (_in(p, batch_mean.dtype) for p in params)
        y = _stages(x.to(batch_mean.dtype), None if config.batch_stats else batch_mean,
                    None if config.batch_stats else batch_var, bn_weight, bn_bias, weight, bias,
                    batch_stats=config.batch_stats, momentum=0.0, config=config)
        grads = iter(torch.autograd.grad(y, leaves, dy.to(y.dtype), create_graph=True))
    return tuple(None if i in (1, 2, 3, 4, 5) or not need else next(grads).to(t.dtype)
                 for i, (t, need) in enumerate(zip((x, None, None, None, None, None, *params), needs)))


def _stages(x: Tensor, mean: Optional[Tensor], var: Optional[Tensor], bn_weight: Optional[Tensor],
            bn_bias: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], *, batch_stats: bool,
            momentum: float, config: _Config) -> Tensor:
    """``F.batch_norm`` then the CPU tier's group norm (the group affine, one value per group, as its per-channel
    affine with each value repeated over its group's channels), in ``x``'s dtype."""
    u = F.batch_norm(x, mean, var, bn_weight, bn_bias, batch_stats, momentum, config.bn_eps)
    channels_per_group = x.shape[1] // config.num_groups
    group_weight, group_bias = (None if t is None else t.reshape(config.num_groups).repeat_interleave(
        channels_per_group) for t in (weight, bias))
    # not F.group_norm: u carries the β_c offsets, against which ATen's channels-last variance cancels (bn_bias = 5:
    # 9.9e-5 from fp64 at 2×64×32×32, the fp32 reference 1.4e-6); the CPU tier checks its statistics
    return _cpu_group_norm(u, config.num_groups, group_weight, group_bias, config.eps, None)


def _composite(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               num_batches_tracked: Optional[Tensor], *params: Optional[Tensor], config: _Config) -> Tensor:
    """:func:`_stages` in the compute dtype (the output rounded once): the batch stage is exactly ``F.batch_norm``'s
    math (biased variance to normalize, the unbiased one into the running variance, the same ``momentum`` rule);
    EstBN's update (``estimate=True``) is the reference's, after which the batch stage is ``F.batch_norm`` in eval
    mode on the updated estimates."""
    dtype = compute_dtype(x.dtype)
    xf = x.to(dtype)
    if config.estimate:
        if config.training:
            with torch.no_grad():
                var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
            _ref_batch_channel.estimate_update_(running_mean, running_var, mean, var, config.estimate_rate)
        stats = (running_mean.to(dtype), running_var.to(dtype))
    else:
        stats = (_in(running_mean, dtype), _in(running_var, dtype))
        if config.training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    out = _stages(xf, *stats, *(_in(p, dtype) for p in params), batch_stats=config.batch_stats,
                  momentum=config.momentum, config=config).to(x.dtype)
    if config.batch_stats and running_mean is not None and running_mean.dtype != dtype:
        with torch.no_grad():  # F.batch_norm updated the opmath copies: store them in the buffers' own dtype
            running_mean.copy_(stats[0])
            running_var.copy_(stats[1])
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out
