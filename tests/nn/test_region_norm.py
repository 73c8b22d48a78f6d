"""RegionNorm2d (RN-B) and LearnableRegionNorm2d (RN-L) as modules (spec B §3).

* The official parameter names and shapes, so the authors' checkpoints load with ``strict=True``; state_dict round
  trips, deepcopy, ``.to(dtype)``, the meta device, repr.
* Module outputs equal the functional forms with the module's parameters (which tests/reference checks against the
  official algorithm), train equals eval (no running statistics), and bad arguments give clear errors.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import normlayers
from normlayers import functional as NF
from normlayers.testing import assert_close

RN_B_KEYS = ["foreground_gamma", "foreground_beta", "background_gamma", "background_beta"]
RN_L_KEYS = ["sa.conv1.weight", "sa.gamma_conv.weight", "sa.gamma_conv.bias", "sa.beta_conv.weight",
             "sa.beta_conv.bias"]


def _x_mask(n=2, c=6, h=5, w=7, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=gen).to(dtype),
            torch.rand(n, 1, 2 * h, 2 * w, generator=gen) < 0.3)


def _perturbed(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


def test_signatures():
    rn_b = inspect.signature(normlayers.RegionNorm2d)
    assert list(rn_b.parameters)[:5] == ["num_features", "eps", "stats", "eps_mode", "affine"]
    assert rn_b.parameters["eps"].default == 1e-5 and rn_b.parameters["stats"].default == "batch"
    rn_l = inspect.signature(normlayers.LearnableRegionNorm2d)
    assert list(rn_l.parameters)[:4] == ["num_features", "threshold", "kernel_size", "eps"]
    assert rn_l.parameters["threshold"].default == 0.8 and rn_l.parameters["kernel_size"].default == 7
    for sig in (rn_b, rn_l):
        for name in ("process_group", "sync_stats", "device", "dtype"):
            assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_official_rn_b_checkpoint_loads_strict_and_is_zero_initialized():
    m = normlayers.RegionNorm2d(6)
    assert list(m.state_dict()) == RN_B_KEYS and not list(m.buffers())
    for value in m.state_dict().values():
        assert value.shape == (6,) and not value.any()  # the official zeros init of the (1 + γ) form
    gen = torch.Generator().manual_seed(1)
    official = {key: torch.randn(6, generator=gen) for key in RN_B_KEYS}
    m.load_state_dict(official, strict=True)
    for key in RN_B_KEYS:
        assert torch.equal(getattr(m, key), official[key])


@pytest.mark.parametrize("k", [7, 3])
def test_official_rn_l_checkpoint_loads_strict(k):
    m = normlayers.LearnableRegionNorm2d(6, kernel_size=k)
    shapes = {"sa.conv1.weight": (1, 2, k, k), "sa.gamma_conv.weight": (1, 1, k, k), "sa.gamma_conv.bias": (1,),
              "sa.beta_conv.weight": (1, 1, k, k), "sa.beta_conv.bias": (1,)}
    assert {key: tuple(v.shape) for key, v in m.state_dict().items()} == shapes
    assert list(m.state_dict()) == RN_L_KEYS
    official = {key: torch.randn(shape) for key, shape in shapes.items()}
    m.load_state_dict(official, strict=True)
    assert torch.equal(m.sa.conv1.weight, official["sa.conv1.weight"])


def test_affine_none_has_no_parameters():
    m = normlayers.RegionNorm2d(6, affine=None)
    assert not list(m.parameters()) and m.foreground_gamma is None
    x, mask = _x_mask()
    assert_close(m(x, mask), NF.region_norm(x, mask))


@pytest.mark.parametrize("stats", ["batch", "instance"])
@pytest.mark.parametrize("affine", ["masked", "official"])
def test_rn_b_module_is_its_functional_form(stats, affine):
    m = _perturbed(normlayers.RegionNorm2d(6, stats=stats, affine=affine))
    x, mask = _x_mask()
    expected = NF.region_norm(x, mask, m.foreground_gamma, m.foreground_beta, m.background_gamma,
                              m.background_beta, stats=stats, affine=affine)
    assert torch.equal(m(x, mask), expected)
    # The default eps_mode follows stats (the official code's effective eps with batch statistics).
    assert m.eps_mode == ("official" if stats == "batch" else "plain")


def test_rn_l_module_is_its_functional_form():
    m = _perturbed(normlayers.LearnableRegionNorm2d(6, threshold=0.5, kernel_size=3))
    x, _ = _x_mask()
    sa = m.sa
    expected = NF.learnable_region_norm(x, sa.conv1.weight, sa.gamma_conv.weight, sa.gamma_conv.bias,
                                        sa.beta_conv.weight, sa.beta_conv.bias, threshold=0.5)
    assert torch.equal(m(x), expected)


@pytest.mark.parametrize("name", ["RegionNorm2d", "LearnableRegionNorm2d"])
def test_train_equals_eval(name):
    m = _perturbed(getattr(normlayers, name)(6))
    x, mask = _x_mask()
    args = (x, mask) if name == "RegionNorm2d" else (x,)
    assert torch.equal(m.train()(*args), m.eval()(*args))


def _module_and_args(name, **kwargs):
    x, mask = _x_mask()
    m = getattr(normlayers, name)(6, **kwargs)
    return m, ((x, mask) if name == "RegionNorm2d" else (x,))


@pytest.mark.parametrize("name", ["RegionNorm2d", "LearnableRegionNorm2d"])
def test_state_dict_round_trip_and_deepcopy(name):
    src, args = _module_and_args(name)
    _perturbed(src)
    dst, _ = _module_and_args(name)
    dst.load_state_dict(src.state_dict(), strict=True)
    assert torch.equal(dst(*args), src(*args))
    clone = copy.deepcopy(src)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(src.parameters(), clone.parameters()))
    assert torch.equal(clone(*args), src(*args))
    assert repr(clone) == repr(src)


@pytest.mark.parametrize("name", ["RegionNorm2d", "LearnableRegionNorm2d"])
def test_to_float64_matches_the_float64_functional_form(name):
    m, args = _module_and_args(name)
    _perturbed(m)
    m64 = copy.deepcopy(m).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    args64 = (args[0].double(), *args[1:])
    out = m64(*args64)
    assert out.dtype == torch.float64
    assert_close(out.float(), m(*args))


@pytest.mark.parametrize("name", ["RegionNorm2d", "LearnableRegionNorm2d"])
def test_meta_device_construction_and_forward(name):
    m = getattr(normlayers, name)(6, device="meta")
    assert all(p.is_meta for p in m.parameters())
    x = torch.empty(2, 6, 5, 7, device="meta", dtype=torch.bfloat16)
    args = (x, torch.empty(2, 1, 10, 14, device="meta", dtype=torch.bool)) if name == "RegionNorm2d" else (x,)
    y = m(*args)
    assert y.is_meta and y.shape == x.shape and y.dtype == torch.bfloat16
    m.to_empty(device="cpu")
    m.reset_parameters()
    fresh = getattr(normlayers, name)(6)
    if name == "RegionNorm2d":  # deterministic init (zeros); RN-L's conv init is random
        for key, value in fresh.state_dict().items():
            assert torch.equal(m.state_dict()[key], value), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_and_input(dtype):
    m = _perturbed(normlayers.RegionNorm2d(6)).to(dtype)
    x, mask = _x_mask(dtype=dtype)
    y = m(x, mask)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert all(p.grad.dtype == dtype for p in m.parameters())


def test_extra_repr_names_the_settings():
    assert repr(normlayers.RegionNorm2d(6, stats="instance", affine="official")) == (
        "RegionNorm2d(6, eps=1e-05, stats='instance', eps_mode='plain', affine='official')")
    text = repr(normlayers.LearnableRegionNorm2d(6, threshold=0.7, kernel_size=3))
    assert text.startswith("LearnableRegionNorm2d(\n  6, threshold=0.7, kernel_size=3, eps=1e-05, stats='batch', "
                           "eps_mode='official'")


def test_bad_constructor_arguments():
    # Each error names the argument it rejects and the value it got, so a check that fires for the wrong argument
    # (or a ValueError from somewhere else) fails here.
    bad_rn_b = [(dict(num_features=0), "num_features must be a positive int, got 0"),
                (dict(num_features=True), "num_features must be a positive int, got True"),
                (dict(num_features=6, eps=0.0), "eps must be a finite positive number .*, got 0.0"),
                (dict(num_features=6, eps=float("inf")), "eps must be a finite positive number .*, got inf"),
                (dict(num_features=6, stats="group"), r"stats must be one of \('batch', 'instance'\), got 'group'"),
                (dict(num_features=6, eps_mode="scaled"), r"eps_mode must be one of .*, got 'scaled'"),
                (dict(num_features=6, affine="per_pixel"), r"affine must be one of .*, got 'per_pixel'")]
    for kwargs, message in bad_rn_b:
        with pytest.raises(ValueError, match=f"^{message}$"):
            normlayers.RegionNorm2d(**kwargs)
    bad_rn_l = [(dict(kernel_size=4), r"kernel_size must be a positive odd int .*, got 4"),
                (dict(kernel_size=0), r"kernel_size must be a positive odd int .*, got 0"),
                (dict(threshold=float("nan")), "threshold must be a finite number, got nan"),
                (dict(threshold="0.8"), "threshold must be a finite number, got '0.8'"),
                (dict(eps=-1.0), "eps must be a finite positive number .*, got -1.0"),
                (dict(stats="layer"), r"stats must be one of \('batch', 'instance'\), got 'layer'")]
    for kwargs, message in bad_rn_l:
        with pytest.raises(ValueError, match=f"^{message}$"):
            normlayers.LearnableRegionNorm2d(6, **kwargs)


def test_bad_input_names_the_argument():
    m = normlayers.RegionNorm2d(6)
    x, mask = _x_mask()
    cases = [
        ((x[0], mask), ValueError, "input must be 4-D"),
        ((x[:, :5], mask), ValueError, "6 channels"),
        ((x, mask[:1]), ValueError, "mask must have shape"),
        ((x, mask.expand(2, 2, 10, 14)), ValueError, "mask must have shape"),
        ((x, mask[..., :0]), ValueError, "mask has no pixels"),
        ((x, mask.numpy()), TypeError, "mask must be a torch.Tensor"),
        ((x.long(), mask), TypeError, "input must have a floating dtype"),
        ((x, mask.to(torch.complex64)), TypeError, "mask must be bool"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            m(*args)
    with pytest.raises(ValueError, match="foreground_gamma must have shape"):
        NF.region_norm(x, mask, torch.zeros(5))
    with pytest.raises(ValueError, match="conv1_weight must have shape"):
        NF.learnable_region_norm(x, torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4), None, torch.zeros(1, 1, 4, 4),
                                 None)
    with pytest.raises(ValueError, match="gamma_weight must have shape"):
        NF.learnable_region_norm(x, torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 5, 5), None, torch.zeros(1, 1, 3, 3),
                                 None)
    with pytest.raises(ValueError, match="6 channels"):
        normlayers.LearnableRegionNorm2d(6)(x[:, :4])
