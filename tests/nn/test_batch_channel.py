"""BatchChannelNorm2d and functional.batch_channel_norm (spec B §2) against independent computations.

Oracles, none of which shares code with the implementation:

* ``TorchBCN``: the layer as a composition of torch built-ins, ``nn.BatchNorm2d`` (the official batch stage, with its
  own running-statistics update) then ``F.group_norm`` with the per-group affine spread to its channels. It has the
  official parameter/buffer names, so its state_dict loads into ours with ``strict=True``.
* ``estbn_step``: EstBN's update written the paper's way (spec §2.2): ``μ ← μ + r(μ̇ − μ)``,
  ``σ² ← σ² + r(σ̇² + d² − σ²)`` with the batch variance centred at the *batch* mean and ``d = μ − μ̇``; the
  implementation centres at the old estimate instead. The normalization with the updated estimates is then
  ``F.batch_norm`` in eval mode followed by ``F.group_norm``.
* ``torch.autograd.gradcheck`` of the reference in fp64.

Tolerances are ``normlayers.testing``'s: fp32/fp64 with ``assert_close``; fp16/bf16 with the low-precision rule (at
most twice torch's own low-precision error against an fp64 computation of the same inputs).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normlayers
from normlayers import functional as NF
from normlayers.testing import assert_close, assert_lowprec_close

LOWPREC = (torch.float16, torch.bfloat16)
OFFICIAL_KEYS = ["weight", "bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                 "bn.num_batches_tracked"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------------------------------


def spread_to_channels(per_group: torch.Tensor, num_channels: int) -> torch.Tensor:
    """(1, G, 1) group affine -> (C,) per-channel vector, channel c belonging to group c // (C/G)."""
    groups = per_group.numel()
    return per_group.reshape(groups).repeat_interleave(num_channels // groups)


def group_stage(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    channels = u.shape[1]
    return TF.group_norm(u, weight.numel(), spread_to_channels(weight, channels).to(u.dtype),
                         spread_to_channels(bias, channels).to(u.dtype), eps)


class TorchBCN(nn.Module):
    """BCN from torch built-ins: nn.BatchNorm2d, then F.group_norm with the group affine. Official key names."""

    def __init__(self, num_channels, num_groups=32, eps=1e-5, momentum=0.1, bn_eps=1e-5):
        super().__init__()
        self.eps = eps
        self.bn = nn.BatchNorm2d(num_channels, eps=bn_eps, momentum=momentum)
        self.weight = nn.Parameter(torch.ones(1, num_groups, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_groups, 1))

    def forward(self, x):
        return group_stage(self.bn(x), self.weight, self.bias, self.eps)


def randomize_(module: nn.Module) -> nn.Module:
    """Parameters and running statistics away from their init, so a test sees a wrong one."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith("weight"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point() and not name.endswith("estbn_moving_speed"):
                t.normal_(0.0, 0.5)
    return module


def make_pair(channels, groups, **kwargs):
    """(ours, TorchBCN) with the same random state, loaded ours -> theirs with strict=True."""
    ours = randomize_(normlayers.BatchChannelNorm2d(channels, groups, **kwargs))
    theirs = TorchBCN(channels, groups, **{k: v for k, v in kwargs.items() if k in ("eps", "momentum", "bn_eps")})
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """y = module(x) and the gradients of x and of every parameter (by name)."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad_out)
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return y.detach(), grads


def assert_same_buffers(ours: nn.Module, theirs: nn.Module, msg: str = "") -> None:
    theirs_buffers = dict(theirs.named_buffers())
    for name, buf in ours.named_buffers():
        if name in theirs_buffers:
            if buf.is_floating_point():
                assert_close(buf, theirs_buffers[name], msg=f"{msg} {name}")
            else:
                assert torch.equal(buf, theirs_buffers[name]), f"{msg} {name}"


def estbn_step(x64: torch.Tensor, mean_est: torch.Tensor, var_est: torch.Tensor, rate: float):
    """EstBN's update, the paper's way (spec §2.2): batch variance about the batch mean, plus the squared shift d²."""
    batch_mean = x64.mean((0, 2, 3))
    batch_var = x64.var((0, 2, 3), unbiased=False)
    d = mean_est - batch_mean
    return mean_est + rate * (batch_mean - mean_est), var_est + rate * (batch_var + d * d - var_est)


def estbn_forward(module_state: dict, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                  bn_eps: float) -> torch.Tensor:
    """BCN with fixed batch-stage statistics (mean, var): F.batch_norm in eval mode, then the group stage."""
    bn_weight, bn_bias = (module_state[k].to(x.dtype) for k in ("bn.weight", "bn.bias"))
    u = TF.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), bn_weight, bn_bias, False, 0.0, bn_eps)
    return group_stage(u, module_state["weight"], module_state["bias"], eps)


