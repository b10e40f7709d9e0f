"""What the autoregressive models over codes (DALL·E, the VQ prior) share: the frozen discrete
first stage they read and write codes with (loaded once, kept out of the model's weights, checked
on load), and token sampling: guidance on logits, temperature / top-k / top-p, and the decoding
loop that draws one position at a time through the KV cache."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from genlab.utils import progress
from genlab.utils.checkpoint import load_frozen
from genlab.utils.io import file_version

FROZEN_KEY = "genlab_frozen_parts"  # paths and SHA-256 of the frozen parts (first stage, CLIP)


def load_code_stage(tokenizer_ckpt: str, image_size: int) -> tuple[nn.Module, dict[str, str]]:
    """The frozen first stage of ``tokenizer_ckpt`` (a dvae, vqgan or vqvae checkpoint) and its
    record (path and SHA-256), refusing one trained at another resolution."""
    first_stage = load_frozen(
        tokenizer_ckpt,
        key="model.tokenizer_ckpt",
        needs=("encode_indices", "decode_indices", "num_codes", "latent_size"),
        hint="use a dvae, vqgan or vqvae checkpoint (python src/train.py experiment=vqgan_shapes)",
    )
    if image_size != first_stage.image_size:
        raise ValueError(
            f"model.image_size={image_size} but the first stage {tokenizer_ckpt} was trained "
            f"at {first_stage.image_size} px"
        )
    return first_stage, {"path": str(tokenizer_ckpt), "version": file_version(tokenizer_ckpt)}


def check_code_stage(checkpoint: dict[str, Any], current: dict[str, str], model: str) -> None:
    """Refuse a checkpoint whose first stage file changed since ``model`` was trained on it."""
    saved = checkpoint.get(FROZEN_KEY, {}).get("first_stage", {}).get("version")
    if saved is not None and saved != current["version"]:
        raise ValueError(
            f"the first stage {current['path']} has changed since this {model} was trained "
            f"(sha256 {current['version']}, trained on {saved}): its tokens no longer match; "
            "put the original file back"
        )


# ----------------------------------------------------------------------------------------------
# token sampling
def sample_logits(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """One index per row of ``logits`` (B, K): softmax(logits / temperature) restricted to the
    ``top_k`` largest (0: all) and then to the smallest set whose mass reaches ``top_p``
    (Holtzman et al. 2020; the most likely token always stays), sampled by inverting the CDF at a
    uniform draw from ``generator``. Temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    cdf = probs.cumsum(dim=-1)  # (B, K), unnormalised after filtering
    device = generator.device if generator is not None else probs.device
    u = torch.rand(len(probs), 1, generator=generator, device=device).to(probs.device)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return index.squeeze(1).clamp(max=probs.shape[-1] - 1)


def check_token_options(opts: dict[str, Any]) -> None:
    """Temperature, top-k and top-p in range, with a message naming the setting."""
    if opts["temperature"] < 0:
        raise ValueError(f"temperature={opts['temperature']} must be >= 0 (0: greedy)")
    if opts["top_k"] < 0:
        raise ValueError(f"top_k={opts['top_k']} must be >= 0 (0: off)")
    if not 0.0 < opts["top_p"] <= 1.0:
        raise ValueError(f"top_p={opts['top_p']} must be in (0, 1] (1: off)")


def draw_token(logits, generator, opts: dict[str, Any], guided: bool) -> torch.Tensor:
    """One token per sequence from logits (B', K): with ``guided``, the rows are [cond; null]
    and mixed as ℓ_∅ + s (ℓ_c − ℓ_∅) first; then filtered and sampled (:func:`sample_logits`)."""
    if guided:
        cond, uncond = logits.chunk(2)
        logits = uncond + opts["guidance_scale"] * (cond - uncond)
    return sample_logits(
        logits,
        generator,
        temperature=opts["temperature"],
        top_k=opts["top_k"],
        top_p=opts["top_p"],
    )


def decode_stream(
    net: nn.Module,
    prefix: torch.Tensor,
    n: int,
    offset: int,
    generator: torch.Generator | None,
    opts: dict[str, Any],
    guided: bool,
    use_cache: bool,
) -> torch.Tensor:
    """``n`` tokens (B, n) in [0, K) drawn one at a time after ``prefix`` (B', L) by a decoder
    Transformer whose vocabulary holds them at ``offset`` + [0, K); with ``guided`` the prefix's
    rows are [cond; null] (B' = 2B) and both streams get each drawn token. With the cache each
    new token costs one position's work; without it the whole stream is re-read (the same
    tokens, tested)."""
    rows = len(prefix) // 2 if guided else len(prefix)
    out = torch.empty(rows, n, dtype=torch.long, device=prefix.device)
    cache = net.new_cache() if use_cache else None
    stream, logits = prefix, net(prefix, cache)[:, -1]  # the last prefix position's prediction
    for i in progress.steps(range(n), "tokens"):
        token = draw_token(logits[:, offset:].float(), generator, opts, guided)
        out[:, i] = token
        if i == n - 1:
            break
        new = (token + offset)[:, None].repeat(2 if guided else 1, 1)  # (B', 1)
        if use_cache:
            logits = net(new, cache)[:, -1]
        else:
            stream = torch.cat([stream, new], dim=1)
            logits = net(stream)[:, -1]
    return out
