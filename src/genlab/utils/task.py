"""What every entry point does around its task: optional extras, failure handling, the metric.

``task_wrapper`` makes a failed job log its exception and close its loggers before re-raising,
so that the next job of a Hydra multirun (or an Optuna trial) starts clean: W&B in particular
would otherwise attach the next job to the failed job's run.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genlab.utils.rank_logging import RankedLogger
from genlab.utils.rich_utils import enforce_tags, print_config_tree

log = RankedLogger(__name__, rank_zero_only=True)

TaskResult = tuple[dict[str, Any], dict[str, Any]]


class Preempted(Exception):
    """The run stopped on a signal after saving its checkpoint (``callbacks/preemption.py``);
    ``train.py`` exits with status 128 + ``signum``."""

    def __init__(self, message: str, signum: int, *, logged: bool = False) -> None:
        super().__init__(message)
        self.signum, self.logged = signum, logged


def extras(cfg: DictConfig) -> None:
    """Apply the optional ``extras`` of a config: silence warnings, require tags, print the tree.

    Each is off unless ``cfg.extras.<name>`` is true: ``ignore_warnings``, ``enforce_tags``,
    ``print_config`` (printed with rich and saved to ``<output_dir>/config_tree.log``).
    """
    options = cfg.get("extras")
    if not options:
        log.warning("no `extras` config: skipping warnings filter, tag check and config printing")
        return
    if options.get("ignore_warnings"):
        log.info("extras.ignore_warnings=true: silencing Python warnings")
        warnings.filterwarnings("ignore")
    if options.get("enforce_tags"):
        enforce_tags(cfg)
    if options.get("print_config"):
        print_config_tree(cfg, resolve=True, save_to_file=True)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_now(signum: int, frame: Any) -> None:
    """A signal handler that ends the task at once: raises :class:`Preempted`."""
    name = signal.Signals(signum).name
    raise Preempted(
        f"{name} received: stopped at once. Files already written are kept; what was being "
        "computed (samples, metrics, a test pass) is not written.",
        signum,
    )


def task_wrapper(task: Callable[[DictConfig], TaskResult]) -> Callable[[DictConfig], TaskResult]:
    """Wrap an entry point's task so a failure is logged, loggers are closed, and it re-raises.

    SIGTERM and SIGINT end the task promptly in every phase (:func:`stop_now`: the entry point
    exits with 128 + the signal number), except while fitting, where the preemption callback
    takes SIGTERM over to save a checkpoint at the next step first. The output folder is logged
    in every case, so a user knows where to look.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> TaskResult:
        failed, preempted = True, False
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, stop_now) for s in STOP_SIGNALS}
        try:
            result = task(cfg)
            failed = False
            return result
        except Preempted as stop:
            preempted = True  # a clean stop: its message is logged, no traceback
            if not stop.logged:
                log.warning(str(stop))
            raise
        except Exception:
            log.exception("task failed")
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            close_loggers(failed=failed, preempted=preempted)
            log.info(f"output dir: {cfg.paths.output_dir}")

    return wrapped


def close_loggers(*, failed: bool = False, preempted: bool = False) -> None:
    """Finish the active W&B run, if W&B was imported: marked failed with exit code 1, or
    preempting (W&B shows it as preempted, and the resumed run continues it)."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        log.info("closing the W&B run")
        if preempted:
            wandb.mark_preempting()
        wandb.finish(exit_code=1 if failed else 0)


def get_metric_value(metric_dict: Mapping[str, Any], metric_name: str | None) -> float | None:
    """Return ``metric_dict[metric_name]`` as a float (for Optuna), or None when no name is set
    or the run did not log it (a warning names it and the metrics that were logged: a short
    step budget may end before the first validation; what was trained and written is kept)."""
    if not metric_name:
        return None
    if metric_name not in metric_dict:
        log.warning(
            f"optimized_metric={metric_name!r} was not logged by this run (e.g. training ended "
            f"before the first validation); logged metrics: {sorted(metric_dict)}. Nothing is "
            "returned to a sweeper; set optimized_metric to one of them, or to null."
        )
        return None
    value = float(metric_dict[metric_name])
    log.info(f"retrieved {metric_name}={value}")
    return value


def null_group_overrides(argv: list[str], conf_dir: str | Path) -> list[str]:
    """Command-line arguments with every ``GROUP=null`` turned into ``~GROUP``.

    Hydra refuses ``logger=null`` ("Config group override must be a string or a list. Got
    NoneType"); what a user means by it is "no config from this group", which Hydra spells
    ``~logger``. Applies to the names of config groups (folders of ``conf_dir``) only; a plain
    value such as ``ckpt_path=null`` is left alone.
    """
    conf_dir = Path(conf_dir)
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and value == "null" and key[:1] not in "+~" and (conf_dir / key).is_dir():
            arg = f"~{key}"
        out.append(arg)
    return out
