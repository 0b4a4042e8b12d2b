"""ONNX models of any size on disk: when a model's weights go to an external-data file, writing the pair
atomically, and a temporary file for the tools that need a path.

protobuf refuses to serialise a message over 2 GiB, and `SerializeToString`, `onnx.checker.check_model(proto)`,
`onnx.shape_inference.infer_shapes(proto)` and `InferenceSession(bytes)` all serialise. Above one size
threshold (the sum of the tensor bytes, read from dims: never a try/except around a failed serialisation) a
model is written as `model.onnx` (the graph, small) plus one `model.onnx.data` beside it (every initializer
of at least `_INLINE_BYTES`), and handed to onnx's checker and to onnxruntime as that path. Below it nothing
changes: one self-contained file, in-memory checks and sessions.

The threshold: `EXTERNAL_DATA_BYTES` (1 GiB: half protobuf's limit, so the graph and small tensors always
fit beside the weights), overridden by the environment variable `COMPRESSOR_EXTERNAL_DATA_BYTES` (bytes; the
tests lower it to 1 KB to run the external-data path on tiny models).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path

from compressor.errors import InputError

EXTERNAL_DATA_BYTES = 1 << 30
ENV_VAR = "COMPRESSOR_EXTERNAL_DATA_BYTES"
_INLINE_BYTES = 1024  # smaller tensors stay in the .onnx file (onnx's own default size_threshold)
_ALIGN_FROM, _ALIGN = 1 << 20, 1 << 16  # offsets of tensors >= 1 MiB aligned to 64 KiB (onnx's own rule: mmap-able)
_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
               17: 1, 18: 1, 19: 1, 20: 1, 21: 1, 22: 1, 23: 1}  # TensorProto.DataType -> bytes per element
EXTERNAL = 1  # TensorProto.EXTERNAL


def external_threshold() -> int:
    """Bytes of tensor data above which a model is kept as .onnx + .onnx.data (read from the environment on
    each call, so a process or a test can change it)."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return EXTERNAL_DATA_BYTES
    try:
        value = int(float(raw))
    except ValueError:
        value = -1
    if value < 0:
        raise InputError(f"{ENV_VAR}={raw!r} is not a byte count", f"set it to a whole number of bytes, e.g. {EXTERNAL_DATA_BYTES}")
    return value


def tensors(graph):
    """Every TensorProto of a graph: initializers, sparse initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield from (sp.values, sp.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from tensors(g)


def tensor_bytes(t) -> int:
    """Bytes of a tensor's data from its dims and type (no copy of the data; strings count 0)."""
    return math.prod(t.dims) * _ITEM_BYTES.get(t.data_type, 0)


def weight_bytes(model) -> int:
    """Bytes of every tensor the model holds, in memory or in its external-data file."""
    return sum(tensor_bytes(t) for t in tensors(model.graph))


def is_large(model) -> bool:
    """Whether the model is past the threshold: kept as .onnx + .onnx.data, checked and run from a path."""
    return weight_bytes(model) > external_threshold()


def model_bytes(model) -> int:
    """Serialised size: ModelProto.ByteSize() below the threshold, the tensor bytes above it (ByteSize encodes
    the whole message, which protobuf refuses past 2 GiB; the graph itself adds a few KB to MB)."""
    return weight_bytes(model) if is_large(model) else model.ByteSize()


def data_name(path: str | os.PathLike) -> str:
    """The external-data file name of `path` ("model.onnx" -> "model.onnx.data")."""
    return Path(path).name + ".data"


# ------------------------------------------------------------------------------------------------ writing


def _external_header(t, location: str, offset: int, length: int):
    """A TensorProto without data saying where its data lives."""
    from onnx import TensorProto

    h = TensorProto()
    h.name, h.data_type, h.doc_string = t.name, t.data_type, t.doc_string
    h.dims.extend(t.dims)
    h.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = h.external_data.add()
        e.key, e.value = k, v
    return h


