"""Print the composed config as a rich tree (and save it), and require tags for sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

PRINT_ORDER = ("data", "model", "callbacks", "logger", "trainer", "paths", "extras")


@rank_zero_only
def print_config_tree(
    cfg: DictConfig,
    *,
    print_order: Sequence[str] = PRINT_ORDER,
    resolve: bool = True,
    save_to_file: bool = False,
) -> None:
    """Print ``cfg`` as a rich tree, groups in ``print_order`` first, then the other keys.

    Args:
        cfg: the composed config.
        print_order: top-level keys to print first, in this order (absent ones are skipped).
        resolve: resolve interpolations, so the tree shows the values the run uses.
        save_to_file: also write the tree to ``<cfg.paths.output_dir>/config_tree.log``.
    """
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in print_order if k in cfg] + [k for k in cfg if k not in print_order]
    for key in keys:
        branch = tree.add(key, style="bold", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=resolve) if isinstance(node, DictConfig) else node
        branch.add(rich.syntax.Syntax(str(text), "yaml"))
    rich.print(tree)
    if save_to_file:
        path = Path(cfg.paths.output_dir, "config_tree.log")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as file:
            rich.print(tree, file=file)


def enforce_tags(cfg: DictConfig) -> None:
    """Require non-empty ``tags`` in a multirun (an error, not a prompt); warn in a single run.

    Raises:
        ValueError: in a multirun without tags, naming the key to set.
    """
    if cfg.get("tags"):
        log.info(f"tags: {list(cfg.tags)}")
        return
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun:
        raise ValueError(
            "tags is empty: a multirun needs tags to find its runs, e.g. tags=[lr_sweep]"
        )
    log.warning("tags is empty: set tags=[...] to find this run in the loggers later")
