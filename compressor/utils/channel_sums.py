"""Σ|w|^p per position of one axis of a weight (numpy only): the per-channel magnitude that L1/L2 group
importance reduces onto groups. Shared by the in-memory importance (compressor.graph.importance) and the
checkpoint worker that computes it ahead (compressor.checkpoint.sums_worker), so both give the same numbers."""

from __future__ import annotations

import numpy as np


def position_scores(w: np.ndarray, axis: int, p: float, grad: np.ndarray | None = None) -> np.ndarray:
    """Σ over every other axis of |w|^p (or |w·grad|), per position of `axis`, accumulated in float64.
    p=2 is one einsum with float64 accumulation (no float64 copy of the tensor: a 5632x2048 weight scores in
    10 ms instead of 200 ms); p=1 sums |w| into float64; other exponents and Taylor take the general path."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    if grad is None and np.issubdtype(w.dtype, np.floating) and p in (1.0, 2.0):
        if p == 2.0:
            letters = "abcdefghijklmnop"[:w.ndim]
            return np.einsum(f"{letters},{letters}->{letters[axis]}", w, w, dtype=np.float64)
        return np.abs(w).sum(axis=other, dtype=np.float64) if other else np.abs(w).astype(np.float64)
    x = np.abs(w.astype(np.float64) * grad.astype(np.float64)) if grad is not None else np.abs(w.astype(np.float64)) ** p
    return x.sum(axis=other) if other else x
