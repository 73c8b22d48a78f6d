"""Batch-Channel Normalization: :class:`BatchChannelNorm2d` (Qiao et al., "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization", arXiv 1903.10520).

The module keeps the official code's parameter and buffer names (BCN README ``BCNorm``/``EstBN``), so the authors'
checkpoints load with ``strict=True``:

* ``weight``, ``bias``: the per-group affine, shape ``(1, G, 1)``;
* ``bn.weight``, ``bn.bias``, ``bn.running_mean``, ``bn.running_var``, ``bn.num_batches_tracked``: the batch stage;
* ``bn.estbn_moving_speed``: EstBN's update rate, only with ``estimate=True``.

The ImageNet models of the same repository name the batch stage ``pbn``; those keys are read as ``bn``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from normlayers import functional as F
from normlayers._checks import check_positive_epsilon, check_positive_int, check_unit_interval
from normlayers.nn._adopt import adopt, fill_missing
from normlayers.nn._scripting import NotScriptable

__all__ = ["BatchChannelNorm2d"]


class _BatchStage(nn.Module):
    """The state of BCN's batch stage under the official names (the submodule ``bn``): per-channel affine and running
    statistics, plus EstBN's ``estbn_moving_speed`` when ``estimate``. It holds state only: the whole layer runs in
    :func:`normlayers.functional.batch_channel_norm`, so that a kernel can fuse both stages."""

    def __init__(self, num_channels: int, estimate: bool, estimate_rate: float, device=None, dtype=None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_channels = num_channels
        self.estimate = estimate
        self.estimate_rate = estimate_rate
        self.weight = nn.Parameter(torch.empty(num_channels, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(num_channels, **factory_kwargs))
        self.register_buffer("running_mean", torch.empty(num_channels, **factory_kwargs))
        self.register_buffer("running_var", torch.empty(num_channels, **factory_kwargs))
        # Never advanced in EstBN mode, kept there for checkpoint compatibility (as the official ``EstBN``).
        self.register_buffer("num_batches_tracked", torch.empty((), dtype=torch.long, device=device))
        if estimate:
            # A buffer, not a Python float, because the official checkpoints store the rate (shape (1,)).
            self.register_buffer("estbn_moving_speed", torch.empty(1, **factory_kwargs))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.estimate:
            self.estbn_moving_speed.fill_(self.estimate_rate)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, estimate={self.estimate}"


class BatchChannelNorm2d(NotScriptable):
    r"""Batch-Channel Normalization (BCN) over a 4-D input, for micro-batch CNN training (docs/batch_channel.md).

    A batch stage (BatchNorm, or its estimated-statistics variant EstBN), then a per-sample group standardization
    (GroupNorm without affine) and a per-*group* affine:

    .. math::
        u = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon_{bn}}} \cdot \gamma^{bn}_c + \beta^{bn}_c, \qquad
        y = \frac{u - \mathrm{E}_{n,g}[u]}{\sqrt{\mathrm{Var}_{n,g}[u] + \epsilon}} \cdot \gamma_g + \beta_g

    * ``estimate=False`` (default): ``(μ_c, σ²_c)`` are the batch mean and biased variance over ``(N, H, W)`` in
      training, and ``running_mean``/``running_var`` in eval, exactly as :class:`torch.nn.BatchNorm2d` (running
      variance updated with the unbiased batch variance at ``momentum``).
    * ``estimate=True`` (EstBN): ``(μ_c, σ²_c)`` are running *estimates*. In training they are first
      moved towards the batch, outside autograd, at the rate ``r`` held in the buffer ``bn.estbn_moving_speed``:
      ``μ ← (1 − r)·μ + r·E[x]``, ``σ² ← (1 − r)·σ² + r·E[(x − μ_old)²]``; the updated values normalize the batch.
      Train and eval give the same output for the same buffers; no batch statistic enters the gradient.

    The group stage (``E_{n,g}``, ``Var_{n,g}``, biased) runs over each sample's ``C/G`` contiguous channels and all
    positions, in training and eval alike. All statistics are computed in fp32 (fp64 for fp64 input); the output has
    the input's dtype. On CUDA the layer runs on Triton kernels (two per-plane ops, forward and backward; see
    docs/batch_channel.md), elsewhere on the plain-PyTorch reference (see :mod:`normlayers.backends`).

    Args:
        num_channels (int): ``C``, the channels of the input.
        num_groups (int): ``G``, the groups of the channel stage; must divide ``num_channels``. Default: ``32``.
        eps (float): the channel (group) stage's epsilon (the official ``eps``). Default: ``1e-5``.
        momentum (float, optional): the batch stage's running-statistics rate, as :class:`torch.nn.BatchNorm2d`;
            ``None`` is a cumulative average. Unused with ``estimate=True``. Default: ``0.1``.
        estimate (bool): EstBN instead of BatchNorm in the batch stage. Default: ``False``.
        estimate_rate (float): EstBN's initial ``estbn_moving_speed``. The official default ``0.0`` freezes the
            estimates at their loaded (or initial ``0``/``1``) values: load them from a large-batch checkpoint or set a
            rate. Default: ``0.0``.
        bn_eps (float): the batch stage's epsilon (fixed at ``1e-5`` in the official code). Default: ``1e-5``.
        process_group, sync_stats (keyword-only): ``sync_stats=True`` takes the batch stage's statistics over the
            global batch of ``process_group`` (default: the world) in training when ``torch.distributed`` is
            initialized with more than one rank (:mod:`normlayers.distributed`; :func:`normlayers.convert_sync` sets
            it on a whole model). Default: ``False``.
        device, dtype (keyword-only): factory kwargs for the parameters and buffers.

    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: :math:`(N, C, H, W)` (same shape, dtype, and channels-last format when the input has it)

    Examples::

        >>> norm = normlayers.BatchChannelNorm2d(64)                 # 32 groups
        >>> y = norm(torch.randn(2, 64, 56, 56))
        >>> est = normlayers.BatchChannelNorm2d(48, num_groups=16, estimate=True, estimate_rate=0.01)
        >>> y = est(torch.randn(1, 48, 7, 7))                        # batch 1: estimated statistics
    """

    __constants__ = ["num_channels", "num_groups", "eps", "momentum", "estimate", "estimate_rate", "bn_eps"]
    num_channels: int
    num_groups: int
    eps: float
    momentum: Optional[float]
    estimate: bool
    estimate_rate: float
    bn_eps: float

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 estimate: bool = False, estimate_rate: float = 0.0, bn_eps: float = 1e-5, *,
                 process_group: Optional[Any] = None, sync_stats: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.num_channels = check_positive_int("num_channels", num_channels)
        self.num_groups = check_positive_int("num_groups", num_groups)
        if self.num_channels % self.num_groups != 0:
            raise ValueError(f"num_groups ({num_groups}) must divide num_channels ({num_channels}): each group holds "
                             f"num_channels / num_groups contiguous channels")
        self.momentum = None if momentum is None else check_unit_interval("momentum", momentum)
        self.estimate_rate = check_unit_interval("estimate_rate", estimate_rate)
        self.eps = check_positive_epsilon("eps", eps)
        self.bn_eps = check_positive_epsilon("bn_eps", bn_eps)
        self.estimate = bool(estimate)
        self.sync_stats = bool(sync_stats)
        self.process_group = process_group
        factory_kwargs = {"device": device, "dtype": dtype}
        self.bn = _BatchStage(self.num_channels, self.estimate, self.estimate_rate, **factory_kwargs)
        self.weight = nn.Parameter(torch.empty(1, self.num_groups, 1, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(1, self.num_groups, 1, **factory_kwargs))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (the EstBN rate is left alone)."""
        self.bn.reset_running_stats()

    def reset_parameters(self) -> None:
        """Running statistics reset, both affines to identity (ones/zeros), EstBN's rate back to ``estimate_rate``."""
        self.bn.reset_parameters()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        text = f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}"
        if self.estimate:
            text += f", estimate=True, estimate_rate={self.estimate_rate}, bn_eps={self.bn_eps}"
        else:
            text += f", momentum={self.momentum}, bn_eps={self.bn_eps}"
        return text + (", sync_stats=True" if self.sync_stats else "")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # The official ImageNet models (imagenet/models/layers.py, class GN) name the batch stage "pbn".
        for key in [k for k in state_dict if k.startswith(prefix + "pbn.")]:
            state_dict[prefix + "bn." + key[len(prefix + "pbn."):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        bn = self.bn
        return F.batch_channel_norm(
            input, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.weight, self.bias,
            training=self.training, momentum=self.momentum, eps=self.eps, num_groups=self.num_groups,
            bn_eps=self.bn_eps, estimate=self.estimate,
            estimate_rate=bn.estbn_moving_speed if self.estimate else 0.0,
            num_batches_tracked=bn.num_batches_tracked, sync_stats=self.sync_stats, process_group=self.process_group)

    # BCN changes a BatchNorm's function (a group stage follows): normlayers.replace_norms swaps one only when its
    # mapping asks, and does not compare outputs.
    conversion_fidelity: ClassVar[str] = "changes"

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> "BatchChannelNorm2d":
        """A BCN whose batch stage is ``module``, an :class:`torch.nn.BatchNorm2d` with ``affine=True`` and
        ``track_running_stats=True``: it holds the BatchNorm's very parameter and buffer objects as ``bn.*`` (its
        ``momentum`` and ``eps`` become ``momentum`` and ``bn_eps``), and the group affine starts at identity.
        ``kwargs`` are the other constructor arguments (``num_groups``, ...)."""
        if type(module) is not nn.BatchNorm2d or not (module.affine and module.track_running_stats):
            raise TypeError(f"BatchChannelNorm2d adopts an nn.BatchNorm2d with affine=True and "
                            f"track_running_stats=True as its batch stage; got {module!r}")
        with torch.device("meta"):
            new = cls(module.num_features, **{"momentum": module.momentum, "bn_eps": module.eps, **kwargs})
        adopt(new, module, {f"bn.{name}": name for name in
                            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
        initial = {"weight": 1.0, "bias": 0.0}
        if new.estimate:
            initial["bn.estbn_moving_speed"] = new.estimate_rate
        fill_missing(new, module, initial)
        return new
