"""PowerNorm: :class:`PowerNorm` (Shen, Yao, Gholami, Mahoney, Keutzer, "PowerNorm: Rethinking Batch Normalization in
Transformers", ICML 2020, arXiv 2003.07845), and :func:`reset_iters` for fine-tuning the transformer batch-statistic
norms.

The module keeps the official ``MaskPowerNorm``'s parameter and buffer names and shapes (``weight``, ``bias``,
``running_phi`` and ``ema_gz`` of shape ``(1, C, 1, 1)``, ``iters``), so the authors' checkpoints load with
``strict=True``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from normlayers import functional as F
from normlayers._checks import check_epsilon, check_nonnegative_int, check_positive_int, check_unit_interval
from normlayers.functional.token_norms import check_backward_denominator
from normlayers.nn._scripting import NotScriptable

__all__ = ["PowerNorm", "reset_iters"]


class PowerNorm(NotScriptable):
    r"""PowerNorm over the channels (last dim) of transformer activations, with running statistics across tokens
    (docs/power_unified.md). By default it reproduces the official ``MaskPowerNorm`` exactly: forward, backward and
    every buffer.

    .. math::
        u = \frac{x}{\sqrt{\mathrm{mean}_{c \in \text{group}}(x_c^2) + 10^{-5}}}, \qquad
        y = \gamma \cdot \frac{u}{\sqrt{d + \epsilon}} + \beta

    * GroupScaling (the first step; ``group_num=None`` leaves it out): each token's ``C/G`` contiguous channels are
      divided by their root mean square, with the fixed epsilon ``1e-5`` of the official code.
    * Training step ``t`` (``iters``, incremented first): ``q`` is the per-channel mean of ``u²`` over the non-pad
      tokens; ``d = q`` while ``t <= warmup_iters``, then ``d = running_phi`` (the value before this step).
      ``running_phi`` becomes the cumulative average of ``q`` while ``t < warmup_iters`` and then, every step, is
      moved as ``φ ← alpha_fwd·φ + (1 − alpha_fwd)·q`` (``alpha_fwd`` weights the *old* value, unlike BatchNorm's
      momentum).
    * Backward (the method's own, not autograd's): ``g = γ·dy``, ``g̃ = g − (1 − alpha_bkw)·ema_gz·z`` with
      ``z = u/sqrt(d + eps)``, ``ema_gz += mean(g̃·z)`` over all tokens (pads included), ``du = g̃ / sqrt(q + eps)``.
      The official ``ema_gz`` is the paper's ``ν / (1 − alpha_bkw)``.
    * Eval: ``d = running_phi``.

    Statistics and arithmetic are fp32 (fp64 for fp64 input); the output has the input's dtype. On CUDA the layer runs
    on Triton kernels (see docs/power_unified.md), elsewhere on the plain-PyTorch reference.

    Args:
        num_features (int): ``C``, the channels of the input.
        eps (float): added to the statistic inside the square root. Default: ``1e-5``.
        alpha_fwd (float): weight of the old ``running_phi`` in its update. Default: ``0.9``.
        alpha_bkw (float): the backward statistic's rate. Default: ``0.9``.
        affine (bool): learnable ``weight``/``bias``. The official code ignores this flag and always creates them;
            here ``affine=False`` means none. Default: ``True``.
        warmup_iters (int): training steps that normalize with the batch statistic. The authors pass their
            learning-rate warm-up (8000 in their recipes). Default: ``10000``.
        group_num (int, optional): GroupScaling's groups (the authors pass the number of attention heads); must divide
            ``num_features``; ``None`` turns GroupScaling off. Default: ``1``.
        batch_first (bool, keyword-only): input ``(B, T, C)`` instead of the official ``(T, B, C)``. Default:
            ``False``.
        backward_denominator (str, keyword-only): ``"batch"`` divides the input gradient by the current batch's
            ``sqrt(q + eps)`` (the official code, also after warm-up), ``"running"`` by ``sqrt(running_phi + eps)``
            (our reading of the paper's Algorithm 2, unverified). Default: ``"batch"``.
        process_group, sync_stats (keyword-only): with ``sync_stats=True``, in training under ``torch.distributed``
            with more than one rank in ``process_group`` (default: the world), ``q`` is taken over the non-pad
            tokens of every rank and ``ema_gz``'s update over every rank's tokens, so all ranks normalize alike and
            keep identical buffers (docs/distributed.md); :func:`normlayers.convert_sync` sets both. Default:
            ``None``, ``False`` (each rank its own statistics, as the official code under DDP).
        device, dtype (keyword-only): factory kwargs for the parameters and buffers.

    Shape:
        - Input: :math:`(T, B, C)`, :math:`(B, T, C)` with ``batch_first=True``, or :math:`(B, C)`
        - pad_mask (optional): :math:`(B, T)` bool, True = padding (:math:`(B,)`, or the official :math:`(B, 1)`,
          for 2-D input). Padding is left out of the forward statistic; the backward's means run over all tokens, as
          in the official code.
        - Output: same shape and dtype as the input

    Examples::

        >>> norm = normlayers.PowerNorm(512, group_num=4, warmup_iters=8000)
        >>> x = torch.randn(20, 8, 512)                     # (T, B, C)
        >>> pad = torch.zeros(8, 20, dtype=torch.bool)      # (B, T), True = padding
        >>> y = norm(x, pad_mask=pad)
    """

    __constants__ = ["num_features", "eps", "alpha_fwd", "alpha_bkw", "affine", "warmup_iters", "group_num",
                     "batch_first", "backward_denominator"]
    num_features: int
    eps: float
    alpha_fwd: float
    alpha_bkw: float
    affine: bool
    warmup_iters: int
    group_num: Optional[int]
    batch_first: bool
    backward_denominator: str

    def __init__(self, num_features: int, eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9,
                 affine: bool = True, warmup_iters: int = 10000, group_num: Optional[int] = 1, *,
                 batch_first: bool = False, backward_denominator: str = "batch",
                 process_group: Optional[Any] = None, sync_stats: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = check_positive_int("num_features", num_features)
        self.eps = check_epsilon("eps", eps)
        self.alpha_fwd = check_unit_interval("alpha_fwd", alpha_fwd)
        self.alpha_bkw = check_unit_interval("alpha_bkw", alpha_bkw)
        self.warmup_iters = check_nonnegative_int("warmup_iters", warmup_iters)
        if group_num is not None:
            group_num = check_positive_int("group_num", group_num)
            if self.num_features % group_num != 0:
                raise ValueError(f"group_num ({group_num}) must divide num_features ({num_features})")
        self.group_num = group_num
        self.backward_denominator = check_backward_denominator(backward_denominator)
        self.batch_first = bool(batch_first)
        self.affine = bool(affine)
        self.sync_stats = bool(sync_stats)
        self.process_group = process_group
        factory_kwargs = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
            self.bias = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_phi", torch.empty(1, self.num_features, 1, 1, **factory_kwargs))
        self.register_buffer("ema_gz", torch.empty(1, self.num_features, 1, 1, **factory_kwargs))
        self.register_buffer("iters", torch.empty(1, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """``running_phi`` 1, ``ema_gz`` 0, ``iters`` 0 (as at construction)."""
        self.running_phi.fill_(1.0)
        self.ema_gz.zero_()
        self.iters.zero_()

    def reset_iters(self) -> None:
        """``iters`` back to 0, so training re-enters warm-up; the statistics are kept (see :func:`reset_iters`)."""
        self.iters.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        text = (f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
                f"affine={self.affine}, warmup_iters={self.warmup_iters}, group_num={self.group_num}")
        if self.batch_first:
            text += ", batch_first=True"
        if self.backward_denominator != "batch":
            text += f", backward_denominator={self.backward_denominator!r}"
        if self.sync_stats:
            text += ", sync_stats=True"
        return text

    def forward(self, input: Tensor, pad_mask: Optional[Tensor] = None) -> Tensor:
        return F.power_norm(input, self.running_phi, self.ema_gz, self.iters, self.weight, self.bias, pad_mask,
                            training=self.training, eps=self.eps, alpha_fwd=self.alpha_fwd,
                            alpha_bkw=self.alpha_bkw, warmup_iters=self.warmup_iters, group_num=self.group_num,
                            batch_first=self.batch_first, backward_denominator=self.backward_denominator,
                            sync_stats=self.sync_stats, process_group=self.process_group)


def reset_iters(model: nn.Module) -> int:
    """Set ``iters`` to 0 in every :class:`PowerNorm` and :class:`~normlayers.UnifiedNorm` of ``model``, so that
    fine-tuning from a checkpoint re-enters warm-up (the Unified Normalization authors' advice, their ``readme.md``);
    running statistics and ring buffers are kept. Returns the number of layers reset."""
    from normlayers.nn.unified_norm import UnifiedNorm

    layers = [m for m in model.modules() if isinstance(m, (PowerNorm, UnifiedNorm))]
    for layer in layers:
        layer.reset_iters()
    return len(layers)
