"""Golden sampling parity: fixed-seed ``generate`` outputs of every diffusion family, recorded once
and checked after any change to the diffusion core.

``record`` trains tiny checkpoints through ``src/train.py`` (the default job's DDPM, an LDM on a
VAE, an Imagen base and super-resolution stage, a CLIP with an unCLIP prior and decoder), then
draws fixed-seed samples from the DDPM, the LDM, the Imagen cascade and the unCLIP pair, and
writes checkpoints and tensors to ``tests/golden/``. ``check`` rebuilds every model from those
checkpoints with the code as it is now (old checkpoints must keep loading) and compares the
tensors (max |diff| <= 1e-6). ``tests/test_golden_sampling.py`` runs ``check`` in the suite.

    python bench/golden_sampling.py record     # once, before a refactor (overwrites tests/golden)
    python bench/golden_sampling.py check      # after it
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
RECORDED_AT = "/tmp/genlab-golden"  # absolute folder the checkpoints were written in
TOLERANCE = 1e-6
STRIPPED = ("optimizer_states", "lr_schedulers", "loops", "callbacks")
PROMPTS = ["a red circle at the top left", "a small blue square in the center"]

RUN = [
    "trainer.max_steps=3",
    "data.batch_size=8",
    "data.train_size=64",
    "data.val_size=16",
    "data.test_size=16",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.sample_grid=null",
    "callbacks.generative_metrics=null",
    "sampler.steps=3",
]
UNET = ["model.net.channels=[16,32]", "model.net.attention_levels=[1]", "model.net.heads=2"]
BPE = [
    "model.text_encoder.width=32",
    "model.text_encoder.layers=1",
    "model.text_encoder.heads=2",
    "model.text_encoder.vocab_size=128",
]
CLIP = [
    "experiment=clip_shapes",
    "data.resolution=16",
    "model.image_encoder.channels=[16,32]",
    "model.image_encoder.heads=2",
    "model.text_encoder.width=32",
    "model.text_encoder.layers=1",
    "model.text_encoder.heads=2",
    "model.text_encoder.vocab_size=128",
    "model.embed_dim=32",
]


def recipes(folder: Path) -> dict[str, list[str]]:
    """The tiny training runs, in order (later ones read earlier checkpoints)."""
    ckpt = {name: f"{folder}/{name}.ckpt" for name in ("vae", "clip")}
    return {
        "ddpm": ["data.resolution=16", *UNET, *BPE],
        "vae": [
            "model=vae",
            "data.resolution=16",
            "model.encoder.channels=[8,16,16]",
            "model.encoder.groups=8",
            "model.encoder.mid_attention=false",
            "model.discriminator=null",
            "model.perceptual=null",
            "model.disc_weight=0",
        ],
        "ldm": [
            "model=ldm",
            f"model.space.first_stage_ckpt={ckpt['vae']}",
            "data.resolution=16",
            *UNET,
            "model.net.groups=8",
            *BPE,
        ],
        "imagen_base": ["experiment=imagen_shapes", "data.resolution=16", *UNET],
        "imagen_sr": [
            "experiment=imagen_shapes_sr",
            "data.resolution=32",
            "model.conditioners.low_res.low_res_size=16",
            "model.net.channels=[16,32]",
            "model.net.res_blocks=[1,2]",
            "model.net.heads=2",
        ],
        "clip": CLIP,
        "unclip_prior": [
            "model=unclip_prior",
            f"model.clip_ckpt={ckpt['clip']}",
            "model.clip_recipe=null",
            "data.resolution=16",
            "model.net.width=32",
            "model.net.layers=1",
            "model.net.heads=2",
        ],
        "unclip_decoder": [
            "model=unclip_decoder",
            f"model.clip_ckpt={ckpt['clip']}",
            "model.clip_recipe=null",
            "data.resolution=16",
            *UNET,
            *BPE,
        ],
    }


def train(name: str, overrides: list[str], folder: Path) -> None:
    run = folder / f"run_{name}"
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PROJECT_ROOT": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), *overrides, *RUN]
    cmd += [f"hydra.run.dir={run}", "logger=csv"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=folder)
    if result.returncode != 0:
        raise SystemExit(f"training {name} failed:\n{result.stderr[-4000:]}")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for key in STRIPPED:  # training state: not needed to sample, and it triples the files
        ckpt.pop(key, None)
    torch.save(ckpt, folder / f"{name}.ckpt")
    shutil.rmtree(run)


def compose(overrides: list[str]) -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train.yaml", overrides=overrides)
    return OmegaConf.to_container(cfg.model, resolve=True)


def draws(folder: Path) -> dict[str, torch.Tensor]:
    """Fixed-seed samples of each family from the checkpoints in ``folder``."""
    from genlab.utils.checkpoint import load
    from genlab.utils.instantiate import instantiate

    torch.manual_seed(0)
    out = {}

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(1234)

    ddpm = load(folder / "ddpm.ckpt")
    out["ddpm"] = ddpm.generate(PROMPTS, n=2, steps=4, generator=seeded())
    out["ddpm_heun_dynamic"] = ddpm.generate(
        PROMPTS, sampler="heun", steps=3, guidance_scale=2.0, thresholding="dynamic",
        generator=seeded(),
    )  # fmt: skip
    out["ddpm_unguided"] = ddpm.generate(PROMPTS, guidance_scale=1.0, steps=3, generator=seeded())
    known = torch.zeros(1, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1
    out["ddpm_inpaint"] = ddpm.generate(
        PROMPTS, steps=3, known=known, mask=mask, generator=seeded()
    )
    ldm = load(folder / "ldm.ckpt")
    out["ldm"] = ldm.generate(PROMPTS, n=2, steps=4, generator=seeded())
    cascade = instantiate(
        compose(
            [
                "model=imagen_cascade",
                f"model.stages=[{folder}/imagen_base.ckpt,{folder}/imagen_sr.ckpt]",
                "model.options=[{steps: 3},{steps: 2, aug_level: 0.2}]",
            ]
        )
    )
    out["imagen_cascade"] = cascade.generate(PROMPTS, n=2, generator=seeded())
    sr = load(folder / "imagen_sr.ckpt")
    low = torch.rand(2, 3, 16, 16, generator=seeded()) * 2 - 1
    out["imagen_sr"] = sr.generate(PROMPTS, low_res=low, steps=3, generator=seeded())
    pair = instantiate(
        compose(
            [
                "model=unclip",
                f"model.prior_ckpt={folder}/unclip_prior.ckpt",
                f"model.decoder_ckpt={folder}/unclip_decoder.ckpt",
                "model.prior_options={steps: 3}",
                "model.decoder_options={steps: 3}",
            ]
        )
    )
    out["unclip"] = pair.generate(PROMPTS, n=2, generator=seeded())
    out["unclip_prior"] = pair.prior.sample_embeddings(PROMPTS, n=2, steps=3, generator=seeded())
    out["unclip_variations"] = pair.variations(out["ddpm"][:2], n=2, generator=seeded())
    return {k: v.detach().float().cpu() for k, v in out.items()}


def record() -> None:
    folder = Path(RECORDED_AT)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, overrides in recipes(folder).items():
        print(f"training {name} ...", flush=True)
        train(name, overrides, folder)
    outputs = draws(folder)
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for ckpt in folder.glob("*.ckpt"):
        shutil.copy(ckpt, GOLDEN / ckpt.name)
    torch.save(outputs, GOLDEN / "outputs.pt")
    for key, value in outputs.items():
        print(f"{key:20s} {tuple(value.shape)} sum={value.sum():.6f}")


def check(tolerance: float = TOLERANCE) -> dict[str, float]:
    """Max |new - recorded| per output; raises when one exceeds ``tolerance``."""
    folder = Path(RECORDED_AT)
    if folder.exists() and folder.resolve() != GOLDEN.resolve():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(GOLDEN, folder)  # the checkpoints name each other by this absolute path
    expected = torch.load(GOLDEN / "outputs.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: the reductions' order depends on the threads
    try:
        got = draws(folder)
    finally:
        torch.set_num_threads(threads)
    diffs = {k: float((got[k] - v).abs().max()) for k, v in expected.items()}
    for key, diff in diffs.items():
        print(f"{key:20s} max|diff| = {diff:.3g}")
    bad = {k: d for k, d in diffs.items() if not d <= tolerance}
    if bad:
        raise AssertionError(f"golden outputs changed beyond {tolerance}: {bad}")
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["record", "check"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory():
        record() if args.mode == "record" else check()


if __name__ == "__main__":
    main()
