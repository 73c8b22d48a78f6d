"""PowerNorm and UnifiedNorm as modules: official state names, eval path, exact-gradient cases, plumbing, bad input.

The step-by-step agreement with the authors' algorithms is in test_power_unified_steps.py. Here the oracles are
torch built-ins and autograd: eval outputs against the formula written with plain tensor ops, the cases where the
method's gradient is the exact one against ``torch.autograd.gradcheck`` (finite differences), ``as_affine`` against
the same eval formula.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import normlayers
from normlayers import functional as NF
from normlayers.testing import assert_close

BACKENDS = ["reference", "triton"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _trained(layer: torch.nn.Module, steps: int = 3, shape=(4, 3, 8)) -> torch.nn.Module:
    for _ in range(steps):
        layer(torch.randn(shape) * torch.logspace(-1, 1, shape[-1])).square().sum().backward()
    return layer


# ----------------------------------------------------------------------------------------------------------------------
# Signatures and official state
# ----------------------------------------------------------------------------------------------------------------------


def test_signatures_follow_the_authors():
    pn = inspect.signature(normlayers.PowerNorm).parameters
    assert list(pn)[:7] == ["num_features", "eps", "alpha_fwd", "alpha_bkw", "affine", "warmup_iters", "group_num"]
    assert [pn[k].default for k in list(pn)[1:7]] == [1e-5, 0.9, 0.9, True, 10000, 1]
    un = inspect.signature(normlayers.UnifiedNorm).parameters
    assert list(un)[:6] == ["num_features", "window_size", "warmup_iters", "outlier_filtration", "eps", "momentum"]
    assert [un[k].default for k in list(un)[1:6]] == [4, 4000, False, 1e-5, 0.9]
    for params in (pn, un):
        for name in ("process_group", "sync_stats", "device", "dtype"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_power_norm_official_state_dict():
    # MaskPowerNorm: weight, bias (C,); running_phi, ema_gz (1, C, 1, 1); iters (1,) int64 (spec §1.2).
    m = normlayers.PowerNorm(8, group_num=4)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}
    assert shapes == {"weight": ((8,), torch.float32), "bias": ((8,), torch.float32),
                      "running_phi": ((1, 8, 1, 1), torch.float32), "ema_gz": ((1, 8, 1, 1), torch.float32),
                      "iters": ((1,), torch.int64)}
    official = {"weight": torch.rand(8), "bias": torch.randn(8), "running_phi": torch.rand(1, 8, 1, 1) + 0.5,
                "ema_gz": torch.randn(1, 8, 1, 1), "iters": torch.tensor([12345])}
    m.load_state_dict(official, strict=True)
    assert m.iters.item() == 12345 and torch.equal(m.running_phi, official["running_phi"])


def test_unified_norm_official_state_dict():
    # UN1d: weight, bias, running_var, ema_gz (C,); iters, skip_counter (1,) int64; buffer_x2 (M, C), buffer_gz
    # (M_b, C) (spec §2.2).
    m = normlayers.UnifiedNorm(8, window_size=(4, 3))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"weight": (8,), "bias": (8,), "running_var": (8,), "ema_gz": (8,), "iters": (1,),
                      "buffer_x2": (4, 8), "buffer_gz": (3, 8), "skip_counter": (1,)}
    assert m.iters.dtype == m.skip_counter.dtype == torch.int64
    assert torch.equal(m.running_var, torch.ones(8)) and not m.buffer_x2.any() and not m.ema_gz.any()


def test_power_norm_affine_false_has_no_parameters():
    # The official code ignores affine=False (spec §1.2); here it means what it says.
    m = normlayers.PowerNorm(6, affine=False, warmup_iters=2)
    assert m.weight is None and m.bias is None and list(m.parameters()) == []
    x = torch.randn(3, 2, 6)
    with_affine = normlayers.PowerNorm(6, warmup_iters=2)
    assert_close(m(x), with_affine(x))


def test_extra_repr():
    assert repr(normlayers.PowerNorm(8, group_num=2, batch_first=True)) == (
        "PowerNorm(8, eps=1e-05, alpha_fwd=0.9, alpha_bkw=0.9, affine=True, warmup_iters=10000, group_num=2, "
        "batch_first=True)")
    assert repr(normlayers.UnifiedNorm(8, window_size=(4, 2), grad_compensation=False)) == (
        "UnifiedNorm(8, window_size=(4, 2), warmup_iters=4000, outlier_filtration=False, eps=1e-05, momentum=0.9, "
        "grad_compensation=False)")


# ----------------------------------------------------------------------------------------------------------------------
# Eval path, folding, exact-gradient cases
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_power_norm_eval_is_group_scaling_then_running_phi(backend):
    m = _trained(normlayers.PowerNorm(8, group_num=2, warmup_iters=2)).eval()
    x = torch.randn(4, 3, 8)
    groups = x.reshape(4, 3, 2, 4)
    u = (groups / torch.sqrt(groups.square().mean(-1, keepdim=True) + 1e-5)).reshape(4, 3, 8)
    expected = m.weight * u / torch.sqrt(m.running_phi.reshape(8) + m.eps) + m.bias
    before = copy.deepcopy(m.state_dict())
    with normlayers.backend(backend):
        assert_close(m(x), expected)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()), "eval changed a buffer"


@pytest.mark.parametrize("backend", BACKENDS)
def test_unified_norm_eval_is_running_var_formula_and_as_affine(backend):
    # eps = 0.1, against running_var values of order 1, so an eval path or an as_affine that drops or misplaces eps is
    # off by several percent: the oracle is the formula y = weight·x/sqrt(running_var + eps) + bias written here.
    m = _trained(normlayers.UnifiedNorm(8, warmup_iters=2, eps=0.1)).eval()
    x = torch.randn(3, 5, 8)
    expected = m.weight * x / torch.sqrt(m.running_var + 0.1) + m.bias
    before = copy.deepcopy(m.state_dict())
    with normlayers.backend(backend):
        assert_close(m(x), expected)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()), "eval changed a buffer"
    scale, shift = m.as_affine()
    assert not scale.requires_grad and scale.shape == shift.shape == (8,)
    assert_close(x * scale + shift, expected)
    # Folded into the next linear layer: W' = W diag(scale), b' = b + W shift.
    linear = torch.nn.Linear(8, 4)
    folded = torch.nn.Linear(8, 4)
    with torch.no_grad():
        folded.weight.copy_(linear.weight * scale)
        folded.bias.copy_(linear.bias + linear.weight @ shift)
    assert_close(folded(x), linear(m(x)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", ["power", "unified"])
def test_gradcheck_eval_fp64(backend, layer):
    # In eval both are differentiable maps with autograd's own gradient.
    if layer == "power":
        m = normlayers.PowerNorm(4, group_num=2, dtype=torch.float64).eval()
    else:
        m = normlayers.UnifiedNorm(4, dtype=torch.float64).eval()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    with normlayers.backend(backend):
        assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (x,)),
                                        (x, m.weight.detach().clone().requires_grad_(),
                                         m.bias.detach().clone().requires_grad_()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unified_norm_window_one_gradient_is_exact_fp64(backend):
    # M = 1 skips every step (spec §2.4): forward on the batch quadratic mean, backward the exact gradient of it
    # (spec §2.5, without padding). gradcheck compares with finite differences of the forward.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()

    def step(x, w, b):
        state = [torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                 torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64),
                 torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)]
        return NF.unified_norm(x, *state, w, b, training=True, warmup_iters=0)

    with normlayers.backend(backend):
        assert torch.autograd.gradcheck(step, (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dimensional_input_is_one_token_per_sample(backend):
    x = torch.randn(6, 8)
    pad = torch.tensor([False, True, False, False, True, False])
    for make in (lambda: normlayers.PowerNorm(8, group_num=2, warmup_iters=5),
                 lambda: normlayers.UnifiedNorm(8, warmup_iters=5)):
        a, b = make(), make()
        with normlayers.backend(backend):
            y2 = a(x, pad_mask=pad)
            y3 = b(x.unsqueeze(0), pad_mask=pad.unsqueeze(0) if isinstance(b, normlayers.UnifiedNorm)
                   else pad.unsqueeze(1))
        assert_close(y2, y3.squeeze(0))
        for k, v in a.state_dict().items():
            assert_close(v.float(), b.state_dict()[k].float(), msg=k)
        # The official 2-D mask form, (B, 1) for PowerNorm and (1, B) for UnifiedNorm, is the same mask.
        official = pad.unsqueeze(1) if isinstance(a, normlayers.PowerNorm) else pad.unsqueeze(0)
        with normlayers.backend(backend):
            assert_close(copy.deepcopy(a)(x, pad_mask=official), copy.deepcopy(a)(x, pad_mask=pad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_padded_batch_keeps_the_running_statistics(backend):
    # The official code would write NaN (0/0); the documented guard keeps the statistic (spec §1.8, §2.8).
    for m in (normlayers.PowerNorm(4, warmup_iters=1), normlayers.UnifiedNorm(4, warmup_iters=1, window_size=1)):
        _trained(m, 2, (3, 2, 4))
        stat = (m.running_phi if isinstance(m, normlayers.PowerNorm) else m.running_var).clone()
        with normlayers.backend(backend):
            all_pad = torch.ones((2, 3) if isinstance(m, normlayers.PowerNorm) else (3, 2), dtype=torch.bool)
            y = m(torch.randn(3, 2, 4), pad_mask=all_pad)
            y.sum().backward()
        assert torch.isfinite(y).all()
        assert_close(m.running_phi if isinstance(m, normlayers.PowerNorm) else m.running_var, stat)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_keeps_every_buffer_finite(backend):
    # No tokens at all: the forward statistic falls back to the running one (kept), and the backward's means over
    # zero tokens are 0, not 0/0 (PowerNorm's ema_gz adds 0; UnifiedNorm's decays towards gz = 0, by its update rule).
    for m, shape, kept in ((normlayers.PowerNorm(4, warmup_iters=1), (0, 2, 4), ("running_phi", "ema_gz")),
                           (normlayers.UnifiedNorm(4, warmup_iters=1, window_size=1), (2, 0, 4), ("running_var",))):
        _trained(m, 2, (3, 2, 4))
        before = copy.deepcopy(m.state_dict())
        x = torch.randn(shape, requires_grad=True)
        with normlayers.backend(backend):
            m(x).sum().backward()
        for key, value in m.state_dict().items():
            assert torch.isfinite(value.double()).all(), key
            if key in kept:
                assert_close(value.double(), before[key].double(), dtype=torch.float32, msg=key)


def test_reset_iters_helper():
    model = torch.nn.Sequential(normlayers.PowerNorm(8, warmup_iters=2), torch.nn.Linear(8, 8),
                                normlayers.UnifiedNorm(8, warmup_iters=2))
    _trained(model)
    phi = model[0].running_phi.clone()
    assert model[0].iters.item() == 3 and model[2].iters.item() == 3
    assert normlayers.reset_iters(model) == 2
    assert model[0].iters.item() == 0 and model[2].iters.item() == 0
    assert torch.equal(model[0].running_phi, phi), "statistics are kept"


def test_no_gradient_step_updates_forward_state_only():
    # ema_gz is a backward statistic: a training forward under no_grad does not move it (spec §1.5).
    m = normlayers.PowerNorm(4, warmup_iters=1)
    with torch.no_grad():
        m(torch.randn(3, 2, 4))
    assert m.iters.item() == 1 and not m.ema_gz.any() and not torch.equal(m.running_phi, torch.ones(1, 4, 1, 1))


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda **kw: normlayers.PowerNorm(8, group_num=2, warmup_iters=2, **kw),
                                  lambda **kw: normlayers.UnifiedNorm(8, window_size=(3, 2), warmup_iters=2, **kw)])
def test_state_dict_round_trip_and_deepcopy(make):
    a = _trained(make(), 4)
    b = make()
    b.load_state_dict(a.state_dict(), strict=True)
    c = copy.deepcopy(a)
    x = torch.randn(4, 3, 8)
    ys = [m(x) for m in (a, b, c)]  # one training step from identical state stays identical
    for m, y in zip((b, c), ys[1:]):
        assert torch.equal(y, ys[0])
        for k, v in m.state_dict().items():
            assert torch.equal(v, a.state_dict()[k]), k


@pytest.mark.parametrize("make", [lambda **kw: normlayers.PowerNorm(8, group_num=2, **kw),
                                  lambda **kw: normlayers.UnifiedNorm(8, **kw)])
def test_to_dtype_and_meta_device(make):
    m = make().to(torch.float64)
    assert m.weight.dtype == torch.float64 and m.iters.dtype == torch.int64
    assert m(torch.randn(2, 3, 8, dtype=torch.float64)).dtype == torch.float64
    meta = make(device="meta")
    assert all(t.is_meta for t in meta.state_dict().values())
    y = meta.eval()(torch.empty(2, 3, 8, device="meta", dtype=torch.bfloat16))
    assert y.is_meta and y.shape == (2, 3, 8) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_keeps_dtype_and_fp32_state(dtype):
    # Statistics in fp32 from the low-precision input; only the output is rounded (to the input's dtype).
    for make in (lambda: normlayers.PowerNorm(8, group_num=2, warmup_iters=2),
                 lambda: normlayers.UnifiedNorm(8, warmup_iters=2)):
        low, ref = make(), make()
        x = torch.randn(4, 3, 8) * 3
        y = low(x.to(dtype))
        y_ref = ref(x.to(dtype).float())
        assert y.dtype == dtype
        assert_close(y.float(), y_ref.to(dtype).float(), dtype=torch.float32)
        for k, v in low.state_dict().items():
            assert v.dtype == ref.state_dict()[k].dtype
            assert_close(v.double(), ref.state_dict()[k].double(), dtype=torch.float32, msg=k)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    pn = normlayers.PowerNorm(8, group_num=2)
    un = normlayers.UnifiedNorm(8)
    x = torch.randn(5, 3, 8)  # PN: (T, B, C) -> mask (B, T) = (3, 5); UN: (B, N, C) -> mask (5, 3)
    with normlayers.backend(backend):
        with pytest.raises(ValueError, match="num_features"):
            pn(torch.randn(5, 3, 6))
        with pytest.raises(ValueError, match="num_features"):
            un(torch.randn(5, 3, 6))
        with pytest.raises(ValueError, match=r"pad_mask must have shape \[3, 5\]"):
            pn(x, pad_mask=torch.zeros(5, 3, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"pad_mask must have shape \[5, 3\]"):
            un(x, pad_mask=torch.zeros(3, 5, dtype=torch.bool))
        for m, mask in ((pn, torch.zeros(3, 5, dtype=torch.uint8)), (un, torch.zeros(5, 3, dtype=torch.long))):
            with pytest.raises(TypeError, match="pad_mask must be a bool tensor"):
                m(x, pad_mask=mask)
        with pytest.raises(ValueError, match="3-D"):
            un(torch.randn(2, 3, 4, 8))
        with pytest.raises(TypeError, match="floating"):
            pn(torch.ones(5, 3, 8, dtype=torch.long))
    assert pn.iters.item() == 0 and un.iters.item() == 0, "a rejected call must not count as a step"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [lambda **kw: normlayers.PowerNorm(6, group_num=2, warmup_iters=2, **kw),
                                  lambda **kw: normlayers.UnifiedNorm(6, window_size=2, warmup_iters=2, **kw)])
def test_sync_stats_is_a_no_op_outside_distributed_training(backend, make):
    # No process group here: sync_stats=True must give the local layer's numbers (the 2-rank runs are in
    # tests/distributed/test_sync_token_norms.py).
    synced, local = make(sync_stats=True), make()
    assert synced.sync_stats and not local.sync_stats
    assert normlayers.convert_sync(local) is local and local.sync_stats
    local.sync_stats = False
    gen = torch.Generator().manual_seed(3)
    with normlayers.backend(backend):
        for _ in range(3):  # across warm-up
            x, dy = torch.randn(4, 3, 6, generator=gen), torch.randn(4, 3, 6, generator=gen)
            outs = []
            for layer in (synced, local):
                leaf = x.clone().requires_grad_()
                y = layer(leaf)
                y.backward(dy)
                outs.append((y, leaf.grad))
            assert_close(outs[0][0], outs[1][0])
            assert_close(outs[0][1], outs[1][1])
    for (name, a), b in zip(synced.state_dict().items(), local.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="group_num"):
        normlayers.PowerNorm(6, group_num=4)
    with pytest.raises(ValueError, match="backward_denominator"):
        normlayers.PowerNorm(6, backward_denominator="paper")
    with pytest.raises(ValueError, match="alpha_fwd"):
        normlayers.PowerNorm(6, alpha_fwd=1.5)
    with pytest.raises(ValueError, match="window_size"):
        normlayers.UnifiedNorm(6, window_size=0)
    with pytest.raises(ValueError, match="window_size"):
        normlayers.UnifiedNorm(6, window_size=(4, 2, 1))
    with pytest.raises(ValueError, match="momentum"):
        normlayers.UnifiedNorm(6, momentum=-0.1)


def test_bad_functional_state():
    x = torch.randn(2, 3, 4)
    ones, zeros = torch.ones(4), torch.zeros(4)
    window = torch.zeros(2, 4)
    count = torch.zeros(1, dtype=torch.long)
    with pytest.raises(TypeError, match="iters"):
        NF.power_norm(x, ones, zeros, torch.zeros(1), training=True)
    with pytest.raises(ValueError, match="buffer_x2"):
        NF.unified_norm(x, ones, zeros, torch.zeros(2, 5), window, count, count.clone(), ones, zeros, training=True)
    with pytest.raises(ValueError, match="running_var"):
        NF.unified_norm(x, torch.ones(1, 4), zeros, window, window, count, count.clone(), ones, zeros)
