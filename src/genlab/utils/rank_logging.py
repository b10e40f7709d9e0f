"""A ``logging`` adapter that prefixes each message with the process rank under DDP."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_only


class RankedLogger(logging.LoggerAdapter):
    """Log with a ``[rank: r]`` prefix, on every rank, on rank zero only, or on one chosen rank.

    Lightning sets ``rank_zero_only.rank`` from the launcher's environment (``LOCAL_RANK``, ``RANK``)
    when it is imported, so the rank is known before the trainer exists.

    Args:
        name: the name of the underlying ``logging.Logger``.
        rank_zero_only: drop messages logged on any rank but zero.
        extra: passed on to ``logging.LoggerAdapter``.
    """

    def __init__(
        self,
        name: str = __name__,
        rank_zero_only: bool = False,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(logger=logging.getLogger(name), extra=extra)
        self.rank_zero_only = rank_zero_only

    def log(self, level: int, msg: Any, *args: Any, rank: int | None = None, **kwargs: Any) -> None:
        """Log ``msg`` at ``level`` with the rank prefix; with ``rank`` set, only on that rank."""
        if not self.isEnabledFor(level):
            return
        current = getattr(rank_zero_only, "rank", 0)
        if (self.rank_zero_only and current != 0) or (rank is not None and rank != current):
            return
        msg, kwargs = self.process(msg, kwargs)
        self.logger.log(level, f"[rank: {current}] {msg}", *args, **kwargs)
