"""Pre-LN → Pre-RMSNorm → Pre-CRMSNorm: exact in fp64 on GPT-2, ViT and TransformerLM; refusals name the module."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlayers
from normlayers.convert import OutputRMSNorm, PreNormSpec, prenorm_to_crmsnorm, prenorm_to_rmsnorm
from normlayers.testing import assert_close
from normlayers.testing.models import TransformerLM

transformers = pytest.importorskip("transformers")

CONVERSIONS = [prenorm_to_rmsnorm, prenorm_to_crmsnorm]


def _random_affines(model: nn.Module) -> nn.Module:
    """LayerNorms start at γ=1, β=0; random ones make the folding step do something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model


def _gpt2(head: bool = True, **overrides):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, **overrides)
    cls = transformers.GPT2LMHeadModel if head else transformers.GPT2Model
    return _random_affines(cls(config)).double().eval()


def _vit(classifier: bool = False):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=16, patch_size=8, num_labels=5)
    cls = transformers.ViTForImageClassification if classifier else transformers.ViTModel
    return _random_affines(cls(config)).double().eval()


def _lm(**kwargs):
    return _random_affines(TransformerLM(vocab_size=50, d_model=24, n_heads=3, n_layers=2, **kwargs)).double().eval()


def _outputs(model, inputs):
    out = model(*inputs)
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in (getattr(out, "logits", None), getattr(out, "last_hidden_state", None),
                        getattr(out, "pooler_output", None)) if t is not None]


def _tokens(vocab):
    return (torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1)),)


def _pixels():
    return (torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),)


CASES = {
    "transformer_lm": (_lm, lambda: _tokens(50), {}),
    "gpt2_lm_head": (_gpt2, lambda: _tokens(64), {"untie_embeddings": True}),
    "vit_model": (_vit, _pixels, {}),
    "vit_classifier": (lambda: _vit(classifier=True), _pixels, {}),
}


@pytest.mark.parametrize("convert", CONVERSIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_in_fp64(case, convert):
    torch.manual_seed(0)
    build, inputs, kwargs = CASES[case]
    model = build()
    x = inputs()
    expected = _outputs(model, x)
    assert convert(model, **kwargs) is model
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, normlayers.RMSNorm, normlayers.CRMSNorm))]
    assert not any(isinstance(m, nn.LayerNorm) for m in norms)
    wanted = normlayers.CRMSNorm if convert is prenorm_to_crmsnorm else normlayers.RMSNorm
    assert norms and all(type(m) is wanted and m.weight is None for m in norms)
    for actual, ref in zip(_outputs(model, x), expected):
        torch.testing.assert_close(actual, ref, rtol=0, atol=1e-9 * ref.abs().max().item())


def test_gpt2_model_without_head_keeps_its_final_affine():
    torch.manual_seed(1)
    model = _gpt2(head=False)
    x = _tokens(64)
    expected = model(*x).last_hidden_state
    ln_f_weight = model.ln_f.weight
    prenorm_to_rmsnorm(model)
    assert type(model.ln_f) is OutputRMSNorm and model.ln_f.weight is ln_f_weight
    torch.testing.assert_close(model(*x).last_hidden_state, expected, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="GPT2Model cannot be compressed"):
        prenorm_to_crmsnorm(_gpt2(head=False))


def test_compressed_widths_and_untied_head():
    torch.manual_seed(2)
    model = _gpt2()
    prenorm_to_crmsnorm(model, untie_embeddings=True)
    assert model.transformer.wte.weight.shape == (64, 31) and model.transformer.wte.embedding_dim == 31
    assert model.lm_head.weight.shape == (64, 31) and model.lm_head.bias is not None
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.config.tie_word_embeddings is False
    assert model.transformer.h[0].attn.c_attn.weight.shape == (31, 96)


def test_vit_input_gradients_unchanged():
    torch.manual_seed(3)
    model = _vit()
    converted = prenorm_to_crmsnorm(copy.deepcopy(model))
    x = _pixels()[0].requires_grad_()
    grads = []
    for m in (model, converted):
        out = m(x)
        (g,) = torch.autograd.grad(out.last_hidden_state.square().sum() + out.pooler_output.sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)


def test_fp32_outputs_close():
    torch.manual_seed(4)
    model = _lm().float()
    x = _tokens(50)
    expected = model(*x)
    prenorm_to_crmsnorm(model)
    assert model.tok_emb.weight.dtype == torch.float32
    # fp32 rounding only (the conversion is exact in fp64, tests above): the folded weights and the other norm round
    # differently, within the fp32 tolerances of normlayers.testing (measured: 4.8e-7 on outputs of magnitude ~2).
    assert_close(model(*x), expected)


