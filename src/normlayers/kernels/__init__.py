"""Triton kernels and their launchers, one file per family (same names as ``nn/``). Imported lazily: importing
``normlayers`` does not import triton."""
