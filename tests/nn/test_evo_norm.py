"""EvoNorm modules and functional forms: normlayers.EvoNorm2d{B0,B1,B2,S0,S0a,S1,S1a,S2,S2a}.

The oracle is :func:`timm_formula`, an independent re-derivation of timm's forward (``timm/layers/evo_norm.py``,
spec ``specs/bcn_ws_region_evo.md`` §4.1/§4.3) written differently from ``normlayers.reference.evo_norm``:
statistics over explicit 2-D reshapes — ``(C, N·H·W)`` rows for the batch variance, ``(N·C, H·W)`` for the instance
terms, ``(N·G, C/G·H·W)`` for the groups — and the ``max`` as ``torch.where``. Like timm, it takes its statistics in
fp32 (fp64 for fp64), casts them to the input's dtype and does the elementwise work there, so on fp16/bf16 input it
*is* timm's low-precision computation and on fp64 input the exact formula.

Beside it, torch built-ins where they apply: ``nn.BatchNorm2d`` for the running-variance update (its rule is timm's:
momentum with the unbiased batch variance), ``F.batch_norm`` and ``F.group_norm`` for inputs where EvoNorm reduces to
them, ``torch.autograd.gradcheck`` in fp64 for the reference's gradients. Tolerances: ``normlayers.testing``.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normlayers
from normlayers import functional as NF
from normlayers.testing import assert_close, assert_lowprec_close

LOWPREC = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------------------------
# The layers, as timm defines them (spec §4.3)
# ----------------------------------------------------------------------------------------------------------------------

# name -> (class, family, default eps, has v, "a" variant: normalizes even with apply_act=False)
LAYERS = {
    "B0": (normlayers.EvoNorm2dB0, "B", 1e-3, True, False),
    "B1": (normlayers.EvoNorm2dB1, "B", 1e-5, False, False),
    "B2": (normlayers.EvoNorm2dB2, "B", 1e-5, False, False),
    "S0": (normlayers.EvoNorm2dS0, "S", 1e-5, True, False),
    "S0a": (normlayers.EvoNorm2dS0a, "S", 1e-3, True, True),
    "S1": (normlayers.EvoNorm2dS1, "S", 1e-5, False, False),
    "S1a": (normlayers.EvoNorm2dS1a, "S", 1e-3, False, True),
    "S2": (normlayers.EvoNorm2dS2, "S", 1e-5, False, False),
    "S2a": (normlayers.EvoNorm2dS2a, "S", 1e-3, False, True),
}
NAMES = list(LAYERS)
B_NAMES = [n for n in NAMES if LAYERS[n][1] == "B"]
S_NAMES = [n for n in NAMES if LAYERS[n][1] == "S"]

# timm's constructor signatures (names and defaults, in order), less its trailing ``**_``.
TIMM_SIGNATURES = {
    "B": [("num_features", inspect.Parameter.empty), ("apply_act", True), ("momentum", 0.1), ("eps", None)],
    "S0": [("num_features", inspect.Parameter.empty), ("groups", 32), ("group_size", None), ("apply_act", True),
           ("eps", None)],
    "S12": [("num_features", inspect.Parameter.empty), ("groups", 32), ("group_size", None), ("apply_act", True),
            ("act_layer", None), ("eps", None)],
}


def timm_signature(name: str) -> list:
    family, eps = LAYERS[name][1], LAYERS[name][2]
    key = "B" if family == "B" else ("S0" if name.startswith("S0") else "S12")
    return [(p, eps if p == "eps" else d) for p, d in TIMM_SIGNATURES[key]]


def timm_state_dict(name: str, channels: int, apply_act: bool, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A state_dict with exactly timm's keys and shapes (spec §4.3): ``weight``, ``bias`` (C,); ``v`` (C,) for B0 and
    S0/S0a with apply_act; ``running_var`` (C,) for every B layer — filled with random values."""
    _, family, _, has_v, _ = LAYERS[name]
    state = {"weight": torch.rand(channels, dtype=dtype) + 0.5, "bias": torch.randn(channels, dtype=dtype) * 0.5}
    if has_v and apply_act:
        state["v"] = torch.randn(channels, dtype=dtype) * 0.7 + 0.5
    if family == "B":
        state["running_var"] = torch.rand(channels, dtype=dtype) * 2 + 0.25
    return state


