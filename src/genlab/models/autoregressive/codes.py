"""The frozen discrete first stage that the autoregressive models (DALL·E, the VQ prior) read
and write codes with: loaded once, kept out of the model's weights, and checked on load."""

from __future__ import annotations

from typing import Any

from torch import nn

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
