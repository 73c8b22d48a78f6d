"""Launches per layer call of the fused composites, counted with ``torch.profiler`` under the Triton interpreter
(:func:`normlayers.bench.audit.count_call_launches`: Triton launches plus leaf ATen ops that launch a kernel).

The budgets are issue 16's: training ≤ 3 launches forward and ≤ 4 backward, eval ≤ 2 forward, and no host sync (no
``.item()`` / ``_local_scalar_dense``, so a whole step can be captured in a CUDA graph).
"""

from __future__ import annotations

import pytest
import torch

import normlayers
from normlayers.bench.audit import count_call_launches as count_launches

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="counts interpreted Triton launches; on CUDA the interpreter is off")

TRAIN_FORWARD, TRAIN_BACKWARD, EVAL_FORWARD = 3, 4, 2

def assert_launches_within_budget(module: torch.nn.Module, x: torch.Tensor, *extra) -> None:
    """``module(x, *extra)`` on the triton backend: train forward, train backward and eval forward within the budgets,
    each with a Triton launch seen and no host sync. bf16 module and input: parameter gradients and outputs in bf16
    must come out of the kernels, not from casts."""
    with normlayers.backend("triton"):
        module.train()
        module(x.requires_grad_(), *extra).sum().backward()  # one-time work (e.g. .grad creation) not counted
        for t in (x, *module.parameters()):  # accumulating into an existing .grad is not the layer's launch
            t.grad = None
        forward = count_launches(lambda: module(x, *extra))
        y = module(x, *extra)
        dy = torch.randn_like(y)
        backward = count_launches(lambda: y.backward(dy))
        module.eval()
        with torch.no_grad():
            evaluation = count_launches(lambda: module(x, *extra))
    for phase, count, budget in [("train fwd", forward, TRAIN_FORWARD), ("train bwd", backward, TRAIN_BACKWARD),
                                 ("eval fwd", evaluation, EVAL_FORWARD)]:
        assert count.triton, f"{phase}: no Triton launch seen (is the interpreter on?)"
        assert count.launches <= budget, f"{phase}: {count.launches} launches: {count.triton} + {count.aten}"
        assert not count.syncs, f"{phase}: host syncs {count.syncs}"


LAYERS = {
    "BatchChannelNorm2d": lambda: normlayers.BatchChannelNorm2d(16, num_groups=4),
    "BatchChannelNorm2d-estimate": lambda: normlayers.BatchChannelNorm2d(16, num_groups=4, estimate=True,
                                                                         estimate_rate=0.1),
    "BatchChannelNorm2d-cumulative": lambda: normlayers.BatchChannelNorm2d(16, num_groups=4, momentum=None),
    "EvoNorm2dS0": lambda: normlayers.EvoNorm2dS0(16, groups=4),
    "EvoNorm2dS0a-no-act": lambda: normlayers.EvoNorm2dS0a(16, groups=4, apply_act=False),
    "EvoNorm2dS1": lambda: normlayers.EvoNorm2dS1(16, groups=4),
    "EvoNorm2dS2": lambda: normlayers.EvoNorm2dS2(16, groups=4),
    "EvoNorm2dB0": lambda: normlayers.EvoNorm2dB0(16),
    "EvoNorm2dB1": lambda: normlayers.EvoNorm2dB1(16),
    "EvoNorm2dB2": lambda: normlayers.EvoNorm2dB2(16),
    "GroupNorm-silu": lambda: normlayers.GroupNorm(4, 16, act="silu"),
}


REGION_LAYERS = {
    "RegionNorm2d": lambda: normlayers.RegionNorm2d(16),
    "RegionNorm2d-instance-official": lambda: normlayers.RegionNorm2d(16, stats="instance", affine="official"),
    "RegionNorm2d-no-affine": lambda: normlayers.RegionNorm2d(16, affine=None),
}


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("name", REGION_LAYERS)
def test_region_norm_launches_within_budget(name, mask_dtype):
    # A mask of the feature map's size is read as it is, whatever its dtype: no conversion launch.
    module = REGION_LAYERS[name]().to(torch.bfloat16)
    x = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    mask = (torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(1)) > 0.5).to(mask_dtype)
    assert_launches_within_budget(module, x, mask)


def test_learnable_region_norm_launches_within_budget():
    # RN-L uses the current batch's statistics in eval too: eval is the training forward, two launches.
    module = normlayers.LearnableRegionNorm2d(16).to(torch.bfloat16)
    x = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert_launches_within_budget(module, x)


@pytest.mark.parametrize("name", LAYERS)
def test_launches_per_call_within_budget(name):
    module = LAYERS[name]().to(torch.bfloat16)
    x = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert_launches_within_budget(module, x)


# PowerNorm and UnifiedNorm: the per-channel math (statistics, warm-up rules, ring buffers, outlier filtration, the
# step counters, the approximate backward's ema_gz) lives in one-program finalize kernels; eval is one pass.
TOKEN_LAYERS = {
    "PowerNorm": lambda: normlayers.PowerNorm(16, group_num=2, warmup_iters=1),
    "PowerNorm-no-groups-running-denominator": lambda: normlayers.PowerNorm(16, group_num=None, warmup_iters=1,
                                                                            backward_denominator="running"),
    "UnifiedNorm": lambda: normlayers.UnifiedNorm(16, window_size=2, warmup_iters=1),
    "UnifiedNorm-outlier-filtration": lambda: normlayers.UnifiedNorm(16, window_size=(3, 2), warmup_iters=1,
                                                                     outlier_filtration=True),
}


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("name", TOKEN_LAYERS)
def test_token_norm_launches_within_budget(name, masked):
    module = TOKEN_LAYERS[name]().to(torch.bfloat16)
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    pad = torch.rand(5, 3, generator=torch.Generator().manual_seed(1)) > 0.5 if masked else None
    if name.startswith("PowerNorm") and masked:
        pad = pad.T.contiguous()  # PowerNorm's input is (T, B, C), its mask (B, T)
    assert_launches_within_budget(module, x, pad)