# ----------------------------------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------------------------------


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def timm_formula(name: str, x: torch.Tensor, state: dict[str, torch.Tensor], *, training: bool = True,
                 apply_act: bool = True, groups: int = 32, eps: Optional[float] = None,
                 act: Callable[[torch.Tensor], torch.Tensor] = TF.silu) -> torch.Tensor:
    """timm's EvoNorm forward, re-derived (see the module docstring). ``state`` holds timm's tensors by key."""
    _, family, default_eps, _, always_normalize = LAYERS[name]
    eps = default_eps if eps is None else eps
    n, c, h, w = x.shape
    sd = _stat_dtype(x)
    as_channel = lambda t: t.to(x.dtype).reshape(1, c, 1, 1)  # noqa: E731
    xs = x.to(sd)
    if family == "B" and apply_act:
        if training:
            rows = xs.transpose(0, 1).reshape(c, n * h * w)
            batch_var = ((rows - rows.mean(dim=1, keepdim=True)) ** 2).mean(dim=1)
        else:
            batch_var = state["running_var"].to(sd)
        left = as_channel((batch_var + eps).sqrt()).expand(n, c, h, w)
        instance = xs.reshape(n * c, h * w)
        if name == "B0":
            instance_std = (torch.var(instance, dim=1, unbiased=False) + eps).sqrt().to(x.dtype).reshape(n, c, 1, 1)
            right = x * as_channel(state["v"]) + instance_std
        else:
            instance_rms = ((instance * instance).mean(dim=1) + eps).sqrt().to(x.dtype).reshape(n, c, 1, 1)
            right = (x + 1) * instance_rms if name == "B1" else instance_rms - x
        x = x / torch.where(left > right, left, right)
    elif family == "S" and (apply_act or always_normalize):
        rows = xs.reshape(n * groups, c // groups * h * w)
        if name.startswith("S2"):
            stat = (rows * rows).mean(dim=1)
        else:
            stat = ((rows - rows.mean(dim=1, keepdim=True)) ** 2).mean(dim=1)
        denom = (stat + eps).sqrt().to(x.dtype).reshape(n, groups, 1, 1, 1).expand(n, groups, c // groups, h, w)
        if not apply_act:
            numerator = x
        elif name.startswith("S0"):
            numerator = x * torch.sigmoid(x * as_channel(state["v"]))
        else:
            numerator = act(x)
        x = numerator / denom.reshape(n, c, h, w)
    return x * as_channel(state["weight"]) + as_channel(state["bias"])


def make_layer(name: str, channels: int, *, apply_act: bool = True, groups: Optional[int] = None,
               group_size: Optional[int] = None, **kwargs) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Our layer loaded (strict) from a random timm-format state_dict; returns (layer, that state)."""
    cls, family = LAYERS[name][:2]
    if family == "S":
        kwargs.update(groups=groups if groups is not None else 32, group_size=group_size)
    layer = cls(channels, apply_act=apply_act, **kwargs)
    state = timm_state_dict(name, channels, apply_act)
    layer.load_state_dict(state, strict=True)
    return layer, {k: t.clone() for k, t in state.items()}


def run(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of ``sum(y · g)`` with a fixed random ``g``; returns y and the gradients."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    (y * g).sum().backward()
    grads = {"input": x.grad}
    grads.update({k: p.grad for k, p in layer.named_parameters()})
    return y.detach(), grads


def run_oracle(name: str, x: torch.Tensor, state: dict[str, torch.Tensor], **kwargs):
    """The oracle's y and gradients, for the same ``g`` as :func:`run`."""
    x = x.detach().clone().requires_grad_(True)
    leaves = {k: t.detach().clone().requires_grad_(k != "running_var") for k, t in state.items()}
    y = timm_formula(name, x, leaves, **kwargs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    (y * g).sum().backward()
    grads = {"input": x.grad}
    grads.update({k: t.grad for k, t in leaves.items() if k != "running_var"})
    return y.detach(), grads


# (input shape, groups, group_size): batch 1 and 2, H=W=1, C not a multiple of 32 with a dividing group count.
SHAPES = {
    "batch1": ((1, 64, 5, 3), 32, None),
    "batch2": ((2, 64, 4, 4), 32, None),
    "hw1": ((2, 64, 1, 1), 32, None),
    "c24_groups8": ((2, 24, 3, 5), 8, None),
    "c24_group_size6": ((3, 24, 2, 3), None, 6),
}


def _groups_of(shape_key: str) -> int:
    shape, groups, group_size = SHAPES[shape_key]
    return groups if group_size is None else shape[1] // group_size


# ----------------------------------------------------------------------------------------------------------------------
# timm compatibility: signatures, state_dict keys, outputs on a timm checkpoint
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_signature_is_timms_plus_keyword_only_extras(name):
    # timm's positional arguments; after them, keyword-only: the batch-statistic (B) layers' sync switch
    # (normlayers.distributed), and the factory kwargs.
    params = list(inspect.signature(LAYERS[name][0].__init__).parameters.values())[1:]
    positional = [(p.name, p.default) for p in params if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword_only = [(p.name, p.default) for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
    assert positional == timm_signature(name)
    sync = [("sync_stats", False), ("process_group", None)] if LAYERS[name][1] == "B" else []
    assert keyword_only == [*sync, ("device", None), ("dtype", None)]


@pytest.mark.parametrize("apply_act", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_has_timms_keys_and_shapes(name, apply_act):
    ours = LAYERS[name][0](16, apply_act=apply_act, **({"groups": 4} if LAYERS[name][1] == "S" else {}))
    timm = timm_state_dict(name, 16, apply_act)
    assert {k: tuple(t.shape) for k, t in ours.state_dict().items()} == {k: tuple(t.shape) for k, t in timm.items()}


@pytest.mark.parametrize("name", NAMES)
def test_fresh_layer_initialisation(name):
    layer = LAYERS[name][0](16, **({"groups": 4} if LAYERS[name][1] == "S" else {}))
    for key, t in layer.state_dict().items():
        expected = torch.zeros_like(t) if key == "bias" else torch.ones_like(t)  # timm: v, weight, running_var ones
        assert torch.equal(t, expected), key
    assert layer.eps == LAYERS[name][2]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("apply_act", [True, False], ids=["act", "no_act"])
@pytest.mark.parametrize("shape_key", list(SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_timm_checkpoint_forward_and_gradients_fp64(name, shape_key, apply_act, training):
    """Load a timm-format state_dict (strict), run fp64 forward+backward, compare with the oracle."""
    shape, groups, group_size = SHAPES[shape_key]
    layer, state = make_layer(name, shape[1], apply_act=apply_act, groups=groups, group_size=group_size)
    layer.double().train(training)
    state = {k: t.double() for k, t in state.items()}
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3
    y, grads = run(layer, x)
    y_ref, grads_ref = run_oracle(name, x, state, training=training, apply_act=apply_act, groups=_groups_of(shape_key))
    assert_close(y, y_ref)
    assert grads.keys() == grads_ref.keys()
    for key in grads:
        assert_close(grads[key], grads_ref[key], msg=f"grad of {key}")


@pytest.mark.parametrize("shape_key", ["batch2", "c24_groups8"])
@pytest.mark.parametrize("name", NAMES)
def test_fp32_input_against_fp64_formula(name, shape_key):
    shape, groups, group_size = SHAPES[shape_key]
    layer, state = make_layer(name, shape[1], groups=groups, group_size=group_size)
    x = torch.randn(shape) * 2
    y, grads = run(layer, x)
    assert y.dtype == torch.float32
    y_ref, grads_ref = run_oracle(name, x.double(), {k: t.double() for k, t in state.items()},
                                  groups=_groups_of(shape_key))
    assert_close(y, y_ref)
    for key in grads:
        assert grads[key].dtype == torch.float32
        assert_close(grads[key], grads_ref[key], msg=f"grad of {key}")


@pytest.mark.parametrize("name", S_NAMES)
def test_s_layers_are_batch_independent(name):
    """Train and eval agree, and each sample's output does not depend on the rest of the batch (spec §4.1)."""
    layer, _ = make_layer(name, 24, groups=8)
    x = torch.randn(3, 24, 4, 4)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)
    assert_close(layer(x[1:2]), y_train[1:2])


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name, training, backend_name):
    """N = 0: an empty output of the right shape, the running variance left alone (as nn.BatchNorm2d leaves its
    statistics), and a zero gradient for every parameter (DDP needs one from a rank with an empty batch)."""
    layer, _ = make_layer(name, 8, groups=4)
    buffers = [b.clone() for b in layer.buffers()]
    x = torch.randn(0, 8, 3, 3, requires_grad=True)
    with normlayers.backend(backend_name):
        y = layer.train(training)(x)
    assert y.shape == (0, 8, 3, 3)
    y.sum().backward()
    for buffer, before in zip(layer.buffers(), buffers):
        assert torch.equal(buffer, before)
    for param in layer.parameters():
        assert param.grad is not None and torch.equal(param.grad, torch.zeros_like(param))


# ----------------------------------------------------------------------------------------------------------------------
# Reductions to torch built-ins
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["S1a", "S2a"])
def test_a_variant_without_act_on_zero_mean_groups_is_group_norm(name):
    """With apply_act=False the "a" variants are x / sqrt(stat + eps) per group; on groups of zero mean both the
    group variance (S1a) and the group mean square (S2a) equal GroupNorm's variance, so y = F.group_norm(x)."""
    layer = LAYERS[name][0](24, groups=6, apply_act=False).double()
    x = torch.randn(2, 6, 4 * 3 * 5, dtype=torch.float64)
    x = (x - x.mean(dim=-1, keepdim=True)).reshape(2, 24, 3, 5)
    assert_close(layer(x), TF.group_norm(x, 6, eps=layer.eps))


def test_b0_reduces_to_batch_norm_when_the_batch_side_wins():
    """B0 with v = 0 on an input constant over H, W (instance std = sqrt(eps)) and of zero batch mean: the batch
    side wins the max everywhere, so y = x / sqrt(σ² + eps) = F.batch_norm(x) in training, and with the running
    variance in eval."""
    layer = normlayers.EvoNorm2dB0(5).double()
    with torch.no_grad():
        layer.v.zero_()
    per_sample = torch.randn(2, 5, 1, 1, dtype=torch.float64) + 2.0
    x = torch.cat([per_sample, -per_sample]).expand(4, 5, 3, 3)
    assert_close(layer(x), TF.batch_norm(x, None, None, training=True, eps=layer.eps))
    layer.eval()
    running_var = layer.running_var.clone()
    assert_close(layer(x), TF.batch_norm(x, torch.zeros(5, dtype=torch.float64), running_var, eps=layer.eps))


# ----------------------------------------------------------------------------------------------------------------------
# B family: running variance, eval, the max at ties
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, 0.35])
@pytest.mark.parametrize("name", B_NAMES)
def test_running_var_after_several_steps_matches_batch_norm(name, momentum):
    """timm's update is BatchNorm's (momentum, unbiased batch variance; spec §4.3): after several training steps of
    different batch sizes the running variance equals nn.BatchNorm2d's, and eval then normalizes with it."""
    layer, state = make_layer(name, 12, momentum=momentum)
    bn = nn.BatchNorm2d(12, momentum=momentum, affine=False, dtype=torch.float64)
    bn.running_var.copy_(state["running_var"])
    for shape in [(2, 12, 5, 4), (1, 12, 3, 3), (4, 12, 2, 1)]:
        x = torch.randn(shape) * 3 + 1
        layer.train()(x)
        bn.train()(x.double())
    assert layer.running_var.dtype == torch.float32
    assert_close(layer.running_var, bn.running_var)
    layer.eval()
    x = torch.randn(2, 12, 3, 3)
    before = layer.running_var.clone()
    state["running_var"] = bn.running_var
    assert_close(layer(x), timm_formula(name, x.double(), {k: t.double() for k, t in state.items()}, training=False))
    torch.testing.assert_close(layer.running_var, before, rtol=0, atol=0)  # eval does not update


@pytest.mark.parametrize("name", B_NAMES)
def test_eval_uses_running_var(name):
    """Changing the buffer changes the eval output (and not the training output) as the formula says."""
    layer, state = make_layer(name, 8)
    layer.double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.running_var.mul_(torch.linspace(0.2, 50.0, 8, dtype=torch.float64))
    state = {k: t.double() for k, t in layer.state_dict().items()}
    assert_close(layer.eval()(x), timm_formula(name, x, state, training=False))
    assert_close(layer.train()(x), timm_formula(name, x, state, training=True))


@pytest.mark.parametrize("name", B_NAMES)
def test_no_act_leaves_running_var_alone(name):
    layer, _ = make_layer(name, 8, apply_act=False)
    before = layer.running_var.clone()
    layer.train()(torch.randn(2, 8, 3, 3))
    torch.testing.assert_close(layer.running_var, before, rtol=0, atol=0)


@pytest.mark.parametrize("name", B_NAMES)
def test_single_value_per_channel_in_training_is_rejected(name):
    """N·H·W = 1 would divide the running update by n − 1 = 0 (timm writes inf; spec §4.6): rejected as
    nn.BatchNorm2d does. Eval, and batch 1 with H·W > 1, are fine."""
    layer = LAYERS[name][0](8)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 8, 1, 1))
    assert torch.equal(layer.running_var, torch.ones(8))
    assert torch.isfinite(layer(torch.randn(1, 8, 2, 1))).all()
    assert torch.isfinite(layer.running_var).all()
    assert torch.isfinite(layer.eval()(torch.randn(1, 8, 1, 1))).all()


def _b0_tie_layer(eps: float, running_var: float, v: float, channels: int = 2) -> nn.Module:
    layer = normlayers.EvoNorm2dB0(channels, eps=eps).double()
    with torch.no_grad():
        layer.running_var.fill_(running_var)
        layer.v.fill_(v)
    return layer


def test_b0_tie_gradient_is_split_half_half_eval():
    """Eval, exact tie in channel 0: x = 1 over H, W (instance std = sqrt(eps) = 0.5), v = 1, running_var = 2, so
    left = sqrt(2 + 0.25) = 1.5 = right = 1·1 + 0.5, all exact in binary. Channel 1 (x = 3) has no tie.

    PyTorch's rule (torch.maximum/amax at equal values: half to each side) gives, for y = x / m with m = max(L, R),
    R = v·x + std(x) and d std/dx = 0 for a constant x: dy/dx = 1/m − x/m²·½·v and dy/dv = Σ −x²/m²·½. Giving the
    gradient wholly to one side (TF's rule) would give 1/m − x/m²·v or 1/m instead."""
    layer = _b0_tie_layer(eps=0.25, running_var=2.0, v=1.0).eval()
    x = torch.cat([torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), 3.0)], dim=1).double().requires_grad_()
    layer(x).sum().backward()
    m = 1.5
    expected_dx0 = 1 / m - 1.0 / m**2 * 0.5 * 1.0
    assert torch.all(x.grad[:, 0] == expected_dx0), x.grad[:, 0]
    assert layer.v.grad[0].item() == pytest.approx(4 * -(1.0**2) / m**2 * 0.5, rel=1e-15, abs=0)
    # channel 1, no tie: R = 3 + 0.5 wins, y = x / (v x + 0.5), dy/dx = 0.5 / (v x + 0.5)²
    assert_close(x.grad[:, 1], torch.full_like(x.grad[:, 1], 0.5 / 3.5**2))


