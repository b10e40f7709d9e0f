"""Golden sampling parity: the fixed-seed outputs of the DDPM, an LDM, the Imagen cascade and the
unCLIP pair, recorded by ``bench/golden_sampling.py record`` from checkpoints written before the
diffusion core was reshaped (issue 19), are reproduced to 1e-6 from those same checkpoints."""

from __future__ import annotations

import importlib.util

from conftest import ROOT


def test_golden_outputs_are_reproduced_from_the_recorded_checkpoints() -> None:
    spec = importlib.util.spec_from_file_location("golden", ROOT / "bench" / "golden_sampling.py")
    golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(golden)
    diffs = golden.check()
    assert set(diffs) >= {"ddpm", "ldm", "imagen_cascade", "unclip"}
    assert max(diffs.values()) <= 1e-6
