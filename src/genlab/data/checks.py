"""Argument checks shared by the DataModules, and the check of a batch against the data
contract.

The data contract (docs/architecture.md): batches are dicts with ``image`` ``(B, C, H, W)`` in ``[-1, 1]``,
``caption`` (``list[str]``, captioned datasets), ``label`` (long ``(B,)``, class-labelled
datasets) and ``index`` (long ``(B,)``, the position of the item in its split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

BadFiles = Literal["strict", "skip"]
Crop = Literal["center", "random"]
BAD_FILE_POLICIES = ("strict", "skip")
CROPS = ("center", "random")


def check_arg(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a ``ValueError`` naming the argument, its value and what is allowed, unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Check that ``value`` is one of ``choices``."""
    check_arg(value in choices, name, value, f"one of {list(choices)}")


def check_bad_file_args(bad_files: str, max_consecutive_bad: int) -> None:
    """Check the two arguments of the bad-file policy."""
    check_choice("bad_files", bad_files, BAD_FILE_POLICIES)
    check_arg(max_consecutive_bad >= 1, "max_consecutive_bad", max_consecutive_bad, "an int >= 1")


def with_article(phrase: str) -> str:
    """Prefix ``phrase`` with the indefinite article it takes: ``an orange``, ``a red circle``."""
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


def jsonable(value: Any) -> Any:
    """Turn config values (OmegaConf lists and dicts, tuples, paths) into plain JSON types."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def missing_dataset(what: str, looked_at: Path, layout: str, hint: str = "") -> FileNotFoundError:
    """Build the error for a dataset that is not on disk: the path, the layout, what to do."""
    message = f"{what} not found: {looked_at} does not exist.\nExpected layout:\n{layout}"
    return FileNotFoundError(message + (f"\n{hint}" if hint else ""))


def check_batch(
    batch: Mapping[str, Any], *, channels: int, resolution: int, captions: bool, labels: bool
) -> None:
    """Check a batch against the data contract; raise a ``ValueError`` saying what breaks it.

    Args:
        batch: a collated batch.
        channels: the expected number of image channels.
        resolution: the expected image height and width.
        captions: whether ``caption`` must be present (else it must be absent).
        labels: whether ``label`` must be present (else it must be absent).
    """
    image = batch.get("image")
    problems = image_problems(image, channels, resolution)
    size = image.shape[0] if not problems else None
    expected = {"index": True, "label": labels, "caption": captions}
    for key, wanted in expected.items():
        value = batch.get(key)
        if not wanted and value is not None:
            problems.append(f"{key} is present, but this dataset has no {key}s")
        elif wanted and not fits_key(key, value, size):
            problems.append(f"{key} does not fit the contract: {describe_value(value)}")
    if problems:
        raise ValueError("batch breaks the data contract: " + "; ".join(problems))


def image_problems(image: Any, channels: int, resolution: int) -> list[str]:
    """What is wrong with a batch's ``image`` under the data contract."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.float32 or image.ndim != 4:
        return [f"image must be a float32 (B, C, H, W) tensor, got {describe_value(image)}"]
    problems = []
    if tuple(image.shape[1:]) != (channels, resolution, resolution):
        shape = (channels, resolution, resolution)
        problems.append(f"image shape {tuple(image.shape)} is not (B, *{shape})")
    if image.numel() and (image.min() < -1 or image.max() > 1):
        problems.append(f"image values span [{image.min():.3f}, {image.max():.3f}], not [-1, 1]")
    return problems


def fits_key(key: str, value: Any, size: int | None) -> bool:
    """Whether ``value`` fits the contract of ``index``/``label`` (long (B,)) or ``caption``."""
    if key == "caption":
        is_list = isinstance(value, list) and all(isinstance(c, str) for c in value)
        return is_list and (size is None or len(value) == size)
    is_long = isinstance(value, torch.Tensor) and value.dtype == torch.long and value.ndim == 1
    return is_long and (size is None or value.shape[0] == size)


def describe_value(value: Any) -> str:
    """A short description of a value for error messages: type, dtype and shape."""
    if isinstance(value, torch.Tensor):
        return f"tensor {value.dtype} {tuple(value.shape)}"
    if isinstance(value, list):
        return f"list of {len(value)} ({', '.join(sorted({type(v).__name__ for v in value}))})"
    return type(value).__name__
