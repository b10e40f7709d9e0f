"""Checkpoints written before the diffusion system was reshaped (genlab issue 19) keep loading.

Before, DDPM, LDM, the Imagen SR stage and the unCLIP decoder were subclasses with their own
``_target_`` and top-level options; now they are configs of one ``DiffusionModel`` with a
``space`` and ``conditioners`` (``genlab/models/diffusion/``), and every other model moved into
its family's folder (``genlab.models.vae.VAE`` → ``genlab.models.autoencoders.vae.VAE``). :func:`upgrade` rewrites an old
checkpoint's stored model config and state-dict keys to the new shape; ``genlab.load`` applies it
in memory, and

    python -m genlab.utils.legacy old.ckpt [new.ckpt]

writes the upgraded checkpoint to a file (in place when no output is given).
"""

from __future__ import annotations

import sys
from typing import Any

DIFFUSION = "genlab.models.diffusion.model.DiffusionModel"
RENAMED = {  # old _target_ -> new _target_, for classes that only moved (models by family)
    "genlab.models.imagen.ImagenCascade": "genlab.models.diffusion.imagen.ImagenCascade",
    "genlab.models.unclip.UnCLIPPrior": "genlab.models.diffusion.unclip.UnCLIPPrior",
    "genlab.models.unclip.UnCLIP": "genlab.models.diffusion.unclip.UnCLIP",
    "genlab.models.vae.VAE": "genlab.models.autoencoders.vae.VAE",
    "genlab.models.vqgan.VQGAN": "genlab.models.autoencoders.vqgan.VQGAN",
    "genlab.models.dvae.DVAE": "genlab.models.autoencoders.dvae.DVAE",
    "genlab.models.dalle.DALLE": "genlab.models.autoregressive.dalle.DALLE",
    "genlab.models.gan.GAN": "genlab.models.adversarial.gan.GAN",
    "genlab.models.glow.Glow": "genlab.models.flows.glow.Glow",
    "genlab.models.clip.CLIP": "genlab.models.evaluators.clip.CLIP",
    "genlab.models.shapes_oracle.ShapesOracle": "genlab.models.evaluators.shapes_oracle.ShapesOracle",
    "genlab.models.noisy_classifier.NoisyClassifier": (
        "genlab.models.diffusion.noisy_classifier.NoisyClassifier"
    ),
}
LEGACY_DIFFUSION = {
    "genlab.models.ddpm.DDPM",
    "genlab.models.ldm.LDM",
    "genlab.models.imagen.ImagenSR",
    "genlab.models.unclip.UnCLIPDecoder",
}


def renamed(node: Any) -> Any:
    """``node`` with every moved ``_target_`` (at any depth) renamed."""
    if isinstance(node, dict):
        out = {k: renamed(v) for k, v in node.items()}
        if out.get("_target_") in RENAMED:
            out["_target_"] = RENAMED[out["_target_"]]
        return out
    if isinstance(node, list):
        return [renamed(v) for v in node]
    return node


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """The model config in today's shape (a new dict; unchanged when it is already)."""
    target = config.get("_target_")
    config = renamed(config)
    if target in RENAMED:
        config.pop("clip_recipe", None)
    if target not in LEGACY_DIFFUSION:
        return config
    config["_target_"] = DIFFUSION
    if target == "genlab.models.ldm.LDM":
        keys = ("first_stage_ckpt", "scale_factor", "cache_latents", "cache_dir")
        space = {k: config.pop(k) for k in keys if k in config}
        config["space"] = {"_target_": "genlab.models.diffusion.spaces.LatentSpace", **space}
    conditioners = {}
    if target == "genlab.models.imagen.ImagenSR":
        keys = ("low_res_size", "aug_max", "sample_aug_level")
        conditioners["low_res"] = {
            "_target_": "genlab.models.diffusion.conditioners.LowResConditioner",
            "image_size": config.get("image_size", 32),
            **{k: config.pop(k) for k in keys if k in config},
        }
    if target == "genlab.models.unclip.UnCLIPDecoder":
        config.pop("clip_recipe", None)
        moved = {k: config.pop(k) for k in ("clip_ckpt", "embed_tokens", "context_dim", "cond_dim")}
        if "embed_drop_prob" in config:
            moved["drop_prob"] = config.pop("embed_drop_prob")
        conditioners["image_embed"] = {
            "_target_": "genlab.models.diffusion.conditioners.ImageEmbedConditioner",
            **moved,
        }
    if conditioners:
        config["conditioners"] = conditioners
    return config


def upgrade_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Old parameter names mapped to today's (in place; returns it). Only for legacy checkpoints:
    today's names start with the old prefixes too."""
    renames = {
        "denoiser.text.": "denoiser.text.encoder.",
        "ema.module.text.": "ema.module.text.encoder.",
        "denoiser.embed.": "denoiser.image_embed.projection.",
        "ema.module.embed.": "ema.module.image_embed.projection.",
    }
    for key in list(state_dict):
        new = key
        for old, replacement in renames.items():
            if key.startswith(old):
                new = replacement + key[len(old) :]
        if key in ("scale_factor", "scale_set"):
            new = f"space.{key}"
        if new != key:
            state_dict[new] = state_dict.pop(key)
    return state_dict


def is_legacy(config: dict[str, Any]) -> bool:
    """Whether a stored model config predates the reshaped models (any moved ``_target_``)."""
    return config.get("_target_") in LEGACY_DIFFUSION or renamed(config) != config


def upgrade(ckpt: dict[str, Any]) -> bool:
    """Upgrade a loaded checkpoint dict in place; whether anything changed."""
    from genlab.utils.checkpoint import MODEL_CONFIG_KEY

    config = ckpt.get(MODEL_CONFIG_KEY, {})
    if not is_legacy(config):
        return False
    ckpt[MODEL_CONFIG_KEY] = upgrade_config(config)
    upgrade_state_dict(ckpt.get("state_dict", {}))
    return True


def upgrade_state_dict_if_legacy(checkpoint: dict[str, Any]) -> None:
    """For ``on_load_checkpoint`` (e.g. a resumed run): rename an old checkpoint's parameters."""
    from genlab.utils.checkpoint import MODEL_CONFIG_KEY

    if is_legacy(checkpoint.get(MODEL_CONFIG_KEY, {})) and "state_dict" in checkpoint:
        upgrade_state_dict(checkpoint["state_dict"])


def main(argv: list[str]) -> None:
    if len(argv) not in (1, 2):
        raise SystemExit("usage: python -m genlab.utils.legacy old.ckpt [new.ckpt]")
    from genlab.utils.checkpoint import read_checkpoint
    from genlab.utils.io import atomic_torch_save

    ckpt = read_checkpoint(argv[0])
    changed = upgrade(ckpt)
    out = argv[-1]
    if changed or out != argv[0]:
        atomic_torch_save(ckpt, out)
    print(f"{argv[0]}: {'upgraded' if changed else 'already current'} -> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
