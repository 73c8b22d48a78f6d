"""Plain-PyTorch reference of EvoNorm (Liu, Brock, Simonyan, Le, NeurIPS 2020) and timm's further variants.

The ground truth the Triton path (``kernels/evo_norm.py``) is tested against; written for reading, not speed. The
semantics are timm's (huggingface/pytorch-image-models, ``timm/layers/evo_norm.py``), so timm checkpoints load and give
the same outputs; where timm and the official TF code differ (docs/evo_norm.md, "timm's variants and the official TF
code") timm is followed.

Two sub-families, one parametrised function each:

* **B** (:func:`evo_norm_b`, variants ``"b0"``, ``"b1"``, ``"b2"``): ``x / max(left, right)`` where ``left`` is the
  per-channel batch standard deviation (the running one in eval) and ``right`` a per-(sample, channel) term.
  The running variance is updated in place during training.
* **S** (:func:`evo_norm_s`, variants ``"s0"``, ``"s1"``, ``"s2"``): ``numerator(x) / group statistic(x)``,
  per (sample, group); batch-independent, no buffers.

Numerics: all arithmetic (statistics, the ``max``, the division and the affine) is done in the "opmath" dtype — fp32 for
fp16/bf16/fp32 input, fp64 for fp64 — and the result is rounded once, to the input's dtype. timm also takes its
statistics in fp32 but rounds them to the input dtype before the elementwise work; for fp32/fp64 input the two agree,
for fp16/bf16 ours is the more accurate. Every variance is the **biased** one, so H=W=1 gives an instance variance of 0
and a denominator of ``sqrt(eps)``, never NaN (a NaN reported with the unbiased one: digantamisra98/EvoNorm issue #4).
Gradients come from autograd; in particular the ``max`` of the B variants splits the gradient half/half between the two
sides at an exact tie, which is PyTorch's rule for ``torch.maximum`` (``derivatives.yaml``).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from normlayers._dtypes import compute_dtype
from normlayers.distributed import MomentSync

__all__ = ["B_VARIANTS", "S_VARIANTS", "evo_norm_b", "evo_norm_s", "batch_variance", "update_running_var_",
           "instance_std", "instance_rms", "group_std", "group_rms"]

B_VARIANTS = ("b0", "b1", "b2")
S_VARIANTS = ("s0", "s1", "s2")


def _per_channel(t: Tensor, like: Tensor) -> Tensor:
    """A ``(C,)`` tensor as ``(1, C, 1, 1)`` in ``like``'s dtype, to broadcast over NCHW (per-channel parameters
    broadcast on the channel axis)."""
    return t.to(like.dtype).view(1, -1, 1, 1)


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    if weight is not None:
        y = y * _per_channel(weight, y)
    if bias is not None:
        y = y + _per_channel(bias, y)
    return y


# ----------------------------------------------------------------------------------------------------------------------
# Statistics (inputs already in opmath; all variances biased)
# ----------------------------------------------------------------------------------------------------------------------


def _biased_var(t: Tensor, dims: tuple[int, ...], keepdim: bool = False) -> Tensor:
    """``mean((t − mean(t))²)`` over ``dims``: the centred two-pass form (never ``E[t²] − E[t]²``)."""
    centred = t - t.mean(dim=dims, keepdim=True)
    return centred.square().mean(dim=dims, keepdim=keepdim)


def batch_variance(xf: Tensor) -> Tensor:
    """Biased variance of each channel over (N, H, W), shape ``(C,)``; keeps the graph (training uses the batch
    variance *with* gradient, as timm and TF)."""
    return _biased_var(xf, (0, 2, 3))


def update_running_var_(running_var: Tensor, batch_var: Tensor, count: Union[int, Tensor], momentum: float) -> None:
    """timm's update (``EvoNorm2dB0.forward``), in place and outside autograd:
    ``running_var ← (1 − momentum)·running_var + momentum·batch_var·n/(n − 1)`` with ``n = N·H·W``.

    The stored value is the *unbiased* variance (as ``torch.nn.BatchNorm2d``; TF stores the biased one).
    It is computed in fp32 (fp64 when either side is fp64) and written back in the buffer's own dtype.
    """
    with torch.no_grad():
        dtype = torch.promote_types(torch.promote_types(running_var.dtype, batch_var.dtype), torch.float32)
        unbiased = batch_var.detach().to(dtype) * (count / (count - 1))
        running_var.copy_(running_var.to(dtype) * (1.0 - momentum) + unbiased * momentum)


def instance_std(xf: Tensor, eps: float) -> Tensor:
    """``sqrt(s2_{h,w}(x) + eps)`` per (sample, channel), shape ``(N, C, 1, 1)``."""
    return torch.sqrt(_biased_var(xf, (2, 3), keepdim=True) + eps)


def instance_rms(xf: Tensor, eps: float) -> Tensor:
    """``sqrt(mean_{h,w}(x²) + eps)`` per (sample, channel), shape ``(N, C, 1, 1)``."""
    return torch.sqrt(xf.square().mean(dim=(2, 3), keepdim=True) + eps)


def _per_group(stat: Callable[[Tensor], Tensor], xf: Tensor, groups: int) -> Tensor:
    """Apply ``stat`` over each group's ``C/groups · H · W`` values and spread the result back to every channel of
    the group: shape ``(N, C, 1, 1)``."""
    n, c, h, w = xf.shape
    per_group = stat(xf.reshape(n, groups, c // groups * h * w))  # (N, G); explicit size: N may be 0
    return per_group.repeat_interleave(c // groups, dim=1).view(n, c, 1, 1)


def group_std(xf: Tensor, groups: int, eps: float) -> Tensor:
    """``sqrt(s2_{c∈group,h,w}(x) + eps)`` per (sample, group), spread to ``(N, C, 1, 1)``."""
    return _per_group(lambda g: torch.sqrt(_biased_var(g, (-1,)) + eps), xf, groups)


def group_rms(xf: Tensor, groups: int, eps: float) -> Tensor:
    """``sqrt(mean_{c∈group,h,w}(x²) + eps)`` per (sample, group), spread to ``(N, C, 1, 1)``."""
    return _per_group(lambda g: torch.sqrt(g.square().mean(dim=-1) + eps), xf, groups)


# ----------------------------------------------------------------------------------------------------------------------
# The two sub-families
# ----------------------------------------------------------------------------------------------------------------------


def evo_norm_b(x: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
               v: Optional[Tensor], *, variant: str, training: bool, momentum: float, eps: float,
               apply_act: bool, sync: Optional[MomentSync] = None) -> Tensor:
    r"""EvoNorm-B0/B1/B2 (timm's ``EvoNorm2dB0/B1/B2``) on NCHW ``x``:

    .. math::
        y = \frac{x}{\max(\sqrt{\sigma^2_{n,h,w} + \epsilon},\ r(x))} \cdot \gamma + \beta

    with ``r = v·x + sqrt(s2_{h,w}(x) + eps)`` (B0), ``(x + 1)·sqrt(mean_{h,w}(x²) + eps)`` (B1) or
    ``sqrt(mean_{h,w}(x²) + eps) − x`` (B2). ``σ²`` is the batch variance (with gradient) in training — and
    ``running_var`` (if given) is then updated in place by :func:`update_running_var_` — and ``running_var`` in
    eval.
    ``apply_act=False`` is affine only: no normalization and no running-variance update (timm; TF too).
    ``v`` is used by B0 only. ``sync`` (see :mod:`normlayers.distributed`) turns this rank's batch moments into the
    global batch's. Arguments are assumed valid (``normlayers.functional`` checks them).
    """
    if apply_act:
        xf = x.to(compute_dtype(x.dtype))
        if training:
            var = batch_variance(xf)
            count: Union[int, Tensor] = x.shape[0] * x.shape[2] * x.shape[3]
            if sync is not None:
                _, var, count = sync(xf.mean((0, 2, 3)), var, count)
            if running_var is not None:
                update_running_var_(running_var, var, count, momentum)
        else:
            var = running_var.to(xf.dtype)
        left = torch.sqrt(var + eps).view(1, -1, 1, 1)
        if variant == "b0":
            right = xf * _per_channel(v, xf) + instance_std(xf, eps)
        elif variant == "b1":
            right = (xf + 1.0) * instance_rms(xf, eps)
        else:
            right = instance_rms(xf, eps) - xf
        # torch.maximum, not torch.where: its gradient splits half/half at ties.
        y = xf / torch.maximum(left, right)
    else:
        y = x.to(compute_dtype(x.dtype))
    return _affine(y, weight, bias).to(x.dtype)


def evo_norm_s(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor], *,
               variant: str, activation: Optional[Callable[[Tensor], Tensor]], eps: float, apply_act: bool,
               always_normalize: bool) -> Tensor:
    r"""EvoNorm-S0/S1/S2 and timm's S0a/S1a/S2a (timm's ``EvoNorm2dS*``) on NCHW ``x``:

    .. math::
        y = \frac{a(x)}{d_g(x)} \cdot \gamma + \beta

    with ``a(x) = x·sigmoid(v·x)`` (S0) or ``activation(x)`` (S1, S2), and ``d_g = sqrt(s2_{group}(x) + eps)``
    (S0, S1) or ``sqrt(mean_{group}(x²) + eps)`` (S2), over each sample's ``C/groups`` channels and all of H, W. The
    denominator is always a statistic of ``x`` itself, not of ``a(x)``.

    ``apply_act=False``: affine only, unless ``always_normalize`` (the timm "a" variants), which normalize ``x``
    without the nonlinearity, ``y = x / d_g(x) · γ + β``. ``v`` is used by S0 only, ``activation`` by S1/S2 only
    (``None`` means the identity). The activation sees the opmath (fp32) tensor.
    """
    xf = x.to(compute_dtype(x.dtype))
    if apply_act or always_normalize:
        if not apply_act:
            numerator = xf
        elif variant == "s0":
            numerator = xf * torch.sigmoid(xf * _per_channel(v, xf))
        else:
            numerator = activation(xf) if activation is not None else xf
        denominator = group_rms(xf, groups, eps) if variant == "s2" else group_std(xf, groups, eps)
        y = numerator / denominator
    else:
        y = xf
    return _affine(y, weight, bias).to(x.dtype)