def _tensor_data(t, base_dir: Path | None) -> bytes:
    """The little-endian bytes of a tensor: raw_data, typed fields, or its current external-data file."""
    if t.data_location == EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if base_dir is None:
            raise ValueError(f"tensor {t.name!r} keeps its data in {info.get('location')!r}; pass base_dir to copy it")
        source = (base_dir / info["location"]).resolve()
        if not source.is_relative_to(base_dir.resolve()):  # onnx's own rule: data lives beside the model
            raise InputError(f"tensor {t.name!r} points outside the model's folder ({info['location']!r})",
                             "re-save the model with its data file beside it")
        with open(source, "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    if t.HasField("raw_data"):
        return t.raw_data
    from onnx import numpy_helper

    return numpy_helper.to_array(t).tobytes()


def copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of message `src` into `dst` except `skip`."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def write_external(model, path: Path, *, base_dir: Path | None = None) -> None:
    """Write `model` as `path` + `path.data` (every initializer of >= 1 KB in the data file) without changing
    `model` and without a second copy of it: one tensor's bytes at a time (onnx.save_model(...,
    save_as_external_data=True) would empty the caller's tensors). base_dir: where tensors that are already
    external read their data from."""
    import onnx

    path = Path(path)
    location = data_name(path)
    head = onnx.ModelProto()
    copy_fields(model, head, skip="graph")
    copy_fields(model.graph, head.graph, skip="initializer")
    offset = 0
    with open(path.parent / location, "wb") as f:
        for t in model.graph.initializer:
            size = tensor_bytes(t)
            inline = size < _INLINE_BYTES or t.data_type in (0, 8)  # small, or strings (no fixed-size bytes)
            if inline and t.data_location != EXTERNAL:
                head.graph.initializer.add().CopyFrom(t)
                continue
            if size >= _ALIGN_FROM and offset % _ALIGN:
                pad = _ALIGN - offset % _ALIGN
                f.write(b"\0" * pad)
                offset += pad
            data = _tensor_data(t, base_dir)
            f.write(data)
            head.graph.initializer.append(_external_header(t, location, offset, len(data)))
            offset += len(data)
            del data
    path.write_bytes(head.SerializeToString())  # the graph only: far below protobuf's limit


def write_model(model, path: Path, *, base_dir: Path | None = None) -> None:
    """Write `model` to `path`: one file below the threshold, the .onnx + .onnx.data pair above it (and always
    when base_dir says where tensors that are already external read their data from)."""
    if base_dir is not None or is_large(model):
        write_external(model, path, base_dir=base_dir)
    else:
        Path(path).write_bytes(model.SerializeToString())


def _references(path: Path, name: str) -> bool:
    """Whether the ONNX file at `path` keeps tensor data in the file `name` beside it (its graph is read
    without the weights)."""
    import onnx

    try:
        head = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file (or unreadable): it references nothing
        return False
    return any(e.key == "location" and e.value == name for t in tensors(head.graph) if t.data_location == EXTERNAL
               for e in t.external_data)


@contextlib.contextmanager
def staged(path: str | os.PathLike):
    """Yield a path in a fresh hidden folder beside `path` to write the model (and its .data) to; on success
    both files are renamed into place (same file system: each rename is atomic), data first, so a reader never
    sees an .onnx whose data is missing; on error the folder is deleted and nothing at `path` changes.

    An existing `path` is replaced (the caller asked for it), and with it the .data file it used; a .data file
    beside `path` that does not belong to it is a user's file: refused, never overwritten or deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.parent / data_name(path)
    owned = path.is_file() and _references(path, sidecar.name)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        target = stage / path.name
        yield target
        new_data = stage / sidecar.name
        if new_data.exists() and sidecar.exists() and not owned:
            raise InputError(f"{sidecar} exists and is not the data file of {path.name}",
                             "move it away or choose another output path")
        from compressor.utils.atomic import current_umask

        mode = 0o666 & ~current_umask()
        for f in (new_data, target):
            if f.exists():
                os.chmod(f, mode)
        if new_data.exists():
            os.replace(new_data, sidecar)
        os.replace(target, path)
        if owned and not new_data.exists():  # the previous pair's data file, now referenced by nothing
            sidecar.unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_model(model, path: str | os.PathLike) -> dict:
    """Write `model` atomically (see `staged`); returns {"path", "bytes" (on disk, both files), "data" (the
    external-data file or None)}."""
    path = Path(path)
    with staged(path) as tmp:
        write_model(model, tmp)
    sidecar = path.parent / data_name(path)
    data = sidecar if sidecar.exists() and is_large(model) else None
    return {"path": str(path), "bytes": path.stat().st_size + (data.stat().st_size if data else 0),
            "data": str(data) if data else None}


@contextlib.contextmanager
def scratch_path(name: str = "model.onnx"):
    """A path in a fresh temporary folder (deleted afterwards with whatever was written there)."""
    folder = Path(tempfile.mkdtemp(prefix="compressor-onnx-"))
    try:
        yield folder / name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def model_file(model, *, base_dir: Path | None = None):
    """A temporary path holding `model` (with its .data when large), for onnx's checker, shape inference and
    onnxruntime, which take a path for models past protobuf's limit; deleted afterwards."""
    with scratch_path() as path:
        write_model(model, path, base_dir=base_dir)
        yield path


def check_model(model_or_path) -> None:
    """onnx.checker.check_model, from the path for a file or a large model (the in-memory checker serialises)."""
    import onnx

    if isinstance(model_or_path, str | os.PathLike):
        onnx.checker.check_model(str(model_or_path))
    elif is_large(model_or_path):
        with model_file(model_or_path) as p:
            onnx.checker.check_model(str(p))
    else:
        onnx.checker.check_model(model_or_path)


def weightless_view(model, min_bytes: int = 4096):
    """A copy of `model` whose tensors of >= min_bytes are declared as typed graph inputs instead of
    initializers: what shape inference and the version converter need (types and dims), at the graph's
    cost, whatever the model's size. The caller's model is not changed."""
    import onnx

    g = model.graph
    big = [i for i in g.initializer if tensor_bytes(i) >= min_bytes]
    big_names = {i.name for i in big}
    view = onnx.ModelProto()
    view.ir_version = model.ir_version
    view.opset_import.extend(model.opset_import)
    view.functions.extend(model.functions)
    vg = view.graph
    vg.name = g.name
    vg.node.extend(g.node)
    vg.input.extend(g.input)
    vg.output.extend(g.output)
    vg.value_info.extend(g.value_info)
    vg.initializer.extend(i for i in g.initializer if i.name not in big_names)
    have = {i.name for i in g.input}
    for i in big:
        if i.name not in have:
            vi = vg.input.add()
            vi.name = i.name
            tt = vi.type.tensor_type
            tt.elem_type = i.data_type
            for d in i.dims:
                tt.shape.dim.add().dim_value = d
    return view


def infer_shapes(model, **kwargs):
    """onnx.shape_inference.infer_shapes on a weightless view when the model is large (the weights' values
    never change a shape; the view keeps the tensors below 4 KB, where shape constants live)."""
    import onnx

    return onnx.shape_inference.infer_shapes(weightless_view(model) if is_large(model) else model, **kwargs)
