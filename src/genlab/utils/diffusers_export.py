"""Export genlab's first-stage autoencoders in diffusers' format: a VAE as an ``AutoencoderKL``,
a VQ-GAN / VQ-VAE as a ``VQModel`` (``python src/export.py ckpt_path=... format=diffusers``).

genlab's encoder/decoder (``genlab.nn.autoencoder``) is the taming-transformers design that
diffusers' ``Encoder`` / ``Decoder`` also implement: pre-activation residual blocks
(``ResnetBlock2D``: GroupNorm-SiLU-conv twice, a 1×1 shortcut when the width changes), a middle of
block-attention-block (one head), GroupNorm-SiLU-conv out, nearest ×2 upsampling followed by a
3×3 conv, ``res_blocks + 1`` blocks per decoder level; a VQ-GAN's ``quant_conv`` /
``post_quant_conv`` and codebook are diffusers' too. What does *not* map, and is refused with the
reason (:func:`mismatches`):

* the encoder's stride-2 convolution with ``downsample_padding: symmetric`` (genlab's default:
  one pixel on every side). diffusers' ``Encoder`` hard-codes ``Downsample2D(padding=0)`` after
  padding one pixel at the bottom and right only, which samples other pixels; no weights make one
  the other. Nets made with ``model.encoder.downsample_padding=asymmetric`` map exactly.
* more than one attention head (diffusers' autoencoders use one, of the block's width);
* encoder and decoder of different widths, depths, groups or middle attention (diffusers derives
  both from one config);
* l2-normalised (cosine) codebooks (diffusers' ``VectorQuantizer`` looks up by Euclidean
  distance).

Every GroupNorm of diffusers' autoencoders has ``eps = 1e-6`` (not configurable); genlab's nets
use ``norm_eps`` (PyTorch's 1e-5 by default). With ``norm_eps: 1e-6`` the export is exact up to
float rounding; otherwise it is exported with a warning and the outputs differ slightly. Either
way the max abs difference of latents and reconstructions on a random batch is measured at
export, logged and written into the folder's model card.

The exported folder also holds the genlab export (``model.safetensors``, ``genlab.json``), so
``genlab.load(folder)`` and ``ckpt_path=folder`` read it back as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from genlab.utils.io import atomic_write_text

VAE = "genlab.models.autoencoders.vae.VAE"
VQGAN = "genlab.models.autoencoders.vqgan.VQGAN"
CLASSES = {VAE: "AutoencoderKL", VQGAN: "VQModel"}
SHARED = ("channels", "res_blocks", "attention_levels", "mid_attention", "groups", "heads")
DIFFUSERS_EPS = 1e-6
RESNET = {"block.0": "norm1", "block.2": "conv1", "block.3": "norm2", "block.6": "conv2"}


class NotExportable(ValueError):
    """The checkpoint's model has no diffusers counterpart; the message says why."""


def mismatches(model_config: dict[str, Any]) -> list[str]:
    """Why this genlab autoencoder does not map onto diffusers' (empty: it maps)."""
    target = model_config.get("_target_")
    if target not in CLASSES:
        name = str(target).rsplit(".", 1)[-1]
        first_stage = (model_config.get("space") or {}).get("first_stage_ckpt")
        hint = (
            f" (this LDM's first stage can be: ckpt_path={first_stage} with scaling_factor= its "
            "model.space.scale_factor)"
            if first_stage
            else ""
        )
        return [
            f"a {name}: format=diffusers maps genlab's VAE (to AutoencoderKL) and VQ-GAN / VQ-VAE "
            f"(to VQModel) only; use format=safetensors{hint}"
        ]
    enc, dec = model_config["encoder"], model_config["decoder"]
    found = []
    if enc.get("downsample_padding", "symmetric") != "asymmetric":
        found.append(
            "the encoder's stride-2 convolutions pad one pixel on every side "
            "(downsample_padding: symmetric), while diffusers' Encoder pads only after the last "
            "row and column (Downsample2D with padding=0): the two sample different pixels and no "
            "weights convert one into the other; train with "
            "model.encoder.downsample_padding=asymmetric for an exportable net"
        )
    if int(enc.get("heads", 1)) != 1:
        found.append(f"encoder heads={enc['heads']}: diffusers' autoencoders attend with one head")
    for key in SHARED:
        if list_or(enc.get(key)) != list_or(dec.get(key)):
            found.append(
                f"encoder {key}={enc.get(key)} but decoder {key}={dec.get(key)}: diffusers "
                "builds both from one config"
            )
    if dec.get("latent_channels") != enc.get("latent_channels"):
        found.append("the decoder's latent_channels differ from the encoder's")
    if target == VAE and not enc.get("double_latent"):
        found.append("a VAE whose encoder does not output mean and log-variance")
    if target == VQGAN and model_config.get("quantizer", {}).get("l2_normalize"):
        found.append(
            "an l2-normalised (cosine) codebook: diffusers' VectorQuantizer looks codes up by "
            "Euclidean distance"
        )
    return found


