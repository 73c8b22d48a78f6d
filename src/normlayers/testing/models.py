"""Small reference models for the tests and examples (not part of the layer library's API).

:class:`TransformerLM` is a GPT-style decoder written for reading: every linear map and norm is a named submodule, so
:func:`normlayers.replace_norms` and the conversions in :mod:`normlayers.convert` can be demonstrated on it without
third-party code. It describes its own residual stream (:meth:`TransformerLM.prenorm_spec`), as any model may for
:func:`normlayers.convert.prenorm_to_rmsnorm`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from normlayers.convert.prenorm import PreNormSpec, token_inputs

__all__ = ["TransformerBlock", "TransformerLM"]

NormLayer = Callable[[int], nn.Module]


class _Attention(nn.Module):
    """Causal multi-head self-attention with a fused ``qkv`` projection and an output projection ``proj``."""

    def __init__(self, d_model: int, n_heads: int, bias: bool, dropout: float, factory_kwargs: dict) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias, **factory_kwargs)
        self.proj = nn.Linear(d_model, d_model, bias=bias, **factory_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        batch, length = x.shape[:2]
        # the head width comes from the projection, not from x: the stream may be compressed (Pre-CRMSNorm)
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))


class _MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool, factory_kwargs: dict) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias, **factory_kwargs)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias, **factory_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """One block: attention and MLP sublayers with norms ``norm1``/``norm2``, Pre-LN (``x + f(norm(x))``) when
    ``norm_first`` else Post-LN (``norm(x + f(x))``)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, norm_first: bool = True, bias: bool = True,
                 dropout: float = 0.0, norm_layer: NormLayer = nn.LayerNorm, device=None, dtype=None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.norm_first = norm_first
        self.norm1 = norm_layer(d_model, **factory_kwargs)
        self.attn = _Attention(d_model, n_heads, bias, dropout, factory_kwargs)
        self.norm2 = norm_layer(d_model, **factory_kwargs)
        self.mlp = _MLP(d_model, d_ff, bias, factory_kwargs)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_first:
            x = x + self.dropout(self.attn(self.norm1(x)))
            return x + self.dropout(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.attn(x)))
        return self.norm2(x + self.dropout(self.mlp(x)))


class TransformerLM(nn.Module):
    r"""A small GPT-style causal language model: token and learned position embeddings, ``n_layers``
    :class:`TransformerBlock`\ s, a final norm (Pre-LN only) and a linear head.

    Args:
        vocab_size (int): tokens. Default: ``256``.
        d_model (int): the residual-stream width. Default: ``64``.
        n_heads (int): attention heads; must divide ``d_model``. Default: ``4``.
        n_layers (int): blocks. Default: ``2``.
        d_ff (int, optional): the MLP width. Default: ``4 * d_model``.
        max_seq_len (int): positions. Default: ``128``.
        norm_first (bool, keyword-only): Pre-LN blocks and a final norm; ``False`` gives Post-LN blocks and no final
            norm. Default: ``True``.
        bias (bool, keyword-only): biases in the linear maps. Default: ``True``.
        dropout (float, keyword-only): on attention weights and residual branches. Default: ``0.0``.
        tie_embeddings (bool, keyword-only): the head shares the token-embedding weight. Default: ``False``.
        norm_layer (callable, keyword-only): builds each norm from the width. Default: :class:`torch.nn.LayerNorm`.
        device, dtype (keyword-only): factory kwargs.

    Shape:
        - Input: :math:`(N, T)` token ids, ``T <= max_seq_len``.
        - Output: :math:`(N, T, \text{vocab\_size})` logits.

    Examples::

        >>> model = normlayers.testing.models.TransformerLM(vocab_size=100, d_model=32, n_heads=2)
        >>> logits = model(torch.randint(0, 100, (2, 16)))
    """

    def __init__(self, vocab_size: int = 256, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 d_ff: Optional[int] = None, max_seq_len: int = 128, *, norm_first: bool = True, bias: bool = True,
                 dropout: float = 0.0, tie_embeddings: bool = False, norm_layer: NormLayer = nn.LayerNorm,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.norm_first = norm_first
        self.tok_emb = nn.Embedding(vocab_size, d_model, **factory_kwargs)
        self.pos_emb = nn.Embedding(max_seq_len, d_model, **factory_kwargs)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff or 4 * d_model, norm_first=norm_first, bias=bias,
                             dropout=dropout, norm_layer=norm_layer, **factory_kwargs)
            for _ in range(n_layers))
        self.norm = norm_layer(d_model, **factory_kwargs) if norm_first else nn.Identity()
        self.head = nn.Linear(d_model, vocab_size, bias=False, **factory_kwargs)
        if tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (N, T), got {list(tokens.shape)}")
        if tokens.shape[1] > self.pos_emb.num_embeddings:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {self.pos_emb.num_embeddings}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def prenorm_spec(self) -> PreNormSpec:
        """Where this model writes and reads its residual stream, for the Pre-LN conversions of
        :mod:`normlayers.convert` (which call this method). Post-LN blocks are refused: their norms read the sum of
        the stream and a branch."""
        for i, block in enumerate(self.blocks):
            if not block.norm_first:
                raise ValueError(f"blocks.{i} is a Post-LN block (norm_first=False): its norms read the sum of the "
                                 f"stream and a branch, so the stream is not read only through norms; the conversion "
                                 f"needs a Pre-LN model")
        writers, norms = ["tok_emb", "pos_emb"], {}
        for i in range(len(self.blocks)):
            writers += [f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc2"]
            norms[f"blocks.{i}.norm1"] = [f"blocks.{i}.attn.qkv"]
            norms[f"blocks.{i}.norm2"] = [f"blocks.{i}.mlp.fc1"]
        norms["norm"] = ["head"]
        tokens = token_inputs(self.tok_emb.num_embeddings, min(8, self.pos_emb.num_embeddings))
        return PreNormSpec(self.tok_emb.embedding_dim, writers, norms, example_inputs=tokens)