# ----------------------------------------------------------------------------------------------------------------------
# Constructor, names, state_dict
# ----------------------------------------------------------------------------------------------------------------------


def test_signature():
    params = [(p.name, p.kind, p.default) for p in
              inspect.signature(normlayers.BatchChannelNorm2d.__init__).parameters.values()][1:]
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    keyword = inspect.Parameter.KEYWORD_ONLY
    assert params == [("num_channels", positional, inspect.Parameter.empty), ("num_groups", positional, 32),
                      ("eps", positional, 1e-5), ("momentum", positional, 0.1), ("estimate", positional, False),
                      ("estimate_rate", positional, 0.0), ("bn_eps", positional, 1e-5),
                      ("process_group", keyword, None), ("sync_stats", keyword, False), ("device", keyword, None),
                      ("dtype", keyword, None)]


@pytest.mark.parametrize("estimate", [False, True])
def test_official_checkpoint_keys_load_strict(estimate):
    """A state_dict with exactly the official names and shapes (BCN README: BCNorm + BatchNorm2d/EstBN) loads with
    strict=True, and its values, not the init, are what the layer computes with."""
    channels, groups = 12, 4
    official = {
        "weight": torch.rand(1, groups, 1) + 0.5, "bias": torch.randn(1, groups, 1),
        "bn.weight": torch.rand(channels) + 0.5, "bn.bias": torch.randn(channels),
        "bn.running_mean": torch.randn(channels), "bn.running_var": torch.rand(channels) + 0.5,
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.long),
    }
    if estimate:
        official["bn.estbn_moving_speed"] = torch.tensor([0.25])
    m = normlayers.BatchChannelNorm2d(channels, groups, estimate=estimate)
    assert list(m.state_dict()) == OFFICIAL_KEYS + (["bn.estbn_moving_speed"] if estimate else [])
    for key, value in m.state_dict().items():
        assert value.shape == official[key].shape and value.dtype == official[key].dtype, key
    m.load_state_dict(official, strict=True)
    x = torch.randn(2, channels, 3, 3)
    m.eval()
    assert_close(m(x), estbn_forward(official, x, official["bn.running_mean"], official["bn.running_var"], 1e-5, 1e-5))
    if estimate:  # the loaded rate drives the training-time update
        m.train()
        y = m(x)
        mean, var = estbn_step(x.double(), official["bn.running_mean"].double(),
                               official["bn.running_var"].double(), 0.25)
        assert_close(m.bn.running_mean, mean)
        assert_close(m.bn.running_var, var)
        assert_close(y, estbn_forward(official, x.double(), mean, var, 1e-5, 1e-5))
        assert int(m.bn.num_batches_tracked) == 7  # EstBN never advances it


def test_imagenet_checkpoint_names_pbn_load_as_bn():
    """The official ImageNet models call the batch stage "pbn" (imagenet/models/layers.py, class GN)."""
    ours, theirs = make_pair(16, 4)
    imagenet = {k.replace("bn.", "pbn.", 1) if k.startswith("bn.") else k: v for k, v in ours.state_dict().items()}
    given = dict(imagenet)
    loaded = normlayers.BatchChannelNorm2d(16, 4)
    loaded.load_state_dict(imagenet, strict=True)
    assert imagenet == given  # the caller's dict is not modified
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # nested in a model, under a prefix
    model = nn.Sequential(nn.Identity(), normlayers.BatchChannelNorm2d(16, 4))
    model.load_state_dict({f"1.{k}": v for k, v in imagenet.items()}, strict=True)
    assert torch.equal(model[1].bn.running_var, ours.bn.running_var)


@pytest.mark.parametrize("estimate", [False, True])
def test_state_dict_round_trip(estimate):
    src = randomize_(normlayers.BatchChannelNorm2d(8, 2, estimate=estimate, estimate_rate=0.3))
    dst = normlayers.BatchChannelNorm2d(8, 2, estimate=estimate)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(2, 8, 4, 4)
    assert_close(dst(x), src(x))  # training: the loaded EstBN rate (0.3, not dst's 0.0) moves the estimates alike
    assert_same_buffers(dst, src)
    assert not torch.allclose(dst.eval()(x), normlayers.BatchChannelNorm2d(8, 2, estimate=estimate).eval()(x))


