"""Data sources: `digits`, `npz:PATH`, `text:PATH`, `random` (calibration only).

Nothing is downloaded. Splits are deterministic (fixed seed) so before/after metrics compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from compressor.errors import InputError

DATA_SPECS = "digits, npz:PATH, text:PATH, random"


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


def digits(test_fraction: float = 0.25, seed: int = 0) -> DataBundle:
    """scikit-learn's bundled digits: 1,797 8×8 images, scaled to [0, 1], shape [N, 1, 8, 8]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    train, test = _split(x, y, test_fraction, seed)
    return DataBundle("classification", train, test, num_classes=10, source="digits")


def npz(path: Path, test_fraction: float = 0.25, seed: int = 0) -> DataBundle:
    if not path.is_file():
        raise InputError(f"data file not found: {path}", "give an existing .npz with arrays 'x' (and 'y')")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a bad file
        raise InputError(f"cannot read {path} as .npz ({type(e).__name__})", "save it with numpy.savez(path, x=..., y=...)") from e
    if "x" not in arrays.files:
        raise InputError(f"{path} has no array 'x' (has: {', '.join(arrays.files) or 'nothing'})", "save inputs as x=... and labels as y=...")
    x = torch.from_numpy(np.ascontiguousarray(arrays["x"])).float()
    if "y" in arrays.files:
        y = torch.from_numpy(np.ascontiguousarray(arrays["y"])).long()
        if y.shape[0] != x.shape[0]:
            raise InputError(f"{path}: x has {x.shape[0]} rows but y has {y.shape[0]}", "x and y must have the same first dimension")
        train, test = _split(x, y, test_fraction, seed)
        return DataBundle("classification", train, test, num_classes=int(y.max()) + 1, source=f"npz:{path}")
    train, test = _split(x, None, test_fraction, seed)
    return DataBundle("calibration", train, test, source=f"npz:{path}")


def text(path: Path, min_lines: int = 8) -> DataBundle:
    """Lines (or paragraphs) of a local text file; even lines calibrate, odd lines are held out."""
    if not path.is_file():
        raise InputError(f"text file not found: {path}", "give an existing UTF-8 text file, one sentence or paragraph per line")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text", "convert it to UTF-8") from e
    if len(lines) < min_lines:
        raise InputError(f"{path} has {len(lines)} non-empty lines; at least {min_lines} are needed", "give a longer text file")
    return DataBundle("embedding", texts=lines[0::2], test_texts=lines[1::2], source=f"text:{path}")


def random_inputs(shape: tuple[int, ...], n: int = 256, seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    train, test = _split(x, None, 0.25, seed)
    return DataBundle("calibration", train, test, source="random", meta={"shape": shape})


def load_data(spec: str | None, *, input_shape: tuple[int, ...] | None = None, seed: int = 0) -> DataBundle | None:
    """Parse a data spec string. `random` needs the model's input shape (without batch)."""
    if spec is None:
        return None
    if spec == "digits":
        return digits(seed=seed)
    if spec == "random":
        if input_shape is None:
            raise InputError("data 'random' needs the model's input shape", "use it with a model whose input shape is known")
        return random_inputs(tuple(input_shape), seed=seed)
    source, sep, rest = spec.partition(":")
    if sep and source == "npz":
        return npz(Path(rest).expanduser(), seed=seed)
    if sep and source == "text":
        return text(Path(rest).expanduser())
    raise InputError(f"unknown data source {spec!r}", f"use one of: {DATA_SPECS}")


def check_compatible(data: DataBundle | None, input_shape: tuple[int, ...] | None) -> None:
    """Refuse data whose sample shape cannot feed the model (before anything runs or is written)."""
    if data is None or input_shape is None or data.input_shape() is None:
        return
    have = data.input_shape()
    if tuple(have) != tuple(input_shape):
        raise InputError(
            f"data samples have shape {list(have)} but the model expects {list(input_shape)}",
            "give data shaped like the model input (without the batch dimension)",
        )
