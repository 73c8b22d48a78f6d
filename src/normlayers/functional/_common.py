"""What the functional forms of several families share beyond the argument checks."""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def empty_batch_output(input: Tensor, *params: Optional[Tensor]) -> Tensor:
    """The output for an input with no values (``N = 0``, or empty planes): empty, as torch's norms return, and still
    connected to every parameter so that each gets a (zero) gradient — DDP expects one from every rank, including a
    rank whose local batch is empty. Running statistics are left alone, as ``nn.BatchNorm2d`` leaves them."""
    out = input.clone()
    for param in params:
        if param is not None:
            out = out + param.sum() * 0
    return out
