"""Fold eval-mode norms of two small CNNs into their convs and compare outputs and forward time.

    python examples/fold_norms_cnn.py            # batch 8 x 3 x 64 x 64, 6 conv layers of 64 channels
    python examples/fold_norms_cnn.py --quick    # a tiny input, a few seconds; no timing printed

Forward times are the median and p20–p80 of the repeats, the models taking turns so that a change in the machine's
load hits both alike.

* "conv-bn": ``nn.Conv2d → nn.BatchNorm2d → ReLU`` blocks; folding removes every BatchNorm.
* "ws-bcn": ``WSConv2d → BatchChannelNorm2d → ReLU`` blocks (the BCN+WS recipe); folding bakes the standardized
  weights into plain convs and turns each BCN into its batch stage (folded into the conv) plus an ``nn.GroupNorm``.
"""

from __future__ import annotations

import argparse
import copy
import json
from functools import partial

import torch
from torch import nn

import normlayers
from normlayers.bench.timing import TimedCall, WallClockTimer, measure_interleaved
from normlayers.convert import fold_norms


def conv_bn(channels: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers)


def ws_bcn(channels: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [normlayers.WSConv2d(3 if i == 0 else channels, channels, 3, padding=1, bias=False),
                   normlayers.BatchChannelNorm2d(channels, num_groups=8), nn.ReLU()]
    return nn.Sequential(*layers)


def trained_statistics(model: nn.Sequential, x: torch.Tensor) -> nn.Sequential:
    """A few training-mode passes so that the running statistics are not the initial 0/1."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def _ms(stats) -> str:
    return f"{stats.median_ms:.2f} ({stats.p20_ms:.2f}-{stats.p80_ms:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny input, for a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="timed forward passes (default 20; quick: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output-json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 20)
    batch, size, channels, depth = (2, 8, 16, 2) if args.quick else (8, 64, 64, 6)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    rows = []
    print(f"batch {batch} x 3 x {size} x {size}, {depth} conv layers of {channels} channels, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    if args.quick:  # the tiny input's forward takes well under a millisecond: its times are noise
        print(f"{'model':8s} {'max|dy| fp32':>13s}   (forward times not printed with --quick)")
    else:
        print(f"{'model':8s} {'max|dy| fp32':>13s} {'before ms (p20-p80)':>22s} {'after ms (p20-p80)':>22s} "
              f"{'speed-up':>9s}   median of {repeats}")
    for name, build in (("conv-bn", conv_bn), ("ws-bcn", ws_bcn)):
        model = trained_statistics(build(channels, depth), x)
        folded = fold_norms(copy.deepcopy(model))
        with torch.inference_mode():
            diff = (folded(x) - model(x)).abs().max().item()
        with torch.inference_mode():
            before, after = measure_interleaved([TimedCall(partial(model, x)), TimedCall(partial(folded, x))],
                                                WallClockTimer(), rounds=repeats, warmup_rounds=1)
        rows.append({"model": name, "max_abs_diff_fp32": diff, "before_ms": before.median_ms,
                     "after_ms": after.median_ms, "speedup": before.median_ms / after.median_ms})
        if args.quick:
            print(f"{name:8s} {diff:13.2e}")
        else:
            print(f"{name:8s} {diff:13.2e} {_ms(before):>22s} {_ms(after):>22s} "
                  f"{before.median_ms / after.median_ms:8.2f}x")
    if args.output_json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
                "input": [batch, 3, size, size], "channels": channels, "depth": depth, "repeats": repeats,
                "backend": normlayers.get_backend()}
        with open(args.output_json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
