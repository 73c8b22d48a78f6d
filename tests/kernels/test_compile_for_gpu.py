"""Compile every kernel variant (row norms, per-plane channel statistics, the composites' finalize kernels,
RegionNorm's region moments, EvoNorm's fused pass, token statistics) for an H100 (sm_90) with Triton's real
compiler, without a GPU.

The interpreter runs kernels as Python and accepts code the compiler rejects (e.g. a loop-carried variable that
changes dtype). Triton compiles ahead of time for a named target down to a cubin with its bundled ptxas, so CI
catches such errors too. The compile runs in a subprocess: this test session has the interpreter switched on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import product

import pytest


def compile_finalize_kernels(compile_kernel) -> int:
    """The composites' finalize kernels (BatchChannelNorm2d, EvoNorm S and B), forward and backward: fp32 statistics
    with bf16 parameters and buffers, and fp64 throughout; the flag combinations the launchers use."""
    import triton.language as tl

    from normlayers.kernels import batch_channel, evo_norm

    count = 0
    sizes = {"N": "i32", "C": "i32", "G": "i32", "CPG": "i32"}
    for stats, params in (("fp32", "bf16"), ("fp64", "fp64")):
        tile = {"COMPUTE": tl.float64 if stats == "fp64" else tl.float32, "BLOCK_N": 32, "BLOCK_C": 16}
        planes = {"PLANE_MEAN": f"*{stats}", "PLANE_VAR": f"*{stats}"}
        parameters = {name: f"*{params}" for name in ("WEIGHT", "BIAS")}
        # BCN: (STATISTICS, UPDATE_RUNNING, COUNT_BATCHES, CUMULATIVE, RATE_FROM_TENSOR, parameters present)
        for statistics, update, count_batches, cumulative, rate_tensor, present in (
                (batch_channel.BATCH_STATISTICS, True, True, False, False, True),
                (batch_channel.BATCH_STATISTICS, True, True, True, False, False),
                (batch_channel.RUNNING_STATISTICS, False, False, False, False, True),
                (batch_channel.ESTIMATED_STATISTICS, False, False, False, True, True)):
            has = {f"HAS_{name}": present for name in ("BN_WEIGHT", "BN_BIAS", "WEIGHT", "BIAS")}
            compile_kernel(batch_channel.batch_channel_finalize_fwd_kernel,
                           {**planes, "RUNNING_MEAN": f"*{params}", "RUNNING_VAR": f"*{params}",
                            "NUM_BATCHES": "*i64", "RATE": f"*{params}", "BN_WEIGHT": f"*{params}",
                            "BN_BIAS": f"*{params}", **parameters, "SCALE": f"*{stats}", "SHIFT": f"*{stats}",
                            "MEAN": f"*{stats}", "VAR": f"*{stats}"},
                           {**sizes, "count": "i32", "momentum": "fp32", "estimate_rate": "fp32", "eps": "fp32",
                            "bn_eps": "fp32"},
                           {"STATISTICS": statistics, "UPDATE_RUNNING": update, "COUNT_BATCHES": count_batches,
                            "CUMULATIVE": cumulative, "RATE_FROM_TENSOR": rate_tensor, **has, **tile})
            compile_kernel(batch_channel.batch_channel_finalize_bwd_kernel,
                           {"DSCALE": f"*{stats}", "DSHIFT": f"*{stats}", **planes, "MEAN": f"*{stats}",
                            "VAR": f"*{stats}", "BN_WEIGHT": f"*{params}", "BN_BIAS": f"*{params}",
                            "WEIGHT": f"*{params}", "DPLANE_MEAN": f"*{stats}", "DPLANE_VAR": f"*{stats}",
                            "DBN_WEIGHT": f"*{params}", "DBN_BIAS": f"*{params}", "DWEIGHT": f"*{params}",
                            "DBIAS": f"*{params}"},
                           {**sizes, "eps": "fp32", "bn_eps": "fp32"},
                           {"BATCH_GRADIENT": statistics == batch_channel.BATCH_STATISTICS, **has, **tile})
            count += 2
        for statistic, numerator in ((evo_norm.GROUP_VARIANCE, evo_norm.NUMERATOR_IDENTITY),
                                     (evo_norm.GROUP_VARIANCE, evo_norm.NUMERATOR_SWISH),
                                     (evo_norm.GROUP_MEAN_SQUARE, evo_norm.NUMERATOR_SILU)):
            flags = {"STATISTIC": statistic, "NUMERATOR": numerator, "HAS_WEIGHT": True, "HAS_BIAS": True, **tile}
            compile_kernel(evo_norm.evo_norm_s_finalize_bwd_kernel,
                           {"DSCALE": f"*{stats}", "DSHIFT": f"*{stats}", "DSLOPE": f"*{stats}", **planes,
                            "WEIGHT": f"*{params}", "DPLANE_MEAN": f"*{stats}", "DPLANE_VAR": f"*{stats}",
                            "DWEIGHT": f"*{params}", "DBIAS": f"*{params}", "DV": f"*{params}"},
                           {**sizes, "eps": "fp32"}, flags)
            count += 1
        for variant, training in ((evo_norm.VARIANT_B0, True), (evo_norm.VARIANT_B1, False),
                                  (evo_norm.VARIANT_B2, True)):
            has = {"VARIANT": variant, "HAS_WEIGHT": True, "HAS_BIAS": True, **tile}
            compile_kernel(evo_norm.evo_norm_b_finalize_fwd_kernel,
                           {**planes, "RUNNING_VAR": f"*{params}", **parameters, "V": f"*{params}",
                            **{name: f"*{stats}" for name in ("LEFT", "SLOPE", "OFFSET", "SCALE", "SHIFT", "VAR")}},
                           {**sizes, "count": "i32", "momentum": "fp32", "eps": "fp32"},
                           {"BATCH_STATISTICS": training, "UPDATE_RUNNING": training, **has})
            compile_kernel(evo_norm.evo_norm_b_finalize_bwd_kernel,
                           {**{f"D{name}": f"*{stats}" for name in ("LEFT", "SLOPE", "OFFSET", "SCALE", "SHIFT")},
                            **planes, "VAR": f"*{stats}", "DPLANE_MEAN": f"*{stats}", "DPLANE_VAR": f"*{stats}",
                            "DWEIGHT": f"*{params}", "DBIAS": f"*{params}", "DV": f"*{params}"},
                           {**sizes, "eps": "fp32"}, {"BATCH_GRADIENT": training, **has})
            count += 2
    return count


def compile_all_variants() -> int:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from normlayers.kernels import (
        batch_channel, channel_norms, channel_stats, common, evo_norm, region_norm, row_norms, token_stats)

    target = GPUTarget("cuda", 90, 32)

    def compile_kernel(fn, pointer_types, scalar_types, constexprs):
        types = {**pointer_types, **scalar_types, **{name: "constexpr" for name in constexprs}}
        # in the kernel's argument order: the signature is matched to the arguments by position
        signature = {name: types[name] for name in fn.arg_names}
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs))
        triton.compile(source, target=target, options={"num_warps": 4})

    count = 0
    for data, norm, single, fused in product(("bf16", "fp32", "fp64"), (0, 1, 2), (True, False), (True, False)):
        stats = "fp64" if data == "fp64" else "fp32"
        flags = {"NORM": norm, "HAS_WEIGHT": True, "HAS_BIAS": norm == 0,
                 "COMPUTE": tl.float64 if data == "fp64" else tl.float32,
                 "BLOCK_M": 4 if single else 1, "BLOCK_N": 512, "SINGLE_BLOCK": single}
        compile_kernel(
            row_norms.row_norm_fwd_kernel,
            {**{n: f"*{data}" for n in ("X", "RES", "W", "B", "Y", "RES_OUT")},
             "MEAN": f"*{stats}", "RSTD": f"*{stats}"},
            {"M": "i32", "N": "i32", "stride_x": "i64", "stride_res": "i64", "eps": "fp32", "weight_offset": "fp32",
             "cap": "fp32"},
            {"NORM": norm, "HAS_RESIDUAL": fused, **{k: v for k, v in flags.items() if k != "NORM"}},
        )
        compile_kernel(
            row_norms.row_norm_bwd_kernel,
            {"H": f"*{data}", "W": f"*{data}", "DY": f"*{data}", "DRES_OUT": f"*{data}", "MEAN": f"*{stats}",
             "RSTD": f"*{stats}", "DH": f"*{data}", "PARTIALS": f"*{stats}", "COEF": f"*{stats}"},
            {"M": "i32", "N": "i32", "stride_h": "i64", "stride_dy": "i64", "stride_dres": "i64",
             "weight_offset": "fp32"},
            {"NORM": norm, "HAS_DRESIDUAL": fused, **{k: v for k, v in flags.items() if k != "NORM"},
             "HELD_N": 1 if single else 1024, "STREAM_N": 1 if single else 256},
        )
        count += 2
    # Channels-first norms: both layouts' unit strides as Triton specializes them (an integer argument equal to 1
    # becomes a constant: NCHW's pixel strides, channels-last's channel strides), single block and chunked C.
    for data, norm, single, unit in product(("bf16", "fp32", "fp64"), (0, 1), (True, False), ("p", "c")):
        stats = "fp64" if data == "fp64" else "fp32"
        flags = {"NORM": norm, "HAS_WEIGHT": True, "HAS_BIAS": norm == 0,
                 "COMPUTE": tl.float64 if data == "fp64" else tl.float32, "BLOCK_C": 64 if single else 32,
                 "BLOCK_P": 32, "SINGLE_BLOCK": single}

        def tensor_strides(*names):
            strides = {f"stride_{t}{d}": "i64" for t in names for d in ("n", "c", "p") if d != unit}
            return strides, {f"stride_{t}{unit}": 1 for t in names}

        fwd_strides, fwd_units = tensor_strides("x", "y")
        compile_kernel(channel_norms.channel_norm_fwd_kernel,
                       {"X": f"*{data}", "W": f"*{data}", "B": f"*{data}", "Y": f"*{data}", "MEAN": f"*{stats}",
                        "RSTD": f"*{stats}"},
                       {"C": "i32", "P": "i32", **fwd_strides, "eps": "fp32"}, {**fwd_units, **flags})
        bwd_strides, bwd_units = tensor_strides("x", "dy", "dx")
        compile_kernel(channel_norms.channel_norm_bwd_kernel,
                       {"X": f"*{data}", "W": f"*{data}", "DY": f"*{data}", "MEAN": f"*{stats}", "RSTD": f"*{stats}",
                        "DX": f"*{data}", "DW_PARTIAL": f"*{stats}", "DB_PARTIAL": f"*{stats}"},
                       {"N": "i32", "C": "i32", "P": "i32", **bwd_strides}, {**bwd_units, **flags})
        count += 2
    for partial in ("fp32", "fp64"):
        compile_kernel(common.column_sum_kernel, {"PARTIALS": f"*{partial}", "OUT": "*bf16", "OUT2": "*bf16"},
                       {"num_rows": "i32", "N": "i32", "SPLIT": "i32"}, {"BLOCK_ROWS": 32, "BLOCK_N": 256})
        count += 1
    planes = {"P": "i32", "C": "i32", "HW": "i32"}

    def strides(*names):
        return {f"stride_{name}{dim}": "i64" for name in names for dim in ("n", "c", "hw")}

    for data in ("bf16", "fp32", "fp64"):
        stats = "fp64" if data == "fp64" else "fp32"
        tile = {"COMPUTE": tl.float64 if data == "fp64" else tl.float32, "BLOCK_P": 4, "BLOCK_HW": 256}
        # The per-plane kernels of channel_stats, EvoNorm and BCN take a rows tile or (FLAT) a flat one, whose span
        # starts at a multiple of ALIGN values (16 bytes).
        rows = {**tile, "FLAT": False, "ALIGN": 1}
        flat = {**tile, "FLAT": True, "ALIGN": {"bf16": 8, "fp32": 4, "fp64": 2}[data]}

        def elementwise(plane_tile):
            # An elementwise pass's program walks STEPS chunks of its planes (a flat tile's one chunk holds them).
            return {**plane_tile, "STEPS": 1 if plane_tile["FLAT"] else 4}

        for plane_tile in (rows, flat):
            compile_kernel(channel_stats.plane_moments_fwd_kernel,
                           {"X": f"*{data}", "MEAN": f"*{stats}", "VAR": f"*{stats}"},
                           {**planes, "stride_n": "i64", "stride_c": "i64", "stride_hw": "i64"}, plane_tile)
        for has_dmean, has_dvar, has_partial in ((True, True, False), (True, False, False), (False, True, False),
                                                 (True, True, True)):
            compile_kernel(channel_stats.plane_moments_bwd_kernel,
                           {"X": f"*{data}", "MEAN": f"*{stats}", "DMEAN": f"*{stats}", "DVAR": f"*{stats}",
                            "DX_PARTIAL": f"*{data}", "DX": f"*{data}"},
                           {**planes, **strides("x", "p", "dx")},
                           {"HAS_DMEAN": has_dmean, "HAS_DVAR": has_dvar, "HAS_DX_PARTIAL": has_partial,
                            **elementwise(flat if has_partial else rows)})
        for regions, plane_tile in ((1, rows), (1, flat), (2, rows)):  # 2: RegionNorm's two regions, uint8 holes
            hole = "*u8" if regions == 2 else f"*{data}"
            compile_kernel(channel_stats.plane_affine_fwd_kernel,
                           {"X": f"*{data}", "HOLE": hole, "M": f"*{stats}", "A": f"*{stats}", "B": f"*{stats}",
                            "Y": f"*{data}"},
                           {**planes, **strides("x", "h", "y")}, {"REGIONS": regions, **elementwise(plane_tile)})
            compile_kernel(channel_stats.plane_affine_bwd_kernel,
                           {"DY": f"*{data}", "X": f"*{data}", "HOLE": hole, "M": f"*{stats}", "A": f"*{stats}",
                            "DX": f"*{data}", "DA": f"*{stats}", "DB": f"*{stats}"},
                           {**planes, **strides("dy", "x", "h", "dx")}, {"REGIONS": regions, **plane_tile})
        compile_kernel(region_norm.region_moments_fwd_kernel,
                       {"X": f"*{data}", "HOLE": "*u8", "CENTER": f"*{stats}", "COUNT": f"*{stats}",
                        "FIRST": f"*{stats}", "SECOND": f"*{stats}"},
                       {**planes, **strides("x", "h")}, tile)
        compile_kernel(region_norm.region_moments_bwd_kernel,
                       {"X": f"*{data}", "HOLE": "*u8", "CENTER": f"*{stats}", "DFIRST": f"*{stats}",
                        "DSECOND": f"*{stats}", "DX": f"*{data}", "DCENTER": f"*{stats}"},
                       {**planes, **strides("x", "h", "dx")}, tile)
        count += 14
        # RegionNorm's fused layer: every flag the launchers set (batch or instance statistics, the statistics
        # finalized inside the elementwise pass or not, the official affine, with and without parameters).
        params = {name: f"*{data}" for name in ("GAMMA_H", "BETA_H", "GAMMA_V", "BETA_V")}
        compile_kernel(region_norm.region_stats_kernel, {"X": f"*{data}", "HOLE": "*u8", "PARTIALS": f"*{stats}"},
                       {**planes, **strides("x", "h"), "cap": "fp32"}, tile)
        count += 1
        for batch, flag in product((True, False), (True, False)):
            has = {name: flag for name in ("HAS_GAMMA_H", "HAS_BETA_H", "HAS_GAMMA_V", "HAS_BETA_V")}
            compile_kernel(region_norm.region_finalize_kernel, {"PARTIALS": f"*{stats}", "STATS": f"*{stats}"},
                           {"STAT_COUNT": "i32", "LOOP": "i32", "stride_loop": "i32", "eps": "fp32"},
                           {"OFFICIAL_EPS": flag, "COMPUTE": tile["COMPUTE"], "BLOCK": region_norm.FINALIZE_BLOCK})
            compile_kernel(region_norm.region_normalize_kernel,
                           {"X": f"*{data}", "HOLE": "*u8", "STATS": f"*{stats}", **params, "Y": f"*{data}"},
                           {**planes, "N": "i32", "eps": "fp32", **strides("x", "h", "y")},
                           {"BATCH": batch, "OFFICIAL_AFFINE": flag, "FINALIZE": flag, "OFFICIAL_EPS": True, **has,
                            **tile})
            compile_kernel(region_norm.region_normalize_bwd_kernel,
                           {"DY": f"*{data}", "X": f"*{data}", "HOLE": "*u8", "STATS": f"*{stats}",
                            "SUMS": f"*{stats}"}, {**planes, **strides("dy", "x", "h")}, {"BATCH": batch, **tile})
            compile_kernel(region_norm.region_finalize_bwd_kernel,
                           {"SUMS": f"*{stats}", "STATS": f"*{stats}", "COEF": f"*{stats}",
                            **{f"D{name}": f"*{data}" for name in params}}, {"N": "i32", "C": "i32"},
                           {"BATCH": batch, "OFFICIAL_AFFINE": flag, **has, "COMPUTE": tile["COMPUTE"],
                            "BLOCK": region_norm.FINALIZE_BLOCK})
            compile_kernel(region_norm.region_dx_kernel,
                           {"DY": f"*{data}", "X": f"*{data}", "HOLE": "*u8", "STATS": f"*{stats}",
                            "COEF": f"*{stats}", "GAMMA_H": f"*{data}", "GAMMA_V": f"*{data}", "DX": f"*{data}"},
                           {**planes, **strides("dy", "x", "h", "dx")},
                           {"BATCH": batch, "HAS_GAMMA_H": flag, "HAS_GAMMA_V": flag, **tile})
            count += 5
        coefficients = {name: f"*{stats}" for name in ("LEFT", "SLOPE", "OFFSET", "SCALE")}
        params = "fp64" if data == "fp64" else "bf16"
        moments = {"PLANE_MEAN": f"*{stats}", "PLANE_VAR": f"*{stats}"}
        parameters = {name: f"*{params}" for name in ("RUNNING_VAR", "WEIGHT", "BIAS", "V")}
        # The fused pass: coefficients given (both modes), or computed in the pass (the S family, each numerator and
        # statistic; the B family in eval, each variant), writing them for the backward or not.
        passes = [(mode, evo_norm.COEFFICIENTS_GIVEN, 0, 0, False) for mode in (evo_norm.MODE_SWISH,
                                                                               evo_norm.MODE_MAX_DIV)]
        passes += [(evo_norm.MODE_IDENTITY if numerator == evo_norm.NUMERATOR_IDENTITY else evo_norm.MODE_SWISH,
                    evo_norm.COEFFICIENTS_S, statistic, numerator, store)
                   for statistic, numerator, store in ((evo_norm.GROUP_VARIANCE, evo_norm.NUMERATOR_IDENTITY, True),
                                                       (evo_norm.GROUP_VARIANCE, evo_norm.NUMERATOR_SWISH, False),
                                                       (evo_norm.GROUP_MEAN_SQUARE, evo_norm.NUMERATOR_SILU, True))]
        passes += [(evo_norm.MODE_MAX_DIV, evo_norm.COEFFICIENTS_B_RUNNING, 0, variant, variant == evo_norm.VARIANT_B0)
                   for variant in (evo_norm.VARIANT_B0, evo_norm.VARIANT_B1, evo_norm.VARIANT_B2)]
        for index, (mode, source, statistic, variant, store) in enumerate(passes):
            compile_kernel(evo_norm.evo_plane_fwd_kernel,
                           {"X": f"*{data}", **coefficients, "SHIFT": f"*{stats}", "Y": f"*{data}", **moments,
                            **parameters},
                           {**planes, "CPG": "i32", "eps": "fp32", **strides("x", "y")},
                           {"MODE": mode, "COEFFICIENTS": source, "STATISTIC": statistic, "VARIANT": variant,
                            "HAS_WEIGHT": True, "HAS_BIAS": True, "STORE_COEFFICIENTS": store, "BLOCK_CPG": 16,
                            **elementwise(flat if index % 2 else rows)})
        count += len(passes)
        for store in (True, False):
            compile_kernel(batch_channel.batch_channel_eval_fwd_kernel,
                           {"X": f"*{data}", **moments, "RUNNING_MEAN": f"*{params}", "RUNNING_VAR": f"*{params}",
                            **{name: f"*{params}" for name in ("BN_WEIGHT", "BN_BIAS", "WEIGHT", "BIAS")},
                            "Y": f"*{data}", **{name: f"*{stats}" for name in ("SCALE", "SHIFT", "MEAN", "VAR")}},
                           {**planes, "CPG": "i32", "eps": "fp32", "bn_eps": "fp32", **strides("x", "y")},
                           {**{f"HAS_{name}": store for name in ("BN_WEIGHT", "BN_BIAS", "WEIGHT", "BIAS")},
                            "STORE_COEFFICIENTS": store, "BLOCK_CPG": 16, **elementwise(rows if store else flat)})
        count += 2
        for mode, plane_tile in product((evo_norm.MODE_SWISH, evo_norm.MODE_MAX_DIV), (rows, flat)):
            compile_kernel(evo_norm.evo_plane_bwd_kernel,
                           {"DY": f"*{data}", "X": f"*{data}", **coefficients, "DX": f"*{data}",
                            **{f"D{name}": f"*{stats}" for name in ("LEFT", "SLOPE", "OFFSET", "SCALE", "SHIFT")}},
                           {**planes, **strides("dy", "x", "dx")}, {"MODE": mode, **plane_tile})
            count += 1
    count += compile_finalize_kernels(compile_kernel)
    # Token statistics (PowerNorm, UnifiedNorm): every flag combination the launchers use, and the mixed dtypes of
    # PowerNorm's fp32 GroupScaling output u with fp16/bf16 activations (u -> bf16 y; bf16 dy with u -> fp32 du).
    tokens = {"R": "i32", "C": "i32"}
    row_strides = {name: "i64" for name in ("stride_xr", "stride_xc")}
    for data in ("bf16", "fp32", "fp64"):
        stats = "fp64" if data == "fp64" else "fp32"
        tile = {"COMPUTE": tl.float64 if data == "fp64" else tl.float32, "BLOCK_R": 32, "BLOCK_C": 128}
        sums_variants = [(data, data, False, True, False), (data, data, False, False, False),
                         (data, data, True, False, False), (data, data, True, False, True)]
        affine_variants = [(data, data, data, False, True), (data, data, data, False, False),
                           (data, data, data, True, False)]
        if data == "bf16":
            sums_variants += [("fp32", "bf16", True, False, True), ("fp32", "bf16", True, False, False)]
            affine_variants += [("fp32", "fp32", "bf16", False, True), ("bf16", "bf16", "fp32", False, False)]
        for x_type, dy_type, has_dy, has_valid, write_out in sums_variants:
            compile_kernel(token_stats.token_sums_kernel,
                           {"X": f"*{x_type}", "DY": f"*{dy_type}", "VALID": "*u8", "PARTIALS": f"*{stats}",
                            "P": f"*{stats}", "Q": f"*{stats}", "OUT": f"*{x_type}"},
                           {**tokens, **row_strides, "stride_dyr": "i64", "stride_dyc": "i64", "stride_p": "i64",
                            "stride_or": "i64", "stride_oc": "i64", "row_programs": "i32", "tiles_per_program": "i32"},
                           {"HAS_DY": has_dy, "HAS_VALID": has_valid, "WRITE_OUT": write_out, **tile})
            count += 1
        for x_type, x2_type, out_type, has_x2, has_shift in affine_variants:
            compile_kernel(token_stats.channel_affine_kernel,
                           {"X": f"*{x_type}", "X2": f"*{x2_type}", "P": f"*{stats}", "Q": f"*{stats}",
                            "S": f"*{stats}", "OUT": f"*{out_type}"},
                           {**tokens, **row_strides, "stride_x2r": "i64", "stride_x2c": "i64", "stride_or": "i64",
                            "stride_oc": "i64"},
                           {"HAS_X2": has_x2, "HAS_SHIFT": has_shift, **tile})
            count += 1
    return count + compile_fused_token_kernels(compile_kernel)


def compile_fused_token_kernels(compile_kernel) -> int:
    """PowerNorm's and UnifiedNorm's fused kernels (row-whole tiles, one-program finalize): module and activations in
    one dtype (buffers and parameters too), every flag the launchers pass."""
    import triton.language as tl

    from normlayers.kernels import token_stats

    count = 0
    rows = {"R": "i32", "G": "i32", "S": "i32"}
    group_scaling = {"gs_eps": "fp32", "gs_cap": "fp32"}
    for data in ("bf16", "fp32", "fp64"):
        stats = "fp64" if data == "fp64" else "fp32"
        compute = tl.float64 if data == "fp64" else tl.float32
        tile = {"COMPUTE": compute, "BLOCK_R": 4, "BLOCK_G": 2, "BLOCK_S": 512}
        finalize = {"COMPUTE": compute, "BLOCK_C": 1024, "BLOCK_P": 64}
        for groups, flag in product((True, False), (True, False)):
            compile_kernel(token_stats.token_moments_kernel,
                           {"X": f"*{data}", "PAD": "*u8", "PARTIALS": f"*{stats}"},
                           {**rows, "inner_rows": "i32", **{n: "i64" for n in ("stride_xr", "stride_xc",
                                                                                "stride_pad_outer",
                                                                                "stride_pad_inner")},
                            **group_scaling, "cap": "fp32", "tiles_per_program": "i32"},
                           {"GROUPS": groups, "HAS_PAD": flag, **tile})
            compile_kernel(token_stats.token_affine_kernel,
                           {"X": f"*{data}", "SCALE": f"*{data if flag else stats}", "WEIGHT": f"*{data}",
                            "BIAS": f"*{data}", "OUT": f"*{data}"},
                           {**rows, **{n: "i64" for n in ("stride_xr", "stride_xc", "stride_or", "stride_oc")},
                            "eps": "fp32", **group_scaling},
                           {"GROUPS": groups, "SCALE_FROM_RUNNING": flag, "HAS_WEIGHT": flag, "HAS_BIAS": flag,
                            **tile})
            compile_kernel(token_stats.token_grad_kernel,
                           {"X": f"*{data}", "DY": f"*{data}", "SCALE": f"*{stats}", "WEIGHT": f"*{data}",
                            "EMA_GZ": f"*{data}", "GRAD_SCALE": f"*{stats}", "DX": f"*{data}",
                            "PARTIALS": f"*{stats}"},
                           {**rows, **{n: "i64" for n in ("stride_xr", "stride_xc", "stride_dyr", "stride_dyc",
                                                           "stride_dxr", "stride_dxc")},
                            **group_scaling, "ema_factor": "fp32", "tiles_per_program": "i32"},
                           {"GROUPS": groups, "HAS_WEIGHT": flag, "POWER": groups or flag, "HAS_EMA": flag, **tile})
            compile_kernel(token_stats.power_norm_finalize_kernel,
                           {"PARTIALS": f"*{stats}", "RUNNING_PHI": f"*{data}", "ITERS": "*i64", "STEP": "*i64",
                            "SCALE": f"*{stats}", "GRAD_SCALE": f"*{stats}"},
                           {"num_programs": "i32", "C": "i32", "eps": "fp32", "alpha_fwd": "fp32",
                            "warmup_iters": "i32"},
                           {"GRAD_FROM_BATCH": groups, **finalize})
            compile_kernel(token_stats.power_norm_finalize_bwd_kernel,
                           {"PARTIALS": f"*{stats}", "EMA_GZ": f"*{data}", "DWEIGHT": f"*{data}",
                            "DBIAS": f"*{data}"},
                           {"num_programs": "i32", "C": "i32", "row_count": "fp32"},
                           {"HAS_WEIGHT": flag, "HAS_BIAS": flag, "COMPUTE": compute, "BLOCK_C": 128})
            compile_kernel(token_stats.unified_norm_finalize_kernel,
                           {"PARTIALS": f"*{stats}", "RUNNING_VAR": f"*{data}", "BUFFER_X2": f"*{data}",
                            "SKIP_COUNTER": "*i64", "ITERS": "*i64", "STEP": "*i64", "SKIP": "*i8",
                            "INV_STD": f"*{stats}", "R_OUT": f"*{stats}"},
                           {"num_programs": "i32", "C": "i32", "M": "i32", "eps": "fp32", "momentum": "fp32",
                            "warmup_iters": "i32", "r_clamp_from": "i32"},
                           {"SINGLE_SLOT": groups and not flag, "OUTLIER_FILTRATION": flag,
                            "GRAD_COMPENSATION": groups, **finalize})
            count += 6
        compile_kernel(token_stats.unified_norm_finalize_bwd_kernel,
                       {"PARTIALS": f"*{stats}", "WEIGHT": f"*{data}", "R_IN": f"*{stats}", "STEP": "*i64",
                        "SKIP": "*i8", "EMA_GZ": f"*{data}", "BUFFER_GZ": f"*{data}", "COEFF": f"*{stats}",
                        "DWEIGHT": f"*{data}", "DBIAS": f"*{data}"},
                       {"num_programs": "i32", "C": "i32", "row_count": "fp32", "M": "i32", "momentum": "fp32",
                        "warmup_iters": "i32"},
                       {"COMPUTE": compute, "BLOCK_C": 128})
        compile_kernel(token_stats.unified_norm_dx_kernel,
                       {"X": f"*{data}", "DY": f"*{data}", "INV_STD": f"*{stats}", "WEIGHT": f"*{data}",
                        "R_IN": f"*{stats}", "COEFF": f"*{stats}", "DX": f"*{data}"},
                       {"R": "i32", "C": "i32", **{n: "i64" for n in ("stride_xr", "stride_xc", "stride_dyr",
                                                                       "stride_dyc", "stride_dxr", "stride_dxc")}},
                       {"COMPUTE": compute, "BLOCK_R": 4, "BLOCK_S": 1024})
        count += 2
    return count


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"a kernel failed to compile for sm_90:\n{done.stderr[-4000:]}")
    assert done.stdout.strip().endswith("compiled 406 kernels"), done.stdout[-2000:]


if __name__ == "__main__":
    print(f"compiled {compile_all_variants()} kernels")