def _b0_by_amax(x: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """B0 in training (weight 1, bias 0), written with the max as amax over a stacked pair: autograd's rule for amax
    at equal values is also to split evenly, so this is "what PyTorch autograd gives for the same expression"."""
    n, c, h, w = x.shape
    rows = x.transpose(0, 1).reshape(c, -1)
    left = (rows.var(dim=1, unbiased=False) + eps).sqrt().reshape(1, c, 1, 1).expand_as(x)
    inst = (x.reshape(n, c, -1).var(dim=-1, unbiased=False) + eps).sqrt().reshape(n, c, 1, 1)
    right = x * v.reshape(1, c, 1, 1) + inst
    return x / torch.stack([left, right]).amax(dim=0)


def test_b0_tie_gradient_matches_autograd_in_training():
    """Training, exact tie in sample 0: x = ±2 per sample, constant over H, W, so the batch variance is 4 and
    left = sqrt(4 + 2.25) = 2.5; sample 0 has right = 0.5·2 + sqrt(2.25) = 2.5 (tie), sample 1 has right = 0.5.
    Our gradients equal autograd's on the amax form; the torch.where form (all to one side) differs, proving the tie
    is there."""
    layer = _b0_tie_layer(eps=2.25, running_var=1.0, v=0.5, channels=1)
    x = torch.cat([torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -2.0)]).double()
    x_ours = x.clone().requires_grad_()
    layer.train()(x_ours).backward(torch.ones_like(x))
    x_amax, v_amax = x.clone().requires_grad_(), torch.full((1,), 0.5, dtype=torch.float64, requires_grad=True)
    _b0_by_amax(x_amax, v_amax, 2.25).backward(torch.ones_like(x))
    torch.testing.assert_close(x_ours.grad, x_amax.grad, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(layer.v.grad, v_amax.grad, rtol=1e-15, atol=1e-15)
    x_where = x.clone().requires_grad_()
    state = {"weight": torch.ones(1, dtype=torch.float64), "bias": torch.zeros(1, dtype=torch.float64),
             "v": torch.full((1,), 0.5, dtype=torch.float64)}
    timm_formula("B0", x_where, state, eps=2.25).backward(torch.ones_like(x))
    assert not torch.allclose(x_where.grad, x_ours.grad)


# ----------------------------------------------------------------------------------------------------------------------
# fp64 gradcheck of the reference (through the functional forms)
# ----------------------------------------------------------------------------------------------------------------------


def _functional_call(name: str, training: bool) -> Callable[..., torch.Tensor]:
    fn = getattr(NF, f"evo_norm2d_{name.lower()}")
    if LAYERS[name][1] == "B":
        running_var = torch.rand(6, dtype=torch.float64) + 0.5
        if name == "B0":
            return lambda x, w, b, v: fn(x, running_var.clone(), w, b, v, training=training)
        return lambda x, w, b: fn(x, running_var.clone(), w, b, training=training)
    if name.startswith("S0"):
        return lambda x, w, b, v: fn(x, 3, w, b, v)
    return lambda x, w, b: fn(x, 3, w, b)


# S layers are the same in training and eval (tested above), so they are checked once.
GRADCHECK_CASES = [(n, True) for n in NAMES] + [(n, False) for n in B_NAMES]


@pytest.mark.parametrize("name, training", GRADCHECK_CASES, ids=[f"{n}-{'train' if t else 'eval'}"
                                                                 for n, t in GRADCHECK_CASES])
def test_reference_gradcheck_fp64(name, training):
    fn = _functional_call(name, training)
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    params = [torch.rand(6, dtype=torch.float64, requires_grad=True) + 0.5,
              torch.randn(6, dtype=torch.float64, requires_grad=True)]
    if LAYERS[name][3]:
        params.append(torch.randn(6, dtype=torch.float64, requires_grad=True))
    params = [p.detach().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


# ----------------------------------------------------------------------------------------------------------------------
# Low precision, layouts
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOWPREC, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_input(name, dtype):
    """fp16/bf16 input: output (and gradients) in that dtype, at most twice as far from the fp64 formula as timm's
    own low-precision computation (the oracle on the low-precision input); running_var stays fp32 and follows the
    batch statistics of the fp32 values."""
    layer, state = make_layer(name, 24, groups=8)
    x = (torch.randn(2, 24, 4, 4) * 2 + 0.5).to(dtype)
    y, grads = run(layer, x)
    assert y.dtype == dtype and grads["input"].dtype == dtype
    y_low, grads_low = run_oracle(name, x, {k: t.to(dtype) for k, t in state.items()}, groups=8)
    y_64, grads_64 = run_oracle(name, x.double(), {k: t.double() for k, t in state.items()}, groups=8)
    assert_lowprec_close(y, y_low, y_64, msg="output")
    assert_lowprec_close(grads["input"], grads_low["input"], grads_64["input"], msg="input grad")
    if LAYERS[name][1] == "B":
        bn = nn.BatchNorm2d(24, affine=False, dtype=torch.float64)
        bn.running_var.copy_(state["running_var"])
        bn(x.double())
        assert layer.running_var.dtype == torch.float32
        assert_close(layer.running_var, bn.running_var)


VIEWS = {
    "channels_last": lambda b: b.contiguous(memory_format=torch.channels_last),
    "spatial_slice": lambda b: b[:, :, 1:4, ::2],
    "channel_slice": lambda b: b[:, ::2],
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_input(name, view):
    base = torch.randn(2, 32, 5, 6)
    x = VIEWS[view](base)
    assert not x.is_contiguous()
    layer, state = make_layer(name, x.shape[1], groups=8)
    y, grads = run(layer, x)
    y_ref, grads_ref = run_oracle(name, x.double(), {k: t.double() for k, t in state.items()}, groups=8)
    assert_close(y, y_ref)
    for key in grads:
        assert_close(grads[key], grads_ref[key], msg=f"grad of {key}")


# ----------------------------------------------------------------------------------------------------------------------
# Module plumbing: state_dict, deepcopy, to(), meta, repr, activations, functional forms
# ----------------------------------------------------------------------------------------------------------------------


def _trained(name: str, channels: int = 16) -> nn.Module:
    layer, _ = make_layer(name, channels, groups=4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        layer.train()(torch.randn(2, channels, 3, 3)).square().mean().backward()
        optimizer.step()
    return layer


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    layer = _trained(name)
    fresh = LAYERS[name][0](16, **({"groups": 4} if LAYERS[name][1] == "S" else {}))
    fresh.load_state_dict(layer.state_dict(), strict=True)
    for key, t in layer.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], t, rtol=0, atol=0)
    x = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy(name):
    layer = _trained(name)
    clone = copy.deepcopy(layer)
    x = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(clone.eval()(x), layer.eval()(x), rtol=0, atol=0)
    clone.train()(torch.randn(2, 16, 3, 3) * 5)
    for (key, a), b in zip(clone.state_dict().items(), layer.state_dict().values()):
        assert a.data_ptr() != b.data_ptr(), key
    if LAYERS[name][1] == "B":
        assert not torch.equal(clone.running_var, layer.running_var)  # the copy's buffer moved, the original's not


@pytest.mark.parametrize("name", NAMES)
def test_to_float64_and_factory_dtype(name):
    kwargs = {"groups": 4} if LAYERS[name][1] == "S" else {}
    layer, state = make_layer(name, 16, **kwargs)
    layer.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in layer.state_dict().values())
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    assert_close(layer(x), timm_formula(name, x, {k: t.double() for k, t in state.items()}, groups=4))
    half = LAYERS[name][0](16, dtype=torch.bfloat16, **kwargs)
    assert half.weight.dtype == torch.bfloat16
    if LAYERS[name][1] == "B":
        assert half.running_var.dtype == torch.float32  # spec §4.6: the running variance stays fp32


@pytest.mark.parametrize("name", NAMES)
def test_meta_device(name):
    kwargs = {"groups": 4} if LAYERS[name][1] == "S" else {}
    layer = LAYERS[name][0](16, device="meta", **kwargs)
    assert all(t.device.type == "meta" for t in layer.state_dict().values())
    y = layer(torch.empty(2, 16, 3, 3, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 16, 3, 3)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    reference = LAYERS[name][0](16, **kwargs)
    for key, t in reference.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], t, rtol=0, atol=0)


