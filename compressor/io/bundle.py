"""The DataBundle every data source returns, and the one split rule they share (io.data and io.sources)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import TensorDataset


@dataclass
class DataBundle:
    """What a recipe and the evaluator need to know about the data.

    task: "classification" (train/test TensorDatasets of (x, y)), "embedding" / "lm" (texts),
    "calibration" (inputs only, no labels: quality is measured against the original model's outputs).
    """

    task: str
    train: TensorDataset | None = None
    test: TensorDataset | None = None
    texts: list[str] | None = None
    test_texts: list[str] | None = None
    num_classes: int | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def input_shape(self) -> tuple[int, ...] | None:
        ds = self.train or self.test
        return tuple(ds.tensors[0].shape[1:]) if ds is not None else None


def _split(x: torch.Tensor, y: torch.Tensor | None, test_fraction: float, seed: int):
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    te, tr = perm[:n_test], perm[n_test:]
    if y is None:
        return TensorDataset(x[tr]), TensorDataset(x[te])
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])
