"""Generative metrics during training and from ``eval.py``: FID, KID, IS, precision/recall, CLIP
score and caption accuracy of generated images, rFID, PSNR and SSIM of reconstructions, correct
under DDP, each number with its protocol.

The protocol (DESIGN.md, "Evaluation protocol"):

* **Conditions.** Item i of the ``num_samples`` generated images gets the i-th prompt of the
  datamodule's ``sample_prompts`` (val-split captions) for a text model, label ``i mod K`` for a
  label model, nothing for an unconditional one.
* **Sharding with no duplicates and no padding.** Items are cut into chunks of ``batch_size``;
  chunk c is drawn by rank ``c mod W`` from a generator seeded from (seed, purpose, c). Every
  item is drawn exactly once, and an item's image does not depend on the number of ranks, so a
  DDP run gives the single-process numbers (a test checks this with 2 gloo processes). The
  synced sample count is checked against ``num_samples``.
* **Synced states.** Every metric is a torchmetrics metric (``genlab.metrics``) whose states are
  synced across ranks; ``compute()`` runs on every rank; nothing collective runs on rank 0 only.
* **Features.** ``features: auto`` uses torch-fidelity's Inception-v3 when its weights are on
  disk (``inception_weights`` or torch-fidelity's cache) and otherwise says so in a warning and
  uses the offline evaluator named by ``fallback`` (the shapes oracle, or CLIP image
  embeddings). The shapes oracle also parses images for caption accuracy whenever the prompts
  are shapes captions; CLIP (when configured) gives the CLIP score of text models. Evaluator
  checkpoints are found or built once (``genlab.metrics.evaluators``).
* **Reference statistics** of ``num_reference`` real images of ``reference_split`` are cached
  on disk, keyed by the dataset description and the extractor version
  (``genlab.metrics.reference``).
* **Reconstructions.** A model with ``reconstruct(images)`` (the first stages: VAE, VQ-GAN,
  dVAE) also gets the result ``reconstructed``: its reconstructions of items 0..n-1 of
  ``reference_split`` (n = ``num_samples`` capped at the split's size), the same items as the
  reference features, measured as if generated. FID against the reference is then rFID, the
  reconstruction FID (Esser et al. 2021, Table 2; Rombach et al. 2022, Table 8), with KID and
  precision/recall beside it; caption accuracy compares the reconstructions with their own
  captions (shapes data); PSNR and SSIM compare them with the originals
  (``genlab.metrics.reconstruction``). No Inception Score: it rates diversity and class
  confidence, not fidelity to an input. The chunks are sharded as above; ``reconstruct`` is
  deterministic, so no seed is involved. A model that reconstructs but does not generate (VQ-GAN,
  dVAE) gets only this result; the VAE gets both.
* Every result carries its protocol: extractor and version, sample and reference counts,
  sampler, steps, guidance scale, seed, weights (EMA or raw), evaluator versions. Results go to
  the loggers as ``<stage>/<metric>`` (``<stage>/w<scale>/<metric>`` in a guidance sweep,
  ``<stage>/recon/<metric>`` for reconstructions, ``<stage>/real_<split>/<metric>`` for the real
  floor) and, with their protocols, to ``<output_dir>/metrics/<stage>_step<step>.json``.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics import SumMetric

import genlab
from genlab.data.shapes import caption_cells
from genlab.data.splits import split_dataset
from genlab.metrics.evaluators import ensure_evaluator
from genlab.metrics.extractors import (
    CheckpointEvaluator,
    CLIPImageFeatures,
    InceptionV3,
    find_inception_weights,
    inception_weights_candidates,
)
from genlab.metrics.fid import FID
from genlab.metrics.inception_score import InceptionScore
from genlab.metrics.kid import KID
from genlab.metrics.precision_recall import PrecisionRecall
from genlab.metrics.reconstruction import ReconstructionMetrics
from genlab.metrics.reference import reference_features
from genlab.metrics.text_image import CaptionAccuracy, CLIPScore
from genlab.utils.images import check_images
from genlab.utils.io import atomic_write_text
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

GENERATION_PURPOSE = 1  # seeds of generated chunks: (seed, GENERATION_PURPOSE, chunk)
METRICS = ("fid", "kid", "is", "pr", "caption", "clip")
LOG_NAMES = {"reconstructed": "recon"}  # result name -> its part of the logged keys


def chunk_seed(seed: int, chunk: int, purpose: int = GENERATION_PURPOSE) -> int:
    """A 63-bit seed for one chunk, mixed from (seed, purpose, chunk) by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, purpose, chunk]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) % 2**63