def test_repr():
    assert repr(normlayers.EvoNorm2dB0(8)) == "EvoNorm2dB0(8, apply_act=True, momentum=0.1, eps=0.001)"
    assert repr(normlayers.EvoNorm2dS0a(8, group_size=4)) == "EvoNorm2dS0a(8, groups=2, apply_act=True, eps=0.001)"
    assert "(act): SiLU()" in repr(normlayers.EvoNorm2dS1(8, groups=2))


def test_group_size_overrides_groups():
    assert normlayers.EvoNorm2dS0(24, groups=5, group_size=6).groups == 4
    assert normlayers.EvoNorm2dS2(24, groups=8).groups == 8


@pytest.mark.parametrize("act_layer, act", [
    (nn.ReLU, TF.relu),
    ("gelu", TF.gelu),
    (functools.partial(nn.LeakyReLU, 0.2), functools.partial(TF.leaky_relu, negative_slope=0.2)),
], ids=["class", "name", "factory"])
@pytest.mark.parametrize("name", ["S1", "S2a"])
def test_act_layer(name, act_layer, act):
    layer = LAYERS[name][0](24, groups=8, act_layer=act_layer).double()
    state = {k: t.double() for k, t in timm_state_dict(name, 24, True).items()}
    layer.load_state_dict(state)
    x = torch.randn(2, 24, 3, 3, dtype=torch.float64)
    assert_close(layer(x), timm_formula(name, x, state, groups=8, act=act))
    no_act = LAYERS[name][0](24, groups=8, act_layer=act_layer, apply_act=False)
    assert isinstance(no_act.act, nn.Identity)  # timm: Identity when apply_act=False


