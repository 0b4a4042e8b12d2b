"""`hf:PATH`: a Hugging Face dataset on disk, read with pyarrow alone (the `datasets` package is not needed).

PATH is a folder written by `datasets.Dataset.save_to_disk` (data-*.arrow stream shards + state.json +
dataset_info.json), a `DatasetDict.save_to_disk` folder (dataset_dict.json + one such folder per split), or
parquet: one file, a folder searched recursively, or a glob (`data/*.parquet`).

Split rule: a DatasetDict's `train` split trains and its `test` split (else `validation`) is held out; parquet
files named or foldered by split (train-*.parquet, test/…) likewise; otherwise (one dataset, split=NAME, plain
parquet) 25 % is held out by a seeded permutation, like every other labelled source.

Columns: image= (the HF Image feature: {bytes, path} structs decoded with Pillow, then resized / normalised as
imagefolder does), text= (texts, tokenised by the model's tokenizer like the text: source), features= (numeric
columns), label=. Defaults: image/img, text/sentence, label/labels. limit=N reads the first N rows of each split.
"""

from __future__ import annotations

import glob
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from compressor.errors import InputError
from compressor.io.bundle import DataBundle, _split
from compressor.io.sources import MAX_TENSOR_BYTES, decode_image, image_size_mode, image_tensor, open_image
from compressor.utils import progress as bars

IMAGE_COLUMNS, TEXT_COLUMNS, LABEL_COLUMNS = ("image", "img"), ("text", "sentence"), ("label", "labels")
HELD_OUT = ("test", "validation", "valid", "val")
_SPLIT_IN_NAME = re.compile(r"(?:^|/)(train|test|validation|valid|val)(?=[-_./]|$)")
INSTALL = "pip install pyarrow (or pip install 'compressor[data]')"


class Part:
    """The rows of one split, with where each row came from (for one-line errors naming file and row)."""

    def __init__(self, name: str, tables: list, origins: list[tuple[Path, int]], features: dict):
        self.name, self.features = name, features
        self.table = _concat(tables)
        self.origins = origins  # (file, rows in it) in order

    def where(self, i: int) -> str:
        for path, n in self.origins:
            if i < n:
                return f"{path} row {i}"
            i -= n
        return f"row {i}"

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InputError("hf: data needs the pyarrow package, which is not installed", INSTALL) from None
    return pyarrow


def _concat(tables: list):
    pa = _pyarrow()
    try:
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as e:
        raise InputError(f"hf: the files disagree in columns ({str(e).splitlines()[0][:100]})", "give files of one dataset") from None


def _features(schema, folder: Path | None) -> dict:
    """The `datasets` feature types ({column: {"_type": ...}}): dataset_info.json, else the schema metadata."""
    info = folder / "dataset_info.json" if folder is not None else None
    try:
        if info is not None and info.is_file():
            return json.loads(info.read_text(encoding="utf-8")).get("features") or {}
        meta = (schema.metadata or {}).get(b"huggingface")
        return json.loads(meta).get("info", {}).get("features") or {} if meta else {}
    except (ValueError, AttributeError):
        return {}


def _read_arrow(path: Path):
    pa = _pyarrow()
    try:
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).read_all()  # save_to_disk writes the stream format
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"cannot read {path} as Arrow ({type(e).__name__}: {str(e).splitlines()[0][:80]})",
                         "re-save it with datasets.Dataset.save_to_disk") from None


def _read_parquet(path: Path):
    pa = _pyarrow()
    try:
        return pa.parquet.read_table(str(path))
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"cannot read {path} as parquet ({type(e).__name__}: {str(e).splitlines()[0][:80]})",
                         "re-save it with datasets.Dataset.to_parquet or pandas.DataFrame.to_parquet") from None


