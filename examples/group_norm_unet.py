"""Swap the GroupNorms of a small UNet-like model for normlayers.GroupNorm, fuse the SiLU after each, and compare.

    python examples/group_norm_unet.py            # batch 2 x 64 x 32 x 32, 4 ResNet blocks, fp32
    python examples/group_norm_unet.py --quick    # a tiny input, a few seconds

Each block is ``GroupNorm → SiLU → Conv → GroupNorm → SiLU → Conv`` plus a skip connection, as in the ResNet blocks
of diffusion UNets and VAEs, written as ``nn.Sequential`` so that :func:`normlayers.convert.fuse_group_norm_act`
recognizes the pairs. Steps: ``replace_norms`` (same math: nn.GroupNorm → normlayers.GroupNorm), then
``fuse_group_norm_act`` (GroupNorm + SiLU → ``GroupNorm(act="silu")``, the SiLU slot becomes ``nn.Identity``), then
``restore_norms``. After each step it prints the largest difference of the output and of the input gradient from
the original model's, on the default backend (the CPU tier on CPU, the Triton kernels on CUDA) and on the reference.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

import normlayers
from normlayers.convert import fuse_group_norm_act


class ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def unet_like(channels: int, blocks: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), *(ResBlock(channels, groups) for _ in range(blocks)),
                         nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, 3, 3, padding=1))


def output_and_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.clone().requires_grad_()
    y = model(leaf)
    y.square().mean().backward()
    return y.detach(), leaf.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny input (CI's smoke test)")
    parser.add_argument("--output-json", help="write the differences here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels, blocks, size = (32, 1, 8) if args.quick else (64, 4, 32)
    torch.manual_seed(0)
    model = unet_like(channels, blocks, groups=32 if channels >= 64 else 8).to(device)
    x = torch.randn(2, 3, size, size, device=device)
    expected = output_and_grad(model, x)
    keys = list(model.state_dict())

    rows = []

    def compare(step: str) -> None:
        for backend in ("auto", "reference"):
            with normlayers.backend(backend):
                y, dx = output_and_grad(model, x)
            row = {"step": step, "backend": backend, "max_abs_diff_y": (y - expected[0]).abs().max().item(),
                   "max_abs_diff_dx": (dx - expected[1]).abs().max().item()}
            rows.append(row)
            print(f"{step:<28} backend {backend:<9} max|Δy| = {row['max_abs_diff_y']:.2e}   "
                  f"max|Δdx| = {row['max_abs_diff_dx']:.2e}")

    normlayers.replace_norms(model)
    swapped = sum(isinstance(m, normlayers.GroupNorm) for m in model.modules())
    print(f"replace_norms: {swapped} nn.GroupNorm -> normlayers.GroupNorm; state_dict keys unchanged: "
          f"{list(model.state_dict()) == keys}")
    compare("after replace_norms")
    fuse_group_norm_act(model)
    fused = sum(isinstance(m, normlayers.GroupNorm) and m.act == "silu" for m in model.modules())
    print(f"fuse_group_norm_act: {fused} GroupNorm + SiLU pairs fused; state_dict keys unchanged: "
          f"{list(model.state_dict()) == keys}")
    compare("after fuse_group_norm_act")
    model = normlayers.restore_norms(model)
    compare("after restore_norms")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": str(device), "swapped": swapped, "fused": fused, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
