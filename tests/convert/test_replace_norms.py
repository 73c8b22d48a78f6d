"""replace_norms / plan_replacements / restore_norms: same-math swaps keep outputs, parameters and keys; refusals."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import normlayers
from normlayers.convert import DEFAULT_MAPPING
from normlayers.testing import assert_lowprec_close

transformers = pytest.importorskip("transformers")


class _Net(nn.Module):
    """A LayerNorm, an RMSNorm and one LayerNorm reachable under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8, eps=1e-6)
        self.shared = nn.LayerNorm(8, bias=False)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), self.shared])
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.shared(self.blocks[0](self.rms(self.ln(x)))))


def _randomized(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


def _tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rms_norm_eps=1e-5)
    return _randomized(transformers.LlamaForCausalLM(config)).eval()


def test_default_mapping_swaps_same_math_norms_adopting_parameters():
    torch.manual_seed(0)
    model = _randomized(_Net())
    model.rms.eval()
    before = copy.deepcopy(model)
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8, requires_grad=True)

    assert normlayers.replace_norms(model) is model

    assert type(model.ln) is normlayers.LayerNorm and type(model.rms) is normlayers.RMSNorm
    assert model.shared is model.blocks[1] and type(model.shared) is normlayers.LayerNorm
    assert all(p is params[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    assert model.ln.training and not model.rms.training
    assert model.rms.eps == 1e-6
    y, y0 = model(x), before(x)
    torch.testing.assert_close(y, y0)
    g = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    g0 = torch.autograd.grad(y0.square().sum(), [x, *before.parameters()])
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b)
    # the optimizer still drives the module's parameters
    model(x).sum().backward()
    old = model.ln.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.ln.weight, old)


def test_state_dict_and_deepcopy_round_trip():
    torch.manual_seed(1)
    original = _randomized(_Net())
    replaced = normlayers.replace_norms(copy.deepcopy(_Net()))
    replaced.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(replaced(x), original(x))
    torch.testing.assert_close(copy.deepcopy(replaced)(x), original(x))
    back = _Net()
    back.load_state_dict(replaced.state_dict(), strict=True)
    torch.testing.assert_close(back(x), original(x))


def test_idempotent_and_plan_is_a_dry_run():
    model = _Net()
    plan = normlayers.plan_replacements(model)
    assert [(r.fqn, r.old_type, r.new_type) for r in plan] == [
        ("ln", nn.LayerNorm, normlayers.LayerNorm), ("rms", nn.RMSNorm, normlayers.RMSNorm),
        ("shared", nn.LayerNorm, normlayers.LayerNorm)]
    assert plan[2].aliases == ("blocks.1",)
    assert type(model.ln) is nn.LayerNorm  # nothing changed
    normlayers.replace_norms(model)
    modules = dict(model.named_modules())
    assert normlayers.plan_replacements(model) == []
    normlayers.replace_norms(model)
    assert all(m is modules[name] for name, m in model.named_modules())


def test_root_module_is_returned_new():
    ln = nn.LayerNorm(4)
    new = normlayers.replace_norms(ln)
    assert type(new) is normlayers.LayerNorm and new.weight is ln.weight


def test_filters_include_exclude():
    assert [r.fqn for r in normlayers.plan_replacements(_Net(), include="l*")] == ["ln"]
    assert [r.fqn for r in normlayers.plan_replacements(_Net(), exclude=["ln", "rms"])] == ["shared"]
    assert [r.fqn for r in normlayers.plan_replacements(_Net(), include="blocks.*")] == ["shared"]  # via its alias
    only_rms = normlayers.plan_replacements(_Net(), filter_fn=lambda m, fqn: isinstance(m, nn.RMSNorm))
    assert [r.fqn for r in only_rms] == ["rms"]
    with pytest.raises(TypeError, match="include"):
        normlayers.plan_replacements(_Net(), include=3)


