"""Launch helpers and kernels shared by every kernel family.

Launch parameters come from static tables, not ``@triton.autotune``: autotuning needs a GPU driver, so it fails
under the interpreter on CPU-only machines, and it adds a benchmarking pass to the first call.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

# Most programs a kernel runs per SM in a persistent grid; the CPU number only shapes interpreter tests (a few
# programs, each walking several row tiles, so the per-program partials and their reduction are exercised).
CPU_PERSISTENT_PROGRAMS = 4


def tl_compute_dtype(dtype: torch.dtype):
    """:func:`normlayers._dtypes.compute_dtype` as the Triton dtype a kernel's ``COMPUTE`` constexpr takes."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _warp_size(device_index: int) -> int:
    return getattr(torch.cuda.get_device_properties(device_index), "warp_size", 32)


def persistent_programs(device: torch.device, programs_per_sm: int) -> int:
    """Size of a persistent grid: ``programs_per_sm`` per SM on CUDA, a small fixed count elsewhere."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * programs_per_sm
    return CPU_PERSISTENT_PROGRAMS


def num_warps_for(tile_elements: int, device: torch.device, max_warps: int = 16) -> int:
    """Warps for a program holding ``tile_elements`` values: one warp per 256 elements, 1 to ``max_warps`` warps.

    Capped so that ``num_warps * warp_size <= 1024`` (AMD's 64-wide warps make 32 warps an invalid launch).
    """
    warps = min(max(tile_elements // 256, 1), max_warps)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        warps = min(warps, 1024 // _warp_size(index))
    return warps


def scale_cap(eps: float, dtype: torch.dtype) -> float:
    """The largest statistics scale :func:`power_of_two_scale` may return for ``eps`` (a power of two; see
    :func:`normlayers.reference.row_norms.scale_exponent_cap`), as a kernel argument."""
    from normlayers.reference.row_norms import scale_exponent_cap

    return 2.0 ** scale_exponent_cap(eps, dtype)


@triton.jit
def power_of_two_scale(max_abs, cap, COMPUTE: tl.constexpr):
    """``s = 2^−e`` with ``max_abs·s`` in ``[1, 2)``, from the exponent bits (exact, no ``log2``/``exp2``), kept in
    ``[2^−k, cap]`` (``k`` = 126 for fp32, 1022 for fp64): statistics of ``x·s`` neither overflow nor underflow
    (the scaling of BLAS ``nrm2``). Normalization is scale invariant once ``eps`` is scaled by ``s²``."""
    if COMPUTE == tl.float64:
        biased = (max_abs.to(tl.int64, bitcast=True) >> 52) & 0x7FF
        s = (tl.minimum(tl.maximum(2046 - biased, 1), 2045) << 52).to(tl.float64, bitcast=True)
    else:
        biased = (max_abs.to(tl.int32, bitcast=True) >> 23) & 0xFF
        s = (tl.minimum(tl.maximum(254 - biased, 1), 253) << 23).to(tl.float32, bitcast=True)
    return tl.minimum(s, cap)


@triton.jit
def centred_row_moments(x, mask, count):
    """Per-row ``(Σx, Σ(x − mean)²)`` of a 2-D tile with ``count`` valid values per row (``x`` zero outside
    ``mask``)."""
    s = tl.sum(x, axis=1)
    d = tl.where(mask, x - (s / count)[:, None], 0.0)
    return s, tl.sum(d * d, axis=1)


@triton.jit
def chan_combine(s_a, m2_a, n_a, s_b, m2_b, n_b):
    """Chan's combination of the ``(Σx, centred M2)`` of two disjoint parts with ``n_a`` and ``n_b`` values: the M2 of
    the union without ever forming ``E[x²] − E[x]²`` (which cancels in fp32 when the mean is large)."""
    delta = s_b / n_b - s_a / n_a
    return s_a + s_b, m2_a + m2_b + delta * delta * (n_a * n_b / (n_a + n_b))


@triton.jit
def store_param_partials(DW_ROW, DB_ROW, cols, mask, dw, db, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         ACCUMULATE: tl.constexpr):
    """Write a program's dW/dB sums for ``cols`` into its own row of the partial buffers (``DW_ROW``/``DB_ROW``
    point at it), or with ``ACCUMULATE`` add them to what it holds; only this program touches that row, and
    :func:`column_sum` later sums the rows in a fixed order (a deterministic backward, no atomics)."""
    if HAS_WEIGHT:
        if ACCUMULATE:
            dw += tl.load(DW_ROW + cols, mask=mask, other=0.0)
        tl.store(DW_ROW + cols, dw, mask=mask)
    if HAS_BIAS:
        if ACCUMULATE:
            db += tl.load(DB_ROW + cols, mask=mask, other=0.0)
        tl.store(DB_ROW + cols, db, mask=mask)


@triton.jit
def column_sum_kernel(PARTIALS, OUT, OUT2, num_rows, N, SPLIT, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column ``n`` of PARTIALS summed over its rows into ``OUT[n]`` for ``n < SPLIT``, else ``OUT2[n − SPLIT]``;
    accumulated in the partials' dtype in a fixed order (deterministic)."""
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=PARTIALS.dtype.element_ty)
    for start in range(0, num_rows, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        mask = (rows < num_rows)[:, None] & col_mask[None, :]
        tile = tl.load(PARTIALS + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(OUT + cols, acc, mask=cols < SPLIT)
    tl.store(OUT2 + (cols - SPLIT), acc, mask=col_mask & (cols >= SPLIT))


def column_sum(partials: torch.Tensor, dtype: torch.dtype, split: Optional[int] = None):
    """Sum a contiguous ``(rows, N)`` fp32 or fp64 buffer over its rows into a new ``(N,)`` tensor of ``dtype``; with
    ``split``, into two new tensors of its first ``split`` and its last ``N − split`` columns (one launch)."""
    num_rows, n = partials.shape
    first = n if split is None else split
    out = torch.empty(first, dtype=dtype, device=partials.device)
    out2 = out if split is None else torch.empty(n - first, dtype=dtype, device=partials.device)
    if n > 0:
        block_n = min(next_power_of_2(n), 256)
        column_sum_kernel[(triton.cdiv(n, block_n),)](partials, out, out2, num_rows, n, first, BLOCK_ROWS=32,
                                                      BLOCK_N=block_n, num_warps=4)
    return out if split is None else (out, out2)


# ----------------------------------------------------------------------------------------------------------------------
# Per-plane kernels (channel statistics, EvoNorm, RegionNorm): an (N, C, *spatial) tensor as N·C planes of H·W values
# ----------------------------------------------------------------------------------------------------------------------

# Widest chunk of a plane one program holds (elements); wider planes are walked in chunks of this size. Tiles hold
# about PLANE_TILE_ELEMENTS values, so small planes get several planes per program (at most PLANE_MAX_BLOCK_P). Starting
# points, not tuned on a GPU.
PLANE_MAX_BLOCK_HW = 2048
PLANE_TILE_ELEMENTS = 4096
PLANE_MAX_BLOCK_P = 64


def as_planes(t: torch.Tensor) -> torch.Tensor:
    """``t`` of shape ``(N, C, *spatial)`` as ``(N, C, HW)``: a view for NCHW, channels-last and channel slices
    (whose spatial dims merge into one stride), a copy only for layouts where they do not."""
    n, c = t.shape[:2]
    hw = math.prod(t.shape[2:])
    try:
        return t.view(n, c, hw)
    except RuntimeError:
        return t.reshape(n, c, hw)


def plane_tile(planes: int, hw: int, max_block_hw: Optional[int]) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_HW) for ``planes`` planes of ``hw`` values; ``max_block_hw`` overrides the chunk cap (tests
    use it to reach the chunked loop on small planes)."""
    cap = max_block_hw if max_block_hw is not None else PLANE_MAX_BLOCK_HW
    block_hw = min(next_power_of_2(hw), 1 << (cap.bit_length() - 1))
    block_p = min(max(PLANE_TILE_ELEMENTS // block_hw, 1), PLANE_MAX_BLOCK_P, next_power_of_2(planes))
    return block_p, block_hw


def plane_strides(t3: torch.Tensor) -> tuple[int, int, int]:
    return t3.stride(0), t3.stride(1), t3.stride(2)


def hole_planes(hole_mask: Optional[torch.Tensor], x3: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The ``(N, 1 or C, *spatial)`` hole mask of a two-region launch as a ``(N, C, HW)`` uint8 view (stride 0 over
    channels for a one-channel mask) and its strides; ``x3`` and zero strides (never read) without a mask."""
    if hole_mask is None:
        return x3, (0, 0, 0)
    hole3 = as_planes(hole_mask.view(torch.uint8) if hole_mask.dtype == torch.bool else hole_mask)
    hole3 = hole3.expand(x3.shape)
    return hole3, plane_strides(hole3)


@triton.jit
def plane_block(P, BLOCK_P: tl.constexpr):
    """This program's ``BLOCK_P`` planes (int64 indices, program ``program_id(0)``) and which of them exist."""
    planes = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    return planes, planes < P


@triton.jit
def load_plane_values(PTR, base, hw, stride_hw, mask, COMPUTE: tl.constexpr):
    """The values at spatial positions ``hw`` of planes starting at ``base`` (zero outside ``mask``), in ``COMPUTE``."""
    return tl.load(PTR + base[:, None] + hw[None, :] * stride_hw, mask=mask, other=0.0).to(COMPUTE)


@triton.jit
def plane_offsets(planes, C, stride_n, stride_c):
    """Offset of each plane's first value: plane p is (sample p // C, channel p % C)."""
    return (planes // C) * stride_n + (planes % C) * stride_c
