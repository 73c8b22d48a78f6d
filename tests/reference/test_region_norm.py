"""The RegionNorm reference against the official algorithm and against the spec's closed form (spec B §3).

* ``official_*`` below transcribe the official code's algorithm as spec §3.1 writes it out (geekyutao/RN rn.py:
  ``RN_binarylabel`` fills the outside of each region with the region mean, runs BatchNorm without affine and
  rescales by ``sqrt(S/N)``; ``RN_B``, ``SelfAware_Affine``, ``RN_L``), plus the authors' instance-style variant
  (InstanceNorm in place of BatchNorm, counts per sample). The reference computes the closed form of §3.2 instead,
  so agreement (outputs and autograd gradients) checks the closed form, the effective epsilon and the affine.
* ``closed_form_per_sample`` is the paper's per-sample RN with a plain epsilon, written with boolean indexing, one
  sample, channel and region at a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

from normlayers.reference import region_norm as R
from normlayers.testing import assert_close

EPS = 1e-5


def official_rn_binarylabel(x, label, *, per_sample=False, eps=EPS):
    """Spec §3.1 ``RN_binarylabel`` (``per_sample``: the authors' IN-style variant)."""
    label = label.detach()
    dims = (2, 3) if per_sample else (0, 2, 3)
    values = x.shape[2] * x.shape[3] * (1 if per_sample else x.shape[0])

    def rn(region, mask):
        s = mask.expand_as(region).sum(dims, keepdim=True)
        s = torch.where(s == 0, torch.ones_like(s), s)
        mu = region.sum(dims, keepdim=True) / s
        z = region + (1 - mask) * mu
        if per_sample:
            normed = TF.instance_norm(z, eps=eps)
        else:
            normed = TF.batch_norm(z, None, None, training=True, eps=eps)
        return normed * torch.sqrt(s / values)

    return rn(x * label, label) + rn(x * (1 - label), 1 - label)


def official_rn_b(x, mask, fg_gamma, fg_beta, bg_gamma, bg_beta, *, per_sample=False):
    """Spec §3.1 ``RN_B``: nearest resize, RN, the (1 + γ) affine with both betas unmasked."""
    mask = TF.interpolate(mask, size=x.shape[2:], mode="nearest")
    r = official_rn_binarylabel(x, mask, per_sample=per_sample)

    def per_channel(t):
        return t[None, :, None, None]

    return ((r * mask) * (1 + per_channel(fg_gamma)) + per_channel(fg_beta)
            + (r * (1 - mask)) * (1 + per_channel(bg_gamma)) + per_channel(bg_beta))


def official_rn_l(x, conv1_weight, gamma_weight, gamma_bias, beta_weight, beta_bias, threshold):
    """Spec §3.1 ``SelfAware_Affine`` + ``RN_L`` (expanded mask, as the official code passes it)."""
    pad = conv1_weight.shape[-1] // 2
    pooled = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]], dim=1)
    s = torch.sigmoid(TF.conv2d(pooled, conv1_weight, padding=pad))
    gamma = TF.conv2d(s, gamma_weight, gamma_bias, padding=pad)
    beta = TF.conv2d(s, beta_weight, beta_bias, padding=pad)
    regions = (s.detach() >= threshold).to(x.dtype)
    return official_rn_binarylabel(x, regions.expand(x.shape)) * (1 + gamma) + beta


def closed_form_per_sample(x, hole, eps):
    """The paper's RN (spec §3.3 item 1): per sample, channel and region, ``(x − μ)/sqrt(σ² + ε)``."""
    out = torch.zeros_like(x)
    hole = hole.expand(x.shape)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for region in (hole[n, c], ~hole[n, c]):
                values = x[n, c][region]
                if values.numel():
                    var, mean = torch.var_mean(values, unbiased=False)
                    out[n, c][region] = (values - mean) / torch.sqrt(var + eps)
    return out


