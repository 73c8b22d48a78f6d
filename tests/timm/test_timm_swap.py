"""``replace_norms`` on real timm models: every timm norm normlayers has a class for is swapped, outputs are kept,
parameters and buffers are adopted, and ``restore_norms`` gives timm's classes back.

Models come from ``timm.create_model(name, pretrained=False)``, shrunk (depth, width, image size) to run in seconds.
Their norm parameters are randomized first: fresh ones are ones and zeros, which would hide a swapped role.

Tolerances: timm's ``RmsNorm`` computes what ours computes in the same op order, so that swap is compared
bit-for-bit. timm's ``LayerNorm`` (``F.layer_norm``), EvoNorms (statistics rounded before the max/sigmoid/
division) and std convs (``F.batch_norm`` over the weight) reduce in another order than our reference: those models'
outputs, input gradients and buffers must be as close to timm's model run in fp64 as timm's own fp32 run is (the
rule of :func:`normlayers.testing.assert_lowprec_close`), since per-layer rounding compounds through the model. The
same rule applies to ``LayerNorm2d``/``RmsNorm2d`` once normlayers has those classes (until then the ConvNeXt cases
check that they are reported as skipped).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import normlayers
from normlayers.convert import timm_mapping
from normlayers.testing import assert_close, assert_lowprec_close

timm = pytest.importorskip("timm")
timm_layers = pytest.importorskip("timm.layers")

pytestmark = pytest.mark.timm

EVO_VARIANTS = ("B0", "B1", "B2", "S0", "S0a", "S1", "S1a", "S2", "S2a")
_SMALL_CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (8, 16, 16, 24)}
_SMALL_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}


def _evo_and_std_convs() -> nn.Module:
    """All nine EvoNorms and both std convs in one small CNN (no timm model has them all), with ``apply_act=False``
    and a non-default activation and eps where timm allows them."""
    layers: list[nn.Module] = [timm_layers.StdConv2d(3, 16, 3, eps=1e-8)]
    for variant in EVO_VARIANTS:
        cls = getattr(timm_layers, f"EvoNorm2d{variant}")
        kwargs = {} if variant.startswith("B") else {"groups": 4}
        if variant in ("S1", "S2a"):
            kwargs["act_layer"] = nn.GELU
        layers += [cls(16, **kwargs), cls(16, apply_act=False, **kwargs)]
    layers += [timm_layers.ScaledStdConv2d(16, 8, 3, gamma=1.7139588594436646, eps=1e-5, gain_init=0.5)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


MODELS = {
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", **_SMALL_VIT), 32),
    "vit_rmsnorm": (lambda: timm.create_model("vit_tiny_patch16_224", **_SMALL_VIT, norm_layer=timm_layers.RmsNorm),
                    32),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", **_SMALL_CONVNEXT), 32),
    "convnext_atto_rms": (lambda: timm.create_model("convnext_atto_rms", **_SMALL_CONVNEXT), 32),
    "test_efficientnet_evos": (lambda: timm.create_model("test_efficientnet_evos"), 32),
    "test_nfnet": (lambda: timm.create_model("test_nfnet"), 32),
    "evo_and_std_convs": (_evo_and_std_convs, 16),
}


def _randomized(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 or name.endswith("gain"):  # norm affines, EvoNorm's v, the std convs' gain
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    return model


# timm's classes normlayers computes (listed here, not taken from normlayers' table, so a class the table misses fails)
TIMM_NORMS = {getattr(timm_layers, name) for name in ("LayerNorm", "LayerNorm2d", "RmsNorm", "RmsNorm2d", "StdConv2d",
                                                      "ScaledStdConv2d", *(f"EvoNorm2d{v}" for v in EVO_VARIANTS))}


def _timm_norm_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if type(m) in TIMM_NORMS}


def _exact(model: nn.Module) -> bool:
    """Whether every swapped class computes what timm's computes in the same op order (RmsNorm: measured)."""
    return all(cls.__name__ == "RmsNorm" for cls in _timm_norm_types(model))


