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
from typing import Optional

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

# Channels per program of a channels-last launch (:func:`channel_tile`): 64 bf16 values are 128 contiguous bytes, four
# sectors, read by 8 threads with 128-bit loads. A starting point, not tuned on a GPU.
CHANNELS_LAST_BLOCK_C = 64


def optional_pointer(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A kernel pointer for an optional tensor: the tensor (contiguous), or ``fallback`` (never dereferenced)."""
    return t.contiguous() if t is not None else fallback


def parameter_grad(parameter: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The gradient buffer of a parameter (its shape and dtype, contiguous), or an empty one for a missing one."""
    if parameter is None:
        return like.new_empty(0)
    return torch.empty(parameter.shape, dtype=parameter.dtype, device=parameter.device)


def channel_tile(x3: torch.Tensor, max_block_hw: Optional[int] = None, *,
                 reduction: bool = False) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_HW, num_warps) of the per-plane kernels for ``x3`` ``(N, C, HW)``: a program takes ``BLOCK_P``
    channels of one sample (:func:`channel_block`). Channels-last input (channel stride 1) gets a tile wide along C,
    so that its loads are 128-bit along the contiguous channels and a warp reads whole 32-byte sectors; otherwise
    planes are rows, several small planes per program. ``reduction``: the kernel keeps per-plane sums across its loop
    over HW; it gets half the tile on half the warps (still 8 values per thread, one 128-bit bf16 load), since its
    live temporaries spill past the 128 registers a thread of a 16-warp program may have."""
    _, channels, hw = x3.shape
    elements = PLANE_TILE_ELEMENTS // 2 if reduction else PLANE_TILE_ELEMENTS
    widest = 1 << ((max_block_hw if max_block_hw is not None else PLANE_MAX_BLOCK_HW).bit_length() - 1)
    if x3.stride(1) == 1 and channels > 1 and hw > 1:
        block_p = min(next_power_of_2(channels), CHANNELS_LAST_BLOCK_C)
        block_hw = min(next_power_of_2(hw), max(elements // block_p, 1), widest)
    else:
        block_hw = min(next_power_of_2(hw), widest)
        block_p = min(max(elements // block_hw, 1), PLANE_MAX_BLOCK_P, next_power_of_2(channels))
    return block_p, block_hw, num_warps_for(block_p * block_hw, x3.device)


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
def channel_block(C, BLOCK_P: tl.constexpr):
    """This program's ``BLOCK_P`` planes: channels ``c0 … c0 + BLOCK_P − 1`` of one sample ``n`` (grid axis 0 walks the
    channel blocks of sample 0, then of sample 1, ...). Returns the flat plane indices ``n·C + c`` (int64), which
    exist, and ``(n, c)`` for :func:`channel_offsets`: with ``c`` an ``arange`` the compiler sees the channels'
    contiguity, so channels-last loads vectorize along C."""
    blocks = tl.cdiv(C, BLOCK_P)
    n = tl.program_id(0) // blocks
    c = (tl.program_id(0) % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    return n.to(tl.int64) * C + c, c < C, n, c


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
    COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    planes, plane_mask, n, c = channel_block(C, BLOCK_P)
    base = channel_offsets(n, c, stride_n, stride_c)
    offsets = tl.arange(0, BLOCK_HW)
    mask = plane_mask[:, None] & (offsets < HW)[None, :]
    x = tl.load(X + base[:, None] + offsets.to(tl.int64)[None, :] * stride_hw, mask=mask, other=0.0).to(COMPUTE)
    s, m2 = centred_row_moments(x, mask, tl.cast(tl.minimum(HW, BLOCK_HW), COMPUTE))
    # Later chunks: `start` values precede each (the first chunk is full when there is a second), which is all Chan's
    # combination needs.
    for start in range(BLOCK_HW, HW, BLOCK_HW):
        hw = start + offsets
        mask = plane_mask[:, None] & (hw < HW)[None, :]
        x = tl.load(X + base[:, None] + hw.to(tl.int64)[None, :] * stride_hw, mask=mask, other=0.0).to(COMPUTE)
        n_a = tl.cast(start, COMPUTE)
        n_b = tl.cast(tl.minimum(HW - start, BLOCK_HW), COMPUTE)
        s_b, m2_b = centred_row_moments(x, mask, n_b)
        s, m2 = chan_combine(s, m2, n_a, s_b, m2_b, n_b)
    count = tl.cast(HW, COMPUTE)
    tl.store(MEAN + planes, s / count, mask=plane_mask)
    tl.store(VAR + planes, m2 / count, mask=plane_mask)


@triton.jit
def plane_moments_bwd_kernel(
    X, MEAN, DMEAN, DVAR, DX_PARTIAL, DX, P, C, HW,
    stride_xn, stride_xc, stride_xhw, stride_pn, stride_pc, stride_phw, stride_dxn, stride_dxc, stride_dxhw,
    HAS_DMEAN: tl.constexpr, HAS_DVAR: tl.constexpr, HAS_DX_PARTIAL: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # Grid: (plane blocks, HW chunks). dx = dx_partial + dmean/HW + dvar·2(x − mean)/HW: with HAS_DX_PARTIAL the
    # gradient reaching x by another path (a composite's elementwise pass) is added here, not by a separate launch.
    planes, plane_mask, n, c = channel_block(C, BLOCK_P)
    hw = (tl.program_id(1).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW))
    mask = plane_mask[:, None] & (hw < HW)[None, :]
    count = tl.cast(HW, COMPUTE)
    dx = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    if HAS_DX_PARTIAL:
        dx += load_plane_values(DX_PARTIAL, channel_offsets(n, c, stride_pn, stride_pc), hw, stride_phw, mask,
                                COMPUTE)
    if HAS_DMEAN:
        dx += (tl.load(DMEAN + planes, mask=plane_mask, other=0.0).to(COMPUTE) / count)[:, None]
    if HAS_DVAR:
        x_base = channel_offsets(n, c, stride_xn, stride_xc)
        x = load_plane_values(X, x_base, hw, stride_xhw, mask, COMPUTE)
        mean = tl.load(MEAN + planes, mask=plane_mask, other=0.0).to(COMPUTE)
        dvar = tl.load(DVAR + planes, mask=plane_mask, other=0.0).to(COMPUTE)
        dx += (x - mean[:, None]) * (2.0 * dvar / count)[:, None]
    dx_base = channel_offsets(n, c, stride_dxn, stride_dxc)
    tl.store(DX + dx_base[:, None] + hw[None, :] * stride_dxhw, dx, mask=mask)


@triton.jit
def plane_affine_fwd_kernel(
    X, HOLE, M, A, B, Y, P, C, HW,
    stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw, stride_yn, stride_yc, stride_yhw,
    REGIONS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # Grid: (plane blocks, HW chunks). y = (x − M[plane])·A[plane] + B[plane]. With REGIONS == 2 (RegionNorm) the
    # coefficients are (P, 2), region 0 where HOLE is nonzero and region 1 elsewhere; HOLE is ignored otherwise.
    planes, plane_mask, n, c = channel_block(C, BLOCK_P)
    hw = tl.program_id(1).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = plane_mask[:, None] & (hw < HW)[None, :]
    x_base = channel_offsets(n, c, stride_xn, stride_xc)
    x = load_plane_values(X, x_base, hw, stride_xhw, mask, COMPUTE)
    a = tl.load(A + planes * REGIONS, mask=plane_mask, other=0.0).to(COMPUTE)
    b = tl.load(B + planes * REGIONS, mask=plane_mask, other=0.0).to(COMPUTE)
    center = tl.load(M + planes * REGIONS, mask=plane_mask, other=0.0).to(COMPUTE)
    y = (x - center[:, None]) * a[:, None] + b[:, None]
    if REGIONS == 2:
        hole_base = channel_offsets(n, c, stride_hn, stride_hc)
        hole = tl.load(HOLE + hole_base[:, None] + hw[None, :] * stride_hhw, mask=mask, other=0) != 0
        a_valid = tl.load(A + planes * 2 + 1, mask=plane_mask, other=0.0).to(COMPUTE)
        b_valid = tl.load(B + planes * 2 + 1, mask=plane_mask, other=0.0).to(COMPUTE)
        center_valid = tl.load(M + planes * 2 + 1, mask=plane_mask, other=0.0).to(COMPUTE)
        y = tl.where(hole, y, (x - center_valid[:, None]) * a_valid[:, None] + b_valid[:, None])
    y_base = channel_offsets(n, c, stride_yn, stride_yc)
    tl.store(Y + y_base[:, None] + hw[None, :] * stride_yhw, y, mask=mask)


@triton.jit
def plane_affine_bwd_kernel(
    DY, X, HOLE, M, A, DX, DA, DB, P, C, HW,
    stride_dyn, stride_dyc, stride_dyhw, stride_xn, stride_xc, stride_xhw, stride_hn, stride_hc, stride_hhw,
    stride_dxn, stride_dxc, stride_dxhw,
    REGIONS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # Each program owns BLOCK_P planes and walks their HW values: dx = dy·A, dA = Σ dy·(x − M), dB = Σ dy. With
    # REGIONS == 2, each sum runs over its region's values only and dx takes the region's A.
    planes, plane_mask, n, c = channel_block(C, BLOCK_P)
    offsets = tl.arange(0, BLOCK_HW)
    dy_base = channel_offsets(n, c, stride_dyn, stride_dyc)
    x_base = channel_offsets(n, c, stride_xn, stride_xc)
    dx_base = channel_offsets(n, c, stride_dxn, stride_dxc)
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
    for start in range(0, HW, BLOCK_HW):
        hw = (start + offsets).to(tl.int64)
        mask = plane_mask[:, None] & (hw < HW)[None, :]
        dy = load_plane_values(DY, dy_base, hw, stride_dyhw, mask, COMPUTE)
        x = load_plane_values(X, x_base, hw, stride_xhw, mask, COMPUTE)
        if REGIONS == 2:
            hole = tl.load(HOLE + hole_base[:, None] + hw[None, :] * stride_hhw, mask=mask, other=0) != 0
            tl.store(DX + dx_base[:, None] + hw[None, :] * stride_dxhw,
                     dy * tl.where(hole, a[:, None], a_valid[:, None]), mask=mask)
            # Select, never multiply by a 0/1 mask: a NaN in one region must not reach the other's sums.
            valid = mask & (hole == 0)
            da_valid += tl.sum(tl.where(valid, dy * (x - center_valid[:, None]), 0.0), axis=1)
            db_valid += tl.sum(tl.where(valid, dy, 0.0), axis=1)
            da += tl.sum(tl.where(hole, dy * (x - center[:, None]), 0.0), axis=1)
            db += tl.sum(tl.where(hole, dy, 0.0), axis=1)
        else:
            tl.store(DX + dx_base[:, None] + hw[None, :] * stride_dxhw, dy * a[:, None], mask=mask)
            da += tl.sum(dy * tl.where(mask, x - center[:, None], 0.0), axis=1)
            db += tl.sum(dy, axis=1)
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
    block_p, block_hw, num_warps = channel_tile(x3, max_block_hw, reduction=True)
    plane_moments_fwd_kernel[(channel_grid(x3, block_p),)](
        x3, mean, var, n * c, c, hw, *plane_strides(x3),
        COMPUTE=tl_compute_dtype(compute), BLOCK_P=block_p, BLOCK_HW=block_hw,
        num_warps=num_warps,
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
    block_p, block_hw, num_warps = channel_tile(x3, max_block_hw)
    plane_moments_bwd_kernel[(channel_grid(x3, block_p), triton.cdiv(hw, block_hw))](
        x3, mean.contiguous(), dmean.contiguous() if dmean is not None else mean,
        dvar.contiguous() if dvar is not None else mean, partial3, dx3, n * c, c, hw, *plane_strides(x3),
        *plane_strides(partial3), *plane_strides(dx3),
        HAS_DMEAN=dmean is not None, HAS_DVAR=dvar is not None, HAS_DX_PARTIAL=dx_partial is not None,
        COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)), BLOCK_P=block_p, BLOCK_HW=block_hw,
        num_warps=num_warps,
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
    block_p, block_hw, num_warps = channel_tile(x3, max_block_hw)
    plane_affine_fwd_kernel[(channel_grid(x3, block_p), triton.cdiv(hw, block_hw))](
        x3, hole3, center.contiguous(), scale.contiguous(), shift.contiguous(), y3, n * c, c, hw, *plane_strides(x3),
        *hole_strides, *plane_strides(y3), REGIONS=1 if hole_mask is None else 2,
        COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)), BLOCK_P=block_p, BLOCK_HW=block_hw,
        num_warps=num_warps,
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
    block_p, block_hw, num_warps = channel_tile(x3, max_block_hw, reduction=True)
    plane_affine_bwd_kernel[(channel_grid(x3, block_p),)](
        dy3, x3, hole3, center.contiguous(), scale.contiguous(), dx3, dscale, dshift, n * c, c, hw, *plane_strides(dy3),
        *plane_strides(x3), *hole_strides, *plane_strides(dx3), REGIONS=1 if hole_mask is None else 2,
        COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)), BLOCK_P=block_p, BLOCK_HW=block_hw,
        num_warps=num_warps,
    )
    return dx, dscale, dshift