def chunks_of(rank: int, world_size: int, n: int, size: int) -> list[range]:
    """The item ranges of the chunks rank ``rank`` draws: chunks r, r + W, ... of ``size``."""
    starts = range(0, n, size)
    return [range(s, min(s + size, n)) for c, s in enumerate(starts) if c % world_size == rank]


class GenerativeMetrics(L.Callback):
    """Generate images and compute FID / KID / IS / PR / CLIP score / caption accuracy; for a
    model that reconstructs, also rFID / KID / PR / caption accuracy / PSNR / SSIM of its
    reconstructions.

    Args:
        num_samples: images generated (and reconstructed) per evaluation.
        batch_size: images per generated chunk (the unit of sharding and seeding).
        every_n_epochs: evaluate after every n-th validation epoch while fitting (0: never).
        on_test: evaluate at the end of ``trainer.test`` (what ``eval.py`` and the default job's
            final test use).
        seed: seed of the generation chunks.
        sampler, steps, guidance_scale: sampling options passed to ``generate``; None: the
            model's own.
        guidance_scales: evaluate each of these guidance scales (a sweep) instead of one.
        generate_options: further keyword arguments of the model's ``generate`` (e.g. DALL-E's
            ``{temperature: 0.9, n_candidates: 8}``), checked against its signature and recorded
            in the protocol.
        metrics: which of ``fid, kid, is, pr, caption, clip`` to compute (those whose evaluator
            or conditions are missing are skipped with a note).
        features: ``auto``, ``inception``, ``shapes_oracle`` or ``clip``.
        inception_weights: a path to torch-fidelity's Inception weights (else its cache).
        fallback: the offline evaluator that ``auto`` uses without Inception weights.
        oracle_checkpoint, oracle_recipe: the shapes oracle's checkpoint and the ``train.py``
            overrides that build it when missing (None: never build).
        clip_checkpoint, clip_recipe: the same for CLIP (None checkpoint: no CLIP score).
        reference_split, num_reference: real images the generated ones are compared with
            (default ``num_samples``, capped at the split's size); a reconstructing model
            reconstructs the first ``num_samples`` of them.
        real_split: also evaluate real images of this split as if generated (the floor).
        cache_dir: reference-statistics cache folder (None: no cache).
        output_dir: the run folder for ``metrics/*.json``; default ``trainer.default_root_dir``.
        kid_subsets, kid_subset_size, pr_k, is_splits: the metrics' own settings.
    """

    def __init__(
        self,
        *,
        num_samples: int = 256,
        batch_size: int = 64,
        every_n_epochs: int = 0,
        on_test: bool = True,
        seed: int = 0,
        sampler: Any = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scales: list[float] | None = None,
        generate_options: dict[str, Any] | None = None,
        metrics: Sequence[str] = METRICS,
        features: str = "auto",
        inception_weights: str | None = None,
        fallback: str = "shapes_oracle",
        oracle_checkpoint: str | None = None,
        oracle_recipe: list[str] | None = None,
        clip_checkpoint: str | None = None,
        clip_recipe: list[str] | None = None,
        reference_split: str = "val",
        num_reference: int | None = None,
        real_split: str | None = None,
        cache_dir: str | None = None,
        output_dir: str | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        pr_k: int = 3,
        is_splits: int = 10,
    ) -> None:
        check(num_samples >= 2, "num_samples", num_samples, "an int >= 2")
        check(batch_size >= 1, "batch_size", batch_size, "an int >= 1")
        check(every_n_epochs >= 0, "every_n_epochs", every_n_epochs, "an int >= 0")
        unknown = sorted(set(metrics) - set(METRICS))
        check(not unknown, "metrics", metrics, f"a list from {list(METRICS)}")
        choices = ("auto", "inception", "shapes_oracle", "clip")
        check(features in choices, "features", features, f"one of {list(choices)}")
        check(fallback in choices[2:], "fallback", fallback, "shapes_oracle or clip")
        check(
            guidance_scales is None or len(guidance_scales) > 0,
            "guidance_scales",
            guidance_scales,
            "a non-empty list or null",
        )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.every_n_epochs, self.on_test = every_n_epochs, on_test
        self.sampling = {"sampler": sampler, "steps": steps}
        self.generate_options = dict(generate_options or {})
        self.guidance_scales = list(guidance_scales) if guidance_scales else [guidance_scale]
        self.metrics, self.features = set(metrics), features
        self.inception_weights, self.fallback = inception_weights, fallback
        self.evaluators = {
            "shapes_oracle": (oracle_checkpoint, oracle_recipe),
            "clip": (clip_checkpoint, clip_recipe),
        }
        self.reference_split, self.num_reference = reference_split, num_reference
        self.real_split = real_split
        self.cache_dir, self.output_dir = cache_dir, output_dir
        self.settings = {
            "kid_subsets": kid_subsets,
            "kid_subset_size": kid_subset_size,
            "pr_k": pr_k,
            "is_splits": is_splits,
        }
        self.tools: dict[str, Any] | None = None
        self.results: list[dict[str, Any]] = []
        self.warned: set[str] = set()

    # ------------------------------------------------------------------------------------------
    # hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Find or build the evaluators before any training, so a problem shows at once."""
        will_run = {"fit": self.on_test or self.every_n_epochs, "test": self.on_test}.get(stage)
        if will_run and (generates(pl_module) or reconstructs(pl_module)):
            self.check_sampling(pl_module)
            self.prepare(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        due = self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if fitting and due:
            self.run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_test:
            self.run(trainer, pl_module, "test")

    # ------------------------------------------------------------------------------------------
    # one evaluation
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[dict]:
        """Evaluate every guidance scale, the reconstructions and the real floor; log and save."""
        if not (generates(pl_module) or reconstructs(pl_module)):
            self.note(
                "nogen",
                f"{type(pl_module).__name__} neither generates nor reconstructs: no metrics",
            )
            return []
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                results = self.evaluate(trainer, pl_module, stage)
        finally:
            pl_module.train(was_training)
        for result in results:
            self.log_result(pl_module, stage, result)
        self.results.extend(results)
        if trainer.is_global_zero:
            self.save(trainer, stage, results)
        return results

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[dict]:
        tools = self.prepare(trainer, pl_module)
        datamodule = trainer.datamodule
        reference, ref_info = self.reference(trainer, datamodule, tools)
        results = []
        if generates(pl_module):
            conditions = self.conditions(pl_module, datamodule)
            for scale in self.guidance_scales:
                start = time.monotonic()
                source = functools.partial(self.generate, pl_module, conditions, scale=scale)
                values = self.measure(trainer, tools, reference, conditions, source)
                n = values.pop("num_samples")
                protocol = self.protocol(pl_module, tools, ref_info, scale, n)
                protocol["seconds"] = round(time.monotonic() - start, 2)
                results.append({"name": "generated", "protocol": protocol, "metrics": values})
        if reconstructs(pl_module):
            results.append(
                self.evaluate_reconstructed(trainer, pl_module, tools, reference, ref_info)
            )
        if self.real_split is not None:
            results.append(self.evaluate_real(trainer, datamodule, tools, reference, ref_info))
        return results

    def evaluate_real(self, trainer, datamodule, tools, reference, ref_info) -> dict[str, Any]:
        """The floor: real images of ``real_split`` measured as if they were generated."""
        dataset = split_dataset(datamodule, self.real_split)
        n = min(self.num_samples, len(dataset))
        conditions = own_captions(dataset, n)

        def source(items: range) -> torch.Tensor:
            return torch.stack([dataset[i]["image"] for i in items])

        start = time.monotonic()
        values = self.measure(trainer, tools, reference, conditions, source, n=n)
        protocol = {
            **self.base_protocol(tools, ref_info, n),
            "num_samples": values.pop("num_samples"),
            "source": f"real images, {self.real_split} split",
        }
        protocol["seconds"] = round(time.monotonic() - start, 2)
        return {"name": f"real_{self.real_split}", "protocol": protocol, "metrics": values}

    def evaluate_reconstructed(self, trainer, pl_module, tools, reference, ref_info) -> dict:
        """rFID & co.: ``reconstruct`` of items 0..n-1 of ``reference_split``, the reference's
        own items, measured as if generated, plus PSNR / SSIM against the originals."""
        dataset = split_dataset(trainer.datamodule, self.reference_split)
        n = min(self.num_samples, len(dataset))
        conditions = own_captions(dataset, n)

        @functools.lru_cache(maxsize=1)  # a chunk's originals, read once for both uses
        def originals(items: range) -> torch.Tensor:
            return torch.stack([dataset[i]["image"] for i in items])  # (B, C, H, W)

        def source(items: range) -> torch.Tensor:
            with torch.no_grad():
                return pl_module.reconstruct(originals(items).to(pl_module.device))

        start = time.monotonic()
        values = self.measure(
            trainer, tools, reference, conditions, source, n=n, originals=originals, skip={"is"}
        )
        protocol = {
            **self.base_protocol(tools, ref_info, n),
            "num_samples": values.pop("num_samples"),
            "source": f"reconstructions of {self.reference_split} items 0..{n - 1}",
            "weights": "EMA" if getattr(pl_module, "uses_ema", False) else "raw",
        }
        del protocol["is_splits"]  # no Inception Score of reconstructions
        protocol["seconds"] = round(time.monotonic() - start, 2)
        return {"name": "reconstructed", "protocol": protocol, "metrics": values}

    def measure(
        self,
        trainer,
        tools,
        reference,
        conditions,
        source,
        n: int | None = None,
        *,
        originals=None,
        skip: Collection[str] = (),
    ) -> dict:
        """Draw this rank's chunks from ``source(items)``, update the synced metrics, compute.

        With ``originals(items)`` the images drawn are reconstructions of those: PSNR and SSIM
        against them are measured too. ``skip`` names metrics left out (``is`` for those).
        """
        n = self.num_samples if n is None else n
        device = trainer.strategy.root_device
        metrics = self.new_metrics(tools, reference, conditions, n, skip)
        if originals is not None:
            metrics["reconstruction"] = ReconstructionMetrics()
        metrics = metrics.to(device)
        count = SumMetric().to(device)
        if math.ceil(n / self.batch_size) < trainer.world_size:  # a rank without items would
            raise ValueError(  # hang the metric sync (empty cat states cannot be gathered)
                f"callbacks.generative_metrics: {n} images in chunks of batch_size="
                f"{self.batch_size} leave some of the {trainer.world_size} ranks without a chunk;"
                " lower batch_size or raise num_samples"
            )
        for items in chunks_of(trainer.global_rank, trainer.world_size, n, self.batch_size):
            images = source(items)
            check_images(
                images, name="generated images" if originals is None else "reconstructions"
            )
            self.update(metrics, tools, images, items, conditions, device)
            if originals is not None:
                metrics["reconstruction"].update(images.to(device), originals(items).to(device))
            count.update(torch.tensor(float(len(items)), device=device))
        total = int(count.compute().item())
        if total != n:
            raise RuntimeError(f"generated {total} images over all ranks, expected exactly {n}")
        values = {"num_samples": total}
        for name, metric in metrics.items():
            values.update(named_values(name, metric.compute()))
        return values

    # ------------------------------------------------------------------------------------------
    # pieces
    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Load the feature extractor and evaluators once (building a missing one first)."""
        if self.tools is not None:
            return self.tools
        device = trainer.strategy.root_device
        tools: dict[str, Any] = {}
        kind = self.features
        if kind in ("auto", "inception"):
            weights = find_inception_weights(self.inception_weights)
            looked = ", ".join(str(p) for p in inception_weights_candidates(self.inception_weights))
            if weights is not None:
                tools["extractor"] = InceptionV3(weights, device=device)
                kind = "inception"
            elif kind == "inception":
                raise FileNotFoundError(
                    f"features=inception but no Inception weights were found (looked at {looked});"
                    " put torch-fidelity's weights-inception-2015-12-05-6726825d.pth there, or "
                    "use features=auto / shapes_oracle"
                )
            else:
                kind = self.fallback
                log.warning(
                    f"Inception-v3 weights not found (looked at {looked}): FID/KID/IS/PR use the "
                    f"offline evaluator '{kind}' instead. These numbers are NOT comparable with "
                    "published Inception FIDs; the protocol names the extractor."
                )
        on_shapes = getattr(trainer.datamodule, "name", None) == "shapes"
        if kind == "shapes_oracle" and not on_shapes:
            log.warning(
                f"no feature extractor for {type(trainer.datamodule).__name__}: the shapes oracle "
                "reads only shapes images. FID/KID/IS/PR are skipped; give Inception weights "
                "(callbacks.generative_metrics.inception_weights=...) or fallback=clip with a "
                "CLIP trained on this data"
            )
            kind = None
        wanted_oracle = kind == "shapes_oracle" or (
            "caption" in self.metrics
            and (getattr(pl_module, "condition", None) == "text" or reconstructs(pl_module))
            and self.evaluators["shapes_oracle"][0] is not None
            and on_shapes
        )
        if wanted_oracle:
            tools["oracle"] = self.load_evaluator("shapes_oracle", device)
        wanted_clip = kind == "clip" or (
            "clip" in self.metrics
            and getattr(pl_module, "condition", None) == "text"
            and self.evaluators["clip"][0] is not None
        )
        if wanted_clip:
            tools["clip"] = self.load_evaluator("clip", device)
        if kind == "shapes_oracle":
            tools["extractor"] = tools["oracle"]
        elif kind == "clip":
            tools["extractor"] = CLIPImageFeatures(tools["clip"])
        self.tools = tools
        return tools

    def load_evaluator(self, name: str, device: torch.device) -> CheckpointEvaluator:
        """Find (or build) and load an evaluator checkpoint, frozen, on ``device``."""
        checkpoint, recipe = self.evaluators[name]
        if checkpoint is None:
            raise ValueError(
                f"callbacks.generative_metrics needs the {name} evaluator: set its checkpoint "
                f"({'oracle' if name == 'shapes_oracle' else name}_checkpoint)"
            )
        path = ensure_evaluator(checkpoint, recipe, name=name)  # a lock: one build
        module = genlab.load(path, map_location=device).requires_grad_(False)
        evaluator = CheckpointEvaluator(module, name=name, checkpoint=path)
        log.info(f"{name} evaluator {path} (version {evaluator.version})")
        return evaluator

    def reference(self, trainer, datamodule, tools) -> tuple[torch.Tensor | None, dict]:
        """The real features (cached), or None when no feature metric is asked for."""
        if not self.metrics & {"fid", "kid", "pr"} or "extractor" not in tools:
            return None, {}
        extractor = tools["extractor"]
        return reference_features(
            datamodule,
            split=self.reference_split,
            num_images=self.num_reference or self.num_samples,
            extract=extractor.features,
            extractor=extractor.describe(),
            cache_dir=self.cache_dir,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            batch_size=self.batch_size,
            device=trainer.strategy.root_device,
            barrier=trainer.strategy.barrier,
        )

    def conditions(self, pl_module: L.LightningModule, datamodule: Any) -> dict[str, list]:
        """Prompts or labels of the ``num_samples`` items (see the module docstring)."""
        condition = getattr(pl_module, "condition", None)
        n = self.num_samples
        if condition == "label":
            return {"labels": [i % pl_module.num_classes for i in range(n)]}
        if condition == "text":
            prompts = datamodule.sample_prompts(n) if datamodule is not None else None
            if not prompts:
                raise ValueError(
                    f"a text-conditional model needs prompts, but {type(datamodule).__name__} "
                    "has no captions (sample_prompts)"
                )
            return {"prompts": [prompts[i % len(prompts)] for i in range(n)]}
        return {}

    def generate(self, pl_module, conditions: dict, items: range, *, scale) -> torch.Tensor:
        """Images of ``items``: one chunk, from its own seeded generator."""
        generator = torch.Generator().manual_seed(
            chunk_seed(self.seed, items.start // self.batch_size)
        )
        options = {k: v for k, v in self.sampling.items() if v is not None}
        options |= self.generate_options
        if scale is not None:
            options["guidance_scale"] = scale
        if "prompts" in conditions:
            chosen = [conditions["prompts"][i] for i in items]
            return pl_module.generate(chosen, generator=generator, **options)
        if "labels" in conditions:
            labels = [conditions["labels"][i] for i in items]
            return pl_module.generate(labels=labels, generator=generator, **options)
        return pl_module.generate(n=len(items), generator=generator, **options)

    def new_metrics(
        self, tools, reference, conditions, n: int, skip: Collection[str] = ()
    ) -> torch.nn.ModuleDict:
        """Fresh synced metrics for ``n`` images; those that cannot apply are skipped."""
        s, metrics, wanted = self.settings, {}, self.metrics - set(skip)
        if reference is not None:
            if "fid" in wanted:
                metrics["fid"] = FID(reference=reference)
            if "kid" in wanted:
                size = min(s["kid_subset_size"], len(reference), n)
                metrics["kid"] = KID(
                    reference=reference, subsets=s["kid_subsets"], subset_size=size
                )
            if "pr" in wanted:
                metrics["pr"] = PrecisionRecall(reference=reference, k=s["pr_k"])
        if "is" in wanted and callable(getattr(tools.get("extractor"), "class_probs", None)):
            metrics["is"] = InceptionScore(splits=min(s["is_splits"], n // 2))
        prompts = conditions.get("prompts")
        if "caption" in wanted and "oracle" in tools and prompts:
            if parsable(prompts):
                metrics["caption"] = CaptionAccuracy()
            else:
                self.note("caption", "prompts are not shapes captions: no caption accuracy")
        if "clip" in wanted and "clip" in tools and prompts:
            metrics["clip"] = CLIPScore()
        return torch.nn.ModuleDict(metrics)

    def update(self, metrics, tools, images, items: range, conditions, device) -> None:
        index = torch.tensor(list(items), device=device)
        images = images.to(device)
        if {"fid", "kid", "pr"} & set(metrics):
            features = tools["extractor"].features(images).to(device)
            for name in ("fid", "kid", "pr"):
                if name == "fid" and name in metrics:
                    metrics[name].update(features)
                elif name in metrics:
                    metrics[name].update(features, index)
        if "is" in metrics:
            metrics["is"].update(tools["extractor"].class_probs(images).to(device), index)
        prompts = [conditions["prompts"][i] for i in items] if "prompts" in conditions else None
        if "caption" in metrics:
            wanted = torch.from_numpy(np.stack([caption_cells(p) for p in prompts])).to(device)
            metrics["caption"].update(tools["oracle"].module.parse(images).to(device), wanted)
        if "clip" in metrics:
            clip = tools["clip"].module
            metrics["clip"].update(
                clip.encode_images(images).to(device), clip.encode_texts(prompts).to(device)
            )

    # ------------------------------------------------------------------------------------------
    # protocol, logging, files
    def base_protocol(
        self, tools: dict[str, Any], ref_info: dict[str, Any], n: int | None = None
    ) -> dict[str, Any]:
        """Extractor, evaluator versions, reference and metric settings in effect for n images."""
        n = self.num_samples if n is None else n
        extractor = tools.get("extractor")
        described = (
            extractor.describe() if extractor else {"extractor": None, "extractor_version": None}
        )
        protocol = {**described, **self.settings}  # with the values in effect:
        protocol["is_splits"] = min(self.settings["is_splits"], n // 2)
        if ref_info:
            protocol["kid_subset_size"] = min(
                self.settings["kid_subset_size"], ref_info["num_images"], n
            )
            protocol["reference"] = {
                "split": ref_info["split"],
                "num_images": ref_info["num_images"],
                "key": ref_info["key"],
            }
        for name in ("oracle", "clip"):
            if name in tools:
                protocol[f"{name}_version"] = tools[name].version
        return protocol

    def protocol(self, pl_module, tools, ref_info, scale, num_samples: int) -> dict[str, Any]:
        """The protocol of generated images: sampler, steps and guidance scale where the model
        has them (a VAE draws from its prior in one pass: none), seed and weights."""
        resolve = getattr(pl_module, "resolve_sampler", None)
        sampler = (
            resolve(self.sampling["sampler"], self.sampling["steps"])
            if resolve
            else self.sampling["sampler"]
        )
        model_scale = getattr(pl_module, "guidance_scale", None)
        sampling = {
            "sampler": str(sampler) if sampler is not None else None,
            "steps": getattr(sampler, "steps", self.sampling["steps"]),
            "guidance_scale": model_scale if scale is None else scale,
        }
        own = getattr(pl_module, "sampling_protocol", None)  # a model's own settings (DALL-E)
        if callable(own):
            given = self.generate_options | ({} if scale is None else {"guidance_scale": scale})
            sampling = {k: v for k, v in sampling.items() if v is not None} | own(given)
        if all(value is None for value in sampling.values()):
            sampling = {}
        return {
            **self.base_protocol(tools, ref_info),
            "num_samples": num_samples,
            **sampling,
            **({"generate_options": self.generate_options} if self.generate_options else {}),
            "seed": self.seed,
            "weights": "EMA" if getattr(pl_module, "uses_ema", False) else "raw",
        }

    def log_result(self, pl_module: L.LightningModule, stage: str, result: dict) -> None:
        """Log each number as ``<stage>/[<name>/]<metric>`` (same value on every rank).

        ``<name>`` is ``w<scale>`` in a guidance sweep, ``recon`` for reconstructions, the result's
        name for the real floor. Non-finite values (the +inf PSNR of a perfect reconstruction)
        stay out of the loggers and are in the JSON file.
        """
        prefix = stage
        if result["name"] != "generated":
            prefix = f"{stage}/{LOG_NAMES.get(result['name'], result['name'])}"
        elif len(self.guidance_scales) > 1:
            prefix = f"{stage}/w{result['protocol']['guidance_scale']:g}"
        for name, value in result["metrics"].items():
            if math.isfinite(value):
                pl_module.log(f"{prefix}/{name}", value, sync_dist=False)
        p = result["protocol"]
        how = p.get("source") or f"sampler {p.get('sampler')}, w={p.get('guidance_scale')}"
        if "source" not in p and "sampler" not in p:
            how = "sampled in one pass"
        log.info(
            f"{prefix}: "
            + ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
            + f" [{p['extractor']} {p['extractor_version']}, n={p['num_samples']}, {how}, "
            f"{p['seconds']} s]"
        )

    def save(self, trainer: L.Trainer, stage: str, results: list[dict]) -> None:
        """Write the results with their protocols to ``metrics/<stage>_step<step>.json``."""
        folder = Path(self.output_dir or trainer.default_root_dir, "metrics")
        path = folder / f"{stage}_step{trainer.global_step:06d}.json"
        atomic_write_text(path, json.dumps(results, indent=2, default=str) + "\n")

    def note(self, key: str, message: str) -> None:
        if key not in self.warned:
            log.info(message)
            self.warned.add(key)

    def check_sampling(self, pl_module: L.LightningModule) -> None:
        """Refuse sampling options that a model would ignore: a first stage that does not
        generate (VQ-GAN, dVAE) takes none; one that does takes those its ``generate`` names, or
        those it has a setting of (``sampler``, ``guidance_scale``) when it passes ``**kwargs``
        on. The VAE, which decodes prior samples in one pass, takes none."""
        settings = {"sampler": "sampler", "steps": "sampler", "guidance_scale": "guidance_scale"}
        asked = [(key, value, key) for key, value in self.sampling.items() if value is not None]
        if len(self.guidance_scales) > 1:
            asked.append(("guidance_scales", self.guidance_scales, "guidance_scale"))
        elif self.guidance_scales[0] is not None:
            asked.append(("guidance_scale", self.guidance_scales[0], "guidance_scale"))
        name = type(pl_module).__name__
        if asked and not generates(pl_module):
            key, value, _ = asked[0]
            raise ValueError(
                f"callbacks.generative_metrics.{key}={value!r}: {name} does not generate (a first"
                " stage, measured by its reconstructions), so it takes no sampling options; leave"
                f" {key} null"
            )
        if self.generate_options and not generates(pl_module):
            raise ValueError(
                f"callbacks.generative_metrics.generate_options={self.generate_options}: "
                f"{name} does not generate; leave it empty"
            )
        parameters = (
            inspect.signature(pl_module.generate).parameters
            if asked or self.generate_options
            else {}
        )
        forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        unknown = sorted(set(self.generate_options) - set(parameters))
        if unknown and not forwards:
            raise ValueError(
                f"callbacks.generative_metrics.generate_options.{unknown[0]}: {name}.generate "
                f"takes no {unknown[0]!r}; it takes {sorted(parameters)}"
            )
        for key, value, parameter in asked:
            has_setting = hasattr(pl_module, settings[parameter])
            if parameter not in parameters and not (forwards and has_setting):
                raise ValueError(
                    f"callbacks.generative_metrics.{key}={value!r}: {name} has no {parameter} "
                    f"(its generate does not take one); leave {key} null"
                )


def generates(pl_module: L.LightningModule) -> bool:
    """Whether the module draws images with ``generate`` (the model contract)."""
    return callable(getattr(pl_module, "generate", None))


def reconstructs(pl_module: L.LightningModule) -> bool:
    """Whether the module is an autoencoder with ``reconstruct(images) -> images``."""
    return callable(getattr(pl_module, "reconstruct", None))


def own_captions(dataset: Any, n: int) -> dict[str, list[str]]:
    """The captions of items 0..n-1 as prompts, if every one has a caption (else nothing)."""
    captions = [dataset[i].get("caption") for i in range(n)]
    return {"prompts": captions} if all(isinstance(c, str) for c in captions) else {}


def parsable(prompts: list[str]) -> bool:
    """Whether every prompt is a shapes caption the oracle's labels can be read from."""
    try:
        for prompt in prompts:
            caption_cells(prompt)
    except ValueError:
        return False
    return True


def named_values(name: str, value: Any) -> dict[str, float]:
    """Flatten a metric's ``compute()`` into named floats: ``fid``, ``kid``/``kid_std``, ..."""
    if isinstance(value, dict):
        prefix = {"caption": "caption_", "clip": "", "reconstruction": ""}.get(name, f"{name}_")
        return {f"{prefix}{k}": float(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        names = {"kid": ("kid", "kid_std"), "is": ("is", "is_std"), "pr": ("precision", "recall")}[
            name
        ]
        return {k: float(v) for k, v in zip(names, value, strict=True)}
    return {name: float(value)}


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"callbacks.generative_metrics.{key}={value!r}: must be {allowed}")