@pytest.mark.parametrize("name", NAMES)
def test_functional_form_equals_module(name):
    """The functional form, given the module's tensors (B: its running_var, updated in place)."""
    layer, _ = make_layer(name, 16, groups=4)
    x = torch.randn(2, 16, 3, 3)
    fn = getattr(NF, f"evo_norm2d_{name.lower()}")
    assert name.lower() in {n.removeprefix("evo_norm2d_") for n in NF.__all__ if n.startswith("evo_norm2d_")}
    assert inspect.signature(fn).parameters["eps"].default == LAYERS[name][2]
    running_var = layer.running_var.clone() if LAYERS[name][1] == "B" else None
    expected = layer.train()(x)
    if running_var is not None:
        start = running_var.clone()
        args = (x, running_var, layer.weight, layer.bias) + ((layer.v,) if name == "B0" else ())
        y = fn(*args, training=True)
        torch.testing.assert_close(running_var, layer.running_var, rtol=0, atol=0)
        assert not torch.equal(running_var, start)
        y_no_update = fn(*(args[:1] + (None,) + args[2:]), training=True)  # running_var=None: no update
        torch.testing.assert_close(y_no_update, expected, rtol=0, atol=0)
    else:
        args = (x, 4, layer.weight, layer.bias) + ((layer.v,) if name.startswith("S0") else ())
        y = fn(*args)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_public_names():
    for name in NAMES:
        assert f"EvoNorm2d{name}" in normlayers.__all__ and f"EvoNorm2d{name}" in normlayers.nn.__all__
        assert f"evo_norm2d_{name.lower()}" in NF.__all__


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_to_module(name):
    layer = LAYERS[name][0](8, **({"groups": 4} if LAYERS[name][1] == "S" else {}))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 8, H, W\)"):
        layer(torch.randn(2, 16, 3, 3))
    for bad in (torch.randn(2, 8, 3), torch.randn(2, 8, 3, 3, 3), torch.randn(8)):
        with pytest.raises(ValueError, match="4-D"):
            layer(bad)
    with pytest.raises(TypeError, match="floating dtype"):
        layer(torch.ones(2, 8, 3, 3, dtype=torch.int64))


