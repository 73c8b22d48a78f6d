"""normlayers: normalization layers for PyTorch with fused Triton kernels and plain-PyTorch references."""

from normlayers import backends, convert, functional
from normlayers.backends import backend, get_backend, set_backend
from normlayers.convert import plan_replacements, replace_norms, restore_norms
from normlayers.distributed import convert_sync
from normlayers.nn import (
    BatchChannelNorm2d,
    CRMSNorm,
    EvoNorm2dB0,
    EvoNorm2dB1,
    EvoNorm2dB2,
    EvoNorm2dS0,
    EvoNorm2dS0a,
    EvoNorm2dS1,
    EvoNorm2dS1a,
    EvoNorm2dS2,
    EvoNorm2dS2a,
    GroupNorm,
    LayerNorm,
    LayerNorm2d,
    LearnableRegionNorm2d,
    PowerNorm,
    RMSNorm,
    RMSNorm2d,
    RegionNorm2d,
    SPDBatchNorm,
    ScaledWSConv2d,
    UnifiedNorm,
    WSConv2d,
    reset_iters,
)

from normlayers._dtensor import register_sharding_rules_lazily as _register_sharding_rules_lazily

_register_sharding_rules_lazily()

__version__ = "0.1.0"

__all__ = [
    "BatchChannelNorm2d",
    "CRMSNorm",
    "EvoNorm2dB0",
    "EvoNorm2dB1",
    "EvoNorm2dB2",
    "EvoNorm2dS0",
    "EvoNorm2dS0a",
    "EvoNorm2dS1",
    "EvoNorm2dS1a",
    "EvoNorm2dS2",
    "EvoNorm2dS2a",
    "GroupNorm",
    "LayerNorm",
    "LayerNorm2d",
    "LearnableRegionNorm2d",
    "PowerNorm",
    "RMSNorm",
    "RMSNorm2d",
    "RegionNorm2d",
    "SPDBatchNorm",
    "ScaledWSConv2d",
    "UnifiedNorm",
    "WSConv2d",
    "backend",
    "backends",
    "convert",
    "convert_sync",
    "functional",
    "get_backend",
    "plan_replacements",
    "replace_norms",
    "reset_iters",
    "restore_norms",
    "set_backend",
]
