"""The implementations the benchmark compares ("providers"), as one table.

Each provider turns an :class:`~normlayers.bench.ops.Op` into a function called as ``fn(*inputs.args)``, or raises
:class:`UnsupportedOp`. The peer libraries (``liger``, ``apex``, ``flash_attn``, ``quack``) are imported only when
used, and only offered on CUDA when installed; which ops they cover is each op's ``peers`` table.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from normlayers.backends import backend, tier, use_triton
from normlayers.bench.ops import Op, OpFn

__all__ = ["DEFAULT_PROVIDERS", "PEERS", "PROVIDERS", "Provider", "UnsupportedOp"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class UnsupportedOp(Exception):
    """The provider has no implementation of this op."""


@dataclass(frozen=True)
class Provider:
    """A benchmarked implementation.

    ``build(op)`` returns the function to time; ``note(op, device)`` says which code path that is, when the name
    alone does not; ``compiles(op, device)`` says whether its first call compiles (``torch.compile``, a Triton JIT),
    whose time is then reported as ``compile_s``. ``package`` names the importable module of an optional peer library
    (``None`` for the built-in providers, which are always offered). ``by_default`` says whether a run that names no
    providers runs it (a provider that only answers one question, at a cost in compile time, is run when named).
    """

    name: str
    description: str
    build: Callable[[Op], OpFn]
    note: Callable[[Op, torch.device], str] = lambda op, device: ""
    compiles: Callable[[Op, torch.device], bool] = lambda op, device: False
    package: Optional[str] = None
    by_default: bool = True

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """Why this provider cannot run on ``device``, or ``None`` when it can."""
        if self.package is None:
            return None
        if device.type != "cuda":
            return "needs CUDA"
        if importlib.util.find_spec(self.package) is None:
            return f"'{self.package}' is not installed"
        return None


def _runs_kernels(op: Op, device: torch.device) -> bool:
    with backend("auto"):
        return op.has_kernels and use_triton(torch.empty(0, device=device))


def _normlayers_note(op: Op, device: torch.device) -> str:
    with backend("auto"):
        implementation = tier(torch.empty(0, device=device), has_kernels=op.has_kernels)
    return f"backend 'auto': {'triton kernels' if implementation == 'triton' else implementation + ' tier'}"


def _native(op: Op) -> OpFn:
    return op.native if op.native is not None else op.reference


def _native_on_fp32(op: Op) -> OpFn:
    """torch's own ops on fp32 copies of the bf16/fp16 inputs (differentiable casts, so gradients are rounded once on
    the way back), every output rounded back to that dtype: the correct eager equivalent where torch's reduced-precision
    kernels are not (its bf16 LayerNorm backward sums dW and dB in bf16). Buffers the op updates in place
    (``Op.updated_args``) are written back. Only for ops with torch ops and for bf16/fp16 inputs (otherwise it is the
    torch provider)."""
    if op.native is None:
        raise UnsupportedOp(f"{op.name} has no torch op (the torch provider runs the reference)")
    native = op.native

    def run(*args: object):
        low = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in _LOW_PRECISION), None)
        if low is None:
            raise UnsupportedOp("no bf16/fp16 inputs: the same call as the torch provider")
        upcast = [a.float() if isinstance(a, torch.Tensor) and a.dtype == low else a for a in args]
        outputs = native(*upcast)
        with torch.no_grad():  # running statistics updated on the fp32 copies: stored in their own dtype
            for i in op.updated_args:
                if upcast[i] is not args[i]:
                    args[i].copy_(upcast[i])
        return tuple(o.to(low) for o in outputs) if isinstance(outputs, tuple) else outputs.to(low)

    return run


def _compiled(fn: OpFn) -> OpFn:
    # A fresh Dynamo cache for every case: otherwise, after the recompile limit (8 shapes/dtypes/modes of the same
    # code), torch.compile silently falls back to eager and the compiled numbers would be eager numbers.
    torch.compiler.reset()
    return torch.compile(fn, dynamic=False)


def _peer(name: str) -> Callable[[Op], OpFn]:
    def build(op: Op) -> OpFn:
        if name not in op.peers:
            raise UnsupportedOp(f"{name} has no {op.name}")
        return op.peers[name]()

    return build


PEERS = {
    "liger": ("liger_kernel", "liger_kernel.transformers.functional"),
    "apex": ("apex", "apex.normalization.fused_layer_norm"),
    "flash_attn": ("flash_attn", "flash_attn.ops.triton.layer_norm.layer_norm_fn"),
    "quack": ("quack", "quack.rmsnorm.rmsnorm"),
}

PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("normlayers", "normlayers.functional under backend 'auto'", lambda op: op.normlayers,
                 _normlayers_note, compiles=_runs_kernels),
        Provider("torch", "torch's own ops eager (F.layer_norm, F.rms_norm, F.batch_norm + F.group_norm, ...), "
                          "else the eager reference", _native, lambda op, device: op.native_note),
        Provider("torch_fp32", "torch's own ops eager on fp32 copies of bf16/fp16 inputs, outputs rounded back",
                 _native_on_fp32, lambda op, device: op.native_note),
        Provider("reference", "normlayers' eager reference (plain PyTorch, written for reading)",
                 lambda op: op.reference),
        Provider("torch_compile", "torch.compile(reference), default mode, static shapes",
                 lambda op: _compiled(op.reference), compiles=lambda op, device: True),
        Provider("normlayers_compile", "torch.compile(normlayers.functional under backend 'auto'), default mode, "
                 "static shapes: what a user who compiles the model gets (run when named)",
                 lambda op: _compiled(op.normlayers), _normlayers_note, compiles=lambda op, device: True,
                 by_default=False),
        *(Provider(name, description, _peer(name), package=package)
          for name, (package, description) in PEERS.items()),
    )
}

# What a run that names no providers runs.
DEFAULT_PROVIDERS: tuple[str, ...] = tuple(name for name, p in PROVIDERS.items() if p.by_default)
