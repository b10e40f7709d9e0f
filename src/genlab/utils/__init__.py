"""Helpers for the entry points; import them from their modules.

Hydra-free (usable anywhere in genlab): ``instantiate`` (``_target_`` dicts), ``checkpoint``
(self-describing checkpoints, ``genlab.load``), ``images`` (PNG grids), ``rank_logging``
(``RankedLogger``), ``lr_schedule``.

Config helpers (the only genlab modules that import Hydra/OmegaConf): ``validation``
(``validate_config``), ``task`` (``task_wrapper``, ``extras``, ``get_metric_value``),
``rich_utils`` (``print_config_tree``, ``enforce_tags``), ``instantiators``
(``instantiate_callbacks``, ``instantiate_loggers``), ``logging_utils``
(``log_hyperparameters``). This package imports none of them, so ``import genlab`` stays light.
"""
