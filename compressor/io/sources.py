"""File and in-memory data sources: `imagefolder:DIR`, `csv:PATH`, `jsonl:PATH`, and torch Datasets/DataLoaders.

Spec options follow the path after `?`, as `key=value` pairs joined by `&`; lists are comma-separated:
`imagefolder:DIR?size=64,64&mode=RGB&mean=0.5&std=0.5`, `csv:PATH?label=y&features=a,b,c`.
Every source is materialised into tensors (the toolkit trains and evaluates on TensorDatasets) and split by
the npz rule: a seeded permutation holds out 25 % of the rows.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from compressor.errors import InputError
from compressor.io.bundle import LABEL_KEYS, Batches, DataBundle, _split, split_batches
from compressor.utils import progress as bars

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_SIZE = (32, 32)  # when neither size= nor the model's input shape says otherwise
MAX_TENSOR_BYTES = 2 << 30  # torch Datasets are materialised; refuse above 2 GiB of tensors
OPTIONS = {"imagefolder": {"size", "mode", "mean", "std"}, "csv": {"label", "features", "text", "shape"},
           "jsonl": {"label", "features", "text", "shape"},
           "hf": {"label", "image", "text", "features", "shape", "size", "mode", "mean", "std", "split", "limit"}}


def parse_spec(source: str, rest: str) -> tuple[Path, dict[str, str]]:
    """`PATH?k=v&k=v` → (path, options); an unknown option is refused with the known ones."""
    path, sep, query = rest.rpartition("?") if "?" in rest and "=" in rest.rpartition("?")[2] else (rest, "", "")
    opts: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, eq, value = pair.partition("=")
        if not eq or key not in OPTIONS[source]:
            raise InputError(f"{source}: unknown option {pair!r}", f"options are {', '.join(sorted(OPTIONS[source]))} (as ?key=value&key=value)")
        opts[key] = value
    return Path(path).expanduser(), opts


def _numbers(source: str, key: str, value: str, kind=float) -> list:
    try:
        return [kind(v) for v in value.split(",")]
    except ValueError:
        raise InputError(f"{source}: option {key}={value!r} is not a comma-separated list of numbers", f"e.g. {key}=0.5 or {key}=1,2,3") from None



def image_size_mode(source: str, opts: dict[str, str], input_shape=None) -> tuple[tuple[int, int], str]:
    """(H, W) and Pillow mode of decoded images: size=/mode= when given, else the model's input shape (C in 1, 3),
    else 32×32 RGB."""
    shape = tuple(input_shape) if input_shape is not None and len(input_shape) == 3 and input_shape[0] in (1, 3) else None
    size = tuple(_numbers(source, "size", opts["size"], int)) if "size" in opts else (shape[1:] if shape else DEFAULT_SIZE)
    if len(size) != 2 or min(size) < 1:
        raise InputError(f"{source}: size={opts.get('size')} is not H,W", "e.g. size=32,32")
    mode = opts.get("mode", "L" if shape and shape[0] == 1 else "RGB")
    if mode not in ("L", "RGB"):
        raise InputError(f"{source}: mode={mode} is not L or RGB", "mode=L (grayscale, 1 channel) or mode=RGB (3 channels)")
    return size, mode


class open_image:
    """`with open_image(file_or_bytes, what) as im`: a Pillow image, or a one-line InputError naming `what`."""

    def __init__(self, src, what: str):
        self.src, self.what = src, what

    def __enter__(self):
        from PIL import Image

        try:
            self.im = Image.open(self.src)
            self.im.load()
        except Exception as e:  # Pillow raises several types for a broken or non-image file
            raise InputError(f"cannot read {self.what} ({type(e).__name__})", "remove or replace it") from e
        return self.im

    def __exit__(self, *exc):
        self.im.close()


def decode_image(im, size: tuple[int, int], mode: str) -> np.ndarray:
    """A Pillow image converted to `mode`, resized (bilinear) to `size` H,W, scaled to [0, 1]: [H, W] or [H, W, 3]."""
    from PIL import Image

    return np.asarray(im.convert(mode).resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32) / 255.0


def image_tensor(images: list[np.ndarray], source: str, opts: dict[str, str], mode: str) -> torch.Tensor:
    """Decoded images → [N, C, H, W], normalised with mean=/std= when given (one value or one per channel)."""
    x = torch.from_numpy(np.stack(images))
    x = x.unsqueeze(1) if mode == "L" else x.permute(0, 3, 1, 2).contiguous()
    channels = x.shape[1]
    if "mean" in opts or "std" in opts:
        mean = _numbers(source, "mean", opts.get("mean", "0"))
        std = _numbers(source, "std", opts.get("std", "1"))
        for key, vals in (("mean", mean), ("std", std)):
            if len(vals) not in (1, channels):
                raise InputError(f"{source}: {key} has {len(vals)} values for {channels} channels", f"give 1 or {channels} values")
        if any(s <= 0 for s in std):
            raise InputError(f"{source}: std values must be positive", "e.g. std=0.5")
        x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    return x


# ------------------------------------------------------------------------------------------ imagefolder


def imagefolder(root: Path, opts: dict[str, str], input_shape=None, test_fraction: float = 0.25, seed: int = 0) -> DataBundle:
    """One sub-folder per class (sorted names → label ids 0..C-1), images decoded with Pillow, resized to size=H,W
    (default: the model's input H×W, else 32×32) in mode L (1 channel) or RGB (3; default: the model's channel
    count, else RGB), scaled to [0, 1]; normalised with mean=/std= only when given (one value or one per channel)."""
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}", "give a folder holding one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root} has no class sub-folders", "put the images of each class in its own sub-folder (DIR/cat/1.png, DIR/dog/2.png)")
    size, mode = image_size_mode("imagefolder", opts, input_shape)
    images, labels = [], []
    for label, name in enumerate(bars.track(classes, f"decoding images ({root})")):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"class folder {root / name} holds no images", f"add images ({', '.join(sorted(IMAGE_SUFFIXES))}) or remove the folder")
        for f in files:
            with open_image(f, f"image {f}") as im:
                images.append(decode_image(im, size, mode))
            labels.append(label)
    x = image_tensor(images, "imagefolder", opts, mode)
    if x.shape[0] < 2:
        raise InputError(f"{root} holds {x.shape[0]} image; at least 2 are needed (one is held out)", "add images")
    train, test = _split(x, torch.tensor(labels, dtype=torch.long), test_fraction, seed)
    return DataBundle("classification", train, test, num_classes=len(classes), source=f"imagefolder:{root}",
                      meta={"classes": classes})


# ---------------------------------------------------------------------------------------------- tables


def _rows(path: Path, fmt: str) -> list[tuple[int, dict]]:
    """(line number, record) for each data row; the CSV header is line 1."""
    if not path.is_file():
        raise InputError(f"data file not found: {path}", f"give an existing .{fmt} file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text", "convert it to UTF-8") from None
    if fmt == "csv":
        return [(i + 2, row) for i, row in enumerate(csv.DictReader(text.splitlines()))]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: not valid JSON ({e.msg})", "one JSON object per line") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{i}: a JSON {type(rec).__name__}, not an object", "one JSON object per line, e.g. {\"a\": 1, \"label\": 0}")
        rows.append((i, rec))
    return rows


def _number(path: Path, line: int, col: str, rec: dict) -> float:
    if col not in rec or rec[col] is None or rec[col] == "":
        raise InputError(f"{path}:{line}: no value in column {col!r}", "fill the value or drop the row")
    value = rec[col]
    try:
        out = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out):
        raise InputError(f"{path}:{line}:{col}: {value!r} is not a finite number", "numeric features only (name them with features=a,b; text data: text=COLUMN)")
    return out


def _label(path: Path, line: int, col: str, rec: dict) -> int:
    v = _number(path, line, col, rec)
    if v != int(v) or v < 0:
        raise InputError(f"{path}:{line}:{col}: label {rec[col]!r} is not a class id 0..C-1", "labels are non-negative integers")
    return int(v)


def table(path: Path, fmt: str, opts: dict[str, str], input_shape=None, test_fraction: float = 0.25, seed: int = 0) -> DataBundle:
    """Rows of a CSV (header line) or JSONL file. label= names the label column (default `label`, optional when
    absent); features= the numeric feature columns (default: every other column whose first-row value is a number),
    reshaped to shape=C,H,W or to the model's input shape when the counts agree; text=COLUMN gives texts instead."""
    rows = _rows(path, fmt)
    if len(rows) < 2:
        raise InputError(f"{path} has {len(rows)} data rows; at least 2 are needed (one is held out)", "add rows")
    present = list(dict.fromkeys(k for _, rec in rows[:1] for k in rec))
    label = opts.get("label", "label")
    if label not in present:
        if "label" in opts:
            raise InputError(f"{path}: no label column {label!r} (columns: {', '.join(present)})", "name an existing column with label=")
        label = None
    wanted = [c for c in opts["features"].split(",")] if "features" in opts else [opts["text"]] if "text" in opts else None
    for col in wanted or []:
        if col not in present:
            raise InputError(f"{path}: no column {col!r} (columns: {', '.join(present)})", "name existing columns")
    y = torch.tensor([_label(path, ln, label, rec) for ln, rec in rows]) if label else None
    if "text" in opts:
        texts = [str(rec.get(opts["text"], "")) for _, rec in rows]
        perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = max(1, int(round(len(texts) * test_fraction)))
        te, tr = perm[:n_test], perm[n_test:]
        meta = {"labels": y[tr].tolist(), "test_labels": y[te].tolist()} if y is not None else {}
        return DataBundle("embedding", texts=[texts[i] for i in tr], test_texts=[texts[i] for i in te],
                          source=f"{fmt}:{path}", meta=meta)
    if wanted is None:
        first_line, first = rows[0]
        wanted = [c for c in present if c != label and _is_number(first[c])]
        if not wanted:
            raise InputError(f"{path}: no numeric feature columns (columns: {', '.join(present)})", "name them with features=a,b or give text=COLUMN")
    x = torch.tensor([[_number(path, ln, c, rec) for c in wanted] for ln, rec in rows], dtype=torch.float32)
    target = tuple(_numbers(fmt, "shape", opts["shape"], int)) if "shape" in opts else tuple(input_shape or ())
    if target and math.prod(target) == x.shape[1]:
        x = x.reshape(x.shape[0], *target)
    elif "shape" in opts:
        raise InputError(f"{fmt}: shape={opts['shape']} holds {math.prod(target)} values but rows have {x.shape[1]} features", "make the product match the feature count")
    train, test = _split(x, y, test_fraction, seed)
    if y is None:
        return DataBundle("calibration", train, test, source=f"{fmt}:{path}", meta={"features": wanted})
    return DataBundle("classification", train, test, num_classes=int(y.max()) + 1, source=f"{fmt}:{path}", meta={"features": wanted})