def _saved_dataset(folder: Path, name: str, limit: int | None) -> Part:
    """One `Dataset.save_to_disk` folder: its shards in state.json's order."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise InputError(f"{folder} holds no data-*.arrow shards", "give a folder written by datasets.Dataset.save_to_disk")
    tables, origins = [], []
    for f in files:
        if limit is not None and sum(n for _, n in origins) >= limit:
            break
        t = _read_arrow(f)
        tables.append(t)
        origins.append((f, t.num_rows))
    return _limited(Part(name, tables, origins, _features(tables[0].schema, folder)), limit)


def _limited(part: Part, limit: int | None) -> Part:
    if limit is not None and part.table.num_rows > limit:
        part.table = part.table.slice(0, limit)
    return part


def _parquet_files(path: Path, spec: str) -> list[Path]:
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(Path(spec).expanduser()), recursive=True) if p.endswith(".parquet"))
    elif path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise InputError(f"hf: no dataset at {spec} (no save_to_disk folder, no .parquet files)",
                         "give a folder written by datasets save_to_disk, a .parquet file, a folder of them or a glob")
    return files


def read_splits(path: Path, spec: str, opts: dict[str, str]) -> tuple[Part, Part | None]:
    """(training part, held-out part or None when the 25 % rule splits the training part)."""
    limit = _limit(opts)
    want = opts.get("split")
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        try:
            names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError):
            names = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        if want is not None:
            if want not in names:
                raise InputError(f"{path} has no split {want!r} (splits: {', '.join(names)})", "name one with split=")
            return _saved_dataset(path / want, want, limit), None
        if "train" not in names:
            raise InputError(f"{path} has no train split (splits: {', '.join(names)})", "pick one with split=NAME (25 % of it is held out)")
        held = next((n for n in HELD_OUT if n in names), None)
        return _saved_dataset(path / "train", "train", limit), (_saved_dataset(path / held, held, limit) if held else None)
    if path.is_dir() and (path / "state.json").is_file():
        return _saved_dataset(path, "all", limit), None
    if path.is_file() and path.suffix == ".arrow":
        t = _read_arrow(path)
        return _limited(Part("all", [t], [(path, t.num_rows)], _features(t.schema, None)), limit), None
    files = _parquet_files(path, spec)
    root = path if path.is_dir() else None
    by_split: dict[str, list[Path]] = {}
    for f in files:
        m = _SPLIT_IN_NAME.search(str(f.relative_to(root)) if root else f.name)
        by_split.setdefault(m.group(1) if m else "all", []).append(f)

    def part(name: str, fs: list[Path]) -> Part:
        tables = [_read_parquet(f) for f in fs]
        return _limited(Part(name, tables, [(f, t.num_rows) for f, t in zip(fs, tables, strict=True)],
                             _features(tables[0].schema, None)), limit)

    if want is not None:
        if want not in by_split:
            raise InputError(f"hf: no parquet files of split {want!r} under {spec} (found: {', '.join(sorted(by_split))})",
                             "name files train-*.parquet / test-*.parquet or drop split=")
        return part(want, by_split[want]), None
    held = next((n for n in HELD_OUT if n in by_split), None)
    if "train" in by_split and held and "all" not in by_split:
        return part("train", by_split["train"]), part(held, by_split[held])
    return part("all", files), None


def _limit(opts: dict[str, str]) -> int | None:
    if "limit" not in opts:
        return None
    try:
        n = int(opts["limit"])
    except ValueError:
        n = 0
    if n < 2:
        raise InputError(f"hf: limit={opts['limit']} is not a row count >= 2", "e.g. limit=1000")
    return n


# ------------------------------------------------------------------------------------------- columns


def _pick(part: Part, opts: dict[str, str], key: str, defaults: tuple[str, ...], where: str) -> str | None:
    cols = part.table.column_names
    if key in opts:
        if opts[key] not in cols:
            raise InputError(f"{where}: no column {opts[key]!r} (columns: {', '.join(cols)})", f"name an existing column with {key}=")
        return opts[key]
    return next((c for c in defaults if c in cols), None)


def _is_image(part: Part, col: str) -> bool:
    """The datasets Image feature, or (without feature metadata) a struct column with a `bytes` field."""
    feat = part.features.get(col) or {}
    if isinstance(feat, dict) and feat.get("_type") == "Image":
        return True
    t = part.table.schema.field(col).type
    return _pyarrow().types.is_struct(t) and "bytes" in [t.field(i).name for i in range(t.num_fields)]


def _images(part: Part, col: str, size, mode, base: Path) -> list[np.ndarray]:
    out = []
    for i, cell in enumerate(bars.track(part.column(col), f"decoding images ({part.name})")):
        if isinstance(cell, dict) and cell.get("bytes"):
            src, what = io.BytesIO(cell["bytes"]), f"image in {part.where(i)}"
        elif isinstance(cell, dict) and cell.get("path"):
            p = Path(cell["path"])
            p = p if p.is_absolute() or p.exists() else base / p
            src, what = p, f"image {p} ({part.where(i)})"
        elif isinstance(cell, bytes | bytearray):
            src, what = io.BytesIO(cell), f"image in {part.where(i)}"
        else:
            raise InputError(f"{part.where(i)}: column {col!r} holds no image (value {str(cell)[:40]!r})",
                             "fill or drop the row (images are {bytes, path} structs, the datasets Image feature)")
        with open_image(src, what) as im:
            out.append(decode_image(im, size, mode))
    return out


def _labels(part: Part, col: str) -> tuple[torch.Tensor, int | None]:
    """Class ids, checked per row; the ClassLabel feature's class count when the dataset declares one."""
    feat = part.features.get(col) or {}
    names = feat.get("names") if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" else None
    ids = []
    for i, v in enumerate(part.column(col)):
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v == int(v)
        if not ok or v < 0:
            hint = " (-1: the split is unlabelled)" if v == -1 else ""
            raise InputError(f"{part.where(i)}, column {col!r}: label {v!r} is not a class id 0..C-1{hint}",
                             "labels are non-negative integers; pick a labelled split with split=NAME" if hint else "labels are non-negative integers")
        if names is not None and v >= len(names):
            raise InputError(f"{part.where(i)}, column {col!r}: label {int(v)} is out of range for its {len(names)} ClassLabel names",
                             f"class ids are 0..{len(names) - 1}")
        ids.append(int(v))
    return torch.tensor(ids, dtype=torch.long), (len(names) if names is not None else None)


