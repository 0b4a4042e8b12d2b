"""Sparsity sweeps and knee detection: how much of a model can be removed one-shot, without retraining,
before its quality drops (its "essential sparsity").

A sweep prunes a model one-shot at every sparsity of a grid — each level starts again from the dense
weights (never cumulative) — and measures quality at each level. The package, one job per module:

* :mod:`~compressor.sweep.grid`: the sparsity grid and the pruning patterns (omp-global, layerwise, random,
  random-erk, N:M), parsed and checked before any work;
* :mod:`~compressor.sweep.targets`: which tensors are pruned (never embeddings, heads or the output layer);
* :mod:`~compressor.sweep.evaluators`: how quality is measured (always "higher is better", in percent, so
  ``eps=1.0`` means one point), chosen in one place, :func:`make_evaluator`;
* :mod:`~compressor.sweep.run`: the sweep itself (:func:`run_sweep` on a model and an evaluator; :func:`sweep`
  from a model path or object and a data spec);
* :mod:`~compressor.sweep.knee`: the tolerance point and the Kneedle knee, cross-checked by the drop-rate ratio;
* :mod:`~compressor.sweep.output`: ``sweep.json`` and ``sweep.png``, written atomically.
"""

from __future__ import annotations

from compressor.sweep.evaluators import Evaluator, make_evaluator
from compressor.sweep.grid import (
    DEFAULT_GRID,
    NM_FAMILIES,
    PATTERN_HELP,
    Pattern,
    parse_grid,
    parse_patterns,
    refine_points,
)
from compressor.sweep.knee import analyze_curve, drop_rate_knee, essential_sparsity_tolerance, knee
from compressor.sweep.output import check_outputs_free, plot_sweep, write_sweep
from compressor.sweep.run import check_sweep_fits, run_sweep, sweep, sweep_bytes
from compressor.sweep.targets import default_targets

__all__ = [
    "check_sweep_fits", "sweep_bytes",
    "DEFAULT_GRID", "NM_FAMILIES", "PATTERN_HELP", "Pattern", "Evaluator", "parse_grid", "parse_patterns",
    "essential_sparsity_tolerance", "knee", "drop_rate_knee", "analyze_curve", "default_targets", "make_evaluator",
    "sweep", "run_sweep", "refine_points", "plot_sweep", "write_sweep", "check_outputs_free",
]