@pytest.mark.parametrize("kwargs, match", [
    ({"num_features": 24}, r"groups \(32\) must divide num_features \(24\)"),
    ({"num_features": 24, "groups": 5}, r"groups \(5\) must divide"),
    ({"num_features": 24, "group_size": 5}, r"group_size \(5\) must divide num_features \(24\)"),
    ({"num_features": 24, "groups": 0}, "groups must be a positive int"),
    ({"num_features": 24, "group_size": 0}, "group_size must be a positive int"),
    ({"num_features": 0}, "num_features must be a positive int"),
    ({"num_features": 32, "eps": -1.0}, "eps must be"),
    ({"num_features": 32, "act_layer": "nope"}, "act_layer 'nope'"),
])
def test_bad_s_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        normlayers.EvoNorm2dS1(**kwargs)


def test_bad_constructor_arguments_other():
    with pytest.raises(ValueError, match="momentum must be a number in"):
        normlayers.EvoNorm2dB0(8, momentum=1.5)
    with pytest.raises(ValueError, match="eps must be"):
        normlayers.EvoNorm2dB1(8, eps=float("inf"))
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        normlayers.EvoNorm2dB2(8.0)
    with pytest.raises(TypeError, match="must return an nn.Module"):
        normlayers.EvoNorm2dS2(8, groups=2, act_layer=lambda: TF.silu)
    with pytest.raises(TypeError):  # timm swallows unknown keywords (**_); we do not
        normlayers.EvoNorm2dS0(8, groups=2, act_layer=nn.ReLU)


