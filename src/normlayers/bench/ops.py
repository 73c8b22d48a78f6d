"""The row-norm ops the benchmark knows: their arguments, their inputs, and their ideal memory traffic.

Every provider is called through one signature, :data:`RowNormFn`: ``fn(x, residual, weight, bias)`` returning
``(y,)`` for a plain norm or ``(y, h)`` for a fused residual add (``h = x + residual``, the pre-norm residual stream).
``residual`` is ``None`` for plain norms and ``bias`` is ``None`` except for LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from normlayers.reference import row_norms as reference

__all__ = [
    "MODES",
    "OPS",
    "RowNormFn",
    "RowNormInputs",
    "RowNormOp",
    "Transfer",
    "compute_results",
    "ideal_bytes",
    "make_inputs",
    "reference_fn",
    "traffic",
    "traffic_formula",
]

RowNormFn = Callable[[Tensor, Optional[Tensor], Tensor, Optional[Tensor]], tuple[Tensor, ...]]

MODES = ("fwd", "bwd", "fwd_bwd")

LAYER_NORM_EPS = 1e-5
RMS_NORM_EPS = 1e-6  # Llama's value; used for RMSNorm and CRMSNorm alike

_STATS_BY_KIND = {"layer": ("mean", "rstd"), "rms": ("rstd",), "crms": ("rstd", "sum_x")}


@dataclass(frozen=True)
class RowNormOp:
    """One benchmarked op: a norm ``kind`` (``"layer"``, ``"rms"``, ``"crms"``), optionally fused with a residual
    add. ``name`` is the ``normlayers.functional`` function that implements it."""

    name: str
    kind: str
    fused_add: bool

    @property
    def has_bias(self) -> bool:
        return self.kind == "layer"

    @property
    def eps(self) -> float:
        return LAYER_NORM_EPS if self.kind == "layer" else RMS_NORM_EPS

    @property
    def saved_stats(self) -> tuple[str, ...]:
        """The fp32 per-row statistics a fused kernel keeps for the backward pass."""
        return _STATS_BY_KIND[self.kind]

    def param_args(self, weight: Tensor, bias: Optional[Tensor]) -> tuple:
        """The arguments after ``normalized_shape`` in the ``torch.nn.functional`` order: ``(weight, bias, eps)``
        for LayerNorm, ``(weight, eps)`` otherwise."""
        return (weight, bias, self.eps) if self.has_bias else (weight, self.eps)


OPS: dict[str, RowNormOp] = {
    op.name: op
    for op in (
        RowNormOp("layer_norm", "layer", fused_add=False),
        RowNormOp("rms_norm", "rms", fused_add=False),
        RowNormOp("crms_norm", "crms", fused_add=False),
        RowNormOp("add_layer_norm", "layer", fused_add=True),
        RowNormOp("add_rms_norm", "rms", fused_add=True),
        RowNormOp("add_crms_norm", "crms", fused_add=True),
    )
}


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and results
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowNormInputs:
    """The tensors of one benchmark case. ``grad_outputs`` holds ``dy`` (and ``dh`` for a fused add, the gradient the
    next block sends back along the residual stream)."""

    x: Tensor
    residual: Optional[Tensor]
    weight: Tensor
    bias: Optional[Tensor]
    grad_outputs: tuple[Tensor, ...]

    @property
    def args(self) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
        return self.x, self.residual, self.weight, self.bias

    @property
    def grad_targets(self) -> dict[str, Tensor]:
        """The differentiable inputs, keyed by the name of their gradient."""
        named = {"dx": self.x, "dresidual": self.residual, "dweight": self.weight, "dbias": self.bias}
        return {name: t for name, t in named.items() if t is not None}

    def to(self, dtype: torch.dtype) -> RowNormInputs:
        """Copies in ``dtype`` (new leaves, same ``requires_grad``), e.g. fp64 copies for the reference."""

        def convert(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)

        return replace(self, x=convert(self.x), residual=convert(self.residual), weight=convert(self.weight),
                       bias=convert(self.bias), grad_outputs=tuple(convert(g) for g in self.grad_outputs))


def make_inputs(op: RowNormOp, dtype: torch.dtype, rows: int, cols: int, device: torch.device,
                requires_grad: bool, seed: int = 0) -> RowNormInputs:
    """Random inputs of shape ``(rows, cols)``: ``x``, ``residual``, ``dy``, ``dh`` ~ N(0, 1),
    ``weight`` ~ 1 + 0.1·N(0, 1), ``bias`` ~ 0.1·N(0, 1), all in ``dtype`` (the parameters too, as after
    ``module.to(dtype)``)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        t = torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * scale + shift
        return t.to(dtype).requires_grad_(requires_grad)

    x = randn(rows, cols)
    residual = randn(rows, cols) if op.fused_add else None
    weight = randn(cols, scale=0.1, shift=1.0)
    bias = randn(cols, scale=0.1) if op.has_bias else None
    n_outputs = 2 if op.fused_add else 1
    grad_outputs = tuple(randn(rows, cols).detach() for _ in range(n_outputs))
    return RowNormInputs(x, residual, weight, bias, grad_outputs)


def _output_names(op: RowNormOp) -> tuple[str, ...]:
    return ("y", "h") if op.fused_add else ("y",)


