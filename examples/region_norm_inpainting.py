"""Region Normalization for inpainting: a tiny network trained on synthetic images with holes, three ways.

The same small encoder–decoder is trained three times, with only its normalization layers changed: RN-B
(``normlayers.RegionNorm2d``, given the hole mask), ``nn.BatchNorm2d`` and ``nn.InstanceNorm2d(affine=True)``. Its
input is the image with the holes filled with 1 (white) plus the mask, the official RN code's convention
(``x·(1 − mask) + mask``, mask 1 = hole); the loss is the L1 error over the whole image. The point of RN (Yu et al.,
AAAI 2020): BatchNorm and InstanceNorm pool the white hole pixels and the real pixels into one mean and variance,
which shifts the normalized valid pixels by an amount that depends on the hole's size; RN normalizes each region with
its own statistics. The script prints the mean absolute error inside the holes on held-out images for each variant,
and saves a PNG grid (rows: test images; columns: input, BatchNorm, InstanceNorm, RN-B, target).

Run::

    python examples/region_norm_inpainting.py            # a few hundred steps per variant, a few minutes on a CPU
    python examples/region_norm_inpainting.py --quick    # a handful of steps: a smoke test

Everything is seeded; the numbers change with the torch version and the number of threads.
"""

from __future__ import annotations

import argparse
import struct
import time
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normlayers

SIZE = 32


def synthetic_images(count: int, generator: torch.Generator) -> Tensor:
    """``(count, 3, SIZE, SIZE)`` images in [0, 0.8]: a smooth colour gradient, stripes and a disc, so that a hole can
    be filled from its surroundings."""
    coords = torch.linspace(-1, 1, SIZE)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = []
    for _ in range(count):
        r = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
        angle = r(1) * 6.283
        direction = torch.cos(angle) * xx + torch.sin(angle) * yy
        colours = r(3, 3) * 0.8
        gradient = colours[0, :, None, None] * (1 + direction) / 2 + colours[1, :, None, None] * (1 - direction) / 2
        stripes = 0.15 * torch.sin(direction * (4 + 8 * r(1)) + r(1) * 6.283)
        centre = r(2) * 1.2 - 0.6
        disc = ((xx - centre[0]).square() + (yy - centre[1]).square() < (0.2 + 0.3 * r(1)) ** 2).float()
        image = gradient + stripes + disc * (colours[2, :, None, None] - gradient)
        images.append(image.clamp(0, 0.8))
    return torch.stack(images)


def random_holes(count: int, generator: torch.Generator) -> Tensor:
    """``(count, 1, SIZE, SIZE)`` float masks, 1 = hole: one to three rectangles, from a few percent of the image to
    about half of it, so that the hole's share of each image varies a lot."""
    masks = torch.zeros(count, 1, SIZE, SIZE)
    for i in range(count):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            h, w = (int(v) for v in torch.randint(4, SIZE // 2 + 4, (2,), generator=generator))
            top, left = (int(v) for v in torch.randint(0, SIZE - 4, (2,), generator=generator))
            masks[i, :, top:top + h, left:left + w] = 1
    return masks


class InpaintingNet(nn.Module):
    """conv → norm → ReLU blocks: two at full resolution, two at half, then upsampling to an RGB output in [0, 1].
    ``norm`` builds each normalization layer from its channel count; ``needs_mask`` says whether it takes the mask."""

    def __init__(self, norm: Callable[[int], nn.Module], needs_mask: bool, width: int = 32) -> None:
        super().__init__()
        self.needs_mask = needs_mask
        channels = [(4, width, 1), (width, width, 2), (width, width, 1), (width, width, 1)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, stride=s, padding=1) for i, o, s in channels)
        self.norms = nn.ModuleList(norm(o) for _, o, _ in channels)
        self.up = nn.Conv2d(width, width, 3, padding=1)
        self.up_norm = norm(width)
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def _norm(self, layer: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
        # RegionNorm2d resizes the full-resolution mask to each feature map itself (nearest, as the official code).
        return layer(x, mask) if self.needs_mask else layer(x)

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        x = torch.cat([image * (1 - mask) + mask, mask], dim=1)  # the official input: holes filled with 1
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(self._norm(norm, conv(x), mask))
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.relu(self._norm(self.up_norm, self.up(x), mask))
        return torch.sigmoid(self.out(x))


VARIANTS: dict[str, tuple[Callable[[int], nn.Module], bool]] = {
    "BatchNorm": (nn.BatchNorm2d, False),
    "InstanceNorm": (lambda c: nn.InstanceNorm2d(c, affine=True), False),
    "RN-B": (normlayers.RegionNorm2d, True),
}


def hole_error(net: nn.Module, images: Tensor, masks: Tensor) -> tuple[float, Tensor]:
    """Mean absolute error over the hole pixels (all channels) and the predictions, in eval mode."""
    net.eval()
    with torch.no_grad():
        predicted = net(images, masks)
    holes = masks.expand_as(images)
    return ((predicted - images).abs() * holes).sum().item() / holes.sum().item(), predicted


def train(name: str, steps: int, batch: int, data: tuple[Tensor, Tensor], seed: int) -> nn.Module:
    norm, needs_mask = VARIANTS[name]
    torch.manual_seed(seed)
    net = InpaintingNet(norm, needs_mask)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    images, masks = data
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        index = torch.randint(0, images.shape[0], (batch,), generator=generator)
        loss = (net(images[index], masks[index]) - images[index]).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


def write_png(path: Path, rgb: Tensor) -> None:
    """A ``(3, H, W)`` image in [0, 1] as an 8-bit RGB PNG, with zlib only (no imaging library needed)."""
    pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + bytes(pixels[y].flatten().tolist()) for y in range(height))  # filter 0 per row

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                     + chunk(b"IEND", b""))