def test_parameters_of_unchanged_shape_keep_their_identity():
    model = _lm()
    fc1 = model.blocks[0].mlp.fc1.weight
    prenorm_to_rmsnorm(model)
    assert model.blocks[0].mlp.fc1.weight is fc1


def test_state_dict_round_trip_of_a_converted_model():
    torch.manual_seed(5)
    source = prenorm_to_crmsnorm(_lm())
    target = prenorm_to_crmsnorm(_lm())
    target.load_state_dict(source.state_dict())
    x = _tokens(50)
    torch.testing.assert_close(target(*x), source(*x))


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_tied_embeddings_are_refused_unless_untied():
    model = _gpt2()
    before = _params(model)
    with pytest.raises(ValueError, match=r"lm_head.weight is tied \(transformer.wte.weight, lm_head.weight\).*"
                                         r"untie_embeddings=True"):
        prenorm_to_rmsnorm(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    tied = _lm(tie_embeddings=True)
    with pytest.raises(ValueError, match="head.weight is tied"):
        prenorm_to_rmsnorm(tied)


def test_post_ln_and_foreign_norms_are_refused():
    with pytest.raises(ValueError, match=r"blocks.0 is a Post-LN block"):
        prenorm_to_rmsnorm(_lm(norm_first=False))
    model = _gpt2()
    model.transformer.h[1].attn.q_norm = nn.LayerNorm(8)
    with pytest.raises(ValueError, match=r"transformer.h.1.attn.q_norm \(LayerNorm\) is a norm outside"):
        prenorm_to_rmsnorm(model, untie_embeddings=True)
    with pytest.raises(ValueError, match=r"h.0.crossattention"):
        prenorm_to_rmsnorm(_gpt2(add_cross_attention=True))
    with pytest.raises(TypeError, match="no built-in description of Sequential"):
        prenorm_to_rmsnorm(nn.Sequential(nn.LayerNorm(4)))
    converted = prenorm_to_rmsnorm(_lm())
    with pytest.raises(ValueError, match="already converted"):
        prenorm_to_rmsnorm(converted)


def test_verify_catches_a_wrong_description():
    model = _lm()
    spec = normlayers.convert.prenorm_spec(model)
    spec.writers.remove("pos_emb")  # the position table also writes the stream: the stream is not zero-mean
    with pytest.raises(RuntimeError, match="outputs differ from the original's"):
        prenorm_to_rmsnorm(model, spec)


def test_custom_spec():
    """A user-described Pre-LN model: two embeddings, one residual linear, a final norm read by a head."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.norm = nn.LayerNorm(6)
            self.branch = nn.Linear(6, 6)
            self.final = nn.LayerNorm(6)
            self.head = nn.Linear(6, 3)

        def forward(self, ids):
            x = self.emb(ids)
            x = x + self.branch(self.norm(x))
            return self.head(self.final(x))

    model = _random_affines(Tiny()).double().eval()
    ids = torch.arange(10).view(2, 5)
    expected = model(ids)
    spec = PreNormSpec(width=6, writers=["emb", "branch"], norms={"norm": ["branch"], "final": ["head"]},
                       example_inputs=lambda m: (ids,))
    with pytest.raises(ValueError, match="emb writes width 6, not the stream width 5"):
        prenorm_to_crmsnorm(copy.deepcopy(model), PreNormSpec(width=5, writers=["emb"], norms={}))
    prenorm_to_crmsnorm(model, spec)  # `branch` both reads a norm and writes the stream
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("compressed", [False, True])
def test_output_rms_norm_equals_layer_norm_on_a_zero_mean_stream(compressed):
    torch.manual_seed(6)
    ln = _random_affines(nn.LayerNorm(7, eps=1e-6)).double()
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    out = OutputRMSNorm(7, eps=1e-6, compressed=compressed, dtype=torch.float64)
    out.load_state_dict(ln.state_dict())  # same keys as the LayerNorm it replaces
    y = out(x[..., :-1] if compressed else x)
    torch.testing.assert_close(y, ln(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(copy.deepcopy(out)(x[..., :6] if compressed else x), y)
    compiled = torch.compile(out, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x[..., :6] if compressed else x), y)
    assert out.to(torch.float32).weight.dtype == torch.float32
    with torch.device("meta"):
        assert OutputRMSNorm(7, compressed=compressed).weight.is_meta
    assert "compressed=" in repr(out)
