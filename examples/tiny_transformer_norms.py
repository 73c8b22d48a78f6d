"""A small causal language model trained with five norms: LayerNorm, RMSNorm, CRMSNorm, PowerNorm, UnifiedNorm.

The corpus is synthetic (nothing is downloaded): text from a random second-order Markov chain over 48 symbols whose
next-token distribution depends on the last two tokens, so there is real structure to learn (the best possible loss is
the chain's entropy rate, printed). Every model is the
library's ``normlayers.testing.models.TransformerLM`` with the same seed, optimizer and data order; only ``norm_layer``
changes. PowerNorm and UnifiedNorm leave their warm-up (batch statistics) after a third of the steps and then
normalize with running statistics, so their validation loss (eval mode) uses what they learned.

    python examples/tiny_transformer_norms.py                 # 300 steps per norm, a few minutes on a CPU
    python examples/tiny_transformer_norms.py --quick         # a few steps (smoke test)

Prints a table of final training and validation losses and saves the loss curves to ``--plot``
(``tiny_transformer_norms.png``; needs matplotlib, else the curves are written as CSV next to it).
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import normlayers
from normlayers.testing.models import TransformerLM

VOCAB, CONTEXT = 48, 64


def markov_corpus(length: int, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """``length`` tokens of a random second-order Markov chain whose next-token logits are the sum of a term for the
    previous token and one for the token before it (so the model must attend two positions back), and the chain's
    entropy rate in nats (the loss floor)."""
    last, before_last = (2.5 * torch.randn(VOCAB, VOCAB, generator=generator) for _ in range(2))
    probs = torch.softmax(before_last[:, None, :] + last[None, :, :], dim=-1)  # [token i-2, token i-1, next]
    cumulative = probs.cumsum(-1)
    tokens = torch.empty(length, dtype=torch.long)
    tokens[:2] = torch.randint(0, VOCAB, (2,), generator=generator)
    uniform = torch.rand(length, generator=generator)
    for i in range(2, length):
        tokens[i] = torch.searchsorted(cumulative[tokens[i - 2], tokens[i - 1]], uniform[i].unsqueeze(0)).clamp_(
            max=VOCAB - 1)
    # The entropy rate under the sample's own frequencies of (token i-2, token i-1) contexts.
    pairs = torch.bincount(tokens[:-1] * VOCAB + tokens[1:], minlength=VOCAB * VOCAB).float()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).reshape(-1)
    return tokens, float((pairs / pairs.sum() * entropy).sum())


def norm_layers(warmup_iters: int) -> dict[str, Callable[..., nn.Module]]:
    return {
        "LayerNorm": normlayers.LayerNorm,
        "RMSNorm": normlayers.RMSNorm,
        "CRMSNorm": normlayers.CRMSNorm,
        "PowerNorm": functools.partial(normlayers.PowerNorm, batch_first=True, warmup_iters=warmup_iters),
        "UnifiedNorm": functools.partial(normlayers.UnifiedNorm, warmup_iters=warmup_iters),
    }


def batches(tokens: torch.Tensor, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - CONTEXT - 1, (steps, batch_size), generator=generator)
    return [torch.stack([tokens[s:s + CONTEXT + 1] for s in row]) for row in starts]


def evaluate(model: nn.Module, data: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(b[:, :-1]).reshape(-1, VOCAB), b[:, 1:].reshape(-1)).item()
                  for b in data]
    model.train()
    return sum(losses) / len(losses)


def train(name: str, norm_layer: Callable[..., nn.Module], train_data: list[torch.Tensor],
          val_data: list[torch.Tensor], lr: float, show_seconds: bool = True) -> dict:
    torch.manual_seed(0)
    model = TransformerLM(VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=CONTEXT, norm_layer=norm_layer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = len(train_data)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(steps // 10, 1)) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    curve, started = [], time.perf_counter()
    for batch in train_data:
        loss = nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        curve.append(loss.item())
    tail = curve[-max(len(curve) // 10, 1):]
    result = {"norm": name, "curve": curve, "train_loss": sum(tail) / len(tail),
              "val_loss": evaluate(model, val_data), "seconds": time.perf_counter() - started}
    print(f"  {name:12s} train {result['train_loss']:.3f}  val {result['val_loss']:.3f}"
          + (f"  ({result['seconds']:.0f} s)" if show_seconds else ""))
    return result


def save_curves(results: list[dict], path: Path, floor: float) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = path.with_suffix(".csv")
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", *(r["norm"] for r in results)])
            writer.writerows([step, *(r["curve"][step] for r in results)] for step in range(len(results[0]["curve"])))
        return path
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        window = max(len(r["curve"]) // 40, 1)
        smoothed = torch.tensor(r["curve"]).unfold(0, window, 1).mean(1) if len(r["curve"]) >= window else \
            torch.tensor(r["curve"])
        ax.plot(range(window - 1, window - 1 + len(smoothed)), smoothed, label=r["norm"])
    ax.axhline(floor, color="gray", linestyle=":", label="entropy rate")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per norm (default 300; 6 with --quick)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--plot", type=Path, default=Path("tiny_transformer_norms.png"))
    args = parser.parse_args(argv)
    if args.quick:
        print("--quick: a smoke run of a few training steps; its results say nothing about the norms")
    steps = args.steps or (6 if args.quick else 300)
    generator = torch.Generator().manual_seed(0)
    tokens, floor = markov_corpus(5_000 if args.quick else 100_000, generator)
    train_data = batches(tokens[: len(tokens) * 9 // 10], 16, steps, seed=1)
    val_data = batches(tokens[len(tokens) * 9 // 10:], 16, 2 if args.quick else 20, seed=2)
    print(f"{steps} steps of 16 x {CONTEXT} tokens per norm; entropy rate of the corpus {floor:.3f} nats/token")
    # --quick: a few steps; the seconds would only be noise, so they are not printed.
    results = [train(name, layer, train_data, val_data, args.lr, show_seconds=not args.quick)
               for name, layer in norm_layers(warmup_iters=max(steps // 3, 1)).items()]
    print("\n| norm | train loss (last 10 % of steps) | validation loss (eval mode) |\n|---|---|---|")
    for r in results:
        print(f"| {r['norm']} | {r['train_loss']:.3f} | {r['val_loss']:.3f} |")
    print(f"\nloss curves: {save_curves(results, args.plot, floor)}")
    return results


if __name__ == "__main__":
    main()
