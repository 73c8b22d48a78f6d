"""Unified Normalization: :class:`UnifiedNorm` (Yang et al., "Unified Normalization for Accelerating and Stabilizing
Transformers", ACM MM 2022, arXiv 2208.01313).

The module keeps the official ``UN1d``'s parameter and buffer names and shapes (``weight``, ``bias``,
``running_var``, ``ema_gz``, ``iters``, ``buffer_x2``, ``buffer_gz``, ``skip_counter``), so the authors' checkpoints
load with ``strict=True``.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from normlayers import functional as F
from normlayers._dtypes import compute_dtype
from normlayers._checks import check_epsilon, check_nonnegative_int, check_positive_int, check_unit_interval, is_int
from normlayers.nn._scripting import NotScriptable

__all__ = ["UnifiedNorm"]


def _window_sizes(window_size: Union[int, Sequence[int]]) -> tuple[int, int]:
    sizes = (window_size, window_size) if isinstance(window_size, numbers.Integral) else tuple(window_size)
    if len(sizes) != 2 or not all(is_int(s) and s >= 1 for s in sizes):
        raise ValueError(f"window_size must be a positive int or a pair (forward, backward) of positive ints, got "
                         f"{window_size!r}")
    return int(sizes[0]), int(sizes[1])


class UnifiedNorm(NotScriptable):
    r"""Unified Normalization over the channels (last dim) of transformer activations (docs/power_unified.md): batch
    statistics smoothed over a window of steps in training, a fixed per-channel affine at inference (foldable into the
    next linear layer, :meth:`as_affine`). By default it reproduces the official ``UN1d`` exactly: forward, backward and
    every buffer.

    .. math:: y = \gamma \cdot \frac{x}{\sqrt{v + \epsilon}} + \beta

    * Training step ``t`` (``iters``, incremented first): ``q`` is the per-channel mean of ``x²`` over the non-pad
      tokens (no mean is subtracted), written to the ring buffer ``buffer_x2[t % M]``. ``v = q`` for the first
      ``max(M, warmup_iters − 1)`` steps; afterwards ``v`` is the geometric mean of the ``M`` buffered statistics.
    * Outlier filtration (``outlier_filtration=True``, after warm-up): when, for any channel, the window's arithmetic
      minus geometric mean exceeds ``M`` times the (unbiased, pooled over all channels) variance of the previous
      window's ``sqrt(buffer_x2)``, the step is an outlier: its slot gets ``running_var`` instead, ``v = q``,
      ``skip_counter += 1``, and the backward is the exact gradient of the batch normalization. With channels of
      similar scale this pooled test fires on almost every step (docs/power_unified.md).
    * Backward (the method's own): ``g = γ·r·dy``; ``gz = mean(g·z)`` over all tokens goes to the ring buffer
      ``buffer_gz``; ``ema_gz`` moves towards ``gz`` during warm-up, then towards the window's arithmetic mean, at
      rate ``1 − momentum``; ``dx = (g − ema_gz·z) / sqrt(v + eps)``. The factor ``r = sqrt(v + eps) /
      sqrt(running_var + eps)`` clamped to [1/5, 5] is 1 for the first ``max(1000, warmup_iters)`` steps (the
      official code's hard-coded 1000) and on outlier steps; it is not applied in the forward.
    * ``running_var ← momentum·running_var + (1 − momentum)·v`` every training step; eval uses it:
      ``y = γ·x/sqrt(running_var + eps) + β``.

    Statistics and arithmetic are fp32 (fp64 for fp64 input); the output has the input's dtype. On CUDA the layer runs
    on Triton kernels (see docs/power_unified.md), elsewhere on the plain-PyTorch reference.

    Args:
        num_features (int): ``C``, the channels of the input.
        window_size (int or pair of ints): ``M``, the forward window, or ``(M, M_b)`` for the forward and backward
            windows. A window of 1 makes every step a batch-statistic step with the exact gradient. Default: ``4``.
        warmup_iters (int): warm-up steps (batch statistics). Default: ``4000``.
        outlier_filtration (bool): the authors advise ``False`` for NLP, ``True`` for vision. Default: ``False``.
        eps (float): added inside the square root. Default: ``1e-5``.
        momentum (float): weight of the old value in the running updates. Default: ``0.9``.
        grad_compensation (bool, keyword-only): apply ``r`` in the backward (the official code). Default: ``True``.
        process_group, sync_stats (keyword-only): with ``sync_stats=True``, in training under ``torch.distributed``
            with more than one rank in ``process_group`` (default: the world), ``q`` is taken over the non-pad
            tokens of every rank and the backward's ``gz`` over every rank's tokens, so all ranks normalize alike and
            keep identical buffers and ring buffers (docs/distributed.md); :func:`normlayers.convert_sync` sets both.
            Default: ``None``, ``False`` (each rank its own statistics, as the official code under DDP).
        device, dtype (keyword-only): factory kwargs for the parameters and buffers.

    Shape:
        - Input: :math:`(B, N, C)` or :math:`(B, C)`
        - pad_mask (optional): :math:`(B, N)` bool, True = padding (:math:`(B,)`, or the official :math:`(1, B)`,
          for 2-D input); left out of the forward statistic, included in the backward's means (as the official code)
        - Output: same shape and dtype as the input

    Examples::

        >>> norm = normlayers.UnifiedNorm(384, window_size=4, warmup_iters=4000, outlier_filtration=True)
        >>> y = norm(torch.randn(8, 197, 384))
        >>> scale, shift = norm.eval().as_affine()          # y == x * scale + shift in eval
    """

    __constants__ = ["num_features", "window_size", "warmup_iters", "outlier_filtration", "eps", "momentum",
                     "grad_compensation"]
    num_features: int
    window_size: tuple[int, int]
    warmup_iters: int
    outlier_filtration: bool
    eps: float
    momentum: float
    grad_compensation: bool

    def __init__(self, num_features: int, window_size: Union[int, Sequence[int]] = 4, warmup_iters: int = 4000,
                 outlier_filtration: bool = False, eps: float = 1e-5, momentum: float = 0.9, *,
                 grad_compensation: bool = True, process_group: Optional[Any] = None, sync_stats: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = check_positive_int("num_features", num_features)
        self.window_size = _window_sizes(window_size)
        self.warmup_iters = check_nonnegative_int("warmup_iters", warmup_iters)
        self.outlier_filtration = bool(outlier_filtration)
        self.eps = check_epsilon("eps", eps)
        self.momentum = check_unit_interval("momentum", momentum)
        self.grad_compensation = bool(grad_compensation)
        self.sync_stats = bool(sync_stats)
        self.process_group = process_group
        factory_kwargs = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        self.register_buffer("running_var", torch.empty(self.num_features, **factory_kwargs))
        self.register_buffer("ema_gz", torch.empty(self.num_features, **factory_kwargs))
        self.register_buffer("iters", torch.empty(1, dtype=torch.long, device=device))
        self.register_buffer("buffer_x2", torch.empty(self.window_size[0], self.num_features, **factory_kwargs))
        self.register_buffer("buffer_gz", torch.empty(self.window_size[1], self.num_features, **factory_kwargs))
        self.register_buffer("skip_counter", torch.empty(1, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """``running_var`` 1, ``ema_gz``, both ring buffers, ``iters`` and ``skip_counter`` 0 (as at construction)."""
        self.running_var.fill_(1.0)
        for buffer in (self.ema_gz, self.buffer_x2, self.buffer_gz, self.iters, self.skip_counter):
            buffer.zero_()

    def reset_iters(self) -> None:
        """``iters`` back to 0, so training re-enters warm-up (the authors' advice for fine-tuning); the statistics
        and ring buffers are kept. :func:`normlayers.reset_iters` does it for a whole model."""
        self.iters.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        forward_window, backward_window = self.window_size
        window = forward_window if forward_window == backward_window else self.window_size
        text = (f"{self.num_features}, window_size={window}, warmup_iters={self.warmup_iters}, "
                f"outlier_filtration={self.outlier_filtration}, eps={self.eps}, momentum={self.momentum}")
        if not self.grad_compensation:
            text += ", grad_compensation=False"
        if self.sync_stats:
            text += ", sync_stats=True"
        return text

    @torch.no_grad()
    def as_affine(self) -> tuple[Tensor, Tensor]:
        """The eval-mode layer as a per-channel affine ``y = x·scale + shift`` (official ``UN1d`` eval): returns
        ``(scale, shift)`` with ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias``, both ``(C,)`` in the
        parameters' dtype (computed in fp32 or wider), detached. Fold into the following linear ``(W, b)`` as
        ``W' = W·diag(scale)``, ``b' = b + W·shift``."""
        opmath = compute_dtype(self.weight.dtype)
        scale = self.weight.to(opmath) * torch.rsqrt(self.running_var.to(opmath) + self.eps)
        return scale.to(self.weight.dtype), self.bias.detach().clone()

    def forward(self, input: Tensor, pad_mask: Optional[Tensor] = None) -> Tensor:
        return F.unified_norm(input, self.running_var, self.ema_gz, self.buffer_x2, self.buffer_gz, self.iters,
                              self.skip_counter, self.weight, self.bias, pad_mask, training=self.training,
                              eps=self.eps, momentum=self.momentum, warmup_iters=self.warmup_iters,
                              outlier_filtration=self.outlier_filtration, grad_compensation=self.grad_compensation,
                              sync_stats=self.sync_stats, process_group=self.process_group)