def _run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """A training step's output and input gradient, the buffers after it (EvoNorm-B's running_var), the eval output.

    Parameter gradients are compared layer by layer in test_timm_parity.py, not here: through a whole model each is a
    long sum whose rounding depends on the reduction order more than the rule below allows (measured: test_nfnet's
    ``stages.0.0.conv2.gain`` gradient is 5.8e-5 from fp64 with ours, 1.8e-5 with timm's, of a largest entry 2.4)."""
    with normlayers.backend("reference"):
        x = x.clone().requires_grad_()
        y = model.train()(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        with torch.no_grad():
            return [y.detach(), x.grad, *model.buffers(), model.eval()(x)]


@pytest.mark.parametrize("name", MODELS)
def test_replace_norms_swaps_every_timm_norm_and_keeps_outputs(name: str) -> None:
    build, size = MODELS[name]
    torch.manual_seed(0)
    model = _randomized(build())
    original = copy.deepcopy(model)
    sources = _timm_norm_types(model)
    assert sources, "the model has no timm norm"
    tensors = {id(t) for t in [*model.parameters(), *model.buffers()]}

    plan = normlayers.plan_replacements(model)
    skipped = {r.old_type for r in plan if r.skipped}
    # Skipped: only timm's channels-first norms, and only while normlayers has no class for them.
    missing = {"LayerNorm2d": not hasattr(normlayers, "LayerNorm2d"), "RmsNorm2d": not hasattr(normlayers, "RMSNorm2d")}
    assert skipped == {cls for cls in sources if missing.get(cls.__name__, False)}
    assert all(r.reason for r in plan)
    normlayers.replace_norms(model)
    assert _timm_norm_types(model) == skipped
    assert {id(t) for t in [*model.parameters(), *model.buffers()]} == tensors  # adopted, not copied
    assert list(model.state_dict()) == list(original.state_dict())

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    # restore_norms, on a copy (the swapped model runs below): timm's own classes again, holding the same tensors
    swapped = copy.deepcopy(model)
    swapped_tensors = {id(t) for t in [*swapped.parameters(), *swapped.buffers()]}
    restored = normlayers.restore_norms(swapped)
    assert not any(type(m).__module__.startswith("normlayers.") for m in restored.modules())
    assert _timm_norm_types(restored) == sources
    assert {id(t) for t in [*restored.parameters(), *restored.buffers()]} == swapped_tensors
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), copy.deepcopy(original).eval()(x))

    got, want = _run(model, x), _run(copy.deepcopy(original), x)
    if _exact(original):
        # Outputs bit for bit. The input gradient is autograd's through the reference's power-of-two row scaling
        # (docs/reliability.md), another op order than timm's, so it is held to the rule below.
        assert torch.equal(got[0], want[0]) and torch.equal(got[-1], want[-1])
        truth = _run(copy.deepcopy(original).double(), x.double())
        assert_lowprec_close(got[1], want[1], truth[1], msg="dx")
    else:
        # Rounding in another order in every swapped layer compounds through the model: ours must be as close to
        # timm's model run in fp64 as timm's fp32 run is (the low-precision rule of normlayers.testing, here for
        # fp32 against fp64; timm's fp64 EvoNorms still take fp32 statistics, which this bound absorbs).
        truth = _run(copy.deepcopy(original).double(), x.double())
        for i, (a, b, t) in enumerate(zip(got, want, truth)):
            assert_lowprec_close(a, b, t, msg=f"tensor {i} (0: y, 1: dx, then buffers, eval y)")


def test_swapped_classes_and_their_settings():
    """What each timm class becomes, with timm's eps, padding, group count and activation, and the NF conv's gamma
    recovered from timm's stored scale."""
    model = _evo_and_std_convs()
    std, scaled = model[0], model[-4]
    evo_s1 = model[1 + 2 * EVO_VARIANTS.index("S1")]
    normlayers.replace_norms(model)
    assert type(model[0]) is normlayers.WSConv2d and model[0].variant == "timm" and model[0].eps == 1e-8
    assert model[0].padding == std.padding == (1, 1)
    for i, variant in enumerate(EVO_VARIANTS):
        for new in model[1 + 2 * i:3 + 2 * i]:
            assert type(new) is getattr(normlayers, f"EvoNorm2d{variant}")
    assert model[1 + 2 * EVO_VARIANTS.index("S1")].act is evo_s1.act and isinstance(evo_s1.act, nn.GELU)
    assert model[1 + 2 * EVO_VARIANTS.index("S0")].groups == 4
    new_scaled = model[-4]
    assert type(new_scaled) is normlayers.ScaledWSConv2d and new_scaled.gain is scaled.gain
    assert new_scaled.gamma == pytest.approx(1.7139588594436646, rel=1e-12)
    assert new_scaled.scale == pytest.approx(scaled.scale, rel=1e-12) and new_scaled.eps == 1e-5
    assert new_scaled.gain_init == 0.5


def test_evo_norm_to_torch_is_timms_class():
    ours = _randomized(nn.Sequential(normlayers.EvoNorm2dS1(8, groups=2, act_layer=nn.GELU))).train()
    plain = ours[0].to_torch()
    assert type(plain) is timm_layers.EvoNorm2dS1 and plain.weight is ours[0].weight and plain.act is ours[0].act
    x = torch.randn(2, 8, 4, 4)
    assert_close(plain(x), ours(x))


def test_timm_classes_in_a_mapping_of_ones_own():
    """The micro-batch recipe on a timm model with std convs: timm's swaps are kept beside the functional ones."""
    model = nn.Sequential(timm_layers.StdConv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1))
    with pytest.raises(ValueError, match="StdConv2d subclasses Conv2d but overrides forward"):
        normlayers.replace_norms(model, {nn.Conv2d: normlayers.WSConv2d})
    mapping = {**normlayers.convert.DEFAULT_MAPPING, **timm_mapping(), nn.Conv2d: normlayers.WSConv2d,
               nn.BatchNorm2d: functools.partial(normlayers.BatchChannelNorm2d, num_groups=4)}
    normlayers.replace_norms(model, mapping)
    assert [type(m) for m in model] == [normlayers.WSConv2d, normlayers.BatchChannelNorm2d, normlayers.WSConv2d]
    # restored: timm's std conv (same math) back to timm's class; the functional swaps to plain torch
    with pytest.warns(UserWarning, match=r"1 \(BatchChannelNorm2d\); left in place"):
        restored = normlayers.restore_norms(model)
    assert type(restored[0]) is timm_layers.StdConv2d and type(restored[2]) is nn.Conv2d
