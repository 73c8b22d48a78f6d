"""fold_norms: eval-mode affine norms disappear into the adjacent linear map; outputs unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import normlayers
from normlayers.convert import fold_norms
from normlayers.testing import assert_close


class ChannelAffineNorm(nn.Module):
    """Test stand-in for UnifiedNorm in eval: channels-last ``x / sqrt(running_var + eps) · weight + bias``,
    exposing the ``as_affine() -> (scale, shift)`` contract that fold_norms duck-types."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.randn(channels))
        self.bias = nn.Parameter(torch.randn(channels))
        self.register_buffer("running_var", torch.rand(channels) + 0.5)

    def as_affine(self) -> tuple[Tensor, Tensor]:
        scale = self.weight / torch.sqrt(self.running_var + self.eps)
        return scale, self.bias

    def forward(self, x: Tensor) -> Tensor:
        return x / torch.sqrt(self.running_var + self.eps) * self.weight + self.bias


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def _assert_same(model: nn.Module, x: Tensor, **kwargs) -> nn.Module:
    expected = model(x)
    folded = fold_norms(model, **kwargs)
    torch.testing.assert_close(folded(x), expected, rtol=1e-10, atol=1e-10)
    return folded


def test_sequential_cnn_with_bn_and_ws():
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        normlayers.WSConv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
    )).double().eval()
    _assert_same(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert [type(m) for m in model] == [nn.Conv2d, nn.Identity, nn.ReLU, nn.Conv2d, nn.Identity, nn.ReLU]
    assert model[3].bias is not None  # the shift needed one


class _Residual(nn.Module):
    """Traces with torch.fx; conv2's output has two readers, so its BN cannot go into it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.bn2(y) + y


def test_fx_flow_folds_only_single_reader_producers():
    torch.manual_seed(1)
    model = _randomize_bn(_Residual()).double().eval()
    _assert_same(model, torch.randn(2, 4, 3, 3, dtype=torch.float64))
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn2, nn.BatchNorm2d)


def test_as_affine_modules_fold_into_producer_or_consumer():
    torch.manual_seed(2)
    after_linear = nn.Sequential(nn.Linear(6, 5), ChannelAffineNorm(5), nn.GELU()).double().eval()
    _assert_same(after_linear, torch.randn(3, 4, 6, dtype=torch.float64))
    assert isinstance(after_linear[1], nn.Identity)
    first = nn.Sequential(ChannelAffineNorm(6), nn.Linear(6, 3, bias=False)).double().eval()
    _assert_same(first, torch.randn(3, 4, 6, dtype=torch.float64))
    assert isinstance(first[0], nn.Identity) and first[1].bias is not None
    alone = nn.Sequential(ChannelAffineNorm(6), nn.GELU()).double().eval()
    _assert_same(alone, torch.randn(3, 6, dtype=torch.float64))
    assert isinstance(alone[0], ChannelAffineNorm)  # nothing to fold into


def test_batch_channel_norm_becomes_group_norm():
    torch.manual_seed(3)
    bcn = normlayers.BatchChannelNorm2d(8, num_groups=4)
    with torch.no_grad():
        for t in (bcn.bn.running_mean, bcn.bn.weight, bcn.bn.bias, bcn.weight, bcn.bias):
            t.normal_()
        bcn.bn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bcn, nn.ReLU()).double().eval()
    _assert_same(model, torch.randn(2, 3, 7, 7, dtype=torch.float64))
    assert type(model[1]) is nn.GroupNorm


class _PreNormAttentionInputs(nn.Module):
    """A LayerNorm read by three linear maps (q, k, v) and, separately, one read by something else."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.q, self.k, self.v = nn.Linear(8, 4), nn.Linear(8, 4, bias=False), nn.Linear(8, 4)
        self.other = normlayers.LayerNorm(8)

    def forward(self, x):
        h = self.norm(x)
        return torch.cat([self.q(h), self.k(h), self.v(h), self.other(x).tanh()], dim=-1)


def test_layer_norm_affine_goes_into_the_readers():
    torch.manual_seed(4)
    model = _PreNormAttentionInputs().double().eval()
    with torch.no_grad():
        for m in (model.norm, model.other):
            m.weight.normal_()
            m.bias.normal_()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    _assert_same(model, x, example_inputs=(x,))
    assert not model.norm.elementwise_affine and model.k.bias is not None
    assert model.other.elementwise_affine  # read by tanh: left alone


def test_training_mode_is_refused_and_verify_catches_a_bad_fold():
    with pytest.raises(ValueError, match="model.eval"):
        fold_norms(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))

    class Lying(ChannelAffineNorm):
        def as_affine(self):
            scale, shift = super().as_affine()
            return scale, shift + 1

    model = nn.Sequential(nn.Linear(4, 4), Lying(4)).double().eval()
    with pytest.raises(RuntimeError, match="outputs changed"):
        fold_norms(model, example_inputs=(torch.randn(2, 4, dtype=torch.float64),))


