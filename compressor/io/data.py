"""Data sources: `digits`, `npz:PATH`, `text:PATH`, `random` (calibration only); file and torch sources in io.sources,
`hf:PATH` (Hugging Face datasets on disk) in io.hf_datasets; every source with a worked example: docs/data.md.

Nothing is downloaded. Splits are deterministic (fixed seed) so before/after metrics compare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compressor.errors import InputError
from compressor.io.bundle import DataBundle, _split  # noqa: F401  (DataBundle is part of this module's interface)

DATA_SPECS = "digits, npz:PATH, text:PATH, imagefolder:DIR, csv:PATH, jsonl:PATH, hf:PATH, random"
# split rule of every labelled source, stated in --help and docs/cli.md
SPLIT_RULE = "25 % held out by a seeded permutation"


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
    fix = "save it with numpy.savez(path, x=..., y=...): numeric x, integer class labels y"
    try:
        arrays = np.load(path, allow_pickle=False)
        if not hasattr(arrays, "files"):
            raise InputError(f"{path} holds a single array (.npy), not an .npz archive", fix)
        with arrays:  # members are read lazily: read them here, inside the error handling
            if "x" not in arrays.files:
                raise InputError(f"{path} has no array 'x' (has: {', '.join(arrays.files) or 'nothing'})",
                                 "save inputs as x=... and labels as y=...")
            x_np = arrays["x"]
            y_np = arrays["y"] if "y" in arrays.files else None
    except InputError:
        raise
    except Exception as e:  # numpy/zipfile/zlib raise several types for a bad file (object arrays: ValueError)
        raise InputError(f"cannot read {path} as .npz ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})",
                         fix) from e
    x = _checked_inputs(x_np, path, fix)
    if y_np is not None:
        y = _checked_labels(y_np, path, x.shape[0], fix)
        train, test = _split(x, y, test_fraction, seed)
        return DataBundle("classification", train, test, num_classes=int(y.max()) + 1, source=f"npz:{path}")
    train, test = _split(x, None, test_fraction, seed)
    return DataBundle("calibration", train, test, source=f"npz:{path}")


def _checked_inputs(x: np.ndarray, path: Path, fix: str) -> torch.Tensor:
    if x.dtype.kind not in "biuf":
        raise InputError(f"{path}: 'x' has dtype {x.dtype}; inputs must be numbers", fix)
    if x.ndim == 0 or x.shape[0] < 2:
        raise InputError(f"{path}: 'x' has shape {list(x.shape)}; at least 2 rows are needed (one is held out)", fix)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InputError(f"{path}: 'x' holds NaN or infinite values", "clean or drop those rows")
    return torch.from_numpy(np.ascontiguousarray(x)).float()


def _checked_labels(y: np.ndarray, path: Path, rows: int, fix: str) -> torch.Tensor:
    """Integer class ids 0..C-1, one per row of x; float labels only when they are whole numbers."""
    if y.dtype.kind not in "biuf":
        raise InputError(f"{path}: 'y' has dtype {y.dtype}; labels must be integer class ids", fix)
    if y.ndim != 1 or y.shape[0] != rows:
        raise InputError(f"{path}: x has {rows} rows but y has shape {list(y.shape)}",
                         "x and y must have the same first dimension: one integer label per row (y of shape [N])")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise InputError(f"{path}: 'y' holds non-integer values (e.g. {y[~(y == np.round(y))][:1].tolist()}); "
                         "labels are class ids", "store class ids 0..C-1 (regression targets are not supported)")
    if (y < 0).any():
        raise InputError(f"{path}: 'y' holds negative labels", "store class ids 0..C-1")
    return torch.from_numpy(np.ascontiguousarray(y)).long()


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
    if sep and source in ("imagefolder", "csv", "jsonl", "hf"):
        from compressor.io import sources

        path, opts = sources.parse_spec(source, rest)
        if source == "hf":
            from compressor.io import hf_datasets

            return hf_datasets.load(str(path), opts, input_shape, seed=seed)
        if source == "imagefolder":
            return sources.imagefolder(path, opts, input_shape, seed=seed)
        return sources.table(path, source, opts, input_shape, seed=seed)
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


def check_label_range(data: DataBundle | None, outputs: torch.Tensor | None) -> None:
    """Refuse class ids the model cannot predict (a label ≥ its number of logits) before anything runs or is written.
    Only 2-D outputs [batch, classes] are read as class logits."""
    if data is None or data.task != "classification" or not data.num_classes or outputs is None or outputs.ndim != 2:
        return
    if data.num_classes > outputs.shape[1]:
        raise InputError(f"{data.source}: labels go up to {data.num_classes - 1} but the model has {outputs.shape[1]} outputs",
                         f"give class ids 0..{outputs.shape[1] - 1} (or a model with {data.num_classes} classes)")
