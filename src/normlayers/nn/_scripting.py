"""TorchScript: the normlayers modules refuse ``torch.jit.script`` with one clear error.

Their forward passes go through Python argument checks, the process-wide backend switch and ``torch.library``
custom ops with optional arguments, none of which TorchScript compiles. ``torch.compile(fullgraph=True)`` and
``torch.export`` handle every module instead (docs/reliability.md).
"""

from __future__ import annotations

from torch import nn


class NotScriptable(nn.Module):
    """Mixin: ``torch.jit.script`` calls ``__prepare_scriptable__`` on a module (and its children) before compiling
    it, which is where the refusal is raised, before any TorchScript message about unsupported Python."""

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(
            f"torch.jit.script is not supported for normlayers.{type(self).__name__}: its forward uses Python "
            "argument checks, the backend switch and torch.library custom ops that TorchScript cannot compile. Use "
            "torch.compile(module, fullgraph=True) or torch.export.export(module, args) instead; for TorchScript, "
            "swap back to torch's own norm first (normlayers.restore_norms).")
