"""CLIP score with a pretrained CLIP from the ecosystem: a Hugging Face ``CLIPModel`` with its
processor (tokenizer and image processor), from a local folder or a Hub name.

This is the CLIP score the field reports (e.g. ``openai/clip-vit-large-patch14`` or
``openai/clip-vit-base-patch32``), beside genlab's own CLIP (``models/evaluators/clip.py``),
which is trained on the project's data and measures agreement in that data's terms.

Loading never downloads unless asked: ``from_pretrained(..., local_files_only=True)`` reads a
local folder (``save_pretrained``'s layout) or a name already in the Hugging Face cache;
``allow_download=True`` (``callbacks.generative_metrics.clip_download=true``) lets transformers
fetch a Hub name.

Images in [-1, 1] go through the model's own ``CLIPImageProcessor`` (resize, centre crop,
normalisation) as uint8 pictures, the form in which a PNG of the sample would be scored; prompts
through its tokenizer, truncated to the text model's context. The score is genlab's
:class:`genlab.metrics.text_image.CLIPScore` of the projected embeddings: ``clip_score`` =
100 · mean max(cos, 0) (Hessel et al. 2021's per-image clip at 0, on torchmetrics' scale of
100; torchmetrics clips the mean instead, which is the same number whenever no cosine is
negative) and ``clip_score_w2.5`` = CLIP-S with w = 2.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from genlab.metrics.extractors import to_uint8
from genlab.utils.io import file_version

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedCLIP:
    """A pretrained Hugging Face CLIP, frozen, as a CLIP-score evaluator.

    It has the interface of genlab's CLIP evaluator (``module.encode_images``,
    ``module.encode_texts``, ``version``, ``describe``), so the generative metrics use either.

    Args:
        name_or_path: a local folder written by ``save_pretrained`` (``config.json``, the
            weights, the processor's files) or a Hugging Face Hub name.
        allow_download: let transformers download a Hub name that is not in the local cache;
            False (the default): local files only, and a clear error when they are missing.
        device: where the model runs.
        batch_size: images (or prompts) per forward pass.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        allow_download: bool = False,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        local = Path(name_or_path).expanduser()
        source = str(local) if local.exists() else name_or_path
        try:
            model = CLIPModel.from_pretrained(source, local_files_only=not allow_download)
            processor = CLIPProcessor.from_pretrained(source, local_files_only=not allow_download)
        except OSError as err:
            where = "this folder" if local.exists() else "the local Hugging Face cache"
            advice = (
                "give the folder of a CLIPModel saved with save_pretrained (config.json, weights, "
                "tokenizer and preprocessor files)"
                if local.exists() or allow_download
                else "give a local folder, or set callbacks.generative_metrics.clip_download=true "
                "to let transformers download it"
            )
            raise FileNotFoundError(
                f"pretrained CLIP {name_or_path!r}: not loadable from {where} ({err}); {advice}"
            ) from None
        self.name, self.device, self.batch_size = name_or_path, torch.device(device), batch_size
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.processor = processor
        self.context = int(model.config.text_config.max_position_embeddings)
        self.version = weights_version(local) if local.is_dir() else None
        if self.version is None:
            self.version = getattr(model.config, "_commit_hash", None) or "unknown"
        self.module = self  # the interface of a CheckpointEvaluator: evaluator.module.encode_*

    def describe(self) -> dict[str, Any]:
        return {"extractor": f"hf-clip:{self.name}", "extractor_version": self.version}

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings ``(B, D)`` of images ``(B, C, H, W)`` in [-1, 1]."""
        pictures = to_uint8(images.detach().float().cpu())  # (B, C, H, W) uint8
        if pictures.shape[1] == 1:
            pictures = pictures.expand(-1, 3, -1, -1)
        out = []
        for start in range(0, len(pictures), self.batch_size):
            batch = [p.permute(1, 2, 0).numpy() for p in pictures[start : start + self.batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
            out.append(features(self.model.get_image_features(pixel_values=pixels)))
        return torch.cat(out).float()

    @torch.no_grad()
    def encode_texts(self, prompts: list[str]) -> torch.Tensor:
        """Projected text embeddings ``(B, D)`` of the prompts (truncated to the context)."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            inputs = self.processor(
                text=list(prompts[start : start + self.batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.context,
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            out.append(features(self.model.get_text_features(**inputs)))
        return torch.cat(out).float()


def features(output: Any) -> torch.Tensor:
    """The projected embeddings from ``get_*_features``: a tensor (transformers 4) or the
    output's ``pooler_output`` (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def weights_version(folder: Path) -> str | None:
    """The version of a saved model: the start of its weights file's SHA-256."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return file_version(folder / name)
    return None
