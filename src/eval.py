"""Evaluate a checkpoint: ``python src/eval.py ckpt_path=... [data=...]`` (``conf/eval.yaml``).

Rebuild the model from the checkpoint alone (``genlab.load``), run ``trainer.test`` on the
datamodule stored in the checkpoint (or the one given as ``data=``) with the generative-metrics
callback (``callbacks/generative_metrics.yaml``, protocol options under ``eval``), and write a
JSON report to ``metrics_file`` (default ``<run folder>/metrics.json``): every logged metric, and
each generative result with its protocol. A first-stage autoencoder (VAE, VQ-GAN, dVAE) is
measured by its reconstructions (the result ``reconstructed``: rFID, KID, precision/recall,
caption accuracy, PSNR, SSIM, logged as ``test/recon/...``); the VAE also by its prior samples
(``generated``). Sampling options (``sampler``, ``eval.steps``, guidance scales) are refused for a
model that does not generate. A guidance sweep (``eval.guidance_scales=[1,2,4,8]``)
also writes ``sweep.md``, ``sweep.csv`` and ``sweep.png`` (FID against CLIP score, or against
caption accuracy without CLIP). ``+compare=[a.ckpt, b.ckpt, run_dir, report.json]`` evaluates the
checkpoints under this one protocol, reads the reports, and writes a leaderboard
(``leaderboard.md``, ``leaderboard.csv``).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from genlab.evaluation.protocol import generates
from genlab.utils.checkpoint import DATA_CONFIG_KEY, model_from_checkpoint, read_checkpoint
from genlab.utils.frozen_parts import build_missing_parts
from genlab.utils.instantiate import instantiate
from genlab.utils.instantiators import instantiate_callbacks, instantiate_loggers
from genlab.utils.io import atomic_write_text
from genlab.utils.rank_logging import RankedLogger
from genlab.utils.task import (
    Preempted,
    TaskResult,
    extras,
    null_group_overrides,
    task_wrapper,
)
from genlab.utils.validation import ConfigError, validate_config
from genlab.utils.wandb_logging import attach_files

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
log = RankedLogger(__name__, rank_zero_only=True)

TOP_LEVEL = {
    "task_name": str,
    "tags": list[str] | None,
    "ckpt_path": str | None,
    "seed": int | None,
    "metrics_file": str,
    "compare": list[str] | None,
}
# leaderboard columns: (report key, header)
COLUMNS = [
    ("fid", "FID ↓"),
    ("kid", "KID ↓"),
    ("is", "IS ↑"),
    ("precision", "precision ↑"),
    ("recall", "recall ↑"),
    ("caption_exact", "caption exact ↑"),
    ("caption_exact_1obj", "1 object ↑"),
    ("caption_exact_2obj", "2 objects ↑"),
    ("clip_score", "CLIP score ↑"),
    ("psnr", "PSNR ↑"),  # reconstructions
    ("ssim", "SSIM ↑"),
]
# eval options that only a model that generates can use
SAMPLING_KEYS = ("steps", "guidance_scale", "guidance_scales")
# protocol fields that must agree for numbers to be compared
PROTOCOL_KEYS = ("extractor", "extractor_version", "num_samples", "reference", "oracle_version")


@task_wrapper
def evaluate(cfg: DictConfig) -> TaskResult:
    """Evaluate ``cfg.ckpt_path`` or ``cfg.model`` (or compare several runs); save the report(s)."""
    if cfg.get("compare"):
        return compare(cfg), {"cfg": cfg}
    report, objects = evaluate_checkpoint(cfg, cfg.ckpt_path, Path(cfg.metrics_file))
    return report["metrics"], objects


def evaluate_checkpoint(
    cfg: DictConfig, ckpt_path: str, metrics_file: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Test one checkpoint with the generative metrics; write and return its report."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if ckpt_path:
        ckpt = read_checkpoint(ckpt_path)
        model = model_from_checkpoint(ckpt, path=ckpt_path)
    else:  # a model assembled from other checkpoints, e.g. model=imagen_cascade
        ckpt = {}
        log.info(f"instantiating model <{cfg.model._target_}>")
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        build_missing_parts(model_cfg)
        model = instantiate(model_cfg)
    check_sampling(cfg, model)
    data_cfg = data_config(cfg, ckpt)
    log.info(f"instantiating data <{data_cfg['_target_']}>")
    datamodule = instantiate(data_cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks")) if cfg.eval.metrics else []
    loggers = instantiate_loggers(cfg.get("logger"), output_dir=cfg.paths.output_dir)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    trainer.test(model, datamodule=datamodule)
    results = [r for cb in callbacks for r in getattr(cb, "results", [])]
    report = {
        "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
        "results": results,
        "method": type(model).__name__,
        "ckpt_path": str(ckpt_path),
        "data_cfg": data_cfg,
    }
    write_report(metrics_file, report)
    if cfg.eval.get("guidance_scales") and len(cfg.eval.guidance_scales) > 1:
        write_sweep(metrics_file.parent, results)
    sweep = [metrics_file.parent / f"sweep.{ext}" for ext in ("md", "csv", "png")]
    attach_files(  # a W&B logger (logger=wandb) gets the report and the sweep's plot
        loggers, [metrics_file, *sweep], kind="evaluation", metadata={"ckpt_path": str(ckpt_path)}
    )
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}
    return report, objects


def check_sampling(cfg: DictConfig, model: L.LightningModule) -> None:
    """Refuse sampling options for a model that does not generate (a VQ-GAN or dVAE first stage,
    measured by its reconstructions) rather than ignore them."""
    if generates(model):
        return
    asked = [f"eval.{k}={cfg.eval.get(k)}" for k in SAMPLING_KEYS if cfg.eval.get(k) is not None]
    if cfg.get("sampler") is not None:
        asked.append(f"sampler={cfg.sampler.get('name', cfg.sampler)}")
    if asked:
        raise ConfigError(
            f"{', '.join(asked)}: {type(model).__name__} does not generate (a first-stage "
            "autoencoder, measured by its reconstructions: rFID, PSNR, SSIM), so it has no "
            "sampler, steps or guidance scale; leave them out"
        )


def data_config(cfg: DictConfig, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The ``data=`` config if one was given, else the one stored in the checkpoint."""
    if cfg.get("data") is not None:
        return OmegaConf.to_container(cfg.data, resolve=True)
    if ckpt.get(DATA_CONFIG_KEY) is None:
        what = f"ckpt_path={cfg.ckpt_path!r} stores" if cfg.get("ckpt_path") else "model= has"
        raise ValueError(f"{what} no data config: choose one, e.g. data=shapes")
    log.info("using the data config stored in the checkpoint")
    return ckpt[DATA_CONFIG_KEY]


