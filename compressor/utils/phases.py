"""Wall-clock seconds per named phase of a command, in the order the phases ran (report.json's `phases`,
the weightless analysis's `export.seconds`): where the time of a long command goes, without a profiler."""

from __future__ import annotations

import contextlib
import time


class Phases:
    """with phases("analysis"): ...  adds the block's seconds to phases.seconds["analysis"] (a phase entered
    twice accumulates). A no-op sink when a caller passes none: ``Phases.optional(p)``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 3)

    def update(self, seconds: dict[str, float]) -> None:
        for name, s in seconds.items():
            self.add(name, s)

    @staticmethod
    def optional(phases: Phases | None) -> Phases:
        return phases if phases is not None else Phases()


def process_startup(until: float) -> float | None:
    """Seconds from this process's start to the wall-clock time `until` (interpreter, imports, argument
    parsing before a command begins); None when psutil cannot tell."""
    try:
        import psutil

        return round(max(0.0, until - psutil.Process().create_time()), 3)
    except Exception:  # psutil missing or no process table: the phase is simply not reported
        return None


# what a streamed prune counts as "analysis plus pruning": from the folder to a complete pruned folder on disk,
# leaving out process startup (python, torch, transformers), the verification, the generate check and the report
PRUNING_PHASES = ("analysis", "importance", "selection", "plan", "cut", "files")
