"""The normlayers modules, one file per family."""

from normlayers.nn.row_norms import CRMSNorm, LayerNorm, RMSNorm

__all__ = ["CRMSNorm", "LayerNorm", "RMSNorm"]
