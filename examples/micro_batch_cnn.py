"""Micro-batch CNN training: BatchNorm vs GroupNorm vs WSConv2d + BatchChannelNorm2d vs EvoNorm, at batch size 2.

Detection and segmentation train with 1–2 images per GPU, where BatchNorm's batch statistics are noise and its
running statistics do not match what the network saw in training. This script trains the same small CNN with each
normalization on a synthetic 4-class image task (oriented gratings under random per-image brightness and contrast,
plus noise — no download) with batches of 2, then evaluates in eval mode, and prints a table. It runs on a CPU in
about a minute (``--quick``: a few seconds, for the smoke test).

    python examples/micro_batch_cnn.py            # full run
    python examples/micro_batch_cnn.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch
from torch import nn

import normlayers

CLASSES = 4
SIZE = 24
CHANNELS = (16, 32, 32)
GROUPS = 8
LOSS_WINDOW = 50  # the reported train loss averages the last LOSS_WINDOW steps


def make_images(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` RGB images of gratings whose orientation is the class, under a random per-image brightness offset
    and contrast (what a normalization has to undo) and pixel noise."""
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    angle = labels.float() * math.pi / CLASSES + 0.15 * torch.randn(count, generator=generator)
    frequency = 0.5 + 0.2 * torch.rand(count, generator=generator)
    phase = 2 * math.pi * torch.rand(count, generator=generator)
    coords = torch.arange(SIZE, dtype=torch.float32) - SIZE / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    projection = xx * angle.cos().view(-1, 1, 1) + yy * angle.sin().view(-1, 1, 1)
    pattern = torch.sin(frequency.view(-1, 1, 1) * projection + phase.view(-1, 1, 1))
    colour = torch.rand(count, 3, 1, 1, generator=generator) + 0.5
    contrast = torch.exp(torch.randn(count, 1, 1, 1, generator=generator))
    brightness = 3 * torch.randn(count, 1, 1, 1, generator=generator)
    noise = 0.5 * torch.randn(count, 3, SIZE, SIZE, generator=generator)
    return pattern.unsqueeze(1) * colour * contrast + brightness + noise, labels


def conv_norm_act(norm: str, c_in: int, c_out: int) -> list[nn.Module]:
    """One 3×3 conv stage with the chosen normalization (EvoNorm includes its own nonlinearity)."""
    if norm == "BatchNorm2d":
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if norm == "GroupNorm":
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(GROUPS, c_out), nn.ReLU()]
    if norm == "WSConv2d + BatchChannelNorm2d":
        return [normlayers.WSConv2d(c_in, c_out, 3, padding=1, bias=False),
                normlayers.BatchChannelNorm2d(c_out, num_groups=GROUPS), nn.ReLU()]
    if norm == "EvoNorm2dS0":
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), normlayers.EvoNorm2dS0(c_out, groups=GROUPS)]
    if norm == "EvoNorm2dB0":
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), normlayers.EvoNorm2dB0(c_out)]
    raise ValueError(f"unknown norm {norm!r}")


NORMS = ("BatchNorm2d", "GroupNorm", "WSConv2d + BatchChannelNorm2d", "EvoNorm2dS0", "EvoNorm2dB0")


def make_model(norm: str) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = 3
    for i, c_out in enumerate(CHANNELS):
        layers += conv_norm_act(norm, c_in, c_out)
        if i < len(CHANNELS) - 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, CLASSES))


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(64)])
    return (predictions == labels).float().mean().item()


def train(norm: str, steps: int, batch_size: int, lr: float, train_set, test_set,
          log: Callable[[str], None], show_seconds: bool = True) -> dict:
    torch.manual_seed(0)
    model = make_model(norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    images, labels = train_set
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    started, recent = time.perf_counter(), []
    model.train()
    for step in range(steps):
        index = order[(step * batch_size + torch.arange(batch_size)) % len(labels)]
        loss = nn.functional.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-LOSS_WINDOW:]
    result = {"norm": norm, "train_loss": sum(recent) / len(recent), "test_accuracy": accuracy(model, *test_set),
              "seconds": time.perf_counter() - started}
    log(f"  {norm:32s} loss {result['train_loss']:.3f}  test accuracy {result['test_accuracy']:.3f}"
        + (f"  ({result['seconds']:.1f} s)" if show_seconds else ""))
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on a few images (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 800, 10 with --quick)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate, the same for every norm")
    args = parser.parse_args(argv)
    if args.quick:
        print("--quick: a smoke run of a few training steps; its results say nothing about the norms")
    steps = args.steps or (10 if args.quick else 800)
    generator = torch.Generator().manual_seed(0)
    train_set = make_images(64 if args.quick else 3000, generator)
    test_set = make_images(32 if args.quick else 1000, generator)
    print(f"{steps} steps at batch size {args.batch_size}, {len(train_set[1])} training and {len(test_set[1])} "
          f"test images ({SIZE}x{SIZE}, {CLASSES} classes); evaluation in eval mode")
    # --quick: a few steps on a few images; the seconds would only be noise, so they are not printed.
    results = [train(norm, steps, args.batch_size, args.lr, train_set, test_set, print, show_seconds=not args.quick)
               for norm in NORMS]
    print(f"\n| normalization | train loss (last {min(LOSS_WINDOW, steps)} steps) | test accuracy |\n|---|---|---|")
    for r in results:
        print(f"| {r['norm']} | {r['train_loss']:.3f} | {r['test_accuracy']:.3f} |")
    return results


if __name__ == "__main__":
    main()
