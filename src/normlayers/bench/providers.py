"""The implementations the benchmark compares ("providers"), as one table.

Each provider turns a :class:`~normlayers.bench.ops.RowNormOp` into a :data:`~normlayers.bench.ops.RowNormFn`, or
raises :class:`UnsupportedOp`. The peer libraries (``liger``, ``apex``, ``flash_attn``, ``quack``) are imported only
when used, and only offered on CUDA when installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import normlayers.functional
from normlayers.backend import backend, use_triton
from normlayers.bench.ops import RowNormFn, RowNormOp, compose, reference_fn
from normlayers.reference import row_norms as reference

__all__ = ["PROVIDERS", "Provider", "UnsupportedOp"]


class UnsupportedOp(Exception):
    """The provider has no implementation of this op."""


@dataclass(frozen=True)
class Provider:
    """A benchmarked implementation.

    ``build(op)`` returns the function to time; ``note(op, device)`` says which code path that is, when the name
    alone does not. ``package`` names the importable module of an optional peer library (``None`` for the built-in
    providers, which are always offered).
    """

    name: str
    description: str
    build: Callable[[RowNormOp], RowNormFn]
    note: Callable[[RowNormOp, torch.device], str] = lambda op, device: ""
    package: Optional[str] = None

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """Why this provider cannot run on ``device``, or ``None`` when it can."""
        if self.package is None:
            return None
        if device.type != "cuda":
            return "needs CUDA"
        if importlib.util.find_spec(self.package) is None:
            return f"'{self.package}' is not installed"
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Built-in providers
# ----------------------------------------------------------------------------------------------------------------------


def _normlayers(op: RowNormOp) -> RowNormFn:
    function = getattr(normlayers.functional, op.name)

    def run(x, residual, weight, bias):
        leading = (x, residual) if op.fused_add else (x,)
        out = function(*leading, (x.shape[-1],), *op.param_args(weight, bias))
        return tuple(out) if op.fused_add else (out,)

    return run


def _normlayers_note(op: RowNormOp, device: torch.device) -> str:
    probe = torch.empty(0, device=device)
    with backend("auto"):
        path = "triton kernels" if use_triton(probe) else "reference path (no CUDA)"
    return f"backend 'auto': {path}"


_TORCH_NORMS = {"layer": F.layer_norm, "rms": F.rms_norm}


def _torch_eager(op: RowNormOp) -> RowNormFn:
    return compose(op, _TORCH_NORMS.get(op.kind, reference.crms_norm))


def _torch_note(op: RowNormOp, device: torch.device) -> str:
    notes = []
    if op.kind not in _TORCH_NORMS:
        notes.append("no native op: eager reference")
    if op.fused_add:
        notes.append("unfused add")
    return ", ".join(notes)


def _compiled_reference(op: RowNormOp) -> RowNormFn:
    # A fresh Dynamo cache for every case: otherwise, after the recompile limit (8 shapes/dtypes/modes of the same
    # code), torch.compile silently falls back to eager and the "compile" numbers would be eager numbers.
    torch.compiler.reset()
    return torch.compile(reference_fn(op), dynamic=False)


# ----------------------------------------------------------------------------------------------------------------------
# Peer libraries (CUDA only). Signatures as of liger-kernel 0.6, apex 25, flash-attn 2.8, quack 0.2.
# ----------------------------------------------------------------------------------------------------------------------


def _unsupported(provider: str, op: RowNormOp) -> UnsupportedOp:
    return UnsupportedOp(f"{provider} has no {op.name}")


def _liger(op: RowNormOp) -> RowNormFn:
    lf = importlib.import_module("liger_kernel.transformers.functional")
    # in_place=False: Liger's default overwrites dy with dx, which would corrupt dy for the next timed call.
    if op.name == "rms_norm":
        return lambda x, residual, weight, bias: (lf.liger_rms_norm(x, weight, op.eps, 0.0, "llama", False),)
    if op.name == "layer_norm":
        return lambda x, residual, weight, bias: (lf.liger_layer_norm(x, weight, bias, op.eps),)
    if op.name == "add_rms_norm":
        return lambda x, residual, weight, bias: tuple(
            lf.liger_fused_add_rms_norm(x, residual, weight, op.eps, 0.0, "llama", False))
    raise _unsupported("liger", op)


def _apex(op: RowNormOp) -> RowNormFn:
    apex_ln = importlib.import_module("apex.normalization.fused_layer_norm")
    if op.name == "layer_norm":
        return lambda x, residual, weight, bias: (
            apex_ln.fused_layer_norm_affine(x, weight, bias, (x.shape[-1],), op.eps),)
    if op.name == "rms_norm":
        return lambda x, residual, weight, bias: (apex_ln.fused_rms_norm_affine(x, weight, (x.shape[-1],), op.eps),)
    raise _unsupported("apex", op)


def _flash_attn(op: RowNormOp) -> RowNormFn:
    fa = importlib.import_module("flash_attn.ops.triton.layer_norm")
    if op.kind == "crms":
        raise _unsupported("flash_attn", op)

    def run(x, residual, weight, bias):
        out = fa.layer_norm_fn(x, weight, bias, residual=residual, eps=op.eps, prenorm=op.fused_add,
                               is_rms_norm=op.kind == "rms")
        return tuple(out) if op.fused_add else (out,)

    return run


def _quack(op: RowNormOp) -> RowNormFn:
    quack_rms = importlib.import_module("quack.rmsnorm")
    if op.kind != "rms":
        raise _unsupported("quack", op)

    def run(x, residual, weight, bias):
        out = quack_rms.rmsnorm(x, weight, residual=residual, eps=op.eps, prenorm=op.fused_add)
        return tuple(out) if op.fused_add else (out,)

    return run


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("normlayers", "normlayers.functional under backend 'auto'", _normlayers, _normlayers_note),
        Provider("torch", "torch.nn.functional eager (F.layer_norm / F.rms_norm)", _torch_eager, _torch_note),
        Provider("compile", "torch.compile(reference), default mode, static shapes", _compiled_reference),
        Provider("liger", "liger_kernel.transformers.functional", _liger, package="liger_kernel"),
        Provider("apex", "apex.normalization.fused_layer_norm", _apex, package="apex"),
        Provider("flash_attn", "flash_attn.ops.triton.layer_norm.layer_norm_fn", _flash_attn, package="flash_attn"),
        Provider("quack", "quack.rmsnorm.rmsnorm", _quack, package="quack"),
    )
}