def _numeric(part: Part, cols: list[str]) -> torch.Tensor:
    """Numeric columns (numbers, or lists of one length) side by side: [N, features]."""
    out = []
    for c in cols:
        vals = part.column(c)
        try:
            a = np.asarray(vals, dtype=np.float32)  # scalars → [N]; lists of one length → [N, K]
        except (ValueError, TypeError):
            width = len(vals[0]) if isinstance(vals[0], list) else None
            bad = next((i for i, v in enumerate(vals) if not _is_numbers(v, width)), 0)
            raise InputError(f"{part.where(bad)}, column {c!r}: {str(vals[bad])[:40]} is not a number (or a list of {width or 'equal'} numbers)",
                             "numeric features only (texts: text=COLUMN, images: image=COLUMN)") from None
        if not np.isfinite(a).all():
            raise InputError(f"{part.where(int(np.where(~np.isfinite(a))[0][0]))}, column {c!r}: not a finite number", "fill or drop the row")
        out.append(a.reshape(len(a), -1))
    return torch.from_numpy(np.concatenate(out, axis=1))


def _is_numbers(v, width: int | None) -> bool:
    if width is not None:
        return isinstance(v, list) and len(v) == width and all(_is_numbers(e, None) for e in v)
    return isinstance(v, int | float) and not isinstance(v, bool)


