"""The row norms in the benchmark: LayerNorm, RMSNorm, CRMSNorm, each plain or fused with a residual add.

Arguments, as ``normlayers.functional`` takes them: ``(x, normalized_shape, weight, [bias,] eps)``, with ``residual``
after ``x`` for the fused adds, which return ``(y, h)`` with ``h = x + residual`` (the pre-norm residual stream).
Peers (liger, apex, flash_attn, quack; CUDA only) are wrapped to the same signature; signatures as of liger-kernel 0.6,
apex 25, flash-attn 2.8, quack 0.2.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import normlayers.functional
from normlayers.bench.ops import ROWS, Op, OpFn, OpInputs, RandomInputs, Shape, Transfer, read, write
from normlayers.reference import row_norms as reference

__all__ = ["OPS"]

LAYER_NORM_EPS = 1e-5
RMS_NORM_EPS = 1e-6  # Llama's value; used for RMSNorm and CRMSNorm alike

_STATS_BY_KIND = {"layer": ("mean", "rstd"), "rms": ("rstd",), "crms": ("rstd", "sum_x")}
_REFERENCE_NORMS = {"layer": reference.layer_norm, "rms": reference.rms_norm, "crms": reference.crms_norm}


def _crms_torch(x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor, eps: float) -> Tensor:
    """CRMSNorm as torch computes it: ``F.rms_norm`` of the restored vector ``[x′, −Σx′]``, the first ``d − 1``
    outputs."""
    restored = torch.cat([x, -x.sum(-1, keepdim=True)], dim=-1)
    return F.rms_norm(restored, (x.shape[-1] + 1,), F.pad(weight, (0, 1), value=1.0), eps)[..., :-1]


_TORCH_NORMS = {"layer": F.layer_norm, "rms": F.rms_norm, "crms": _crms_torch}
_TORCH_NOTES = {"crms": "F.rms_norm of the restored [x, -sum(x)]"}

DEFAULT_SHAPES = {
    "cuda": ((4096, 1024), (4096, 4096), (4096, 8192), (16384, 4096)),
    "cpu": ((256, 1024), (1024, 4096)),
}


def _make_inputs(kind: str, fused_add: bool) -> Callable[[Shape, RandomInputs], OpInputs]:
    """``x``, ``residual``, ``dy``, ``dh`` ~ N(0, 1); ``weight`` ~ 1 + 0.1·N(0, 1); ``bias`` ~ 0.1·N(0, 1); all in the
    benchmark dtype, parameters too (as after ``module.to(dtype)``)."""

    def make(shape: Shape, rand: RandomInputs) -> OpInputs:
        rows, cols = shape
        x = rand.normal(rows, cols, grad=True)
        residual = rand.normal(rows, cols, grad=True) if fused_add else None
        weight = rand.normal(cols, scale=0.1, shift=1.0, grad=True)
        bias = rand.normal(cols, scale=0.1, grad=True) if kind == "layer" else None
        eps = LAYER_NORM_EPS if kind == "layer" else RMS_NORM_EPS
        leading = (x, residual) if fused_add else (x,)
        params = (weight, bias) if kind == "layer" else (weight,)
        args = (*leading, (cols,), *params, eps)
        grads = {"dx": 0, "dresidual": 1} if fused_add else {"dx": 0}
        grads.update({"dweight": len(leading) + 1, "dbias": len(leading) + 2} if kind == "layer"
                     else {"dweight": len(leading) + 1})
        outputs = ((rows, cols),) * (2 if fused_add else 1)
        return OpInputs(args, grads, rand.grad_outputs(*outputs))

    return make


def _compose(norm: Callable[..., Tensor], fused_add: bool,
             residual_add: Callable[[Tensor, Tensor], Tensor] = lambda x, r: x + r) -> OpFn:
    """An unfused op from a norm with the ``torch.nn.functional`` signature and, for a fused add, ``residual_add``."""
    if not fused_add:
        return norm

    def run(x: Tensor, residual: Tensor, *norm_args: object) -> tuple[Tensor, Tensor]:
        h = residual_add(x, residual)
        return norm(h, *norm_args), h

    return run


def _reference_add(x: Tensor, residual: Tensor) -> Tensor:
    """``x + residual`` as the reference computes it (opmath, rounded to the residual's dtype)."""
    return reference.residual_add(x, residual, residual.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Byte model (M rows, N columns; statistics are fp32 per row)
# ----------------------------------------------------------------------------------------------------------------------


def _forward_traffic(kind: str, fused_add: bool) -> Callable[[bool], list[Transfer]]:
    def forward(training: bool) -> list[Transfer]:
        transfers = [read("x", "MxN")] + ([read("residual", "MxN")] if fused_add else [])
        transfers += [read("weight", "N")] + ([read("bias", "N")] if kind == "layer" else [])
        transfers += [write("y", "MxN")] + ([write("h", "MxN")] if fused_add else [])
        if training:  # the statistics the backward reads
            transfers += [write(stat, "M", fp32=True) for stat in _STATS_BY_KIND[kind]]
        return transfers

    return forward


def _backward_traffic(kind: str, fused_add: bool) -> Callable[[], list[Transfer]]:
    def backward() -> list[Transfer]:
        transfers = [read("h" if fused_add else "x", "MxN"), read("dy", "MxN")]
        transfers += [read("dh", "MxN")] if fused_add else []
        transfers += [read("weight", "N")] + [read(stat, "M", fp32=True) for stat in _STATS_BY_KIND[kind]]
        # For a fused add, dx and dresidual are the same values: a kernel writes them once and returns them twice.
        transfers += [write("dx(=dresidual)" if fused_add else "dx", "MxN"), write("dweight", "N")]
        transfers += [write("dbias", "N")] if kind == "layer" else []
        return transfers

    return backward


# ----------------------------------------------------------------------------------------------------------------------
# Peer libraries (CUDA only)
# ----------------------------------------------------------------------------------------------------------------------


def _liger(name: str) -> Callable[[], OpFn]:
    def build() -> OpFn:
        lf = importlib.import_module("liger_kernel.transformers.functional")
        # in_place=False: Liger's default overwrites dy with dx, which would corrupt dy for the next timed call.
        if name == "rms_norm":
            return lambda x, shape, weight, eps: lf.liger_rms_norm(x, weight, eps, 0.0, "llama", False)
        if name == "layer_norm":
            return lambda x, shape, weight, bias, eps: lf.liger_layer_norm(x, weight, bias, eps)
        return lambda x, residual, shape, weight, eps: tuple(
            lf.liger_fused_add_rms_norm(x, residual, weight, eps, 0.0, "llama", False))

    return build


def _apex(name: str) -> Callable[[], OpFn]:
    def build() -> OpFn:
        apex_ln = importlib.import_module("apex.normalization.fused_layer_norm")
        if name == "layer_norm":
            return lambda x, shape, weight, bias, eps: apex_ln.fused_layer_norm_affine(x, weight, bias, shape, eps)
        return lambda x, shape, weight, eps: apex_ln.fused_rms_norm_affine(x, weight, shape, eps)

    return build


def _flash_attn(kind: str, fused_add: bool) -> Callable[[], OpFn]:
    def build() -> OpFn:
        fa = importlib.import_module("flash_attn.ops.triton.layer_norm")

        def run(x: Tensor, *args: object):
            residual = args[0] if fused_add else None
            weight, *rest = args[2:] if fused_add else args[1:]
            bias: Optional[Tensor] = rest[0] if kind == "layer" else None
            out = fa.layer_norm_fn(x, weight, bias, residual=residual, eps=rest[-1], prenorm=fused_add,
                                   is_rms_norm=kind == "rms")
            return tuple(out) if fused_add else out

        return run

    return build


def _quack(fused_add: bool) -> Callable[[], OpFn]:
    def build() -> OpFn:
        quack_rms = importlib.import_module("quack.rmsnorm")
        if fused_add:
            return lambda x, residual, shape, weight, eps: tuple(
                quack_rms.rmsnorm(x, weight, residual=residual, eps=eps, prenorm=True))
        return lambda x, shape, weight, eps: quack_rms.rmsnorm(x, weight, eps=eps)

    return build


def _peers(name: str, kind: str, fused_add: bool) -> dict[str, Callable[[], OpFn]]:
    peers: dict[str, Callable[[], OpFn]] = {}
    if name in ("rms_norm", "layer_norm", "add_rms_norm"):
        peers["liger"] = _liger(name)
    if name in ("rms_norm", "layer_norm"):
        peers["apex"] = _apex(name)
    if kind != "crms":
        peers["flash_attn"] = _flash_attn(kind, fused_add)
    if kind == "rms":
        peers["quack"] = _quack(fused_add)
    return peers


def _row_op(name: str, kind: str, fused_add: bool) -> Op:
    native = _TORCH_NORMS[kind]
    notes = ([_TORCH_NOTES[kind]] if kind in _TORCH_NOTES else []) + (["unfused add"] if fused_add else [])
    return Op(
        name=name, family="row_norms", shape_kind=ROWS, default_shapes=DEFAULT_SHAPES,
        make_inputs=_make_inputs(kind, fused_add),
        output_names=("y", "h") if fused_add else ("y",),
        reference=_compose(_REFERENCE_NORMS[kind], fused_add, _reference_add),
        normlayers=getattr(normlayers.functional, name),
        native=_compose(native, fused_add),
        native_note=", ".join(notes),
        forward_traffic=_forward_traffic(kind, fused_add), backward_traffic=_backward_traffic(kind, fused_add),
        peers=_peers(name, kind, fused_add),
    )


OPS = (
    _row_op("layer_norm", "layer", fused_add=False),
    _row_op("rms_norm", "rms", fused_add=False),
    _row_op("crms_norm", "crms", fused_add=False),
    _row_op("add_layer_norm", "layer", fused_add=True),
    _row_op("add_rms_norm", "rms", fused_add=True),
    _row_op("add_crms_norm", "crms", fused_add=True),
)
