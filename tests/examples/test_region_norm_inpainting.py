"""Smoke test of examples/region_norm_inpainting.py: ``--quick`` runs end to end and writes a valid PNG grid."""

from __future__ import annotations

import importlib.util
import math
import struct
import zlib
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "region_norm_inpainting.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("region_norm_inpainting", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_png(path: Path) -> tuple[int, int, bytes]:
    """(width, height, raw scanlines) of an 8-bit RGB PNG, checking the signature and every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks = 8, {}
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind, payload = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(kind + payload), kind
        chunks[kind] = chunks.get(kind, b"") + payload
        offset += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    return width, height, zlib.decompress(chunks[b"IDAT"])


def test_quick_run_prints_errors_and_saves_the_grid(tmp_path, capsys):
    example = _load_example()
    out = tmp_path / "grid.png"
    # One intra-op thread: on a busy 2-core machine, threads on these tiny convolutions fight each other (measured
    # under a load average of ~7: 26-34 s with 2 threads, 10 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        errors = example.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert set(errors) == {"BatchNorm", "InstanceNorm", "RN-B"}
    assert all(math.isfinite(e) and 0 <= e <= 1 for e in errors.values())
    printed = capsys.readouterr().out
    assert "hole-region mean absolute error" in printed and str(out) in printed
    assert out.stat().st_size > 0


def test_png_writer_round_trips_the_pixels(tmp_path):
    example = _load_example()
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 5, 7, generator=gen)
    path = tmp_path / "image.png"
    example.write_png(path, image)
    width, height, raw = _read_png(path)
    assert (width, height) == (7, 5)
    rows = [raw[y * (1 + 3 * width):(y + 1) * (1 + 3 * width)] for y in range(height)]
    assert all(row[0] == 0 for row in rows)  # filter type 0: the bytes are the pixels
    pixels = torch.tensor([list(row[1:]) for row in rows], dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)
    assert torch.equal(pixels, (image * 255).round().to(torch.uint8))
