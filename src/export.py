"""Export a checkpoint as a folder of safetensors weights, configs and a model card:
``python src/export.py ckpt_path=<run>/checkpoints/last.ckpt [out=folder]`` (``conf/export.yaml``,
``genlab.utils.export``). ``genlab.load(folder)`` and ``ckpt_path=folder`` read it back.
``format=diffusers`` also makes the folder a diffusers ``AutoencoderKL`` (a VAE) or ``VQModel``
(a VQ-GAN / VQ-VAE) where the architecture maps (``genlab.utils.diffusers_export``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from genlab.utils.diffusers_export import NotExportable, check_exportable, export_diffusers
from genlab.utils.export import export_safetensors
from genlab.utils.rank_logging import RankedLogger
from genlab.utils.task import TaskResult, extras, null_group_overrides, task_wrapper
from genlab.utils.validation import ConfigError, validate_config

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
log = RankedLogger(__name__, rank_zero_only=True)

TOP_LEVEL = {
    "task_name": str,
    "tags": list[str] | None,
    "ckpt_path": str | None,
    "format": str,
    "out": str,
    "scaling_factor": float | None,
}
FORMATS = ("safetensors", "diffusers")


@task_wrapper
def export(cfg: DictConfig) -> TaskResult:
    """Write the export folder of ``cfg.ckpt_path``."""
    if cfg.format == "diffusers":
        out, diff = export_diffusers(cfg.ckpt_path, cfg.out, scaling_factor=cfg.scaling_factor)
        log.info(
            f"exported {cfg.ckpt_path} to {out} (diffusers config.json and "
            "diffusion_pytorch_model.safetensors; model.safetensors, genlab.json, README.md); "
            f"diffusers' outputs differ from genlab's by at most {diff:.2e}"
        )
        print(f"exported to {out}")
        return {"max_abs_diff": diff}, {"cfg": cfg, "out": out}
    out = export_safetensors(cfg.ckpt_path, cfg.out)
    log.info(f"exported {cfg.ckpt_path} to {out} (model.safetensors, genlab.json, README.md)")
    print(f"exported to {out}")
    return {}, {"cfg": cfg, "out": out}


@hydra.main(version_base="1.3", config_path="../conf", config_name="export.yaml")
def main(cfg: DictConfig) -> None:
    """Validate the composed config, then export the checkpoint."""
    validate_config(cfg, TOP_LEVEL)
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is mandatory: pass ckpt_path=<a .ckpt file>")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r}: one of {list(FORMATS)}")
    if cfg.format == "diffusers":
        try:
            check_exportable(cfg.ckpt_path)
        except NotExportable as err:  # the reasons, before any work and without a traceback
            raise ConfigError(str(err)) from None
    extras(cfg)
    export(cfg)


if __name__ == "__main__":
    sys.argv = null_group_overrides(sys.argv, Path(__file__).resolve().parents[1] / "conf")
    main()
