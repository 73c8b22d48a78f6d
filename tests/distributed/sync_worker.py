"""One rank of the 2-process gloo runs of ``test_sync_stats.py`` (run as a script: ``sync_worker.py RANK WORLD
INIT_FILE OUT``), and the case definitions the test shares with it (imported by path).

Every rank builds the same modules and the same global batches from fixed seeds, takes its rows of them (uneven
splits, one rank possibly empty) and runs with ``sync_stats`` on; it saves what the test compares with one process
on the whole batch: outputs, input gradients, its parameter gradients (the test sums them over ranks: what DDP's
all-reduce averages) and the buffers after every step.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

import normlayers

CHANNELS, HEIGHT, WIDTH = 8, 3, 2
STEPS = 2


def _randomized(module: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point() and "moving_speed" not in name:
                fresh = torch.rand(t.shape, generator=gen) + 0.5 if name.endswith(("var", "weight", "v")) else \
                    torch.randn(t.shape, generator=gen)
                t.copy_(fresh)
    return module


# name -> (module factory, rows per rank). Uneven batches, and a rank with no rows.
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, int]]] = {
    "bcn": (lambda: normlayers.BatchChannelNorm2d(CHANNELS, num_groups=2, momentum=0.3), (3, 1)),
    "bcn_empty_rank": (lambda: normlayers.BatchChannelNorm2d(CHANNELS, num_groups=4), (2, 0)),
    "bcn_estimate": (lambda: normlayers.BatchChannelNorm2d(CHANNELS, num_groups=2, estimate=True,
                                                           estimate_rate=0.5), (1, 2)),
    "evo_b0": (lambda: normlayers.EvoNorm2dB0(CHANNELS, momentum=0.3), (3, 1)),
    "evo_b0_empty_rank": (lambda: normlayers.EvoNorm2dB0(CHANNELS), (0, 3)),
    "evo_b1": (lambda: normlayers.EvoNorm2dB1(CHANNELS), (1, 2)),
    "evo_b2": (lambda: normlayers.EvoNorm2dB2(CHANNELS), (2, 1)),
}
BACKENDS = ("reference", "triton")


def make_case(name: str) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """The module (sync off), and the global input and output-gradient batches of every step."""
    factory, splits = CASES[name]
    gen = torch.Generator().manual_seed(11)
    total = sum(splits)
    # A per-channel offset beside the spread: the combined variance must not cancel.
    xs = [torch.randn(total, CHANNELS, HEIGHT, WIDTH, generator=gen) * 2 + torch.randn(1, CHANNELS, 1, 1, generator=gen)
          for _ in range(STEPS)]
    grads = [torch.randn(total, CHANNELS, HEIGHT, WIDTH, generator=gen) for _ in range(STEPS)]
    return _randomized(factory()).train(), xs, grads


def run_steps(module: nn.Module, xs: list[torch.Tensor], grads: list[torch.Tensor],
              forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> list[dict]:
    """Forward + backward per step; the results of each step (parameter gradients are fresh each step)."""
    forward = forward or (lambda mod, x: mod(x))
    steps = []
    for x, grad in zip(xs, grads):
        module.zero_grad(set_to_none=False)
        leaf = x.clone().requires_grad_()
        y = forward(module, leaf)
        y.backward(grad)
        steps.append({"y": y.detach(), "dx": leaf.grad,
                      **{f"grad.{n}": p.grad.clone() for n, p in module.named_parameters()},
                      **{f"buffer.{n}": b.clone() for n, b in module.named_buffers()}})
    return steps


def rows_of(rank: int, splits: tuple[int, ...]) -> slice:
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


# ----------------------------------------------------------------------------------------------------------------------
# DDP training of a small CNN (BatchChannelNorm2d + WSConv2d + EvoNorm-B0)
# ----------------------------------------------------------------------------------------------------------------------

DDP_SPLITS = (3, 1)
DDP_STEPS = 3


def make_cnn() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        normlayers.WSConv2d(3, CHANNELS, 3, padding=1), normlayers.BatchChannelNorm2d(CHANNELS, num_groups=2),
        nn.ReLU(), normlayers.WSConv2d(CHANNELS, CHANNELS, 3, padding=1), normlayers.EvoNorm2dB0(CHANNELS),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, 4))


def cnn_data() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(13)
    total = sum(DDP_SPLITS)
    images = [torch.randn(total, 3, 6, 6, generator=gen) for _ in range(DDP_STEPS)]
    labels = [torch.randint(0, 4, (total,), generator=gen) for _ in range(DDP_STEPS)]
    return images, labels


def train_cnn(model: nn.Module, images: list[torch.Tensor], labels: list[torch.Tensor], loss_scale: float) -> None:
    """SGD steps with ``loss = loss_scale · Σ cross-entropy`` over the (local) batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, target in zip(images, labels):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target, reduction="sum") * loss_scale
        loss.backward()
        optimizer.step()


# ----------------------------------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------------------------------


def main(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results: dict = {}
    try:
        for backend_name in BACKENDS:
            for name, (_, splits) in CASES.items():
                module, xs, grads = make_case(name)
                normlayers.convert_sync(module)
                local = rows_of(rank, splits)
                with normlayers.backend(backend_name):
                    results[(backend_name, name)] = run_steps(module, [x[local] for x in xs],
                                                              [g[local] for g in grads])

        # torch.compile(fullgraph=True) of the synced layer: the functional collectives trace.
        module, xs, grads = make_case("bcn")
        normlayers.convert_sync(module)
        local = rows_of(rank, CASES["bcn"][1])
        compiled = torch.compile(lambda mod, x: mod(x), fullgraph=True, backend="aot_eager")
        with normlayers.backend("triton"):
            results[("compiled", "bcn")] = run_steps(module, [x[local] for x in xs], [g[local] for g in grads],
                                                     forward=compiled)

        model = normlayers.convert_sync(make_cnn())
        ddp = nn.parallel.DistributedDataParallel(model)
        images, labels = cnn_data()
        local = rows_of(rank, DDP_SPLITS)
        # DDP averages gradients over ranks; the synced statistics' backward sums every rank's loss. So each rank's
        # loss is world / global batch · its local sum: the average is then the gradient of the global mean loss.
        train_cnn(ddp, [x[local] for x in images], [t[local] for t in labels], world / sum(DDP_SPLITS))
        results["ddp_state"] = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()
    torch.save(results, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
