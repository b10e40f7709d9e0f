"""Progress bars for people at a terminal, and silence everywhere else.

One helper for every long loop of genlab (sampling, evaluation, reference statistics, evaluator
and cache builds)::

    from genlab.utils import progress

    with progress.bar("reference features", total=n) as bar:
        for batch in loader:
            ...
            bar.advance(len(batch))

    for item in progress.track(items, "writing the cache"):
        ...

A bar is drawn with rich only when all of these hold: rich's console (standard output, the one
Lightning's rich progress bar uses) is a terminal, this process is global rank zero (``rank_zero_only.rank``), and progress bars are not switched off
(``GENLAB_PROGRESS=0`` in the environment, or :func:`disable`). Otherwise every call is a
no-op that prints nothing, so logs, CI and tests stay clean; ``GENLAB_PROGRESS=1`` forces bars
on (for a terminal that does not say it is one).

Bars opened while another is shown are drawn under it in the same display (a nested loop, e.g.
the denoising steps of one sampling call: :func:`steps`, which draws only inside an open bar).
The display lives on rich's global console, so inside Lightning's ``RichProgressBar`` (the
metrics callback generating at the end of ``trainer.test``) rich nests it in that display. A
display that rich cannot start falls back to no bar rather than failing the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
ENV = "GENLAB_PROGRESS"  # 0: never draw; 1: draw even without a terminal (rank zero only)

_disabled = False
_display: Any = None  # the rich Progress while some bar is open


def disable(value: bool = True) -> None:
    """Switch progress bars off (or on again) for this process."""
    global _disabled
    _disabled = value


def enabled() -> bool:
    """Whether a bar would be drawn now (see the module docstring)."""
    from lightning.pytorch.utilities import rank_zero_only  # its rank, set from the launcher

    if _disabled or getattr(rank_zero_only, "rank", 0) != 0:
        return False
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    from rich import get_console

    return get_console().is_terminal


class Bar:
    """One bar of the display; every method is a no-op when nothing is drawn."""

    def __init__(self, display: Any = None, task: Any = None) -> None:
        self.display, self.task = display, task

    @property
    def shown(self) -> bool:
        return self.display is not None

    def advance(self, n: float = 1) -> None:
        if self.display is not None:
            self.display.advance(self.task, n)

    def update(self, *, completed: float | None = None, total: float | None = None, **fields):
        """Set the bar's count, total, or description (``description=...``)."""
        if self.display is not None:
            self.display.update(self.task, completed=completed, total=total, **fields)


def new_display() -> Any:
    from rich import get_console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=get_console(),
        transient=False,
    )


@contextmanager
def bar(description: str, total: float | None = None, *, transient: bool = False) -> Iterator[Bar]:
    """A progress bar for the ``with`` block (``total=None``: a spinner with the elapsed time).

    ``transient``: remove the bar when it is done (for inner loops).
    """
    global _display
    if not enabled():
        yield Bar()
        return
    opened = False
    if _display is None:
        display = new_display()
        try:
            display.start()
        except Exception:  # another live display holds the terminal: no bar, no failure
            yield Bar()
            return
        _display, opened = display, True
    task = _display.add_task(description, total=total)
    try:
        yield Bar(_display, task)
        if total is None:  # a spinner: shown as done
            _display.update(task, total=1, completed=1)
    finally:
        if transient and not opened:
            _display.remove_task(task)
        if opened:
            display, _display = _display, None
            display.stop()


def track(
    iterable: Iterable[T], description: str, total: float | None = None, *, transient=False
) -> Iterator[T]:
    """Iterate ``iterable`` with a bar of ``total`` (default ``len(iterable)`` if it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with bar(description, total, transient=transient) as shown:
        for item in iterable:
            yield item
            shown.advance(1)


def steps(iterable: Iterable[T], description: str, total: float | None = None) -> Iterator[T]:
    """A nested bar: drawn (and removed when done) only while an outer bar is shown, e.g. the
    denoising steps of a sampler during ``sample.py``'s sampling; else plain iteration."""
    if _display is None:
        yield from iterable
        return
    yield from track(iterable, description, total, transient=True)