def load(spec_path: str, opts: dict[str, str], input_shape=None, test_fraction: float = 0.25, seed: int = 0) -> DataBundle:
    """`hf:PATH` → a DataBundle (classification, calibration or text); see the module docstring."""
    _pyarrow()  # missing pyarrow is said first, whatever PATH holds
    path = Path(spec_path).expanduser()
    train_part, test_part = read_splits(path, spec_path, opts)
    parts = [p for p in (train_part, test_part) if p is not None]
    where = f"hf:{spec_path}"
    first = parts[0]
    for p in parts[1:]:
        missing = [c for c in first.table.column_names if c not in p.table.column_names]
        if missing:
            raise InputError(f"{where}: split {p.name} lacks column(s) {', '.join(missing)} of split {first.name}", "give splits with one schema")
    label = _pick(first, opts, "label", LABEL_COLUMNS, where)
    image = _pick(first, opts, "image", IMAGE_COLUMNS, where) if "text" not in opts and "features" not in opts else None
    if image is None and "text" not in opts and "features" not in opts:
        image = next((c for c in first.table.column_names if _is_image(first, c)), None)
    text = _pick(first, opts, "text", TEXT_COLUMNS, where) if image is None and "features" not in opts else None
    labels = [_labels(p, label) for p in parts] if label else None
    classes = next((n for _, n in labels if n), None) if labels else None
    source = f"hf:{spec_path}"
    if text is not None:
        texts = [[str(t) if t is not None else "" for t in p.column(text)] for p in parts]
        ys = [y.tolist() for y, _ in labels] if labels else None
        if test_part is None:
            perm = torch.randperm(len(texts[0]), generator=torch.Generator().manual_seed(seed)).tolist()
            n_test = max(1, int(round(len(perm) * test_fraction)))
            te, tr = perm[:n_test], perm[n_test:]
            texts = [[texts[0][i] for i in tr], [texts[0][i] for i in te]]
            ys = [[ys[0][i] for i in tr], [ys[0][i] for i in te]] if ys else None
        meta = {"labels": ys[0], "test_labels": ys[1]} if ys else {}
        return DataBundle("embedding", texts=texts[0], test_texts=texts[1], source=source, meta=meta | {"column": text})
    if image is not None:
        size, mode = image_size_mode("hf", opts, input_shape)
        need = sum(p.table.num_rows for p in parts) * (1 if mode == "L" else 3) * size[0] * size[1] * 4
        if need > MAX_TENSOR_BYTES:
            raise InputError(f"{where}: {need / 2**30:.1f} GiB of decoded images is above the {MAX_TENSOR_BYTES / 2**30:g} GiB in-memory cap",
                             "read fewer rows with limit=N or a smaller size=H,W")
        base = path if path.is_dir() else path.parent
        xs = [image_tensor(_images(p, image, size, mode, base), "hf", opts, mode) for p in parts]
        meta = {"column": image}
    else:
        cols = opts["features"].split(",") if "features" in opts else [
            c for c in first.table.column_names if c != label and _numeric_type(first.table.schema.field(c).type)]
        for c in cols:
            if c not in first.table.column_names:
                raise InputError(f"{where}: no column {c!r} (columns: {', '.join(first.table.column_names)})", "name existing columns with features=")
        if not cols:
            raise InputError(f"{where}: no image, text or numeric column (columns: {', '.join(first.table.column_names)})",
                             "name them with image=, text= or features=")
        xs = [_numeric(p, cols) for p in parts]
        meta = {"features": cols}
        if "shape" in opts:
            from compressor.io.sources import _numbers

            shape = tuple(_numbers("hf", "shape", opts["shape"], int))
            if math.prod(shape) != xs[0].shape[1]:
                raise InputError(f"hf: shape={opts['shape']} holds {math.prod(shape)} values but rows have {xs[0].shape[1]}", "make the product match")
            xs = [x.reshape(x.shape[0], *shape) for x in xs]
    ys = [y for y, _ in labels] if labels else None
    if test_part is None:
        if xs[0].shape[0] < 2:
            raise InputError(f"{where} holds {xs[0].shape[0]} row; at least 2 are needed (one is held out)", "add rows")
        train, test = _split(xs[0], ys[0] if ys else None, test_fraction, seed)
    else:
        from torch.utils.data import TensorDataset

        train, test = (TensorDataset(x, y) if ys else TensorDataset(x) for x, y in zip(xs, ys or [None, None], strict=True))
    meta["splits"] = [p.name for p in parts]
    if not ys:
        return DataBundle("calibration", train, test, source=source, meta=meta)
    num = classes or int(max(int(y.max()) for y in ys)) + 1
    return DataBundle("classification", train, test, num_classes=num, source=source, meta=meta)


def _numeric_type(t) -> bool:
    pa = _pyarrow()
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        return _numeric_type(t.value_type)
    return (pa.types.is_integer(t) or pa.types.is_floating(t)) and not pa.types.is_boolean(t)
