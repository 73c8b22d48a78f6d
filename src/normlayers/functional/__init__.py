"""Functional forms of every normlayers norm, in ``torch.nn.functional``'s argument order.

Each function validates its arguments, then runs the Triton path (:mod:`normlayers.ops`) or the plain-PyTorch
reference (:mod:`normlayers.reference`) as :mod:`normlayers.backend` decides. One module per family; every public
name is importable from ``normlayers.functional``.
"""

from normlayers._checks import as_shape as _as_shape
from normlayers._checks import check_epsilon as _check_epsilon
from normlayers._checks import check_nonnegative_int as _check_nonnegative_int
from normlayers._checks import check_positive_epsilon as _check_positive_epsilon
from normlayers._checks import check_unit_interval as _check_unit_interval
from normlayers.functional.batch_channel import batch_channel_norm
from normlayers.functional.evo_norm import (
    _evo_check_momentum,
    _evo_check_scalars,
    _evo_norm_b,
    _evo_norm_s,
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
from normlayers.functional.region_norms import (
    _REGION_AFFINES,
    _REGION_STATS,
    _check_region_eps,
    _region_choice,
    _region_eps_mode,
    learnable_region_norm,
    region_norm,
)
from normlayers.functional.row_norms import add_crms_norm, add_layer_norm, add_rms_norm, crms_norm, layer_norm, rms_norm
from normlayers.functional.spd import spd_batch_norm
from normlayers.functional.token_norms import power_norm, unified_norm
from normlayers.functional.weight_std import (
    WS_DEFAULT_VARIANT,
    _check_conv_input,
    _check_ws_eps,
    _check_ws_finite,
    _check_ws_weight,
    _ws_variant,
    scaled_weight_standardize,
    scaled_ws_conv2d,
    weight_standardize,
    ws_conv2d,
)

__all__ = [
    "layer_norm",
    "rms_norm",
    "crms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "add_crms_norm",
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
]