def test_extra_repr_names_the_settings():
    text = repr(normlayers.BatchChannelNorm2d(48, 16, eps=1e-3, momentum=None))
    assert "48, num_groups=16, eps=0.001, momentum=None" in text
    est = repr(normlayers.BatchChannelNorm2d(8, 4, estimate=True, estimate_rate=0.01))
    assert "estimate=True, estimate_rate=0.01" in est


# ----------------------------------------------------------------------------------------------------------------------
# Outputs, gradients and running statistics against torch's composition
# ----------------------------------------------------------------------------------------------------------------------

# (channels, groups, input shape): batch 1 and 2, channels not a multiple of 32, H=W=1, one value per group slice
SHAPES = {
    "batch2": (64, 32, (2, 64, 5, 3)),
    "batch1": (48, 16, (1, 48, 4, 4)),
    "batch2_1x1": (24, 6, (2, 24, 1, 1)),
    "one_value_per_group_slice": (8, 8, (2, 8, 1, 1)),  # C/G·H·W = 1: the group stage outputs exactly its bias
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", SHAPES)
def test_matches_torch_composition_fp32(case, training):
    channels, groups, shape = SHAPES[case]
    # non-default eps values large enough to matter at fp32 tolerance
    ours, theirs = make_pair(channels, groups, eps=1e-3, bn_eps=1e-2)
    ours.train(training)
    theirs.train(training)
    x, g = torch.randn(shape), torch.randn(shape)
    y, grads = fwd_bwd(ours, x, g)
    y_t, grads_t = fwd_bwd(theirs, x, g)
    assert y.dtype == x.dtype
    assert_close(y, y_t)
    assert grads.keys() == grads_t.keys()
    for name in grads:
        assert_close(grads[name], grads_t[name], msg=f"grad of {name}")
    assert_same_buffers(ours, theirs)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_stats_after_several_steps_equal_batchnorm2d(momentum):
    """Several training steps (batch sizes 2, 1, 3): the batch stage's buffers follow nn.BatchNorm2d exactly
    (unbiased running variance, num_batches_tracked, momentum=None as a cumulative average); eval then uses them."""
    ours = normlayers.BatchChannelNorm2d(12, 4, momentum=momentum)
    theirs = TorchBCN(12, 4, momentum=momentum)
    for batch in (2, 1, 3, 2):
        x = torch.randn(batch, 12, 3, 4) * 3 + 1
        ours(x)
        theirs(x)
    assert int(ours.bn.num_batches_tracked) == 4
    assert_same_buffers(ours, theirs)
    assert not torch.allclose(ours.bn.running_var, torch.ones(12))
    x = torch.randn(2, 12, 3, 4)
    assert_close(ours.eval()(x), theirs.eval()(x))


def test_training_with_one_value_per_channel_raises_like_batchnorm2d():
    """Batch 1 at H=W=1: the BatchNorm stage has one value per channel. The official layer is nn.BatchNorm2d, which
    raises (spec §2.3); so do we, in training with estimate=False. Eval and EstBN need no batch variance."""
    x = torch.randn(1, 16, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        TorchBCN(16, 4)(x)
    m = normlayers.BatchChannelNorm2d(16, 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(x)
    assert int(m.bn.num_batches_tracked) == 0  # rejected before any buffer changed
    ours, theirs = make_pair(16, 4)
    assert_close(ours.eval()(x), theirs.eval()(x))
    est = randomize_(normlayers.BatchChannelNorm2d(16, 4, estimate=True, estimate_rate=0.5))
    state = {k: v.clone() for k, v in est.state_dict().items()}
    mean, var = estbn_step(x.double(), state["bn.running_mean"].double(), state["bn.running_var"].double(), 0.5)
    assert_close(est(x), estbn_forward(state, x.double(), mean, var, 1e-5, 1e-5))


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("estimate", [False, True])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_like_batchnorm2d(training, estimate, backend_name):
    """N = 0 (e.g. a rank with no samples): nn.BatchNorm2d returns an empty output, keeps its running statistics and
    counts the batch in num_batches_tracked; so do we. Every parameter gets a zero gradient."""
    x = torch.randn(0, 16, 3, 3, requires_grad=True)
    torch_bn = nn.BatchNorm2d(16).train(training)
    torch_bn(x)
    m = randomize_(normlayers.BatchChannelNorm2d(16, 4, estimate=estimate, estimate_rate=0.5)).train(training)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with normlayers.backend(backend_name):
        y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    for key, value in m.state_dict().items():
        if key.endswith("num_batches_tracked") and not estimate:
            assert int(value) == int(before[key]) + int(torch_bn.num_batches_tracked)
        else:
            assert torch.equal(value, before[key]), key
    for param in m.parameters():
        assert param.grad is not None and torch.equal(param.grad, torch.zeros_like(param))


@pytest.mark.parametrize("case", ["batch2", "batch1", "batch2_1x1"])
def test_estimate_mode_equals_rederivation_over_several_steps(case):
    """EstBN (spec §2.2): each training step first moves the estimates at rate r, then normalizes with the updated
    estimates; no batch statistic carries gradient. Checked step by step against the paper's form of the update."""
    channels, groups, shape = SHAPES[case]
    rate = 0.25
    m = randomize_(normlayers.BatchChannelNorm2d(channels, groups, estimate=True, estimate_rate=rate))
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    params = {k: v.double().requires_grad_(True) for k, v in state.items()
              if k in ("weight", "bias", "bn.weight", "bn.bias")}
    mean, var = state["bn.running_mean"].double(), state["bn.running_var"].double()
    for step in range(3):
        x, g = torch.randn(shape) * 2 + 0.5, torch.randn(shape)
        y, grads = fwd_bwd(m, x, g)
        mean, var = estbn_step(x.double(), mean, var, rate)
        x64 = x.double().requires_grad_(True)
        for p in params.values():
            p.grad = None
        y64 = estbn_forward(params, x64, mean, var, 1e-5, 1e-5)
        y64.backward(g.double())
        assert_close(m.bn.running_mean, mean, msg=f"step {step}")
        assert_close(m.bn.running_var, var, msg=f"step {step}")
        assert_close(y, y64, msg=f"step {step}")
        assert_close(grads["input"], x64.grad, msg=f"step {step}")
        for name, p in params.items():
            assert_close(grads[name], p.grad, msg=f"step {step} grad of {name}")
    assert int(m.bn.num_batches_tracked) == 0


def test_estimate_rate_zero_freezes_the_estimates_and_train_equals_eval():
    """The official default rate 0: the estimates stay at their values, and training and eval outputs coincide."""
    m = randomize_(normlayers.BatchChannelNorm2d(16, 4, estimate=True))
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 16, 3, 3)
    y_train = m(x)
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(y_train, m.eval()(x))


# ----------------------------------------------------------------------------------------------------------------------
# Gradcheck of the reference, dtypes, layouts
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval", "estimate"])
def test_gradcheck_fp64(mode):
    channels, groups = 6, 3
    x = torch.randn(2, channels, 3, 2, dtype=torch.float64, requires_grad=True)
    params = [torch.rand(channels, dtype=torch.float64).add_(0.5).requires_grad_(),
              torch.randn(channels, dtype=torch.float64, requires_grad=True),
              torch.rand(1, groups, 1, dtype=torch.float64).add_(0.5).requires_grad_(),
              torch.randn(1, groups, 1, dtype=torch.float64, requires_grad=True)]
    running = (torch.randn(channels, dtype=torch.float64), torch.rand(channels, dtype=torch.float64) + 0.5)

    def fn(x, bn_weight, bn_bias, weight, bias):
        # Fresh buffers on every call, since training updates them. EstBN runs at rate 0: its statistics are outside
        # autograd by definition (spec §2.2), so with a moving estimate the finite differences would see a dependence
        # that the gradient, correctly, does not have (that gradient is checked against the re-derivation instead).
        mean, var = (t.clone() for t in running)
        return NF.batch_channel_norm(x, mean, var, bn_weight, bn_bias, weight, bias, training=mode != "eval",
                                     eps=1e-3, num_groups=groups, estimate=mode == "estimate", estimate_rate=0.0)

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("dtype", LOWPREC)
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_module(dtype, training):
    """Module and input in fp16/bf16: the output is within twice torch's own low-precision error of fp64."""
    ours, theirs = make_pair(32, 8)
    ours, theirs = ours.to(dtype).train(training), theirs.to(dtype).train(training)
    theirs64 = copy.deepcopy(theirs).double()  # the same (rounded) parameters, in fp64
    x, g = torch.randn(2, 32, 4, 4).to(dtype), torch.randn(2, 32, 4, 4).to(dtype)
    y, grads = fwd_bwd(ours, x, g)
    y_t, grads_t = fwd_bwd(theirs, x, g)
    y64, grads64 = fwd_bwd(theirs64, x.double(), g.double())
    assert y.dtype == dtype and all(b.dtype == dtype for b in ours.bn.buffers() if b.is_floating_point())
    assert_lowprec_close(y, y_t, y64, msg="output")
    for name in grads:
        assert_lowprec_close(grads[name], grads_t[name], grads64[name], msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", LOWPREC)
@pytest.mark.parametrize("estimate", [False, True])
def test_low_precision_input_fp32_state_statistics_in_fp32(dtype, estimate):
    """fp16/bf16 activations with fp32 parameters and buffers (autocast-style): output in the input dtype, running
    statistics from fp32 arithmetic — equal, at fp32 tolerance, to fp64 statistics of the same rounded input."""
    m = normlayers.BatchChannelNorm2d(16, 4, estimate=estimate, estimate_rate=0.5)
    x = (torch.randn(2, 16, 8, 8) * 4 + 100).to(dtype)  # a large mean: bf16 arithmetic would lose it
    y = m(x)
    assert y.dtype == dtype
    x64 = x.double()
    if estimate:
        mean, var = estbn_step(x64, torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64), 0.5)
    else:
        mean = 0.1 * x64.mean((0, 2, 3))
        var = 0.9 + 0.1 * x64.var((0, 2, 3), unbiased=True)
    assert m.bn.running_mean.dtype == torch.float32
    assert_close(m.bn.running_mean, mean)
    assert_close(m.bn.running_var, var)
    state64 = {k: v.double() for k, v in m.state_dict().items()}
    if estimate:
        ref64 = estbn_forward(state64, x64, mean, var, 1e-5, 1e-5)
    else:
        ref64 = estbn_forward(state64, x64, x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False), 1e-5, 1e-5)
    # torch's own low-precision computation of the same layer: BatchNorm2d and group_norm in the input dtype
    torch_lowprec = TorchBCN(16, 4).to(dtype)(x) if not estimate else estbn_forward(
        {k: v.to(dtype) for k, v in m.state_dict().items()}, x, mean.to(dtype), var.to(dtype), 1e-5, 1e-5)
    assert_lowprec_close(y, torch_lowprec, ref64)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice", "spatial_stride"])
def test_non_contiguous_input(layout, training):
    ours, theirs = make_pair(16, 4)
    ours.train(training)
    theirs.train(training)
    if layout == "channels_last":
        x = torch.randn(2, 16, 5, 3).contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        x = torch.randn(2, 20, 5, 3)[:, 2:18]
    else:
        x = torch.randn(2, 16, 5, 6)[..., ::2]
    assert not x.is_contiguous()
    g = torch.randn(x.shape)
    y, grads = fwd_bwd(ours, x, g)
    y_t, grads_t = fwd_bwd(theirs, x.contiguous(), g)
    assert_close(y, y_t)
    for name in grads:
        assert_close(grads[name], grads_t[name], msg=f"grad of {name}")
    assert_same_buffers(ours, theirs)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------------------------
# Module mechanics
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimate", [False, True])
def test_deepcopy(estimate):
    m = randomize_(normlayers.BatchChannelNorm2d(8, 2, estimate=estimate, estimate_rate=0.5))
    c = copy.deepcopy(m)
    assert repr(c) == repr(m)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(m.state_dict().values(), c.state_dict().values()))
    x = torch.randn(2, 8, 3, 3)
    assert_close(c.eval()(x), m.eval()(x))
    running_mean = m.bn.running_mean.clone()
    c.train()(x)  # the copy's buffers move, the original's do not
    assert torch.equal(m.bn.running_mean, running_mean)
    assert not torch.equal(c.bn.running_mean, running_mean)


