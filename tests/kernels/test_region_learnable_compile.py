"""RN-L's eight kernels compiled for an H100 (sm_90) with Triton's real compiler, without a GPU, exactly as the
launchers launch them (the launches captured, not run, and compiled with the JIT's specialization by
:mod:`normlayers.bench.audit`): inpainting-network shapes in both memory formats, bf16, and fp64 (gradcheck's dtype).
Each compiles and spills nothing (registers and spills from the ``ptxas -v`` log of the installed Triton's own
ptxas step; CI runs it under Triton 3.9 and 3.8, and it passes under 3.6, the GPU machine's, too).

The compile runs in a subprocess: this test session has the Triton interpreter switched on.
"""

from __future__ import annotations

import json


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

    from normlayers.bench.audit import _compile_launch, captured_launches
    from normlayers.kernels import region_learnable as K

    results = []
    with captured_launches() as captured:
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
    return results


def test_region_learnable_kernels_compile_for_sm90_without_spills():
    from normlayers.bench.audit import json_from_compile_subprocess

    results = json_from_compile_subprocess([__file__], timeout=900)
    assert len(results) == (2 + 3 + 4) * len(CASES)
    spilled = [r for r in results if r["spill_bytes"]]
    assert not spilled, spilled


if __name__ == "__main__":
    print(json.dumps(compile_region_learnable_kernels()))
