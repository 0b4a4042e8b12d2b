"""Knee detection and sweep parsing (docs/essential.md) on synthetic curves with known answers.

Second opinion: the `kneed` package (Satopää et al.'s Kneedle) on concave decreasing curves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from compressor.errors import CompressorError
from compressor.sweep import (
    Pattern,
    analyze_curve,
    drop_rate_knee,
    essential_sparsity_tolerance,
    knee,
    parse_grid,
    parse_patterns,
    refine_points,
)

GRID = [round(0.1 * i, 10) for i in range(10)]
FINE = [round(0.05 * i, 10) for i in range(20)]


def piecewise(grid, k, top=90.0, flat_slope=0.5, steep=150.0):
    """Nearly flat (flat_slope points per unit sparsity) up to k, then falling at `steep` points per unit."""
    return [(p, top - flat_slope * min(p, k) - steep * max(0.0, p - k)) for p in grid]


# ------------------------------------------------------------------------------------------------ knee


@pytest.mark.parametrize("k", [0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
@pytest.mark.parametrize("grid", [GRID, FINE], ids=["step0.1", "step0.05"])
def test_knee_of_flat_then_steep_curve_is_the_corner(k, grid):
    curve = piecewise(grid, k)
    assert knee(curve) == pytest.approx(k)
    assert drop_rate_knee(curve) == pytest.approx(k)
    a = analyze_curve(curve, eps=1.0)
    assert a["knee_methods_agree"] is True
    # tolerance: the flat part drops 0.5 pt per unit, so every p <= k is within 1 point; the next is not
    assert a["tolerance"] == pytest.approx(k)


@pytest.mark.parametrize("k", [0.3, 0.5, 0.65])
def test_knee_agrees_with_kneed(k):
    kneed = pytest.importorskip("kneed", reason="kneed (the dev extra) is not installed")
    for curve in (piecewise(FINE, k), piecewise(FINE, k, flat_slope=5.0, steep=60.0)):
        x, y = zip(*curve, strict=True)
        ref = kneed.KneeLocator(list(x), list(y), curve="concave", direction="decreasing").knee
        assert knee(curve) == pytest.approx(float(ref))


@pytest.mark.parametrize("power", [2, 3, 4, 6])
def test_knee_of_smooth_concave_curve_matches_kneed_and_theory(power):
    """y = 100 − 60 p^a on a fine grid: Kneedle's knee is where the slope equals the chord's slope."""
    kneed = pytest.importorskip("kneed", reason="kneed (the dev extra) is not installed")
    grid = [round(0.01 * i, 10) for i in range(91)]
    curve = [(p, 100 - 60 * p**power) for p in grid]
    x, y = zip(*curve, strict=True)
    ours = knee(curve)
    assert ours == pytest.approx(float(kneed.KneeLocator(list(x), list(y), curve="concave", direction="decreasing").knee))
    # d/dp (normalised) = chord slope: a p^(a-1) = 0.9^a / 0.9  ->  p* = (0.9^(a-1) / a)^(1/(a-1))
    theory = (0.9 ** (power - 1) / power) ** (1 / (power - 1))
    assert abs(ours - theory) <= 0.01 + 1e-9


def test_knee_is_robust_to_small_noise_on_the_plateau():
    rng = np.random.default_rng(0)
    curve = [(p, y + float(rng.normal(0, 0.15)) * (p <= 0.5)) for p, y in piecewise(FINE, 0.5)]
    assert knee(curve) == pytest.approx(0.5)
    assert drop_rate_knee(curve) == pytest.approx(0.5)


def test_flat_curve_has_no_knee_and_full_tolerance():
    curve = [(p, 97.0) for p in GRID]
    assert knee(curve) is None
    assert drop_rate_knee(curve) is None
    assert essential_sparsity_tolerance(curve) == pytest.approx(0.9)
    a = analyze_curve(curve)
    assert a["knee_methods_agree"] is None and a["metric_at_knee"] is None


def test_convex_curve_that_drops_from_the_start_has_no_knee():
    curve = [(p, 100 * math.exp(-5 * p)) for p in GRID]
    assert knee(curve) is None
    assert essential_sparsity_tolerance(curve) == 0.0


def test_straight_line_has_no_knee():
    curve = [(p, 90 - 50 * p) for p in GRID]
    assert knee(curve) is None
    assert drop_rate_knee(curve) is None


def test_tolerance_requires_a_monotone_prefix():
    # 0.3 drops 1.5 points, 0.4 recovers: the tolerance point stops at 0.2, not 0.4
    curve = {0.0: 90.0, 0.1: 89.8, 0.2: 89.1, 0.3: 88.5, 0.4: 89.6, 0.5: 80.0}
    assert essential_sparsity_tolerance(curve, eps=1.0) == pytest.approx(0.2)
    assert essential_sparsity_tolerance(curve, eps=1.5) == pytest.approx(0.4)
    assert essential_sparsity_tolerance(curve, eps=0.0) == 0.0
    # an improvement over dense is within any tolerance
    assert essential_sparsity_tolerance({0.0: 90.0, 0.5: 91.0, 0.6: 70.0}, eps=0.0) == pytest.approx(0.5)


def test_tolerance_relative():
    curve = {0.0: 50.0, 0.1: 49.6, 0.2: 49.4, 0.3: 40.0}
    assert essential_sparsity_tolerance(curve, eps=1.0, relative=True) == pytest.approx(0.1)  # 1 % of 50 = 0.5 pt
    assert essential_sparsity_tolerance(curve, eps=1.0, relative=False) == pytest.approx(0.2)


def test_curve_formats_and_order_do_not_matter():
    pts = piecewise(GRID, 0.4)
    as_dicts = [{"target": p, "metric": m} for p, m in reversed(pts)]
    as_map = dict(pts)
    assert knee(pts) == knee(as_dicts) == knee(as_map) == pytest.approx(0.4)


def test_single_and_two_point_curves():
    assert essential_sparsity_tolerance([(0.0, 80.0)]) == 0.0
    assert knee([(0.0, 80.0)]) is None and drop_rate_knee([(0.0, 80.0)]) is None
    assert knee([(0.0, 80.0), (0.5, 10.0)]) is None
    assert essential_sparsity_tolerance([(0.0, 80.0), (0.5, 79.5)]) == 0.5


@pytest.mark.parametrize("curve, msg", [
    ([], "empty"),
    ([(0.1, 90.0), (0.2, 80.0)], "no dense point"),
    ([(0.0, 90.0), (0.1, 89.0), (0.1, 88.0)], "same sparsity twice"),
    ([(0.0, 90.0), (0.1, float("nan"))], "NaN"),
])
def test_bad_curves_are_clear_errors(curve, msg):
    with pytest.raises(CompressorError, match=msg):
        essential_sparsity_tolerance(curve)


def test_negative_eps_is_an_error():
    with pytest.raises(CompressorError, match="eps"):
        essential_sparsity_tolerance([(0.0, 1.0)], eps=-1)


# ------------------------------------------------------------------------------------------------ grid / patterns


def test_parse_grid_forms():
    assert parse_grid(None) == GRID
    assert parse_grid("0:0.9:0.1") == GRID
    assert parse_grid("0.5:0.9:0.2") == [0.0, 0.5, 0.7, 0.9]  # dense reference always added
    assert parse_grid("0.7, 0.3,0.3") == [0.0, 0.3, 0.7]
    assert parse_grid([0.95, 0.5]) == [0.0, 0.5, 0.95]
    assert parse_grid("0:0.95:0.05") == FINE


@pytest.mark.parametrize("spec, msg", [
    ("0,1.0", r"outside \[0, 1\)"), ([-0.1], r"outside \[0, 1\)"), ([0.2, 1.5], r"outside \[0, 1\)"),
    ("", "empty"), ([], "empty"), (" , ", "empty"), ("0:0.9:0", "step must be > 0"), ("0.9:0.1:0.1", "below start"),
    ("0:0.5", "start:stop:step"), ("a,b", "comma-separated"), ([float("nan")], r"outside \[0, 1\)"),
])
def test_parse_grid_rejects_bad_input(spec, msg):
    with pytest.raises(CompressorError, match=msg):
        parse_grid(spec)


def test_parse_patterns():
    assert parse_patterns(None) == [Pattern("magnitude", "global")]
    assert parse_patterns(["unstructured", "omp-global"]) == [Pattern("magnitude", "global")]
    assert [p.label for p in parse_patterns("layerwise,random,random-erk,2:4")] == ["omp-layerwise", "random", "random-erk", "2:4"]
    assert [p.label for p in parse_patterns(["N:4"])] == ["1:4", "2:4", "3:4"]
    assert [p.label for p in parse_patterns(["nm"])] == ["1:4", "2:4", "3:4", "2:8", "4:8", "6:8"]
    assert {p.curve for p in parse_patterns(["nm"])} == {"N:4", "N:8"}


@pytest.mark.parametrize("spec, msg", [
    ("4:4", "need 1 <= N < M"), ("5:4", "need 1 <= N < M"), ("0:4", "need 1 <= N < M"), ("2:x", "M must be"),
    ("x:4", "N must be"), ("N:16", "no standard"), ("magnitude", "unknown pruning pattern"), ("", "no pruning pattern"),
])
def test_parse_patterns_rejects_bad_input(spec, msg):
    with pytest.raises(CompressorError, match=msg):
        parse_patterns(spec)


def test_refine_points_between_grid_neighbours():
    assert refine_points(GRID, 0.5, 0.05) == [0.45, 0.55]
    assert refine_points(GRID, 0.0, 0.05) == [0.05]
    assert refine_points(GRID, 0.9, 0.05) == [0.85]
    assert refine_points(GRID, 0.5, 0.025) == [0.425, 0.45, 0.475, 0.525, 0.55, 0.575]
