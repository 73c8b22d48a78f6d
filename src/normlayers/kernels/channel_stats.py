"""Triton kernels for per-plane statistics and per-plane affine maps of ``(N, C, *spatial)`` tensors.

Several CNN norms (BatchChannelNorm2d now; EvoNorm and RegionNorm are meant to follow) are, per ``(sample n,
channel c)`` plane of ``HW`` values, an affine map ``y = x·A[n, c] + B[n, c]`` whose coefficients depend only on
per-plane moments. So two kernel pairs serve them all, with small ``(N, C)`` torch ops in between:

* ``plane_moments``: per-plane mean and biased variance. Each program takes ``BLOCK_P`` planes and walks their ``HW``
  values in ``BLOCK_HW`` chunks, combining chunk moments with Chan's formula (never ``E[x²] − E[x]²``, which loses
  the variance of planes with a large mean in fp32). Backward: ``dx = dmean/HW + dvar·2(x − mean)/HW``, elementwise.
* ``plane_affine``: ``y = (x − M)·A + B``, elementwise, with ``M`` a per-plane centre (the plane mean, typically).
  Centring first keeps the result accurate to the size of ``y``: the uncentred ``x·A + (B − M·A)`` loses
  ``|M·A|·2⁻²⁴`` to cancellation, which is large when a plane's spread is small against its mean or against ``eps``.
  Backward: ``dx = dy·A`` and, per plane, ``dA = Σ dy·(x − M)`` and ``dB = Σ dy`` (``dM = −A·dB`` is left to the
  caller), in one kernel that owns its planes (deterministic, no atomics). With the constexpr ``REGIONS = 2``
  (RegionNorm) each plane has two sets of coefficients, chosen per value by a hole mask, and two sets of sums.

Layout of a launch: the input is viewed as ``(N, C, HW)`` with arbitrary strides (NCHW: planes are rows;
channels-last: the ``HW`` stride is ``C``; a channel slice: a larger channel or sample stride), so no copy is made
for the usual layouts. Outputs shaped like the input keep its memory format (``torch.empty_like``). Arithmetic and
statistics are fp32 (fp64 for fp64 inputs, so the ops can be ``gradcheck``-ed); offsets are int64.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from normlayers._dtypes import compute_dtype
from normlayers.kernels.common import (
    as_planes,
    centred_row_moments,
    chan_combine,
    PLANE_MAX_BLOCK_HW,
    PLANE_MAX_BLOCK_P,
    PLANE_TILE_ELEMENTS,
    hole_planes,
    load_plane_values,
    next_power_of_2,
    num_warps_for,
    plane_strides,
    tl_compute_dtype,
)

# Values (lanes) and planes of a flat tile, at most: each per-plane sum selects every value once per plane of the tile
# (:func:`plane_sum`), so a flat tile is smaller than a row tile. Starting points, not tuned on a GPU.
FLAT_TILE_ELEMENTS = 512
FLAT_MAX_BLOCK_P = 16

# Channels per program of a channels-last launch (:func:`channel_tile`): 64 bf16 values are 128 contiguous bytes, four
# sectors, read by 8 threads with 128-bit loads. A starting point, not tuned on a GPU.
CHANNELS_LAST_BLOCK_C = 64
# The small loads of the per-plane passes (a program's coefficients or statistics) are repeated by each warp and
# each program of a plane, so they are made few against the x/dy/y tiles (:func:`channel_tile`; the audit counts
# sector use per warp instruction, bytes-weighted). Starting points, measured with the audit, not tuned on a GPU:
# - Chunks of ``BLOCK_HW`` values an elementwise pass's program walks, at most, with its coefficients loaded once;
#   and a row tile cuts a plane in at least PLANE_MIN_STEPS chunks, so that each warp walks several.
PLANE_MAX_STEPS = 8
PLANE_MIN_STEPS = 4
# - Positions of the plane each warp of a channels-last reduction walks, at least, where the plane has them: its
#   per-plane loads are in the tile's channel layout (8 fp32 a thread, half of each sector per 128-bit load), ~10%
#   of a warp's sectors at 5 coefficients and 24 positions of 64 bf16 channels. Small planes get fewer warps.
CHANNELS_LAST_WARP_POSITIONS = 24
# - A channels-last program that computes its planes' coefficients from a (plane × group) tile of statistics (BCN
#   eval, EvoNorm-S) keeps a warp per this many of them: more values a thread spill (255 registers, 2.7 KB of
#   spills for BCN eval at 2048 channels, 64 a group, on 2 warps).
GROUP_TILE_VALUES_PER_WARP = 512


def optional_pointer(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A kernel pointer for an optional tensor: the tensor (contiguous), or ``fallback`` (never dereferenced)."""
    return t.contiguous() if t is not None else fallback


