"""Self-describing checkpoints: the resolved model config travels inside the ``.ckpt``.

``ModelConfigInCheckpoint`` (a callback the entry point always adds) writes the plain-dict model
and data configs into every checkpoint; :func:`load` rebuilds the LightningModule from a
checkpoint alone, with no config files and no Hydra (docs/architecture.md, "The model contract").
:class:`AtomicCheckpointIO` writes every checkpoint atomically and never with non-finite weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from genlab.utils.instantiate import instantiate
from genlab.utils.io import atomic_torch_save

MODEL_CONFIG_KEY = "genlab_model_config"
DATA_CONFIG_KEY = "genlab_data_config"


class ModelConfigInCheckpoint(L.Callback):
    """Store the resolved model (and data) config in every checkpoint the trainer saves."""

    def __init__(self, model_config: dict[str, Any], data_config: dict[str, Any] | None = None):
        self.model_config = copy.deepcopy(model_config)
        self.data_config = copy.deepcopy(data_config)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[MODEL_CONFIG_KEY] = self.model_config
        if self.data_config is not None:
            checkpoint[DATA_CONFIG_KEY] = self.data_config


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU, with a clear error when it is missing or foreign; an
    exported folder (``src/export.py``, :mod:`genlab.utils.export`) and a sharded checkpoint
    folder (``trainer=fsdp``, :mod:`genlab.utils.sharding`) read as one."""
    from genlab.utils.export import is_export, read_export
    from genlab.utils.sharding import is_sharded_checkpoint, read_sharded_checkpoint

    path = Path(path)
    if is_export(path):
        return read_export(path)
    if is_sharded_checkpoint(path):  # trainer=fsdp's last.ckpt: shard files + meta.pt
        ckpt = read_sharded_checkpoint(path)
    elif path.is_dir():
        raise ValueError(
            f"ckpt_path={str(path)!r} is a folder but not a genlab export (no genlab.json and "
            "model.safetensors): give a .ckpt file or an exported folder"
        )
    elif not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r}: no such checkpoint file")
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # truncated or not a torch file
            raise ValueError(
                f"ckpt_path={str(path)!r} is not a readable checkpoint: {err}"
            ) from err
    if MODEL_CONFIG_KEY not in ckpt:
        raise ValueError(
            f"ckpt_path={str(path)!r} has no {MODEL_CONFIG_KEY!r}: it was not written by a genlab "
            "training run, so the model cannot be rebuilt from it"
        )
    return ckpt


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> L.LightningModule:
    """Rebuild a genlab LightningModule, weights included, from a checkpoint file alone.

    The module is returned in eval mode. Its ``on_load_checkpoint`` hook runs before the weights
    are loaded, so state kept outside ``state_dict`` (a trained tokenizer) is restored too.
    """
    return model_from_checkpoint(read_checkpoint(path), path=path, map_location=map_location)


def model_from_checkpoint(
    ckpt: dict[str, Any], *, path: str | Path, map_location: str | torch.device = "cpu"
) -> L.LightningModule:
    """Rebuild the LightningModule of a checkpoint already read by :func:`read_checkpoint`.

    For callers that also need the checkpoint's other entries (its stored data config), so the
    file is read once.
    """
    from genlab.utils.legacy import upgrade  # checkpoints from before the diffusion redesign

    upgrade(ckpt)
    model = instantiate(ckpt[MODEL_CONFIG_KEY])
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"])
    model.genlab_checkpoint_path = str(path)
    return model.to(map_location).eval()


def load_frozen(
    path: str | Path, *, key: str, needs: Sequence[str], hint: str
) -> L.LightningModule:
    """A module rebuilt from its checkpoint (:func:`load`) to be used frozen inside another one
    (LDM's first stage, DALL-E's tokenizer and CLIP): no gradients, eval mode.

    Args:
        path: the checkpoint.
        key: the config key that named it, for messages (``model.first_stage_ckpt``).
        needs: attributes the module must have (``encode``, ``decode_indices``, ...).
        hint: what to use instead, appended to the messages.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the checkpoint holds a module without one of ``needs``.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file. Train one first or {hint}")
    module = load(path)
    for attr in needs:
        if not hasattr(module, attr):
            raise ValueError(
                f"{key}={str(path)!r} holds a {type(module).__name__}, which has no {attr}: {hint}"
            )
    return module.requires_grad_(False).eval()


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the file it would have replaced is untouched."""


class NonFiniteWeightsError(RuntimeError):
    """A checkpoint would have held NaN or infinite weights; it was not written."""


def non_finite_entries(state_dict: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors of ``state_dict`` that hold a NaN or an inf."""
    return [
        name
        for name, value in state_dict.items()
        if torch.is_tensor(value) and value.is_floating_point() and not bool(value.isfinite().all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (:func:`genlab.utils.io.atomic_torch_save`)
    that refuses to write non-finite weights. ``train.py`` gives it to every trainer.

    Raises (from ``save_checkpoint``):
        NonFiniteWeightsError: a weight is NaN or infinite; nothing is written.
        CheckpointWriteError: the write failed (the message names the path and the cause); the
            temporary file is removed and ``path`` is unchanged.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options, got {storage_options!r}"
            )
        bad = non_finite_entries(checkpoint.get("state_dict", {}))
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteWeightsError(
                f"refusing to save {path} at step {checkpoint.get('global_step')}: the weights "
                f"{shown} are not finite. The checkpoints written before are kept."
            )
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as err:
            kept = (
                "the previous file is untouched" if Path(path).exists() else "nothing was written"
            )
            error = CheckpointWriteError(
                f"could not write checkpoint {path}: {err.strerror or err}; {kept}"
            )
            error.errno = err.errno
            raise error from err