def approximations(model_config: dict[str, Any]) -> list[str]:
    """Differences that an export keeps (the outputs differ slightly; measured at export)."""
    eps = float(model_config["encoder"].get("norm_eps", 1e-5))
    if eps == DIFFUSERS_EPS:
        return []
    return [
        f"GroupNorm eps {eps:g} in genlab, {DIFFUSERS_EPS:g} in diffusers (train with "
        f"model.encoder.norm_eps={DIFFUSERS_EPS:g} for an exact export)"
    ]


def list_or(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def diffusers_config(model_config: dict[str, Any], *, scaling_factor: float) -> dict[str, Any]:
    """The diffusers class's constructor arguments for a genlab autoencoder that maps."""
    enc = model_config["encoder"]
    channels = list(enc["channels"])
    attention = set(enc.get("attention_levels") or [])
    down = [
        "AttnDownEncoderBlock2D" if level in attention else "DownEncoderBlock2D"
        for level in range(len(channels))
    ]
    up = [
        "AttnUpDecoderBlock2D" if level in attention else "UpDecoderBlock2D"
        for level in reversed(range(len(channels)))
    ]
    config = dict(
        in_channels=int(enc["in_channels"]),
        out_channels=int(model_config["decoder"]["out_channels"]),
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=int(enc["res_blocks"]),
        act_fn="silu",
        latent_channels=int(enc["latent_channels"]),
        norm_num_groups=int(enc["groups"]),
        sample_size=int(model_config.get("image_size", 32)),
        scaling_factor=float(scaling_factor),
        mid_block_add_attention=bool(enc.get("mid_attention", True)),
    )
    if model_config["_target_"] == VAE:
        config.update(use_quant_conv=False, use_post_quant_conv=False)
    else:
        quantizer = model_config["quantizer"]
        config.update(
            num_vq_embeddings=int(quantizer["num_codes"]), vq_embed_dim=int(quantizer["code_dim"])
        )
    return config


# ----------------------------------------------------------------------------------------------
# parameter names
def resnet(src: str, dst: str, c_in: int, c_out: int) -> dict[str, str]:
    names = {f"{src}.{g}": f"{dst}.{d}" for g, d in RESNET.items()}
    if c_in != c_out:
        names[f"{src}.skip"] = f"{dst}.conv_shortcut"
    return names


def attention(src: str, dst: str) -> dict[str, str]:
    """genlab's SpatialAttention → diffusers' Attention; ``to_kv`` is split by the caller."""
    return {
        f"{src}.norm": f"{dst}.group_norm",
        f"{src}.to_q": f"{dst}.to_q",
        f"{src}.to_kv": f"{dst}.to_k|{dst}.to_v",
        f"{src}.out": f"{dst}.to_out.0",
    }


def middle(src: str, dst: str, c: int, attend: bool) -> dict[str, str]:
    names = resnet(f"{src}.0", f"{dst}.resnets.0", c, c)
    if attend:
        names |= attention(f"{src}.1", f"{dst}.attentions.0")
    names |= resnet(f"{src}.{2 if attend else 1}", f"{dst}.resnets.1", c, c)
    return names


def module_names(model_config: dict[str, Any]) -> dict[str, str]:
    """genlab module path → diffusers module path, for every parameterized layer."""
    enc = model_config["encoder"]
    channels, n = list(enc["channels"]), int(enc["res_blocks"])
    attention_levels, attend_mid = set(enc.get("attention_levels") or []), enc["mid_attention"]
    names = {"encoder.conv_in": "encoder.conv_in", "decoder.conv_in": "decoder.conv_in"}
    c = channels[0]
    for level, ch in enumerate(channels):  # encoder levels
        k = 0
        for i in range(n):
            dst = f"encoder.down_blocks.{level}"
            names |= resnet(
                f"encoder.down.{level}.{k}", f"{dst}.resnets.{i}", c if i == 0 else ch, ch
            )
            k += 1
            if level in attention_levels:
                names |= attention(f"encoder.down.{level}.{k}", f"{dst}.attentions.{i}")
                k += 1
        if level < len(channels) - 1:
            names[f"encoder.down.{level}.{k}"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
        c = ch
    names |= middle("encoder.mid", "encoder.mid_block", c, attend_mid)
    names |= {
        "encoder.conv_out.0": "encoder.conv_norm_out",
        "encoder.conv_out.2": "encoder.conv_out",
    }
    names |= middle("decoder.mid", "decoder.mid_block", channels[-1], attend_mid)
    c = channels[-1]
    for j, level in enumerate(reversed(range(len(channels)))):  # decoder: deepest first
        ch, k, dst = channels[level], 0, f"decoder.up_blocks.{j}"
        for i in range(n + 1):
            names |= resnet(
                f"decoder.up.{level}.{k}", f"{dst}.resnets.{i}", c if i == 0 else ch, ch
            )
            k += 1
            if level in attention_levels:
                names |= attention(f"decoder.up.{level}.{k}", f"{dst}.attentions.{i}")
                k += 1
        if level > 0:
            names[f"decoder.up.{level}.{k + 1}"] = f"{dst}.upsamplers.0.conv"  # after nn.Upsample
        c = ch
    names |= {
        "decoder.conv_out.0": "decoder.conv_norm_out",
        "decoder.conv_out.2": "decoder.conv_out",
    }
    if model_config["_target_"] == VQGAN:
        names |= {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    return names


def diffusers_state_dict(
    model_config: dict[str, Any], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The genlab autoencoder's weights under diffusers' names."""
    out = {}
    for src, dst in module_names(model_config).items():
        for p in ("weight", "bias"):
            value = state[f"{src}.{p}"]
            if "|" in dst:  # to_kv → to_k, to_v
                k, v = value.chunk(2, dim=0)
                first, second = dst.split("|")
                out[f"{first}.{p}"], out[f"{second}.{p}"] = k, v
            else:
                out[f"{dst}.{p}"] = value
    if model_config["_target_"] == VQGAN:
        out["quantize.embedding.weight"] = state["quantizer.embedding"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
def check_exportable(ckpt_path: str | Path, model_config: dict[str, Any] | None = None) -> None:
    """Raise :class:`NotExportable` with every reason when the checkpoint's model does not map."""
    if model_config is None:
        from genlab.utils.checkpoint import MODEL_CONFIG_KEY, read_checkpoint

        model_config = read_checkpoint(ckpt_path)[MODEL_CONFIG_KEY]
    problems = mismatches(model_config)
    if problems:
        raise NotExportable(
            f"{ckpt_path} cannot be exported as a diffusers model: " + "; ".join(problems)
        )


def export_diffusers(
    ckpt_path: str | Path, out: str | Path, *, scaling_factor: float | None = None
) -> tuple[Path, float]:
    """Write ``out/`` as a diffusers ``AutoencoderKL`` / ``VQModel`` folder (``config.json``,
    ``diffusion_pytorch_model.safetensors``) plus the genlab export, and check that diffusers'
    model gives genlab's outputs. Returns ``out`` and the measured max abs difference.

    Raises:
        NotExportable: the model does not map (the message lists every reason).
    """
    import logging

    import diffusers

    from genlab.utils.checkpoint import MODEL_CONFIG_KEY, model_from_checkpoint, read_checkpoint
    from genlab.utils.export import CARD_FILE, export_safetensors

    ckpt = read_checkpoint(ckpt_path)
    model_config = ckpt[MODEL_CONFIG_KEY]
    check_exportable(ckpt_path, model_config)
    for note in approximations(model_config):
        logging.getLogger(__name__).warning(f"exporting {ckpt_path} to diffusers: {note}")
    cls = getattr(diffusers, CLASSES[model_config["_target_"]])
    config = diffusers_config(model_config, scaling_factor=scaling_factor or 1.0)
    network = cls(**config)
    network.load_state_dict(diffusers_state_dict(model_config, ckpt["state_dict"]), strict=True)
    network.eval()
    out = Path(out)
    export_safetensors(ckpt_path, out)  # genlab.load(out) reads it back
    network.save_pretrained(out, safe_serialization=True)
    genlab_model = model_from_checkpoint(ckpt, path=ckpt_path)
    diff = max_difference(genlab_model, network, size=config["sample_size"])
    notes = approximations(model_config)
    card = (out / CARD_FILE).read_text() + diffusers_card(cls.__name__, out, config, diff, notes)
    atomic_write_text(out / CARD_FILE, card)
    return out, diff


@torch.no_grad()
def max_difference(genlab_model: Any, network: Any, *, size: int, seed: int = 0) -> float:
    """Max abs difference of the latents and the reconstructions of genlab's model and
    diffusers' on a random batch of 2 images in [-1, 1] (AutoencoderKL: the posterior mean)."""
    generator = torch.Generator().manual_seed(seed)
    channels = network.config.in_channels
    images = torch.rand(2, channels, size, size, generator=generator) * 2 - 1
    genlab_model = genlab_model.float().eval()
    encoded = genlab_model.encode(images)
    if type(network).__name__ == "AutoencoderKL":
        ours, theirs = encoded.mean, network.encode(images).latent_dist.mean
    else:
        ours, theirs = encoded, network.encode(images).latents
    diff = (ours - theirs).abs().max()
    decoded = network.decode(ours).sample
    diff = torch.maximum(diff, (genlab_model.decode(ours) - decoded).abs().max())
    return float(diff)


def diffusers_card(
    name: str, out: Path, config: dict[str, Any], diff: float, notes: list[str]
) -> str:
    shown = json.dumps({k: config[k] for k in ("block_out_channels", "latent_channels")})
    return "\n".join(
        [
            "",
            "## diffusers",
            "",
            f"This folder is also a diffusers `{name}` (`config.json`, "
            f"`diffusion_pytorch_model.safetensors`; {shown}, scaling_factor "
            f"{config['scaling_factor']}). On a random batch at {config['sample_size']} px its "
            f"latents and reconstructions differ from genlab's by at most {diff:.2e}"
            + (f" ({'; '.join(notes)})." if notes else " (float rounding)."),
            "",
            "```python",
            f"from diffusers import {name}",
            f'vae = {name}.from_pretrained("{out}")',
            "```",
            "",
        ]
    )