def _is_number(value) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------ torch


def from_torch(obj, test_fraction: float = 0.25, seed: int = 0, cap_bytes: int = MAX_TENSOR_BYTES, *,
               forward_fn=None, loss_fn=None) -> DataBundle:
    """A map-style torch Dataset (items (x, y) or x), a DataLoader or any iterable of batches ((x, y) or x) →
    a DataBundle. The items are materialised into tensors, because the toolkit's stages train and evaluate on
    TensorDatasets: this suits datasets that fit in memory; above cap_bytes of tensors it is refused.
    Batches of another structure (a dict, a tuple such as (x, mask, y)), or any data with forward_fn / loss_fn,
    become io.bundle.Batches (see its contract)."""
    from torch.utils.data import DataLoader, Dataset

    batched = not (isinstance(obj, Dataset) and hasattr(obj, "__len__") and not isinstance(obj, DataLoader))
    if not batched:
        items = (obj[i] for i in range(len(obj)))
    elif hasattr(obj, "__iter__"):
        items = iter(obj)
    else:
        raise InputError(f"data of type {type(obj).__name__} is not a data spec, DataBundle, Dataset, DataLoader or iterable of batches",
                         "pass e.g. data='digits', a torch Dataset or a DataLoader")
    first = next(items, None)
    items = itertools.chain([first], items) if first is not None else iter(())
    if forward_fn is not None or loss_fn is not None or isinstance(first, Mapping) or (
            isinstance(first, tuple | list) and len(first) != 2):
        return _structured(items, batched, type(obj).__name__, test_fraction, seed, cap_bytes, forward_fn, loss_fn)
    xs, ys, total = [], [], 0
    for n, item in enumerate(items):
        x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None)
        x = torch.as_tensor(x)
        y = torch.as_tensor(y) if y is not None else None
        if not batched:
            x, y = x.unsqueeze(0), (y.reshape(1) if y is not None else None)
        total += x.nelement() * x.element_size()
        if total > cap_bytes:
            raise InputError(f"data is above {cap_bytes / 2**30:g} GiB of tensors (the in-memory cap) after {n + 1} items",
                             "pass a subset (torch.utils.data.Subset) or save it as npz")
        if xs and (ys[0] is None) != (y is None):
            raise InputError(f"item {n} of the data has {'no ' if y is None else ''}label unlike the first", "every item (x, y) or every item x")
        xs.append(x)
        ys.append(y)
    if not xs:
        raise InputError("the data holds no items", "pass a non-empty Dataset or DataLoader")
    try:
        x = torch.cat(xs).float()
    except RuntimeError as e:
        raise InputError(f"data items differ in shape ({str(e).splitlines()[0][:80]})", "resize items to one shape") from None
    if x.shape[0] < 2:
        raise InputError("the data holds 1 sample; at least 2 are needed (one is held out)", "pass more samples")
    if ys[0] is None:
        train, test = _split(x, None, test_fraction, seed)
        return DataBundle("calibration", train, test, source=f"torch:{type(obj).__name__}")
    y = torch.cat([t.reshape(-1) for t in ys])
    if y.shape[0] != x.shape[0] or y.is_floating_point() and not bool((y == y.round()).all()) or bool((y < 0).any()):
        raise InputError("data labels are not one class id 0..C-1 per sample", "items (x, y) with y an integer class id")
    train, test = _split(x, y.long(), test_fraction, seed)
    return DataBundle("classification", train, test, num_classes=int(y.max()) + 1, source=f"torch:{type(obj).__name__}")


