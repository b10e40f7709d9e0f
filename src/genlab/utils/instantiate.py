"""Build objects from plain ``_target_`` dictionaries, without Hydra.

Checkpoints carry their model config as a plain dict (see :mod:`genlab.utils.checkpoint`), so
``genlab.load`` must rebuild a module on a machine that has no config files and, below the entry
points, no Hydra (docs/architecture.md, import rules). The dialect is the subset of Hydra's that genlab configs use:
``_target_`` (dotted path), ``_partial_`` (return a ``functools.partial``) and ``_args_``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping, Sequence
from typing import Any


def locate(path: str) -> Any:
    """Import the object named by a dotted path such as ``torch.optim.AdamW``."""
    module_path, _, name = path.rpartition(".")
    if not module_path:
        raise ValueError(f"_target_ {path!r} is not a dotted path like 'package.module.Name'")
    try:
        obj = importlib.import_module(module_path)
    except ModuleNotFoundError:  # a nested attribute such as pkg.Class.method
        obj = locate(module_path)
    try:
        return getattr(obj, name)
    except AttributeError as err:
        raise ValueError(f"_target_ {path!r}: {module_path!r} has no attribute {name!r}") from err


def instantiate(cfg: Any) -> Any:
    """Recursively build every ``_target_`` mapping inside ``cfg``; other values pass through."""
    if isinstance(cfg, Mapping):
        kwargs = {k: instantiate(v) for k, v in cfg.items() if not str(k).startswith("_")}
        if "_target_" not in cfg:
            return kwargs
        target = locate(cfg["_target_"])
        args = [instantiate(a) for a in cfg.get("_args_", [])]
        if cfg.get("_partial_", False):
            return functools.partial(target, *args, **kwargs)
        return target(*args, **kwargs)
    if isinstance(cfg, Sequence) and not isinstance(cfg, str | bytes):
        return [instantiate(v) for v in cfg]
    return cfg
