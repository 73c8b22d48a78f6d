"""Functional forms of every normlayers norm, in ``torch.nn.functional``'s argument order.

Each function validates its arguments, then runs the Triton path (:mod:`normlayers.ops`) or the plain-PyTorch
reference (:mod:`normlayers.reference`) as :mod:`normlayers.backends` decides. One module per family (``row_norms``,
``batch_channel``, ``weight_std``, ``evo_norm``, ``token_norms``, ``region_norms``, ``spd``; the last two are not
named after a function, which they would shadow); every public name is importable from ``normlayers.functional``.
"""

from normlayers.functional.batch_channel import batch_channel_norm
from normlayers.functional.channel_norms import layer_norm2d, rms_norm2d
from normlayers.functional.evo_norm import (
    evo_norm2d_b0,
    evo_norm2d_b1,
    evo_norm2d_b2,
    evo_norm2d_s0,
    evo_norm2d_s0a,
    evo_norm2d_s1,
    evo_norm2d_s1a,
    evo_norm2d_s2,
    evo_norm2d_s2a,
)
from normlayers.functional.group_norm import group_norm
from normlayers.functional.region_norms import learnable_region_norm, region_norm
from normlayers.functional.row_norms import add_crms_norm, add_layer_norm, add_rms_norm, crms_norm, layer_norm, rms_norm
from normlayers.functional.spd import spd_batch_norm
from normlayers.functional.token_norms import power_norm, unified_norm
from normlayers.functional.weight_std import WS_DEFAULT_VARIANT as WS_DEFAULT_VARIANT
from normlayers.functional.weight_std import scaled_weight_standardize, scaled_ws_conv2d, weight_standardize, ws_conv2d

__all__ = [
    "layer_norm",
    "rms_norm",
    "crms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "add_crms_norm",
    "layer_norm2d",
    "rms_norm2d",
    "batch_channel_norm",
    "weight_standardize",
    "scaled_weight_standardize",
    "ws_conv2d",
    "scaled_ws_conv2d",
    "evo_norm2d_b0",
    "evo_norm2d_b1",
    "evo_norm2d_b2",
    "evo_norm2d_s0",
    "evo_norm2d_s0a",
    "evo_norm2d_s1",
    "evo_norm2d_s1a",
    "evo_norm2d_s2",
    "evo_norm2d_s2a",
    "spd_batch_norm",
    "region_norm",
    "learnable_region_norm",
    "power_norm",
    "unified_norm",
    "group_norm",
]