def _structured(items, batched: bool, name: str, test_fraction: float, seed: int, cap_bytes: int, forward_fn, loss_fn) -> DataBundle:
    """Items or batches of one structure (a dict of tensors, a tuple, a tensor) → Batches, one leaf per key or
    position, concatenated along the batch dimension."""
    keys, leaves, total = None, [], 0
    for n, item in enumerate(items):
        k, vals = (tuple(item), list(item.values())) if isinstance(item, Mapping) else (
            None, list(item) if isinstance(item, tuple | list) else [item])
        if n == 0:
            keys, leaves = k, [[] for _ in vals]
        elif k != keys or len(vals) != len(leaves):
            raise InputError(f"item {n} of the data is {_shape_of(k, vals)}, unlike the first ({_shape_of(keys, leaves)})",
                             "give every batch one structure (the same keys, or the same tuple length)")
        for j, v in enumerate(vals):
            what = f"{keys[j]!r}" if keys is not None else f"element {j}"
            try:
                t = torch.as_tensor(v)
            except (TypeError, ValueError, RuntimeError):
                raise InputError(f"{what} of data item {n} is a {type(v).__name__}, not a tensor",
                                 "drop it from the batches (e.g. dataset.remove_columns) or turn it into a tensor") from None
            t = t.unsqueeze(0) if not batched or t.ndim == 0 else t
            total += t.nelement() * t.element_size()
            if total > cap_bytes:
                raise InputError(f"data is above {cap_bytes / 2**30:g} GiB of tensors (the in-memory cap) after {n + 1} items",
                                 "pass a subset (torch.utils.data.Subset) or save it as npz")
            leaves[j].append(t)
    if not leaves:
        raise InputError("the data holds no items", "pass a non-empty Dataset or DataLoader")
    flat = []
    for j, parts in enumerate(leaves):
        try:
            flat.append(torch.cat(parts))
        except RuntimeError as e:
            what = f"{keys[j]!r}" if keys is not None else f"element {j}"
            raise InputError(f"data {what} differs in shape between items ({str(e).splitlines()[0][:80]})",
                             "pad every item to one shape (e.g. padding='max_length')") from None
    if len({t.shape[0] for t in flat}) != 1 or flat[0].shape[0] < 2:
        raise InputError(f"the data's parts hold {sorted({t.shape[0] for t in flat})} samples; one count of at least 2 is needed",
                         "give every key / element one row per sample")
    label = next((keys.index(k) for k in LABEL_KEYS if k in keys), None) if keys is not None else (
        len(flat) - 1 if len(flat) >= 2 and flat[-1].ndim == 1 and not flat[-1].is_floating_point() else None)
    data = Batches(*flat, keys=keys, label=label, forward_fn=forward_fn, loss_fn=loss_fn)
    train, test = split_batches(data, test_fraction, seed)
    y = data.labels()
    classes = int(y.max()) + 1 if y is not None and bool((y >= 0).all()) else None
    task = "classification" if y is not None or loss_fn is not None else "calibration"
    return DataBundle(task, train, test, num_classes=classes, source=f"torch:{name}",
                      meta={"structure": list(keys) if keys is not None else f"tuple of {len(flat)}", "label": label})


