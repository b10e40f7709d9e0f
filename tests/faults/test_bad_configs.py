"""Bad configs and prompts (part of the tests/faults/ suite): a user's bad command line fails within seconds, before any data or model is built, with a
short message that names the offending key. (Literal and top-level types are covered in-process
by tests/test_utils.py; each case here costs a Python start-up.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CONF, run_entry

SECONDS = 20  # the whole subprocess, imports included

CASES = [
    # (entry point, overrides, text the error must contain)
    ("train.py", ["trainer.max_steps=abc"], "trainer.max_steps='abc': expected int"),
    ("train.py", ["model.optimizer.lr=fast"], "model.optimizer.lr='fast': expected float"),
    ("train.py", ["data.resolution=abc"], "data.resolution='abc': expected int"),
    ("train.py", ["data.nonexistent=1"], "data.nonexistent"),
    ("train.py", ["+model.net.channels_mult=[1,2]"], "model.net.channels_mult: unknown key"),
    ("train.py", ["model=nonexistent"], "model/nonexistent"),
    ("train.py", ["ckpt_path=missing.ckpt"], "ckpt_path='missing.ckpt': no such checkpoint"),
    ("eval.py", [], "ckpt_path is mandatory"),
    ("sample.py", ["ckpt_path=model.ckpt", "prompt="], "prompt='' is empty"),
    ("sample.py", ["ckpt_path=model.ckpt", "n=many"], "n='many': expected int"),
    ("sample.py", ["ckpt_path=model.ckpt", "prompt=[]"], "prompt=[] is empty"),
    ("sample.py", ["ckpt_path=model.ckpt", "prompts_file=none.txt"], "none.txt"),
    ("train.py", ["model=ldm", "data=mnist"], "no first-stage recipe for data=mnist"),
    (
        "train.py",
        ["model=ldm", "model.space.first_stage_ckpt=missing.ckpt"],
        "model.space.first_stage_ckpt='missing.ckpt': no such file",
    ),
    (
        "train.py",
        ["model=imagen_sr", "model.conditioners.low_res.low_res_size=null"],
        "model.conditioners.low_res.low_res_size=None: expected int",
    ),
    ("train.py", ["callbacks.nonfinite.policy=ignore"], "callbacks.nonfinite.policy='ignore'"),
    ("train.py", ["callbacks.preemption.signals=[SIGFOO]"], "unknown signal names ['SIGFOO']"),
    (
        "train.py",
        ["data=image_folder", "data.root=.", "data.bad_files=ignore"],
        "data.bad_files='ignore'",
    ),
    ("train.py", ["trainer=ddp_cpu", "trainer.devices=zero"], "trainer.devices"),
]


@pytest.mark.parametrize(
    ("script", "overrides", "message"), CASES, ids=[f"{s}:{' '.join(o)}" for s, o, _ in CASES]
)
def test_bad_input_fails_fast_naming_the_key(
    script: str, overrides: list[str], message: str, tmp_path: Path
) -> None:
    result = run_entry(script, *overrides, f"hydra.run.dir={tmp_path / 'run'}", tmp_path=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert result.seconds < SECONDS, f"took {result.seconds:.1f} s to fail"
    # no traceback: the message, plus for an unknown option Hydra's list of the group's options
    options = len(list((CONF / "model").glob("*.yaml"))) if "nonexistent" in str(overrides) else 0
    lines = len(result.stderr.splitlines())
    assert lines < 20 + options, f"not a short message:\n{result.stderr}"
    assert not (tmp_path / "run" / "checkpoints").exists()
