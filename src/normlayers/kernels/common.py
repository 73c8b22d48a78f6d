"""Launch helpers and kernels shared by every kernel family.

Launch parameters come from static tables, not ``@triton.autotune``: autotuning needs a GPU driver, so it fails
under the interpreter on CPU-only machines, and it adds a benchmarking pass to the first call.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Most programs a kernel runs per SM in a persistent grid; the CPU number only shapes interpreter tests (a few
# programs, each walking several row tiles, so the per-program partials and their reduction are exercised).
CPU_PERSISTENT_PROGRAMS = 4


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and arithmetic dtype of the kernels: fp64 for fp64 data (so ops can be gradcheck-ed), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_compute_dtype(dtype: torch.dtype):
    """:func:`compute_dtype` as the Triton dtype a kernel's ``COMPUTE`` constexpr takes."""
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


def num_warps_for(tile_elements: int, device: torch.device) -> int:
    """Warps for a program holding ``tile_elements`` values: one warp per 256 elements, 1 to 16 warps.

    Capped so that ``num_warps * warp_size <= 1024`` (AMD's 64-wide warps make 32 warps an invalid launch).
    """
    warps = min(max(tile_elements // 256, 1), 16)
    if device.type == "cuda":
        warps = min(warps, 1024 // _warp_size(device.index if device.index is not None else torch.cuda.current_device()))
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
    """Per-row ``(Σx, Σ(x − mean)²)`` of a 2-D tile with ``count`` valid values per row (``x`` zero outside ``mask``)."""
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
def column_sum_kernel(PARTIALS, OUT, num_rows, N, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[n] = sum over r of PARTIALS[r, n], accumulated in the partials' dtype in a fixed order (deterministic)."""
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=PARTIALS.dtype.element_ty)
    for start in range(0, num_rows, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        mask = (rows < num_rows)[:, None] & col_mask[None, :]
        tile = tl.load(PARTIALS + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(OUT + cols, acc, mask=col_mask)


def column_sum(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum a contiguous ``(rows, N)`` fp32 or fp64 buffer over its rows into a new ``(N,)`` tensor of ``dtype``."""
    num_rows, n = partials.shape
    out = torch.empty(n, dtype=dtype, device=partials.device)
    if n == 0:
        return out
    block_n = min(next_power_of_2(n), 256)
    column_sum_kernel[(triton.cdiv(n, block_n),)](partials, out, num_rows, n, BLOCK_ROWS=32, BLOCK_N=block_n, num_warps=4)
    return out
