"""One leaderboard of every genlab family on shapes: train each family's shapes recipe under one
budget, evaluate every model under one protocol, and write one table, one plot and one picture.

    python bench/leaderboard.py                          # every family, 3 minutes of training each
    python bench/leaderboard.py --minutes 5 --threads 2 --num-samples 256
    python bench/leaderboard.py --only ddpm,gan --dry-run # the plan and its commands
    python bench/leaderboard.py --steps 30 --num-samples 64 --out logs/leaderboard_small
    python bench/leaderboard.py --eval callbacks.generative_metrics.oracle_checkpoint=<ckpt>

The protocol
------------
* **Models.** Every family's shapes recipe (``conf/experiment/*_shapes*.yaml``), trained by the
  real entry point, ``python src/train.py experiment=<recipe>``, as a subprocess, one at a time,
  on ``--threads`` CPU threads (``OMP_NUM_THREADS``). A family that chains runs gets its parts
  trained first, each a trained model of its own with its own time: LDM on a VAE and on a VQ-GAN
  first stage (64 px), DALL·E on dVAE and on VQ-GAN tokens (32 px), the Imagen cascade (base
  32 px + super-resolution 32 → 64 px), unCLIP (CLIP, prior, decoder). The autoencoders (those
  first stages and a VQ-VAE) are measured by their reconstructions, in a table of their own.
* **Budget.** The same for every trained model, one of: ``--minutes`` of training steps (default
  3), turned into the recipe's ``trainer.max_steps`` by a calibration run of the same recipe and
  overrides (the time of ``--calibration-steps`` steps after 5 warm-up steps, measured inside
  the run by ``genlab.callbacks.step_timer``); ``--images`` images seen (steps = images / the
  recipe's batch size); or ``--steps`` for every model. The budget sets ``max_steps`` and
  nothing else, and the learning-rate schedules, which read it, end with the run. Training
  runs without its final test (``test=false``: the evaluation below replaces it) and without the
  generative-metrics callback; validation, checkpoints and sample grids run as in the recipe,
  so the measured train seconds (the whole subprocess) exceed the budget by that overhead; fit
  seconds (first to last step) are recorded too. Ramps that a recipe sets in absolute steps (the
  first stages' ``disc_start``, the dVAE's temperature and KL ramps) are not rescaled: under a
  small budget they may not end, and the calibration's first 25 steps run without the
  adversary. The LDM's latent cache is built once per first stage by the first run that needs
  it (the calibration with ``--minutes``), outside the fit. The last checkpoint (the end of the
  schedule) is evaluated and built on.
* **Evaluation.** ``python src/eval.py`` on each model with one protocol: ``--num-samples`` images
  (default 256) for the val prompts from seed ``--seed`` against as many val images, with each
  model's own sampler, steps and guidance (recorded from the protocol that eval.py writes), and in
  the same run the real-image floor, shown next to every number: real images measured as if
  generated, against the same reference — the reference scenes drawn again
  (``eval.real_split=redrawn``) for the models whose images are paired with the reference items
  (text models, autoencoders), real test images (``eval.real_split=test``) for Glow.
* **Guidance curves.** For the families with classifier-free guidance (DDPM, LDM, Imagen: the
  base stage's scale, unCLIP: the decoder's, DALL·E: on the logits), eval.py's guidance sweep at
  ``--guidance-scales`` (same N and seed; the model's own scale comes from its evaluation):
  FID against caption exact, one panel per model with its FID floor, in ``guidance.png``.
* **Samples.** ``python src/sample.py`` draws one image for each of 8 fixed val captions (4 with
  one object, 4 with two) from every generator with its own sampling settings and seed
  ``--seed``; the unconditional Glow draws 8 images. ``samples.png`` puts them side by side,
  one row per model, upscaled with nearest-neighbour interpolation.
* **Resumable, failure-isolated.** Each step of a model (calibrate, train, eval, sweep, samples)
  runs in ``<out>/<model>/<step>/`` with its log ``<out>/<model>/<step>.log`` and leaves
  ``<out>/<model>/<step>.json``: ``done`` with its results, or ``failed`` with the error. A rerun
  skips what is done and retries what failed; a model whose dependency failed is skipped. The
  tables are written at the end from whatever is recorded. An output folder keeps one budget
  and protocol (``settings.json``): a rerun with other settings is refused.

Outputs in ``--out`` (default ``logs/leaderboard/``, git-ignored): ``leaderboard.md`` (every
table, the command, date, budget, threads and wall time), ``leaderboard.csv`` (generators),
``autoencoders.csv``, ``training.csv``, ``guidance.csv`` / ``guidance.png``, ``samples.png`` and
``prompts.txt``. Extra overrides pass through: ``--train KEY=VALUE`` to every train.py run,
``--set MODEL:KEY=VALUE`` to one model's, ``--eval KEY=VALUE`` to every eval.py run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's genlab, whatever is installed

WARMUP_STEPS = 5  # steps left out of the calibration's timing
PROMPTS_PER_KIND = 4  # sample-picture prompts with one object, and as many with two


@dataclasses.dataclass(frozen=True)
class Model:
    """A model of the leaderboard: trained from a recipe, or assembled from trained parts.

    ``{name}`` in ``train_args`` and ``assemble`` stands for the last checkpoint of the model of
    that name (one of ``deps``).
    """

    name: str  # its folder, and a name for --only / --set
    group: str  # the family key of --only: all the models a family needs
    family: str
    variant: str
    resolution: int
    kind: str  # generator | autoencoder (reconstructions table) | part (of an assembled model)
    recipe: str | None = None  # conf/experiment/<recipe>.yaml; None: assembled by `assemble`
    deps: tuple[str, ...] = ()
    train_args: tuple[str, ...] = ()
    assemble: tuple[str, ...] = ()  # eval.py / sample.py model overrides of an assembled model
    data: tuple[str, ...] = ()  # eval.py data overrides of an assembled model
    guided: bool = False  # has a classifier-free guidance scale: gets a guidance sweep
    conditional: bool = True  # draws from prompts (else: unconditional samples)


# In dependency order: a model comes after the models it builds on.
# fmt: off
MODELS = [
    Model("ddpm", "ddpm", "DDPM", "pixels (the default job)", 32, "generator", "ddpm_shapes",
          guided=True),
    Model("gan", "gan", "GAN", "DCGAN + projection D", 32, "generator", "gan_shapes"),
    Model("glow", "glow", "Glow", "unconditional", 32, "generator", "glow_shapes",
          conditional=False),
    Model("vae64", "ldm", "VAE", "KL-f4, LDM first stage", 64, "autoencoder", "vae_shapes_64"),
    Model("vqgan64", "ldm", "VQ-GAN", "f4, LDM first stage", 64, "autoencoder", "vqgan_shapes_64"),
    Model("ldm_vae", "ldm", "LDM", "VAE latents (16x16x4)", 64, "generator", "ldm_shapes",
          deps=("vae64",), train_args=("model.space.first_stage_ckpt={vae64}",), guided=True),
    # vqgan_shapes_64's latents have 32 channels (model.encoder.latent_channels); ldm_shapes's 4
    Model("ldm_vq", "ldm", "LDM", "VQ-GAN latents (16x16x32)", 64, "generator", "ldm_shapes",
          deps=("vqgan64",),
          train_args=("model.space.first_stage_ckpt={vqgan64}", "model.channels=32"),
          guided=True),
    Model("dvae", "dalle", "dVAE", "DALL·E tokenizer", 32, "autoencoder", "dvae_shapes"),
    Model("vqgan", "dalle", "VQ-GAN", "f4, DALL·E tokenizer", 32, "autoencoder", "vqgan_shapes"),
    Model("dalle_dvae", "dalle", "DALL·E", "dVAE tokens", 32, "generator", "dalle_shapes",
          deps=("dvae",), train_args=("model.tokenizer_ckpt={dvae}",), guided=True),
    Model("dalle_vqgan", "dalle", "DALL·E", "VQ-GAN tokens", 32, "generator", "dalle_shapes",
          deps=("vqgan",), train_args=("model.tokenizer_ckpt={vqgan}",), guided=True),
    Model("vqvae", "vqvae", "VQ-VAE", "f4", 32, "autoencoder", "vqvae_shapes"),
    Model("vq_prior_gpt", "vq_prior", "VQ prior", "Transformer on VQ-GAN codes", 32,
          "generator", "vq_prior_shapes", deps=("vqgan",),
          train_args=("model.tokenizer_ckpt={vqgan}",), conditional=False),
    Model("vq_prior_pixelcnn", "vq_prior", "VQ prior", "PixelCNN on VQ-GAN codes", 32,
          "generator", "vq_prior_shapes", deps=("vqgan",),
          train_args=("model.tokenizer_ckpt={vqgan}", "model/net=pixelcnn"), conditional=False),
    Model("ae", "ae", "AE", "f4, L2", 32, "autoencoder", "ae_shapes"),
    Model("dae", "ae", "DAE", "f4, L2, inputs + 0.5 ε", 32, "autoencoder", "dae_shapes"),
    Model("imagen_base", "imagen", "Imagen", "base stage, 32 px", 32, "part", "imagen_shapes"),
    Model("imagen_sr", "imagen", "Imagen", "SR stage, 32 → 64 px", 64, "part", "imagen_shapes_sr"),
    Model("imagen", "imagen", "Imagen", "cascade 32 → 64 px", 64, "generator",
          deps=("imagen_base", "imagen_sr"),
          assemble=("model=imagen_cascade", "model.stages=[{imagen_base},{imagen_sr}]"),
          data=("data=shapes", "data.resolution=64"), guided=True),
    Model("imagen_sr_blur", "imagen_blur", "Imagen", "SR stage, blur augmentation", 64, "part",
          "imagen_shapes_sr", train_args=("model.conditioners.low_res.augmentation=blur",)),
    Model("imagen_blur", "imagen_blur", "Imagen", "cascade 32 → 64 px, SR with blur aug.", 64,
          "generator", deps=("imagen_base", "imagen_sr_blur"),
          assemble=("model=imagen_cascade", "model.stages=[{imagen_base},{imagen_sr_blur}]"),
          data=("data=shapes", "data.resolution=64")),
    Model("clip", "unclip", "CLIP", "unCLIP's embeddings", 32, "part", "clip_shapes"),
    Model("unclip_prior", "unclip", "unCLIP", "prior", 32, "part", "unclip_prior_shapes",
          deps=("clip",), train_args=("model.clip_ckpt={clip}",)),
    Model("unclip_decoder", "unclip", "unCLIP", "decoder", 32, "part", "unclip_decoder_shapes",
          deps=("clip",), train_args=("model.conditioners.image_embed.clip_ckpt={clip}",)),
    Model("unclip", "unclip", "unCLIP", "prior + decoder", 32, "generator",
          deps=("unclip_prior", "unclip_decoder"),
          assemble=("model=unclip", "model.prior_ckpt={unclip_prior}",
                    "model.decoder_ckpt={unclip_decoder}"),
          data=("data=shapes",), guided=True),
]
# fmt: on
BY_NAME = {m.name: m for m in MODELS}

# generated-image metrics, in table order: (key in metrics.json, header)
METRICS = [
    ("fid", "FID ↓"),
    ("kid", "KID ↓"),
    ("precision", "precision ↑"),
    ("recall", "recall ↑"),
    ("is", "IS ↑"),
    ("caption_exact", "caption exact ↑"),
    ("caption_exact_1obj", "exact, 1 object ↑"),
    ("caption_exact_2obj", "exact, 2 objects ↑"),
]
ATTRIBUTES = [
    ("caption_shape", "shape ↑"),
    ("caption_color", "colour ↑"),
    ("caption_size", "size ↑"),
    ("caption_cell", "cell ↑"),
    ("caption_extra", "extra objects ↓"),
]
STD = {"kid": "kid_std", "is": "is_std"}  # shown as mean ± std
RECON_METRICS = [
    ("fid", "rFID ↓"),
    ("kid", "KID ↓"),
    ("precision", "precision ↑"),
    ("recall", "recall ↑"),
    ("psnr", "PSNR ↑"),
    ("ssim", "SSIM ↑"),
    ("caption_exact", "caption exact ↑"),
    ("caption_exact_1obj", "exact, 1 object ↑"),
    ("caption_exact_2obj", "exact, 2 objects ↑"),
]
CODEBOOK = {"codebook usage": "test/codebook_usage", "perplexity": "test/perplexity"}
# protocol fields that are not sampling settings (the rest are: sampler, guidance, weights, ...)
NOT_SAMPLING = {
    "extractor",
    "extractor_version",
    "kid_subsets",
    "kid_subset_size",
    "pr_k",
    "is_splits",
    "reference",
    "oracle_version",
    "clip_version",
    "num_samples",
    "seed",
    "seconds",
    "source",
}


class StepFailed(RuntimeError):
    """A step's subprocess exited with an error, or left no result."""