def test_fp32_fold_and_state_dict():
    torch.manual_seed(5)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(1, 3, 5, 5)
    expected = model(x)
    fold_norms(copy.deepcopy(model))
    folded = fold_norms(model)
    # fp32 rounding only (folding is exact in fp64, tests above): W·scale and the folded bias round differently, within
    # the fp32 tolerances of normlayers.testing (measured: 2.4e-7 on outputs of magnitude ~2).
    assert_close(folded(x), expected)
    assert set(folded.state_dict()) == {"0.weight", "0.bias"}


class _ChannelsFirstAffineNorm(ChannelAffineNorm):
    channel_dim = 1

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.as_affine()
        return x * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)


def test_channel_axis_decides_the_producer():
    """A channels-last affine after a conv scales the conv's last (width) axis, not its channels: not folded."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), ChannelAffineNorm(4)).double().eval()
    _assert_same(model, torch.randn(1, 2, 3, 4, dtype=torch.float64))
    assert isinstance(model[1], ChannelAffineNorm)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), _ChannelsFirstAffineNorm(4)).double().eval()
    _assert_same(model, torch.randn(1, 2, 3, 4, dtype=torch.float64))
    assert isinstance(model[1], nn.Identity)
    mlp = _randomize_bn(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())).double().eval()
    with torch.no_grad():
        mlp[1].running_mean.normal_()
    _assert_same(mlp, torch.randn(5, 3, dtype=torch.float64))
    assert isinstance(mlp[1], nn.Identity)


def test_a_model_that_is_one_standardized_conv_is_returned_baked():
    torch.manual_seed(0)
    conv = normlayers.WSConv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(2, 3, 5, 5)
    folded = fold_norms(conv, example_inputs=(x,))
    assert type(folded) is nn.Conv2d
    assert_close(folded(x), conv(x))


@pytest.mark.parametrize("bad", [float("nan"), -0.5])
@pytest.mark.parametrize("norm", ["bn", "bcn"])
def test_an_unfoldable_running_var_is_refused_by_name_before_any_change(bad, norm):
    torch.manual_seed(20)
    layer = nn.BatchNorm2d(4) if norm == "bn" else normlayers.BatchChannelNorm2d(4, num_groups=2)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), layer, nn.ReLU())).eval()
    stage = layer if norm == "bn" else layer.bn
    with torch.no_grad():
        stage.running_var[2] = bad
    conv_weight = model[0].weight.detach().clone()
    name = "1" if norm == "bn" else "1.bn"
    for example_inputs in (None, (torch.randn(2, 3, 6, 6),)):
        with pytest.raises(ValueError, match=rf"fold_norms: {name}\.running_var must be >= 0 and not NaN"):
            fold_norms(model, example_inputs=example_inputs)
        assert model[1] is layer and torch.equal(model[0].weight, conv_weight)


def test_a_nan_input_does_not_fail_the_output_check():
    torch.manual_seed(21)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 5, 5)
    x[0, :, 1, 1] = float("nan")  # NaN in, NaN out, before and after folding: the fold itself is fine
    fold_norms(model, example_inputs=(x,))
    assert isinstance(model[1], nn.Identity)
