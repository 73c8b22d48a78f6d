"""Model surgery: swap norms (:func:`replace_norms`), convert Pre-LN transformers exactly to Pre-RMSNorm /
Pre-CRMSNorm (:func:`prenorm_to_rmsnorm`, :func:`prenorm_to_crmsnorm`), fold eval-mode norms for inference
(:func:`fold_norms`), fuse a GroupNorm and the activation after it (:func:`fuse_group_norm_act`,
:func:`fuse_group_norm_act_traced`).

A package rather than a single ``convert.py``: the three parts share no code and together are over a
thousand lines; ``normlayers.convert.<name>`` is the same public path either way.
"""

from normlayers.convert.fold import fold_norms
from normlayers.convert.fuse_act import fuse_group_norm_act, fuse_group_norm_act_traced
from normlayers.convert.prenorm import (
    OutputRMSNorm,
    PreNormSpec,
    RecentredNorm,
    prenorm_spec,
    prenorm_to_crmsnorm,
    prenorm_to_rmsnorm,
)
from normlayers.convert.replace import (
    DEFAULT_MAPPING,
    Replacement,
    plan_replacements,
    replace_norms,
    restore_norms,
    timm_mapping,
)

__all__ = [
    "DEFAULT_MAPPING",
    "OutputRMSNorm",
    "PreNormSpec",
    "RecentredNorm",
    "Replacement",
    "fold_norms",
    "fuse_group_norm_act",
    "fuse_group_norm_act_traced",
    "plan_replacements",
    "prenorm_spec",
    "prenorm_to_crmsnorm",
    "prenorm_to_rmsnorm",
    "replace_norms",
    "restore_norms",
    "timm_mapping",
]