def save_grid(path: Path, columns: list[tuple[str, Tensor]], rows: int) -> None:
    """Rows of test images; one column per ``(title, (N, 3, H, W) tensor)``. With matplotlib the columns get titles;
    without it the grid is written directly (columns in the order given), two pixels of white between tiles."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        pad = 2
        tiles = [[images[r] for _, images in columns] for r in range(rows)]
        canvas = torch.ones(3, rows * (SIZE + pad) + pad, len(columns) * (SIZE + pad) + pad)
        for r, row in enumerate(tiles):
            for c, tile in enumerate(row):
                top, left = pad + r * (SIZE + pad), pad + c * (SIZE + pad)
                canvas[:, top:top + SIZE, left:left + SIZE] = tile
        write_png(path, canvas)
        return
    figure, axes = plt.subplots(rows, len(columns), figsize=(1.6 * len(columns), 1.6 * rows), squeeze=False)
    for c, (title, images) in enumerate(columns):
        axes[0, c].set_title(title, fontsize=8)
        for r in range(rows):
            axes[r, c].imshow(images[r].clamp(0, 1).permute(1, 2, 0).numpy())
            axes[r, c].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps per variant (default: 400)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    parser.add_argument("--quick", action="store_true", help="a handful of steps on little data: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("region_norm_inpainting.png"),
                        help="where to save the image grid (default: ./region_norm_inpainting.png)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        print("--quick: a smoke run of a few training steps; its results say nothing about the norms")
    steps, train_count, test_count = (5, 32, 8) if args.quick else (args.steps, 512, 64)

    generator = torch.Generator().manual_seed(args.seed)
    train_data = (synthetic_images(train_count, generator), random_holes(train_count, generator))
    test_images, test_masks = synthetic_images(test_count, generator), random_holes(test_count, generator)
    print(f"{train_count} training / {test_count} test images {SIZE}x{SIZE}, holes cover "
          f"{test_masks.mean().item():.0%} of the test pixels; {steps} steps of batch {args.batch} per variant")

    errors, predictions = {}, {}
    for name in VARIANTS:
        start = time.perf_counter()
        net = train(name, steps, args.batch, train_data, args.seed)
        errors[name], predictions[name] = hole_error(net, test_images, test_masks)
        seconds = "" if args.quick else f"   ({time.perf_counter() - start:.1f} s)"  # --quick: noise, not printed
        print(f"  {name:<13} hole-region mean absolute error {errors[name]:.4f}{seconds}")
    if not args.quick:  # after a few steps the ranking is noise
        print(f"lowest hole-region error: {min(errors, key=errors.get)}")

    shown = min(6, test_count)
    masked_input = test_images * (1 - test_masks) + test_masks
    columns = [("input", masked_input), *((name, predictions[name]) for name in VARIANTS), ("target", test_images)]
    save_grid(args.out, columns, shown)
    print(f"saved {args.out} (rows: test images; columns: {', '.join(title for title, _ in columns)})")
    return errors


if __name__ == "__main__":
    main()
