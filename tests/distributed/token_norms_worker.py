"""One rank of the 2-process gloo runs of ``test_sync_token_norms.py`` (run as a script: ``token_norms_worker.py RANK
WORLD INIT_FILE OUT``), and the case definitions the test shares with it (imported by path).

PowerNorm and UnifiedNorm with ``sync_stats=True``: every rank builds the same module and the same global batches
(padded token sequences) from fixed seeds, takes its samples of them (uneven splits, a rank with no samples or with
only padding) and runs several training steps, across PowerNorm's warm-up and UnifiedNorm's windows. It saves what
the test compares with one process on the whole batch: outputs, input gradients, its parameter gradients (the test
sums them over ranks: what DDP's all-reduce averages) and every buffer after every step — ``ema_gz`` and
``buffer_gz`` included, which the approximate backward updates.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

import normlayers

CHANNELS, TOKENS, STEPS = 6, 4, 6
BACKENDS = ("reference", "triton")


@dataclass(frozen=True)
class Case:
    make: Callable[[], nn.Module]
    splits: tuple[int, ...]  # samples per rank
    batch_dim: int  # the samples' dim of the input: 1 for PowerNorm's official time-major (T, B, C)
    masked: bool = True
    all_pad_rank: Optional[int] = None  # every token of this rank's samples is padding
    start_iters: int = 0
    outlier_step: Optional[int] = None  # this step's batch is ×30


CASES: dict[str, Case] = {
    # warm-up 3 of 6 steps: cumulative φ (t < 3), batch statistic (t <= 3), then φ; ema_gz every step.
    "power": Case(lambda: normlayers.PowerNorm(CHANNELS, alpha_fwd=0.7, alpha_bkw=0.6, warmup_iters=3, group_num=2),
                  (3, 1), batch_dim=1),
    "power_empty_rank": Case(lambda: normlayers.PowerNorm(CHANNELS, warmup_iters=2, group_num=None,
                                                          backward_denominator="running"), (0, 3), batch_dim=1),
    "power_all_pad_rank": Case(lambda: normlayers.PowerNorm(CHANNELS, affine=False, warmup_iters=3, batch_first=True),
                               (2, 2), batch_dim=0, all_pad_rank=1),
    # windows (3, 2) of 6 steps: batch statistics for t <= 3, then the geometric/arithmetic window means.
    "unified": Case(lambda: normlayers.UnifiedNorm(CHANNELS, window_size=(3, 2), warmup_iters=2, momentum=0.7),
                    (1, 3), batch_dim=0),
    "unified_empty_rank": Case(lambda: normlayers.UnifiedNorm(CHANNELS, window_size=2, warmup_iters=0),
                               (2, 0), batch_dim=0, masked=False),
    # the pooled outlier test on the global window (heterogeneous channels, one ×30 batch)
    "unified_outlier_all_pad_rank": Case(lambda: normlayers.UnifiedNorm(CHANNELS, window_size=2, warmup_iters=2,
                                                                        outlier_filtration=True),
                                         (2, 2), batch_dim=0, all_pad_rank=0, outlier_step=4),
    # steps 998..1003 cross step 1000, where the backward's factor r starts
    "unified_resumed": Case(lambda: normlayers.UnifiedNorm(CHANNELS, window_size=2, warmup_iters=2),
                            (3, 1), batch_dim=0, start_iters=997, outlier_step=4),
}
COMPILED_CASES = ("power", "unified")


def _randomized(module: nn.Module, start_iters: int) -> nn.Module:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                positive = name in ("weight", "running_phi", "running_var", "buffer_x2")
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if positive else torch.randn(t.shape, generator=gen))
        module.iters.fill_(start_iters)
    return module


def make_case(name: str) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The module (sync off), and every step's global ``(input, pad_mask, output gradient)``."""
    case = CASES[name]
    gen = torch.Generator().manual_seed(11)
    samples = sum(case.splits)
    # Channel scales spread over 0.3..3 (UnifiedNorm's pooled outlier test needs heterogeneous channels, spec §2.7).
    scales = torch.logspace(math.log10(0.3), math.log10(3.0), CHANNELS)
    shape = (TOKENS, samples, CHANNELS) if case.batch_dim == 1 else (samples, TOKENS, CHANNELS)
    batches = []
    for step in range(STEPS):
        x = torch.randn(shape, generator=gen) * scales * (30.0 if step == case.outlier_step else 1.0)
        lengths = torch.randint(1, TOKENS + 1, (samples,), generator=gen)
        pad = torch.arange(TOKENS)[None, :] >= lengths[:, None]  # (B, T), True = padding
        if case.all_pad_rank is not None:
            pad[rows_of(case.all_pad_rank, case.splits)] = True
        batches.append((x, pad, torch.randn(shape, generator=gen)))
    return _randomized(case.make(), case.start_iters).train(), batches


