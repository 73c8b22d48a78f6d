"""One rank of the 2-process gloo runs of ``test_sync_region_spd.py`` (run as a script: ``region_spd_worker.py RANK
WORLD INIT_FILE OUT``), and the case definitions the test shares with it (imported by path).

RegionNorm2d / LearnableRegionNorm2d (``stats="batch"``) and SPDBatchNorm with ``sync_stats`` on. Every rank builds
the same module and the same global batches (inputs, masks, output gradients) from fixed seeds, takes its rows
(uneven splits, one rank possibly empty; masks whose hole region is empty on one rank, or on every rank) and saves
what the test compares with one process on the whole batch: outputs, input gradients, its parameter gradients (the
test sums them over ranks) and the buffers after every step.
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import normlayers

CHANNELS, HEIGHT, WIDTH = 3, 4, 3
MATRIX = 3
STEPS = 2


class Case(NamedTuple):
    factory: Callable[[], nn.Module]
    splits: tuple[int, int]
    kind: str  # "region" (input, mask), "learnable_region" (input), "spd" (SPD matrices)
    mask: str = "random"  # region masks: "random", "no_holes_on_rank1" (the hole region empty there), "no_holes"
    group_shape: tuple[int, ...] = ()  # SPD: dims between the batch and the matrix


def _rn_b(**kwargs) -> Callable[[], nn.Module]:
    # eps = 0.1: large enough that the effective epsilon ε·V/S_r, and so the counts it is taken from, shows.
    return lambda: normlayers.RegionNorm2d(CHANNELS, eps=0.1, **kwargs)


def _rn_l(**kwargs) -> Callable[[], nn.Module]:
    return lambda: normlayers.LearnableRegionNorm2d(CHANNELS, threshold=0.5, kernel_size=3, eps=0.1, **kwargs)


def _spd(**kwargs) -> Callable[[], nn.Module]:
    return lambda: normlayers.SPDBatchNorm(MATRIX, momentum=0.3, dtype=torch.float64, **kwargs)


CASES: dict[str, Case] = {
    "rn_b": Case(_rn_b(), (3, 1), "region"),
    "rn_b_hole_empty_on_a_rank": Case(_rn_b(affine="official"), (2, 2), "region", mask="no_holes_on_rank1"),
    "rn_b_hole_empty_everywhere": Case(_rn_b(), (1, 2), "region", mask="no_holes"),
    "rn_b_empty_rank_plain_eps": Case(_rn_b(eps_mode="plain"), (0, 3), "region"),
    "rn_b_instance": Case(_rn_b(stats="instance"), (2, 1), "region"),  # sync is a no-op
    "rn_l": Case(_rn_l(), (3, 1), "learnable_region"),
    "rn_l_empty_rank": Case(_rn_l(), (2, 0), "learnable_region"),
    "spd": Case(_spd(karcher_steps=2), (3, 2), "spd", group_shape=(2,)),  # pooled over (N, 2)
    "spd_channels_reference_variance": Case(_spd(channels=2, variance="reference", theta=0.5), (1, 3), "spd",
                                            group_shape=(2,)),
    "spd_empty_rank": Case(_spd(learn_metric=False), (0, 3), "spd"),
}
BACKENDS = ("reference", "triton")
COMPILED = ("rn_b", "rn_l", "spd")
EVALUATED = ("rn_b", "spd")  # after training: RN uses local statistics in eval, SPD its (synced) running buffers


def _randomized(module: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fresh = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3
            if name.endswith("original"):  # SPDBatchNorm's matrix logarithms: symmetric
                fresh = (fresh + fresh.mT) / 2
            p.copy_(fresh + 1 if name == "shift" else fresh)
    return module


def _masks(case: Case, total: int, gen: torch.Generator) -> Tensor:
    # Masks at twice the feature map's size: the layer resizes them (nearest), on every rank alike.
    masks = torch.rand(total, 1, 2 * HEIGHT, 2 * WIDTH, generator=gen) > 0.6
    if case.mask == "no_holes":
        masks.zero_()
    elif case.mask == "no_holes_on_rank1":
        masks[case.splits[0]:] = False
    return masks


def _spd_batch(case: Case, total: int, gen: torch.Generator) -> Tensor:
    a = torch.randn(total, *case.group_shape, MATRIX, MATRIX, generator=gen, dtype=torch.float64)
    return a @ a.mT + 0.3 * torch.eye(MATRIX, dtype=torch.float64)


def make_case(name: str) -> tuple[nn.Module, list[tuple[Tensor, ...]], list[Tensor]]:
    """The module (sync off), and every step's global inputs (the differentiated one first) and output gradient."""
    case = CASES[name]
    torch.manual_seed(3)  # RN-L's convs keep their default (random) init
    module = _randomized(case.factory()).train()
    gen = torch.Generator().manual_seed(11)
    total = sum(case.splits)
    inputs, grads = [], []
    for _ in range(STEPS):
        if case.kind == "spd":
            x = _spd_batch(case, total, gen)
            inputs.append((x,))
            grads.append(torch.randn(x.shape, generator=gen, dtype=x.dtype))
            continue
        # A per-channel offset beside the spread: the combined variance must not cancel.
        x = torch.randn(total, CHANNELS, HEIGHT, WIDTH, generator=gen) * 2 + torch.randn(1, CHANNELS, 1, 1,
                                                                                          generator=gen)
        inputs.append((x, _masks(case, total, gen)) if case.kind == "region" else (x,))
        grads.append(torch.randn(x.shape, generator=gen))
    return module, inputs, grads


