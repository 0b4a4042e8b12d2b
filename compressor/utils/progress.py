"""Progress bars: the one helper every step that can take more than a few seconds uses (training, evaluation,
export, graph analysis, calibration, sweeps).

Bars go to stderr (stdout stays clean for `--json`) and vanish when done. They are off when output is not a
terminal (pipes, CI logs, tests), with the CLI's global `--quiet`, with `set_quiet(True)` or the environment
variable COMPRESSOR_QUIET=1. Bars opened while another is live join its display as one more line (rich allows
one live display at a time), so a step may open a bar inside another step's bar.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

_quiet = False
_live = None  # the rich Progress shown now, shared by nested bars
_users = 0


def set_quiet(quiet: bool = True) -> None:
    """Silence (or allow again) every bar of this process."""
    global _quiet
    _quiet = bool(quiet)


def enabled() -> bool:
    """True when bars are shown: not quiet, and stderr is a terminal."""
    if _quiet or os.environ.get("COMPRESSOR_QUIET", "") not in ("", "0"):
        return False
    from rich.console import Console

    return Console(stderr=True).is_terminal


class Bar:
    """One task of the shared display; a no-op when bars are off (every method may be called either way).
    Numeric fields (e.g. loss=) are shown after the description."""

    def __init__(self, progress=None, task=None, description: str = "", fields: dict | None = None):
        self._progress, self._task = progress, task
        self._description, self._fields = description, dict(fields or {})

    def _text(self) -> str:
        shown = " ".join(f"{k} {v:.4g}" for k, v in self._fields.items() if isinstance(v, int | float))
        return f"[bold]{self._description}[/]" + (f" {shown}" if shown else "")

    def advance(self, n: float = 1, **fields) -> None:
        if self._progress is not None:
            self._fields.update(fields)
            self._progress.update(self._task, advance=n, description=self._text())

    def update(self, description: str | None = None, **kwargs) -> None:
        """A new description, total=, completed=, or a field (e.g. loss=)."""
        if self._progress is None:
            return
        self._description = description if description is not None else self._description
        rich_args = {k: kwargs.pop(k) for k in ("total", "completed", "advance") if k in kwargs}
        self._fields.update(kwargs)
        self._progress.update(self._task, description=self._text(), **rich_args)


def _columns():
    from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn()]


@contextmanager
def progress(description: str, total: float | None = None, *, show: bool = True, **fields):
    """`with progress("training", total=steps, loss=nan) as bar: ... bar.advance(1, loss=v)`; total=None is a step of
    unknown length (an export, an analysis): a pulsing bar with the elapsed time. Numeric fields are shown beside
    the description. show=False: no bar (a caller's own switch, e.g. not on this rank)."""
    global _live, _users
    if not (show and enabled()):
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import Progress

    if _live is None:
        _live = Progress(*_columns(), console=Console(stderr=True), transient=True)
        _live.start()
    _users += 1
    bar = Bar(_live, None, description, fields)
    bar._task = _live.add_task(bar._text(), total=total)
    try:
        yield bar
    finally:
        _live.remove_task(bar._task)
        _users -= 1
        if _users == 0:
            _live.stop()
            _live = None


def note(message: str) -> None:
    """One line on stderr about a long step before it runs (e.g. the work a calibration will do and how long it
    should take), also when bars are off (logs); silent when quiet."""
    if _quiet or os.environ.get("COMPRESSOR_QUIET", "") not in ("", "0"):
        return
    import sys

    print(message, file=sys.stderr, flush=True)


def track(iterable, description: str, total: float | None = None):
    """Iterate `iterable` with a bar (total: len(iterable) when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress(description, total) as bar:
        for item in iterable:
            yield item
            bar.advance()


def step(description: str):
    """Decorator: the function runs under a bar of unknown length (elapsed time shown), e.g. an export. One line
    on a function definition, so a long step gets a bar without its body changing."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with progress(description):
                return fn(*args, **kwargs)

        return wrapper

    return deco
