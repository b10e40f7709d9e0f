"""Multi-head self- and cross-attention over image feature maps and token sequences."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionImpl = Literal["auto", "sdpa", "math"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    impl: AttentionImpl = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention softmax(q kᵀ / √d) v (Vaswani et al. 2017, Eq. 1).

    q: (B, h, N, d); k, v: (B, h, M, d); mask: (B, M) bool, True where a key may be attended.
    ``impl="sdpa"`` calls ``F.scaled_dot_product_attention`` (fused kernels on GPU);
    ``"math"`` is the explicit matmul-softmax, which measured faster on small CPU problems
    (``bench/train_throughput.py`` runs the default job with both: 188 vs 140 images/s, bf16); ``"auto"`` takes sdpa on CUDA and math elsewhere.
    """
    if impl == "auto":
        impl = "sdpa" if q.is_cuda else "math"
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, h, N, M)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1) @ v


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h·d) → (B, h, N, d)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) → (B, N, h·d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SpatialAttention(nn.Module):
    """Residual attention of a feature map's pixels over themselves or over context tokens.

    With ``context_dim=None`` it is self-attention (Ho et al. 2020 at 16×16); otherwise the
    queries come from pixels and the keys/values from the context tokens (cross-attention,
    Rombach et al. 2022, Eq. 3).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        context_dim: int | None = None,
        groups: int = 8,
        impl: AttentionImpl = "auto",
    ):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels={channels} not divisible by heads={heads}")
        self.heads, self.impl = heads, impl
        self.norm = nn.GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        kv_dim = channels if context_dim is None else context_dim
        self.to_kv = nn.Linear(kv_dim, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)  # the block starts as the identity
        nn.init.zeros_(self.out.bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        source = tokens if context is None else context  # (B, M, C_kv)
        mask = None if context is None else context_mask
        k, v = self.to_kv(source).chunk(2, dim=-1)
        q, k, v = (split_heads(z, self.heads) for z in (self.to_q(tokens), k, v))
        out = merge_heads(attention(q, k, v, mask, self.impl))  # (B, HW, C)
        return x + self.out(out).transpose(1, 2).reshape(b, c, h, w)
