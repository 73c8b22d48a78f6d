"""Triton kernels for the channels-first norms LayerNorm2d and RMSNorm2d: statistics over ``C`` at each pixel.

One forward and one backward kernel serve both norms, selected by the constexpr ``NORM`` (0 = LayerNorm, 1 = RMSNorm),
with constexpr flags for the weight and bias. Statistics and all arithmetic are fp32 (fp64 for fp64 inputs).

Layout of a launch: an ``(N, C, H, W)`` tensor is read in place as ``(N, C, P = H·W)`` with strides
``(s_n, s_c, s_p)``. The pixels flatten to one stride for NCHW (``s_p = 1``), channels-last (``s_p = C``) and channel
slices of either, so no permute copy is made; a tensor whose pixels do not flatten is copied once. A program owns a
``(BLOCK_C, BLOCK_P)`` tile of one sample: it reduces over the channel axis for ``BLOCK_P`` pixels. Triton specializes
an integer argument equal to 1, so the loads are coalesced along whichever of ``C`` and ``P`` is contiguous. Outputs
have the input's strides when it is dense (``torch.empty_like``), else NCHW.

* Forward: ``C`` fitting in ``BLOCK_C`` stays in registers (``SINGLE_BLOCK``); wider ``C`` (ConvNeXt's 2048) is
  walked twice in ``BLOCK_C`` chunks, the first pass combining per-chunk moments with Chan's formula (never
  ``E[x²] − E[x]²``), the second normalizing.
* Backward: a persistent grid; each program walks ``(sample, pixel block)`` tiles, writes dX and keeps its fp32
  dW/dB partial sums (in registers, or in its own row of the partial buffer for wide ``C``), one partial row per
  program; a second kernel sums the partials in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from normlayers._dtypes import compute_dtype
from normlayers.kernels.common import (
    chan_combine,
    column_sum,
    next_power_of_2,
    num_warps_for,
    persistent_programs,
    store_param_partials,
    tl_compute_dtype,
)

NORM_KINDS = {"layer": 0, "rms": 1}

# Elements one program holds (forward; the backward holds x, dy and the dW/dB partials, so it caps lower). With
# pixels contiguous (NCHW) a tile keeps at least MIN_PIXEL_RUN pixels of a channel, a run long enough to coalesce;
# with channels contiguous (channels-last) it keeps whole channel rows and up to MAX_BLOCK_P pixels. Starting points
# to be tuned on a GPU, not measured optima.
FWD_TILE_ELEMENTS = 8192
BWD_TILE_ELEMENTS = 4096
MIN_PIXEL_RUN = 16
MAX_BLOCK_P = 64
BWD_PROGRAMS_PER_SM = 4


# ----------------------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------------------


def _channels_pixels_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` (copied to NCHW only if its pixels do not flatten to one stride) and its ``(s_n, s_c, s_p)``."""
    _, _, h, w = t.shape
    s_n, s_c, s_h, s_w = t.stride()
    if h == 1 or s_h == w * s_w:
        return t, (s_n, s_c, s_w)
    if w == 1:
        return t, (s_n, s_c, s_h)
    return _channels_pixels_view(t.contiguous())


