"""What each layer supports, derived from the code: the registry behind the docs' support matrix.

Every public layer has an entry (a test checks that none is missing) with a factory for a tiny instance and input.
Most columns are *probed*, not typed: :func:`probe` runs the tiny instance and records what actually happens.

* ``reference``: a forward and backward on the plain-PyTorch backend run.
* ``triton_fwd`` / ``triton_bwd``: the ``normlayers::`` custom ops (the Triton kernels) that run in the forward and
  in the backward on backend ``"triton"`` (recorded by a ``TorchDispatchMode``). On CPU this needs the Triton
  interpreter (``TRITON_INTERPRET=1``); empty means the layer's work is plain torch ops on every backend.
* ``sync_stats``: the constructor takes ``sync_stats`` (:mod:`normlayers.distributed`).
* ``fold``: the module exposes an inference folding: ``as_affine()`` (an eval-mode per-channel affine, foldable into
  the adjacent linear layer) or ``to_conv2d()`` (a conv with its weight baked in).
* ``compile`` / ``export``: declared here and *verified* by ``tests/test_support.py``, which runs
  ``torch.compile(fullgraph=True)`` (forward and backward, equal to eager) and ``torch.export`` for every entry that
  claims them (compiling every layer at docs-build time would take minutes).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import normlayers

__all__ = ["LAYERS", "LayerEntry", "probe", "support_matrix_markdown"]


@dataclass(frozen=True)
class LayerEntry:
    """One public layer: its docs page, a factory for a tiny instance (in training mode) and its input, and the
    declared compile/export support (verified by the tests)."""

    name: str
    page: str
    make: Callable[[], tuple[nn.Module, Tensor]]
    compile: bool = True
    export: bool = True


def _nchw(channels: int = 8) -> Tensor:
    return torch.randn(2, channels, 3, 4, generator=torch.Generator().manual_seed(0))


def _rows(width: int = 16) -> Tensor:
    return torch.randn(3, width, generator=torch.Generator().manual_seed(0))


LAYERS: dict[str, LayerEntry] = {e.name: e for e in (
    LayerEntry("LayerNorm", "row_norms.md", lambda: (normlayers.LayerNorm(16), _rows())),
    LayerEntry("RMSNorm", "row_norms.md", lambda: (normlayers.RMSNorm(16), _rows())),
    LayerEntry("CRMSNorm", "row_norms.md", lambda: (normlayers.CRMSNorm(15), _rows(15))),
    LayerEntry("BatchChannelNorm2d", "batch_channel.md", lambda: (normlayers.BatchChannelNorm2d(8, 2), _nchw())),
    LayerEntry("WSConv2d", "weight_std.md", lambda: (normlayers.WSConv2d(8, 4, 3, padding=1), _nchw())),
    LayerEntry("ScaledWSConv2d", "weight_std.md", lambda: (normlayers.ScaledWSConv2d(8, 4, 3, padding=1), _nchw())),
    *(LayerEntry(f"EvoNorm2d{v}", "evo_norm.md",
                 (lambda v=v: (getattr(normlayers, f"EvoNorm2d{v}")(8, **({"groups": 2} if v[0] == "S" else {})),
                               _nchw())))
      for v in ("B0", "B1", "B2", "S0", "S0a", "S1", "S1a", "S2", "S2a")),
)}


class _RecordCustomOps(TorchDispatchMode):
    """Records the ``normlayers::`` ops that reach the dispatcher (the Triton kernels' ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("normlayers::"):
            self.ops.append(name.removeprefix("normlayers::").split(".")[0])
        return func(*args, **(kwargs or {}))


def _ordered_unique(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def probe(entry: LayerEntry) -> dict[str, object]:
    """Run ``entry``'s tiny instance and report what it supports (see the module docstring)."""
    module, x = entry.make()
    with normlayers.backend("reference"):
        module(x.clone().requires_grad_()).sum().backward()
    forward, backward = _RecordCustomOps(), _RecordCustomOps()
    with normlayers.backend("triton"):
        leaf = x.clone().requires_grad_()
        with forward:
            y = module(leaf)
        with backward:
            y.sum().backward()
    return {
        "reference": True,
        "triton_fwd": _ordered_unique(forward.ops),
        "triton_bwd": _ordered_unique(backward.ops),
        "compile": entry.compile,
        "export": entry.export,
        "sync_stats": "sync_stats" in inspect.signature(type(module)).parameters,
        "fold": hasattr(module, "as_affine") or hasattr(module, "to_conv2d"),
    }


def _cell(value: object) -> str:
    if isinstance(value, tuple):
        return "<br>".join(f"`{name}`" for name in value) if value else "— (torch ops)"
    return "yes" if value else "—"


_COLUMNS = [("reference", "CPU reference"), ("triton_fwd", "Triton fwd ops"), ("triton_bwd", "Triton bwd ops"),
            ("compile", "compile (fullgraph)"), ("export", "export"), ("sync_stats", "sync stats"), ("fold", "fold")]


def support_matrix_markdown() -> str:
    """The support matrix as a Markdown table, one row per layer, every cell probed or verified (module docstring)."""
    lines = ["| layer | " + " | ".join(title for _, title in _COLUMNS) + " |",
             "|---|" + "---|" * len(_COLUMNS)]
    for entry in LAYERS.values():
        support = probe(entry)
        cells = " | ".join(_cell(support[key]) for key, _ in _COLUMNS)
        lines.append(f"| [`{entry.name}`]({entry.page}) | {cells} |")
    return "\n".join(lines)