# ---------------------------------------------------------------------------------------------
# the plan
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="training minutes per model (default 3)")
    budget.add_argument("--images", type=int, help="images seen per model instead")
    budget.add_argument("--steps", type=int, help="optimizer steps per model (no calibration)")
    parser.add_argument("--calibration-steps", type=int, default=20, help="steps timed")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every run")
    parser.add_argument("--num-samples", type=int, default=256, help="images per evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seed of samples and evaluation")
    parser.add_argument(
        "--guidance-scales", default="1,3,5", help="the sweep's scales ('': no sweeps)"
    )
    parser.add_argument("--only", help="comma-separated families or models (with their deps)")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "leaderboard")
    parser.add_argument("--cell", type=int, default=128, help="pixels per sample in samples.png")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and commands")
    parser.add_argument("--train", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--set", action="append", default=[], metavar="MODEL:KEY=VALUE")
    args = parser.parse_args(argv)
    if args.minutes is None and args.images is None and args.steps is None:
        args.minutes = 3.0
    args.scales = [float(w) for w in args.guidance_scales.split(",") if w.strip()]
    args.model_args = {}
    for item in args.set:
        name, _, override = item.partition(":")
        if name not in BY_NAME or not override:
            parser.error(f"--set {item!r}: expected MODEL:KEY=VALUE, MODEL one of {list(BY_NAME)}")
        args.model_args.setdefault(name, []).append(override)
    args.out = args.out.resolve()
    return args


def select_models(only: str | None) -> list[Model]:
    """The models named by ``--only`` (model names or family keys) and what they build on, in
    dependency order; every model without ``--only``."""
    if not only:
        return list(MODELS)
    wanted = set()
    for key in (k.strip() for k in only.split(",") if k.strip()):
        found = {m.name for m in MODELS if key in (m.name, m.group)}
        if key == "autoencoders":
            found = {m.name for m in MODELS if m.kind == "autoencoder"}
        if not found:
            groups = sorted({m.group for m in MODELS} | {"autoencoders"})
            raise SystemExit(f"--only {key!r}: not a family {groups} or a model {list(BY_NAME)}")
        wanted |= found
    pending = list(wanted)
    while pending:
        for dep in BY_NAME[pending.pop()].deps:
            if dep not in wanted:
                wanted.add(dep)
                pending.append(dep)
    return [m for m in MODELS if m.name in wanted]


def steps_of(model: Model, args: argparse.Namespace) -> list[str]:
    """The steps a model goes through, in order."""
    steps = []
    if model.recipe:
        steps += (["calibrate"] if args.minutes is not None else []) + ["train"]
    if model.kind in ("generator", "autoencoder"):
        steps.append("eval")
    if model.guided and args.scales:
        steps.append("sweep")
    if model.kind == "generator":
        steps.append("samples")
    return steps


def budget_text(args: argparse.Namespace) -> str:
    if args.steps is not None:
        return f"{args.steps} optimizer steps per trained model (--steps)"
    if args.images is not None:
        return f"{args.images} images seen per trained model (--images; steps = images / batch)"
    return (
        f"{args.minutes:g} minutes of training steps per trained model (--minutes; max_steps from "
        f"{args.calibration_steps} steps timed after {WARMUP_STEPS} warm-up steps of each recipe)"
    )


# ---------------------------------------------------------------------------------------------
# commands
def checkpoint(args: argparse.Namespace, name: str) -> Path:
    """The checkpoint a trained model is evaluated and built on: the end of its schedule."""
    return args.out / name / "train" / "checkpoints" / "last.ckpt"


def value(path: Path) -> str:
    """A path as a Hydra override value: quoted when it holds characters Hydra would parse."""
    text = str(path)
    return text if re.fullmatch(r"[\w/.+~@-]+", text) else "'" + text.replace("'", "\\'") + "'"


def fill(overrides: tuple[str, ...], args: argparse.Namespace) -> list[str]:
    """``overrides`` with ``{name}`` replaced by the path of that model's checkpoint."""
    paths = {name: value(checkpoint(args, name)) for name in BY_NAME}
    return [o.format(**paths) for o in overrides]


def scale_list(scales: list[float]) -> str:
    return ",".join(f"{w:g}" for w in scales)


def python(script: str) -> list[str]:
    return [sys.executable, str(ROOT / "src" / script)]


def train_command(
    model: Model, args: argparse.Namespace, run_dir: Path, extra: list[str]
) -> list[str]:
    """train.py on the recipe with the user's overrides; no final test, no generative metrics."""
    return [
        *python("train.py"),
        f"experiment={model.recipe}",
        *fill(model.train_args, args),
        *args.train,
        *args.model_args.get(model.name, []),
        "test=false",
        "callbacks.generative_metrics=null",
        "optimized_metric=null",  # nothing to return to a sweeper
        *extra,
        f"hydra.run.dir={value(run_dir)}",
    ]


def calibration_overrides(args: argparse.Namespace) -> list[str]:
    """A short run that times its steps: no validation, no sample grids."""
    timer = f"{{_target_: genlab.callbacks.step_timer.StepTimer, warmup_steps: {WARMUP_STEPS}}}"
    return [
        f"trainer.max_steps={WARMUP_STEPS + args.calibration_steps}",
        "++trainer.limit_val_batches=0",
        "callbacks.sample_grid=null",
        f"+callbacks.step_timer={timer}",
    ]


def target(model: Model, args: argparse.Namespace, with_data: bool) -> list[str]:
    """What eval.py / sample.py load: the checkpoint, or the assembled model (and its data)."""
    if model.recipe:
        return [f"ckpt_path={value(checkpoint(args, model.name))}"]
    return fill(model.assemble, args) + (list(model.data) if with_data else [])


def eval_command(
    model: Model, args: argparse.Namespace, run_dir: Path, extra: list[str]
) -> list[str]:
    return [
        *python("eval.py"),
        *target(model, args, with_data=True),
        f"eval.num_samples={args.num_samples}",
        f"eval.seed={args.seed}",
        *extra,
        *args.eval,
        f"hydra.run.dir={value(run_dir)}",
    ]


def sample_command(model: Model, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """One image per fixed prompt (8 unconditional images), the model's own sampling settings."""
    inputs = [f"prompts_file={value(args.out / 'prompts.txt')}", "n=1"]
    if not model.conditional:
        inputs = [f"n={2 * PROMPTS_PER_KIND}"]
    return [
        *python("sample.py"),
        *target(model, args, with_data=False),
        *inputs,
        "cell=null",  # the native grid: write_samples_picture crops it
        f"seed={args.seed}",
        f"out={value(run_dir / 'samples.png')}",
        f"hydra.run.dir={value(run_dir)}",
    ]


def execute(cmd: list[str], log: Path, args: argparse.Namespace) -> float:
    """Run ``cmd`` from the repository root on ``--threads`` threads, output to ``log``;
    return its wall seconds. Raises StepFailed on a non-zero exit."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "HYDRA_FULL_ERROR": "1",
    }
    start = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n\n")
        f.flush()
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    if code != 0:
        raise StepFailed(f"exit code {code} after {seconds:.0f} s: {cmd[1]} (see the log)")
    return seconds


# ---------------------------------------------------------------------------------------------
# the steps: each runs its command(s) in run_dir and returns what its record keeps
def record_file(args: argparse.Namespace, model: Model, step: str) -> Path:
    return args.out / model.name / f"{step}.json"


def load_record(args: argparse.Namespace, model: Model, step: str) -> dict[str, Any] | None:
    path = record_file(args, model, step)
    return json.loads(path.read_text()) if path.is_file() else None


def run_step(args: argparse.Namespace, model: Model, step: str) -> dict[str, Any]:
    """Run one step of a model unless it is done; record and return its result or failure."""
    record = load_record(args, model, step)
    if record and record["status"] == "done":
        print(f"  {step}: done before, skipped")
        return record
    run_dir, log = args.out / model.name / step, args.out / model.name / f"{step}.log"
    shutil.rmtree(run_dir, ignore_errors=True)  # a previous attempt's leftovers
    run_dir.mkdir(parents=True)
    log.write_text("")
    print(f"  {step}: running (log {log})", flush=True)
    start = time.monotonic()
    try:
        record = {"status": "done", **STEPS[step](model, args, run_dir, log)}
    except StepFailed as err:
        record = {"status": "failed", "error": f"{err}: {last_line(log)}"}
    except Exception as err:  # a bug or a missing file: keep its traceback with the log
        with open(log, "a") as f:
            f.write("\n" + traceback.format_exc())
        record = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    record.update(step_seconds=round(time.monotonic() - start, 1), log=str(log))
    record["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    record_file(args, model, step).write_text(json.dumps(record, indent=2) + "\n")
    print(f"  {step}: {record['status']} in {record['step_seconds']:.0f} s", flush=True)
    if record["status"] == "failed":
        print(f"    {record['error']}")
    return record


def last_line(log: Path) -> str:
    """The last non-empty line of a log (where an entry point prints its error), shortened."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def calibrate(model: Model, args: argparse.Namespace, run_dir: Path, log: Path) -> dict:
    """Time the recipe's steps after a warm-up: seconds per step."""
    cmd = train_command(model, args, run_dir, calibration_overrides(args))
    execute(cmd, log, args)
    timing = json.loads((run_dir / "step_times.json").read_text())
    if not timing["seconds_per_step"]:
        raise StepFailed(f"no step was timed: {timing}")
    return {**timing, "command": shlex.join(cmd)}


def train(model: Model, args: argparse.Namespace, run_dir: Path, log: Path) -> dict:
    """Train for the budget's steps; record steps, images seen and seconds: of the subprocess,
    and of the fit from its first to its last step (validation in between included)."""
    max_steps, per_step = budget_steps(model, args)
    timer = "{_target_: genlab.callbacks.step_timer.StepTimer, warmup_steps: 0}"
    extra = [f"trainer.max_steps={max_steps}", f"+callbacks.step_timer={timer}"]
    cmd = train_command(model, args, run_dir, extra)
    seconds = execute(cmd, log, args)
    ckpt = checkpoint(args, model.name)
    if not ckpt.is_file():
        raise StepFailed(f"no checkpoint at {ckpt}")
    steps, data = trained_steps(ckpt), run_config(run_dir)["data"]
    fit = json.loads((run_dir / "step_times.json").read_text())
    return {
        "max_steps": max_steps,
        "steps": steps,
        "batch_size": data["batch_size"],
        "images": steps * data["batch_size"],
        "resolution": data["resolution"],
        "seconds_per_step": per_step,
        "fit_seconds": round(fit["seconds"], 1),
        "train_seconds": round(seconds, 1),
        "checkpoint": str(ckpt),
        "command": shlex.join(cmd),
    }


def budget_steps(model: Model, args: argparse.Namespace) -> tuple[int, float | None]:
    """``trainer.max_steps`` for the budget, and the calibrated seconds per step."""
    if args.steps is not None:
        return args.steps, None
    if args.images is not None:
        return math.ceil(args.images / recipe_batch_size(model, args)), None
    timing = load_record(args, model, "calibrate")
    per_step = timing["seconds_per_step"]
    return max(1, round(args.minutes * 60 / per_step)), per_step


def recipe_batch_size(model: Model, args: argparse.Namespace) -> int:
    """The batch size of the recipe with the run's overrides, from the composed config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = train_command(model, args, Path("."), [])[2:-1]  # the key=value part
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return int(compose("train.yaml", overrides=overrides).data.batch_size)


def run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved-as-saved config of a Hydra run (``.hydra/config.yaml``)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))


def trained_steps(ckpt: Path) -> int:
    """The optimizer steps a checkpoint was trained for."""
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


def floor_split(model: Model) -> str:
    """The real split of a model's floor: ``redrawn`` (the reference scenes drawn again, what
    a perfect model would give) for a model whose images are paired with the reference — a text
    model prompted with the reference captions, an autoencoder reconstructing the reference
    items; ``test`` (independent real images) for an unconditional one."""
    return "redrawn" if model.conditional or model.kind == "autoencoder" else "test"


def floor_of(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The floor result of an eval record, whichever real split it used."""
    return generated(record, "real_redrawn") or generated(record, "real_test")


def evaluate(model: Model, args: argparse.Namespace, run_dir: Path, log: Path) -> dict:
    """eval.py under the protocol, with the real-image floor; the report is metrics.json."""
    cmd = eval_command(model, args, run_dir, [f"eval.real_split={floor_split(model)}"])
    seconds = execute(cmd, log, args)
    report = json.loads((run_dir / "metrics.json").read_text())
    return {
        "eval_seconds": round(seconds, 1),
        "metrics_file": str(run_dir / "metrics.json"),
        "results": report["results"],
        "logged": report["metrics"],  # the model's own test metrics, e.g. codebook usage
        "command": shlex.join(cmd),
    }


def sweep(model: Model, args: argparse.Namespace, run_dir: Path, log: Path) -> dict:
    """eval.py's guidance sweep at the scales that the evaluation did not already measure."""
    own = generated(load_record(args, model, "eval"))
    own_scale = own["protocol"].get("guidance_scale") if own else None
    scales = [w for w in args.scales if own_scale is None or not math.isclose(w, own_scale)]
    if not scales:
        return {"results": [], "note": "the evaluation measured the only scale"}
    cmd = eval_command(model, args, run_dir, [f"eval.guidance_scales=[{scale_list(scales)}]"])
    seconds = execute(cmd, log, args)
    report = json.loads((run_dir / "metrics.json").read_text())
    return {
        "sweep_seconds": round(seconds, 1),
        "results": report["results"],
        "command": shlex.join(cmd),
    }


def samples(model: Model, args: argparse.Namespace, run_dir: Path, log: Path) -> dict:
    """sample.py for the fixed prompts: a column of images, one per prompt."""
    cmd = sample_command(model, args, run_dir)
    execute(cmd, log, args)
    png = run_dir / "samples.png"
    if not png.is_file():
        raise StepFailed(f"sample.py left no {png}")
    return {"png": str(png), "conditional": model.conditional, "command": shlex.join(cmd)}


STEPS = {
    "calibrate": calibrate,
    "train": train,
    "eval": evaluate,
    "sweep": sweep,
    "samples": samples,
}


# ---------------------------------------------------------------------------------------------
# running everything
def write_prompts(args: argparse.Namespace) -> list[str]:
    """The picture's prompts: the first val captions with one object, then with two."""
    from genlab.data.shapes import ShapesDataModule, caption_scene

    path = args.out / "prompts.txt"
    if path.is_file():
        return path.read_text().splitlines()
    val = ShapesDataModule(resolution=32).split("val")
    by_count: dict[int, list[str]] = {1: [], 2: []}
    for i in range(len(val)):
        objects = val.scene(i)[0]
        chosen = by_count.get(len(objects))
        if chosen is not None and len(chosen) < PROMPTS_PER_KIND:
            chosen.append(caption_scene(objects, template=0))
    prompts = by_count[1] + by_count[2]
    path.write_text("\n".join(prompts) + "\n")
    return prompts


def check_settings(args: argparse.Namespace) -> None:
    """Keep one budget and protocol per output folder: a rerun resumes only under the settings
    that its recorded steps were made with (``settings.json``)."""
    keys = ("minutes", "images", "steps", "calibration_steps", "threads", "num_samples", "seed")
    keys += ("scales", "train", "eval", "set")
    settings = {k: getattr(args, k) for k in keys}
    path = args.out / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise SystemExit(
            f"{args.out} holds a run with other settings ({path}: {path.read_text().strip()}); "
            "give another --out, or delete that folder to start over"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def trained(args: argparse.Namespace, model: Model) -> bool:
    """Whether a model's checkpoint is there to build on (its other steps do not matter)."""
    return (load_record(args, model, "train") or {}).get("status") == "done"


def run_all(args: argparse.Namespace, models: list[Model]) -> dict[str, str]:
    """Every step of every model, in order; returns each model's status."""
    status: dict[str, str] = {}
    for model in models:
        print(f"{model.name} ({model.family}, {model.variant})", flush=True)
        blocked = [d for d in model.deps if not trained(args, BY_NAME[d])]
        if blocked:
            status[model.name] = f"skipped: needs {', '.join(blocked)}"
            print(f"  {status[model.name]}")
            continue
        status[model.name] = "ok"
        for step in steps_of(model, args):
            record = run_step(args, model, step)
            if record["status"] != "done":
                status[model.name] = f"failed: {step} ({record['log']})"
                if step in ("calibrate", "train"):
                    break  # nothing to evaluate
    return status


def dry_run(args: argparse.Namespace, models: list[Model]) -> None:
    """Print each model's steps and their commands; run nothing."""
    print(f"budget: {budget_text(args)}; {args.threads} threads; output {args.out}")
    for model in models:
        print(f"\n{model.name} ({model.family}, {model.variant}, {model.resolution} px)")
        for step in steps_of(model, args):
            record = load_record(args, model, step)
            state = f" [{record['status']}]" if record else ""
            run_dir = args.out / model.name / step
            if step == "calibrate":
                cmd = train_command(model, args, run_dir, calibration_overrides(args))
            elif step == "train":
                cmd = train_command(model, args, run_dir, ["trainer.max_steps=<budget>"])
            elif step == "eval":
                cmd = eval_command(model, args, run_dir, [f"eval.real_split={floor_split(model)}"])
            elif step == "sweep":
                scales = f"eval.guidance_scales=[{scale_list(args.scales)}]"
                cmd = eval_command(model, args, run_dir, [scales])
            else:
                cmd = sample_command(model, args, run_dir)
            print(f"  {step}{state}: {shlex.join(cmd)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    models = select_models(args.only)
    if args.dry_run:
        dry_run(args, models)
        return
    start = time.monotonic()
    check_settings(args)
    prompts = write_prompts(args)
    status = run_all(args, models)
    wall = time.monotonic() - start
    write_outputs(args, models, status, prompts, wall, argv)
    failed = [name for name, s in status.items() if s != "ok"]
    print(f"\nleaderboard written to {args.out / 'leaderboard.md'}")
    print(f"total wall time {wall:.0f} s ({wall / 60:.1f} min); not ok: {failed or 'none'}")
    if failed:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# the outputs
def generated(record: dict[str, Any] | None, name: str = "generated") -> dict[str, Any] | None:
    """The result of that name in a step record (the first one), if the step is done."""
    if not record or record["status"] != "done":
        return None
    return next((r for r in record.get("results", []) if r["name"] == name), None)


def own_parts(model: Model) -> list[Model]:
    """The trained models whose training counts as this model's: itself, or its parts."""
    return [model] if model.recipe else [BY_NAME[d] for d in model.deps]


def builds_on(model: Model) -> list[str]:
    """Trained models it needs that are rows of their own (first stages, tokenizers, CLIP)."""
    parts = {p.name for p in own_parts(model)}
    return sorted({d for p in own_parts(model) for d in p.deps} - parts)


def training_columns(args: argparse.Namespace, model: Model) -> dict[str, Any]:
    """Steps, images seen and train seconds of a model's own training (summed over parts)."""
    records = [load_record(args, p, "train") for p in own_parts(model)]
    if not all(r and r["status"] == "done" for r in records):
        empty = ("train steps", "images seen", "train s")
        return {"resolution": model.resolution, **dict.fromkeys(empty)}
    return {
        "resolution": max(r["resolution"] for r in records),
        "train steps": " + ".join(str(r["steps"]) for r in records),
        "images seen": sum(r["images"] for r in records),
        "train s": round(sum(r["train_seconds"] for r in records)),
    }


def sampling_text(protocol: dict[str, Any]) -> str:
    """The sampling settings of a result's protocol, e.g. ``sampler ddim-50, guidance_scale 3``;
    an assembled model's stages after it, each in brackets."""
    text = "; ".join(
        f"{k} {v}" for k, v in protocol.items() if k not in NOT_SAMPLING and k != "stages"
    )
    for k, stage in enumerate(protocol.get("stages", []), 1):
        text += f"; stage {k} [" + "; ".join(f"{k} {v}" for k, v in stage.items()) + "]"
    return text


def metric_columns(
    result: dict[str, Any] | None, floor: dict[str, Any] | None, metrics: list[tuple[str, str]]
) -> dict[str, Any]:
    """Each metric and its floor (CSV: ``fid``, ``fid_floor``, ``kid_std``, ...)."""
    row: dict[str, Any] = {}
    for key, _ in metrics:
        row[key] = result["metrics"].get(key) if result else None
        if key in STD:
            row[STD[key]] = result["metrics"].get(STD[key]) if result else None
        row[f"{key}_floor"] = floor["metrics"].get(key) if floor else None
    return row


def generator_rows(args: argparse.Namespace, models: list[Model], status: dict[str, str]):
    rows = []
    for model in (m for m in models if m.kind == "generator"):
        record = load_record(args, model, "eval")
        result, floor = generated(record), floor_of(record)
        row = {
            "model": model.name,
            "family": model.family,
            "variant": model.variant,
            "resolution": model.resolution,
            "builds on": ", ".join(builds_on(model)),
            **training_columns(args, model),
            **metric_columns(result, floor, METRICS + ATTRIBUTES),
            "samples": result["protocol"].get("num_samples") if result else None,
            "sampling": sampling_text(result["protocol"]) if result else None,
            "eval s": round(record["eval_seconds"]) if result else None,
            "status": status.get(model.name, "not run"),
        }
        rows.append(row)
    return rows


def autoencoder_rows(args: argparse.Namespace, models: list[Model], status: dict[str, str]):
    rows = []
    for model in (m for m in models if m.kind == "autoencoder"):
        record = load_record(args, model, "eval")
        result, floor = generated(record, "reconstructed"), floor_of(record)
        rows.append(
            {
                "model": model.name,
                "family": model.family,
                "variant": model.variant,
                "resolution": model.resolution,
                **training_columns(args, model),
                **metric_columns(result, floor, RECON_METRICS),
                **{k: (record or {}).get("logged", {}).get(v) for k, v in CODEBOOK.items()},
                "samples": result["protocol"].get("num_samples") if result else None,
                "eval s": round(record["eval_seconds"]) if result else None,
                "status": status.get(model.name, "not run"),
            }
        )
    return rows


def training_rows(args: argparse.Namespace, models: list[Model], status: dict[str, str]):
    rows = []
    for model in (m for m in models if m.recipe):
        record = load_record(args, model, "train") or {}
        calibration = load_record(args, model, "calibrate") or {}
        done = record.get("status") == "done"
        rows.append(
            {
                "model": model.name,
                "family": model.family,
                "variant": model.variant,
                "recipe": f"experiment={model.recipe}",
                "resolution": record["resolution"] if done else model.resolution,
                "max_steps": record.get("max_steps") if done else None,
                "steps": record.get("steps") if done else None,
                "batch": record.get("batch_size") if done else None,
                "images seen": record.get("images") if done else None,
                "s / step (calibrated)": calibration.get("seconds_per_step"),
                "fit s": record.get("fit_seconds") if done else None,
                "train s": record.get("train_seconds") if done else None,
                "calibration s": calibration.get("step_seconds"),
                "status": status.get(model.name, "not run"),
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    headers = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=headers)
        writer.writeheader()
        writer.writerows(rows)


def cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def metric_cell(row: dict[str, Any], key: str) -> str:
    """``value ± std (floor)``."""
    text = cell(row.get(key))
    if key in STD and row.get(STD[key]) is not None:
        text += f" ± {cell(row[STD[key]])}"
    if row.get(f"{key}_floor") is not None:
        text += f" ({cell(row[f'{key}_floor'])})"
    return text


def markdown_table(rows: list[dict[str, Any]], plain: list[str], metrics, tail: list[str]) -> str:
    """Plain columns, then metric columns as ``value (floor)``, then the tail columns."""
    headers = plain + [f"{h} (floor)" for _, h in metrics] + tail
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [cell(row.get(k)) for k in plain] + [metric_cell(row, k) for k, _ in metrics]
        cells += [cell(row.get(k)) for k in tail]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def protocol_text(args: argparse.Namespace, models: list[Model]) -> str:
    """The evaluation protocol, from the first evaluation's record."""
    for model in models:
        result = generated(load_record(args, model, "eval")) or generated(
            load_record(args, model, "eval"), "reconstructed"
        )
        if result:
            p = result["protocol"]
            ref = p.get("reference", {})
            return (
                f"{args.num_samples} samples per model (seed {args.seed}) for the val prompts, "
                f"against {ref.get('num_images')} {ref.get('split')} images; features "
                f"{p.get('extractor')}@{p.get('extractor_version')}; KID on {p.get('kid_subsets')} "
                f"subsets of {p.get('kid_subset_size')}, precision/recall k = {p.get('pr_k')}; "
                f"extra eval overrides: {shlex.join(args.eval) or 'none'}"
            )
    return "no evaluation finished"


def write_outputs(
    args: argparse.Namespace,
    models: list[Model],
    status: dict[str, str],
    prompts: list[str],
    wall: float,
    argv: list[str] | None,
) -> None:
    """leaderboard.md and the CSVs, the guidance plot and the samples picture."""
    generators = generator_rows(args, models, status)
    autoencoders = autoencoder_rows(args, models, status)
    training = training_rows(args, models, status)
    write_csv(args.out / "leaderboard.csv", generators)
    write_csv(args.out / "autoencoders.csv", autoencoders)
    write_csv(args.out / "training.csv", training)
    curves = write_guidance(args, models)
    picture = write_samples_picture(args, models, prompts)
    recorded = sum(
        (load_record(args, m, s) or {}).get("step_seconds", 0)
        for m in models
        for s in steps_of(m, args)
    )
    command = shlex.join(
        ["python", "bench/leaderboard.py", *(sys.argv[1:] if argv is None else argv)]
    )
    lines = [
        "# genlab leaderboard",
        "",
        f"* command: `{command}`",
        f"* date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"* budget: {budget_text(args)}",
        f"* threads: {args.threads} (OMP_NUM_THREADS) of {os.cpu_count()} CPU cores",
        f"* wall time: {wall:.0f} s ({wall / 60:.1f} min) for this invocation; {recorded:.0f} s "
        "in all the recorded steps (earlier invocations included)",
        f"* protocol: {protocol_text(args, models)}",
        "* every metric reads `value (floor)`: the floor is the same metric of real images"
        " against the same reference, from the same eval.py run: for the text models and the"
        " autoencoders, whose images are paired with the reference items, the reference scenes"
        " drawn again (`eval.real_split=redrawn`: what a perfect model would score); for the"
        " unconditional Glow, real test images (`eval.real_split=test`)",
        "",
        "## Generators",
        "",
        markdown_table(
            generators,
            ["family", "variant", "resolution", "builds on", "train steps", "images seen"],
            METRICS,
            ["train s", "eval s", "sampling", "status"],
        ),
        "",
        "### Caption accuracy by attribute",
        "",
        markdown_table(generators, ["family", "variant"], ATTRIBUTES, []),
        "",
        "## Autoencoders: reconstructions",
        "",
        "Reconstructions of the reference's own val items: a perfect autoencoder scores rFID 0; "
        "the floor (the same scenes drawn again) is there for scale.",
        "",
        markdown_table(
            autoencoders,
            ["family", "variant", "resolution", "train steps", "images seen"],
            RECON_METRICS,
            ["codebook usage", "perplexity", "train s", "eval s", "status"],
        ),
        "",
        "## Training",
        "",
        markdown_table(training, list(training[0]) if training else [], [], []),
        "",
    ]
    if curves:
        lines += ["## Guidance", "", f"![guidance curves]({curves.name})", ""]
    if picture:
        lines += ["## Samples", "", f"![samples]({picture.name})", ""]
    problems = [f"* {name}: {s}" for name, s in status.items() if s != "ok"]
    if problems:
        lines += ["## Failed or skipped", "", *problems, ""]
    (args.out / "leaderboard.md").write_text("\n".join(lines))
    print("\n".join(lines))


def write_guidance(args: argparse.Namespace, models: list[Model]) -> Path | None:
    """guidance.csv and guidance.png: FID against caption exact over guidance scales."""
    rows = []
    for model in (m for m in models if m.guided):
        evaluation = load_record(args, model, "eval")
        floor = floor_of(evaluation)
        results = [generated(evaluation)]
        sweep_record = load_record(args, model, "sweep")
        if sweep_record and sweep_record["status"] == "done":
            results += [r for r in sweep_record["results"] if r["name"] == "generated"]
        for result in filter(None, results):
            scale = result["protocol"].get("guidance_scale")
            if scale is None:
                continue
            rows.append(
                {
                    "model": model.name,
                    "family": model.family,
                    "variant": model.variant,
                    "guidance_scale": float(scale),
                    **{k: result["metrics"].get(k) for k, _ in METRICS},
                    "fid_floor": floor["metrics"]["fid"] if floor else None,
                }
            )
    if not rows:
        return None
    rows.sort(key=lambda r: (list(BY_NAME).index(r["model"]), r["guidance_scale"]))
    write_csv(args.out / "guidance.csv", rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    cols = min(3, len(names))
    lines = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4 * cols, 3.3 * lines), dpi=110, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        points = [r for r in rows if r["model"] == name]
        ax.plot([p["caption_exact"] for p in points], [p["fid"] for p in points], "o-")
        for p in points:
            ax.annotate(
                f"w={p['guidance_scale']:g}",
                (p["caption_exact"], p["fid"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        if points[0]["fid_floor"] is not None:
            ax.axhline(points[0]["fid_floor"], color="gray", linestyle="--", label="floor (real)")
            ax.legend(fontsize=7)
        ax.set_title(f"{points[0]['family']} ({points[0]['variant']})", fontsize=9)
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("caption exact ↑", fontsize=8)
        ax.set_ylabel("FID ↓", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    title = f"Guidance scale w: FID against caption exact (N = {args.num_samples})"
    fig.suptitle(
        title if cols > 1 else title.replace(": ", ":\n"), fontsize=10 if cols == 1 else 12
    )
    fig.tight_layout()
    path = args.out / "guidance.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def grid_images(png: Path, count: int, nrow: int) -> list:
    """The images of a sample.py grid: ``count`` squares in rows of ``nrow``, 2 px apart
    (genlab.utils.images.image_grid's padding)."""
    from PIL import Image

    pad = 2
    grid = Image.open(png).convert("RGB")
    side = (grid.width - pad) // nrow - pad
    cells = []
    for k in range(count):
        x, y = pad + (k % nrow) * (side + pad), pad + (k // nrow) * (side + pad)
        cells.append(grid.crop((x, y, x + side, y + side)))
    return cells


def write_samples_picture(
    args: argparse.Namespace, models: list[Model], prompts: list[str]
) -> Path | None:
    """samples.png: one row per generator, one column per prompt, with labels."""
    from PIL import Image, ImageDraw, ImageFont

    rows = []
    for model in (m for m in models if m.kind == "generator"):
        record = load_record(args, model, "samples")
        if record and record["status"] == "done":
            n = len(prompts)
            nrow = 1 if model.conditional else math.ceil(math.sqrt(n))
            rows.append((model, grid_images(Path(record["png"]), n, nrow)))
    if not rows:
        return None
    font = ImageFont.load_default(size=12)
    size, label_width, gap, line = args.cell, 150, 4, 15
    captions = [textwrap.fill(p, max(8, size // 7)) for p in prompts]
    header = line * max(c.count("\n") + 1 for c in captions) + 8
    width = label_width + len(prompts) * (size + gap)
    picture = Image.new("RGB", (width, header + len(rows) * (size + gap)), "white")
    draw = ImageDraw.Draw(picture)
    for j, caption in enumerate(captions):
        x = label_width + j * (size + gap)
        draw.multiline_text((x, 4), caption, fill="black", font=font)
    for i, (model, images) in enumerate(rows):
        y = header + i * (size + gap)
        variant = textwrap.fill(model.variant.replace("→", "->"), 20)  # the font has no arrow
        label = f"{model.family}\n{variant}\n{images[0].width} px"
        if not model.conditional:
            label += "\n(unconditional:\nno prompt)"
        draw.multiline_text((4, y + 4), label, fill="black", font=font)
        for j, image in enumerate(images):
            x = label_width + j * (size + gap)
            picture.paste(image.resize((size, size), Image.NEAREST), (x, y))
    path = args.out / "samples.png"
    picture.save(path)
    return path


if __name__ == "__main__":
    main()