class _ChannelsLastLN(nn.LayerNorm):
    def forward(self, x):  # a timm LayerNorm2d-like subclass: different behaviour
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _QuietLN(nn.LayerNorm):
    """A subclass that keeps nn.LayerNorm's forward."""


def test_subclasses_overriding_forward_are_refused_unless_mapped():
    model = nn.Sequential(_ChannelsLastLN(4), _QuietLN(4))
    with pytest.raises(ValueError, match=r"0: _ChannelsLastLN subclasses LayerNorm but overrides forward"):
        normlayers.replace_norms(model)
    assert type(model[0]) is _ChannelsLastLN and type(model[1]) is _QuietLN  # refused before any change
    with pytest.warns(UserWarning, match="0 left alone"):
        plan = normlayers.plan_replacements(model, strict=False)
    assert [(r.fqn, r.new_type, r.skipped) for r in plan] == [("0", None, True), ("1", normlayers.LayerNorm, False)]
    with pytest.warns(UserWarning, match="0 left alone"):
        normlayers.replace_norms(model, strict=False)
    assert type(model[0]) is _ChannelsLastLN and type(model[1]) is normlayers.LayerNorm
    # mapped explicitly: the user says how; verified on an NCHW probe, the first probe shape a channels-first norm takes
    kept = model[0]
    with pytest.raises(ValueError, match=r"replacing 0 \(_ChannelsLastLN\) by LayerNorm changes its outputs \(probe "
                                         r"of shape \[2, 4, 12, 12\]"):
        normlayers.replace_norms(model, {_ChannelsLastLN: normlayers.LayerNorm})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normlayers.replace_norms(model, {_ChannelsLastLN: lambda m: nn.Sequential(m)})
    assert model[0][0] is kept


class _VolumeLN(nn.LayerNorm):
    def forward(self, x):  # takes (N, C, D, H, W) only: no probe shape fits
        return super().forward(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


def test_a_module_no_probe_fits_is_swapped_unverified_with_a_warning():
    model = nn.Sequential(_VolumeLN(4))
    kept = model[0]
    with pytest.warns(UserWarning, match=r"0 \(_VolumeLN\) not verified: no probe of shape \[2, 3, 4\] or "
                                         r"\[2, 4, 12, 12\] runs through it"):
        normlayers.replace_norms(model, {_VolumeLN: lambda m: nn.Sequential(m)})
    assert model[0][0] is kept


class GatedRMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states, gate=None):
        return hidden_states


