"""RN-L's eight kernels compiled for an H100 (sm_90) with Triton's real compiler, without a GPU, exactly as the
launchers launch them (the launches captured, not run, and compiled with the JIT's specialization by
:mod:`normlayers.bench.audit`): inpainting-network shapes in both memory formats, bf16, and fp64 (gradcheck's dtype).
Each compiles and spills nothing (registers and spills from ``ptxas -v``).

The compile runs in a subprocess: this test session has the Triton interpreter switched on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# (N, C, H, W, kernel size, memory format, dtype): a 64×64 stage of the official k = 7, a small 7×7 map with k = 3,
# channels-last, and fp64.
CASES = [
    (4, 64, 64, 64, 7, "contiguous", "bfloat16"),
    (8, 256, 7, 7, 3, "contiguous", "bfloat16"),
    (4, 64, 64, 64, 7, "channels_last", "bfloat16"),
    (2, 16, 12, 12, 7, "contiguous", "float64"),
]


def compile_region_learnable_kernels() -> list[dict]:
    from dataclasses import asdict

    import torch
    import triton.runtime.jit as jit

    from normlayers.bench.audit import _compile_launch
    from normlayers.kernels import region_learnable as K

    captured: list = []
    original = jit.JITFunction.run

    def capture(self, *args, grid, warmup, **kwargs):
        captured.append((self, args, kwargs))

    results = []
    jit.JITFunction.run = capture
    try:
        for n, c, h, w, k, memory_format, dtype in CASES:
            dtype = getattr(torch, dtype)
            x = torch.empty((n, c, h, w), dtype=dtype)
            if memory_format == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            weights = [torch.empty(s, dtype=dtype) for s in ((1, 2, k, k), (1, 1, k, k), (1,), (1, 1, k, k), (1,))]
            opmath = torch.float64 if dtype == torch.float64 else torch.float32
            maps = [torch.empty((n, 3, h, w), dtype=opmath), torch.empty((n, 1, h, w), dtype=opmath),
                    torch.empty((n, 1, h, w), dtype=opmath), torch.empty((c, 2, 4), dtype=opmath)]
            captured.clear()
            for pool_separately in (False, True):  # the two-launch forward and the three-launch one
                K.learnable_region_norm_fwd(x, *weights, threshold=0.8, eps=1e-5, batch=True, official_eps=True,
                                            cap=2.0 ** 20, pool_separately=pool_separately)
            K.learnable_region_norm_bwd(x, x, *weights, *maps, threshold=0.8, batch=True)
            label = f"{n}x{c}x{h}x{w} k={k} {memory_format} {str(dtype).removeprefix('torch.')}"
            for fn, args, kwargs in captured:
                results.append({"case": label, **asdict(_compile_launch(fn, args, kwargs))})
    finally:
        jit.JITFunction.run = original
    return results


def test_region_learnable_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"an RN-L kernel failed to compile for sm_90:\n{done.stderr[-4000:]}")
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == (2 + 3 + 4) * len(CASES)
    spilled = [r for r in results if r["spill_bytes"]]
    assert not spilled, spilled


if __name__ == "__main__":
    print(json.dumps(compile_region_learnable_kernels()))
