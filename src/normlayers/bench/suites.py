"""Named benchmark suites (``normlayers-bench --suite NAME``), shipped in the package so that pip users have them.

A suite fixes the ops, dtypes, modes and shapes of a run per device type; options given on the command line override
its fields. ``default`` is what ``normlayers-bench`` runs with no arguments; on a CPU it finishes in well under two
minutes (the README's first command).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["BUDGETS_MS", "SUITES", "Suite"]

# (warmup, timed) milliseconds per call site, by device type: triton.testing.do_bench's defaults on CUDA; on CPU no
# separate warmup beyond the three calls that estimate each call's time.
BUDGETS_MS: Mapping[str, tuple[float, float]] = {"cuda": (25.0, 100.0), "cpu": (0.0, 20.0)}


@dataclass(frozen=True)
class Suite:
    """``dtypes`` by device type; ``shapes`` by device type, then by shape kind (``"rows"``, ``"nchw"``,
    ``"conv_weight"``): an op whose kind has no entry runs at its own default shapes. ``providers`` narrows the
    providers (default: all)."""

    name: str
    description: str
    ops: tuple[str, ...]
    modes: tuple[str, ...]
    dtypes: Mapping[str, tuple[str, ...]]
    shapes: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    providers: tuple[str, ...] = ()  # empty: every provider that can run here


_ROW_NORMS = ("layer_norm", "rms_norm", "crms_norm", "add_layer_norm", "add_rms_norm", "add_crms_norm")
_EVO_NORMS = tuple(f"evo_norm2d_{v}" for v in ("b0", "b1", "b2", "s0", "s0a", "s1", "s1a", "s2", "s2a"))
_GROUP_NORMS = ("group_norm", "group_norm_silu", "group_norm_cl", "group_norm_silu_cl")
_HEADLINE_DTYPES = {"cuda": ("bf16",), "cpu": ("fp32",)}

SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("default", "a first look: RMSNorm, LayerNorm and BatchChannelNorm, inference and training",
              ops=("rms_norm", "layer_norm", "batch_channel_norm"), modes=("fwd", "fwd_bwd"),
              dtypes=_HEADLINE_DTYPES,
              shapes={"cpu": {"rows": ("256x1024",), "nchw": ("4x64x16x16",)}}),
        Suite("row_norms", "the six row norms over transformer widths (model widths and non-powers of two)",
              ops=_ROW_NORMS, modes=("fwd", "bwd", "fwd_bwd"), dtypes=_HEADLINE_DTYPES,
              shapes={"cuda": {"rows": ("4096x512", "4096x1024", "4096x2048", "4096x4096", "4096x5120", "4096x8192",
                                        "4096x16384", "16384x4096", "32768x4096")}}),
        Suite("cnn_norms", "BatchChannelNorm, the EvoNorms and weight standardization at ResNet-50 shapes",
              ops=("batch_channel_norm", *_EVO_NORMS, "weight_standardize"), modes=("fwd", "fwd_bwd"),
              dtypes=_HEADLINE_DTYPES),
        Suite("channel_norms", "LayerNorm2d and RMSNorm2d at ConvNeXt shapes, against timm's eager math",
              ops=("layer_norm2d", "rms_norm2d"), modes=("fwd", "bwd", "fwd_bwd"), dtypes=_HEADLINE_DTYPES),
        Suite("group_norm", "GroupNorm and GroupNorm + SiLU at diffusion UNet/VAE shapes (2x320x64x64, "
              "1x512x128x128, 8x1280x8x8), NCHW and channels-last, against F.group_norm (then F.silu) eager",
              ops=_GROUP_NORMS, modes=("fwd", "bwd", "fwd_bwd"), dtypes=_HEADLINE_DTYPES),
        Suite("transformer_norms", "PowerNorm (T=512, B=32, C=1024 and T=2048, B=8, C=4096) and UnifiedNorm, with "
              "padding masks", ops=("power_norm", "unified_norm"), modes=("fwd", "fwd_bwd"), dtypes=_HEADLINE_DTYPES),
        Suite("region", "RegionNorm RN-B and RN-L at inpainting shapes (8x64x256x256, 8x256x64x64)",
              ops=("region_norm", "learnable_region_norm"), modes=("fwd", "fwd_bwd"),
              dtypes={"cuda": ("bf16", "fp32"), "cpu": ("fp32",)}),
        Suite("cpu", "the CPU tier against the best torch eager equivalent at ResNet "
              "(8x256x14x14, 256x256x3x3), ViT-B (1576x768 = 8 images x 197 tokens; PowerNorm and UnifiedNorm on "
              "the same 8 sequences of 197 tokens) and LLM (512x4096) shapes; the ops with no torch op (RegionNorm, "
              "PowerNorm, UnifiedNorm) against the eager reference, EvoNorm against timm's math in eager torch "
              "(--threads 1 for the single-thread numbers; SPD batch norm has its own suite, spd)",
              ops=("layer_norm", "rms_norm", "add_rms_norm", "batch_channel_norm", "weight_standardize",
                   "evo_norm2d_b0", "evo_norm2d_s0", "region_norm", "power_norm", "unified_norm"),
              modes=("fwd", "fwd_bwd"), dtypes={"cpu": ("fp32", "bf16"), "cuda": ("bf16",)},
              shapes={"cpu": {"rows": ("1576x768", "512x4096"), "nchw": ("8x256x14x14",),
                              "conv_weight": ("256x256x3x3",), "tokens_tbc": ("197x8x768",),
                              "tokens_bnc": ("8x197x768",)}},
              providers=("normlayers", "torch", "torch_fp32")),
        Suite("cpu_compile", "the composites (no torch op) under torch.compile on CPU: torch.compile of "
              "normlayers.functional against torch.compile of the plain reference, at the cpu suite's shapes",
              ops=("evo_norm2d_b0", "evo_norm2d_s0", "region_norm", "power_norm", "unified_norm"),
              modes=("fwd", "fwd_bwd"), dtypes={"cpu": ("fp32", "bf16"), "cuda": ("bf16",)},
              shapes={"cpu": {"nchw": ("8x256x14x14",), "tokens_tbc": ("197x8x768",), "tokens_bnc": ("8x197x768",)}},
              providers=("normlayers_compile", "torch_compile")),
        Suite("spd", "SPD batch normalization (GBW) on batches of SPD matrices", ops=("spd_batch_norm",),
              modes=("fwd", "fwd_bwd"), dtypes={"cuda": ("fp32",), "cpu": ("fp32",)}),
        Suite("gpu", "every op once, in bf16 and fp32, at one realistic shape per shape kind (row norms first): the "
              "first pass of tools/gpu_check.sh; on CPU, tiny shapes (its --dry-run)",
              ops=(*_ROW_NORMS, "layer_norm2d", "rms_norm2d", *_GROUP_NORMS, "batch_channel_norm", *_EVO_NORMS,
                   "region_norm", "learnable_region_norm", "power_norm", "unified_norm", "weight_standardize",
                   "spd_batch_norm"),
              modes=("fwd", "fwd_bwd"), dtypes={"cuda": ("bf16", "fp32"), "cpu": ("fp32",)},
              shapes={"cuda": {"rows": ("4096x4096",), "nchw": ("32x256x56x56",), "conv_weight": ("256x256x3x3",),
                               "tokens_tbc": ("512x32x1024",), "tokens_bnc": ("32x512x1024",), "spd": ("256x64",)},
                      "cpu": {"rows": ("3x40",), "nchw": ("2x32x3x3",), "conv_weight": ("4x3x3x3",),
                              "tokens_tbc": ("6x3x8",), "tokens_bnc": ("3x6x8",), "spd": ("5x3",)}}),
        Suite("row_widths", "RMSNorm and LayerNorm at M = 4096 over N = 256 ... 65536, forward and backward alone (the "
              "row norms' bandwidth targets)", ops=("rms_norm", "layer_norm"), modes=("fwd", "bwd"),
              dtypes=_HEADLINE_DTYPES,
              shapes={"cuda": {"rows": tuple(f"4096x{2**k}" for k in range(8, 17))},
                      "cpu": {"rows": ("2x256", "2x1024")}}),
    )
}
