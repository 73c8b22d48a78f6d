"""PowerNorm and UnifiedNorm in a small pre-norm transformer, trained on a synthetic padded-sequence task on CPU;
then the trained UnifiedNorm model is folded for inference (each eval-mode UnifiedNorm becomes part of the linear
layer that reads it) and checked against the unfolded model.

    python examples/power_unified_transformer.py          # ~40 s of CPU time (measured on 2 shared cores)
    python examples/power_unified_transformer.py --quick  # 10 steps per norm, a few seconds (smoke test)

The task: each sequence of random vectors (variable length, padded) is labelled by the sign of its projection on a
fixed direction, summed over the valid tokens. Losses are printed for LayerNorm, PowerNorm and UnifiedNorm; numbers
vary with the machine's threads and are not benchmarks.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import normlayers

DIM, HEADS, LENGTH, BATCH = 32, 4, 12, 16


class Block(nn.Module):
    """Pre-norm encoder block; ``norm`` builds a norm layer of width DIM."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.norm1, self.norm2 = norm(), norm()
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def _norm(self, layer: nn.Module, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        # The batch-statistic norms leave padding out of their statistics; PowerNorm is built with batch_first=True.
        if isinstance(layer, (normlayers.PowerNorm, normlayers.UnifiedNorm)):
            return layer(h, pad_mask=pad)
        return layer(h)

    def forward(self, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        a = self._norm(self.norm1, h, pad)
        h = h + self.attn(a, a, a, key_padding_mask=pad, need_weights=False)[0]
        return h + self.fc2(torch.relu(self.fc1(self._norm(self.norm2, h, pad))))


class Model(nn.Module):
    def __init__(self, norm) -> None:
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        self.blocks = nn.ModuleList([Block(norm) for _ in range(2)])
        self.head = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1))


def batch(gen: torch.Generator, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, LENGTH, 8, generator=gen)
    lengths = torch.randint(3, LENGTH + 1, (BATCH,), generator=gen)
    pad = torch.arange(LENGTH)[None, :] >= lengths[:, None]
    score = ((x @ direction) * (~pad)).sum(1)
    return x, pad, (score > 0).long()


def train(norm, name: str, steps: int) -> tuple[Model, float]:
    """Train a fresh model with ``norm``; returns it and its last step's loss."""
    torch.manual_seed(0)
    model = Model(norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(8, generator=torch.Generator().manual_seed(2))
    for step in range(1, steps + 1):
        x, pad, label = batch(gen, direction)
        loss = nn.functional.cross_entropy(model(x, pad), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == steps:
            print(f"{name:12s} step {step:4d}  loss {loss.item():.4f}")
    return model, loss.item()


def fold_unified_norms(model: Model) -> Model:
    """Each eval-mode UnifiedNorm is y = x·scale + shift; fold it into the linear layers that read it (the attention
    input projection, fc1) and replace it by the identity."""
    folded = copy.deepcopy(model).eval()
    for block in folded.blocks:
        scale, shift = block.norm1.as_affine()
        attn = block.attn
        with torch.no_grad():
            attn.in_proj_bias.add_(attn.in_proj_weight @ shift)
            attn.in_proj_weight.mul_(scale)
        scale, shift = block.norm2.as_affine()
        with torch.no_grad():
            block.fc1.bias.add_(block.fc1.weight @ shift)
            block.fc1.weight.mul_(scale)
        block.norm1, block.norm2 = nn.Identity(), nn.Identity()
    return folded


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 training steps per norm (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per norm (default 100; quick: 10)")
    args = parser.parse_args(argv)
    if args.quick:
        print("--quick: a smoke run of a few training steps; its results say nothing about the norms")
    steps = args.steps or (10 if args.quick else 100)
    # PowerNorm's authors pass the attention heads as group_num and their LR warm-up as warmup_iters; here the
    # warm-ups are short (a third of the run) so that the running statistics take over within the run.
    warmup = max(steps * 3 // 10, 1)
    losses = {}
    _, losses["LayerNorm"] = train(lambda: nn.LayerNorm(DIM), "LayerNorm", steps)
    _, losses["PowerNorm"] = train(lambda: normlayers.PowerNorm(DIM, group_num=HEADS, warmup_iters=warmup,
                                                                batch_first=True), "PowerNorm", steps)
    model, losses["UnifiedNorm"] = train(lambda: normlayers.UnifiedNorm(DIM, warmup_iters=warmup), "UnifiedNorm",
                                         steps)

    model.eval()
    folded = fold_unified_norms(model)
    x, pad, _ = batch(torch.Generator().manual_seed(3), torch.randn(8))
    with torch.no_grad():
        difference = (model(x, pad) - folded(x, pad)).abs().max().item()
    print(f"UnifiedNorm folded into the next linear layers: max |difference| = {difference:.2e}")
    assert difference < 1e-4
    return {"final_loss": losses, "fold_max_abs_difference": difference}


if __name__ == "__main__":
    main()
