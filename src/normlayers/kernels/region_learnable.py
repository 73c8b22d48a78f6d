"""Triton kernels for Learnable Region Normalization, RN-L (Yu et al., "Region Normalization for Image Inpainting",
AAAI 2020; the authors' code geekyutao/RN, ``rn.py``: ``SelfAware_Affine`` and ``RN_L``; docs/region_norm.md).

Per sample, from the channel mean ``a`` and maximum ``m`` of each pixel (``k × k`` convs, padding ``k // 2``):

    S = sigmoid(conv1([a, m])),  M = [S ≥ threshold],  r = RN(x; M),  y = r·(1 + conv_γ(S) + b_γ) + conv_β(S) + b_β

with ``RN`` the region normalization of :mod:`normlayers.kernels.region_norm` (``M = 1`` the "hole" region, no
region affine, statistics of the power-of-two-scaled values). The convs have 2·k² + 2·k² + 2 parameters, so each
kernel computes the few it needs in registers from the small ``(N, ·, H, W)`` maps around its pixels.

**Forward, two launches** (training and eval alike: RN-L normalizes with the current batch's statistics in eval
too, the official ``BatchNorm2d(track_running_stats=False)``):

* ``lrn_stats`` per sample and tile of whole rows, over all channels: ``a`` and ``m`` of its rows and of the
  ``k // 2`` rows either side (the conv window's halo, pooled again rather than taken from the neighbouring tile:
  at least ``4·(k // 2)`` rows per tile keep that under half a read of the rows), then ``S`` of its rows, then per
  channel the scaled region partials of :func:`normlayers.kernels.region_norm.region_stats` over its rows (the
  three steps read what the program wrote in the step before, ordered by a barrier); it also writes ``a``, ``m``
  and how many channels reach ``m`` for the backward;
* ``lrn_normalize`` per channel block and pixel block: the statistics finalized from the partials (Chan's
  combination over the row tiles, and the samples with batch statistics; redundantly in each program), ``γ`` and
  ``β`` from ``S``, and ``y``; it also writes the statistics and ``1 + γ`` for the backward.

``lrn_stats`` has one program per sample and row tile, each over all channels: few for a small batch of large
maps. Where those few programs would each read many values (:func:`pools_in_stats`), the forward takes three
launches instead, with many more programs: ``lrn_pool`` (per pixel block) writes the pooled maps, and
``lrn_plane_stats`` (per sample and channel block, walking the pixels) computes ``S`` from them and the partials of
whole planes.

**Backward, four launches** (``g = 1 + γ``, ``x̂ = r``, ``dr = dy·g``):

* ``lrn_bwd_sums`` per sample and pixel tile, over the channels: the maps ``dγ = Σ_c dy·x̂`` and ``dβ = Σ_c dy``
  and, per (tile, channel, region), ``Σ dr`` and ``Σ dr·x̂``;
* ``lrn_bwd_maps``: per pixel tile ``dpre = (convᵀ_γ(dγ) + convᵀ_β(dβ))·S·(1 − S)`` and the tile's partial
  correlations for the γ/β conv weights and biases; extra programs combine the region sums per statistic (the
  ``Σdr/S``, ``Σdr·x̂/S`` of the region-norm backward);
* ``lrn_bwd_pool``: per pixel tile ``d[a, m] = convᵀ_1(dpre)`` and the partial correlations for ``conv1``; one extra
  program sums the γ/β partials;
* ``lrn_dx``: ``dx = s·rstd·(dr − Σdr/S − x̂·Σdr·x̂/S) + da/C + dm·[x = m]/ties`` (the maximum's gradient shared by
  the tied channels, as ``torch.amax``'s); one extra program sums the ``conv1`` partials.

No gradient flows through the threshold (the official code thresholds a detached map). Every reduction runs in a
fixed order into per-program partials (deterministic, no atomics), and no allocation depends on data. Maps,
statistics and partials are fp32 (fp64 for fp64 ``x``); ``x`` may have any strides.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from normlayers._dtypes import compute_dtype
from normlayers.kernels.common import (
    as_planes,
    next_power_of_2,
    num_warps_for,
    persistent_programs,
    plane_strides,
    tl_compute_dtype,
)
from normlayers.kernels.region_norm import (
    FINALIZE_BLOCK,
    _finalized,
    _load_quad,
    _region_chunk_moments,
    _store_means,
    _store_quad,
)

# Values per (channel block × pixel block) tile; pixel blocks of at most LRN_MAX_BLOCK_HW (the conv windows are
# computed per pixel, once per tile, and broadcast over the tile's channels).
LRN_TILE_ELEMENTS = 1024
LRN_MAX_BLOCK_HW = 256
# Pixels per row tile of lrn_stats (whole rows; see row_tile).
LRN_ROW_TILE_PIXELS = 1024
# Values of x per lrn_stats program below which the two-launch forward is taken even on a GPU it does not fill (see
# pools_in_stats): an estimate, not a measurement (no GPU was at hand): one program reads its values about 2.4 times
# (its rows, their halo, the partials pass), 64K bf16 values ≈ 300 KB, a few µs at one SM's share of an H100's
# bandwidth, about one launch.
LRN_VALUES_PER_STATS_PROGRAM = 65536


@triton.jit
def _window_sums(MAP, base_a, base_b, h, w, pix, H, W, WEIGHT_A, WEIGHT_B, K: tl.constexpr, FLIP: tl.constexpr,
                 COMPUTE: tl.constexpr):
    """Two ``k × k`` window sums at each pixel (zero padding), ``Σ_ij WEIGHT_A[i, j]·MAP[base_a + (h + i − k//2)·W
    + w + j − k//2]`` and the same with ``WEIGHT_B`` and ``base_b``: the cross-correlations of conv2d, or with
    ``FLIP`` the kernels flipped, their transposes (the gradient of the input). Every use pairs two windows over the
    same pixels, so each tap's bounds and offsets are computed once for both."""
    acc_a = tl.zeros(h.shape, dtype=COMPUTE)
    acc_b = tl.zeros(h.shape, dtype=COMPUTE)
    for i in range(K):  # (runtime loops: unrolled, the k² windows' loads would all be live at once and spill)
        for j in range(K):
            hh = h + (i - K // 2)
            ww = w + (j - K // 2)
            inside = pix & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            offset = hh * W + ww
            tap = (K - 1 - i) * K + (K - 1 - j) if FLIP else i * K + j
            acc_a += tl.load(WEIGHT_A + tap).to(COMPUTE) * tl.load(MAP + base_a + offset, mask=inside,
                                                                    other=0.0).to(COMPUTE)
            acc_b += tl.load(WEIGHT_B + tap).to(COMPUTE) * tl.load(MAP + base_b + offset, mask=inside,
                                                                    other=0.0).to(COMPUTE)
    return acc_a, acc_b


@triton.jit
def _store_correlations(dout, MAP, base, h, w, pix, H, W, ROW, K: tl.constexpr, COMPUTE: tl.constexpr):
    """``ROW[i·k + j] = Σ_tile dout·MAP[pixel + (i − k//2, j − k//2)]``: this tile's part of a conv weight's gradient
    (``dout`` zero outside ``pix``)."""
    for i in range(K):
        for j in range(K):
            hh = h + (i - K // 2)
            ww = w + (j - K // 2)
            inside = pix & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            value = tl.load(MAP + base + (hh * W + ww), mask=inside, other=0.0).to(COMPUTE)
            tl.store(ROW + i * K + j, tl.sum(dout * value, axis=0))


@triton.jit
def _row_sums(PARTS, rows, WIDTH, BLOCK_R: tl.constexpr, COMPUTE: tl.constexpr):
    """The ``rows`` rows of a contiguous ``(rows, WIDTH)`` buffer summed in order, as a ``BLOCK_R`` vector."""
    columns = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=COMPUTE)
    for row in range(0, rows):
        acc += tl.load(PARTS + row * WIDTH + columns, mask=columns < WIDTH, other=0.0)
    return columns, acc


@triton.jit
def _where_also(mask, flag):
    """``mask & flag`` for a scalar ``flag``, as a mask of ``mask``'s shape (a store mask must be a block)."""
    return mask & ((tl.zeros(mask.shape, dtype=tl.int32) + flag.to(tl.int32)) != 0)


@triton.jit
def _pixels(tile, H, W, BLOCK_HW: tl.constexpr):
    """Pixel block ``tile`` of a ``H × W`` plane: flat indices, which exist, row and column (int32, as every index
    within a plane: only the per-sample and per-channel offsets need 64 bits, and 64-bit row/column arithmetic
    doubles the registers of the conv windows)."""
    hw = tl.arange(0, BLOCK_HW) + tile * BLOCK_HW
    return hw, hw < H * W, hw // W, hw % W


@triton.jit
def _channel_pool(X, n, hw, pix, C, stride_xn, stride_xc, stride_xhw, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_HW: tl.constexpr):
    """At each pixel, over the channels in a fixed order: the mean, the maximum (NaN if any value is NaN, as
    ``torch.amax``) and how many channels reach the maximum."""
    total = tl.zeros((BLOCK_HW,), dtype=COMPUTE)
    largest = tl.full((BLOCK_HW,), float("-inf"), COMPUTE)
    ties = tl.zeros((BLOCK_HW,), dtype=COMPUTE)
    for start in range(0, C, BLOCK_C):
        channels = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (channels < C)[:, None] & pix[None, :]
        x = tl.load(X + n * stride_xn + channels[:, None] * stride_xc + hw[None, :] * stride_xhw, mask=mask,
                    other=0.0).to(COMPUTE)
        total += tl.sum(x, axis=0)
        x = tl.where(mask, x, float("-inf"))
        is_nan = x != x
        tile_max = tl.where(tl.max(is_nan.to(tl.int32), axis=0) > 0, tl.sum(tl.where(is_nan, x, 0.0), axis=0),
                            tl.max(x, axis=0))
        tile_ties = tl.sum((x == tile_max[None, :]).to(COMPUTE), axis=0)
        ties = tl.where(tile_max > largest, tile_ties, tl.where(tile_max == largest, ties + tile_ties, ties))
        largest = tl.where((tile_max > largest) | (tile_max != tile_max), tile_max, largest)
    return total / C, largest, ties


@triton.jit
def _response(MAP, base, plane_stride, h, w, pix, H, W, W1, K: tl.constexpr, COMPUTE: tl.constexpr):
    """``S = sigmoid(conv1([mean, max]))`` at each pixel, the mean map at ``MAP + base`` and the max map
    ``plane_stride`` after it (both indexed by the pixel's flat index in the map)."""
    pre_mean, pre_max = _window_sums(MAP, base, base + plane_stride, h, w, pix, H, W, W1, W1 + K * K, K, False,
                                     COMPUTE)
    pre = pre_mean + pre_max
    return 1.0 / (1.0 + tl.exp(-pre))


@triton.jit
def _region_partials(X, POOL, W1, S, PARTIALS, row, n, channels, channel_mask, first, last, C, H, W,
                     stride_xn, stride_xc, stride_xhw, cap, writes_s, THRESHOLD: tl.constexpr, K: tl.constexpr,
                     RESPONSE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """region_stats' scaled partials ``[count, s, Σx·s, M2]`` of sample ``n``'s pixels ``[first, last)`` for each
    channel of the block, with the regions ``M = [S ≥ threshold]`` (the "hole"), into partial row ``row``
    (``PARTIALS[row, channel, region]``). ``S`` is read, or with ``RESPONSE`` computed here from ``POOL`` (and
    written where ``writes_s``)."""
    HW = H * W
    zero = tl.zeros((BLOCK_C,), dtype=COMPUTE)
    max_h, count_h, total_h, m2_h = zero, zero, zero, zero
    max_v, count_v, total_v, m2_v = zero, zero, zero, zero
    scale_h = zero + cap  # an empty region's scale (power_of_two_scale of 0)
    scale_v = zero + cap
    for start in range(first, last, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        pix = hw < last
        if RESPONSE:
            s = _response(POOL, n * 3 * HW, HW, hw // W, hw % W, pix, H, W, W1, K, COMPUTE)
            tl.store(S + n * HW + hw, s, mask=_where_also(pix, writes_s))
        else:
            s = tl.load(S + n * HW + hw, mask=pix, other=0.0)
        mask = channel_mask[:, None] & pix[None, :]
        x = tl.load(X + n * stride_xn + channels[:, None] * stride_xc + hw[None, :] * stride_xhw, mask=mask,
                    other=0.0).to(COMPUTE)
        hole = mask & (s >= THRESHOLD)[None, :]
        valid = mask & (s < THRESHOLD)[None, :]
        max_h, scale_h, count_h, total_h, m2_h = _region_chunk_moments(x, hole, max_h, scale_h, count_h, total_h,
                                                                       m2_h, cap, COMPUTE)
        max_v, scale_v, count_v, total_v, m2_v = _region_chunk_moments(x, valid, max_v, scale_v, count_v, total_v,
                                                                       m2_v, cap, COMPUTE)
    rows = row * C + channels
    _store_quad(PARTIALS, rows * 2, channel_mask, count_h, scale_h, total_h, m2_h)
    _store_quad(PARTIALS, rows * 2 + 1, channel_mask, count_v, scale_v, total_v, m2_v)


@triton.jit
def lrn_stats_kernel(
    X, POOL, HALO, W1, S, PARTIALS, C, H, W, TILE_ROWS, stride_xn, stride_xc, stride_xhw, cap,
    THRESHOLD: tl.constexpr, K: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # Grid (N, row tiles of TILE_ROWS rows); each program, over all channels:
    # 1. the channel mean and maximum of its rows and k // 2 rows either side (the conv1 window's halo; a
    #    neighbour's rows are pooled again rather than read from it) into its own HALO scratch, its own rows' mean,
    #    maximum and ties into POOL (N, 3, HW) for the backward;
    # 2. S = sigmoid(conv1([mean, max])) of its rows from HALO, into S;
    # 3. the region partials of its rows, per channel, into PARTIALS (N, row tiles, C, 2, 4).
    # Each step reads what this program's threads wrote in the step before: a barrier orders them.
    n = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    tiles = tl.num_programs(1)
    HW = H * W
    first = tile * TILE_ROWS * W
    last = tl.minimum(tile * TILE_ROWS + TILE_ROWS, H) * W
    halo_first = tl.maximum(tile * TILE_ROWS - K // 2, 0) * W
    halo_last = tl.minimum(tile * TILE_ROWS + TILE_ROWS + K // 2, H) * W
    span = (TILE_ROWS + 2 * (K // 2)) * W
    halo = HALO + (n * tiles + tile) * 2 * span - halo_first  # indexed by the pixel's flat index in the map
    for start in range(halo_first, halo_last, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        pix = hw < halo_last
        mean, largest, ties = _channel_pool(X, n, hw, pix, C, stride_xn, stride_xc, stride_xhw, COMPUTE, BLOCK_C,
                                            BLOCK_HW)
        tl.store(halo + hw, mean, mask=pix)
        tl.store(halo + span + hw, largest, mask=pix)
        own = pix & (hw >= first) & (hw < last)
        tl.store(POOL + n * 3 * HW + hw, mean, mask=own)
        tl.store(POOL + n * 3 * HW + HW + hw, largest, mask=own)
        tl.store(POOL + n * 3 * HW + 2 * HW + hw, ties, mask=own)
    tl.debug_barrier()
    for start in range(first, last, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        pix = hw < last
        tl.store(S + n * HW + hw, _response(halo, 0, span, hw // W, hw % W, pix, H, W, W1, K, COMPUTE), mask=pix)
    tl.debug_barrier()
    for block in range(0, C, BLOCK_C):
        channels = block + tl.arange(0, BLOCK_C).to(tl.int64)
        _region_partials(X, POOL, W1, S, PARTIALS, n * tiles + tile, n, channels, channels < C, first, last, C, H, W,
                         stride_xn, stride_xc, stride_xhw, tl.cast(cap, COMPUTE), False, THRESHOLD, K, False,
                         COMPUTE, BLOCK_C, BLOCK_HW)


@triton.jit
def lrn_pool_kernel(
    X, POOL, C, HW, stride_xn, stride_xc, stride_xhw,
    COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # The three-launch forward's first (grid (N, pixel blocks)): POOL (N, 3, HW) = the channel mean, maximum, ties.
    n = tl.program_id(0).to(tl.int64)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    pix = hw < HW
    mean, largest, ties = _channel_pool(X, n, hw, pix, C, stride_xn, stride_xc, stride_xhw, COMPUTE, BLOCK_C,
                                        BLOCK_HW)
    tl.store(POOL + n * 3 * HW + hw, mean, mask=pix)
    tl.store(POOL + n * 3 * HW + HW + hw, largest, mask=pix)
    tl.store(POOL + n * 3 * HW + 2 * HW + hw, ties, mask=pix)


@triton.jit
def lrn_plane_stats_kernel(
    X, POOL, W1, S, PARTIALS, C, H, W, stride_xn, stride_xc, stride_xhw, cap,
    THRESHOLD: tl.constexpr, K: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # The three-launch forward's second (grid (N, channel blocks), each walking the sample's pixels): S computed
    # from POOL (written by channel block 0) and the region partials of whole planes (one row tile per sample).
    n = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    channels = block * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    _region_partials(X, POOL, W1, S, PARTIALS, n, n, channels, channels < C, 0, H * W, C, H, W, stride_xn,
                     stride_xc, stride_xhw, tl.cast(cap, COMPUTE), block == 0, THRESHOLD, K, True, COMPUTE, BLOCK_C,
                     BLOCK_HW)


@triton.jit
def lrn_normalize_kernel(
    X, S, PARTIALS, STATS, GAIN, WG, BG, WB, BB, Y, N, C, H, W, STAT_TILES, eps,
    stride_xn, stride_xc, stride_xhw, stride_yn, stride_yc, stride_yhw,
    THRESHOLD: tl.constexpr, K: tl.constexpr, BATCH: tl.constexpr, OFFICIAL_EPS: tl.constexpr,
    HAS_BG: tl.constexpr, HAS_BB: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    # Grid (N × channel blocks, pixel blocks). y = x̂·(1 + γ) + β with x̂ the region-normalized x. The statistics
    # are finalized here from the partials (each program its channels'); the programs of pixel block 0 (and of
    # sample 0 with batch statistics) write them, and those of channel block 0 write 1 + γ, for the backward.
    blocks = tl.cdiv(C, BLOCK_C)
    n = tl.program_id(0).to(tl.int64) // blocks
    block = tl.program_id(0) % blocks
    tile = tl.program_id(1)
    channels = block * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    channel_mask = channels < C
    stat = channels if BATCH else n * C + channels
    # The partials of a statistic: rows (sample, row tile) of PARTIALS, C apart: every row (batch statistics) or
    # the sample's STAT_TILES rows.
    count_h, scale_h, mean_h, rstd_h, count_v, scale_v, mean_v, rstd_v = _finalized(
        PARTIALS, channels if BATCH else n * STAT_TILES * C + channels, channel_mask,
        N * STAT_TILES if BATCH else STAT_TILES, C, tl.cast(eps, COMPUTE), OFFICIAL_EPS, COMPUTE)
    writes_stats = _where_also(channel_mask, tile == 0)
    if BATCH:
        writes_stats = _where_also(writes_stats, n == 0)
    _store_quad(STATS, stat * 2, writes_stats, count_h, scale_h, mean_h, rstd_h)
    _store_quad(STATS, stat * 2 + 1, writes_stats, count_v, scale_v, mean_v, rstd_v)
    hw, pix, h, w = _pixels(tile, H, W, BLOCK_HW)
    HW = H * W
    s = tl.load(S + n * HW + hw, mask=pix, other=0.0)
    gamma, beta = _window_sums(S, n * HW, n * HW, h, w, pix, H, W, WG, WB, K, False, COMPUTE)
    if HAS_BG:
        gamma += tl.load(BG).to(COMPUTE)
    if HAS_BB:
        beta += tl.load(BB).to(COMPUTE)
    gain = 1.0 + gamma
    tl.store(GAIN + n * HW + hw, gain, mask=_where_also(pix, block == 0))
    mask = channel_mask[:, None] & pix[None, :]
    x = tl.load(X + n * stride_xn + channels[:, None] * stride_xc + hw[None, :] * stride_xhw, mask=mask,
                other=0.0).to(COMPUTE)
    xhat = tl.where((s >= THRESHOLD)[None, :], (x * scale_h[:, None] - mean_h[:, None]) * rstd_h[:, None],
                    (x * scale_v[:, None] - mean_v[:, None]) * rstd_v[:, None])
    y = xhat * gain[None, :] + beta[None, :]
    tl.store(Y + n * stride_yn + channels[:, None] * stride_yc + hw[None, :] * stride_yhw, y, mask=mask)


@triton.jit
def _normalized_tile(X, DY, S, STATS, GAIN, n, channels, channel_mask, hw, pix, C,
                     stride_xn, stride_xc, stride_xhw, stride_dyn, stride_dyc, stride_dyhw,
                     THRESHOLD: tl.constexpr, BATCH: tl.constexpr, COMPUTE: tl.constexpr):
    """A backward tile (``S`` and ``GAIN`` point at sample ``n``'s maps): ``(mask, hole, x, dy, x̂, dr, stat,
    s_hole, rstd_hole, s_valid, rstd_valid)`` with ``x̂`` zero outside ``mask``, ``dr = dy·(1 + γ)``, the hole as
    ``(1, BLOCK_HW)`` flags, and each channel's statistic index and per-region ``(s, rstd)``."""
    mask = channel_mask[:, None] & pix[None, :]
    stat = channels if BATCH else n * C + channels
    _, scale_h, mean_h, rstd_h = _load_quad(STATS, stat * 2, channel_mask, COMPUTE)
    _, scale_v, mean_v, rstd_v = _load_quad(STATS, stat * 2 + 1, channel_mask, COMPUTE)
    s = tl.load(S + hw, mask=pix, other=0.0)
    gain = tl.load(GAIN + hw, mask=pix, other=0.0)
    hole = (s >= THRESHOLD)[None, :]
    x = tl.load(X + n * stride_xn + channels[:, None] * stride_xc + hw[None, :] * stride_xhw, mask=mask,
                other=0.0).to(COMPUTE)
    dy = tl.load(DY + n * stride_dyn + channels[:, None] * stride_dyc + hw[None, :] * stride_dyhw, mask=mask,
                 other=0.0).to(COMPUTE)
    xhat = tl.where(hole, (x * scale_h[:, None] - mean_h[:, None]) * rstd_h[:, None],
                    (x * scale_v[:, None] - mean_v[:, None]) * rstd_v[:, None])
    xhat = tl.where(mask, xhat, 0.0)
    return mask, hole, x, dy, xhat, dy * gain[None, :], stat, scale_h, rstd_h, scale_v, rstd_v


@triton.jit
def lrn_bwd_sums_kernel(
    DY, X, S, STATS, GAIN, SUMS, DMAPS, C, H, W, TILES,
    stride_dyn, stride_dyc, stride_dyhw, stride_xn, stride_xc, stride_xhw,
    THRESHOLD: tl.constexpr, BATCH: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    # Grid (N, pixel blocks), over the channels: DMAPS (N, 2, HW) = (Σ_c dy·x̂, Σ_c dy) and SUMS (N, TILES, C, 4) =
    # per channel (Σ_hole dr, Σ_hole dr·x̂, Σ_valid dr, Σ_valid dr·x̂) over this tile.
    n = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    HW = H * W
    hw, pix, _row, _column = _pixels(tile, H, W, BLOCK_HW)
    dgamma = tl.zeros((BLOCK_HW,), dtype=COMPUTE)
    dbeta = tl.zeros((BLOCK_HW,), dtype=COMPUTE)
    for start in range(0, C, BLOCK_C):
        channels = start + tl.arange(0, BLOCK_C).to(tl.int64)
        channel_mask = channels < C
        # (distinct names for the unused results: the compiler types a loop-carried "_" once)
        mask, hole, _x, dy, xhat, dr, _stat, _scale_h, _rstd_h, _scale_v, _rstd_v = _normalized_tile(
            X, DY, S + n * HW, STATS, GAIN + n * HW, n, channels, channel_mask, hw, pix, C, stride_xn, stride_xc,
            stride_xhw, stride_dyn, stride_dyc, stride_dyhw, THRESHOLD, BATCH, COMPUTE)
        dgamma += tl.sum(dy * xhat, axis=0)
        dbeta += tl.sum(dy, axis=0)
        in_hole = mask & hole
        in_valid = mask & (hole == 0)
        _store_quad(SUMS, (n * TILES + tile) * C + channels, channel_mask,
                    tl.sum(tl.where(in_hole, dr, 0.0), axis=1), tl.sum(tl.where(in_hole, dr * xhat, 0.0), axis=1),
                    tl.sum(tl.where(in_valid, dr, 0.0), axis=1), tl.sum(tl.where(in_valid, dr * xhat, 0.0), axis=1))
    tl.store(DMAPS + n * 2 * HW + hw, dgamma, mask=pix)
    tl.store(DMAPS + n * 2 * HW + HW + hw, dbeta, mask=pix)


@triton.jit
def lrn_bwd_maps_kernel(
    S, DMAPS, WG, WB, DPRE, WPARTS, SUMS, STATS, COEF, N, C, H, W, TILES,
    K: tl.constexpr, BATCH: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK: tl.constexpr,
):
    # Grid (N·TILES + channel blocks,). Pixel programs: dpre = (convᵀ_γ(dγ) + convᵀ_β(dβ))·S·(1 − S), and their
    # tile's row of WPARTS (N·TILES, 2k² + 2): the γ and β conv weights' correlations, then Σ dγ and Σ dβ. Channel
    # programs: COEF = (Σdr/S_r, Σdr·x̂/S_r) per statistic and region, SUMS summed over tiles and then samples.
    pid = tl.program_id(0)
    HW = H * W
    if pid < N * TILES:
        n = (pid // TILES).to(tl.int64)
        hw, pix, h, w = _pixels(pid % TILES, H, W, BLOCK_HW)
        maps = n * 2 * HW
        ds_gamma, ds_beta = _window_sums(DMAPS, maps, maps + HW, h, w, pix, H, W, WG, WB, K, True, COMPUTE)
        ds = ds_gamma + ds_beta
        s = tl.load(S + n * HW + hw, mask=pix, other=0.0)
        tl.store(DPRE + n * HW + hw, ds * s * (1.0 - s), mask=pix)
        dgamma = tl.load(DMAPS + maps + hw, mask=pix, other=0.0)
        dbeta = tl.load(DMAPS + maps + HW + hw, mask=pix, other=0.0)
        row = WPARTS + pid.to(tl.int64) * (2 * K * K + 2)
        _store_correlations(dgamma, S, n * HW, h, w, pix, H, W, row, K, COMPUTE)
        _store_correlations(dbeta, S, n * HW, h, w, pix, H, W, row + K * K, K, COMPUTE)
        tl.store(row + 2 * K * K, tl.sum(dgamma, axis=0))
        tl.store(row + 2 * K * K + 1, tl.sum(dbeta, axis=0))
    else:
        channels = (pid - N * TILES).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = channels < C
        zero = tl.zeros((BLOCK,), dtype=COMPUTE)
        dr_h, dr_xhat_h, dr_v, dr_xhat_v = zero, zero, zero, zero
        for sample in range(0, N):
            plane_h, plane_xhat_h, plane_v, plane_xhat_v = zero, zero, zero, zero
            for tile in range(0, TILES):
                entry = ((sample * TILES + tile) * C + channels) * 4
                plane_h += tl.load(SUMS + entry, mask=mask, other=0.0)
                plane_xhat_h += tl.load(SUMS + entry + 1, mask=mask, other=0.0)
                plane_v += tl.load(SUMS + entry + 2, mask=mask, other=0.0)
                plane_xhat_v += tl.load(SUMS + entry + 3, mask=mask, other=0.0)
            if not BATCH:
                plane = sample * C + channels
                _store_means(STATS, COEF, plane * 2, mask, plane_h, plane_xhat_h, COMPUTE)
                _store_means(STATS, COEF, plane * 2 + 1, mask, plane_v, plane_xhat_v, COMPUTE)
            dr_h += plane_h
            dr_xhat_h += plane_xhat_h
            dr_v += plane_v
            dr_xhat_v += plane_xhat_v
        if BATCH:
            _store_means(STATS, COEF, channels * 2, mask, dr_h, dr_xhat_h, COMPUTE)
            _store_means(STATS, COEF, channels * 2 + 1, mask, dr_v, dr_xhat_v, COMPUTE)


@triton.jit
def lrn_bwd_pool_kernel(
    POOL, DPRE, W1, DPOOL, W1PARTS, WPARTS, DWG, DBG, DWB, DBB, N, H, W, TILES,
    K: tl.constexpr, HAS_BG: tl.constexpr, HAS_BB: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Grid (N·TILES + 1,). Pixel programs: DPOOL (N, 2, HW) = convᵀ_1(dpre) for the mean and the max channel, and
    # their tile's row of W1PARTS (N·TILES, 2k²), conv1's weight correlations. The last program sums WPARTS' rows.
    pid = tl.program_id(0)
    HW = H * W
    if pid < N * TILES:
        n = (pid // TILES).to(tl.int64)
        hw, pix, h, w = _pixels(pid % TILES, H, W, BLOCK_HW)
        dmean, dmax = _window_sums(DPRE, n * HW, n * HW, h, w, pix, H, W, W1, W1 + K * K, K, True, COMPUTE)
        tl.store(DPOOL + n * 2 * HW + hw, dmean, mask=pix)
        tl.store(DPOOL + n * 2 * HW + HW + hw, dmax, mask=pix)
        dpre = tl.load(DPRE + n * HW + hw, mask=pix, other=0.0)
        row = W1PARTS + pid.to(tl.int64) * (2 * K * K)
        _store_correlations(dpre, POOL, n * 3 * HW, h, w, pix, H, W, row, K, COMPUTE)
        _store_correlations(dpre, POOL, n * 3 * HW + HW, h, w, pix, H, W, row + K * K, K, COMPUTE)
    else:
        columns, acc = _row_sums(WPARTS, N * TILES, 2 * K * K + 2, BLOCK_R, COMPUTE)
        taps = K * K
        tl.store(DWG + columns, acc.to(DWG.dtype.element_ty), mask=columns < taps)
        tl.store(DWB + columns - taps, acc.to(DWB.dtype.element_ty), mask=(columns >= taps) & (columns < 2 * taps))
        if HAS_BG:
            tl.store(DBG + columns - 2 * taps, acc.to(DBG.dtype.element_ty), mask=columns == 2 * taps)
        if HAS_BB:
            tl.store(DBB + columns - 2 * taps - 1, acc.to(DBB.dtype.element_ty), mask=columns == 2 * taps + 1)


@triton.jit
def lrn_dx_kernel(
    DY, X, S, STATS, COEF, GAIN, POOL, DPOOL, DX, W1PARTS, DW1, N, C, H, W, TILES, PARTS_ROWS,
    stride_dyn, stride_dyc, stride_dyhw, stride_xn, stride_xc, stride_xhw, stride_dxn, stride_dxc, stride_dxhw,
    THRESHOLD: tl.constexpr, K: tl.constexpr, BATCH: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Grid (N × channel blocks × pixel blocks + 1,). dx = s·rstd·(dr − Σdr/S − x̂·Σdr·x̂/S) in the value's region,
    # + dmean/C + dmax·[x = max]/ties. The last program sums W1PARTS' rows into conv1's weight gradient.
    pid = tl.program_id(0)
    blocks = tl.cdiv(C, BLOCK_C)
    if pid < N * blocks * TILES:
        n = (pid // (blocks * TILES)).to(tl.int64)
        block = (pid // TILES) % blocks
        HW = H * W
        hw, pix, _row, _column = _pixels(pid % TILES, H, W, BLOCK_HW)
        channels = block * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        channel_mask = channels < C
        mask, hole, x, _dy, xhat, dr, stat, scale_h, rstd_h, scale_v, rstd_v = _normalized_tile(
            X, DY, S + n * HW, STATS, GAIN + n * HW, n, channels, channel_mask, hw, pix, C, stride_xn, stride_xc,
            stride_xhw, stride_dyn, stride_dyc, stride_dyhw, THRESHOLD, BATCH, COMPUTE)
        dr_mean_h, dr_xhat_mean_h, dr_mean_v, dr_xhat_mean_v = _load_quad(COEF, stat, channel_mask, COMPUTE)
        dx = tl.where(hole, (scale_h * rstd_h)[:, None] * (dr - dr_mean_h[:, None] - xhat * dr_xhat_mean_h[:, None]),
                      (scale_v * rstd_v)[:, None] * (dr - dr_mean_v[:, None] - xhat * dr_xhat_mean_v[:, None]))
        dmean = tl.load(DPOOL + n * 2 * HW + hw, mask=pix, other=0.0)
        dmax = tl.load(DPOOL + n * 2 * HW + HW + hw, mask=pix, other=0.0)
        largest = tl.load(POOL + n * 3 * HW + HW + hw, mask=pix, other=0.0)
        ties = tl.load(POOL + n * 3 * HW + 2 * HW + hw, mask=pix, other=1.0)
        dx += (dmean / C)[None, :] + tl.where(x == largest[None, :], (dmax / ties)[None, :], 0.0)
        tl.store(DX + n * stride_dxn + channels[:, None] * stride_dxc + hw[None, :] * stride_dxhw, dx, mask=mask)
    else:
        columns, acc = _row_sums(W1PARTS, PARTS_ROWS, 2 * K * K, BLOCK_R, COMPUTE)
        tl.store(DW1 + columns, acc.to(DW1.dtype.element_ty), mask=columns < 2 * K * K)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def lrn_tile(c: int, hw: int, max_block_hw: Optional[int] = None,
             max_block_c: Optional[int] = None) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_HW)``: pixel blocks of at most ``LRN_MAX_BLOCK_HW`` (or ``max_block_hw``), channel blocks
    filling ``LRN_TILE_ELEMENTS`` (at most ``max_block_c``); the overrides let tests reach the loops on small
    shapes."""
    block_hw = min(next_power_of_2(max(hw, 1)), max_block_hw or LRN_MAX_BLOCK_HW)
    block_c = min(next_power_of_2(c), max(1, LRN_TILE_ELEMENTS // block_hw), max_block_c or LRN_TILE_ELEMENTS)
    return block_c, block_hw


def pools_in_stats(programs: int, values: int, device: torch.device) -> bool:
    """Whether the forward takes two launches, ``lrn_stats`` pooling the channels itself with one program per sample
    and row tile, rather than three (``lrn_pool`` per pixel block, ``lrn_plane_stats`` per channel block, both with
    many more programs): when those ``programs`` fill the GPU (one per SM), or each has at most
    ``LRN_VALUES_PER_STATS_PROGRAM`` values to read, so that fewer programs cost less than the launch saved."""
    return programs >= persistent_programs(device, 1) or values <= LRN_VALUES_PER_STATS_PROGRAM * programs


def row_tile(height: int, width: int, k: int, max_tile_rows: Optional[int] = None) -> int:
    """Rows per program of ``lrn_stats``: about ``LRN_ROW_TILE_PIXELS`` pixels, and at least ``4·(k // 2)`` rows, so
    that pooling the conv window's halo again costs at most half a read of the rows themselves (``max_tile_rows``
    caps it: tests reach several row tiles on small maps)."""
    rows = max(4 * (k // 2), triton.cdiv(LRN_ROW_TILE_PIXELS, max(width, 1)), 1)
    return min(rows, height, max_tile_rows or height)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


def learnable_region_norm_fwd(
    x: torch.Tensor, conv1_weight: torch.Tensor, gamma_weight: torch.Tensor, gamma_bias: Optional[torch.Tensor],
    beta_weight: torch.Tensor, beta_bias: Optional[torch.Tensor], *, threshold: float, eps: float, batch: bool,
    official_eps: bool, cap: float, max_block_hw: Optional[int] = None, max_block_c: Optional[int] = None,
    max_tile_rows: Optional[int] = None, pool_separately: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RN-L forward in two launches (three with ``pool_separately``; ``None``: :func:`pools_in_stats` decides):
    ``(y, pool, s, gain, stats)``, ``y`` in ``x``'s dtype and memory format; ``pool`` ``(N, 3, H, W)`` (channel
    mean, maximum, ties), ``s`` and ``gain = 1 + γ`` ``(N, 1, H, W)``, ``stats`` ``[count, s, mean_s, rstd]`` per
    statistic and region, ``(C, 2, 4)`` (``batch``) or ``(N, C, 2, 4)``; all but ``y`` in fp32 (fp64 for fp64
    ``x``). ``x`` must hold at least one value; ``max_*`` as :func:`lrn_tile`'s and :func:`row_tile`'s."""
    n, c, height, width = x.shape
    hw = height * width
    x3 = as_planes(x)
    y = torch.empty_like(x)
    y3 = as_planes(y)
    opmath = compute_dtype(x.dtype)
    pool = torch.empty((n, 3, height, width), dtype=opmath, device=x.device)
    s = torch.empty((n, 1, height, width), dtype=opmath, device=x.device)
    gain = torch.empty_like(s)
    k = conv1_weight.shape[-1]
    rows = row_tile(height, width, k, max_tile_rows)
    tiles = triton.cdiv(height, rows)
    if pool_separately is None:
        pool_separately = not pools_in_stats(n * tiles, x.numel(), x.device)
    stat_tiles = 1 if pool_separately else tiles
    partials = torch.empty((n, stat_tiles, c, 2, 4), dtype=opmath, device=x.device)
    stats = torch.empty((c, 2, 4) if batch else (n, c, 2, 4), dtype=opmath, device=x.device)
    compute = tl_compute_dtype(opmath)
    block_c, block_hw = lrn_tile(c, hw, max_block_hw, max_block_c)
    warps = num_warps_for(2 * block_c * block_hw, x.device)  # one warp per 128 values, as region_tile's
    if pool_separately:
        lrn_pool_kernel[(n, triton.cdiv(hw, block_hw))](
            x3, pool, c, hw, *plane_strides(x3), COMPUTE=compute, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=warps)
        lrn_plane_stats_kernel[(n, triton.cdiv(c, block_c))](
            x3, pool, _flat(conv1_weight), s, partials, c, height, width, *plane_strides(x3), cap,
            THRESHOLD=float(threshold), K=k, COMPUTE=compute, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps)
    else:
        halo = torch.empty((n * tiles, 2, (rows + 2 * (k // 2)) * width), dtype=opmath, device=x.device)
        lrn_stats_kernel[(n, tiles)](
            x3, pool, halo, _flat(conv1_weight), s, partials, c, height, width, rows, *plane_strides(x3), cap,
            THRESHOLD=float(threshold), K=k, COMPUTE=compute, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps)
    lrn_normalize_kernel[(n * triton.cdiv(c, block_c), triton.cdiv(hw, block_hw))](
        x3, s, partials, stats, gain, _flat(gamma_weight), _flat(gamma_bias if gamma_bias is not None else s),
        _flat(beta_weight), _flat(beta_bias if beta_bias is not None else s), y3, n, c, height, width, stat_tiles, eps,
        *plane_strides(x3), *plane_strides(y3), THRESHOLD=float(threshold), K=k, BATCH=batch,
        OFFICIAL_EPS=official_eps, HAS_BG=gamma_bias is not None, HAS_BB=beta_bias is not None, COMPUTE=compute,
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps)
    return y, pool, s, gain, stats


def learnable_region_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, conv1_weight: torch.Tensor, gamma_weight: torch.Tensor,
    gamma_bias: Optional[torch.Tensor], beta_weight: torch.Tensor, beta_bias: Optional[torch.Tensor],
    pool: torch.Tensor, s: torch.Tensor, gain: torch.Tensor, stats: torch.Tensor, *, threshold: float, batch: bool,
    max_block_hw: Optional[int] = None, max_block_c: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of :func:`learnable_region_norm_fwd` in four launches: ``(dx, dconv1_weight, dgamma_weight,
    dgamma_bias, dbeta_weight, dbeta_bias)``, each like its input (``None`` for a missing bias)."""
    n, c, height, width = x.shape
    hw = height * width
    x3, dy3 = as_planes(x), as_planes(dy)
    dx = torch.empty_like(x)
    dx3 = as_planes(dx)
    opmath = stats.dtype
    compute = tl_compute_dtype(opmath)
    k = conv1_weight.shape[-1]
    block_c, block_hw = lrn_tile(c, hw, max_block_hw, max_block_c)
    warps = num_warps_for(2 * block_c * block_hw, x.device)
    tiles = triton.cdiv(hw, block_hw)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else None
             for t in (conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias)]
    dconv1, dgamma_w, dgamma_b, dbeta_w, dbeta_b = grads
    sums = torch.empty((n, tiles, c, 4), dtype=opmath, device=x.device)
    dmaps = torch.empty((n, 2, hw), dtype=opmath, device=x.device)
    lrn_bwd_sums_kernel[(n, tiles)](
        dy3, x3, s, stats, gain, sums, dmaps, c, height, width, tiles, *plane_strides(dy3), *plane_strides(x3),
        THRESHOLD=float(threshold), BATCH=batch, COMPUTE=compute, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=warps)
    dpre = torch.empty((n, hw), dtype=opmath, device=x.device)
    wparts = torch.empty((n * tiles, 2 * k * k + 2), dtype=opmath, device=x.device)
    coefficients = stats.new_empty((*stats.shape[:-1], 2))
    pixel_warps = num_warps_for(4 * block_hw, x.device)  # a few pixels per thread: the window sums are long
    lrn_bwd_maps_kernel[(n * tiles + triton.cdiv(c, FINALIZE_BLOCK),)](
        s, dmaps, _flat(gamma_weight), _flat(beta_weight), dpre, wparts, sums, stats, coefficients, n, c, height,
        width, tiles, K=k, BATCH=batch, COMPUTE=compute, BLOCK_HW=block_hw, BLOCK=FINALIZE_BLOCK,
        num_warps=pixel_warps)
    dpool = torch.empty((n, 2, hw), dtype=opmath, device=x.device)
    w1parts = torch.empty((n * tiles, 2 * k * k), dtype=opmath, device=x.device)
    lrn_bwd_pool_kernel[(n * tiles + 1,)](
        pool, dpre, _flat(conv1_weight), dpool, w1parts, wparts, dgamma_w, dgamma_b if dgamma_b is not None else dpre,
        dbeta_w, dbeta_b if dbeta_b is not None else dpre, n, height, width, tiles, K=k,
        HAS_BG=gamma_bias is not None, HAS_BB=beta_bias is not None, COMPUTE=compute, BLOCK_HW=block_hw,
        BLOCK_R=next_power_of_2(2 * k * k + 2), num_warps=pixel_warps)
    lrn_dx_kernel[(n * triton.cdiv(c, block_c) * tiles + 1,)](
        dy3, x3, s, stats, coefficients, gain, pool, dpool, dx3, w1parts, dconv1, n, c, height, width, tiles,
        n * tiles, *plane_strides(dy3), *plane_strides(x3), *plane_strides(dx3), THRESHOLD=float(threshold), K=k,
        BATCH=batch, COMPUTE=compute, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_R=next_power_of_2(2 * k * k),
        num_warps=warps)
    return dx, dconv1, dgamma_w, dgamma_b, dbeta_w, dbeta_b
