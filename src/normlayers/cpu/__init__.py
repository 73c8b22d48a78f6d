"""The CPU tier: what backend ``"auto"`` runs on CPU tensors.

The same math as :mod:`normlayers.reference`, at least as fast as PyTorch eager: ATen's fused kernels where they
compute exactly that math (``F.layer_norm``, ``F.batch_norm``, ``F.group_norm``, ``var_mean``), and elsewhere a
closed-form ``torch.autograd.Function`` (the backward the Triton kernels use) written with few passes over the data.
Everything here traces under ``torch.compile(fullgraph=True)``, so inductor can fuse it into C++. Statistics in fp32
(fp64 for fp64 input), the output rounded once, to the input's dtype, as in the reference. One module per family, the
same file names as :mod:`normlayers.nn`; argument checks live in :mod:`normlayers.functional`.
"""