@rank_zero_only
def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write the report as JSON (atomically); print the path."""
    atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")
    log.info(f"metrics: {report['metrics']}")
    for result in report["results"]:
        print(summary_line(result))
    print(f"metrics written to {path}")


def summary_line(result: dict[str, Any]) -> str:
    """One line per result: its name, what was measured, and its numbers."""
    protocol = result["protocol"]
    what = protocol.get("source") or (
        f"sampler {protocol['sampler']}, w={protocol.get('guidance_scale')}"
        if protocol.get("sampler")
        else "samples"
    )
    numbers = ", ".join(f"{k}={format_cell(v)}" for k, v in result["metrics"].items())
    return (
        f"{result['name']} ({what}; {protocol.get('extractor')}, n={protocol.get('num_samples')}):"
        f" {numbers}"
    )


# ---------------------------------------------------------------------------------------------
# guidance sweep
def sweep_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per guidance scale of the generated results: w and every metric."""
    rows = []
    for result in results:
        if result.get("name") == "generated":
            rows.append(
                {"guidance_scale": result["protocol"]["guidance_scale"], **result["metrics"]}
            )
    return sorted(rows, key=lambda row: row["guidance_scale"])


@rank_zero_only
def write_sweep(folder: Path, results: list[dict[str, Any]]) -> None:
    """The FID-vs-text-alignment trade-off over guidance scales: ``sweep.md/.csv/.png``."""
    rows = sweep_rows(results)
    headers = list(dict.fromkeys(k for row in rows for k in row))
    write_table(folder / "sweep", rows, headers, title="Guidance-scale sweep")
    alignment = next((k for k in ("clip_score", "caption_exact") if k in headers), None)
    if "fid" in headers and alignment:
        plot_tradeoff(folder / "sweep.png", rows, alignment)
    print(f"guidance sweep written to {folder / 'sweep.md'}")


