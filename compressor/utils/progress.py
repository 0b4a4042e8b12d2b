"""Progress bars: the one helper every step that can take more than a few seconds uses (training, evaluation,
export, graph analysis, calibration, sweeps).

Bars go to stderr (stdout stays clean for `--json`) and vanish when done. When stderr is not a terminal (pipes,
CI logs, tests) a step that runs longer than HEARTBEAT_S prints one plain line every HEARTBEAT_S instead (what it
is doing, how far, elapsed, the time left at the rate so far), so a long run in a log is never silent. Nothing
is shown with the CLI's global `--quiet`, with `set_quiet(True)` or the environment variable COMPRESSOR_QUIET=1.
Bars opened while another is live join its display as one more line (rich allows one live display at a time),
so a step may open a bar inside another step's bar.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from contextlib import contextmanager

HEARTBEAT_S = 60.0  # seconds between two log lines of a step when stderr is not a terminal

_quiet = False
_live = None  # the rich Progress shown now, shared by nested bars
_users = 0
_log_bars: list[LogBar] = []  # the steps running now, when bars are log lines
_log_lock = threading.Lock()
_beat: tuple[threading.Thread, threading.Event] | None = None


def set_quiet(quiet: bool = True) -> None:
    """Silence (or allow again) every bar of this process."""
    global _quiet
    _quiet = bool(quiet)


def quiet() -> bool:
    return _quiet or os.environ.get("COMPRESSOR_QUIET", "") not in ("", "0")


def enabled() -> bool:
    """True when bars are shown: not quiet, and stderr is a terminal."""
    if quiet():
        return False
    from rich.console import Console

    return Console(stderr=True).is_terminal


class Bar:
    """One task of the shared display; a no-op when bars are off (every method may be called either way).
    Numeric fields (e.g. loss=) are shown after the description."""

    def __init__(self, progress=None, task=None, description: str = "", fields: dict | None = None):
        self._progress, self._task = progress, task
        self._description, self._fields = description, dict(fields or {})

    def _shown(self) -> str:
        """The numeric fields, as `name value` pairs."""
        return " ".join(f"{k} {v:.4g}" for k, v in self._fields.items() if isinstance(v, int | float))

    def _text(self) -> str:
        shown = self._shown()
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


class LogBar(Bar):
    """A bar when stderr is a log: it only keeps count; the heartbeat thread prints its line."""

    def __init__(self, description: str, total: float | None, fields: dict):
        super().__init__(None, None, description, fields)
        self.total, self.completed, self.start = total, 0.0, time.monotonic()

    def advance(self, n: float = 1, **fields) -> None:
        self.completed += n
        self._fields.update(fields)

    def update(self, description: str | None = None, **kwargs) -> None:
        self._description = description if description is not None else self._description
        self.total = kwargs.pop("total", self.total)
        self.completed = kwargs.pop("completed", self.completed) + kwargs.pop("advance", 0)
        self._fields.update(kwargs)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        shown = self._shown()
        text = self._description + (f" ({shown})" if shown else "")
        if self.total:
            text += f": {self.completed:g}/{self.total:g}"
        text += f", {_clock(elapsed)} elapsed"
        if self.total and 0 < self.completed < self.total:
            text += f", about {_clock(elapsed * (self.total - self.completed) / self.completed)} left"
        return text


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s" if m else f"{s}s"


def _heartbeat(stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with _log_lock:
            now = time.monotonic()
            lines = [b.line(now) for b in _log_bars]
        if lines and not quiet():
            print("... " + " | ".join(lines), file=sys.stderr, flush=True)


@contextmanager
def _log_progress(description: str, total: float | None, fields: dict):
    global _beat
    bar = LogBar(description, total, fields)
    with _log_lock:
        _log_bars.append(bar)
        if _beat is None:
            stop = threading.Event()
            _beat = (threading.Thread(target=_heartbeat, args=(stop,), name="progress-heartbeat", daemon=True), stop)
            _beat[0].start()
    try:
        yield bar
    finally:
        with _log_lock:
            _log_bars.remove(bar)
            beat = _beat if not _log_bars else None
            if beat is not None:
                _beat = None
        if beat is not None:
            beat[1].set()


def _columns():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn()]


@contextmanager
def progress(description: str, total: float | None = None, *, show: bool = True, **fields):
    """`with progress("training", total=steps, loss=nan) as bar: ... bar.advance(1, loss=v)`; total=None is a step of
    unknown length (an export, an analysis): a pulsing bar with the elapsed time. Numeric fields are shown beside
    the description. show=False: no bar (a caller's own switch, e.g. not on this rank)."""
    global _live, _users
    if not show or quiet():
        yield Bar()
        return
    if not enabled():  # a log: a line now and then instead of a bar
        with _log_progress(description, total, fields) as bar:
            yield bar
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
    if quiet():
        return
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
