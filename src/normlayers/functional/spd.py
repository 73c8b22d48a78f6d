"""Functional SPD batch normalization (Generalized Bures–Wasserstein)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from normlayers._checks import (
    check_choice,
    check_epsilon,
    check_float_tensor,
    check_nonnegative_int,
    check_running_stats_without_grad,
    check_same_device,
    check_unit_interval,
    is_real,
)
from normlayers._dtensor import is_dtensor, run_on_local_shards
from normlayers.backends import tier
from normlayers.cpu import spd as _cpu_spd
from normlayers.distributed import all_reduce_sum, sync_group
from normlayers.reference import spd_batch_norm as _ref_spd

__all__ = ["spd_batch_norm"]


def _spd_check_matrices(input: Tensor) -> None:
    """Eager-mode value checks of an SPD batch (one host sync; skipped under torch.compile and on meta tensors).

    Asymmetry up to ``sqrt(finfo.eps)`` relative to the largest entry is accepted (rounding in an upstream BiMap
    ``WᵀXW``) and the layer symmetrizes; more is an error. Positive definiteness is checked on fp64 eigenvalues, which
    resolve every SPD matrix of condition number below ~1e15. (Not ``cholesky_ex``: its ``tril`` opens an OpenMP
    parallel region, which on a busy 2-core CPU took 7–15 ms per call for a (4, 2, 3, 3) batch against 0.01 ms for
    ``eigvalsh``; with one thread Cholesky is 2.5 µs and eigvalsh 14 µs.)
    """
    if input.is_meta or torch.compiler.is_compiling() or input.numel() == 0:
        return
    with torch.no_grad():
        scale = input.abs().amax((-2, -1)).clamp_min(torch.finfo(input.dtype).tiny)
        asymmetry = (input - input.mT).abs().amax((-2, -1)) / scale
        finite = torch.isfinite(input).all()
        not_pd = torch.linalg.eigvalsh(torch.where(finite, input, 1.0).to(torch.float64)).amin(-1) <= 0
        bad = torch.stack([(asymmetry > torch.finfo(input.dtype).eps ** 0.5).any(), not_pd.any(),
                           ~finite]).tolist()
    if bad[2]:
        raise ValueError("input must be finite SPD matrices, got NaN or inf entries")
    if bad[0]:
        raise ValueError(f"input must be symmetric matrices: the largest relative asymmetry |X − Xᵀ|/|X| is "
                         f"{asymmetry.max().item():.3g} (more than rounding)")
    if bad[1]:
        raise ValueError(f"input must be symmetric positive definite: {int(not_pd.sum())} of the "
                         f"{not_pd.numel()} matrices have a non-positive eigenvalue")


def _check_spd_batch_norm_args(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                               weight: Optional[Tensor], metric: Optional[Tensor], shift: Optional[Tensor],
                               training: bool, momentum: float, eps: float, theta: float, variance: str,
                               karcher_steps: int, compute_dtype: Optional[torch.dtype], synced: bool) -> bool:
    """Validates the arguments of :func:`spd_batch_norm`; returns whether the state is per channel."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"input must be float32 or float64 (eigendecompositions need them), got {input.dtype}")
    if input.dim() < 3 or input.shape[-1] != input.shape[-2]:
        raise ValueError(f"input must be a batch of square matrices (*, n, n) with at least one batch dim, got shape "
                         f"{list(input.shape)}")
    n = input.shape[-1]
    tensors = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "metric": metric,
               "shift": shift}
    for name, t in tensors.items():
        if t is not None:
            check_float_tensor(name, t)
            check_same_device(name, t, input)
    matrix_state = [t for t in (running_mean, weight) if t is not None]
    per_channel = any(t.dim() == 3 for t in matrix_state) or any(
        t is not None and t.dim() == 1 for t in (running_var, shift))
    if per_channel:
        if input.dim() < 4:
            raise ValueError(f"per-channel state needs input of shape (*, C, n, n) with a batch dim, got shape "
                             f"{list(input.shape)}")
        channels = input.shape[-3]
        matrix_shape, scalar_shape = (channels, n, n), (channels,)
        layout = f"per-channel state for input (*, C, n, n) = {list(input.shape)}"
    else:
        matrix_shape, scalar_shape = (n, n), ()
        layout = f"statistics pooled over all leading dims of input {list(input.shape)}"
    for name, t, expected in (("running_mean", running_mean, matrix_shape), ("weight", weight, matrix_shape),
                              ("running_var", running_var, scalar_shape), ("shift", shift, scalar_shape)):
        if t is not None and tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape {list(expected)} ({layout}), got {list(t.shape)}")
    if metric is not None and tuple(metric.shape) not in ((n, n), matrix_shape):
        raise ValueError(f"metric must have shape {[n, n]} or {list(matrix_shape)} ({layout}), got "
                         f"{list(metric.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if running_mean is None and not training:
        raise ValueError("running_mean and running_var are required in eval mode (training=False)")
    samples = input.numel() // (n * n * (input.shape[-3] if per_channel else 1)) if input.numel() else 0
    # With synced statistics only the global count matters, and reading it would be a host sync: not checked.
    if training and samples < 2 and not synced:
        raise ValueError(f"Expected more than 1 matrix per statistics group when training (input of shape "
                         f"{list(input.shape)}): the batch dispersion of one matrix is 0; use eval mode")
    check_unit_interval("momentum", momentum)
    check_epsilon("eps", eps)
    check_running_stats_without_grad(training, running_mean=running_mean, running_var=running_var)
    if not is_real(theta) or theta == 0 or not math.isfinite(theta):
        raise ValueError(f"theta must be a finite non-zero number (the power deformation X^theta), got {theta!r}")
    check_choice("variance", variance, _ref_spd.VARIANCES)
    check_nonnegative_int("karcher_steps", karcher_steps)
    if compute_dtype not in (None, torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be torch.float64, torch.float32 or None (the input's), got "
                        f"{compute_dtype!r}")
    _spd_check_matrices(input)
    return per_channel


def spd_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, metric: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *, theta: float = 1.0,
                   variance: str = "frechet", karcher_steps: int = 1, reference_roundtrip: bool = False,
                   compute_dtype: Optional[torch.dtype] = torch.float64, sync_stats: bool = False,
                   process_group: Optional[Any] = None) -> Tensor:
    r"""SPD batch normalization under the (θ, M)-Generalized Bures–Wasserstein geometry (GBWBN; Wang et
    al., CVPR 2025, arXiv 2504.00660). In the deformed coordinates :math:`\tilde X = M^{-1/2} X^\theta M^{-1/2}`:

    .. math::
        Y_i = \mathrm{Exp}_{\tilde W}\Big(\Gamma_{I\to\tilde W}\,\frac{s}{\sqrt{v + \epsilon}}\,
              \Gamma_{B\to I}\,\mathrm{Log}_B \tilde X_i\Big), \qquad
        \mathrm{out}_i = (M^{1/2} Y_i M^{1/2})^{1/\theta}

    with ``B`` the batch BW barycenter (``karcher_steps`` fixed-point steps from the arithmetic mean) and ``v`` the
    batch dispersion in training, ``running_mean``/``running_var`` in eval. See :class:`normlayers.SPDBatchNorm`.

    Args:
        input: SPD matrices ``(*, n, n)`` (statistics pooled over all leading dims), or ``(*, C, n, n)`` with
            per-channel state. float32 or float64; symmetrized (asymmetry beyond rounding is an error).
        running_mean, running_var: ``(n, n)``/``()`` or ``(C, n, n)``/``(C,)`` buffers, updated in place in training
            (running mean along the BW geodesic). May be ``None`` only in training.
        weight: the SPD bias ``W``, ``(n, n)`` or ``(C, n, n)``; ``None`` is the identity.
        metric: the SPD metric parameter ``M``, ``(n, n)`` or ``(C, n, n)``; ``None`` is the identity (plain BW).
        shift: the dispersion ``s``, ``()`` or ``(C,)``; ``None`` is 1.
        training: batch statistics and running updates when ``True``. Default: ``False``.
        momentum: the running-statistics rate. Default: ``0.1``.
        eps: added to the dispersion. Default: ``1e-5``.
        theta: the power deformation θ (non-zero). Default: ``1.0``.
        variance: ``"frechet"`` (mean squared distance to the batch mean) or ``"reference"`` (the authors' code:
            around the identity). Default: ``"frechet"``.
        karcher_steps: barycenter fixed-point steps. Default: ``1`` (the authors').
        reference_roundtrip: reproduce the authors' Exp_I/Log_I round trip (docs/spd_batch_norm.md). Default: ``False``.
        compute_dtype: the dtype of the per-sample eigendecompositions; ``None`` is the input's. Parameter-side and
            statistics-side ones are always float64. The output has the input's dtype. Default: ``torch.float64``.
        sync_stats, process_group: in training, with ``torch.distributed`` initialized and more than one rank in
            ``process_group`` (``None``: the world), the barycenter and the dispersion are the global batch's: the
            batch sums of the barycenter's start and of every fixed-point step, and of the dispersion, are
            all-reduced and divided by the global count (docs/distributed.md). Default: ``False``, ``None``.

    The per-channel layout is inferred from the state's shapes; statistics are detached, as in the authors' code.
    In eager mode the input is checked to be symmetric positive definite (one host sync; skipped under
    ``torch.compile``). There is no Triton path: backend ``"auto"`` runs the CPU tier on CPU tensors (without synced
    statistics), everything else the plain-PyTorch reference.
    """
    if is_dtensor(input):  # a batch-sharded DTensor: the statistics of every shard (docs/scaling_out.md)
        return run_on_local_shards(
            spd_batch_norm, "SPDBatchNorm", dict(input=input, running_mean=running_mean, running_var=running_var,
                                                 weight=weight, metric=metric, shift=shift),
            params=("weight", "metric", "shift"), shardable=lambda ndim: range(1), training=training,
            sync_stats=sync_stats, process_group=process_group, momentum=momentum, eps=eps, theta=theta,
            variance=variance, karcher_steps=karcher_steps, reference_roundtrip=reference_roundtrip,
            compute_dtype=compute_dtype)
    group = sync_group(sync_stats, process_group, training)
    per_channel = _check_spd_batch_norm_args(input, running_mean, running_var, weight, metric, shift, training,
                                             momentum, eps, theta, variance, karcher_steps, compute_dtype,
                                             synced=group is not None)
    options = dict(training=training, momentum=float(momentum), eps=float(eps), theta=float(theta), variance=variance,
                   karcher_steps=int(karcher_steps), reference_roundtrip=bool(reference_roundtrip),
                   per_channel=per_channel, compute_dtype=compute_dtype)
    if group is None and tier(input, has_kernels=False) == "cpu":
        return _cpu_spd.spd_batch_norm(input, running_mean, running_var, weight, metric, shift, **options)
    return _ref_spd.spd_batch_norm(input, running_mean, running_var, weight, metric, shift, **options,
                                   sum_over_ranks=None if group is None else lambda t: all_reduce_sum(t, group))