def rows_of(rank: int, splits: tuple[int, ...]) -> slice:
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


def local_batches(name: str, batches: list, rank: int) -> list:
    """This rank's samples of every step's batch."""
    case = CASES[name]
    samples = rows_of(rank, case.splits)
    index = (slice(None), samples) if case.batch_dim == 1 else (samples,)
    return [(x[index], pad[samples], grad[index]) for x, pad, grad in batches]


def run_steps(name: str, module: nn.Module, batches: list,
              forward: Callable[..., torch.Tensor] | None = None) -> list[dict]:
    """Forward + backward per step; the results of each step (parameter gradients are fresh each step)."""
    masked = CASES[name].masked
    forward = forward or (lambda mod, x, pad: mod(x, pad))
    steps = []
    for x, pad, grad in batches:
        module.zero_grad(set_to_none=False)
        leaf = x.clone().requires_grad_()
        y = forward(module, leaf, pad if masked else None)
        y.backward(grad)
        steps.append({"y": y.detach(), "dx": leaf.grad,
                      **{f"grad.{n}": p.grad.clone() for n, p in module.named_parameters()},
                      **{f"buffer.{n}": b.clone() for n, b in module.named_buffers()}})
    return steps


# ----------------------------------------------------------------------------------------------------------------------
# DDP training of a small token model (PowerNorm and UnifiedNorm, synced)
# ----------------------------------------------------------------------------------------------------------------------

DDP_SPLITS = (3, 1)
DDP_STEPS = 4  # across both layers' warm-up (2) and UnifiedNorm's window (2)


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Linear(3, CHANNELS)
        self.power = normlayers.PowerNorm(CHANNELS, warmup_iters=2, group_num=2, batch_first=True)
        self.mix = nn.Linear(CHANNELS, CHANNELS)
        self.unified = normlayers.UnifiedNorm(CHANNELS, window_size=2, warmup_iters=2)
        self.head = nn.Linear(CHANNELS, 2)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.power(self.embed(x), pad)
        # tanh, not ReLU: a channel that ReLU zeroes on one step of the window gives UnifiedNorm a geometric mean of
        # 0 there (the official log-of-zero behaviour, docs/power_unified.md), and the toy model diverges.
        return self.head(self.unified(torch.tanh(self.mix(h)), pad))


def token_data() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(13)
    samples = sum(DDP_SPLITS)
    data = []
    for _ in range(DDP_STEPS):
        lengths = torch.randint(1, TOKENS + 1, (samples,), generator=gen)
        pad = torch.arange(TOKENS)[None, :] >= lengths[:, None]
        data.append((torch.randn(samples, TOKENS, 3, generator=gen), pad,
                     torch.randn(samples, TOKENS, 2, generator=gen)))
    return data


def train_tokens(model: nn.Module, data: list, loss_scale: float) -> None:
    """SGD steps with ``loss = loss_scale · Σ`` squared error over the (local) non-pad tokens."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, pad, target in data:
        optimizer.zero_grad()
        error = (model(x, pad) - target).square() * (~pad)[..., None]
        (error.sum() * loss_scale).backward()
        optimizer.step()


def main(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results: dict = {}
    try:
        for backend_name in BACKENDS:
            for name in CASES:
                module, batches = make_case(name)
                normlayers.convert_sync(module)
                with normlayers.backend(backend_name):
                    results[(backend_name, name)] = run_steps(name, module, local_batches(name, batches, rank))
        # An explicit process group (not the default world): the custom ops get it by name.
        group = dist.new_group(list(range(world)))
        for name in COMPILED_CASES:
            module, batches = make_case(name)
            normlayers.convert_sync(module, process_group=group)
            with normlayers.backend("triton"):
                results[("group", name)] = run_steps(name, module, local_batches(name, batches, rank))
        # torch.compile(fullgraph=True): the collectives of the forward and of the registered backward trace.
        for backend_name in BACKENDS:
            for name in COMPILED_CASES:
                torch._dynamo.reset()
                module, batches = make_case(name)
                normlayers.convert_sync(module)
                compiled = torch.compile(lambda mod, x, pad: mod(x, pad), fullgraph=True, backend="aot_eager")
                with normlayers.backend(backend_name):
                    results[("compiled", backend_name, name)] = run_steps(
                        name, module, local_batches(name, batches, rank), forward=compiled)
        for backend_name in BACKENDS:
            model = normlayers.convert_sync(TokenModel())
            ddp = nn.parallel.DistributedDataParallel(model)
            local = rows_of(rank, DDP_SPLITS)
            # The usual DDP convention: each rank's loss is world / global batch · its local sum (see the test).
            with normlayers.backend(backend_name):
                train_tokens(ddp, [(x[local], pad[local], t[local]) for x, pad, t in token_data()],
                             world / sum(DDP_SPLITS))
            results[("ddp", backend_name)] = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()
    torch.save(results, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
