"""Triton kernels for EvoNorm's fused normalize + activation + affine pass over ``(N, C, *spatial)`` tensors.

EvoNorm's statistics are per-plane moments (``kernels/channel_stats.py``'s ``plane_moments``) combined over the batch
(B family) or a group of channels (S family) by small ``(N, C)`` torch ops. What is left is one elementwise pass that
is *not* an affine map of ``x``, so ``plane_affine`` cannot do it; per ``(sample n, channel c)`` plane, with every
coefficient an ``(N, C)`` tensor, ``y = f(x)·SCALE + SHIFT`` where ``f`` is chosen by the ``MODE`` constexpr:

* ``MODE_SWISH`` (S0, and S1/S2 with SiLU): ``f(x) = x·sigmoid(SLOPE·x)``; the S family's ``1/group statistic``
  is folded into ``SCALE``.
* ``MODE_MAX_DIV`` (B0/B1/B2): ``f(x) = x / max(LEFT, SLOPE·x + OFFSET)``; the right-hand side of every B variant is
  affine in ``x`` within a plane (B0: ``v·x + instance std``; B1: ``rms·x + rms``; B2: ``−x + rms``).

The backward kernel owns its planes (deterministic, no atomics): it writes ``dx`` and the per-plane sums of the
coefficients' gradients. At an exact tie ``LEFT == SLOPE·x + OFFSET`` the gradient of ``max`` goes half to each side,
PyTorch's rule for ``torch.maximum`` (docs/evo_norm.md), so the kernels agree with autograd of the reference there too.
Arithmetic in fp32 (fp64 for fp64 inputs); launches and layouts as ``channel_stats`` (views, no copies, int64
offsets; outputs keep the input's memory format).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from normlayers._dtypes import compute_dtype
from normlayers.kernels.common import (
    as_planes,
    load_plane_values,
    num_warps_for,
    plane_block,
    plane_offsets,
    plane_strides,
    plane_tile,
    tl_compute_dtype,
)

# The MODE constexpr: which f the fused pass applies (module docstring). Named constexprs (as Liger's casting modes),
# so that the kernels compare against the names; the launchers pass .value.
MODE_SWISH: tl.constexpr = tl.constexpr(0)
MODE_MAX_DIV: tl.constexpr = tl.constexpr(1)

# Coefficients each mode reads; the bwd launcher returns the gradients of exactly these, in this order.
MODE_COEFFICIENTS = {
    MODE_SWISH: ("slope", "scale", "shift"),
    MODE_MAX_DIV: ("left", "slope", "offset", "scale", "shift"),
}


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(t):
    # 1/(1 + exp(−t)) rather than tl.sigmoid, so fp64 (gradcheck) takes the same code; exp overflow gives 0, not NaN.
    return 1.0 / (1.0 + tl.exp(-t))


@triton.jit
def evo_plane_fwd_kernel(
    X, LEFT, SLOPE, OFFSET, SCALE, SHIFT, Y, P, C, HW,
    stride_xn, stride_xc, stride_xhw, stride_yn, stride_yc, stride_yhw,
    MODE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # Grid: (plane blocks, HW chunks).
    planes, plane_mask = plane_block(P, BLOCK_P)
    hw = tl.program_id(1).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = plane_mask[:, None] & (hw < HW)[None, :]
    x_base = plane_offsets(planes, C, stride_xn, stride_xc)
    x = load_plane_values(X, x_base, hw, stride_xhw, mask, COMPUTE)
    slope = tl.load(SLOPE + planes, mask=plane_mask, other=0.0).to(COMPUTE)[:, None]
    scale = tl.load(SCALE + planes, mask=plane_mask, other=0.0).to(COMPUTE)[:, None]
    shift = tl.load(SHIFT + planes, mask=plane_mask, other=0.0).to(COMPUTE)[:, None]
    if MODE == MODE_SWISH:
        f = x * _sigmoid(slope * x)
    else:
        left = tl.load(LEFT + planes, mask=plane_mask, other=1.0).to(COMPUTE)[:, None]
        offset = tl.load(OFFSET + planes, mask=plane_mask, other=0.0).to(COMPUTE)[:, None]
        # NaN-propagating, as torch.maximum: a NaN statistic (batch or running) makes the output NaN, never skipped.
        f = x / tl.maximum(left, slope * x + offset, propagate_nan=tl.PropagateNan.ALL)
    y_base = plane_offsets(planes, C, stride_yn, stride_yc)
    tl.store(Y + y_base[:, None] + hw[None, :] * stride_yhw, f * scale + shift, mask=mask)


@triton.jit
def evo_plane_bwd_kernel(
    DY, X, LEFT, SLOPE, OFFSET, SCALE, DX, DLEFT, DSLOPE, DOFFSET, DSCALE, DSHIFT, P, C, HW,
    stride_dyn, stride_dyc, stride_dyhw, stride_xn, stride_xc, stride_xhw, stride_dxn, stride_dxc, stride_dxhw,
    MODE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # Each program owns BLOCK_P planes and walks their HW values, keeping per-lane partial sums of the coefficient
    # gradients (reduced once at the end). Masked lanes are zeroed with tl.where: a padded lane may divide by zero.
    planes, plane_mask = plane_block(P, BLOCK_P)
    offsets = tl.arange(0, BLOCK_HW)
    dy_base = plane_offsets(planes, C, stride_dyn, stride_dyc)
    x_base = plane_offsets(planes, C, stride_xn, stride_xc)
    dx_base = plane_offsets(planes, C, stride_dxn, stride_dxc)
    slope = tl.load(SLOPE + planes, mask=plane_mask, other=0.0).to(COMPUTE)[:, None]
    scale = tl.load(SCALE + planes, mask=plane_mask, other=0.0).to(COMPUTE)[:, None]
    if MODE == MODE_MAX_DIV:
        left = tl.load(LEFT + planes, mask=plane_mask, other=1.0).to(COMPUTE)[:, None]
        offset = tl.load(OFFSET + planes, mask=plane_mask, other=0.0).to(COMPUTE)[:, None]
    dleft = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    dslope = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    doffset = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    dscale = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    dshift = tl.zeros((BLOCK_P, BLOCK_HW), dtype=COMPUTE)
    for start in range(0, HW, BLOCK_HW):
        hw = (start + offsets).to(tl.int64)
        mask = plane_mask[:, None] & (hw < HW)[None, :]
        dy = load_plane_values(DY, dy_base, hw, stride_dyhw, mask, COMPUTE)
        x = load_plane_values(X, x_base, hw, stride_xhw, mask, COMPUTE)
        df = dy * scale
        dshift += dy
        if MODE == MODE_SWISH:
            s = _sigmoid(slope * x)
            dscale += dy * x * s
            # d/dt of t·sigmoid(t) splits into the sigmoid and its derivative s(1 − s), times the slope or x.
            d_inner = df * x * s * (1.0 - s)
            dx = df * s + d_inner * slope
            dslope += d_inner * x
        else:
            right = slope * x + offset
            denominator = tl.maximum(left, right, propagate_nan=tl.PropagateNan.ALL)
            f = x / denominator
            dscale += tl.where(mask, dy * f, 0.0)
            d_denominator = tl.where(mask, -df * f / denominator, 0.0)
            left_share = tl.where(left > right, 1.0, tl.where(left == right, 0.5, 0.0))
            d_right = d_denominator * (1.0 - left_share)
            dleft += d_denominator * left_share
            dslope += d_right * x
            doffset += d_right
            dx = df / denominator + d_right * slope
        tl.store(DX + dx_base[:, None] + hw[None, :] * stride_dxhw, dx, mask=mask)
    tl.store(DSLOPE + planes, tl.sum(dslope, axis=1), mask=plane_mask)
    tl.store(DSCALE + planes, tl.sum(dscale, axis=1), mask=plane_mask)
    tl.store(DSHIFT + planes, tl.sum(dshift, axis=1), mask=plane_mask)
    if MODE == MODE_MAX_DIV:
        tl.store(DLEFT + planes, tl.sum(dleft, axis=1), mask=plane_mask)
        tl.store(DOFFSET + planes, tl.sum(doffset, axis=1), mask=plane_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


_FWD_POINTERS = ("left", "slope", "offset", "scale", "shift")
_BWD_POINTERS = ("left", "slope", "offset", "scale")  # shift's gradient, Σ dy, needs no coefficient


def _coefficients(mode: tl.constexpr, coefficients: dict[str, torch.Tensor],
                  pointers: tuple[str, ...]) -> list[torch.Tensor]:
    """The coefficient pointers a kernel takes, in its order, contiguous: those of ``mode`` among ``pointers`` must be
    given (by name) and nothing else; one the mode does not read is replaced by ``scale`` (never dereferenced)."""
    names = tuple(name for name in MODE_COEFFICIENTS[mode] if name in pointers)
    if set(coefficients) != set(names):
        raise ValueError(f"mode {mode} takes coefficients {names}, got {sorted(coefficients)}")
    return [coefficients.get(name, coefficients["scale"]).contiguous() for name in pointers]


def evo_plane_fwd(x: torch.Tensor, mode: tl.constexpr, *, max_block_hw: Optional[int] = None,
                  **coefficients: torch.Tensor) -> torch.Tensor:
    """``y = f(x)·scale + shift`` with ``f`` by ``mode`` (module docstring) and ``(N, C)`` coefficients given by name
    (:data:`MODE_COEFFICIENTS`); arithmetic in fp32 (fp64 for fp64 ``x``), ``y`` like ``x`` (dtype, memory format)."""
    left, slope, offset, scale, shift = _coefficients(mode, coefficients, _FWD_POINTERS)
    y = torch.empty_like(x)
    x3, y3 = as_planes(x), as_planes(y)
    n, c, hw = x3.shape
    if y.numel() == 0:
        return y
    block_p, block_hw = plane_tile(n * c, hw, max_block_hw)
    evo_plane_fwd_kernel[(triton.cdiv(n * c, block_p), triton.cdiv(hw, block_hw))](
        x3, left, slope, offset, scale, shift, y3, n * c, c, hw, *plane_strides(x3), *plane_strides(y3),
        MODE=mode.value, COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)), BLOCK_P=block_p, BLOCK_HW=block_hw,
        num_warps=num_warps_for(block_p * block_hw, x.device),
    )
    return y


def evo_plane_bwd(dy: torch.Tensor, x: torch.Tensor, mode: tl.constexpr, *, max_block_hw: Optional[int] = None,
                  **coefficients: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`evo_plane_fwd`, given its coefficients less ``shift``: ``dx`` (like ``x``) followed by the
    ``(N, C)`` gradient of each coefficient of ``mode`` in :data:`MODE_COEFFICIENTS` order (``shift``'s is ``Σ dy``),
    in ``scale``'s dtype."""
    left, slope, offset, scale = _coefficients(mode, coefficients, _BWD_POINTERS)
    dx = torch.empty_like(x)
    dy3, x3, dx3 = as_planes(dy), as_planes(x), as_planes(dx)
    n, c, hw = x3.shape
    grads = {name: torch.zeros((n, c), dtype=scale.dtype, device=x.device) for name in MODE_COEFFICIENTS[mode]}
    if n * c > 0 and hw > 0:
        unused = grads["scale"]
        block_p, block_hw = plane_tile(n * c, hw, max_block_hw)
        evo_plane_bwd_kernel[(triton.cdiv(n * c, block_p),)](
            dy3, x3, left, slope, offset, scale, dx3, grads.get("left", unused), grads["slope"],
            grads.get("offset", unused), grads["scale"], grads["shift"], n * c, c, hw,
            *plane_strides(dy3), *plane_strides(x3), *plane_strides(dx3),
            MODE=mode.value, COMPUTE=tl_compute_dtype(compute_dtype(x.dtype)), BLOCK_P=block_p, BLOCK_HW=block_hw,
            num_warps=num_warps_for(block_p * block_hw, x.device),
        )
    return (dx, *grads.values())