def test_to_float64_matches_torch_in_float64():
    ours, theirs = make_pair(12, 3)
    ours, theirs = ours.double(), theirs.double()
    assert all(t.dtype == torch.float64 for t in list(ours.parameters()) + [ours.bn.running_mean])
    assert ours.bn.num_batches_tracked.dtype == torch.long
    x = torch.randn(2, 12, 3, 3, dtype=torch.float64)
    assert_close(ours(x), theirs(x))
    assert_same_buffers(ours, theirs)


@pytest.mark.parametrize("estimate", [False, True])
def test_meta_device_construction_and_forward(estimate):
    m = normlayers.BatchChannelNorm2d(16, 4, estimate=estimate, device="meta")
    assert all(t.is_meta for t in m.state_dict().values())
    y = m(torch.empty(2, 16, 3, 3, device="meta", dtype=torch.bfloat16))
    assert y.is_meta and y.shape == (2, 16, 3, 3) and y.dtype == torch.bfloat16
    m.to_empty(device="cpu")
    m.reset_parameters()
    fresh = normlayers.BatchChannelNorm2d(16, 4, estimate=estimate)
    for key, value in fresh.state_dict().items():
        assert torch.equal(m.state_dict()[key], value), key


def test_estimate_rate_buffer_is_initialised_from_the_argument_and_reset():
    m = normlayers.BatchChannelNorm2d(8, 2, estimate=True, estimate_rate=0.125)
    assert m.bn.estbn_moving_speed.shape == (1,) and float(m.bn.estbn_moving_speed) == 0.125
    m.bn.estbn_moving_speed.fill_(0.5)
    m.reset_running_stats()
    assert float(m.bn.estbn_moving_speed) == 0.5
    m.reset_parameters()
    assert float(m.bn.estbn_moving_speed) == 0.125


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"num_groups \(32\) must divide num_channels \(48\)"):
        normlayers.BatchChannelNorm2d(48)
    with pytest.raises(ValueError, match="num_groups"):
        normlayers.BatchChannelNorm2d(16, 0)
    with pytest.raises(ValueError, match="num_channels"):
        normlayers.BatchChannelNorm2d(0, 1)
    with pytest.raises(ValueError, match="momentum"):
        normlayers.BatchChannelNorm2d(16, 4, momentum=1.5)
    with pytest.raises(ValueError, match="estimate_rate"):
        normlayers.BatchChannelNorm2d(16, 4, estimate=True, estimate_rate=-0.1)
    with pytest.raises(ValueError, match="bn_eps"):
        normlayers.BatchChannelNorm2d(16, 4, bn_eps=-1.0)