def parameter_grad(parameter: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The gradient buffer of a parameter (its shape and dtype, contiguous), or an empty one for a missing one."""
    if parameter is None:
        return like.new_empty(0)
    return torch.empty(parameter.shape, dtype=parameter.dtype, device=parameter.device)


class PlaneTile(NamedTuple):
    """How a per-plane kernel covers its planes: ``BLOCK_P`` channels of one sample per program, and either rows of
    ``BLOCK_HW`` values per plane (``flat`` false) or, for contiguous small planes, the block's ``BLOCK_P·HW`` values
    as one flat span of ``BLOCK_HW`` lanes (``flat``; ``align``: the span starts at a multiple of ``align``
    elements, 16 bytes). A flat tile's per-plane sums are one-hot selects (:func:`plane_sum`) and its per-plane
    coefficients gathers (:func:`spread`)."""

    block_p: int
    block_hw: int
    num_warps: int
    flat: bool = False
    align: int = 1

    def steps(self, hw: int) -> int:
        """``BLOCK_HW`` chunks of a plane each program of an elementwise pass walks (its ``STEPS``): as many as
        :data:`PLANE_MAX_STEPS` allows, spread evenly over the programs of a plane."""
        chunks = 1 if self.flat else triton.cdiv(hw, self.block_hw)
        return triton.cdiv(chunks, triton.cdiv(chunks, PLANE_MAX_STEPS))

    def chunks(self, hw: int) -> int:
        """Programs along grid axis 1 of an elementwise pass (one per :meth:`steps` chunks of a plane)."""
        return 1 if self.flat else triton.cdiv(hw, self.block_hw * self.steps(hw))

    def constexprs(self) -> dict:
        """The kernels' tile arguments."""
        return dict(BLOCK_P=self.block_p, BLOCK_HW=self.block_hw, FLAT=self.flat, ALIGN=self.align,
                    num_warps=self.num_warps)


def _flat_block_p(tensors: Sequence[torch.Tensor], elements: int) -> int:
    """Planes per program of a flat tile over ``tensors`` (``(N, C, HW)`` each, one launch's), or 0 where a flat tile
    does not apply. It applies where each sample's planes are one contiguous run in every tensor
    (strides ``(·, HW, 1)``) and the rows of a row tile would start at offsets the compiler cannot prove 16-byte
    aligned (``HW`` not a multiple of 16): then a block of ``BLOCK_P`` planes whose ``BLOCK_P·HW`` values are a
    multiple of 16 bytes starts aligned, and so does every block and sample (``C·HW`` and the sample strides are such
    multiples too), so every load of the span is 128-bit."""
    _, channels, hw = tensors[0].shape
    align = 16 // tensors[0].element_size()
    contiguous = all(t.stride(1) == hw and (t.stride(2) == 1 or hw == 1) and t.stride(0) % align == 0
                     for t in tensors)
    if not contiguous or hw == 0 or hw % 16 == 0 or channels * hw % align:
        return 0
    fewest = align // math.gcd(hw, align)  # planes whose values fill whole 16-byte vectors (a power of two)
    fit = elements // hw
    if fit < fewest:
        return 0
    return max(min(1 << (fit.bit_length() - 1), next_power_of_2(channels), FLAT_MAX_BLOCK_P), fewest)


def channel_tile(x3: torch.Tensor, max_block_hw: Optional[int] = None, *, reduction: bool = False,
                 others: Sequence[torch.Tensor] = (), flat: bool = True, group_block: int = 0) -> PlaneTile:
    """The :class:`PlaneTile` of the per-plane kernels for ``x3`` ``(N, C, HW)`` (and ``others``, the launch's other
    tensors shaped like it): a program takes ``BLOCK_P`` channels of one sample (:func:`channel_block`).
    Channels-last input (channel stride 1) gets a tile wide along C, so that its loads are 128-bit along the
    contiguous channels and a warp reads whole 32-byte sectors; contiguous small planes a flat tile
    (:func:`_flat_block_p`), read with 128-bit loads along the planes; otherwise planes are rows, several small planes
    per program. ``reduction``: the kernel keeps per-plane sums across its loop over HW; it gets half the tile on half
    the warps (still 8 values per thread, one 128-bit bf16 load), since its live temporaries spill past the 128
    registers a thread of a 16-warp program may have. ``max_block_hw`` (tests) caps the chunk of a plane a program
    holds, to reach the chunked loop on small planes; it rules out the flat tile, as does ``flat=False`` (a kernel
    variant without one: RegionNorm's two-region passes).

    The per-plane loads are kept a small share of the traffic (the constants above): an elementwise pass walks up to
    :data:`PLANE_MAX_STEPS` chunks a program (:meth:`PlaneTile.steps`), a row tile is at most a quarter of the plane,
    and a channels-last elementwise tile runs on one warp per 32 channels, so that each per-plane vector has a value
    for every thread: Triton 3.9 then loads it in a layout of its own (one fp32 a lane, a warp on 128 contiguous
    bytes: whole sectors) and converts it to the tile's (``ttg.convert_layout``), where a vector with fewer values
    than threads is loaded again by every warp in the tile's layout (8 fp32 a thread, two 128-bit loads each using
    half of each sector). ``group_block``: the group tile's width (BLOCK_CPG) of a pass that computes its coefficients
    (:data:`GROUP_TILE_VALUES_PER_WARP`)."""
    _, channels, hw = x3.shape
    elements = PLANE_TILE_ELEMENTS // 2 if reduction else PLANE_TILE_ELEMENTS
    widest = 1 << ((max_block_hw if max_block_hw is not None else PLANE_MAX_BLOCK_HW).bit_length() - 1)
    flat_p = _flat_block_p((x3, *others), FLAT_TILE_ELEMENTS) if flat and max_block_hw is None else 0
    if flat_p:
        block_hw = next_power_of_2(flat_p * hw)
        return PlaneTile(flat_p, block_hw, num_warps_for(block_hw, x3.device), True, 16 // x3.element_size())
    if x3.stride(1) == 1 and channels > 1 and hw > 1:
        block_p = min(next_power_of_2(channels), CHANNELS_LAST_BLOCK_C)
        # A tile's warps are along HW (a warp's threads span the channel block), 8 values a thread however many.
        warps = max(min(elements // 256, hw // CHANNELS_LAST_WARP_POSITIONS), 1)
        if not reduction:
            warps = min(warps, max(block_p // 32, 1))
        warps = max(warps, min(block_p * group_block // GROUP_TILE_VALUES_PER_WARP, elements // 256))
        elements = min(elements, 256 << (warps.bit_length() - 1))
        block_hw = min(next_power_of_2(hw), max(elements // block_p, 1), widest)
    else:
        block_hw = min(next_power_of_2(hw), widest)
        if not reduction:
            block_hw = min(block_hw, max(1 << (max(hw // PLANE_MIN_STEPS, 1).bit_length() - 1), 256))
        block_p = min(max(elements // block_hw, 1), PLANE_MAX_BLOCK_P, next_power_of_2(channels))
    return PlaneTile(block_p, block_hw, num_warps_for(block_p * block_hw, x3.device))


def channel_grid(x3: torch.Tensor, block_p: int) -> int:
    """Programs along grid axis 0 of a :func:`channel_block` launch: ``N`` samples × the channel blocks of each."""
    return x3.shape[0] * triton.cdiv(x3.shape[1], block_p)


def group_tiles(n: int, channels_per_group: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C) of a per-group kernel over ``(N, C)`` plane statistics (:func:`group_tile`): a whole
    group's channels per row, as many samples as fit in ``PLANE_TILE_ELEMENTS``."""
    block_c = next_power_of_2(channels_per_group)
    return min(max(PLANE_TILE_ELEMENTS // block_c, 1), next_power_of_2(n)), block_c


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def block_start(C, BLOCK_P: tl.constexpr):
    """``(n, c0)``: this program's sample and first channel (grid axis 0 walks the channel blocks of sample 0, then of
    sample 1, ...)."""
    blocks = tl.cdiv(C, BLOCK_P)
    return tl.program_id(0) // blocks, (tl.program_id(0) % blocks) * BLOCK_P


@triton.jit
def channel_block(C, BLOCK_P: tl.constexpr):
    """This program's ``BLOCK_P`` planes: channels ``c0 … c0 + BLOCK_P − 1`` of one sample ``n``. Returns the flat
    plane indices ``n·C + c`` (int64), which exist, and ``(n, c)`` for :func:`channel_offsets`: with ``c`` an
    ``arange`` the compiler sees the channels' contiguity, so channels-last loads vectorize along C."""
    n, c0 = block_start(C, BLOCK_P)
    c = c0 + tl.arange(0, BLOCK_P)
    return n.to(tl.int64) * C + c, c < C, n, c


@triton.jit
def program_span(HW, BLOCK_HW: tl.constexpr, STEPS: tl.constexpr):
    """``(first, end)``: the positions of its planes an elementwise pass's program walks, ``STEPS`` chunks of
    ``BLOCK_HW`` from grid axis 1's ``first`` (a flat tile's one chunk holds its planes whole)."""
    first = tl.program_id(1) * (BLOCK_HW * STEPS)
    return first, tl.minimum(first + BLOCK_HW * STEPS, HW)


@triton.jit
def value_tile(C, HW, start, plane_mask, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, FLAT: tl.constexpr,
               ALIGN: tl.constexpr):
    """The values of this program's planes it takes at once (a :class:`PlaneTile`): ``(positions, mask, lane)``.

    Rows: ``positions`` are the spatial positions ``start … start + BLOCK_HW − 1`` and ``mask`` is
    ``(BLOCK_P, BLOCK_HW)``. Flat: ``positions`` index the block's span of ``BLOCK_P·HW`` contiguous values (``start``
    is unused: a plane fits), ``mask`` is 1-D and ``lane`` is each value's plane within the block, for
    :func:`spread` and :func:`plane_sum`. The span's length is a multiple of ``ALIGN`` (the launcher's guarantee), so
    the mask is constant over each aligned vector and the loads stay 128-bit."""
    # One return for both branches, whose types differ: Triton checks every return statement of a function.
    if FLAT:
        positions = tl.arange(0, BLOCK_HW)
        _, c0 = block_start(C, BLOCK_P)
        count = tl.multiple_of(tl.minimum(C - c0, BLOCK_P) * HW, ALIGN)
        mask = positions < count
        lane = tl.minimum(positions // HW, BLOCK_P - 1)
    else:
        positions = start + tl.arange(0, BLOCK_HW).to(tl.int64)
        mask = plane_mask[:, None] & (positions < HW)[None, :]
        lane = positions
    return positions, mask, lane


@triton.jit
def value_offsets(n, c, positions, C, stride_n, stride_c, stride_hw, FLAT: tl.constexpr, ALIGN: tl.constexpr):
    """Offsets of a :func:`value_tile`'s values in a tensor of these strides: each plane's first value plus
    ``positions·stride_hw`` (rows), or the block's first value, a multiple of ``ALIGN``, plus ``positions`` (flat:
    the launcher checked ``stride_c == HW`` and ``stride_hw == 1``)."""
    if FLAT:
        _, c0 = block_start(C, c.shape[0])
        offsets = tl.multiple_of(n.to(tl.int64) * stride_n + c0.to(tl.int64) * stride_c, ALIGN) + positions
    else:
        offsets = channel_offsets(n, c, stride_n, stride_c)[:, None] + positions[None, :] * stride_hw
    return offsets


@triton.jit
def load_values(PTR, n, c, hw, C, stride_n, stride_c, stride_hw, mask, COMPUTE: tl.constexpr, FLAT: tl.constexpr,
                ALIGN: tl.constexpr):
    """A :func:`value_tile`'s values in a tensor of these strides (zero outside ``mask``), in ``COMPUTE``."""
    offsets = value_offsets(n, c, hw, C, stride_n, stride_c, stride_hw, FLAT, ALIGN)
    return tl.load(PTR + offsets, mask=mask, other=0.0).to(COMPUTE)


@triton.jit
def spread(per_plane, lane, FLAT: tl.constexpr):
    """A ``(BLOCK_P,)`` per-plane value at each value of a :func:`value_tile` (broadcast along a row, or gathered by
    ``lane``)."""
    if FLAT:
        values = tl.gather(per_plane, lane, 0)
    else:
        values = per_plane[:, None]
    return values


@triton.jit
def plane_sum(values, lane, HW, FLAT: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-plane sums ``(BLOCK_P,)`` of a :func:`value_tile`'s values (zero outside its mask): along each row, or, for
    a flat tile, of the values whose ``lane`` is each plane (a one-hot select, then the same tree sum as a row's)."""
    if FLAT:
        own = lane[None, :] == tl.arange(0, BLOCK_P)[:, None]
        sums = tl.sum(tl.where(own, values[None, :], 0.0), axis=1)
    else:
        sums = tl.sum(values, axis=1)
    return sums


@triton.jit
def channel_offsets(n, c, stride_n, stride_c):
    """Offset of the first value of each plane ``(n, c)`` of a :func:`channel_block`."""
    return n.to(tl.int64) * stride_n + c.to(tl.int64) * stride_c


@triton.jit
def group_tile(start, N, C, g, CPG, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets into a contiguous ``(N, C)`` tensor of per-plane values (the "finalize" kernels of the composites):
    samples ``start … start + BLOCK_N − 1`` × group ``g``'s ``CPG`` channels, and which of them exist."""
    n = start + tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_C)
    mask = (n < N)[:, None] & (j < CPG)[None, :]
    return n.to(tl.int64)[:, None] * C + (g * CPG + j)[None, :], mask


@triton.jit
def load_group_channels(PTR, g, CPG, other, BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr):
    """Group ``g``'s ``CPG`` values of a per-channel vector, in ``COMPUTE`` (``other`` in the padding)."""
    j = tl.arange(0, BLOCK_C)
    return tl.load(PTR + g * CPG + j, mask=j < CPG, other=other).to(COMPUTE)


@triton.jit
def load_optional(PTR, offsets, mask, fill, PRESENT: tl.constexpr, COMPUTE: tl.constexpr):
    """``PTR[offsets]`` in ``COMPUTE`` (``fill`` outside ``mask``), or ``fill`` everywhere for a missing parameter
    (``PRESENT`` false: ``PTR`` is never read)."""
    if PRESENT:
        return tl.load(PTR + offsets, mask=mask, other=fill).to(COMPUTE)
    return tl.full(offsets.shape, fill, COMPUTE)


@triton.jit
def load_optional_group_channels(PTR, g, CPG, fill, PRESENT: tl.constexpr, BLOCK_C: tl.constexpr,
                                 COMPUTE: tl.constexpr):
    """:func:`load_group_channels` of an optional parameter: ``fill`` for a missing one (and in the padding)."""
    j = tl.arange(0, BLOCK_C)
    return load_optional(PTR, g * CPG + j, j < CPG, fill, PRESENT, COMPUTE)


@triton.jit
def plane_group_tile(planes, plane_mask, CPG, BLOCK_CPG: tl.constexpr):
    """For a block of planes (flat ``n·C + c`` indices), the offsets into ``(N, C)`` per-plane statistics of the
    ``CPG`` planes of each plane's (sample, group), one row per plane, and which of them exist. Groups are runs of
    ``CPG`` consecutive planes (``CPG`` divides ``C``), so a plane's group starts at ``planes − planes % CPG``."""
    j = tl.arange(0, BLOCK_CPG)
    first = planes - planes % CPG
    return first[:, None] + j[None, :], plane_mask[:, None] & (j < CPG)[None, :]


@triton.jit
def own_column(values, planes, CPG):
    """Each row's value at its own plane's column of a :func:`plane_group_tile` (a select and a row sum)."""
    j = tl.arange(0, values.shape[1])
    return tl.sum(tl.where(j[None, :] == (planes % CPG)[:, None], values, 0.0), axis=1)


@triton.jit
def store_group_channels(PTR, g, CPG, value, BLOCK_C: tl.constexpr):
    j = tl.arange(0, BLOCK_C)
    tl.store(PTR + g * CPG + j, value, mask=j < CPG)


@triton.jit
def load_group_planes(PLANE_MEAN, PLANE_VAR, start, N, C, g, CPG, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """A :func:`group_tile` (its offsets and mask) and the planes' means and variances there (zero outside)."""
    offsets, mask = group_tile(start, N, C, g, CPG, BLOCK_N, BLOCK_C)
    plane_mean = tl.load(PLANE_MEAN + offsets, mask=mask, other=0.0)
    return offsets, mask, plane_mean, tl.load(PLANE_VAR + offsets, mask=mask, other=0.0)


@triton.jit
def group_batch_moments(PLANE_MEAN, PLANE_VAR, N, C, g, CPG, COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Group ``g``'s channels' batch ``(mean, biased var)`` from their ``N`` planes' moments (equal counts)."""
    total = tl.zeros((BLOCK_C,), dtype=COMPUTE)
    for start in range(0, N, BLOCK_N):
        offsets, mask = group_tile(start, N, C, g, CPG, BLOCK_N, BLOCK_C)
        total += tl.sum(tl.load(PLANE_MEAN + offsets, mask=mask, other=0.0), axis=0)
    mean = total / tl.cast(N, COMPUTE)
    total = tl.zeros((BLOCK_C,), dtype=COMPUTE)
    for start in range(0, N, BLOCK_N):
        offsets, mask, plane_mean, plane_var = load_group_planes(PLANE_MEAN, PLANE_VAR, start, N, C, g, CPG,
                                                                 BLOCK_N, BLOCK_C)
        centred = tl.where(mask, plane_mean - mean[None, :], 0.0)
        total += tl.sum(plane_var + centred * centred, axis=0)
    return mean, total / tl.cast(N, COMPUTE)


@triton.jit
def plane_moments_fwd_kernel(
    X, MEAN, VAR, P, C, HW, stride_n, stride_c, stride_hw,
    COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, FLAT: tl.constexpr, ALIGN: tl.constexpr,
):
    planes, plane_mask, n, c = channel_block(C, BLOCK_P)
    hw, mask, lane = value_tile(C, HW, 0, plane_mask, BLOCK_P, BLOCK_HW, FLAT, ALIGN)
    x = load_values(X, n, c, hw, C, stride_n, stride_c, stride_hw, mask, COMPUTE, FLAT, ALIGN)
    count = tl.cast(tl.minimum(HW, BLOCK_HW), COMPUTE)
    s = plane_sum(x, lane, HW, FLAT, BLOCK_P)
    centred = tl.where(mask, x - spread(s / count, lane, FLAT), 0.0)
    m2 = plane_sum(centred * centred, lane, HW, FLAT, BLOCK_P)
    # Later chunks (rows only; a flat tile holds whole planes): `start` values precede each (the first chunk is full
    # when there is a second), which is all Chan's combination needs.
    if not FLAT:
        x_base = channel_offsets(n, c, stride_n, stride_c)
        for start in range(BLOCK_HW, HW, BLOCK_HW):
            hw = (start + tl.arange(0, BLOCK_HW)).to(tl.int64)
            mask = plane_mask[:, None] & (hw < HW)[None, :]
            x = load_plane_values(X, x_base, hw, stride_hw, mask, COMPUTE)
            n_a = tl.cast(start, COMPUTE)
            n_b = tl.cast(tl.minimum(HW - start, BLOCK_HW), COMPUTE)
            s_b, m2_b = centred_row_moments(x, mask, n_b)
            s, m2 = chan_combine(s, m2, n_a, s_b, m2_b, n_b)
    total = tl.cast(HW, COMPUTE)
    tl.store(MEAN + planes, s / total, mask=plane_mask)
    tl.store(VAR + planes, m2 / total, mask=plane_mask)


@triton.jit
def plane_moments_bwd_kernel(
    X, MEAN, DMEAN, DVAR, DX_PARTIAL, DX, P, C, HW,
    stride_xn, stride_xc, stride_xhw, stride_pn, stride_pc, stride_phw, stride_dxn, stride_dxc, stride_dxhw,
    HAS_DMEAN: tl.constexpr, HAS_DVAR: tl.constexpr, HAS_DX_PARTIAL: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, FLAT: tl.constexpr, ALIGN: tl.constexpr,
    STEPS: tl.constexpr,
):
    # Grid: (plane blocks, spans of STEPS HW chunks). dx = dx_partial + dmean/HW + dvar·2(x − mean)/HW: with
    # HAS_DX_PARTIAL the gradient reaching x by another path (a composite's elementwise pass) is added here, not by a
    # separate launch.
    planes, plane_mask, n, c = channel_block(C, BLOCK_P)
    count = tl.cast(HW, COMPUTE)
    if HAS_DMEAN:
        dmean = tl.load(DMEAN + planes, mask=plane_mask, other=0.0).to(COMPUTE) / count
    if HAS_DVAR:
        mean = tl.load(MEAN + planes, mask=plane_mask, other=0.0).to(COMPUTE)
        dvar = 2.0 * tl.load(DVAR + planes, mask=plane_mask, other=0.0).to(COMPUTE) / count
    first, end = program_span(HW, BLOCK_HW, STEPS)
    for start in range(first, end, BLOCK_HW):
        hw, mask, lane = value_tile(C, HW, start, plane_mask, BLOCK_P, BLOCK_HW, FLAT, ALIGN)
        dx = tl.zeros(mask.shape, dtype=COMPUTE)
        if HAS_DX_PARTIAL:
            dx += load_values(DX_PARTIAL, n, c, hw, C, stride_pn, stride_pc, stride_phw, mask, COMPUTE, FLAT, ALIGN)
        if HAS_DMEAN:
            dx += spread(dmean, lane, FLAT)
        if HAS_DVAR:
            x = load_values(X, n, c, hw, C, stride_xn, stride_xc, stride_xhw, mask, COMPUTE, FLAT, ALIGN)
            dx += (x - spread(mean, lane, FLAT)) * spread(dvar, lane, FLAT)
        tl.store(DX + value_offsets(n, c, hw, C, stride_dxn, stride_dxc, stride_dxhw, FLAT, ALIGN), dx, mask=mask)


@triton.jit
def plane_affine_fwd_kernel(
    X, HOLE, M, A, B, Y, P, C, HW,
    stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw, stride_yn, stride_yc, stride_yhw,
    REGIONS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, FLAT: tl.constexpr,
    ALIGN: tl.constexpr, STEPS: tl.constexpr,
):
    # Grid: (plane blocks, spans of STEPS HW chunks). y = (x − M[plane])·A[plane] + B[plane]. With REGIONS == 2
    # (RegionNorm) the coefficients are (P, 2), region 0 where HOLE is nonzero and region 1 elsewhere; HOLE is ignored
    # otherwise (and the tile is rows: the launcher gives a hole mask no flat tile).
    planes, plane_mask, n, c = channel_block(C, BLOCK_P)
    a = tl.load(A + planes * REGIONS, mask=plane_mask, other=0.0).to(COMPUTE)
    b = tl.load(B + planes * REGIONS, mask=plane_mask, other=0.0).to(COMPUTE)
    center = tl.load(M + planes * REGIONS, mask=plane_mask, other=0.0).to(COMPUTE)
    if REGIONS == 2:
        hole_base = channel_offsets(n, c, stride_hn, stride_hc)
        a_valid = tl.load(A + planes * 2 + 1, mask=plane_mask, other=0.0).to(COMPUTE)
        b_valid = tl.load(B + planes * 2 + 1, mask=plane_mask, other=0.0).to(COMPUTE)
        center_valid = tl.load(M + planes * 2 + 1, mask=plane_mask, other=0.0).to(COMPUTE)
    first, end = program_span(HW, BLOCK_HW, STEPS)
    for start in range(first, end, BLOCK_HW):
        hw, mask, lane = value_tile(C, HW, start, plane_mask, BLOCK_P, BLOCK_HW, FLAT, ALIGN)
        x = load_values(X, n, c, hw, C, stride_xn, stride_xc, stride_xhw, mask, COMPUTE, FLAT, ALIGN)
        y = (x - spread(center, lane, FLAT)) * spread(a, lane, FLAT) + spread(b, lane, FLAT)
        if REGIONS == 2:
            hole = tl.load(HOLE + hole_base[:, None] + hw[None, :] * stride_hhw, mask=mask, other=0) != 0
            y = tl.where(hole, y, (x - center_valid[:, None]) * a_valid[:, None] + b_valid[:, None])
        tl.store(Y + value_offsets(n, c, hw, C, stride_yn, stride_yc, stride_yhw, FLAT, ALIGN), y, mask=mask)


@triton.jit
def plane_affine_bwd_kernel(
    DY, X, HOLE, M, A, DX, DA, DB, P, C, HW,
    stride_dyn, stride_dyc, stride_dyhw, stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw,
    stride_dxn, stride_dxc, stride_dxhw,
    REGIONS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, FLAT: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # Each program owns BLOCK_P planes and walks their HW values (a flat tile holds them whole): dx = dy·A,
    # dA = Σ dy·(x − M), dB = Σ dy. With REGIONS == 2 (rows only), each sum runs over its region's values only and dx
    # takes the region's A.
    planes, plane_mask, n, c = channel_block(C, BLOCK_P)
    a = tl.load(A + planes * REGIONS, mask=plane_mask, other=0.0).to(COMPUTE)
    center = tl.load(M + planes * REGIONS, mask=plane_mask, other=0.0).to(COMPUTE)
    # Per-plane sums, each chunk's reduced as it comes: per-lane (BLOCK_P, BLOCK_HW) accumulators would cost a
    # register per value per sum (spills at small planes, where BLOCK_P is large).
    da = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    db = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    if REGIONS == 2:
        hole_base = channel_offsets(n, c, stride_hn, stride_hc)
        a_valid = tl.load(A + planes * 2 + 1, mask=plane_mask, other=0.0).to(COMPUTE)
        center_valid = tl.load(M + planes * 2 + 1, mask=plane_mask, other=0.0).to(COMPUTE)
        da_valid = tl.zeros((BLOCK_P,), dtype=COMPUTE)
        db_valid = tl.zeros((BLOCK_P,), dtype=COMPUTE)
    for start in range(0, HW, BLOCK_HW):  # once for a flat tile (BLOCK_HW ≥ HW)
        hw, mask, lane = value_tile(C, HW, start, plane_mask, BLOCK_P, BLOCK_HW, FLAT, ALIGN)
        dy = load_values(DY, n, c, hw, C, stride_dyn, stride_dyc, stride_dyhw, mask, COMPUTE, FLAT, ALIGN)
        x = load_values(X, n, c, hw, C, stride_xn, stride_xc, stride_xhw, mask, COMPUTE, FLAT, ALIGN)
        dx_offsets = value_offsets(n, c, hw, C, stride_dxn, stride_dxc, stride_dxhw, FLAT, ALIGN)
        if REGIONS == 2:
            hole = tl.load(HOLE + hole_base[:, None] + hw[None, :] * stride_hhw, mask=mask, other=0) != 0
            tl.store(DX + dx_offsets, dy * tl.where(hole, a[:, None], a_valid[:, None]), mask=mask)
            # Select, never multiply by a 0/1 mask: a NaN in one region must not reach the other's sums.
            valid = mask & (hole == 0)
            da_valid += tl.sum(tl.where(valid, dy * (x - center_valid[:, None]), 0.0), axis=1)
            db_valid += tl.sum(tl.where(valid, dy, 0.0), axis=1)
            da += tl.sum(tl.where(hole, dy * (x - center[:, None]), 0.0), axis=1)
            db += tl.sum(tl.where(hole, dy, 0.0), axis=1)
        else:
            tl.store(DX + dx_offsets, dy * spread(a, lane, FLAT), mask=mask)
            da += plane_sum(dy * tl.where(mask, x - spread(center, lane, FLAT), 0.0), lane, HW, FLAT, BLOCK_P)
            db += plane_sum(dy, lane, HW, FLAT, BLOCK_P)
    tl.store(DA + planes * REGIONS, da, mask=plane_mask)
    tl.store(DB + planes * REGIONS, db, mask=plane_mask)
    if REGIONS == 2:
        tl.store(DA + planes * 2 + 1, da_valid, mask=plane_mask)
        tl.store(DB + planes * 2 + 1, db_valid, mask=plane_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def plane_moments_fwd(x: torch.Tensor, *, max_block_hw: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-plane ``(mean, var)`` (biased) of ``x`` ``(N, C, *spatial)``, each ``(N, C)`` in fp32 (fp64 for fp64).

    Planes with no values (``HW == 0``) get NaN, as ``torch.var_mean`` gives.
    """
    x3 = as_planes(x)
    n, c, hw = x3.shape
    compute = compute_dtype(x.dtype)
    mean = torch.empty((n, c), dtype=compute, device=x.device)
    var = torch.empty((n, c), dtype=compute, device=x.device)
    if n * c == 0:
        return mean, var
    if hw == 0:
        return mean.fill_(math.nan), var.fill_(math.nan)
    tile = channel_tile(x3, max_block_hw, reduction=True)
    plane_moments_fwd_kernel[(channel_grid(x3, tile.block_p),)](
        x3, mean, var, n * c, c, hw, *plane_strides(x3), COMPUTE=tl_compute_dtype(compute), **tile.constexprs(),
    )
    return mean, var


def plane_moments_bwd(x: torch.Tensor, mean: torch.Tensor, dmean: Optional[torch.Tensor],
                      dvar: Optional[torch.Tensor], dx_partial: Optional[torch.Tensor] = None, *,
                      max_block_hw: Optional[int] = None) -> torch.Tensor:
    """Gradient of :func:`plane_moments_fwd` with respect to ``x`` (``dmean``/``dvar`` ``(N, C)``, either may be
    ``None``), plus ``dx_partial`` (shaped like ``x``) when given; returned in ``x``'s dtype, shape and memory
    format."""
    dx = torch.empty_like(x)
    x3, dx3 = as_planes(x), as_planes(dx)
    partial3 = as_planes(dx_partial) if dx_partial is not None else x3
    n, c, hw = x3.shape
    if dx.numel() == 0:
        return dx
    tile = channel_tile(x3, max_block_hw, others=(partial3, dx3))
    plane_moments_bwd_kernel[(channel_grid(x3, tile.block_p), tile.chunks(hw))](
        x3, mean.contiguous(), dmean.contiguous() if dmean is not None else mean,
        dvar.contiguous() if dvar is not None else mean, partial3, dx3, n * c, c, hw, *plane_strides(x3),
        *plane_strides(partial3), *plane_strides(dx3),
        HAS_DMEAN=dmean is not None, HAS_DVAR=dvar is not None, HAS_DX_PARTIAL=dx_partial is not None,
        COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)), STEPS=tile.steps(hw), **tile.constexprs(),
    )
    return dx


def plane_affine_fwd(x: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *,
                     hole_mask: Optional[torch.Tensor] = None, max_block_hw: Optional[int] = None) -> torch.Tensor:
    """``y = (x − center[n, c])·scale[n, c] + shift[n, c]`` for ``x`` ``(N, C, *spatial)`` and ``(N, C)``
    coefficients; arithmetic in fp32 (fp64 for fp64 ``x``), ``y`` in ``x``'s dtype, shape and memory format.

    With ``hole_mask`` (bool or uint8, ``(N, 1 or C, *spatial)``, nonzero = hole; RegionNorm) the coefficients are
    ``(N, C, 2)``: index 0 applies where the mask is nonzero, index 1 elsewhere.
    """
    y = torch.empty_like(x)
    x3, y3 = as_planes(x), as_planes(y)
    n, c, hw = x3.shape
    if y.numel() == 0:
        return y
    hole3, hole_strides = hole_planes(hole_mask, x3)
    tile = channel_tile(x3, max_block_hw, others=(y3,), flat=hole_mask is None)
    plane_affine_fwd_kernel[(channel_grid(x3, tile.block_p), tile.chunks(hw))](
        x3, hole3, center.contiguous(), scale.contiguous(), shift.contiguous(), y3, n * c, c, hw, *plane_strides(x3),
        *hole_strides, *plane_strides(y3), REGIONS=1 if hole_mask is None else 2,
        COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)), STEPS=tile.steps(hw), **tile.constexprs(),
    )
    return y


def plane_affine_bwd(dy: torch.Tensor, x: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, *,
                     hole_mask: Optional[torch.Tensor] = None,
                     max_block_hw: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`plane_affine_fwd`: ``(dx, dscale, dshift)``; ``dx`` in ``x``'s dtype and memory format,
    ``dscale``/``dshift`` shaped like ``scale`` (``(N, C)``, or ``(N, C, 2)`` with ``hole_mask``) in its dtype. The
    centre's gradient is ``−scale·dshift``."""
    dx = torch.empty_like(x)
    dy3, x3, dx3 = as_planes(dy), as_planes(x), as_planes(dx)
    n, c, hw = x3.shape
    dscale = torch.empty(scale.shape, dtype=scale.dtype, device=x.device)
    dshift = torch.empty(scale.shape, dtype=scale.dtype, device=x.device)
    if n * c == 0:
        return dx, dscale, dshift
    if hw == 0:
        return dx, dscale.zero_(), dshift.zero_()
    hole3, hole_strides = hole_planes(hole_mask, x3)
    tile = channel_tile(x3, max_block_hw, reduction=True, others=(dy3, dx3), flat=hole_mask is None)
    plane_affine_bwd_kernel[(channel_grid(x3, tile.block_p),)](
        dy3, x3, hole3, center.contiguous(), scale.contiguous(), dx3, dscale, dshift, n * c, c, hw, *plane_strides(dy3),
        *plane_strides(x3), *hole_strides, *plane_strides(dx3), REGIONS=1 if hole_mask is None else 2,
        COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)), **tile.constexprs(),
    )
    return dx, dscale, dshift
