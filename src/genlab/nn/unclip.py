"""The networks of unCLIP (DALL·E 2, Ramesh et al. 2022) that the shared UNet does not provide.

* :class:`PriorTransformer` — the diffusion prior's denoiser (§2.1, "Diffusion prior"): a
  decoder-only Transformer with a causal attention mask over the sequence

      [text tokens (L) ; text embedding ; timestep ; noised image embedding ; query],

  whose output at the final (query) position is the prediction for the image embedding (x0, ε
  or v, as the model's parametrization says). The text tokens and the text embedding are the
  CLIP text tower's token features and the caption's CLIP embedding. Padded text positions are
  masked as keys; every position also attends to itself, so that a row whose text is dropped
  entirely stays finite. The null condition of classifier-free guidance (``drop``) hides every
  text token and replaces the text embedding by a learned one.
* :class:`EmbeddingConditioning` — how the decoder reads a CLIP image embedding (§2.1,
  "Decoder", after GLIDE): projected into ``tokens`` extra context tokens for the UNet's
  cross-attention and into a vector added to its timestep embedding. A learned null embedding
  replaces the CLIP embedding where it is dropped (the paper: "set to zero or a learned
  embedding" 10% of the time).
"""

from __future__ import annotations

import torch
from torch import nn

from genlab.nn.checkpointing import run_block
from genlab.nn.embeddings import TimestepEmbedding
from genlab.nn.transformer import Block, init_weights

EXTRA_POSITIONS = 4  # text embedding, timestep, noised image embedding, query


class PriorTransformer(nn.Module):
    """Denoiser of CLIP image embeddings given a caption's CLIP token features and embedding.

    Args:
        embed_dim: d, the CLIP embedding width (input and output).
        text_width: the CLIP text tower's token feature width.
        context_length: the most text tokens (the CLIP text tower's context length).
        width, layers, heads: the Transformer's size.
        dropout: dropout in attention and MLPs.
        gradient_checkpointing: recompute each block in the backward pass
            (genlab/nn/checkpointing.py).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        text_width: int,
        context_length: int,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        if width % heads:
            raise ValueError(f"prior width={width} not divisible by heads={heads}")
        self.embed_dim, self.context_length = embed_dim, context_length
        self.text_in = nn.Linear(text_width, width)
        self.text_embed_in = nn.Linear(embed_dim, width)
        self.x_in = nn.Linear(embed_dim, width)
        self.time_embed = TimestepEmbedding(width, width)
        self.query = nn.Parameter(torch.zeros(width))
        self.null_text_embed = nn.Parameter(torch.zeros(embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(context_length + EXTRA_POSITIONS, width))
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.query, std=0.02)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        text_embed: torch.Tensor,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t: (B, d) noised embeddings; t: (B,); text_tokens (B, L, text_width) with their
        mask (B, L) (True = real); text_embed (B, d); drop (B,) bool, True for the null
        condition → the prediction (B, d)."""
        b, length = text_mask.shape
        text_mask = text_mask.bool()
        if drop is not None:
            drop = drop.to(text_mask.device).bool()
            text_mask = text_mask & ~drop[:, None]
            null = self.null_text_embed.to(text_embed.dtype)
            text_embed = torch.where(drop[:, None], null, text_embed)
        if length > self.context_length:
            raise ValueError(
                f"{length} text tokens, but the prior was built for context_length="
                f"{self.context_length}"
            )
        dtype = self.x_in.weight.dtype
        seq = torch.cat(
            [
                self.text_in(text_tokens.to(dtype)),  # (B, L, W)
                self.text_embed_in(text_embed.to(dtype))[:, None],  # (B, 1, W)
                self.time_embed(t)[:, None],
                self.x_in(x_t.to(dtype))[:, None],
                self.query.expand(b, 1, -1),
            ],
            dim=1,
        )  # (B, S = L + 4, W)
        s = seq.shape[1]
        seq = seq + self.pos_embed[:s].to(seq.dtype)
        keys = torch.cat([text_mask, text_mask.new_ones(b, EXTRA_POSITIONS)], dim=1)
        causal = torch.ones(s, s, dtype=torch.bool, device=seq.device).tril()
        self_only = torch.eye(s, dtype=torch.bool, device=seq.device)
        mask = (causal & keys[:, None, :]) | self_only  # (B, S, S): query row, key column
        mask = mask[:, None]  # (B, 1, S, S), broadcast over heads
        for block in self.blocks:
            seq = run_block(block, seq, mask, enabled=self.gradient_checkpointing)
        return self.out(self.norm(seq[:, -1]))  # (B, d)

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks that FSDP shards one by one (genlab/utils/sharding.py)."""
        return list(self.blocks)


class EmbeddingConditioning(nn.Module):
    """A CLIP image embedding as ``tokens`` context tokens and a timestep-embedding vector.

    Args:
        embed_dim: d, the CLIP embedding width.
        tokens: the number of context tokens it becomes (DALL·E 2: four).
        context_dim: the width of the UNet's context tokens.
        cond_dim: the width of the UNet's pooled condition vector.
    """

    def __init__(self, *, embed_dim: int, tokens: int, context_dim: int, cond_dim: int):
        super().__init__()
        if tokens < 1:
            raise ValueError(f"model.embed_tokens={tokens} must be at least 1")
        self.embed_dim, self.tokens, self.context_dim = embed_dim, tokens, context_dim
        self.null = nn.Parameter(torch.zeros(embed_dim))
        self.to_tokens = nn.Linear(embed_dim, tokens * context_dim)
        self.to_cond = nn.Linear(embed_dim, cond_dim)

    def forward(
        self, embeds: torch.Tensor, drop: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds (B, d), drop (B,) bool (True: the null embedding) → tokens (B, tokens,
        context_dim) and a vector (B, cond_dim)."""
        dtype = self.to_tokens.weight.dtype
        z = embeds.to(dtype)
        if drop is not None:
            z = torch.where(drop[:, None].to(z.device), self.null.to(dtype), z)
        tokens = self.to_tokens(z).view(len(z), self.tokens, self.context_dim)
        return tokens, self.to_cond(z)
