"""Frozen parts that a model config names by file (a CLIP, an oracle) are built by the entry
points before the model is, never by a model's constructor.

A config node declares how to build a missing file with ``_recipe_``, a mapping from the key that
holds the path to the ``src/train.py`` overrides that make it::

    image_embed:
      clip_ckpt: ${paths.data_dir}/evaluators/clip_shapes.ckpt
      _recipe_: {clip_ckpt: [experiment=clip_shapes]}

``instantiate`` ignores keys that start with ``_``; ``train.py``, ``eval.py`` and ``sample.py`` call
:func:`build_missing_parts` on the model config first. ``_recipe_: null`` means: fail when the
file is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECIPE_KEY = "_recipe_"


def build_missing_parts(config: Any) -> None:
    """Build every file a ``_recipe_`` in ``config`` (a plain dict/list tree) names and that does
    not exist yet (``genlab.metrics.evaluators.ensure_evaluator``: locked, once per machine)."""
    if isinstance(config, dict):
        for key, recipe in (config.get(RECIPE_KEY) or {}).items():
            path = config.get(key)
            if path and not Path(path).expanduser().is_file():
                from genlab.metrics.evaluators import ensure_evaluator

                ensure_evaluator(path, recipe, name=Path(path).stem)
        for value in config.values():
            build_missing_parts(value)
    elif isinstance(config, list):
        for value in config:
            build_missing_parts(value)
