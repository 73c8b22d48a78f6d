"""Swap the norms of timm models for normlayers': a ResNet with the micro-batch recipe, a ViT with the same math.

* ``resnet26`` (timm's bottleneck ResNet, ResNet-50's blocks at depth 26): every ``BatchNorm2d`` becomes a
  ``BatchChannelNorm2d`` and every ``Conv2d`` a ``WSConv2d`` (Qiao et al., arXiv 1903.10520: the recipe for training
  at 1–2 images per GPU). This changes the function by design; the BatchNorm's parameters and running statistics are
  adopted as BCN's batch stage, the conv weights are the same objects.
* ``vit_tiny_patch16_224``: the default mapping swaps timm's ``LayerNorm`` for ``normlayers.LayerNorm``, the same
  math (logits within fp32 rounding), and ``restore_norms`` gives timm's classes back.

Each model then runs a few SGD steps on one batch of 2 random images (no download) and an eval forward, and the
script prints what changed: the swaps, the ``state_dict`` keys, the parameter count and the outputs. Needs timm.

    python examples/timm_swap.py            # full models at 64x64, 10 steps each
    python examples/timm_swap.py --quick    # smaller models at 32x32, 2 steps (smoke test)

It prints no timings: it shows what a swap changes, not speed (docs/benchmarking.md measures the layers).
"""

from __future__ import annotations

import argparse
import copy
import functools
from collections import Counter

import torch
from torch import nn

import normlayers
from normlayers.convert import DEFAULT_MAPPING, timm_mapping

try:
    import timm
except ImportError as error:  # an optional dependency of this example only
    raise SystemExit("examples/timm_swap.py needs timm: pip install timm") from error

CLASSES = 10
BATCH_SIZE = 2
BCN_GROUPS = 16  # divides every width of both ResNets (16 ... 2048)

# The micro-batch recipe, on top of the same-math swaps (a given mapping replaces the default one, so those are
# merged in: without timm's entries a timm StdConv2d, a Conv2d subclass, would be refused by the Conv2d key).
MICRO_BATCH_MAPPING = {
    **DEFAULT_MAPPING,
    **timm_mapping(),
    nn.BatchNorm2d: functools.partial(normlayers.BatchChannelNorm2d, num_groups=BCN_GROUPS),
    nn.Conv2d: normlayers.WSConv2d,
}


def swap_counts(plan: list[normlayers.convert.Replacement]) -> str:
    counts = Counter(f"{line.old_type.__name__} -> {line.new_type.__name__ if line.new_type else '?'}"
                     for line in plan if not line.skipped)
    return ", ".join(f"{n} x {swap}" for swap, n in counts.items())


def train_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> list[float]:
    """``steps`` SGD steps on one batch of 2 (random images and labels: fitting them shows that training runs);
    the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images[:BATCH_SIZE]), labels[:BATCH_SIZE])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def report(name: str, original: nn.Module, model: nn.Module, plan: list, images: torch.Tensor,
           labels: torch.Tensor, steps: int, same_math: bool) -> None:
    """Print the swaps and what they changed, then train both models the same way and evaluate them."""
    print(f"\n{name}: {swap_counts(plan)}")
    skipped = [line for line in plan if line.skipped]
    for line in skipped[:3]:
        print(f"  left alone: {line.fqn} ({line.old_type.__name__}): {line.reason}")
    before, after = set(original.state_dict()), set(model.state_dict())
    print(f"  state_dict keys: {len(before & after)} kept, {len(after - before)} new, {len(before - after)} gone"
          + (f" (e.g. {sorted(after - before)[0]})" if after - before else ""))
    count = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in original.parameters())
    print(f"  parameters: {count:+d}")
    with torch.no_grad():
        difference = (model.eval()(images[:4]) - original.eval()(images[:4])).abs().max().item()
    print(f"  eval logits before training: max |difference| {difference:.2e} "
          + ("(the same math: fp32 rounding)" if same_math else "(by design: the recipe changes the function)"))
    for label, module in (("timm", original), ("normlayers", model)):
        torch.manual_seed(0)  # the same dropout and the same batches for both
        losses = train_steps(module, images, labels, steps)
        with torch.no_grad():
            logits = module.eval()(images[:4])
        print(f"  {label:10s} loss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps; eval logits finite: "
              f"{bool(torch.isfinite(logits).all())}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models, 2 steps (smoke test)")
    args = parser.parse_args(argv)
    size, steps = (32, 2) if args.quick else (64, 10)
    if args.quick:
        print("--quick: smaller models and 2 training steps; a smoke run, its losses say nothing about the norms")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, size, size, generator=generator)
    labels = torch.randint(0, CLASSES, (len(images),), generator=generator)

    torch.manual_seed(0)
    # --quick: one block per stage, a quarter of the widths
    resnet_args = {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "stem_width": 16} if args.quick else {}
    resnet = timm.create_model("resnet26", pretrained=False, num_classes=CLASSES, **resnet_args)
    original = copy.deepcopy(resnet)
    plan = normlayers.plan_replacements(resnet, MICRO_BATCH_MAPPING)
    normlayers.replace_norms(resnet, MICRO_BATCH_MAPPING)
    report("resnet26, micro-batch recipe", original, resnet, plan, images, labels, steps, False)

    vit_args = {"depth": 2, "embed_dim": 64, "num_heads": 2} if args.quick else {}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, img_size=size,
                            patch_size=8, **vit_args)
    original = copy.deepcopy(vit)
    plan = normlayers.plan_replacements(vit)
    normlayers.replace_norms(vit)  # the default mapping: same math only
    report("vit_tiny_patch16_224, default mapping", original, vit, plan, images, labels, steps, True)
    restored = normlayers.restore_norms(vit)
    kinds = Counter(f"{type(m).__module__}.{type(m).__name__}" for m in restored.modules()
                    if isinstance(m, nn.LayerNorm))
    print(f"  restore_norms: {', '.join(f'{n} x {kind}' for kind, n in kinds.items())}")


if __name__ == "__main__":
    main()