def test_bad_functional_arguments():
    x = torch.randn(2, 8, 3, 3)
    ones = torch.ones(8)
    with pytest.raises(ValueError, match=r"groups \(3\) must divide the number of channels"):
        NF.evo_norm2d_s1(x, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(8,\)"):
        NF.evo_norm2d_s2(x, 4, torch.ones(4))
    with pytest.raises(ValueError, match=r"running_var must have shape \(C,\)"):
        NF.evo_norm2d_b1(x, torch.ones(7))
    with pytest.raises(ValueError, match="needs v"):
        NF.evo_norm2d_b0(x, ones.clone())
    with pytest.raises(ValueError, match="need v"):
        NF.evo_norm2d_s0(x, 4)
    with pytest.raises(ValueError, match="running_var is required in eval"):
        NF.evo_norm2d_b2(x, None)
    with pytest.raises(TypeError, match="activation must be a callable"):
        NF.evo_norm2d_s1(x, 4, activation="silu")
    # apply_act=False needs neither v nor running_var (affine only)
    torch.testing.assert_close(NF.evo_norm2d_b0(x, None, apply_act=False), x, rtol=0, atol=0)
    torch.testing.assert_close(NF.evo_norm2d_s0(x, 4, apply_act=False), x, rtol=0, atol=0)