@pytest.mark.parametrize("training", [True, False])
def test_bad_input(training):
    m = normlayers.BatchChannelNorm2d(16, 4).train(training)
    for channels in (12, 15):  # 15: not a multiple of num_groups either; the channel count is what is wrong
        with pytest.raises(ValueError, match=rf"num_channels; got input of shape \[2, {channels}, 4, 4\] and "
                                             r"running_mean of shape \[16\]"):
            m(torch.randn(2, channels, 4, 4))
    for shape in [(2, 16, 4), (2, 16, 4, 4, 1), (16,)]:
        with pytest.raises(ValueError, match="4-D"):
            m(torch.randn(shape))
    with pytest.raises(TypeError, match="input"):
        m(torch.ones(2, 16, 4, 4, dtype=torch.int64))
    assert int(m.bn.num_batches_tracked) == 0


def test_bad_functional_arguments():
    x = torch.randn(2, 16, 3, 3)
    mean, var = torch.zeros(16), torch.ones(16)
    with pytest.raises(ValueError, match=r"num_groups \(5\) must divide"):
        NF.batch_channel_norm(x, mean, var, num_groups=5)
    with pytest.raises(ValueError, match="weight must hold one value per group"):
        NF.batch_channel_norm(x, mean, var, None, None, torch.ones(1, 16, 1), None, num_groups=4)
    with pytest.raises(ValueError, match="bn_bias"):
        NF.batch_channel_norm(x, mean, var, None, torch.zeros(8), num_groups=4)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        NF.batch_channel_norm(x, None, None, num_groups=4)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        NF.batch_channel_norm(x, mean, var, training=True, momentum=None, num_groups=4)
    with pytest.raises(TypeError, match="estimate_rate"):
        NF.batch_channel_norm(x, mean, var, num_groups=4, estimate=True, estimate_rate=torch.ones(2))


def test_functional_without_running_stats_uses_batch_statistics():
    """As F.batch_norm: in training the running buffers may be None (batch statistics, nothing updated)."""
    x = torch.randn(2, 16, 3, 3)
    w, b = torch.rand(1, 4, 1) + 0.5, torch.randn(1, 4, 1)
    expected = group_stage(TF.batch_norm(x, None, None, training=True), w, b, 1e-5)
    assert_close(NF.batch_channel_norm(x, None, None, None, None, w, b, training=True, num_groups=4), expected)