def _shape_of(keys, vals) -> str:
    return f"a dict with keys {', '.join(map(str, keys))}" if keys is not None else f"{len(vals)} elements"


def with_functions(bundle: DataBundle | None, forward_fn=None, loss_fn=None) -> DataBundle | None:
    """The bundle with the caller's forward_fn / loss_fn attached: its (x, y) or x TensorDatasets become Batches
    of tuples (labels: y), so every stage calls the functions."""
    if bundle is None or (forward_fn is None and loss_fn is None):
        return bundle
    if bundle.train is None:
        raise InputError(f"forward_fn / loss_fn need data with samples; {bundle.source} holds texts", "pass a Dataset or DataLoader")

    def attach(ds):
        if isinstance(ds, Batches):
            return Batches(*ds.tensors, keys=ds.keys, label=ds.label, forward_fn=forward_fn, loss_fn=loss_fn)
        return Batches(*ds.tensors, keys=None, label=1 if len(ds.tensors) == 2 else None, forward_fn=forward_fn, loss_fn=loss_fn)

    bundle = dataclasses.replace(bundle)  # the caller's DataBundle is not modified
    bundle.train, bundle.test = attach(bundle.train), attach(bundle.test) if bundle.test is not None else None
    if loss_fn is not None:
        bundle.task = "classification"
    return bundle
