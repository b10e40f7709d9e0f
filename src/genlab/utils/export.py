"""Export a genlab checkpoint as a folder in the ecosystem's format: the weights as
``model.safetensors`` (no pickle), the resolved configs and every other entry a model restores
on load (tokenizers, the paths and SHA-256 of frozen parts) as ``genlab.json``, and a model card,
``README.md`` (method, data, training, the run's metrics with their protocol, how to sample).

``genlab.load(folder)`` and every entry point's ``ckpt_path=folder`` read it back
(:func:`read_export`): the same module, the same outputs (tested). The training state (optimizer,
schedulers, loops) is not exported: an export is for sampling and evaluation, a ``.ckpt`` for
resuming.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import torch

from genlab.utils.io import atomic_write_text

WEIGHTS_FILE = "model.safetensors"
META_FILE = "genlab.json"
CARD_FILE = "README.md"
FORMAT_VERSION = 1
TRAINING_STATE = {  # checkpoint entries that only resuming needs
    "state_dict",
    "optimizer_states",
    "lr_schedulers",
    "callbacks",
    "loops",
    "hparams_name",
    "hyper_parameters",
    "hparams_type",
    "MixedPrecision",
    "native_amp_scaling_state",
}


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an exported folder."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def json_entries(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's entries other than the training state that JSON can hold (the configs,
    tokenizers, frozen-part records, global_step, epoch, versions)."""
    found = {}
    for key, value in ckpt.items():
        if key in TRAINING_STATE:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        found[key] = value
    return found


def export_safetensors(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write ``out/`` (weights, entries, model card) for the checkpoint; returns ``out``."""
    from safetensors.torch import save_file

    from genlab.utils.checkpoint import read_checkpoint

    ckpt = read_checkpoint(ckpt_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: value.detach().cpu().contiguous().clone()
        for name, value in ckpt["state_dict"].items()
        if torch.is_tensor(value)
    }
    skipped = sorted(k for k, v in ckpt["state_dict"].items() if not torch.is_tensor(v))
    if skipped:
        raise ValueError(f"state_dict entries that are not tensors cannot be exported: {skipped}")
    meta = {
        "format": "genlab-export",
        "format_version": FORMAT_VERSION,
        "source": str(Path(ckpt_path).resolve()),
        "exported": datetime.datetime.now().isoformat(timespec="seconds"),
        "entries": json_entries(ckpt),
    }
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "genlab": META_FILE})
    tmp.replace(out / WEIGHTS_FILE)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1, default=str) + "\n")
    atomic_write_text(out / CARD_FILE, model_card(ckpt, Path(ckpt_path), out))
    return out


def read_export(path: str | Path) -> dict[str, Any]:
    """An exported folder as a checkpoint dict (entries + ``state_dict``), for ``genlab.load``."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / META_FILE}: not a readable genlab export ({err})") from err
    if meta.get("format") != "genlab-export" or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: a genlab export of format {meta.get('format')!r} version "
            f"{meta.get('format_version')!r}; this genlab reads version {FORMAT_VERSION}"
        )
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as err:  # truncated or foreign file
        raise ValueError(f"{path / WEIGHTS_FILE}: not readable safetensors ({err})") from err
    return {**meta["entries"], "state_dict": state}


# ----------------------------------------------------------------------------------------------
# the model card
def run_metrics(ckpt_path: Path) -> tuple[str, dict[str, Any]] | None:
    """The newest metrics report of the checkpoint's run folder (``<run>/metrics/*.json``, or
    an eval.py ``metrics.json`` beside it), as (file, results)."""
    run = ckpt_path.resolve().parent.parent
    reports = sorted((run / "metrics").glob("*.json")) + sorted(run.glob("metrics.json"))
    for report in reversed(reports):
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            continue
        results = data.get("results", data) if isinstance(data, dict) else data
        if isinstance(results, list) and results:
            return str(report), {r["name"]: r for r in results if "name" in r}
    return None


def model_card(ckpt: dict[str, Any], ckpt_path: Path, out: Path) -> str:
    """The README.md of an export: what the model is, what it was trained on, how well it does
    (the run's own report, if any) and how to use it."""
    from genlab.utils.checkpoint import DATA_CONFIG_KEY, MODEL_CONFIG_KEY

    model = ckpt[MODEL_CONFIG_KEY]
    data = ckpt.get(DATA_CONFIG_KEY) or {}
    target = model.get("_target_", "?")
    cls = target.rsplit(".", 1)[-1]
    params = sum(v.numel() for v in ckpt["state_dict"].values() if torch.is_tensor(v))
    lines = [
        f"# {cls}: a genlab model",
        "",
        f"* **Method**: `{target}`"
        + (f", condition `{model['condition']}`" if "condition" in model else ""),
        f"* **Weights**: `{WEIGHTS_FILE}` ({params:,} numbers, with EMA copies where the model keeps"
        " them); configs and restored state in `genlab.json`",
        f"* **Data**: `{data.get('_target_', 'not recorded')}`"
        + "".join(
            f", {k}={data[k]}"
            for k in ("resolution", "min_objects", "max_objects", "root", "label")
            if data.get(k) is not None
        ),
        f"* **Training**: {ckpt.get('global_step', '?')} optimizer steps, epoch "
        f"{ckpt.get('epoch', '?')}, from `{ckpt_path}`",
    ]
    found = run_metrics(ckpt_path)
    if found is None:
        lines += ["", "## Metrics", "", "No metrics report was found in the run folder."]
    else:
        report, results = found
        lines += ["", "## Metrics", "", f"From `{report}`:", ""]
        for name, result in results.items():
            metrics = result.get("metrics", {})
            shown = ", ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, int | float)
            )
            lines.append(f"* **{name}**: {shown}")
            protocol = result.get("protocol", {})
            if protocol:
                kept = {k: v for k, v in protocol.items() if not isinstance(v, dict | list)}
                lines.append(f"  * protocol: {json.dumps(kept, default=str)}")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f"python src/sample.py ckpt_path={out} n=8"
        + (' prompt="a red circle at the top left"' if model.get("condition") == "text" else ""),
        f"python src/eval.py ckpt_path={out}",
        "```",
        "",
        "```python",
        "import genlab",
        f'model = genlab.load("{out}")',
        "```",
        "",
    ]
    return "\n".join(lines)
