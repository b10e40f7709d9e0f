"""A decoder-only Transformer over one stream of [text tokens ; image tokens] (DALL·E, Ramesh et
al. 2021, §2.2 and App. B), with a key/value cache for sampling and the paper's sparse image
attention patterns.

Notation: L text positions, an h × w grid of image tokens (N = h·w), T = L + N positions in all.
The network reads the first T − 1 of them (the last image token is never an input) and predicts
the token that follows each one. Positions are embedded with learned text positions and, for the
image grid, learned row + column embeddings (App. B.1).

Attention masks. Text positions attend causally to text. Image positions attend to every text
position and, among image positions, to earlier ones by the layer's pattern (``image_attention``,
cycled over the layers; App. B.1, Fig. 11, after Child et al. 2019):

* ``full``: every earlier image position (dense causal attention);
* ``row``: the last w image positions in raster order — the current row so far and the end of the
  row above (a band of the row's width);
* ``column``: earlier positions of the same column;
* ``conv``: earlier positions in a k × k window centred on the position (k = ``conv_kernel``;
  11 × 11 at 32 × 32 in the paper, used in its last layer).

Every position also attends to itself. The masks are boolean (T, T) buffers, True where a query
(row) may attend to a key (column); attention runs through ``scaled_dot_product_attention``.

The cache (:class:`KVCache`) holds each layer's keys and values of the positions seen so far, so
that decoding a new position costs one position's work; the query of position i uses row i of the
same masks, so cached and uncached decoding compute the same function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genlab.nn.checkpointing import run_block

ImageAttention = Literal["full", "row", "column", "conv"]
PATTERNS = ("full", "row", "column", "conv")


def attention_mask(
    text_length: int, grid: int, pattern: ImageAttention, *, conv_kernel: int = 11
) -> torch.Tensor:
    """The (T, T) boolean mask of one layer: True where query i may attend to key j (module doc).

    ``grid`` is the side of the square image grid (h = w = grid).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"image attention pattern {pattern!r} must be one of {PATTERNS}")
    n = grid * grid
    total = text_length + n
    mask = torch.ones(total, total).tril().bool()  # causal everywhere, (T, T)
    pos = torch.arange(n)
    row, col = pos // grid, pos % grid
    before = pos[:, None] >= pos[None, :]  # key not after the query, (N, N)
    if pattern == "full":
        allowed = before
    elif pattern == "row":
        allowed = before & (pos[:, None] - pos[None, :] < grid)
    elif pattern == "column":
        allowed = before & (col[:, None] == col[None, :])
    else:
        half = conv_kernel // 2
        near_rows = (row[:, None] - row[None, :]).abs() <= half
        near_cols = (col[:, None] - col[None, :]).abs() <= half
        allowed = before & near_rows & near_cols
    mask[text_length:, text_length:] = allowed
    return mask


class KVCache:
    """Keys and values of every layer for the positions decoded so far.

    ``keys[l]`` / ``values[l]``: (B, heads, T_max, d), filled up to ``length``; allocated at the
    first update, in the dtype and on the device of the keys it is given.
    """

    def __init__(self, layers: int, max_length: int):
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the new positions' k, v (B, heads, t, d) at [length, length + t) and return the
        keys and values of positions [0, length + t)."""
        if self.keys[layer] is None:
            b, h, _, d = k.shape
            self.keys[layer] = k.new_zeros(b, h, self.max_length, d)
            self.values[layer] = v.new_zeros(b, h, self.max_length, d)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention under a given boolean mask, optionally through a KV cache."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"transformer width={width} not divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """x: (B, t, width) at positions [s, s + t); mask: (t, s + t) rows of those queries."""
        b, t, width = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, t, d)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, h, s + t, d)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, t, d)
        return self.out(y.transpose(1, 2).reshape(b, t, width))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(LN(x)), then x + MLP(LN(x)) (GPT-2 layout)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x, mask, cache=None, layer=0):
        x = x + self.attn(self.norm1(x), mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class DalleTransformer(nn.Module):
    """Decoder-only Transformer over [text ; image] tokens with DALL·E's position embeddings.

    Args:
        vocab_size: rows of the shared token embedding (text + per-position pads + image codes).
        text_length: L, the text positions.
        grid: the image token grid's side (h = w = grid).
        width, layers, heads: the Transformer's size.
        image_attention: the image-to-image pattern of each layer, cycled over the layers
            (``["row", "column", "row", "row"]`` with a last ``conv`` is the paper's; ``["full"]``
            is dense causal attention).
        conv_kernel: k of the ``conv`` pattern.
        dropout: residual, MLP and attention dropout.
        gradient_checkpointing: recompute each block in the backward pass instead of keeping
            its activations (genlab/nn/checkpointing.py; never with a KV cache).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        text_length: int,
        grid: int,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        image_attention: Sequence[ImageAttention] = ("full",),
        conv_kernel: int = 11,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        if not image_attention:
            raise ValueError("model.net.image_attention needs at least one pattern")
        self.vocab_size, self.text_length, self.grid = vocab_size, text_length, grid
        self.width, self.heads, self.layers = width, heads, layers
        self.length = text_length + grid * grid  # T
        self.token_embed = nn.Embedding(vocab_size, width)
        self.text_pos = nn.Parameter(torch.randn(text_length, width) * 0.02)
        self.row_pos = nn.Parameter(torch.randn(grid, width) * 0.02)
        self.col_pos = nn.Parameter(torch.randn(grid, width) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.patterns = [image_attention[i % len(image_attention)] for i in range(layers)]
        masks = {
            p: attention_mask(text_length, grid, p, conv_kernel=conv_kernel)
            for p in set(self.patterns)
        }
        for name, mask in masks.items():
            self.register_buffer(f"mask_{name}", mask, persistent=False)
        self.apply(init_weights)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 * layers)
            for proj in (block.attn.out, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * layers))

    def positions(self, start: int, end: int) -> torch.Tensor:
        """Position embeddings of positions [start, end), (end − start, width)."""
        grid_rows = self.row_pos[:, None, :] + self.col_pos[None, :, :]  # (h, w, width)
        table = torch.cat([self.text_pos, grid_rows.reshape(-1, self.width)])  # (T, width)
        return table[start:end]

    def mask(self, layer: int) -> torch.Tensor:
        return getattr(self, f"mask_{self.patterns[layer]}")

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, t, vocab) of the tokens that follow ``ids`` (B, t).

        Without a cache ``ids`` are positions [0, t); with one they continue the cached positions
        [s, s + t), s = ``cache.length``, which then advances by t.
        """
        start = 0 if cache is None else cache.length
        end = start + ids.shape[1]
        if end > self.length:
            raise ValueError(f"{end} positions exceed the transformer's {self.length}")
        x = self.drop(self.token_embed(ids) + self.positions(start, end))  # (B, t, width)
        checkpointed = self.gradient_checkpointing and cache is None
        for i, block in enumerate(self.blocks):
            x = run_block(block, x, self.mask(i)[start:end, :end], cache, i, enabled=checkpointed)
        if cache is not None:
            cache.length = end
        return self.head(self.norm(x))

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks that FSDP shards one by one (genlab/utils/sharding.py)."""
        return list(self.blocks)

    def new_cache(self) -> KVCache:
        """An empty cache for decoding with this network."""
        return KVCache(self.layers, self.length)


def init_weights(module: nn.Module) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
