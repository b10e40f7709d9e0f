"""Export to safetensors (issue 24, item 3): ``src/export.py`` writes the weights, configs and a
model card; ``genlab.load`` and the entry points read the folder back with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import genlab
from conftest import check_ok, run_entry
from genlab.utils.export import export_safetensors


def test_export_round_trip_through_the_entry_points(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "exported"
    result = run_entry(
        "export.py",
        f"ckpt_path={ckpt}",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "genlab.json", "README.md"}
    raw = (out / "model.safetensors").read_bytes()
    assert b"pickle" not in raw[:200] and raw[8:9] == b"{"  # a safetensors header, not a pickle
    card = (out / "README.md").read_text()
    assert "DiffusionModel" in card and "caption_exact" in card and "sample.py" in card
    entries = json.loads((out / "genlab.json").read_text())["entries"]
    assert "genlab_model_config" in entries and "optimizer_states" not in entries

    original, exported = genlab.load(ckpt), genlab.load(out)
    for name, tensor in original.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    prompts = ["a red circle", "a blue square at the top"]
    assert torch.equal(
        exported.generate(prompts, steps=2, generator=g()),
        original.generate(prompts, steps=2, generator=g()),
    )  # the tokenizer came back too

    samples = tmp_path / "from_export.png"
    result = run_entry(
        "sample.py",
        f"ckpt_path={out}",
        'prompt="a red circle"',
        "n=2",
        "steps=2",
        f"out={samples}",
        f"hydra.run.dir={tmp_path / 'sample'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert samples.is_file()


def test_bad_exports_and_options_are_named(trained_run: Path, tmp_path: Path) -> None:
    out = export_safetensors(trained_run / "checkpoints" / "last.ckpt", tmp_path / "e")
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not readable safetensors"):
        genlab.load(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a genlab export"):
        genlab.load(tmp_path / "empty")
    result = run_entry(
        "export.py",
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        "format=diffusers",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0  # a DDPM has no diffusers autoencoder to become
    assert "format=diffusers maps genlab's VAE (to AutoencoderKL)" in result.stderr