def _tile_shape(c: int, p: int, pixels_contiguous: bool, tile_elements: int,
                max_block_c: Optional[int]) -> tuple[int, int, bool]:
    """(BLOCK_C, BLOCK_P, SINGLE_BLOCK) for ``c`` channels and ``p`` pixels; ``max_block_c`` caps the channel block
    (tests use it to reach the chunked loops on small ``C``)."""
    cap = tile_elements // MIN_PIXEL_RUN if pixels_contiguous else tile_elements
    if max_block_c is not None:
        cap = min(cap, max_block_c)
    block_c = min(next_power_of_2(c), cap)
    block_p = min(next_power_of_2(p), max(tile_elements // block_c, 1), MAX_BLOCK_P)
    return block_c, block_p, block_c >= c


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _offsets(chans, pix, stride_c, stride_p):
    return chans.to(tl.int64)[:, None] * stride_c + pix.to(tl.int64)[None, :] * stride_p


@triton.jit
def _chunk_moments(x, mask, n_valid, NORM: tl.constexpr):
    """Per-pixel (Σx, q) of one channel chunk: q is the centred M2 for LayerNorm, Σx² for RMSNorm."""
    s = tl.sum(x, axis=0)
    if NORM == 0:
        d = tl.where(mask, x - (s / n_valid)[None, :], 0.0)
        q = tl.sum(d * d, axis=0)
    else:
        q = tl.sum(x * x, axis=0)
    return s, q


@triton.jit
def _normalize_store(Y, W, B, x, mean, rstd, chans, pix, mask, stride_yc, stride_yp, C, NORM: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr):
    if NORM == 0:
        y = (x - mean[None, :]) * rstd[None, :]
    else:
        y = x * rstd[None, :]
    chan_mask = chans < C
    if HAS_WEIGHT:
        y = y * tl.load(W + chans, mask=chan_mask, other=0.0).to(COMPUTE)[:, None]
    if HAS_BIAS:
        y = y + tl.load(B + chans, mask=chan_mask, other=0.0).to(COMPUTE)[:, None]
    tl.store(Y + _offsets(chans, pix, stride_yc, stride_yp), y, mask=mask)


@triton.jit
def channel_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    C, P, stride_xn, stride_xc, stride_xp, stride_yn, stride_yc, stride_yp, eps,
    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    # Scalars are cast here: a Python float may arrive as fp64 and would silently widen the whole kernel.
    eps = tl.cast(eps, COMPUTE)
    pid = tl.program_id(0)
    pixel_blocks = tl.cdiv(P, BLOCK_P)
    n = (pid // pixel_blocks).to(tl.int64)
    pix = (pid % pixel_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_mask = pix < P
    chans = tl.arange(0, BLOCK_C)
    x_base = X + n * stride_xn
    y_base = Y + n * stride_yn
    c_total = tl.cast(C, COMPUTE)
    mask = (chans < C)[:, None] & pix_mask[None, :]
    x = tl.load(x_base + _offsets(chans, pix, stride_xc, stride_xp), mask=mask, other=0.0).to(COMPUTE)
    if SINGLE_BLOCK:
        s, q = _chunk_moments(x, mask, c_total, NORM)
    else:
        # Pass 1: moments chunk by chunk. The first chunk is full (C > BLOCK_C), so `start` channels precede each
        # later chunk, which is all Chan's combination needs.
        s, q = _chunk_moments(x, mask, tl.cast(BLOCK_C, COMPUTE), NORM)
        for start in range(BLOCK_C, C, BLOCK_C):
            chunk = start + chans
            chunk_mask = (chunk < C)[:, None] & pix_mask[None, :]
            xc = tl.load(x_base + _offsets(chunk, pix, stride_xc, stride_xp), mask=chunk_mask, other=0.0).to(COMPUTE)
            n_b = tl.cast(tl.minimum(C - start, BLOCK_C), COMPUTE)
            s_b, q_b = _chunk_moments(xc, chunk_mask, n_b, NORM)
            if NORM == 0:
                s, q = chan_combine(s, q, tl.cast(start, COMPUTE), s_b, q_b, n_b)
            else:
                s, q = s + s_b, q + q_b
    mean = s / c_total
    rstd = tl.math.rsqrt(q / c_total + eps)
    if SINGLE_BLOCK:
        _normalize_store(y_base, W, B, x, mean, rstd, chans, pix, mask, stride_yc, stride_yp, C, NORM, HAS_WEIGHT,
                         HAS_BIAS, COMPUTE)
    else:
        # Pass 2: re-read each chunk and normalize it.
        for start in range(0, C, BLOCK_C):
            chunk = start + chans
            chunk_mask = (chunk < C)[:, None] & pix_mask[None, :]
            xc = tl.load(x_base + _offsets(chunk, pix, stride_xc, stride_xp), mask=chunk_mask, other=0.0).to(COMPUTE)
            _normalize_store(y_base, W, B, xc, mean, rstd, chunk, pix, chunk_mask, stride_yc, stride_yp, C, NORM,
                             HAS_WEIGHT, HAS_BIAS, COMPUTE)
    stats = n * P + pix
    if NORM == 0:
        tl.store(MEAN + stats, mean, mask=pix_mask)
    tl.store(RSTD + stats, rstd, mask=pix_mask)


@triton.jit
def _load_grad_inputs(X, W, DY, chans, pix, mask, mean, rstd, stride_xc, stride_xp, stride_dyc, stride_dyp, C,
                      NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE: tl.constexpr):
    """(x̂, dy, ĝ = dy ⊙ w) of one channel chunk, zero outside ``mask``."""
    x = tl.load(X + _offsets(chans, pix, stride_xc, stride_xp), mask=mask, other=0.0).to(COMPUTE)
    dy = tl.load(DY + _offsets(chans, pix, stride_dyc, stride_dyp), mask=mask, other=0.0).to(COMPUTE)
    if NORM == 0:
        xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    else:
        xhat = x * rstd[None, :]
    if HAS_WEIGHT:
        g = dy * tl.load(W + chans, mask=chans < C, other=0.0).to(COMPUTE)[:, None]
    else:
        g = dy
    return xhat, dy, g


@triton.jit
def channel_norm_bwd_kernel(
    X, W, DY, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
    N, C, P, stride_xn, stride_xc, stride_xp, stride_dyn, stride_dyc, stride_dyp, stride_dxn, stride_dxc, stride_dxp,
    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    # Per pixel, with ĝ = dy ⊙ w and the sums over the C channels:
    #   LayerNorm  dx = rstd·(ĝ − x̂·Σ(x̂ĝ)/C − Σĝ/C)
    #   RMSNorm    dx = rstd·(ĝ − x̂·Σ(x̂ĝ)/C)
    # and dW = Σ_{n,p} dy·x̂, dB = Σ_{n,p} dy.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    pixel_blocks = tl.cdiv(P, BLOCK_P)
    chans = tl.arange(0, BLOCK_C)
    c_total = tl.cast(C, COMPUTE)
    partial_row = pid.to(tl.int64) * C
    if SINGLE_BLOCK:
        dw_acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=COMPUTE)
        db_acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=COMPUTE)
    for tile in range(pid, N * pixel_blocks, num_programs):
        n = (tile // pixel_blocks).to(tl.int64)
        pix = (tile % pixel_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        pix_mask = pix < P
        x_base = X + n * stride_xn
        dy_base = DY + n * stride_dyn
        dx_base = DX + n * stride_dxn
        stats = n * P + pix
        rstd = tl.load(RSTD + stats, mask=pix_mask, other=0.0).to(COMPUTE)
        if NORM == 0:
            mean = tl.load(MEAN + stats, mask=pix_mask, other=0.0).to(COMPUTE)
        else:
            mean = rstd * 0.0
        if SINGLE_BLOCK:
            mask = (chans < C)[:, None] & pix_mask[None, :]
            xhat, dy, g = _load_grad_inputs(x_base, W, dy_base, chans, pix, mask, mean, rstd, stride_xc, stride_xp,
                                            stride_dyc, stride_dyp, C, NORM, HAS_WEIGHT, COMPUTE)
            sum_xg = tl.sum(xhat * g, axis=0)
            sum_g = tl.sum(g, axis=0)
            sum_x = tl.sum(xhat, axis=0)
        else:
            sum_xg = rstd * 0.0
            sum_g = rstd * 0.0
            sum_x = rstd * 0.0
            for start in range(0, C, BLOCK_C):
                chunk = start + chans
                mask = (chunk < C)[:, None] & pix_mask[None, :]
                xhat, dy, g = _load_grad_inputs(x_base, W, dy_base, chunk, pix, mask, mean, rstd, stride_xc,
                                                stride_xp, stride_dyc, stride_dyp, C, NORM, HAS_WEIGHT, COMPUTE)
                sum_xg += tl.sum(xhat * g, axis=0)
                sum_g += tl.sum(g, axis=0)
                sum_x += tl.sum(xhat, axis=0)
        # LayerNorm: x̂ less its mean over the channels (the fp32 mean's rounding, of the size of mean·2⁻²⁴·rstd, which
        # on pixels offset by 100-1000 standard deviations put dx 2-3.7x over the fp32 bound, tests/test_offset_inputs).
        xbar = sum_x / c_total if NORM == 0 else sum_x * 0.0
        c1 = (sum_xg - xbar * sum_g) / c_total
        c2 = sum_g / c_total if NORM == 0 else sum_g * 0.0
        if SINGLE_BLOCK:
            xhat -= xbar[None, :]
            dx = (g - xhat * c1[None, :] - c2[None, :]) * rstd[None, :]
            tl.store(dx_base + _offsets(chans, pix, stride_dxc, stride_dxp), dx, mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
        else:
            for start in range(0, C, BLOCK_C):
                chunk = start + chans
                chan_mask = chunk < C
                mask = chan_mask[:, None] & pix_mask[None, :]
                xhat, dy, g = _load_grad_inputs(x_base, W, dy_base, chunk, pix, mask, mean, rstd, stride_xc,
                                                stride_xp, stride_dyc, stride_dyp, C, NORM, HAS_WEIGHT, COMPUTE)
                xhat -= xbar[None, :]
                dx = (g - xhat * c1[None, :] - c2[None, :]) * rstd[None, :]
                tl.store(dx_base + _offsets(chunk, pix, stride_dxc, stride_dxp), dx, mask=mask)
                # Wide C: this program's partial row lives in memory.
                store_param_partials(DW_PARTIAL + partial_row, DB_PARTIAL + partial_row, chunk, chan_mask,
                                     tl.sum(dy * xhat, axis=1), tl.sum(dy, axis=1), HAS_WEIGHT, HAS_BIAS, True)
            tl.debug_barrier()  # the next tile reads these partials back, maybe in other threads
    if SINGLE_BLOCK:
        store_param_partials(DW_PARTIAL + partial_row, DB_PARTIAL + partial_row, chans, chans < C,
                             tl.sum(dw_acc, axis=1), tl.sum(db_acc, axis=1), HAS_WEIGHT, HAS_BIAS, False)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def channel_norm_fwd(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    kind: str,
    eps: float,
    *,
    max_block_c: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize the ``(N, C, H, W)`` ``x`` over ``C`` at each pixel.

    Returns ``(y, mean, rstd)``: ``y`` like ``torch.empty_like(x)`` (the input's memory format when it is dense) in
    ``x.dtype``; ``mean`` (LayerNorm only, else empty) and ``rstd`` as contiguous ``(N, H·W)`` in the compute dtype.
    ``max_block_c`` caps the channel block (tests use it to reach the chunked loops).
    """
    n, c, h, w = x.shape
    p = h * w
    compute = compute_dtype(x.dtype)
    y = torch.empty_like(x)
    mean = torch.empty((n, p) if kind == "layer" else 0, dtype=compute, device=x.device)
    rstd = torch.empty((n, p), dtype=compute, device=x.device)
    if y.numel() == 0:
        mean.zero_()
        rstd.fill_(eps ** -0.5 if eps > 0 else float("inf"))
        return y, mean, rstd
    x_in, x_strides = _channels_pixels_view(x)
    _, y_strides = _channels_pixels_view(y)
    block_c, block_p, single = _tile_shape(c, p, x_strides[2] == 1, FWD_TILE_ELEMENTS, max_block_c)
    channel_norm_fwd_kernel[(n * triton.cdiv(p, block_p),)](
        x_in, weight if weight is not None else x_in, bias if bias is not None else x_in, y,
        mean if kind == "layer" else rstd, rstd,
        c, p, *x_strides, *y_strides, eps,
        NORM=NORM_KINDS[kind], HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        COMPUTE=tl_compute_dtype(compute), BLOCK_C=block_c, BLOCK_P=block_p, SINGLE_BLOCK=single,
        num_warps=num_warps_for(block_c * block_p, x.device),
    )
    return y, mean, rstd


def channel_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    kind: str,
    has_bias: bool,
    *,
    max_block_c: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`channel_norm_fwd`. Returns ``(dx, dweight, dbias)``: ``dx`` like ``torch.empty_like(x)``
    in ``x.dtype``; ``dweight`` in ``weight.dtype`` and ``dbias`` in the same dtype (each empty when there is no such
    parameter)."""
    n, c, h, w = x.shape
    p = h * w
    compute = compute_dtype(x.dtype)
    dx = torch.empty_like(x)
    param_dtype = weight.dtype if weight is not None else x.dtype
    x_in, x_strides = _channels_pixels_view(x)
    dy_in, dy_strides = _channels_pixels_view(dy)
    _, dx_strides = _channels_pixels_view(dx)
    block_c, block_p, single = _tile_shape(max(c, 1), max(p, 1), x_strides[2] == 1, BWD_TILE_ELEMENTS, max_block_c)
    tiles = n * triton.cdiv(p, block_p)
    programs = max(min(persistent_programs(x.device, BWD_PROGRAMS_PER_SM), tiles), 1)
    launched = dx.numel() > 0
    # Wide C accumulates into the partial row in place, so it must start at zero (as must an unlaunched one).
    new_partials = torch.empty if single and launched else torch.zeros
    dw_partial = new_partials((programs, c), dtype=compute, device=x.device) if weight is not None else None
    db_partial = new_partials((programs, c), dtype=compute, device=x.device) if has_bias else None
    if launched:
        channel_norm_bwd_kernel[(programs,)](
            x_in, weight if weight is not None else x_in, dy_in, mean if kind == "layer" else rstd, rstd, dx,
            dw_partial if dw_partial is not None else dx, db_partial if db_partial is not None else dx,
            n, c, p, *x_strides, *dy_strides, *dx_strides,
            NORM=NORM_KINDS[kind], HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias,
            COMPUTE=tl_compute_dtype(compute), BLOCK_C=block_c, BLOCK_P=block_p, SINGLE_BLOCK=single,
            num_warps=num_warps_for(block_c * block_p, x.device),
        )
    dweight = column_sum(dw_partial, param_dtype) if dw_partial is not None else x.new_empty(0)
    dbias = column_sum(db_partial, param_dtype) if db_partial is not None else x.new_empty(0)
    return dx, dweight, dbias
