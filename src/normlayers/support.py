"""What each layer supports, derived from the code: the registry behind the docs' support matrix.

Every public layer has an entry (a test checks that none is missing) with a factory for a tiny instance and input.
Most columns are *probed*, not typed: :func:`probe` runs the tiny instance and records what actually happens.

* ``reference``: a forward and backward on the plain-PyTorch backend run.
* ``triton_fwd`` / ``triton_bwd``: the ``normlayers::`` custom ops (the Triton kernels) that run in the forward and
  in the backward on backend ``"triton"`` (recorded by a ``TorchDispatchMode``). On CPU this needs the Triton
  interpreter (``TRITON_INTERPRET=1``); empty means the layer's work is plain torch ops on every backend.
* ``sync_stats``: the layer can be built with ``sync_stats=True`` and runs (:mod:`normlayers.distributed`).
* ``fold``: :func:`normlayers.convert.fold_norms` has a rule for the layer (an eval-mode affine folded into the
  adjacent linear map or conv, or a conv with its standardized weight baked in).
* ``compile`` / ``export``: declared here and *verified* by ``tests/test_support.py``, which runs
  ``torch.compile(fullgraph=True)`` (forward and backward, equal to eager) and ``torch.export`` for every entry that
  claims them (compiling every layer at docs-build time would take minutes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import normlayers
from normlayers.convert.fold import is_foldable

__all__ = ["LAYERS", "LayerEntry", "probe", "support_matrix_markdown"]


@dataclass(frozen=True)
class LayerEntry:
    """One public layer: its docs page, a factory for a tiny instance (keyword arguments go to the constructor) and
    one for its forward's arguments (the first is the input whose gradient is taken), and the declared compile/export
    support (verified by the tests)."""

    name: str
    page: str
    build: Callable[..., nn.Module]
    inputs: Callable[[], tuple[Tensor, ...]]
    compile: bool = True
    export: bool = True

    def make(self, **kwargs) -> tuple[nn.Module, tuple[Tensor, ...]]:
        return self.build(**kwargs), self.inputs()


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _nchw(channels: int = 8) -> tuple[Tensor]:
    return (torch.randn(2, channels, 3, 4, generator=_generator()),)


def _rows(width: int = 16) -> tuple[Tensor]:
    return (torch.randn(3, width, generator=_generator()),)


def _nchw_and_mask() -> tuple[Tensor, Tensor]:
    (x,) = _nchw()
    return x, torch.rand(2, 1, 3, 4, generator=_generator()) > 0.5


def _tokens_and_mask(channels: int = 8) -> tuple[Tensor, Tensor]:
    """``(T, B, C)`` = ``(5, 2, C)`` tokens (also read as ``(B, N, C)`` by UnifiedNorm's ``(2, 5, C)``), and a padding
    mask with True = padding."""
    x = torch.randn(5, 2, channels, generator=_generator())
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    return x, pad


def _spd_batch(n: int = 3) -> tuple[Tensor]:
    a = torch.randn(4, n, n, generator=_generator(), dtype=torch.float64)
    return (a @ a.mT + n * torch.eye(n, dtype=torch.float64),)


def _evo(variant: str) -> LayerEntry:
    cls = getattr(normlayers, f"EvoNorm2d{variant}")
    group_kwargs = {"groups": 2} if variant.startswith("S") else {}
    return LayerEntry(cls.__name__, "evo_norm.md", lambda **kw: cls(8, **group_kwargs, **kw), _nchw)


LAYERS: dict[str, LayerEntry] = {e.name: e for e in (
    LayerEntry("LayerNorm", "row_norms.md", lambda **kw: normlayers.LayerNorm(16, **kw), _rows),
    LayerEntry("RMSNorm", "row_norms.md", lambda **kw: normlayers.RMSNorm(16, **kw), _rows),
    LayerEntry("CRMSNorm", "row_norms.md", lambda **kw: normlayers.CRMSNorm(15, **kw), lambda: _rows(15)),
    LayerEntry("LayerNorm2d", "channel_norms.md", lambda **kw: normlayers.LayerNorm2d(8, **kw), _nchw),
    LayerEntry("RMSNorm2d", "channel_norms.md", lambda **kw: normlayers.RMSNorm2d(8, **kw), _nchw),
    LayerEntry("GroupNorm", "group_norm.md", lambda **kw: normlayers.GroupNorm(2, 8, act="silu", **kw), _nchw),
    LayerEntry("BatchChannelNorm2d", "batch_channel.md", lambda **kw: normlayers.BatchChannelNorm2d(8, 2, **kw),
               _nchw),
    LayerEntry("WSConv2d", "weight_std.md", lambda **kw: normlayers.WSConv2d(8, 4, 3, padding=1, **kw), _nchw),
    LayerEntry("ScaledWSConv2d", "weight_std.md", lambda **kw: normlayers.ScaledWSConv2d(8, 4, 3, padding=1, **kw),
               _nchw),
    *(_evo(v) for v in ("B0", "B1", "B2", "S0", "S0a", "S1", "S1a", "S2", "S2a")),
    LayerEntry("PowerNorm", "power_unified.md", lambda **kw: normlayers.PowerNorm(8, **kw), _tokens_and_mask),
    LayerEntry("UnifiedNorm", "power_unified.md", lambda **kw: normlayers.UnifiedNorm(8, **kw),
               lambda: (_tokens_and_mask()[0].transpose(0, 1).contiguous(), _tokens_and_mask()[1])),
    LayerEntry("RegionNorm2d", "region_norm.md", lambda **kw: normlayers.RegionNorm2d(8, **kw), _nchw_and_mask),
    LayerEntry("LearnableRegionNorm2d", "region_norm.md",
               lambda **kw: normlayers.LearnableRegionNorm2d(8, kernel_size=3, **kw), _nchw),
    LayerEntry("SPDBatchNorm", "spd_batch_norm.md", lambda **kw: normlayers.SPDBatchNorm(3, **kw), _spd_batch),
)}


def _accepts(entry: LayerEntry, **kwargs) -> bool:
    """Whether the constructor takes these arguments and the layer then runs (a reserved flag that raises does not
    count as support)."""
    try:
        module, inputs = entry.make(**kwargs)
        module(*inputs)
    except (TypeError, ValueError):
        return False
    return True


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
    module, (x, *rest) = entry.make()
    with normlayers.backend("reference"):
        module(x.clone().requires_grad_(), *rest).sum().backward()
    forward, backward = _RecordCustomOps(), _RecordCustomOps()
    with normlayers.backend("triton"):
        leaf = x.clone().requires_grad_()
        with forward:
            y = module(leaf, *rest)
        with backward:
            y.sum().backward()
    return {
        "reference": True,
        "triton_fwd": _ordered_unique(forward.ops),
        "triton_bwd": _ordered_unique(backward.ops),
        "compile": entry.compile,
        "export": entry.export,
        "sync_stats": _accepts(entry, sync_stats=True),
        "fold": is_foldable(module),
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
