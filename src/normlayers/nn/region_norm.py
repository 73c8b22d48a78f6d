"""Region Normalization for inpainting networks: :class:`RegionNorm2d` (RN-B, the mask is given) and
:class:`LearnableRegionNorm2d` (RN-L, the regions are learned) (Yu et al., "Region Normalization for Image
Inpainting", AAAI 2020; official code geekyutao/RN, ``rn.py``).

Both keep the official code's parameter names (geekyutao/RN, rn.py ``RN_B`` and ``RN_L``), so the authors'
checkpoints load with ``strict=True``:

* ``RegionNorm2d``: ``foreground_gamma``, ``foreground_beta`` (the hole region), ``background_gamma``,
  ``background_beta`` (the valid region), each ``(C,)``, zero-initialized for the ``(1 + γ)`` form;
* ``LearnableRegionNorm2d``: ``sa.conv1.weight``, ``sa.gamma_conv.weight``, ``sa.gamma_conv.bias``,
  ``sa.beta_conv.weight``, ``sa.beta_conv.bias``.

Neither has buffers: the statistics are always those of the current input, in training and eval alike (the official
``BatchNorm2d(track_running_stats=False)``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from normlayers import functional as F
from normlayers._checks import check_choice, check_finite, check_positive_int, is_int
from normlayers.functional.region_norms import REGION_AFFINES, check_region_options
from normlayers.nn._scripting import NotScriptable

__all__ = ["RegionNorm2d", "LearnableRegionNorm2d"]


def _check_channels(module: nn.Module, input: Tensor) -> None:
    if isinstance(input, Tensor) and input.dim() == 4 and input.shape[1] != module.num_features:
        raise ValueError(f"expected input with {module.num_features} channels (num_features), got input of shape "
                         f"{list(input.shape)}")


_STATS_DOC = """\
        stats (str): ``"batch"``: each region's statistics are pooled over the batch and all positions (the official
            code, BN-style); ``"instance"``: per sample (the paper's RN). Default: ``"batch"``.
        eps_mode (str, optional): ``"official"``: the region's epsilon is ``eps·V/S_r``, ``S_r`` the region's value
            count and ``V`` the values per statistic (``N·H·W``, or ``H·W`` per sample), the official code's
            effective epsilon (docs/region_norm.md); ``"plain"``: ``eps``. Default ``None``: ``"official"`` with
            ``stats="batch"``, ``"plain"`` with ``stats="instance"``.
"""

_KEYWORD_DOC = """\
        process_group, sync_stats (keyword-only): with ``sync_stats=True`` and ``stats="batch"``, in training, with
            ``torch.distributed`` initialized and more than one rank in ``process_group`` (``None``: the world), the
            region statistics are those of the global batch (docs/distributed.md); in eval, as
            :class:`torch.nn.SyncBatchNorm` without running statistics, local. A no-op with ``stats="instance"``.
            Default: ``None``, ``False``.
        device, dtype (keyword-only): factory kwargs for the parameters.
"""


def _with_stats_args(cls: type) -> type:
    """Put the Args entries both classes share where the class docstring says ``<stats_args>`` and
    ``<keyword_args>``."""
    if cls.__doc__ is None:  # python -OO strips docstrings
        return cls
    doc = cls.__doc__.replace("        <stats_args>\n", _STATS_DOC)
    cls.__doc__ = doc.replace("        <keyword_args>\n", _KEYWORD_DOC)
    return cls


@_with_stats_args
class RegionNorm2d(NotScriptable):
    r"""Basic Region Normalization (RN-B) over a 4-D input and a given hole mask (docs/region_norm.md).

    Each channel is standardized separately inside the hole region (mask nonzero, the authors' "foreground") and
    inside the valid region (mask zero), then a region affine in the authors' ``(1 + γ)`` form follows:

    .. math::
        y = \sum_{r \in \{\text{hole}, \text{valid}\}} w_r \cdot \frac{x - \mu_r}{\sqrt{\sigma^2_r + \epsilon_r}}
            \cdot (1 + \gamma_r) + \text{shift}

    with ``w_hole = m``, ``w_valid = 1 − m``, ``μ_r`` and ``σ²_r`` (biased) the region's mean and variance of each
    channel (over the batch or per sample, see ``stats``), and ``shift = Σ_r w_r·β_r`` (``affine="masked"``, each
    region its own shift) or ``β_hole + β_valid`` at every pixel (``affine="official"``: the official code adds both
    betas unmasked, so only the scale is region-specific). An empty region (an all-hole or hole-free mask, frequent
    after down-sampling) contributes exactly 0; the other region then makes the layer BatchNorm (InstanceNorm).

    The mask is resized to the input's size by nearest interpolation (as the official code), and gets no gradient.
    Statistics are computed in fp32 (fp64 for fp64 input); the output has the input's dtype. The layer has no buffers
    and uses the current input's statistics in eval too. On CUDA it runs on Triton kernels (masked region moments,
    a fused normalize + region-affine pass, and their backward; see docs/region_norm.md), elsewhere on the
    plain-PyTorch reference (see :mod:`normlayers.backends`).

    Args:
        num_features (int): ``C``, the channels of the input.
        eps (float): a positive number added to each region's variance (see ``eps_mode``). Default: ``1e-5``.
        <stats_args>
        affine (str, optional): ``"masked"``, ``"official"`` (the authors' code: unmasked betas) or ``None`` (no
            parameters). Default: ``"masked"``.
        <keyword_args>

    Shape:
        - Input: :math:`(N, C, H, W)`; mask: :math:`(N, 1, H', W')` or :math:`(N, C, H', W')`, bool or numeric,
          **nonzero = hole**
        - Output: :math:`(N, C, H, W)` (same shape and dtype as the input)

    Examples::

        >>> norm = normlayers.RegionNorm2d(64)
        >>> x = torch.randn(4, 64, 32, 32)
        >>> holes = torch.rand(4, 1, 256, 256) > 0.8          # full-resolution mask, 1 = hole
        >>> y = norm(x, holes)
        >>> authors = normlayers.RegionNorm2d(64, affine="official")   # the official RN_B
    """

    __constants__ = ["num_features", "eps", "stats", "eps_mode", "affine"]
    num_features: int
    eps: float
    stats: str
    eps_mode: str
    affine: Optional[str]

    def __init__(self, num_features: int, eps: float = 1e-5, stats: str = "batch", eps_mode: Optional[str] = None,
                 affine: Optional[str] = "masked", *, process_group: Optional[Any] = None, sync_stats: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = check_positive_int("num_features", num_features)
        self.eps, self.stats, self.eps_mode = check_region_options(eps, stats, eps_mode)
        self.affine = None if affine is None else check_choice("affine", affine, REGION_AFFINES)
        self.sync_stats = bool(sync_stats)
        self.process_group = process_group
        factory_kwargs = {"device": device, "dtype": dtype}
        if self.affine is not None:
            self.foreground_gamma = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
            self.foreground_beta = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
            self.background_gamma = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
            self.background_beta = nn.Parameter(torch.empty(self.num_features, **factory_kwargs))
        else:
            for name in ("foreground_gamma", "foreground_beta", "background_gamma", "background_beta"):
                self.register_parameter(name, None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """All four parameters to zero: the ``(1 + γ)`` form starts as the identity affine (the official init)."""
        if self.affine is not None:
            for p in (self.foreground_gamma, self.foreground_beta, self.background_gamma, self.background_beta):
                nn.init.zeros_(p)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, stats={self.stats!r}, eps_mode={self.eps_mode!r}, " \
               f"affine={self.affine!r}" + (", sync_stats=True" if self.sync_stats else "")

    def forward(self, input: Tensor, mask: Tensor) -> Tensor:
        _check_channels(self, input)
        return F.region_norm(input, mask, self.foreground_gamma, self.foreground_beta, self.background_gamma,
                             self.background_beta, self.eps, self.stats, eps_mode=self.eps_mode,
                             affine=self.affine or "masked", sync_stats=self.sync_stats and self.training,
                             process_group=self.process_group)


class _SelfAwareAffine(nn.Module):
    """The official ``SelfAware_Affine`` (rn.py L71-95) under its names, holding RN-L's three convs (submodule
    ``sa``). It holds parameters only: the layer runs in :func:`normlayers.functional.learnable_region_norm`."""

    def __init__(self, kernel_size: int, device=None, dtype=None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=padding, bias=False, **factory_kwargs)
        self.gamma_conv = nn.Conv2d(1, 1, kernel_size, padding=padding, **factory_kwargs)
        self.beta_conv = nn.Conv2d(1, 1, kernel_size, padding=padding, **factory_kwargs)

    def reset_parameters(self) -> None:
        for conv in (self.conv1, self.gamma_conv, self.beta_conv):
            conv.reset_parameters()


@_with_stats_args
class LearnableRegionNorm2d(NotScriptable):
    r"""Learnable Region Normalization (RN-L) over a 4-D input: the regions come from the input itself (rn.py ``RN_L``).

    A spatial response map from the channel mean and max, thresholded into a region mask, region normalization
    without region affine, then a learned *spatial* affine from the same map (the official ``RN_L``):

    .. math::
        s = \mathrm{sigmoid}(\mathrm{conv_1}([\mathrm{mean}_c(x), \max_c(x)])), \quad
        M = [s \ge \text{threshold}], \quad
        y = \mathrm{RN}(x; M) \cdot (1 + \mathrm{conv}_\gamma(s)) + \mathrm{conv}_\beta(s)

    ``RN`` is :class:`RegionNorm2d`'s normalization with ``M = 1`` as the "hole" region. No gradient flows through
    the threshold: ``conv1`` learns through ``γ`` and ``β`` only, as in the official code. The convs are ``k × k``,
    keep the spatial size, and map 2 → 1, 1 → 1, 1 → 1 channels; ``γ`` and ``β`` broadcast over channels.
    The layer has no buffers and uses the current input's statistics in eval too. On CUDA it runs fused: two Triton
    kernels forward (the channel pooling, response map and region statistics; the normalization with the spatial
    affine; the convs computed inside the kernels) and four backward (docs/region_norm.md).

    Args:
        num_features (int): ``C``, the channels of the input.
        threshold (float): the region threshold on ``s``. Default: ``0.8``.
        kernel_size (int): ``k``, odd (the official code allows 7 and 3). Default: ``7``.
        eps (float): a positive number added to each region's variance (see ``eps_mode``). Default: ``1e-5``.
        <stats_args>
        <keyword_args>

    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: :math:`(N, C, H, W)` (same shape and dtype)

    Examples::

        >>> norm = normlayers.LearnableRegionNorm2d(256)
        >>> y = norm(torch.randn(2, 256, 64, 64))
    """

    __constants__ = ["num_features", "threshold", "kernel_size", "eps", "stats", "eps_mode"]
    num_features: int
    threshold: float
    kernel_size: int
    eps: float
    stats: str
    eps_mode: str

    def __init__(self, num_features: int, threshold: float = 0.8, kernel_size: int = 7, eps: float = 1e-5,
                 stats: str = "batch", eps_mode: Optional[str] = None, *, process_group: Optional[Any] = None,
                 sync_stats: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = check_positive_int("num_features", num_features)
        self.threshold = check_finite("threshold", threshold)
        if not is_int(kernel_size) or kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int (the official code allows 7 and 3), got "
                             f"{kernel_size!r}")
        self.kernel_size = int(kernel_size)
        self.eps, self.stats, self.eps_mode = check_region_options(eps, stats, eps_mode)
        self.sync_stats = bool(sync_stats)
        self.process_group = process_group
        self.sa = _SelfAwareAffine(self.kernel_size, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """PyTorch's default Conv2d initialization for the three convs (the official code's)."""
        self.sa.reset_parameters()

    def extra_repr(self) -> str:
        return f"{self.num_features}, threshold={self.threshold}, kernel_size={self.kernel_size}, eps={self.eps}, " \
               f"stats={self.stats!r}, eps_mode={self.eps_mode!r}" + (", sync_stats=True" if self.sync_stats else "")

    def forward(self, input: Tensor) -> Tensor:
        _check_channels(self, input)
        sa = self.sa
        return F.learnable_region_norm(input, sa.conv1.weight, sa.gamma_conv.weight, sa.gamma_conv.bias,
                                       sa.beta_conv.weight, sa.beta_conv.bias, self.threshold, self.eps, self.stats,
                                       eps_mode=self.eps_mode, sync_stats=self.sync_stats and self.training,
                                       process_group=self.process_group)