def compute_results(op: RowNormOp, fn: RowNormFn, inputs: RowNormInputs, mode: str) -> dict[str, Tensor]:
    """Run ``fn`` once, untimed: its outputs, and for ``bwd``/``fwd_bwd`` also the gradients of every differentiable
    input (for ``grad_outputs``), keyed by name (``y``, ``h``, ``dx``, ``dresidual``, ``dweight``, ``dbias``)."""
    outputs = fn(*inputs.args)
    results = dict(zip(_output_names(op), outputs))
    if mode != "fwd":
        targets = inputs.grad_targets
        grads = torch.autograd.grad(outputs, tuple(targets.values()), inputs.grad_outputs)
        results.update(zip(targets.keys(), grads))
    return {name: t.detach() for name, t in results.items()}


# ----------------------------------------------------------------------------------------------------------------------
# The reference, as one RowNormFn
# ----------------------------------------------------------------------------------------------------------------------

_REFERENCE_NORMS = {"layer": reference.layer_norm, "rms": reference.rms_norm, "crms": reference.crms_norm}


def reference_residual_add(x: Tensor, residual: Tensor) -> Tensor:
    """``x + residual`` as the reference computes it (opmath, rounded to the residual's dtype)."""
    return reference.residual_add(x, residual, residual.dtype)


def compose(op: RowNormOp, norm: Callable[..., Tensor],
            residual_add: Callable[[Tensor, Tensor], Tensor] = torch.add) -> RowNormFn:
    """An unfused :data:`RowNormFn` from a norm with the ``torch.nn.functional`` signature
    ``norm(h, normalized_shape, weight, [bias,] eps)`` and, for a fused-add op, a separate ``residual_add``."""

    def run(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, ...]:
        h = residual_add(x, residual) if op.fused_add else x
        y = norm(h, (h.shape[-1],), *op.param_args(weight, bias))
        return (y, h) if op.fused_add else (y,)

    return run


def reference_fn(op: RowNormOp) -> RowNormFn:
    """The plain-PyTorch reference of ``op`` (``normlayers.reference.row_norms``)."""
    return compose(op, _REFERENCE_NORMS[op.kind], reference_residual_add)


# ----------------------------------------------------------------------------------------------------------------------
# Byte model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """One tensor an ideal kernel must read or write once. ``extent`` is ``"MxN"`` (a row tensor), ``"N"`` (a
    parameter) or ``"M"`` (a per-row statistic, always fp32)."""

    direction: str
    tensor: str
    extent: str

    def nbytes(self, rows: int, cols: int, itemsize: int) -> int:
        elements = {"MxN": rows * cols, "N": cols, "M": rows}[self.extent]
        return elements * (4 if self.extent == "M" else itemsize)

    def __str__(self) -> str:
        return f"{self.direction} {self.tensor}[{self.extent}{', fp32' if self.extent == 'M' else ''}]"


def _forward_traffic(op: RowNormOp, store_stats: bool) -> list[Transfer]:
    transfers = [Transfer("read", "x", "MxN")]
    if op.fused_add:
        transfers.append(Transfer("read", "residual", "MxN"))
    transfers.append(Transfer("read", "weight", "N"))
    if op.has_bias:
        transfers.append(Transfer("read", "bias", "N"))
    transfers.append(Transfer("write", "y", "MxN"))
    if op.fused_add:
        transfers.append(Transfer("write", "h", "MxN"))
    if store_stats:
        transfers += [Transfer("write", stat, "M") for stat in op.saved_stats]
    return transfers


def _backward_traffic(op: RowNormOp) -> list[Transfer]:
    transfers = [Transfer("read", "h" if op.fused_add else "x", "MxN"), Transfer("read", "dy", "MxN")]
    if op.fused_add:
        transfers.append(Transfer("read", "dh", "MxN"))
    transfers.append(Transfer("read", "weight", "N"))
    transfers += [Transfer("read", stat, "M") for stat in op.saved_stats]
    # For a fused add, dx and dresidual are the same values: a kernel writes them once and returns them twice.
    transfers.append(Transfer("write", "dx(=dresidual)" if op.fused_add else "dx", "MxN"))
    transfers.append(Transfer("write", "dweight", "N"))
    if op.has_bias:
        transfers.append(Transfer("write", "dbias", "N"))
    return transfers


def traffic(op: RowNormOp, mode: str) -> list[Transfer]:
    """The minimum memory traffic of ``op`` in ``mode``.

    ``fwd`` is inference (no statistics stored); ``bwd`` reads the statistics the training forward stored;
    ``fwd_bwd`` is the training forward (which writes them) plus ``bwd``. Partial dW/dB buffers of a multi-program
    reduction are implementation overhead and not counted.
    """
    if mode == "fwd":
        return _forward_traffic(op, store_stats=False)
    if mode == "bwd":
        return _backward_traffic(op)
    if mode == "fwd_bwd":
        return _forward_traffic(op, store_stats=True) + _backward_traffic(op)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def ideal_bytes(op: RowNormOp, mode: str, rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes an ideal kernel moves for ``op`` in ``mode`` on an ``(rows, cols)`` input of ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(t.nbytes(rows, cols, itemsize) for t in traffic(op, mode))


def traffic_formula(op: RowNormOp, mode: str) -> str:
    """The byte model of ``op`` in ``mode`` in words, e.g. ``"read x[MxN] + read weight[N] + write y[MxN]"``."""
    return " + ".join(str(t) for t in traffic(op, mode))
