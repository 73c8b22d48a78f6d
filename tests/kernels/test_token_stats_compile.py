"""PowerNorm's and UnifiedNorm's token kernels compiled for an H100 (sm_90) with Triton's real compiler, without a
GPU, exactly as the launchers of ``normlayers.kernels.token_stats`` launch them on an H100 (the launches captured,
not run, with the persistent grids sized for its 132 SMs, and compiled with the JIT's specialization by
:mod:`normlayers.bench.audit`): ViT-B token shapes, the fused layers' training forward and backward and eval forward,
and the composition's kernels (synced statistics), bf16 and fp32. None spills (registers and spills from the
``ptxas -v`` log of the installed Triton's own ptxas step; it passes under Triton 3.6, the GPU machine's, 3.8 and
3.9). fp64, gradcheck's dtype, is left out: it holds twice the bytes per value, and some of its compiles spill up to
32 bytes.

The compile runs in a subprocess: this test session has the Triton interpreter switched on.
"""

from __future__ import annotations

import json

# (T, B, C) token shapes: ViT-B/16's 197 tokens at batch 2 and 8 (PowerNorm takes them time-major, UnifiedNorm as
# (B, T, C); the launches see the same R = T·B rows). At these the reductions' persistent grid gives each program
# one row tile (a loop count the JIT makes a constant); at batch 32 each program walks several.
SHAPES = [(197, 2, 768), (197, 8, 768), (197, 32, 768)]
# The composition's kernels are compiled at the batch whose programs loop (their larger register need) only: the
# test's time.
COMPOSITION_BATCH = 32
DTYPES = ["bfloat16", "float32"]


def _layer_launches(K, t: int, b: int, c: int, dtype, composition: bool) -> None:
    """Every launch of a PowerNorm (default group_num = 1, padding mask, affine) and a UnifiedNorm (padding mask,
    default flags) training step forward and backward, and of their eval forward; with ``composition`` also the
    composition's kernels (synced statistics)."""
    import torch

    x = torch.empty((t, b, c), dtype=dtype)
    pad = torch.empty((b, t), dtype=torch.bool)
    weight, bias = torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype)
    compute = torch.float32 if dtype != torch.float64 else dtype
    vector = torch.empty(c, dtype=compute)
    window = torch.empty((4, c), dtype=compute)
    counter = torch.empty(1, dtype=torch.long)
    # PowerNorm: moments, finalize, affine; token_grad, finalize_bwd; eval affine.
    partials = K.token_moments(x, pad, True, 1, 1e-5)
    K.power_norm_finalize(partials, vector, counter, eps=1e-5, alpha_fwd=0.9, warmup_iters=4000, grad_from_batch=True)
    K.token_affine(x, vector, weight, bias, 1, None, dtype)
    _, grad_partials = K.token_grad(x, x, vector, weight, vector, 0.1, vector, 1)
    K.power_norm_finalize_bwd(grad_partials, vector, weight, bias, t * b)
    K.token_affine(x, vector, weight, bias, 1, 1e-5, dtype)
    # UnifiedNorm on (B, T, C): moments, finalize, affine; token_grad, finalize_bwd, dx; eval affine.
    x = x.transpose(0, 1).contiguous()
    partials = K.token_moments(x, pad, False, None, 1e-5)
    inv_std, r, step, skip = K.unified_norm_finalize(partials, vector, window, counter, counter, eps=1e-5,
                                                     momentum=0.9, warmup_iters=4000, outlier_filtration=False,
                                                     grad_compensation=True)
    K.token_affine(x, vector, weight, bias, None, None, dtype)
    _, grad_partials = K.token_grad(x, x, vector, None, None, 0.0, None, None)
    K.unified_norm_finalize_bwd(grad_partials, weight, r, step, skip, vector, window, t * b, momentum=0.9,
                                warmup_iters=4000)
    K.unified_norm_dx(x, x, vector, weight, vector, vector)
    K.token_affine(x, vector, weight, bias, None, 1e-5, dtype)
    if not composition:
        return
    # The composition: Σx² over the valid rows, the backward sums with dx, the affine.
    rows = x.view(-1, c)
    K.token_sums(rows, None, torch.empty(t * b, dtype=torch.bool))
    K.token_sums(rows, rows, None, vector, vector)
    K.channel_affine(rows, vector, vector)


def compile_token_kernels() -> list[dict]:
    """One entry per distinct compile (launches the JIT would specialize alike share it), with the cases and layer
    steps that launch it."""
    from dataclasses import asdict

    import torch

    from normlayers.bench.audit import H100_SMS, _compile_launch, captured_launches, launch_specialization
    from normlayers.kernels import token_stats as K

    # The launchers size their persistent grids from the device; on a CPU tensor they would pick the CPU's few
    # programs, and the JIT specializes a loop count of 1 differently: size them as on an H100.
    K.persistent_programs = lambda device, per_sm: H100_SMS * per_sm
    results: dict[str, dict] = {}
    with captured_launches() as captured:
        for (t, b, c), dtype in [(s, d) for s in SHAPES for d in DTYPES]:
            captured.clear()
            _layer_launches(K, t, b, c, getattr(torch, dtype), composition=b == COMPOSITION_BATCH)
            for fn, args, kwargs in captured:
                key = launch_specialization(fn, args, kwargs)
                if key not in results:
                    results[key] = {"cases": [], **asdict(_compile_launch(fn, args, kwargs))}
                results[key]["cases"].append(f"{t}x{b}x{c} {dtype}")
    return list(results.values())


# PowerNorm's and UnifiedNorm's launches, and the composition's (column_sum after each token_sums)
LAUNCHES = (6 + 7) * len(SHAPES) * len(DTYPES) + 5 * len(DTYPES)
ROW_PASSES = ("token_moments_kernel", "token_affine_kernel", "token_grad_kernel", "unified_norm_dx_kernel",
              "token_sums_kernel", "channel_affine_kernel")


def test_token_kernels_compile_for_sm90_without_spills():
    from normlayers.bench.audit import json_from_compile_subprocess

    results = json_from_compile_subprocess([__file__], timeout=900)
    assert sum(len(r["cases"]) for r in results) == LAUNCHES
    spilled = [r for r in results if r["spill_bytes"]]
    assert not spilled, spilled
    # The passes over the tokens read 16 bytes at a time (a bf16 or fp32 row segment).
    narrow = [r for r in results if r["kernel"] in ROW_PASSES and 128 not in r["load_bits"]]
    assert not narrow, narrow


if __name__ == "__main__":
    print(json.dumps(compile_token_kernels()))