def test_gated_rmsnorm_is_refused():
    with pytest.raises(ValueError, match="gated or extra-argument"):
        normlayers.replace_norms(nn.Sequential(GatedRMSNorm(4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_and_gemma_rmsnorm_outputs_bitwise_equal(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(2)
    x = torch.randn(3, 5, 32, dtype=dtype)
    for cls, offset, cast in ((LlamaRMSNorm, 0.0, "llama"), (GemmaRMSNorm, 1.0, "torch")):
        hf = _randomized(cls(32, eps=1e-5)).to(dtype)
        new = normlayers.replace_norms(copy.deepcopy(hf))
        assert type(new) is normlayers.RMSNorm and (new.weight_offset, new.cast_mode, new.eps) == (offset, cast, 1e-5)
        with normlayers.backend("reference"):
            assert torch.equal(new(x), hf(x))
    # the test can fail: Llama's order (round, then scale) differs from rounding once, in bf16
    if dtype == torch.bfloat16:
        hf = _randomized(LlamaRMSNorm(32, eps=1e-5)).to(dtype)
        once = normlayers.RMSNorm(32, eps=1e-5, dtype=dtype)
        once.weight = hf.weight
        with normlayers.backend("reference"):
            assert not torch.equal(once(x), hf(x))


def _tiny_gemma():
    config = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=32)
    return _randomized(transformers.GemmaForCausalLM(config)).eval()


@pytest.mark.parametrize("build, norm_class", [(_tiny_llama, "LlamaRMSNorm"), (_tiny_gemma, "GemmaRMSNorm")])
def test_hf_model_outputs_and_gradients_unchanged(build, norm_class):
    torch.manual_seed(3)
    model = build()
    before = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 6))
    plan = normlayers.plan_replacements(model)
    assert {r.old_type.__name__ for r in plan} == {norm_class} and len(plan) == 2 * 2 + 1
    normlayers.replace_norms(model)
    assert not any(type(m).__name__ == norm_class for m in model.modules())
    y, y0 = model(ids).logits, before(ids).logits
    torch.testing.assert_close(y, y0)
    y.square().mean().backward()
    y0.square().mean().backward()
    for (name, p), p0 in zip(model.named_parameters(), before.parameters()):
        torch.testing.assert_close(p.grad, p0.grad, msg=name)


def test_verify_catches_a_wrong_mapping_before_changing_anything():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    wrong = {nn.LayerNorm: lambda m: normlayers.RMSNorm(m.normalized_shape, eps=m.eps)}
    with pytest.raises(ValueError, match=r"replacing 0 \(LayerNorm\) by RMSNorm changes its outputs"):
        normlayers.replace_norms(model, wrong)
    assert type(model[0]) is nn.LayerNorm
    normlayers.replace_norms(model, wrong, verify=False)
    assert type(model[0]) is normlayers.RMSNorm

    gemma = nn.Sequential(_randomized(GemmaRMSNorm(8)))
    no_offset = {"*RMSNorm": functools.partial(normlayers.RMSNorm, weight_offset=0.0)}
    with pytest.raises(ValueError, match="changes its outputs"):
        normlayers.replace_norms(gemma, no_offset)


def test_meta_device_model_then_load():
    torch.manual_seed(4)
    real = _randomized(_Net())
    with torch.device("meta"):
        meta = _Net()
    with pytest.warns(UserWarning, match="meta device"):
        normlayers.replace_norms(meta)
    assert type(meta.ln) is normlayers.LayerNorm and meta.ln.weight.is_meta
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    x = torch.randn(2, 8)
    torch.testing.assert_close(meta(x), real(x))


def test_wrapped_models_are_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(_Net())
        with pytest.raises(ValueError, match="DistributedDataParallel; call replace_norms before wrapping"):
            normlayers.replace_norms(ddp)
        outer = nn.Module()
        outer.inner = ddp
        with pytest.raises(ValueError, match="the module at 'inner'"):
            normlayers.plan_replacements(outer)
        from torch.distributed.fsdp import fully_shard

        sharded = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        fully_shard(sharded[1])
        with pytest.raises(ValueError, match="the module at '1' is wrapped by FSDPLayerNorm; call replace_norms"):
            normlayers.replace_norms(sharded)
    finally:
        dist.destroy_process_group()


def test_compiled_model_is_handled_through_the_original():
    torch.manual_seed(5)
    model = _Net()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 8)
    compiled(x)
    scaled = {nn.LayerNorm: lambda m: nn.Sequential(normlayers.LayerNorm(m.normalized_shape, bias=m.bias is not None),
                                                    _Double())}
    with pytest.warns(UserWarning, match="recompiles"):
        assert normlayers.replace_norms(compiled, scaled, verify=False) is compiled
    assert isinstance(model.ln, nn.Sequential)
    torch.testing.assert_close(compiled(x), model(x))  # the new module runs, not a stale graph


class _Double(nn.Module):
    def forward(self, x):
        return 2 * x


