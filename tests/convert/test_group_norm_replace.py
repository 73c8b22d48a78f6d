"""replace_norms swaps nn.GroupNorm for normlayers.GroupNorm by default (same math, same parameter objects,
restorable); fuse_group_norm_act folds the activation after a GroupNorm inside nn.Sequential, and refuses shared or
hooked modules; fuse_group_norm_act_traced turns a diffusers-style ResNet block (its own forward, one SiLU module
applied to the norms' outputs and to the time embedding) into a GraphModule whose norms carry the SiLU, the temb path
keeping its SiLU, outputs, gradients and state_dict keys unchanged, and refuses ambiguous blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import normlayers
from normlayers.convert import fuse_group_norm_act, fuse_group_norm_act_traced
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
    # backend auto on CPU: the same math within fp32 rounding (its compiled NCHW kernel centres its sums, ATen's not)
    assert_close(model(x), expected)
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


class ResnetBlock2D(nn.Module):
    """The structure of diffusers' ``ResnetBlock2D`` (default time-embedding norm): norm1 → nonlinearity → conv1 →
    + time_emb_proj(nonlinearity(temb)) → norm2 → nonlinearity → dropout → conv2, plus a 1×1 shortcut."""

    def __init__(self, in_channels: int = 8, out_channels: int = 12, temb_channels: int = 6, groups: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = self.norm1(input_tensor)
        hidden_states = self.nonlinearity(hidden_states)
        hidden_states = self.conv1(hidden_states)
        if temb is not None:
            temb = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
            hidden_states = hidden_states + temb
        hidden_states = self.norm2(hidden_states)
        hidden_states = self.nonlinearity(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + hidden_states


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(2, 8, 5, 5, generator=gen, dtype=dtype, requires_grad=True),
            torch.randn(2, 6, generator=gen, dtype=dtype, requires_grad=True))


def _outputs_and_grads(block: nn.Module, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    x, temb = _inputs(dtype)
    y = block(x, temb)
    grads = torch.autograd.grad(y, [x, temb, *block.parameters()], torch.ones_like(y))
    return [y, *grads]


def test_resnet_block_fused_with_temb_silu_kept():
    block = _randomize(ResnetBlock2D())
    expected = _outputs_and_grads(block)
    keys = list(block.state_dict())
    fused = fuse_group_norm_act_traced(block)
    assert isinstance(fused, fx.GraphModule) and type(block.norm1) is nn.GroupNorm  # the block is not modified
    assert (type(fused.norm1), fused.norm1.act, fused.norm2.act) == (normlayers.GroupNorm, "silu", "silu")
    assert fused.norm1.weight is block.norm1.weight and fused.conv1 is block.conv1
    assert sorted(fused.state_dict()) == sorted(keys)
    silu_calls = [n for n in fused.graph.nodes if n.op == "call_module" and n.target == "nonlinearity"]
    assert [n.args[0].target for n in silu_calls] == ["temb"]  # only the time embedding's SiLU call is left
    # fp32 on backend auto (CPU tier): the same math within fp32 rounding. Its compiled NCHW kernel adds the parameter
    # gradients, sums of hundreds of O(1) terms, in another order than ATen's: 2.5e-6 relative apart here, so rtol 1e-5.
    for got, want in zip(_outputs_and_grads(fused), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The reference and the Triton kernels (interpreted) sum in another order, and the parameter gradients here are
    # sums of hundreds of O(1) terms: compared in fp64, where that order does not show, the rewrite itself is checked.
    expected64 = _outputs_and_grads(block.double(), torch.float64)
    for backend in ("reference", "triton"):
        with normlayers.backend(backend):
            for got, want in zip(_outputs_and_grads(fused, torch.float64), expected64):
                assert_close(got, want)
    fused.load_state_dict(block.state_dict())  # the keys round-trip


def test_functional_activations_fused_and_approximate_gelu_left():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.GroupNorm(2, 4), nn.GroupNorm(2, 4), nn.GroupNorm(2, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.silu(self.a(x), inplace=True) + torch.relu(self.b(x)) + F.gelu(self.c(x), approximate="tanh")

    block = _randomize(Block())
    x = torch.randn(2, 4, 3, 3)
    fused = fuse_group_norm_act_traced(block)
    assert (fused.a.act, fused.b.act, type(fused.c)) == ("silu", "relu", nn.GroupNorm)
    assert_close(fused(x), block(x))


class _NormOutputReused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.act = nn.GroupNorm(2, 4), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.act(h) + h


class _DataDependent(_NormOutputReused):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x)) if x.sum() > 0 else x


def test_refuses_ambiguous_blocks():
    reused = _NormOutputReused()
    with pytest.warns(UserWarning, match="its output is also used elsewhere"):
        assert fuse_group_norm_act_traced(reused) is reused
    with pytest.warns(UserWarning, match="does not trace"):
        assert fuse_group_norm_act_traced(_DataDependent()).__class__ is _DataDependent
    hooked = ResnetBlock2D()
    hooked.norm2.register_forward_pre_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="norm2 left alone: it or its activation has hooks"):
        fused = fuse_group_norm_act_traced(hooked)
    assert fused.norm1.act == "silu" and fused.norm2 is hooked.norm2  # the other norm is still fused
    hooked.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="ResnetBlock2D left alone: it has hooks"):
        assert fuse_group_norm_act_traced(hooked) is hooked


def test_refuses_shared_norm_and_dropped_parameters():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.act = nn.GroupNorm(2, 4), nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.norm(x)) + self.norm(x)

    with pytest.warns(UserWarning, match="called more than once"):
        assert isinstance(fuse_group_norm_act_traced(Shared()), Shared)
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.act = nn.Module(), nn.SiLU()
            self.inner.norm, self.inner.spare = nn.GroupNorm(2, 4), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.inner.norm(x))  # inner.spare is never called: the trace drops it

    nested = Nested()
    with pytest.warns(UserWarning, match="state_dict keys"):
        assert fuse_group_norm_act_traced(nested) is nested
    del nested.inner.spare
    assert fuse_group_norm_act_traced(nested).inner.norm.act == "silu" and type(nested.inner.norm) is nn.GroupNorm


def test_concrete_args_trace_the_path_without_temb():
    block = _randomize(ResnetBlock2D())
    x, _ = _inputs()
    fused = fuse_group_norm_act_traced(block, concrete_args={"temb": None})
    assert fused.norm1.act == "silu"
    assert not [n for n in fused.graph.nodes if n.op == "call_module" and n.target == "nonlinearity"]
    assert sorted(fused.state_dict()) == sorted(block.state_dict())  # time_emb_proj kept, though not called
    assert_close(fused(x, None), block(x, None))


def test_traced_fuse_after_replace_norms():
    block = _randomize(ResnetBlock2D())
    expected = _outputs_and_grads(block)
    normlayers.replace_norms(block)  # normlayers.GroupNorm(act=None) is traced as a call, not into its forward
    fused = fuse_group_norm_act_traced(block)
    assert (fused.norm1.act, fused.norm2.act) == ("silu", "silu")
    for got, want in zip(_outputs_and_grads(fused), expected):  # as in test_resnet_block_fused_with_temb_silu_kept
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
