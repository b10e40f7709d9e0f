"""Quantizers of the first-stage autoencoders: the vector quantizer of VQ-VAE / VQ-GAN and the
Gumbel-softmax relaxation of DALL·E's dVAE.

Notation (van den Oord et al. 2017, "Neural Discrete Representation Learning"):

| name | meaning | shape |
| --- | --- | --- |
| ``z_e`` | encoder output | (B, D, H, W) |
| ``e`` | codebook, one code ``e_k`` per row | (K, D) |
| ``z_q`` | quantized latent ``e_k`` with k = argmin_j ‖z_e − e_j‖² | (B, D, H, W) |
| ``N``, ``m`` | EMA cluster sizes and cluster sums (App. A.1) | (K,), (K, D) |

Both quantizers return a :class:`QuantizerOutput`. They are plain ``nn.Module`` s: the models
weight their losses and schedule the Gumbel temperature. Under ``torch.distributed`` the
vector quantizer's codebook statistics are reduced over ranks, so every rank keeps the same
codebook; single-process use needs no process group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    """What a quantizer returns.

    Attributes:
        z_q: quantized latent (B, D, H, W), differentiable with respect to the encoder output.
        loss: scalar quantizer loss (VQ: codebook + commitment, Eq. 3; Gumbel: KL to uniform).
        indices: code index per position (B, H, W), long.
        perplexity: scalar exp(entropy) of this batch's code usage, in [1, K].
    """

    z_q: Tensor
    loss: Tensor
    indices: Tensor
    perplexity: Tensor


# ----------------------------------------------------------------------------------------------
# Small pure helpers


def perplexity(counts: Tensor) -> Tensor:
    """exp(−Σ p log p) of the code usage ``counts`` (K,): K for uniform use, 1 for one code."""
    p = counts.float() / counts.sum().clamp(min=1)
    return torch.exp(-torch.special.xlogy(p, p).sum())


def nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest code in squared Euclidean distance for each row of ``z`` (N, D).

    ‖z − e‖² = ‖z‖² − 2 z·e + ‖e‖², computed in float32 even under autocast (a bf16 distance
    matrix mis-assigns close codes).
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, e = z.float(), codebook.float()
        distance = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.T + e.pow(2).sum(1)  # (N, K)
        return distance.argmin(dim=1)


def random_rows(z: Tensor, k: int) -> Tensor:
    """``k`` rows of ``z`` (N, D) drawn with the default torch RNG, without replacement if N ≥ k."""
    if z.shape[0] >= k:
        index = torch.randperm(z.shape[0], device=z.device)[:k]
    else:
        index = torch.randint(z.shape[0], (k,), device=z.device)
    return z[index]


def cluster_stats(z: Tensor, indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Per-code counts n_i (K,) and sums Σ_{j: k_j = i} z_j (K, D), in float32."""
    counts = torch.bincount(indices, minlength=num_codes).float()
    sums = torch.zeros(num_codes, z.shape[1], device=z.device).index_add_(0, indices, z.float())
    return counts, sums


def kmeans_plus_plus(z: Tensor, num_codes: int) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): data points drawn one by one with
    probability ∝ squared distance to the nearest point drawn so far (K, D).

    Plain random seeding puts two seeds in one cluster and none in another often (4 equal
    clusters, 4 seeds: 91% of the time), which Lloyd's iterations cannot undo.
    """
    centroids = [random_rows(z, 1)[0]]
    min_d2 = (z - centroids[0]).pow(2).sum(1)  # (N,)
    for _ in range(num_codes - 1):
        weights = torch.where(min_d2.sum() > 0, min_d2, 1.0)  # all seen: uniform (no host sync)
        c = z[torch.multinomial(weights, 1)[0]]
        centroids.append(c)
        min_d2 = torch.minimum(min_d2, (z - c).pow(2).sum(1))
    return torch.stack(centroids)  # (K, D)


def kmeans(z: Tensor, num_codes: int, iters: int, spherical: bool = False) -> Tensor:
    """Lloyd's k-means on the rows of ``z`` (N, D) from k-means++ seeds; returns (K, D).

    An empty cluster keeps its previous centroid. With ``spherical`` the centroids are
    re-normalised after each step (for the cosine lookup of Yu et al. 2021).
    """
    z = z.float()
    centroids = kmeans_plus_plus(z, num_codes)
    for _ in range(iters):
        counts, sums = cluster_stats(z, nearest_code(z, centroids), num_codes)
        means = sums / counts.clamp(min=1)[:, None]
        centroids = torch.where(counts[:, None] > 0, means, centroids)
        if spherical:
            centroids = F.normalize(centroids, dim=1)
    return centroids


def laplace_smoothed(cluster_size: Tensor, eps: float) -> Tensor:
    """N_i smoothed so no cluster is empty: (N_i + ε) / (Σ N + K ε) · Σ N (Sonnet VQ-VAE-EMA)."""
    total = cluster_size.sum()
    return (cluster_size + eps) / (total + cluster_size.numel() * eps) * total


# ----------------------------------------------------------------------------------------------
# Distributed helpers: no-ops without an initialised process group


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (so per-batch statistics cover the global batch)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_rank0_(tensor: Tensor) -> Tensor:
    """Overwrite ``tensor`` with rank 0's value in place (so random choices agree on all ranks)."""
    if is_distributed():
        dist.broadcast(tensor, src=0)
    return tensor