def test_functional_swaps_only_when_mapped():
    torch.manual_seed(6)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    plan = normlayers.plan_replacements(cnn)  # the BatchNorm is reported as left alone, with the reason; the conv not
    assert [(r.fqn, r.old_type, r.new_type, r.skipped) for r in plan] == [("1", nn.BatchNorm2d, None, True)]
    assert "norm-like" in plan[0].reason and "no entry" in plan[0].reason
    conv_w, bn_w, mean = cnn[0].weight, cnn[1].weight, cnn[1].running_mean
    mapping = {nn.Conv2d: normlayers.WSConv2d,
               nn.BatchNorm2d: functools.partial(normlayers.BatchChannelNorm2d, num_groups=4)}
    normlayers.replace_norms(cnn, mapping)
    assert type(cnn[0]) is normlayers.WSConv2d and cnn[0].weight is conv_w
    bcn = cnn[1]
    assert type(bcn) is normlayers.BatchChannelNorm2d and bcn.num_groups == 4
    assert bcn.bn.weight is bn_w and bcn.bn.running_mean is mean
    assert torch.equal(bcn.weight, torch.ones(1, 4, 1)) and not bcn.weight.is_meta
    assert cnn(torch.randn(2, 3, 6, 6)).shape == (2, 8, 4, 4)
    with pytest.raises(TypeError, match="BatchChannelNorm2d adopts an nn.BatchNorm2d"):
        normlayers.replace_norms(nn.Sequential(nn.LayerNorm(4)), {nn.LayerNorm: normlayers.BatchChannelNorm2d})


def test_restore_norms_gives_back_the_original_classes():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    torch.manual_seed(7)
    model = _tiny_llama()
    keys = model.state_dict()
    normlayers.replace_norms(model)
    normlayers.restore_norms(model)
    assert sum(type(m).__name__ == "LlamaRMSNorm" for m in model.modules()) == 5
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    vanilla = transformers.LlamaForCausalLM(model.config).eval()
    vanilla.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(model(ids).logits, vanilla(ids).logits)

    # modules built as normlayers ones: plain torch equivalents with the same function
    gemma_like = nn.Sequential(normlayers.RMSNorm(6, eps=1e-6, weight_offset=1.0), normlayers.WSConv2d(1, 2, 1),
                               normlayers.CRMSNorm(5))
    _randomized(gemma_like)
    x = torch.randn(2, 6)
    expected = gemma_like[0](x)
    with pytest.warns(UserWarning, match=r"2 \(CRMSNorm\)"):
        normlayers.restore_norms(gemma_like)
    assert type(gemma_like[0]) is nn.RMSNorm and type(gemma_like[1]) is nn.Conv2d
    torch.testing.assert_close(gemma_like[0](x), expected)
    hf = _randomized(GemmaRMSNorm(6))
    back = normlayers.restore_norms(normlayers.replace_norms(hf))
    assert type(back) is GemmaRMSNorm and back.weight is hf.weight


def test_llama_cast_mode_with_fused_residual():
    torch.manual_seed(8)
    norm = _randomized(normlayers.RMSNorm(16, eps=1e-5, cast_mode="llama")).to(torch.bfloat16)
    x, res = torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(2, 3, 16, dtype=torch.bfloat16)
    with normlayers.backend("reference"):
        y, h = norm(x, res)
        assert torch.equal(h, x + res)
        assert torch.equal(y, norm.weight * normlayers.functional.rms_norm(h, (16,), None, 1e-5))


def test_cast_mode_is_checked():
    with pytest.raises(ValueError, match="cast_mode"):
        normlayers.RMSNorm(4, cast_mode="gemma")
    assert "cast_mode='llama'" in repr(normlayers.RMSNorm(4, cast_mode="llama"))


def test_default_mapping_is_same_math_only():
    assert set(DEFAULT_MAPPING.values()) == {normlayers.LayerNorm, normlayers.RMSNorm, normlayers.GroupNorm}