def _data(shape=(3, 4, 6, 5), mask_shape=(3, 1, 12, 10), *, seed=0, mask_kind="random", dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
    if mask_kind == "random":
        mask = torch.rand(mask_shape, generator=gen) < 0.35
    else:
        mask = torch.full(mask_shape, mask_kind == "all")
    params = [torch.randn(shape[1], generator=gen, dtype=torch.float64) * 0.5 for _ in range(4)]
    return x, mask, params


def _grads(fn, x, params):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(7)
    out.backward(torch.randn(out.shape, generator=gen, dtype=out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("mask_shape", [(3, 1, 12, 10), (3, 4, 6, 5), (3, 1, 3, 4), (3, 4, 7, 9)])
def test_matches_official_rn_b_outputs_and_gradients(per_sample, mask_shape):
    """Masks larger, equal and smaller than the feature map, one channel or C; batch and the authors' IN style."""
    x, mask, params = _data(mask_shape=mask_shape)
    stats = "instance" if per_sample else "batch"
    ours, our_grads = _grads(lambda t, *p: R.region_norm(t, mask, *p, stats=stats, eps_mode="official",
                                                         affine="official"), x, params)
    theirs, their_grads = _grads(lambda t, *p: official_rn_b(t, mask.double(), *p, per_sample=per_sample), x, params)
    assert_close(ours, theirs)
    for name, a, b in zip(["x", "fg_gamma", "fg_beta", "bg_gamma", "bg_beta"], our_grads, their_grads):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("kind", ["all", "none"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_empty_region_matches_official_and_is_batch_or_instance_norm(kind, per_sample):
    x, mask, params = _data(mask_kind=kind)
    stats = "instance" if per_sample else "batch"
    ours = R.region_norm(x, mask, stats=stats, eps_mode="official")
    zeros = torch.zeros(x.shape[1], dtype=x.dtype)
    assert_close(ours, official_rn_b(x, mask.double(), zeros, zeros, zeros, zeros, per_sample=per_sample))
    # One region holds every value: S_r = V, so the effective epsilon is eps itself (spec §3.4).
    plain = TF.instance_norm(x, eps=EPS) if per_sample else TF.batch_norm(x, None, None, training=True, eps=EPS)
    assert_close(ours, plain)


def test_empty_region_gradients_are_finite_and_match_official():
    x, mask, params = _data(mask_kind="all")
    ours, our_grads = _grads(lambda t, *p: R.region_norm(t, mask, *p, affine="official"), x, params)
    theirs, their_grads = _grads(lambda t, *p: official_rn_b(t, mask.double(), *p), x, params)
    for a, b in zip(our_grads, their_grads):
        assert torch.isfinite(a).all()
        assert_close(a, b)
    # The empty valid region: its gamma has no pixel to scale (zero gradient); its beta is added everywhere.
    assert not our_grads[3].any()


@pytest.mark.parametrize("mask_channels", [1, 4])
def test_instance_plain_eps_is_the_papers_closed_form(mask_channels):
    x, mask, _ = _data(mask_shape=(3, mask_channels, 6, 5))
    mask[0, :, 0, 0] = True  # sample 0: one hole pixel in a corner at least
    mask[1] = False  # sample 1 has no hole at all
    mask[1, :, 2, 3] = True  # ... but one pixel: a one-value region (zero variance)
    ours = R.region_norm(x, mask, stats="instance", eps_mode="plain")
    assert_close(ours, closed_form_per_sample(x, mask, EPS))


def test_effective_eps_differs_from_plain_eps_by_the_formula():
    """eps_mode matters where a region is small: ε·V/S_r against ε (spec §3.2)."""
    x, mask, _ = _data()
    mask[:] = False
    mask[0, 0, 0, :2] = True  # a 1-value hole region after the nearest resize (2 mask pixels -> 1 feature pixel)
    x = x * 1e-3  # a spread comparable to the effective epsilon
    official = R.region_norm(x, mask, eps_mode="official")
    plain = R.region_norm(x, mask, eps_mode="plain")
    assert not torch.allclose(official, plain)
    # The valid region is nearly everything, so its two epsilons are nearly equal; elsewhere they differ.
    hole = R.prepare_mask(mask, x.shape[2:]).expand(x.shape)
    values = x.shape[0] * x.shape[2] * x.shape[3]
    valid_x = x.transpose(0, 1)[~hole.transpose(0, 1)].view(x.shape[1], -1)
    var, mean = torch.var_mean(valid_x, dim=1, unbiased=False)
    count = valid_x.shape[1]
    expected = (valid_x - mean[:, None]) / torch.sqrt(var[:, None] + EPS * values / count)
    assert_close(official.transpose(0, 1)[~hole.transpose(0, 1)].view(x.shape[1], -1), expected)


def test_masked_affine_puts_each_beta_in_its_region():
    x, mask, (fg_gamma, fg_beta, bg_gamma, bg_beta) = _data(mask_shape=(3, 1, 6, 5))
    zeros = torch.zeros_like(fg_beta)
    masked = R.region_norm(x, mask, fg_gamma, fg_beta, bg_gamma, bg_beta, affine="masked")
    official_no_beta = official_rn_b(x, mask.double(), fg_gamma, zeros, bg_gamma, zeros)
    m = mask.double()
    assert_close(masked, official_no_beta + m * fg_beta[:, None, None] + (1 - m) * bg_beta[:, None, None])


def test_numeric_masks_count_every_nonzero_value_as_a_hole():
    x, mask, params = _data()
    weights = mask.double() * torch.linspace(0.5, 3.0, mask.numel(), dtype=torch.float64).view(mask.shape)
    assert_close(R.region_norm(x, weights, *params), R.region_norm(x, mask, *params))
    assert_close(R.region_norm(x, mask.to(torch.uint8), *params), R.region_norm(x, mask, *params))


def test_prepare_mask_is_legacy_nearest():
    mask = torch.rand(2, 1, 7, 9) < 0.5
    rows = torch.floor(torch.arange(3) * 7 / 3).long()
    cols = torch.floor(torch.arange(4) * 9 / 4).long()
    assert torch.equal(R.prepare_mask(mask, (3, 4)), mask[:, :, rows][:, :, :, cols])


def test_no_gradient_into_a_float_mask():
    x, mask, params = _data()
    weights = mask.double().requires_grad_()
    R.region_norm(x.requires_grad_(), weights, *params).sum().backward()
    assert weights.grad is None


@pytest.mark.parametrize("stats", ["batch", "instance"])
@pytest.mark.parametrize("affine", ["masked", "official"])
def test_gradcheck_fp64(stats, affine):
    x, mask, params = _data(shape=(2, 3, 3, 4), mask_shape=(2, 1, 3, 4))
    mask[1] = True  # sample 1 all hole: an empty valid region per sample in instance mode
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    assert torch.autograd.gradcheck(lambda t, *p: R.region_norm(t, mask, *p, stats=stats, affine=affine), leaves)


def _rn_l_weights(k=3, seed=4):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 2, k, k), (1, 1, k, k), (1,), (1, 1, k, k), (1,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64) * 0.5 for s in shapes]


@pytest.mark.parametrize("k", [3, 7])
def test_rn_l_matches_official_outputs_and_gradients(k):
    x, _, _ = _data()
    weights = _rn_l_weights(k)
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
    s = torch.sigmoid(TF.conv2d(pooled, weights[0], padding=k // 2))
    threshold = s.median().item()  # both regions present
    ours, our_grads = _grads(lambda t, *w: R.learnable_region_norm(t, *w, threshold=threshold), x, weights)
    theirs, their_grads = _grads(lambda t, *w: official_rn_l(t, *w, threshold), x, weights)
    assert_close(ours, theirs)
    for a, b in zip(our_grads, their_grads):
        assert_close(a, b)


def test_rn_l_threshold_passes_no_gradient_to_conv1():
    """With gamma/beta convs at zero weight, conv1 reaches the output only through the (detached) threshold."""
    x, _, _ = _data()
    conv1, _, gamma_bias, _, beta_bias = _rn_l_weights()
    zero = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    conv1 = conv1.requires_grad_()
    R.learnable_region_norm(x, conv1, zero, gamma_bias, zero, beta_bias, threshold=0.5).square().sum().backward()
    assert conv1.grad is not None and not conv1.grad.any()
