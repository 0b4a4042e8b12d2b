"""What a sweep runs: the sparsity grid and the pruning patterns, parsed and checked before any work.

Patterns:

* ``omp-global`` (alias ``unstructured``, ``global``): one-shot magnitude, |w| ranked jointly over all
  prunable tensors, exactly round(p·N) weights removed (the ``exact_k`` convention of compressor.masks).
* ``omp-layerwise`` (``layerwise``): the same fraction p removed from every tensor separately.
* ``random`` (global random, same count) and ``random-erk`` (Erdős–Rényi-Kernel layer densities): baselines.
* ``N:M`` (e.g. ``2:4``): N smallest |w| of every M consecutive input weights removed (one point at N/M);
  ``N:4`` means {1:4, 2:4, 3:4}, ``N:8`` means {2:8, 4:8, 6:8}, ``nm`` both families.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from compressor.errors import InputError

DEFAULT_GRID: tuple[float, ...] = tuple(round(0.1 * i, 10) for i in range(10))  # 0.0 .. 0.9
# the sparsities of the hardware-friendly N:M families (N:4 and N:8 are what sparse tensor cores run)
NM_FAMILIES: dict[int, tuple[int, ...]] = {4: (1, 2, 3), 8: (2, 4, 6)}
PATTERN_HELP = "unstructured (omp-global) | layerwise | random | random-erk | N:M e.g. 2:4 | N:4 | N:8 | nm"


def _check_level(p: float, where: str = "grid") -> float:
    p = float(p)
    if not math.isfinite(p) or not (0.0 <= p < 1.0):
        raise InputError(f"{where} value {p} is outside [0, 1)", "sparsities are fractions of weights removed, e.g. 0.5; 1.0 would remove everything")
    return round(p, 10)


def parse_grid(spec: str | Iterable[float] | None) -> list[float]:
    """Sparsity levels from "0:0.9:0.1" (start:stop:step, stop included), "0,0.3,0.5", or a list of floats.

    Every value must be in [0, 1). 0.0 (the dense reference) is always added. Sorted, duplicates dropped.
    """
    if spec is None:
        return list(DEFAULT_GRID)
    if isinstance(spec, str):
        s = spec.strip()
        if not s:
            raise InputError("the sparsity grid is empty", "e.g. --grid 0:0.9:0.1 or --grid 0,0.3,0.5,0.7")
        if ":" in s:
            parts = s.split(":")
            try:
                start, stop, step = (float(v) for v in parts) if len(parts) == 3 else (None, None, None)
            except ValueError:
                start = None
            if start is None:
                raise InputError(f"grid {spec!r} is not start:stop:step", "e.g. --grid 0:0.9:0.1")
            if not step > 0:
                raise InputError(f"grid step must be > 0, got {step}", "e.g. --grid 0:0.9:0.1")
            _check_level(start), _check_level(stop)
            if stop < start:
                raise InputError(f"grid {spec!r}: stop {stop} is below start {start}", "e.g. --grid 0:0.9:0.1")
            n = int(math.floor((stop - start) / step + 1e-9))
            values = [start + i * step for i in range(n + 1)]
        else:
            try:
                values = [float(v) for v in s.split(",") if v.strip()]
            except ValueError:
                raise InputError(f"grid {spec!r} is not a comma-separated list of numbers", "e.g. --grid 0,0.3,0.5,0.7") from None
    else:
        values = [float(v) for v in spec]
    if not values:
        raise InputError("the sparsity grid is empty", "e.g. --grid 0:0.9:0.1 or grid: [0.0, 0.5, 0.9]")
    levels = {_check_level(v) for v in values}
    levels.add(0.0)
    return sorted(levels)


@dataclass(frozen=True)
class Pattern:
    """One way to prune: kind "magnitude" (scope global|layerwise), "random" (scope global|erk) or "nm"."""

    kind: str
    scope: str = "global"
    n: int = 0
    m: int = 0

    @property
    def curve(self) -> str:
        if self.kind == "magnitude":
            return f"omp-{self.scope}"
        if self.kind == "random":
            return "random" if self.scope == "global" else f"random-{self.scope}"
        return f"N:{self.m}"

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.curve

    @property
    def on_grid(self) -> bool:
        """Grid patterns are swept at every level; an N:M pattern has one sparsity of its own, N/M."""
        return self.kind != "nm"

    def masks(self, dense: dict[str, torch.Tensor], p: float, seed: int, transposed: set[str]) -> dict[str, torch.Tensor]:
        """Keep-masks of this pattern at sparsity `p` (ignored by N:M) for the dense weights."""
        from compressor.masks import magnitude_masks, nm_masks, random_masks

        if self.kind == "magnitude":
            return magnitude_masks(dense, p, scope=self.scope, convention="exact_k")
        if self.kind == "random":
            return random_masks(dense, p, scope=self.scope, seed=seed)
        return nm_masks(dense, self.n, self.m, transposed=transposed)


_ALIASES = {
    "unstructured": Pattern("magnitude", "global"), "global": Pattern("magnitude", "global"),
    "omp": Pattern("magnitude", "global"), "omp-global": Pattern("magnitude", "global"),
    "layerwise": Pattern("magnitude", "layerwise"), "omp-layerwise": Pattern("magnitude", "layerwise"),
    "random": Pattern("random", "global"), "random-global": Pattern("random", "global"),
    "erk": Pattern("random", "erk"), "random-erk": Pattern("random", "erk"),
}


def _nm(n: int, m: int, spec: str) -> Pattern:
    if m < 2 or n < 1 or n >= m:
        raise InputError(f"invalid N:M pattern {spec!r}: need 1 <= N < M", "N weights are removed from every group of M, e.g. 2:4 (50 %) or 4:8")
    return Pattern("nm", "", n, m)


def parse_patterns(specs: str | Iterable[str] | None) -> list[Pattern]:
    """Patterns from names (see module doc); a string may hold several, comma-separated. Order kept, no duplicates."""
    if specs is None:
        specs = ["unstructured"]
    if isinstance(specs, str):
        specs = [specs]
    out: list[Pattern] = []
    for raw in specs:
        if isinstance(raw, Pattern):
            if raw not in out:
                out.append(raw)
            continue
        for spec in (s.strip() for s in str(raw).split(",")):
            if not spec:
                continue
            key = spec.lower()
            if key in _ALIASES:
                new = [_ALIASES[key]]
            elif key == "nm":
                new = [_nm(n, m, f"{n}:{m}") for m, ns in NM_FAMILIES.items() for n in ns]
            elif ":" in key:
                a, _, b = key.partition(":")
                try:
                    m = int(b)
                except ValueError:
                    raise InputError(f"pattern {spec!r}: M must be an integer", f"patterns: {PATTERN_HELP}") from None
                if a == "n":
                    if m not in NM_FAMILIES:
                        raise InputError(f"pattern {spec!r}: no standard N:M family for M={m}", "use N:4 or N:8, or list patterns like 2:16")
                    new = [_nm(n, m, f"{n}:{m}") for n in NM_FAMILIES[m]]
                else:
                    try:
                        n = int(a)
                    except ValueError:
                        raise InputError(f"pattern {spec!r}: N must be an integer", f"patterns: {PATTERN_HELP}") from None
                    new = [_nm(n, m, spec)]
            else:
                raise InputError(f"unknown pruning pattern {spec!r}", f"patterns: {PATTERN_HELP}")
            out.extend(p for p in new if p not in out)
    if not out:
        raise InputError("no pruning pattern given", f"patterns: {PATTERN_HELP}")
    return out


def refine_points(grid: Sequence[float], center: float, step: float) -> list[float]:
    """Points at `step` spacing strictly between the grid neighbours of `center` that are not in the grid yet."""
    g = sorted(grid)
    i = g.index(center) if center in g else int(np.argmin(np.abs(np.array(g) - center)))
    lo = g[i - 1] if i > 0 else g[i]
    hi = g[i + 1] if i + 1 < len(g) else g[i]
    pts = []
    k = 1
    while lo + k * step < hi - 1e-9:
        v = round(lo + k * step, 10)
        if v not in g and 0.0 <= v < 1.0:
            pts.append(v)
        k += 1
    return pts