class ToyRMSNorm(nn.Module):
    """Not a normlayers class: an RMS norm that only follows the conversion protocol (``from_module``, ``to_torch``);
    ``gain`` scales its output, so a ``gain`` other than 1 is a wrong conversion that verification must catch."""

    def __init__(self, width: int, eps, gain: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps, self.gain = eps, gain

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> "ToyRMSNorm":
        if type(module) is not nn.RMSNorm:
            raise TypeError(f"ToyRMSNorm adopts an nn.RMSNorm, got {type(module).__name__}")
        new = cls(module.normalized_shape[0], module.eps, **kwargs)
        new.weight = module.weight
        return new

    def forward(self, x):
        return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps) * self.gain

    def to_torch(self) -> nn.RMSNorm:
        plain = nn.RMSNorm(self.weight.shape, self.eps)
        plain.weight = self.weight
        return plain


def test_a_class_with_the_conversion_protocol_plugs_in_without_convert_knowing_it():
    torch.manual_seed(9)
    model = _randomized(nn.Sequential(nn.RMSNorm(8, eps=1e-6), nn.Linear(8, 8)))
    weight, x = model[0].weight, torch.randn(3, 8)
    expected = model(x)
    assert normlayers.plan_replacements(model, {nn.RMSNorm: ToyRMSNorm})[0].new_type is ToyRMSNorm
    normlayers.replace_norms(model, {nn.RMSNorm: ToyRMSNorm})
    assert type(model[0]) is ToyRMSNorm and model[0].weight is weight
    assert torch.equal(model(x), expected)
    normlayers.restore_norms(model)  # the class it replaced, around the same parameter
    assert type(model[0]) is nn.RMSNorm and model[0].weight is weight and torch.equal(model(x), expected)
    # built directly, it goes back through its own to_torch
    toy = nn.Sequential(ToyRMSNorm.from_module(model[0]))
    assert type(normlayers.restore_norms(toy)[0]) is nn.RMSNorm and toy[0].weight is weight
    # verification applies to it: bit-for-bit unless the class says otherwise
    with pytest.raises(ValueError, match=r"replacing 0 \(RMSNorm\) by ToyRMSNorm changes its outputs"):
        normlayers.replace_norms(model, {nn.RMSNorm: functools.partial(ToyRMSNorm, gain=1.0 + 2**-20)})
    assert type(model[0]) is nn.RMSNorm
    with pytest.raises(TypeError, match="ToyRMSNorm adopts an nn.RMSNorm"):
        normlayers.replace_norms(nn.Sequential(nn.LayerNorm(8)), {nn.LayerNorm: ToyRMSNorm})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_t5_layer_norm_is_recognized_and_swapped_exactly(dtype):
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(10)
    model = nn.Sequential(_randomized(T5LayerNorm(32, eps=1e-6))).to(dtype)
    before = copy.deepcopy(model)
    plan = normlayers.plan_replacements(model)
    assert [(r.old_type, r.new_type) for r in plan] == [(T5LayerNorm, normlayers.RMSNorm)]
    normlayers.replace_norms(model)
    assert type(model[0]) is normlayers.RMSNorm and model[0].eps == 1e-6
    x = torch.randn(4, 7, 32, dtype=dtype)
    with normlayers.backend("reference"):
        assert torch.equal(model(x), before(x))
    assert type(normlayers.restore_norms(model)[0]) is T5LayerNorm


