"""Generative metrics during training and from ``eval.py``: FID, KID, IS, precision/recall, CLIP
score and caption accuracy of generated images, rFID, PSNR and SSIM of reconstructions, correct
under DDP, each number with its protocol.

This module holds the Lightning hooks and the wiring; the protocol they follow is described in
``genlab.evaluation``, whose modules hold the pieces (protocol, generation, measure, tools,
references, reconstruction).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from genlab.evaluation import protocol as proto
from genlab.evaluation.generation import (
    generate_chunk,
    random_captions,
    sample_conditions,
    sampling_options,
)
from genlab.evaluation.measure import measure
from genlab.evaluation.protocol import METRICS, check_options, generates, reconstructs
from genlab.evaluation.reconstruction import evaluate_real, evaluate_reconstructed
from genlab.evaluation.references import reference_for
from genlab.evaluation.tools import load_tools
from genlab.evaluation.verdicts import verdicts
from genlab.utils.io import atomic_write_text
from genlab.utils.rank_logging import RankedLogger
from genlab.utils.sharding import full_weights
from genlab.utils.wandb_logging import attach_files, log_samples_table, wandb_loggers

log = RankedLogger(__name__, rank_zero_only=True)

LOG_NAMES = {"reconstructed": "recon"}  # result name -> its part of the logged keys


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
        clip_model: a pretrained Hugging Face CLIP (a local folder written by
            ``save_pretrained``, or a Hub name in the local cache) for the CLIP score instead of
            genlab's own (:mod:`genlab.metrics.pretrained_clip`); None: ``clip_checkpoint``.
        clip_download: let transformers download ``clip_model`` (default: local files only).
        prompt_split, prompt_seed: None: the prompts of a text model are the datamodule's
            ``sample_prompts`` (item i: the caption of val item i, paired with the reference
            when ``reference_split`` is val); a split: ``num_samples`` captions drawn at random
            with ``prompt_seed`` from every caption of that split's images
            (:func:`genlab.evaluation.generation.random_captions`; the COCO-30k protocol).
        preset: the name of the evaluation preset these settings come from (e.g. ``coco30k``),
            stated in every result's protocol.
        reference_split, num_reference: real images the generated ones are compared with
            (default ``num_samples``, capped at the split's size); a reconstructing model
            reconstructs the first ``num_samples`` of them.
        real_split: also evaluate real images of this split as if generated (the floor).
        cache_dir: reference-statistics cache folder (None: no cache).
        output_dir: the run folder for ``metrics/*.json``; default ``trainer.default_root_dir``.
        kid_subsets, kid_subset_size, pr_k, is_splits: the metrics' own settings.
        table_size: with a W&B logger, log a table of the first ``table_size`` generated images
            of every evaluation (prompt or label, the image, the oracle's verdict where the run
            has an oracle that reads the prompts) as ``<stage>/samples``; 0: none. Only the images
            that rank zero drew are kept (all of them when ``table_size <= batch_size``). The metric
            JSON (and ``samples/gallery.html`` when there is one) is attached to the W&B run as
            the artifact ``evaluation-<run id>``. Both on global rank zero only.
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
        clip_model: str | None = None,
        clip_download: bool = False,
        prompt_split: str | None = None,
        prompt_seed: int = 0,
        preset: str | None = None,
        reference_split: str = "val",
        num_reference: int | None = None,
        real_split: str | None = None,
        cache_dir: str | None = None,
        output_dir: str | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        pr_k: int = 3,
        is_splits: int = 10,
        table_size: int = 16,
    ) -> None:
        check_options(
            num_samples=num_samples,
            batch_size=batch_size,
            every_n_epochs=every_n_epochs,
            metrics=metrics,
            features=features,
            fallback=fallback,
            guidance_scales=guidance_scales,
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
        self.pretrained_clip = (
            {"name": clip_model, "allow_download": clip_download} if clip_model else None
        )
        self.prompt_split, self.prompt_seed, self.preset = prompt_split, prompt_seed, preset
        self.prompt_info: dict[str, Any] = {}
        self.reference_split, self.num_reference = reference_split, num_reference
        self.real_split = real_split
        self.cache_dir, self.output_dir = cache_dir, output_dir
        self.settings = {
            "kid_subsets": kid_subsets,
            "kid_subset_size": kid_subset_size,
            "pr_k": pr_k,
            "is_splits": is_splits,
        }
        self.table_size = table_size
        self.kept: dict[int, torch.Tensor] = {}  # item -> image, for the W&B table (rank zero)
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
        try:  # full_weights: every rank gathers FSDP's shards once, then draws on its own
            with trainer.precision_plugin.forward_context(), full_weights(pl_module):
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
        reference, ref_info = self.reference(trainer, tools)
        results = []

        def measure_with(source, n, conditions, *, originals=None, skip=(), paired=False):
            return self.measure(
                trainer,
                tools,
                reference,
                conditions,
                source,
                n,
                originals=originals,
                skip=skip,
                paired=paired,
            )

        def base(n: int | None = None) -> dict[str, Any]:
            return self.base_protocol(tools, ref_info, n)

        if generates(pl_module):
            conditions = self.conditions(pl_module, datamodule)
            for scale in self.guidance_scales:
                start = time.monotonic()
                source = functools.partial(self.generate, pl_module, conditions, scale=scale)
                source = self.keeping(trainer, source)
                paired = (
                    "prompts" in conditions
                    and self.reference_split == "val"
                    and self.prompt_split is None
                )
                values = self.measure(
                    trainer,
                    tools,
                    reference,
                    conditions,
                    source,
                    paired=paired,
                    what="generated images" + ("" if scale is None else f" (w = {scale:g})"),
                )
                n, paired = values.pop("num_samples"), values.pop("paired")
                if not n:  # no metric reads them: none were drawn
                    continue
                protocol = self.protocol(pl_module, tools, ref_info, scale, n)
                protocol["paired"] = paired  # prompt i is reference item i's caption
                protocol["seconds"] = round(time.monotonic() - start, 2)
                results.append({"name": "generated", "protocol": protocol, "metrics": values})
                self.log_table(trainer, stage, conditions, scale)
        if reconstructs(pl_module):
            results.append(
                evaluate_reconstructed(
                    pl_module,
                    datamodule,
                    split=self.reference_split,
                    num_samples=self.num_samples,
                    measure=measure_with,
                    protocol=base,
                )
            )
        if self.real_split is not None:
            results.append(
                evaluate_real(
                    datamodule,
                    split=self.real_split,
                    reference_split=self.reference_split,
                    num_samples=self.num_samples,
                    measure=measure_with,
                    protocol=base,
                )
            )
        return [r for r in results if r["metrics"]]  # a set no metric could read is left out

    def measure(
        self,
        trainer,
        tools,
        reference,
        conditions,
        source,
        n=None,
        *,
        originals=None,
        skip=(),
        paired=False,
        what=None,
    ) -> dict:
        """Draw this rank's chunks from ``source(items)``, update the synced metrics, compute
        (:func:`genlab.evaluation.measure.measure`); ``skip`` names metrics left out; ``paired``:
        item i was made for reference item i."""
        return measure(
            source,
            self.num_samples if n is None else n,
            wanted=self.metrics - set(skip),
            settings=self.settings,
            tools=tools,
            reference=reference,
            conditions=conditions,
            batch_size=self.batch_size,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            device=trainer.strategy.root_device,
            note=self.note,
            originals=originals,
            paired=paired,
            what=what or ("reconstructions" if originals is not None else "images"),
        )

    # ------------------------------------------------------------------------------------------
    # pieces
    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Load the feature extractor and evaluators once (building a missing one first)."""
        if self.tools is None:
            self.tools = load_tools(
                features=self.features,
                inception_weights=self.inception_weights,
                fallback=self.fallback,
                evaluators=self.evaluators,
                metrics=self.metrics,
                pl_module=pl_module,
                datamodule=trainer.datamodule,
                device=trainer.strategy.root_device,
                pretrained_clip=self.pretrained_clip,
            )
        return self.tools

    def conditions(self, pl_module: L.LightningModule, datamodule: Any) -> dict[str, list]:
        """The prompts (or labels) of the generated items: the datamodule's sample prompts, or
        with ``prompt_split`` captions drawn at random from that split (for a text model)."""
        if self.prompt_split is None or getattr(pl_module, "condition", None) != "text":
            return sample_conditions(pl_module, datamodule, self.num_samples)
        prompts, pool = random_captions(
            datamodule, self.num_samples, split=self.prompt_split, seed=self.prompt_seed
        )
        self.prompt_info = {
            "source": "random captions",
            "split": self.prompt_split,
            "seed": self.prompt_seed,
            "pool": pool,
            "distinct": len(set(prompts)),
        }
        log.info(
            f"prompts: {len(prompts)} captions drawn at random (seed {self.prompt_seed}) from "
            f"the {pool} captions of the {self.prompt_split} split"
        )
        return {"prompts": prompts}

    def reference(self, trainer, tools) -> tuple[torch.Tensor | None, dict]:
        """The real features (cached), or None when no feature metric is asked for."""
        if not self.metrics & {"fid", "kid", "pr"} or "extractor" not in tools:
            return None, {}
        return reference_for(
            trainer,
            extractor=tools["extractor"],
            split=self.reference_split,
            num_images=self.num_reference or self.num_samples,
            cache_dir=self.cache_dir,
            batch_size=self.batch_size,
        )

    def keeping(self, trainer: L.Trainer, source):
        """``source`` that also keeps, on global rank zero with a W&B logger, the images of the
        first ``table_size`` items for the table."""
        self.kept = {}
        if not (self.table_size and trainer.is_global_zero and wandb_loggers(trainer.loggers)):
            return source

        def draw(items: range) -> torch.Tensor:
            images = source(items)
            for k, item in enumerate(items):
                if item < self.table_size:
                    self.kept[item] = images[k].detach().float().cpu()
            return images

        return draw

    def log_table(self, trainer: L.Trainer, stage: str, conditions: dict, scale) -> None:
        """The W&B table of the kept images: prompt (or label), image, the oracle's verdict."""
        if not self.kept:
            return
        items = sorted(self.kept)
        images = torch.stack([self.kept[i] for i in items])
        if "prompts" in conditions:
            texts = [conditions["prompts"][i] for i in items]
            judged = verdicts((self.tools or {}).get("oracle"), images, texts)
        else:
            labels = conditions.get("labels")
            texts = [f"label {labels[i]}" if labels else f"sample {i}" for i in items]
            judged = None
        key = (
            f"{stage}/samples" if len(self.guidance_scales) == 1 else f"{stage}/w{scale:g}/samples"
        )
        log_samples_table(trainer.loggers, key, images, texts, judged, step=trainer.global_step)
        self.kept = {}

    def generate(self, pl_module, conditions: dict, items: range, *, scale) -> torch.Tensor:
        """Images of ``items``: one chunk, from its own seeded generator."""
        options = sampling_options(self.sampling, self.generate_options, scale)
        return generate_chunk(
            pl_module,
            conditions,
            items,
            seed=self.seed,
            batch_size=self.batch_size,
            options=options,
        )

    # ------------------------------------------------------------------------------------------
    # protocol, logging, files
    def base_protocol(self, tools, ref_info, n: int | None = None) -> dict[str, Any]:
        """Extractor, evaluator versions, reference and metric settings in effect for n images."""
        n = self.num_samples if n is None else n
        protocol = proto.base_protocol(tools, ref_info, self.settings, n)
        return {"preset": self.preset, **protocol} if self.preset else protocol

    def protocol(self, pl_module, tools, ref_info, scale, num_samples: int) -> dict[str, Any]:
        """The protocol of generated images: sampler, steps and guidance scale where the model
        has them (a VAE draws from its prior in one pass: none), seed and weights."""
        sampling = proto.sampling_protocol(pl_module, self.sampling, self.generate_options, scale)
        return {
            **self.base_protocol(tools, ref_info),
            "num_samples": num_samples,
            **sampling,
            **({"generate_options": self.generate_options} if self.generate_options else {}),
            **({"prompts": self.prompt_info} if self.prompt_info else {}),
            "seed": self.seed,
            "weights": proto.weights_of(pl_module),
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
        gallery = Path(self.output_dir or trainer.default_root_dir, "samples", "gallery.html")
        metadata = {"stage": stage, "step": trainer.global_step}
        attach_files(trainer.loggers, [path, gallery], kind="evaluation", metadata=metadata)

    def note(self, key: str, message: str) -> None:
        if key not in self.warned:
            log.info(message)
            self.warned.add(key)

    def check_sampling(self, pl_module: L.LightningModule) -> None:
        """Refuse sampling options that the model would ignore
        (:func:`genlab.evaluation.protocol.check_sampling`)."""
        proto.check_sampling(pl_module, self.sampling, self.guidance_scales, self.generate_options)
