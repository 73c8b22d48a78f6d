"""normlayers: normalization layers for PyTorch with fused Triton kernels and plain-PyTorch references."""

from normlayers import functional
from normlayers.backend import backend, get_backend, set_backend
from normlayers.nn import CRMSNorm, LayerNorm, RMSNorm

__version__ = "0.1.0"

__all__ = [
    "CRMSNorm",
    "LayerNorm",
    "RMSNorm",
    "backend",
    "functional",
    "get_backend",
    "set_backend",
]
