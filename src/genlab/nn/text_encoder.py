"""A small trainable Transformer text encoder over token ids (CLIP / Imagen style)."""

from __future__ import annotations

import torch
from torch import nn

from genlab.nn.checkpointing import run_block


class TransformerTextEncoder(nn.Module):
    """Token + learned position embeddings, pre-LN Transformer encoder layers, final LayerNorm.

    Returns the per-token features for cross-attention and their mean over real tokens as the
    pooled vector (the pooled text embedding that Imagen adds to the timestep embedding).
    ``gradient_checkpointing`` recomputes each layer in the backward pass
    (genlab/nn/checkpointing.py).
    """

    def __init__(
        self,
        *,
        vocab_size: int = 512,
        context_length: int = 32,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.vocab_size, self.context_length, self.width = vocab_size, context_length, width
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(context_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask: (B, L) → tokens (B, L, width), pooled (B, width)."""
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]  # (B, L, W)
        for layer in self.encoder.layers:  # nn.TransformerEncoder's loop, one layer at a time
            x = run_block(layer, x, src_key_padding_mask=~mask, enabled=self.gradient_checkpointing)
        x = self.norm(x)
        weights = mask.to(x.dtype)[..., None]  # (B, L, 1)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return x, pooled

    def fsdp_units(self) -> list[nn.Module]:
        """The layers that FSDP shards one by one (genlab/utils/sharding.py)."""
        return list(self.encoder.layers)
