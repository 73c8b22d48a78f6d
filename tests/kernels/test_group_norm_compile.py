"""GroupNorm's six kernels (seven variants: the normalize pass with and without its own finalize) compiled for an
H100 (sm_90) with Triton's real compiler, without a GPU, in the block configurations the launchers use for UNet
shapes, both layouts, bf16 (and fp64, gradcheck's dtype): each compiles,
the bf16 ones spill nothing and access global memory 128 bits at a time (registers and spills from ptxas, access
widths from the SASS, with :mod:`normlayers.bench.audit`'s parsers).

The compile runs in a subprocess: this test session has the Triton interpreter switched on.
"""

from __future__ import annotations

import json



def _compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int) -> dict:
    """Registers, spill bytes and global load/store widths of ``fn`` compiled for sm_90, its arguments in the
    kernel's own order (a constexpr may sit between runtime arguments: a unit stride), pointers and integers marked
    16-divisible as the JIT marks them for the audited shapes."""
    import triton
    from triton.backends.compiler import GPUTarget

    from normlayers.bench.audit import _ptxas_usage, _sass_widths

    names = fn.arg_names
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*") or kind in ("i32", "i64")}
    source = triton.compiler.ASTSource(fn=fn, signature={n: signature.get(n, "constexpr") for n in names},
                                       attrs=aligned, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": num_warps}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    registers, spills = _ptxas_usage(compiled.asm["ptx"], options)
    loads, stores = _sass_widths(compiled.asm["cubin"])
    return {"registers": registers, "spill_bytes": spills, "loads": loads, "stores": stores}


def compile_group_norm_kernels() -> list[dict]:
    import torch
    import triton.language as tl

    from normlayers.kernels import group_norm as K

    results = []
    # (N, C, HW, hw_contiguous) of bench shapes: 2x320x64x64 in both layouts, 8x1280x8x8 (small planes).
    shapes = [(2, 320, 4096, True), (2, 320, 4096, False), (8, 1280, 64, True)]
    for (n, c, hw, contiguous), (data, stats) in [(s, ("bf16", "fp32")) for s in shapes] + [(shapes[0], ("fp64",
                                                                                                          "fp64"))]:
        compute = tl.float64 if stats == "fp64" else tl.float32
        cpg = c // 32
        plan = K.reduce_plan(n * 32, cpg, hw, contiguous, torch.device("cpu"), hw_splits=4)
        block_c, block_hw = K.elementwise_tile(c, hw, contiguous)
        sizes = {"C": "i32", "G": "i32", "CPG": "i32", "HW": "i32"}
        strides = {f"stride_{t}{d}": "i64" for t in ("x", "y") for d in ("n", "c", "hw")}
        label = f"{n}x{c}x{hw} {'nchw' if contiguous else 'cl'} {data}"
        reduce_warps = K.num_warps_for(plan.block_c * plan.block_hw, torch.device("cpu"))
        apply_warps = K.num_warps_for(block_c * block_hw, torch.device("cpu"))
        # the no-grad pass that finalizes its tile's groups itself: as many as a tile meets, all of the partials
        block_g = K.next_power_of_2(K.groups_per_tile(block_c, cpg, 32))
        block_s = min(K.next_power_of_2(plan.splits), K.FINALIZE_SPLITS)
        kernels = {
            "moments": (K.group_norm_moments_kernel,
                        {"X": f"*{data}", "PARTIALS": f"*{stats}", "G": "i32", "CPG": "i32", "HW": "i32",
                         "stride_n": "i64", "stride_c": "i64", "stride_hw": "i64", "HW_SPLITS": "i32",
                         "HW_PER": "i32"},
                        {"COMPUTE": compute, "BLOCK_C": plan.block_c, "BLOCK_HW": plan.block_hw}, reduce_warps),
            "finalize": (K.group_norm_finalize_kernel,
                         {"PARTIALS": f"*{stats}", "MEAN": f"*{stats}", "RSTD": f"*{stats}", "NG": "i32",
                          "SPLITS": "i32", "eps": "fp32"},
                         {"COMPUTE": compute, "BLOCK_R": K.FINALIZE_ROWS, "BLOCK_S": K.FINALIZE_SPLITS}, 4),
            **{name: (K.group_norm_apply_kernel,
                      {"X": f"*{data}", "W": f"*{data}", "B": f"*{data}", "MEAN": f"*{stats}",
                       "RSTD": f"*{stats}", "Y": f"*{data}", **sizes, "NG": "i32", "SPLITS": "i32", "eps": "fp32",
                       **strides},
                      {"HAS_WEIGHT": True, "HAS_BIAS": True, "ACT": 1, "FINALIZE": finalize, "COMPUTE": compute,
                       "BLOCK_C": block_c, "BLOCK_HW": block_hw, "BLOCK_G": block_g, "BLOCK_S": block_s},
                      apply_warps)
               for name, finalize in (("apply+silu", False), ("apply+silu finalizing", True))},
            "bwd_reduce+silu": (K.group_norm_bwd_reduce_kernel,
                                {"X": f"*{data}", "DZ": f"*{data}", "W": f"*{data}", "B": f"*{data}",
                                 "MEAN": f"*{stats}", "RSTD": f"*{stats}", "PARTIALS": f"*{stats}",
                                 "PARAM_PARTIALS": f"*{stats}", **sizes,
                                 **{f"stride_{t}{d}": "i64" for t in ("x", "dz") for d in ("n", "c", "hw")},
                                 "HW_SPLITS": "i32", "HW_PER": "i32"},
                                {"HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_PARAMS": True, "ACT": 1,
                                 "COMPUTE": compute, "BLOCK_C": plan.block_c, "BLOCK_HW": plan.block_hw},
                                reduce_warps),
            "bwd_finalize": (K.group_norm_bwd_finalize_kernel,
                             {"PARTIALS": f"*{stats}", "COEF": f"*{stats}", "NG": "i32", "SPLITS": "i32",
                              "count": "i32"},
                             {"COMPUTE": compute, "BLOCK_R": K.FINALIZE_ROWS, "BLOCK_S": K.FINALIZE_SPLITS}, 4),
            "bwd_apply+silu": (K.group_norm_bwd_apply_kernel,
                               {"X": f"*{data}", "DZ": f"*{data}", "W": f"*{data}", "B": f"*{data}",
                                "MEAN": f"*{stats}", "RSTD": f"*{stats}", "COEF": f"*{stats}", "DX": f"*{data}",
                                **sizes, "NG": "i32",
                                **{f"stride_{t}{d}": "i64" for t in ("x", "dz", "dx") for d in ("n", "c", "hw")}},
                               {"HAS_WEIGHT": True, "HAS_BIAS": True, "ACT": 1, "COMPUTE": compute,
                                "BLOCK_C": block_c, "BLOCK_HW": block_hw}, apply_warps),
        }
        for name, (fn, signature, constexprs, warps) in kernels.items():
            # The JIT specializes an integer argument equal to 1: the contiguous dim's stride is a constant there.
            unit = "hw" if contiguous else "c"
            unit_strides = {k: 1 for k in signature if k.startswith("stride_") and k.endswith(unit)}
            signature = {k: v for k, v in signature.items() if k not in unit_strides}
            results.append({"case": label, "kernel": name, "warps": warps,
                            **_compile_sm90(fn, signature, {**unit_strides, **constexprs}, warps)})
    return results


def test_group_norm_kernels_compile_for_sm90_without_spills():
    from normlayers.bench.audit import json_from_compile_subprocess

    results = json_from_compile_subprocess([__file__], timeout=900)
    assert len(results) == 4 * 7
    low_precision = [r for r in results if "bf16" in r["case"]]
    # fp64 (gradcheck's dtype) may spill: its backward reduction holds twice the bytes per value (192 B measured).
    assert not [r for r in low_precision if r["spill_bytes"]]
    # 128-bit global accesses: every kernel reads 16 bytes at a time (data, or the fp32 partials) in both layouts,
    # and the elementwise passes write 16 bytes at a time.
    assert all(128 in r["loads"] for r in low_precision), low_precision
    assert all(128 in r["stores"] for r in low_precision if "apply" in r["kernel"]), low_precision


if __name__ == "__main__":
    print(json.dumps(compile_group_norm_kernels()))