class _ScaleThenRoundRMSNorm(nn.Module):
    """OLMo2's casting order, ``(w · x̂).to(dtype)``, in a class whose source mentions Gemma's offset in a comment."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states):
        # no `1 + self.weight` here (unlike Gemma): the weight multiplies in fp32, then one rounding
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * x).to(hidden_states.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_order_and_offset_are_probed_from_behaviour(dtype):
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    torch.manual_seed(11)
    x = torch.randn(4, 7, 64, dtype=dtype)
    for cls in (_ScaleThenRoundRMSNorm, Olmo2RMSNorm):
        original = _randomized(cls(64)).to(dtype)
        new = normlayers.replace_norms(copy.deepcopy(original))
        assert (new.weight_offset, new.cast_mode) == (0.0, "torch")
        with normlayers.backend("reference"):
            assert torch.equal(new(x), original(x)), cls.__name__
    # probed on a copy with random parameters: a meta-device model works too, and a fresh weight (ones) hides nothing
    with torch.device("meta"):
        meta = nn.Sequential(Olmo2RMSNorm(64), transformers.models.llama.modeling_llama.LlamaRMSNorm(64))
    with pytest.warns(UserWarning, match="meta device"):
        normlayers.replace_norms(meta)
    assert [m.cast_mode for m in meta] == ["torch", "llama"]


def test_verify_compares_bit_for_bit_in_the_model_dtype():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(12)
    model = nn.Sequential(_randomized(LlamaRMSNorm(64, eps=1e-5))).to(torch.bfloat16)

    def rounds_once(m):  # Llama rounds the normalized input and then scales: rounding once is close, not the same
        new = normlayers.RMSNorm(64, eps=m.variance_epsilon, dtype=torch.bfloat16)
        new.weight = m.weight
        return new

    with pytest.raises(ValueError, match=r"changes its outputs \(probe of shape \[2, 3, 64\], torch.bfloat16, compared "
                                         r"bit-for-bit\)"):
        normlayers.replace_norms(model, {LlamaRMSNorm: rounds_once})
    with pytest.raises(ValueError, match="changes its outputs with every variant tried"):  # the same, probed
        normlayers.replace_norms(model, {"*RMSNorm": functools.partial(normlayers.RMSNorm, cast_mode="torch")})
    assert type(model[0]) is LlamaRMSNorm


def test_a_nan_weight_does_not_fail_verification():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = nn.Sequential(nn.LayerNorm(8), nn.RMSNorm(8), LlamaRMSNorm(8))
    with torch.no_grad():
        for norm in model:
            norm.weight[3] = float("nan")
    before = copy.deepcopy(model)
    normlayers.replace_norms(model)
    assert [type(m) for m in model] == [normlayers.LayerNorm, normlayers.RMSNorm, normlayers.RMSNorm]
    x = torch.randn(2, 8)
    with normlayers.backend("reference"):
        torch.testing.assert_close(model(x), before(x), equal_nan=True)
    # a wrong mapping is still caught with a NaN in the weight
    gemma_offset = {nn.RMSNorm: functools.partial(normlayers.RMSNorm, weight_offset=1.0)}
    with pytest.raises(ValueError, match="changes its outputs"):
        normlayers.replace_norms(nn.Sequential(copy.deepcopy(before[1])), gemma_offset)


def test_probed_swaps_run_on_the_triton_path():
    """The casting orders the probe picks are what the kernels compute too (to the kernels' own rounding)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    pytest.importorskip("triton")
    torch.manual_seed(13)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    for cls in (LlamaRMSNorm, Olmo2RMSNorm, GemmaRMSNorm):  # the three (offset, casting order) pairs in use
        original = _randomized(cls(64)).to(torch.bfloat16)
        new = normlayers.replace_norms(copy.deepcopy(original))
        with normlayers.backend("triton"):
            actual = new(x)
        expected64 = copy.deepcopy(original).double()(x.double())
        assert_lowprec_close(actual, original(x), expected64, msg=cls.__name__)


def test_from_module_and_to_torch_on_the_classes():
    torch.manual_seed(14)
    ln = _randomized(nn.LayerNorm((2, 4), eps=1e-3, bias=False))
    ours = normlayers.LayerNorm.from_module(ln)
    assert (ours.normalized_shape, ours.eps, ours.bias, ours.weight is ln.weight) == ((2, 4), 1e-3, None, True)
    plain = ours.to_torch()
    assert type(plain) is nn.LayerNorm and plain.weight is ln.weight and plain.bias is None
    rms = normlayers.RMSNorm.from_module(nn.RMSNorm(6, elementwise_affine=False), cast_mode="llama")
    assert (rms.eps, rms.weight, rms.cast_mode) == (None, None, "llama")
    conv = nn.Conv2d(2, 4, 3, bias=False)
    scaled = normlayers.ScaledWSConv2d.from_module(conv, gain_init=0.5)
    assert scaled.weight is conv.weight and torch.equal(scaled.gain, torch.full((4, 1, 1, 1), 0.5))
    assert type(scaled.to_torch()) is nn.Conv2d
    with pytest.raises(TypeError, match="no conversion from BatchNorm1d to normlayers.LayerNorm: it holds"):
        normlayers.LayerNorm.from_module(nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match="no conversion from Linear to normlayers.LayerNorm: it has neither"):
        normlayers.LayerNorm.from_module(nn.Linear(3, 3))
    with pytest.raises(TypeError, match=r"no conversion from LayerNorm to normlayers.RMSNorm: it holds \['weight', "
                                        r"'bias'\]"):
        normlayers.RMSNorm.from_module(nn.LayerNorm(4))
    with pytest.raises(TypeError, match="neither a `normalized_shape` nor a 1-D `weight`"):
        normlayers.RMSNorm.from_module(nn.Identity())
    with pytest.raises(TypeError, match="would hold parameters"):
        normlayers.LayerNorm.from_module(nn.LayerNorm(4), elementwise_affine=False)
    with pytest.raises(TypeError, match="no conversion from Linear to WSConv2d"):
        normlayers.WSConv2d.from_module(nn.Linear(3, 3))


class ToyRmsNorm(nn.Module):
    """An RMS norm whose class name spells RMS in another case (timm's spelling)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        self.eps = 1e-6

    def forward(self, x):
        return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)


class PlainLayernorm(nn.Module):
    """A real layer norm matched by the "*LayerNorm" pattern in any case; RMSNorm does not compute it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        self.eps = 1e-6

    def forward(self, x):
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, None, self.eps)