def plot_tradeoff(path: Path, rows: list[dict[str, Any]], alignment: str) -> None:
    """FID (y) against the alignment metric (x), one point per guidance scale, labelled w."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [row[alignment] for row in rows]
    y = [row["fid"] for row in rows]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(x, y, marker="o")
    for row, xi, yi in zip(rows, x, y, strict=True):
        ax.annotate(
            f"w={row['guidance_scale']:g}",
            (xi, yi),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel(alignment.replace("_", " "))
    ax.set_ylabel("FID")
    ax.set_title("Guidance scale: fidelity vs. alignment")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_table(stem: Path, rows: list[dict[str, Any]], headers: list[str], title: str) -> None:
    """``rows`` as a Markdown table (``<stem>.md``, also printed) and a CSV (``<stem>.csv``)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=headers)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(h)) for h in headers) + " |")
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    print(text)


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# leaderboard
def compare(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the ``.ckpt`` entries under this protocol, read the others' reports, and write
    ``leaderboard.md`` / ``leaderboard.csv`` in the run folder."""
    out = Path(cfg.paths.output_dir)
    reports = []
    for k, entry in enumerate(cfg.compare):
        path = Path(entry)
        if path.suffix == ".ckpt":
            report, _ = evaluate_checkpoint(
                cfg, str(path), out / "compare" / f"{k}" / "metrics.json"
            )
        else:
            report = read_report(path)
        reports.append((entry, report))
    rows, protocols = leaderboard_rows(reports)
    headers = [
        "run",
        "method",
        "result",
        *[h for _, h in COLUMNS],
        "samples",
        "extractor",
        "sampler",
        "w",
        "protocol",
    ]
    write_table(out / "leaderboard", rows, headers, title="Leaderboard")
    if len(protocols) > 1:
        log.warning(
            f"the runs were measured under {len(protocols)} different protocols (column "
            "'protocol'): only rows with the same protocol id are comparable"
        )
    return {"rows": len(rows), "protocols": len(protocols)}


def read_report(path: Path) -> dict[str, Any]:
    """A report from ``metrics.json`` or a run folder holding one."""
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"compare: {str(path)!r} is neither a .ckpt, a metrics.json report nor a run folder "
            "with one"
        )
    return json.loads(file.read_text())


def leaderboard_rows(reports: list[tuple[str, dict[str, Any]]]) -> tuple[list[dict], list[str]]:
    """One row per generative result of each report, with a short id of its protocol."""
    rows, protocols = [], []
    for entry, report in reports:
        for result in report.get("results", []):
            protocol = result["protocol"]
            key = json.dumps({k: protocol.get(k) for k in PROTOCOL_KEYS}, sort_keys=True)
            if key not in protocols:
                protocols.append(key)
            row = {"run": entry, "method": report.get("method"), "result": result["name"]}
            row.update({h: result["metrics"].get(k) for k, h in COLUMNS})
            row.update(
                {
                    "samples": protocol.get("num_samples"),
                    "extractor": f"{protocol.get('extractor')}@{protocol.get('extractor_version')}",
                    "sampler": protocol.get("sampler"),
                    "w": protocol.get("guidance_scale"),
                    "protocol": f"P{protocols.index(key) + 1}",
                }
            )
            rows.append(row)
    return rows, protocols


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    """Validate the composed config, then evaluate the checkpoint."""
    validate_config(cfg, TOP_LEVEL)
    check_task(cfg)
    extras(cfg)
    try:
        evaluate(cfg)
    except Preempted as stop:
        sys.exit(128 + stop.signum)  # what the signal would have given; the message is logged


def check_task(cfg: DictConfig) -> None:
    """A checkpoint or a model assembled from checkpoints to evaluate, or runs to compare."""
    if cfg.get("ckpt_path") and cfg.get("model"):
        raise ConfigError("give ckpt_path=... or model=... (e.g. model=imagen_cascade), not both")
    if not cfg.get("ckpt_path") and not cfg.get("model") and not cfg.get("compare"):
        raise ConfigError(
            "ckpt_path is mandatory: pass ckpt_path=... (or model=imagen_cascade "
            "model.stages=[...], or +compare=[...])"
        )


if __name__ == "__main__":
    sys.argv = null_group_overrides(sys.argv, Path(__file__).resolve().parents[1] / "conf")
    main()
