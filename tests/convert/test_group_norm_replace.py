"""replace_norms swaps nn.GroupNorm for normlayers.GroupNorm by default (same math, same parameter objects,
restorable); fuse_group_norm_act folds the activation after a GroupNorm inside nn.Sequential, and refuses shared or
hooked modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlayers
from normlayers.convert import fuse_group_norm_act
from normlayers.testing import assert_close


def _unet_block() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8, affine=False), nn.GELU(),
                         nn.GroupNorm(8, 8), nn.Tanh())


def _randomize(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def test_replace_norms_swaps_group_norm_by_default_and_restores():
    model = _randomize(_unet_block())
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    weight, keys = model[1].weight, list(model.state_dict())
    normlayers.replace_norms(model)
    assert [type(model[i]) for i in (1, 4, 6)] == [normlayers.GroupNorm] * 3
    assert model[1].weight is weight and list(model.state_dict()) == keys and model[1].act is None
    assert torch.equal(model(x), expected)  # backend auto on CPU: ATen's group_norm, the same ops
    restored = normlayers.restore_norms(model)
    assert [type(restored[i]) for i in (1, 4, 6)] == [nn.GroupNorm] * 3 and restored[1].weight is weight
    assert torch.equal(restored(x), expected)


def test_fuse_group_norm_act_in_sequential():
    model = _randomize(_unet_block())
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    keys = list(model.state_dict())
    weight = model[1].weight
    fuse_group_norm_act(model)
    assert (model[1].act, model[4].act) == ("silu", "gelu") and model[1].weight is weight
    assert type(model[2]) is type(model[5]) is nn.Identity
    assert type(model[6]) is nn.GroupNorm and type(model[7]) is nn.Tanh  # tanh is not fused
    assert list(model.state_dict()) == keys
    for backend in ("auto", "reference", "triton"):
        with normlayers.backend(backend):
            assert_close(model(x), expected)
    restored = normlayers.restore_norms(model)
    assert isinstance(restored[1], nn.Sequential) and type(restored[1][1]) is nn.SiLU
    assert_close(restored(x), expected)


def test_fuse_after_replace_norms_and_nested():
    inner = nn.Sequential(nn.GroupNorm(2, 4), nn.ReLU())
    model = nn.Sequential(nn.Conv2d(4, 4, 1), inner)
    normlayers.replace_norms(model)
    fuse_group_norm_act(model)
    assert model[1][0].act == "relu" and type(model[1][1]) is nn.Identity


def test_fuse_refuses_shared_or_hooked_norms():
    shared = nn.GroupNorm(2, 4)
    model = nn.Sequential(shared, nn.SiLU(), nn.Sequential(shared, nn.Identity()))
    with pytest.warns(UserWarning, match="reachable under several names"):
        fuse_group_norm_act(model)
    assert model[0] is shared and type(model[1]) is nn.SiLU
    hooked = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    hooked[1].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="has hooks"):
        fuse_group_norm_act(hooked)
    assert type(hooked[0]) is nn.GroupNorm


def test_fuse_leaves_approximate_gelu_and_fused_norms_alone():
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.GELU(approximate="tanh"),
                          normlayers.GroupNorm(2, 4, act="silu"), nn.SiLU())
    fuse_group_norm_act(model)
    assert type(model[0]) is nn.GroupNorm and type(model[1]) is nn.GELU
    assert model[2].act == "silu" and type(model[3]) is nn.SiLU  # silu(silu(.)) is not one fused silu