def test_class_name_patterns_match_in_any_case_and_what_is_left_alone_is_reported():
    model = nn.Sequential(ToyRmsNorm(8), PlainLayernorm(8), nn.BatchNorm1d(8), nn.Linear(8, 8))
    plan = normlayers.plan_replacements(model)
    assert [(r.fqn, r.new_type, r.skipped) for r in plan] == [
        ("0", normlayers.RMSNorm, False), ("1", None, True), ("2", None, True)]  # the Linear is not norm-like
    assert "matches '*RMSNorm'" in plan[0].reason
    assert "class name matches '*LayerNorm' but replacing it by RMSNorm changes its outputs" in plan[1].reason
    assert "no entry" in plan[2].reason
    x = torch.randn(3, 8)
    expected = model[0](x)
    normlayers.replace_norms(model)
    assert type(model[0]) is normlayers.RMSNorm and type(model[1]) is PlainLayernorm
    with normlayers.backend("reference"):
        assert torch.equal(model[0](x), expected)


def test_evo_norm_converts_from_its_own_class_and_restores_to_timms_or_stays():
    """timm is optional: without it an EvoNorm has no plain equivalent, and restore_norms keeps it with a warning."""
    source = normlayers.EvoNorm2dS1(8, groups=2, act_layer=nn.GELU)
    new = normlayers.EvoNorm2dS1.from_module(source)
    assert new is not source and new.weight is source.weight and new.act is source.act and new.groups == 2
    with pytest.raises(TypeError, match="adopts timm's EvoNorm2dS0"):
        normlayers.EvoNorm2dS0.from_module(source)
    model = nn.Sequential(new)
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match=r"0 \(EvoNorm2dS1\); left in place"):
            normlayers.restore_norms(model)
        assert model[0] is new
    else:
        normlayers.restore_norms(model)
        assert type(model[0]).__name__ == "EvoNorm2dS1" and type(model[0]).__module__.startswith("timm.")
        assert model[0].weight is new.weight and model[0].act is new.act
