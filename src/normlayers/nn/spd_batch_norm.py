"""SPD-manifold batch normalization under the Generalized Bures–Wasserstein geometry: :class:`SPDBatchNorm` (GBWBN;
Wang et al., CVPR 2025, arXiv 2504.00660; the authors' code github.com/jjscc/GBWBN).

Parameter names follow the authors' ``BatchNormSPD`` (``GBWBN_SPDNet/spd/nn.py``): ``weight`` is the SPD *bias* ``W``
and ``shift`` the scalar *dispersion* ``s``; ``metric`` is their ``M``. ``running_mean``/``running_var`` are registered
buffers (the authors keep the first as a plain attribute and the second as a never-stepped ``Parameter``;
docs/spd_batch_norm.md, Q7).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normlayers import functional as F
from normlayers._checks import (
    check_choice,
    check_epsilon,
    check_nonnegative_int,
    check_positive_int,
    check_unit_interval,
    is_real,
)
from normlayers.reference import spd_linalg
from normlayers.reference.spd_batch_norm import VARIANCES
from normlayers.nn._scripting import NotScriptable

__all__ = ["SPDBatchNorm", "SymmetricExp"]

PARAMETRIZATIONS = ("expm", "geoopt")
# The authors' bias init I + diag(1e-7·k): the jitter separates the eigenvalues, which their SVD-autograd transport
# needs. Ours does not (closed-form divided differences), but the init is kept for parity.
_BIAS_JITTER = 1e-7


class SymmetricExp(nn.Module):
    """The parametrization ``W = exp(S)``, ``S`` symmetric: any ``S`` an ordinary optimizer reaches gives an SPD ``W``.

    Computed in fp64 by :func:`normlayers.reference.spd_linalg.expm` (exact divided-difference backward, finite at
    ``S = 0``), returned in ``S``'s dtype. ``right_inverse`` (the matrix log) lets ``module.weight = spd_matrix`` work.
    """

    def forward(self, log_value: Tensor) -> Tensor:
        return spd_linalg.expm(log_value.to(torch.float64)).to(log_value.dtype)

    def right_inverse(self, value: Tensor) -> Tensor:
        return spd_linalg.logm(value.to(torch.float64)).to(value.dtype)


class SPDBatchNorm(NotScriptable):
    r"""Batch normalization of symmetric positive definite matrices under the (θ, M)-Generalized Bures–Wasserstein
    metric (GBWBN; docs/spd_batch_norm.md), for covariance-matrix networks (SPDNet family).

    The metric is the BW metric pulled back by :math:`\varphi(X) = M^{-1/2} X^\theta M^{-1/2}` (scaled by
    :math:`1/\theta^2`). In those coordinates, with :math:`B` the batch barycenter and :math:`v` the batch dispersion:

    .. math::
        Y_i = \mathrm{Exp}_{\tilde W}\Big(\Gamma_{I\to\tilde W}\,\frac{s}{\sqrt{v + \epsilon}}\,
              \Gamma_{B\to I}\,\mathrm{Log}_B\,\varphi(X_i)\Big), \qquad
        \mathrm{out}_i = \varphi^{-1}(Y_i) = (M^{1/2} Y_i M^{1/2})^{1/\theta}

    with the exact BW Log/Exp maps and parallel transports, :math:`\tilde W = \varphi(W)`.

    * Training: :math:`B` is the BW barycenter of the batch, ``karcher_steps`` fixed-point steps from the arithmetic
      mean (1 in the authors' code; ≥ 3 is essentially exact, docs/spd_batch_norm.md); ``variance="frechet"`` takes
      :math:`v = \frac{1}{\theta^2}\mathrm{mean}_i\, d^2(\varphi(X_i), B)`, so a converged output has barycenter
      :math:`\tilde W` and dispersion :math:`s^2`; ``variance="reference"`` takes the authors'
      :math:`\frac{1}{\theta^2}\mathrm{mean}_i\, d^2(\varphi(X_i), I)` (docs/spd_batch_norm.md, Q1). Both are
      detached, as in the authors' code. ``running_mean`` moves along the BW geodesic towards :math:`B` by ``momentum``,
      ``running_var`` by the usual exponential average.
    * Eval: ``running_mean``/``running_var`` replace :math:`(B, v)`; nothing is updated.

    The SPD parameters stay SPD under any torch optimizer: ``weight`` and ``metric`` are ``exp`` of a symmetric matrix
    (:class:`SymmetricExp`, registered with :mod:`torch.nn.utils.parametrize`), or, with
    ``parametrization="geoopt"``, geoopt ``ManifoldParameter``\ s on its SPD manifold (for geoopt's Riemannian
    optimizers, as the authors' RResNet code). Parameter-side eigendecompositions run in float64; per-sample ones in
    ``compute_dtype`` (float64 unless asked otherwise), and the output has the input's dtype. All matrix functions
    use ``torch.linalg.eigh`` with closed-form divided-difference backwards
    (:mod:`normlayers.reference.spd_linalg`), batched with no Python loop.

    Args:
        num_features (int): ``n``, the matrix size.
        channels (int, optional): ``None`` pools the statistics over every leading dim and shares ``W``, ``M``,
            ``s`` (the authors' behaviour); ``C`` keeps per-channel statistics, ``weight`` and ``shift`` for input
            ``(*, C, n, n)`` (LieBN-style), with one shared ``metric``. Default: ``None``.
        momentum (float): the running-statistics rate. Default: ``0.1``.
        eps (float): added to the dispersion. Default: ``1e-5``.
        theta (float): the power deformation θ (fixed, not learned; non-zero). Default: ``1.0``.
        learn_metric (bool): learn ``M`` (GBW). ``False`` fixes ``M = I``: the plain BW metric, and ``metric`` is
            ``None``. Default: ``True``.
        variance (str): ``"frechet"`` or ``"reference"``. Default: ``"frechet"``.
        karcher_steps (int): barycenter fixed-point steps. Default: ``1``.
        reference_roundtrip (bool): reproduce the authors' Exp_I/Log_I round trip, which takes a matrix absolute
            value where the BW Exp map leaves its domain (docs/spd_batch_norm.md, Q4). Default: ``False``.
        parametrization (str): ``"expm"`` or ``"geoopt"`` (needs geoopt installed). Default: ``"expm"``.
        compute_dtype (torch.dtype, optional): dtype of the per-sample eigendecompositions; ``None`` is the input's.
            float64 by default (the authors' dtype): fp32 eigendecompositions lose the
            small eigenvalues of ill-conditioned inputs. Default: ``torch.float64``.
        process_group, sync_stats (keyword-only): with ``sync_stats=True``, in training, with ``torch.distributed``
            initialized and more than one rank in ``process_group`` (``None``: the world), the barycenter and the
            dispersion are the global batch's: every Karcher step's sum of square roots (and the start's and the
            dispersion's sums) is all-reduced and divided by the global count; the running buffers agree on all
            ranks (docs/distributed.md). Default: ``None``, ``False``.
        device, dtype (keyword-only): factory kwargs for the parameters and buffers.

    Shape:
        - Input: :math:`(*, n, n)` with at least one batch dim, or :math:`(*, C, n, n)` with ``channels=C``;
          SPD, float32 or float64.
        - Output: same shape and dtype, SPD.

    Examples::

        >>> bn = normlayers.SPDBatchNorm(12)
        >>> a = torch.randn(30, 12, 20)
        >>> x = a @ a.mT / 20 + 1e-3 * torch.eye(12)        # 30 covariance matrices
        >>> y = bn(x)
        >>> bn_c = normlayers.SPDBatchNorm(8, channels=4, theta=0.5)
        >>> y = bn_c(torch.eye(8).repeat(16, 4, 1, 1) + 0.1 * torch.rand(16, 4, 1, 1) * torch.eye(8))
    """

    __constants__ = ["num_features", "channels", "momentum", "eps", "theta", "learn_metric", "variance",
                     "karcher_steps", "reference_roundtrip", "parametrization", "compute_dtype"]
    num_features: int
    channels: Optional[int]
    momentum: float
    eps: float
    theta: float
    learn_metric: bool
    variance: str
    karcher_steps: int
    reference_roundtrip: bool
    parametrization: str
    compute_dtype: Optional[torch.dtype]

    def __init__(self, num_features: int, *, channels: Optional[int] = None, momentum: float = 0.1,
                 eps: float = 1e-5, theta: float = 1.0, learn_metric: bool = True, variance: str = "frechet",
                 karcher_steps: int = 1, reference_roundtrip: bool = False, parametrization: str = "expm",
                 compute_dtype: Optional[torch.dtype] = torch.float64, process_group: Optional[Any] = None,
                 sync_stats: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = check_positive_int("num_features", num_features)
        self.channels = None if channels is None else check_positive_int("channels", channels)
        self.momentum = check_unit_interval("momentum", momentum)
        self.eps = check_epsilon("eps", eps)
        if not is_real(theta) or theta == 0 or not math.isfinite(theta):
            raise ValueError(f"theta must be a finite non-zero number, got {theta!r}")
        self.theta = float(theta)
        self.variance = check_choice("variance", variance, VARIANCES)
        self.karcher_steps = check_nonnegative_int("karcher_steps", karcher_steps)
        check_choice("parametrization", parametrization, PARAMETRIZATIONS)
        if compute_dtype not in (None, torch.float32, torch.float64):
            raise TypeError(f"compute_dtype must be torch.float64, torch.float32 or None, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        self.learn_metric = bool(learn_metric)
        self.reference_roundtrip = bool(reference_roundtrip)
        self.parametrization = parametrization
        self.sync_stats = bool(sync_stats)
        self.process_group = process_group

        factory_kwargs = {"device": device, "dtype": dtype}
        n = self.num_features
        group_shape = () if self.channels is None else (self.channels,)
        self.register_buffer("running_mean", torch.empty(*group_shape, n, n, **factory_kwargs))
        self.register_buffer("running_var", torch.empty(group_shape, **factory_kwargs))
        self.shift = nn.Parameter(torch.empty(group_shape, **factory_kwargs))
        self.weight = self._spd_parameter((*group_shape, n, n), factory_kwargs)
        if self.learn_metric:
            self.metric = self._spd_parameter((n, n), factory_kwargs)
        else:
            self.register_parameter("metric", None)
        if parametrization == "expm":
            parametrize.register_parametrization(self, "weight", SymmetricExp())
            if self.learn_metric:
                parametrize.register_parametrization(self, "metric", SymmetricExp())
        self.reset_parameters()

    def _spd_parameter(self, shape: tuple[int, ...], factory_kwargs: dict) -> nn.Parameter:
        # Initialized to the identity so that the parametrization's right_inverse (log) sees an SPD matrix.
        eye = torch.eye(shape[-1], **factory_kwargs).expand(shape).clone()
        if self.parametrization == "expm":
            return nn.Parameter(eye)
        try:
            import geoopt
        except ImportError as error:
            raise ImportError("parametrization='geoopt' needs geoopt (pip install geoopt); the default 'expm' "
                              "works with any torch optimizer") from error
        return geoopt.ManifoldParameter(eye, manifold=geoopt.SymmetricPositiveDefinite())

    def _set_spd_(self, name: str, eigenvalues: Tensor) -> None:
        """Sets the SPD parameter ``name`` to ``diag(eigenvalues)`` (through its log under the parametrization)."""
        if self.parametrization == "expm":
            original = getattr(self.parametrizations, name).original
            original.copy_(torch.diag_embed(eigenvalues.log().to(original.dtype)).expand_as(original))
        else:
            param = getattr(self, name)
            param.copy_(torch.diag_embed(eigenvalues.to(param.dtype)).expand_as(param))

    def reset_running_stats(self) -> None:
        """Running mean the identity, running dispersion 1."""
        with torch.no_grad():
            self.running_mean.copy_(torch.eye(self.num_features, dtype=self.running_mean.dtype,
                                              device=self.running_mean.device).expand_as(self.running_mean))
            self.running_var.fill_(1.0)

    def reset_parameters(self) -> None:
        """Running statistics reset; ``weight`` = I + diag(1e-7·(1, …, n)) (the authors' init), ``metric`` = I,
        ``shift`` = 1."""
        self.reset_running_stats()
        device = self.running_mean.device
        jitter = 1 + _BIAS_JITTER * torch.arange(1, self.num_features + 1, dtype=torch.float64, device=device)
        with torch.no_grad():
            self._set_spd_("weight", jitter)
            if self.learn_metric:
                self._set_spd_("metric", torch.ones(self.num_features, dtype=torch.float64, device=device))
            self.shift.fill_(1.0)

    def extra_repr(self) -> str:
        text = f"{self.num_features}"
        if self.channels is not None:
            text += f", channels={self.channels}"
        text += (f", momentum={self.momentum}, eps={self.eps}, theta={self.theta}, learn_metric={self.learn_metric}, "
                 f"variance={self.variance!r}, karcher_steps={self.karcher_steps}")
        if self.reference_roundtrip:
            text += ", reference_roundtrip=True"
        if self.parametrization != "expm":
            text += f", parametrization={self.parametrization!r}"
        if self.compute_dtype != torch.float64:
            text += f", compute_dtype={self.compute_dtype}"
        if self.sync_stats:
            text += ", sync_stats=True"
        return text

    def forward(self, input: Tensor) -> Tensor:
        return F.spd_batch_norm(input, self.running_mean, self.running_var, self.weight, self.metric, self.shift,
                                training=self.training, momentum=self.momentum, eps=self.eps, theta=self.theta,
                                variance=self.variance, karcher_steps=self.karcher_steps,
                                reference_roundtrip=self.reference_roundtrip, compute_dtype=self.compute_dtype,
                                sync_stats=self.sync_stats, process_group=self.process_group)
