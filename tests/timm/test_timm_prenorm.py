"""Exact Pre-LN → Pre-RMSNorm / Pre-CRMSNorm conversion of timm's ``VisionTransformer`` without a hand-written spec.

The oracle is the timm model itself before the conversion, in fp64 (the conversion's promise: outputs equal to 1e-9
relative). Parameters are perturbed away from timm's init (zero biases, LayerScale 1e-5) so every folded term counts.
"""

from __future__ import annotations

import pytest
import torch

from normlayers import CRMSNorm, RMSNorm
from normlayers.convert import RecentredNorm, prenorm_to_crmsnorm, prenorm_to_rmsnorm

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.timm

CASES = {
    "cls_token": {},
    "avg_pool_fc_norm": {"global_pool": "avg"},
    "no_head": {"num_classes": 0},
    "registers_layer_scale": {"reg_tokens": 2, "init_values": 0.1},
    "norm_pre": {"pre_norm": True, "init_values": 0.3},
    "no_class_token": {"class_token": False, "global_pool": "avg", "no_embed_class": True},
    "qk_norm": {"qk_norm": True},
}


def _vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, **kwargs)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("compress", (False, True), ids=("rms", "crms"))
@pytest.mark.parametrize("case", list(CASES))
def test_timm_vit_converts_exactly(case: str, compress: bool) -> None:
    model = _vit(**CASES[case])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    (prenorm_to_crmsnorm if compress else prenorm_to_rmsnorm)(model)
    norm_type = CRMSNorm if compress else RMSNorm
    assert all(isinstance(blk.norm1, norm_type) and isinstance(blk.norm2, norm_type) for blk in model.blocks)
    assert not any(type(m).__name__ == "LayerNorm" for name, m in model.named_modules()
                   if not name.startswith("norm_pre") and ".q_norm" not in name and ".k_norm" not in name)
    if CASES[case].get("pre_norm"):
        assert isinstance(model.norm_pre, RecentredNorm)
    with torch.no_grad():
        actual = model(x)
    assert actual.shape == expected.shape
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-9


def test_swiglu_mlp_reads_through_both_projections() -> None:
    from timm.layers import SwiGLU

    model = _vit(mlp_layer=SwiGLU)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    prenorm_to_rmsnorm(model)
    with torch.no_grad():
        assert ((model(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-9


@pytest.mark.parametrize("kwargs, match", [
    ({"global_pool": "max"}, "global_pool='max'"),
    ({"global_pool": "map"}, "attn_pool"),
    ({"block_fn": "ResPostBlock"}, "blocks.0 is a ResPostBlock"),
])
def test_timm_vit_refusals_name_the_module(kwargs: dict, match: str) -> None:
    if kwargs.get("block_fn") == "ResPostBlock":
        from timm.models.vision_transformer import ResPostBlock

        kwargs = {"block_fn": ResPostBlock}
    model = _vit(**kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prenorm_to_rmsnorm(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused conversion must not modify the model"
