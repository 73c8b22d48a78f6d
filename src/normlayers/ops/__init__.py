"""``torch.library`` custom ops (``normlayers::<family>_fwd`` / ``_bwd``) wrapping the Triton kernels."""
