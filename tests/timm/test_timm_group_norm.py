"""timm's GroupNorm, GroupNorm1, GroupNormAct and GroupNorm1Act → normlayers.GroupNorm through replace_norms (the
activation fused), same outputs and gradients, restorable to timm's class. Skips where timm is not installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlayers
from normlayers.testing import assert_close

timm_layers = pytest.importorskip("timm.layers")


def _cases():
    return {
        "GroupNorm": (timm_layers.GroupNorm(8, num_groups=4), None),
        "GroupNorm1": (timm_layers.GroupNorm1(8), None),
        "GroupNormAct-silu": (timm_layers.GroupNormAct(8, num_groups=2, act_layer="silu"), "silu"),
        "GroupNormAct-gelu": (timm_layers.GroupNormAct(8, num_groups=2, act_layer="gelu"), "gelu"),
        "GroupNormAct-relu": (timm_layers.GroupNormAct(8, num_groups=4), "relu"),
        "GroupNormAct-no-act": (timm_layers.GroupNormAct(8, num_groups=4, apply_act=False), None),
        "GroupNorm1Act-silu": (timm_layers.GroupNorm1Act(8, act_layer="silu"), "silu"),
    }


@pytest.mark.parametrize("name", list(_cases()))
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_replace_and_restore_timm_group_norms(name, backend):
    source, act = _cases()[name]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    model = nn.Sequential(source)
    x = torch.randn(2, 8, 5, 6, generator=gen)
    leaf = x.clone().requires_grad_()
    expected = model(leaf)
    expected.sum().backward()
    expected_grads = [leaf.grad, *(p.grad.clone() for p in model.parameters())]
    model.zero_grad()
    normlayers.replace_norms(model)
    assert type(model[0]) is normlayers.GroupNorm and model[0].act == act
    assert model[0].num_groups == source.num_groups and model[0].weight is source.weight
    leaf = x.clone().requires_grad_()
    with normlayers.backend(backend):
        y = model(leaf)
    y.sum().backward()
    assert_close(y, expected)
    for a, e in zip([leaf.grad, *(p.grad for p in model.parameters())], expected_grads):
        assert_close(a, e)
    restored = normlayers.restore_norms(model)
    assert type(restored[0]) is type(source) and restored[0].weight is source.weight
    assert_close(restored(x), expected)


def test_group_norm_act_with_dropout_is_refused():
    source = timm_layers.GroupNormAct(8, num_groups=2, act_layer="silu", drop_layer=nn.Dropout)
    with pytest.raises(TypeError, match="Dropout"):
        normlayers.replace_norms(nn.Sequential(source))
