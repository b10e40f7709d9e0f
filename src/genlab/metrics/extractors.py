"""Feature extractors for the generative metrics, each with a name and a version.

Two kinds (docs/architecture.md, "The evaluation protocol"):

* :class:`InceptionV3`: the standard FID network, torch-fidelity's ``inception-v3-compat``
  (the TF-Inception graph of Heusel et al. 2017, with its TF-1.x bilinear resize to 299 px), used
  only when its weights are on disk: a configured path or torch-fidelity's cache in the torch hub
  folder. Nothing is ever downloaded. Its 2048-d pool features feed FID, KID and
  precision/recall; the softmax of its 1008 ``logits_unbiased`` feeds the Inception Score, as in
  torch-fidelity.
* :class:`CheckpointEvaluator`: an offline evaluator the project trains itself (the shapes
  oracle), loaded from its checkpoint. Its ``features`` and ``class_probs`` play the same roles;
  :class:`CLIPImageFeatures` offers a CLIP evaluator's image embeddings as features.

The ``version`` of an extractor is the first 12 hex digits of the SHA-256 of its weights file;
it goes into every metric's protocol and into the key of cached reference statistics, so numbers
computed with different weights are never mixed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from genlab.utils.images import check_images
from genlab.utils.io import file_version

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name


def inception_weights_candidates(weights_path: str | None = None) -> list[Path]:
    """Where Inception weights are looked for, in order: the configured path, then the file
    torch-fidelity downloads into the torch hub cache (``$TORCH_HOME/hub/checkpoints``)."""
    candidates = [Path(weights_path).expanduser()] if weights_path else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    return candidates


def find_inception_weights(weights_path: str | None = None) -> Path | None:
    """The first Inception weights file that exists (see :func:`inception_weights_candidates`)."""
    return next((p for p in inception_weights_candidates(weights_path) if p.is_file()), None)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → uint8 in [0, 255], rounded: what an image file would hold."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class InceptionV3:
    """torch-fidelity's ``inception-v3-compat`` on local weights: standard FID features.

    Args:
        weights_path: the weights file (torch-fidelity's format). Must exist.
        device: where the network runs.
        batch_size: images per forward pass (299 px images are large).
    """

    name = "inception-v3-compat"

    def __init__(
        self, weights_path: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 64
    ) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found at {str(path)!r}")
        self.version = file_version(path)
        self.weights_path = str(path)
        self.batch_size = batch_size
        self.net = FeatureExtractorInceptionV3(
            self.name, ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        ).to(device)
        self.device = torch.device(device)

    def describe(self) -> dict[str, Any]:
        return {"extractor": self.name, "extractor_version": self.version}

    @torch.no_grad()
    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2048-d features and 1008 logits of images (N, 3, H, W) in [-1, 1], any H, W."""
        check_images(images, name="Inception input")
        if images.shape[1] == 1:  # grayscale: the same value in R, G and B
            images = images.expand(-1, 3, -1, -1)
        check_images(images, name="Inception input", channels=3)
        features, logits = [], []
        with torch.autocast(self.device.type, enabled=False):
            for chunk in to_uint8(images).split(self.batch_size):
                f, z = self.net(chunk.to(self.device))
                features.append(f.float())
                logits.append(z.float())
        return torch.cat(features), torch.cat(logits)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pool-3 features (N, 2048) for FID, KID and precision/recall."""
        return self.outputs(images)[0]

    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax of the unbiased logits (N, 1008) for the Inception Score."""
        return self.outputs(images)[1].softmax(dim=1)


class CheckpointEvaluator:
    """An offline evaluator loaded from a genlab checkpoint: the shapes oracle or CLIP.

    ``module`` is the loaded LightningModule. As a feature extractor it must provide
    ``features(images)`` and ``class_probs(images)`` (the oracle); ``parse`` (the oracle's
    caption parsing) and ``encode_images`` / ``encode_texts`` (CLIP) are reached via ``module``.
    """

    def __init__(self, module: Any, *, name: str, checkpoint: str | Path) -> None:
        self.module, self.name = module, name
        self.checkpoint = str(checkpoint)
        self.version = file_version(checkpoint)

    def describe(self) -> dict[str, Any]:
        return {"extractor": self.name, "extractor_version": self.version}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.features(images).float()

    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.class_probs(images).float()


class CLIPImageFeatures:
    """A CLIP evaluator's image embeddings as FID/KID/PR features (Kynkäänniemi et al. 2023 use
    CLIP features for FID); no class probabilities, so no Inception Score."""

    def __init__(self, clip: CheckpointEvaluator) -> None:
        self.clip, self.version = clip, clip.version

    def describe(self) -> dict[str, Any]:
        return {"extractor": "clip-image-embedding", "extractor_version": self.version}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.module.encode_images(images).float()
