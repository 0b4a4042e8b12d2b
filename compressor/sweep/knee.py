"""Knee detection on a quality-vs-sparsity curve.

Two definitions are always reported side by side, with the raw curve: the tolerance point
(:func:`essential_sparsity_tolerance`, the largest sparsity within `eps` of the dense quality) and a Kneedle
knee (:func:`knee`), cross-checked by the drop-rate ratio (:func:`drop_rate_knee`). A curve is
``[(p, metric), ...]``, ``{p: metric}`` or ``[{"target"/"sparsity": p, "metric": m}, ...]``.
"""

from __future__ import annotations

import math

import numpy as np

from compressor.errors import InputError


def _as_curve(curve) -> tuple[np.ndarray, np.ndarray]:
    """(p, metric) arrays sorted by p from: [(p, m), ...], {p: m}, or [{"target"/"sparsity": p, "metric": m}]."""
    if isinstance(curve, dict):
        pairs = list(curve.items())
    else:
        pairs = []
        for pt in curve:
            if isinstance(pt, dict):
                p = pt.get("target", pt.get("sparsity"))
                pairs.append((p, pt["metric"]))
            else:
                p, m = pt
                pairs.append((p, m))
    if not pairs:
        raise InputError("the sweep curve is empty", "sweep at least one sparsity level (the grid always includes 0.0)")
    x = np.array([float(p) for p, _ in pairs], dtype=np.float64)
    y = np.array([float(m) for _, m in pairs], dtype=np.float64)
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        raise InputError("the sweep curve has NaN or infinite values", "check the metric; a diverged model gives NaN outputs")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if np.any(np.diff(x) <= 0):
        raise InputError("the sweep curve has the same sparsity twice", "give each sparsity level once")
    return x, y


def essential_sparsity_tolerance(curve, eps: float = 1.0, relative: bool = False) -> float:
    """Largest sparsity p whose metric is within `eps` of the dense metric, with every smaller p within too.

    eps is in the metric's units (points, for a percent metric) or, with ``relative=True``, in percent of the
    dense metric. The dense metric is the value at p = 0, which the curve must contain.
    """
    x, y = _as_curve(curve)
    if eps < 0 or not math.isfinite(eps):
        raise InputError(f"eps must be a finite number >= 0, got {eps}", "e.g. eps=1.0 allows a one-point drop")
    if x[0] != 0.0:
        raise InputError("the curve has no dense point (sparsity 0.0)", "include 0.0 in the grid: the drop is measured from it")
    ref = y[0]
    drops = ref - y
    if relative:
        drops = 100.0 * drops / max(abs(ref), 1e-12)
    best = 0.0
    for p, d in zip(x, drops, strict=True):
        if d > eps + 1e-12:
            break
        best = float(p)
    return best


def _normalised(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    xr, yr = x[-1] - x[0], y.max() - y.min()
    if len(x) < 3 or xr <= 0 or yr <= 1e-12 * max(1.0, abs(y).max()):
        return None
    return (x - x[0]) / xr, (y - y.min()) / yr


def knee(curve, min_gap: float = 1e-3) -> float | None:
    """Kneedle knee of a metric-vs-sparsity curve.

    x = sparsity and y = metric are scaled to [0, 1]; the knee is the grid point where the curve lies furthest
    above the straight line from the first to the last point — the corner of a "flat, then falling" curve,
    i.e. the last sparsity before the sharp drop. None when there is no such corner: fewer than 3 points, a
    flat curve, or a curve that never rises above the chord by more than `min_gap` (a straight or convex one
    that drops from the start).
    """
    x, y = _as_curve(curve)
    norm = _normalised(x, y)
    if norm is None:
        return None
    xn, yn = norm
    chord = yn[0] + (yn[-1] - yn[0]) * xn
    diff = yn - chord
    i = int(np.argmax(diff))
    if diff[i] <= min_gap:
        return None
    return float(x[i])


def drop_rate_knee(curve, delta: float = 0.1) -> float | None:
    """Cross-check of :func:`knee`: the grid point p maximising (drop rate after p) / (drop rate before p).

    Rates are slopes of adjacent segments on the [0, 1]-normalised curve (drops only; rises count as 0),
    each regularised with `delta` so a flat segment does not divide by zero. None for fewer than 3 points or a
    flat curve, and when no point has a ratio above 1 + 1e-9 (nothing falls faster after than before).
    """
    x, y = _as_curve(curve)
    norm = _normalised(x, y)
    if norm is None:
        return None
    xn, yn = norm
    slopes = -np.diff(yn) / np.diff(xn)  # drop rate of each segment
    drops = np.clip(slopes, 0.0, None)
    ratios = (drops[1:] + delta) / (drops[:-1] + delta)  # at interior points 1..n-2
    i = int(np.argmax(ratios))
    if ratios[i] <= 1.0 + 1e-9:
        return None
    return float(x[i + 1])


def analyze_curve(curve, eps: float = 1.0, relative: bool = False) -> dict:
    """Both knee definitions plus the raw curve: neither is reliable alone (a straight or convex curve has no
    corner; the tolerance point depends on `eps`), so both are always reported."""
    x, y = _as_curve(curve)
    pts = list(zip(x.tolist(), y.tolist(), strict=True))
    tol = essential_sparsity_tolerance(pts, eps, relative) if x[0] == 0.0 else None
    kn, kr = knee(pts), drop_rate_knee(pts)
    steps = np.diff(x)
    step = float(steps.max()) if len(steps) else 0.0

    def at(p):
        return None if p is None else float(y[int(np.argmin(np.abs(x - p)))])

    return {
        "tolerance": tol,
        "knee": kn,
        "knee_drop_rate": kr,
        "knee_methods_agree": None if kn is None or kr is None else bool(abs(kn - kr) <= step + 1e-9),
        "metric_dense": float(y[0]) if x[0] == 0.0 else None,
        "metric_at_tolerance": at(tol),
        "metric_at_knee": at(kn),
        "eps": eps,
        "relative": relative,
        "curve": [[float(a), float(b)] for a, b in pts],
    }