def rows_of(rank: int, splits: tuple[int, ...]) -> slice:
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


def local_rows(rank: int, name: str, inputs: list[tuple[Tensor, ...]], grads: list[Tensor]
               ) -> tuple[list[tuple[Tensor, ...]], list[Tensor]]:
    rows = rows_of(rank, CASES[name].splits)
    return [tuple(t[rows] for t in step) for step in inputs], [g[rows] for g in grads]


def run_steps(module: nn.Module, inputs: list[tuple[Tensor, ...]], grads: list[Tensor],
              forward: Optional[Callable[..., Tensor]] = None) -> list[dict]:
    """Forward + backward per step (gradient into the first input); each step's results, parameter gradients fresh."""
    forward = forward or (lambda mod, *args: mod(*args))
    steps = []
    for (x, *rest), grad in zip(inputs, grads):
        module.zero_grad(set_to_none=False)
        leaf = x.clone().requires_grad_()
        y = forward(module, leaf, *rest)
        y.backward(grad)
        steps.append({"y": y.detach(), "dx": leaf.grad,
                      **{f"grad.{n}": p.grad.clone() for n, p in module.named_parameters()},
                      **{f"buffer.{n}": b.clone() for n, b in module.named_buffers()}})
    return steps


def evaluate(module: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    """The module's eval-mode output on ``inputs`` (after its training steps)."""
    with torch.no_grad():
        return module.eval()(*inputs)


def main(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results: dict = {}
    try:
        for name, case in CASES.items():
            # SPDBatchNorm has one (torch) path on every backend.
            for backend_name in BACKENDS if case.kind != "spd" else BACKENDS[:1]:
                module, inputs, grads = make_case(name)
                normlayers.convert_sync(module)
                local_inputs, local_grads = local_rows(rank, name, inputs, grads)
                with normlayers.backend(backend_name):
                    results[(backend_name, name)] = run_steps(module, local_inputs, local_grads)
                    if name in EVALUATED:  # no collective in eval: only this rank calls it
                        results[(backend_name, "eval", name)] = evaluate(module, local_inputs[0]) if rank == 0 \
                            else None
        # torch.compile(fullgraph=True) of each synced layer: the functional collectives trace.
        for name in COMPILED:
            module, inputs, grads = make_case(name)
            normlayers.convert_sync(module)
            compiled = torch.compile(module, fullgraph=True, backend="aot_eager")  # shares module's parameters
            with normlayers.backend("triton"):
                results[("compiled", name)] = run_steps(module, *local_rows(rank, name, inputs, grads),
                                                        forward=lambda _, *args: compiled(*args))
    finally:
        dist.destroy_process_group()
    torch.save(results, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
