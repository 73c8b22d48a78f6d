"""The normlayers modules, one file per family."""

from normlayers.nn.batch_channel import BatchChannelNorm2d
from normlayers.nn.channel_norms import LayerNorm2d, RMSNorm2d
from normlayers.nn.evo_norm import (
    EvoNorm2dB0,
    EvoNorm2dB1,
    EvoNorm2dB2,
    EvoNorm2dS0,
    EvoNorm2dS0a,
    EvoNorm2dS1,
    EvoNorm2dS1a,
    EvoNorm2dS2,
    EvoNorm2dS2a,
)
from normlayers.nn.group_norm import GroupNorm
from normlayers.nn.power_norm import PowerNorm, reset_iters
from normlayers.nn.region_norm import LearnableRegionNorm2d, RegionNorm2d
from normlayers.nn.row_norms import CRMSNorm, LayerNorm, RMSNorm
from normlayers.nn.spd_batch_norm import SPDBatchNorm
from normlayers.nn.unified_norm import UnifiedNorm
from normlayers.nn.weight_std import ScaledWSConv2d, WSConv2d

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
    "reset_iters",
]