# ----------------------------------------------------------------------------------------------
# Input checks


def check_bchw(x: Tensor, channels: int, name: str, meaning: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be (B, {meaning}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name} has {x.shape[1]} channels but the quantizer has {meaning}={channels}"
        )


def check_indices(indices: Tensor, num_codes: int) -> None:
    if indices.dim() != 3 or indices.dtype != torch.long:
        raise ValueError(
            f"indices must be a (B, H, W) long tensor, got {indices.dtype} {tuple(indices.shape)}"
        )
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < num_codes:
        raise ValueError(
            f"indices must lie in [0, {num_codes}), got [{indices.min()}, {indices.max()}]"
        )


def check_num_codes(num_codes: int, code_dim: int) -> None:
    if num_codes < 2:
        raise ValueError(f"num_codes={num_codes} must be at least 2")
    if code_dim < 1:
        raise ValueError(f"code_dim={code_dim} must be at least 1")


# ----------------------------------------------------------------------------------------------
# VQ-VAE / VQ-GAN


class VectorQuantizer(nn.Module):
    """The vector quantizer of VQ-VAE (van den Oord et al. 2017) as used by VQ-GAN (Esser et al.
    2021), with the codebook practices that keep it from collapsing.

    * nearest-code lookup and the straight-through estimator z_q = z_e + sg[e_k − z_e] (Sec. 3.1);
    * loss ‖sg[z_e] − e‖² + β ‖z_e − sg[e]‖² (Eq. 3, squared errors averaged over elements);
    * ``ema``: the codebook follows exponential moving averages of cluster sizes and sums
      instead of the codebook loss (App. A.1); the codebook is then a buffer, not a parameter;
    * ``kmeans_init``: the first training batch initialises the codebook by k-means
      (Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021, SoundStream);
    * ``dead_code_threshold > 0``: codes whose EMA usage count per batch falls below the threshold
      are restarted on random encoder outputs of the current batch (Jukebox; SoundStream);
    * ``l2_normalize``: z_e and the codes are l2-normalised before the lookup, i.e. nearest code
      by cosine similarity (Yu et al. 2021, ViT-VQGAN). The straight-through gradient then
      passes through the normalisation of z_e.

    Codebook updates (EMA, k-means, restarts) happen in training mode only, under no_grad.
    """

    def __init__(
        self,
        *,
        num_codes: int,
        code_dim: int,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        l2_normalize: bool = False,
    ):
        super().__init__()
        check_num_codes(num_codes, code_dim)
        if beta < 0:
            raise ValueError(f"beta={beta} (commitment weight) must be >= 0")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        if eps <= 0:
            raise ValueError(f"eps={eps} (Laplace smoothing) must be > 0")
        if kmeans_iters < 1:
            raise ValueError(f"kmeans_iters={kmeans_iters} must be at least 1")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold={dead_code_threshold} must be >= 0 (0 = off)")
        self.num_codes, self.code_dim = num_codes, code_dim
        self.beta, self.ema, self.decay, self.eps = beta, ema, decay, eps
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold, self.l2_normalize = dead_code_threshold, l2_normalize

        e = torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes)  # (K, D)
        if ema:
            self.register_buffer("embedding", e)
            self.register_buffer("cluster_size", torch.ones(num_codes))  # N: one pseudo-count
            self.register_buffer("embed_sum", e.clone())  # m, so that e = m / N at the start
        else:
            self.embedding = nn.Parameter(e)
        self.register_buffer("kmeans_done", torch.tensor(False))
        self.register_buffer("usage", torch.full((num_codes,), float(dead_code_threshold)))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    @property
    def codebook(self) -> Tensor:
        """The codes e (K, D) the lookup uses (unit norm with ``l2_normalize``)."""
        e = self.embedding
        return F.normalize(e, dim=1) if self.l2_normalize else e

    def embed(self, indices: Tensor) -> Tensor:
        """Codes of a token map: (B, H, W) long → (B, D, H, W), for decoding tokens."""
        check_indices(indices, self.num_codes)
        return self.codebook[indices].permute(0, 3, 1, 2)  # (B, H, W, D) → (B, D, H, W)

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Quantize the encoder output ``z_e`` (B, D, H, W) to its nearest codes."""
        check_bchw(z_e, self.code_dim, "z_e", "code_dim")
        b, d, h, w = z_e.shape
        z = z_e.permute(0, 2, 3, 1).reshape(-1, d)  # (B·H·W, D)
        if self.l2_normalize:
            z = F.normalize(z, dim=1)
        if self.training and self.kmeans_init and not self.kmeans_done:
            self.init_kmeans_(z.detach())
        e = self.codebook
        indices = nearest_code(z.detach(), e)  # (B·H·W,)
        e_k = e[indices]  # (B·H·W, D)
        commitment = F.mse_loss(z, e_k.detach())
        loss = self.beta * commitment
        if not self.ema:
            loss = loss + F.mse_loss(e_k, z.detach())  # codebook term of Eq. 3
        counts = torch.bincount(indices, minlength=self.num_codes)
        if self.training:
            self.update_codebook_(z.detach(), indices)
        z_q = z + (e_k - z).detach()  # straight-through: d z_q / d z = identity
        z_q = z_q.reshape(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, H, W)
        return QuantizerOutput(z_q, loss, indices.reshape(b, h, w), perplexity(counts))

    @torch.no_grad()
    def update_codebook_(self, z: Tensor, indices: Tensor) -> None:
        """One training step of codebook bookkeeping on the flat encoder outputs ``z`` (N, D)."""
        counts, sums = cluster_stats(z, indices, self.num_codes)
        all_reduce_sum_(counts)  # every rank sees the global batch
        if self.ema:
            self.update_ema_(counts, all_reduce_sum_(sums))
        if self.dead_code_threshold > 0:
            self.restart_dead_codes_(z, counts)

    @torch.no_grad()
    def update_ema_(self, counts: Tensor, sums: Tensor) -> None:
        """EMA codebook update of van den Oord et al. 2017, App. A.1 (Eqs. 6–8).

        N_i ← γ N_i + (1 − γ) n_i;  m_i ← γ m_i + (1 − γ) Σ_j z_{i,j};  e_i ← m_i / N_i,
        with N Laplace-smoothed before the division so an unused code is never divided by 0.
        """
        self.cluster_size.lerp_(counts, 1 - self.decay)  # Eq. 6
        self.embed_sum.lerp_(sums, 1 - self.decay)  # Eq. 7
        n = laplace_smoothed(self.cluster_size, self.eps)
        self.embedding.copy_(self.embed_sum / n[:, None])  # Eq. 8

    @torch.no_grad()
    def restart_dead_codes_(self, z: Tensor, counts: Tensor) -> None:
        """Replace codes whose EMA usage count falls below the threshold by random rows of ``z``.

        The usage EMA starts (and a restarted code starts again) at the threshold, so a code dies
        once it is used less than ``dead_code_threshold`` times per batch on average. The new
        codes are drawn on rank 0 and broadcast; the usage is synced already (global counts).
        """
        self.usage.lerp_(counts, 1 - self.decay)
        dead = self.usage < self.dead_code_threshold  # (K,), equal on all ranks
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        new_codes = broadcast_from_rank0_(random_rows(z, num_dead).float().contiguous())
        self.set_codes_(dead, new_codes)
        self.usage[dead] = self.dead_code_threshold
        self.restarts += num_dead

    @torch.no_grad()
    def init_kmeans_(self, z: Tensor) -> None:
        """Initialise all codes by k-means on this batch (rank 0's result, broadcast)."""
        centroids = kmeans(z, self.num_codes, self.kmeans_iters, spherical=self.l2_normalize)
        self.set_codes_(
            torch.ones_like(self.usage, dtype=torch.bool), broadcast_from_rank0_(centroids)
        )
        self.kmeans_done.fill_(True)

    @torch.no_grad()
    def set_codes_(self, which: Tensor, codes: Tensor) -> None:
        """Overwrite the codes selected by the mask ``which`` (K,); EMA state restarts with them.

        An optimizer's moments for these rows (non-EMA codebook) are left as they are.
        """
        # .data: a Parameter's in-place change must not invalidate this step's autograd graph
        self.embedding.data[which] = codes.to(self.embedding.dtype)
        if self.ema:
            self.cluster_size[which] = 1.0  # one pseudo-count, as at construction
            self.embed_sum[which] = codes.to(self.embed_sum.dtype)


# ----------------------------------------------------------------------------------------------
# DALL·E dVAE


class GumbelQuantizer(nn.Module):
    """The Gumbel-softmax relaxation of DALL·E's discrete VAE (Ramesh et al. 2021, Sec. 2.1;
    Jang et al. 2017; Maddison et al. 2017).

    The encoder gives logits over K codes per position; z_q = Σ_k y_k e_k with
    y = softmax((logits + g) / τ), g ~ Gumbel(0, 1). With ``hard`` the forward pass uses the
    one-hot of argmax y and the backward pass the soft y (straight-through Gumbel, Jang et al.
    2017, Sec. 2.2). In eval mode there is no noise: y is the one-hot of argmax logits.
    The loss is the KL of q(· | x) = softmax(logits) to the uniform prior (the ELBO's prior term,
    Eq. 1 of Ramesh et al.); the model schedules τ and the KL weight.
    """

    def __init__(self, *, num_codes: int, code_dim: int, hard: bool = False):
        super().__init__()
        check_num_codes(num_codes, code_dim)
        self.num_codes, self.code_dim, self.hard = num_codes, code_dim, hard
        self.embedding = nn.Parameter(torch.randn(num_codes, code_dim))  # e (K, D)

    @property
    def codebook(self) -> Tensor:
        """The codes e (K, D)."""
        return self.embedding

    def embed(self, indices: Tensor) -> Tensor:
        """Codes of a token map: (B, H, W) long → (B, D, H, W), for decoding tokens."""
        check_indices(indices, self.num_codes)
        return self.embedding[indices].permute(0, 3, 1, 2)  # (B, H, W, D) → (B, D, H, W)

    def forward(
        self, logits: Tensor, temperature: float, generator: torch.Generator | None = None
    ) -> QuantizerOutput:
        """Relaxed (training) or hard (eval) code assignment from ``logits`` (B, K, H, W)."""
        check_bchw(logits, self.num_codes, "logits", "num_codes")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        indices = logits.argmax(dim=1)  # (B, H, W)
        if self.training:
            y = self.relaxed_one_hot(logits, temperature, generator)
        else:
            y = F.one_hot(indices, self.num_codes).permute(0, 3, 1, 2).to(logits.dtype)
        z_q = torch.einsum("bkhw,kd->bdhw", y, self.embedding)
        counts = torch.bincount(indices.flatten(), minlength=self.num_codes)
        return QuantizerOutput(z_q, kl_to_uniform(logits), indices, perplexity(counts))

    def relaxed_one_hot(
        self, logits: Tensor, temperature: float, generator: torch.Generator | None
    ) -> Tensor:
        """y = softmax((logits + g) / τ) over K (B, K, H, W); its straight-through one-hot if hard."""
        g = -torch.empty_like(logits).exponential_(generator=generator).log()  # Gumbel(0, 1)
        y = F.softmax((logits + g) / temperature, dim=1)
        if not self.hard:
            return y
        one_hot = F.one_hot(y.argmax(dim=1), self.num_codes).permute(0, 3, 1, 2).to(y.dtype)
        return one_hot + y - y.detach()


def kl_to_uniform(logits: Tensor) -> Tensor:
    """KL(q ‖ uniform) = Σ_k q_k log(q_k K) with q = softmax(logits) over dim 1, mean over
    positions: 0 for uniform q, log K for one-hot q."""
    log_q = F.log_softmax(logits.float(), dim=1)  # (B, K, H, W)
    return (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(1).mean()
