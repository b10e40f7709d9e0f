"""Outputs for people (issue 24 item 5): the HTML gallery of the sample-grid callback and of
sample.py (prompts, upscaled inline PNGs, the oracle's verdicts), and the progress bars, which
print nothing off a terminal, off rank zero or when switched off."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ORACLE_CKPT, check_ok, run_entry
from genlab.evaluation.verdicts import cell_verdict, verdicts
from genlab.utils import progress
from genlab.utils.gallery import gallery_section, write_gallery

FIGURE = re.compile(
    r'<figure><img src="data:image/png;base64,([^"]+)" alt="[^"]*"><figcaption>([^<]*)'
    r'</figcaption>(?:<div class="verdict (ok|bad)">oracle: ([^<]*)</div>)?</figure>'
)


def figures(page: str) -> list[tuple[Image.Image, str, str | None]]:
    """(image, caption, verdict) of every figure of a gallery page."""
    found = []
    for data, caption, _, verdict in FIGURE.findall(page):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        found.append((image, caption, verdict or None))
    return found


def test_cell_verdict_names_the_wrong_cells() -> None:
    wanted = np.full((9, 3), -1)
    wanted[0] = (1, 2, 0)  # top left
    wanted[4] = (0, 0, 1)  # center
    assert cell_verdict(wanted.copy(), wanted) == "✓ right"
    parsed = wanted.copy()
    parsed[0] = (1, 3, 0)  # wrong colour
    parsed[4] = -1  # missing
    parsed[8] = (2, 2, 2)  # an object the prompt did not ask for
    assert cell_verdict(parsed, wanted) == (
        "✗ top left (color); center (missing); bottom right (an extra object)"
    )


def test_verdicts_need_an_oracle_that_reads_the_prompts(oracle_checkpoint: Path) -> None:
    import genlab

    oracle = genlab.load(oracle_checkpoint)
    images = torch.zeros(2, 3, 16, 16)
    assert verdicts(None, images, ["a red circle", "a blue square"]) is None
    assert verdicts(oracle, images, ["a photo of a dog", "a red circle"]) is None
    judged = verdicts(
        oracle, images, ["a large red circle at the top left", "a small blue square at the center"]
    )
    assert len(judged) == 2 and all(v.startswith(("✓", "✗")) for v in judged)


def test_gallery_upscales_and_captions(tmp_path: Path) -> None:
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    section = gallery_section(
        images, title="t", captions=["a <b>", "b", "c"], verdicts=["✓ right", "✗ x", "✓ right"]
    )
    page = write_gallery(tmp_path / "g.html", [section], title="T").read_text()
    found = figures(page)
    assert [f[1] for f in found] == ["a &lt;b&gt;", "b", "c"]  # escaped
    assert [f[2] for f in found] == ["✓ right", "✗ x", "✓ right"]
    first = np.asarray(found[0][0])
    assert first.shape == (128, 128, 3)  # 8 px x 16, nearest neighbour
    expected = ((images[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    assert (first[::16, ::16] == expected.numpy()).all()
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        gallery_section(images, title="t", captions=["a", "b"])


def test_sample_grid_callback_writes_the_gallery(trained_run: Path) -> None:
    page = (trained_run / "samples" / "gallery.html").read_text()
    prompts = (trained_run / "samples" / "prompts.txt").read_text().splitlines()
    found = figures(page)
    assert [f[1] for f in found] == prompts  # one section: the final grid reused step 4's
    assert all(f[0].size == (128, 128) for f in found)  # 16 px images upscaled x8
    assert all(f[2] and f[2][0] in "✓✗" for f in found)  # the run's tiny oracle judged them


def test_sample_py_gallery_with_the_oracle_verdicts(
    trained_run: Path, oracle_checkpoint: Path, tmp_path: Path
) -> None:
    prompts = ["a large red circle at the top left", "a small blue square at the center"]
    result = run_entry(
        "sample.py",
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        "prompt=[" + ",".join(f'"{p}"' for p in prompts) + "]",
        "n=2",
        "steps=2",
        f"oracle_ckpt={oracle_checkpoint}",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    page = (tmp_path / "run" / "gallery.html").read_text()
    assert f"gallery written to {tmp_path / 'run' / 'gallery.html'}" in result.stdout
    found = figures(page)
    assert [f[1] for f in found] == [p for p in prompts for _ in range(2)]
    assert all(f[2] is not None for f in found)
    assert all(f[0].size == (128, 128) for f in found)
    output = result.stdout + result.stderr
    assert "━" not in output and "sampling 4 image(s)" not in output  # no bar off a terminal
    assert ORACLE_CKPT.is_file()


def test_progress_prints_nothing_off_a_terminal(capsys, monkeypatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    assert not progress.enabled()  # pytest captures stderr: not a terminal
    with progress.bar("outer", total=3) as bar:
        assert not bar.shown
        assert list(progress.steps(range(3), "inner")) == [0, 1, 2]
        bar.advance(3)
    assert list(progress.track([1, 2], "items")) == [1, 2]
    assert capsys.readouterr() == ("", "")


def test_progress_forced_on_draws_on_rank_zero_only(capsys, monkeypatch) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setenv(progress.ENV, "1")
    with progress.bar("outer loop", total=2) as bar:
        assert bar.shown
        assert list(progress.steps(range(4), "inner steps")) == [0, 1, 2, 3]
        bar.advance(2)
    shown = capsys.readouterr()
    assert "outer loop" in shown.out + shown.err
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    assert list(progress.track(range(2), "rank one")) == [0, 1]
    progress.disable()
    try:
        monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
        assert list(progress.track(range(2), "switched off")) == [0, 1]
    finally:
        progress.disable(False)
    assert capsys.readouterr() == ("", "")


def test_verdicts_name_the_cells_as_the_shapes_captions_do() -> None:
    """evaluation/ may not import a dataset (tests/test_imports.py), so the verdicts keep their
    own copy of the shapes grid's cell names: it must stay the dataset's."""
    from genlab.data.shapes import CELLS
    from genlab.evaluation.verdicts import POSITIONS

    assert POSITIONS == CELLS
