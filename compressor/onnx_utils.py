"""Small ONNX helpers shared by the API and stages: example feeds from graph inputs, verified saving, and the
one place that makes a model fit the installed onnxruntime.

onnx and onnxruntime are released separately and pip accepts any pair, so `onnx.helper.make_model` (and any
tool built on onnx) may stamp an IR version the installed onnxruntime refuses ("Unsupported model IR version:
14, max supported IR version: 13"). Every model the project writes or hands to onnxruntime goes through
`runtime_bytes` (what is written) or `runtime_source` (what onnxruntime loads): they lower the IR version to
the newest one the installed onnxruntime accepts (probed once at run time, not a table) and refuse, in one
line, a model whose operator set is newer than onnxruntime implements.

Models past the external-data threshold (compressor/onnx_files.py) never go through bytes: `write_runtime`
writes the .onnx + .onnx.data pair and `inference_session` opens a session from a path.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np

from compressor.errors import InputError, VerificationError
from compressor.onnx_files import (
    check_model,
    is_large,
    model_file,
    scratch_path,
    staged,
    tensors,
    write_model,
)

_NP = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64, 9: np.bool_}


def _accepted(ir_version: int, opset: int) -> bool:
    """Does the installed onnxruntime load a one-node model stamped with this IR version and opset?"""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's own exception types (Fail / InvalidGraph / ...)
        return False
    return True


_BEYOND = 8  # how far past the installed onnx's own limits to ask (onnxruntime may be the newer of the two)


@functools.cache
def ort_max_ir_version() -> int:
    """The newest model IR version the installed onnxruntime loads (it may be newer than the installed onnx's)."""
    import onnx

    for ir in range(onnx.IR_VERSION + _BEYOND, 2, -1):
        if _accepted(ir, 7):  # opset 7: understood by every onnxruntime release this project supports
            return ir
    raise RuntimeError("onnxruntime loads no ONNX IR version at all; the installation is broken")


@functools.cache
def ort_max_opset() -> int:
    """The newest default-domain (ai.onnx) opset the installed onnxruntime implements (it may be newer than
    the installed onnx's)."""
    import onnx

    ir = ort_max_ir_version()
    for opset in range(onnx.defs.onnx_opset_version() + _BEYOND, 6, -1):
        if _accepted(ir, opset):
            return opset
    raise RuntimeError("onnxruntime loads no ai.onnx opset >= 7; the installation is broken")


def default_opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def check_runtime_opset(model, source: str = "the model") -> None:
    """InputError (one line) when the model's ai.onnx opset is newer than the installed onnxruntime's."""
    import onnxruntime as ort

    opset, limit = default_opset(model), ort_max_opset()
    if opset > limit:
        raise InputError(f"{source} uses ONNX opset {opset}; the installed onnxruntime {ort.__version__} runs opsets up to {limit}",
                         f"upgrade onnxruntime (pip install -U onnxruntime) or re-export the model with opset <= {limit}")


@contextlib.contextmanager
def _runtime_stamp(model):
    """The model temporarily stamped with an IR version onnxruntime accepts (restored afterwards, so a
    caller's model is never changed); the operator set is checked first."""
    check_runtime_opset(model)
    old = model.ir_version
    model.ir_version = min(old, ort_max_ir_version()) if old else ort_max_ir_version()
    try:
        yield model
    finally:
        model.ir_version = old


def runtime_bytes(model) -> bytes:
    """The serialized model, stamped with an IR version onnxruntime accepts (small models only: a model past
    the external-data threshold is written with `write_runtime`)."""
    if isinstance(model, bytes):
        import onnx

        parsed = onnx.ModelProto.FromString(model)
        if parsed.ir_version and parsed.ir_version <= ort_max_ir_version():
            check_runtime_opset(parsed)
            return model
        model = parsed
    elif is_large(model):  # decided by size, never by a failing SerializeToString
        raise ValueError("a model past the external-data threshold has no bytes form; write it with write_runtime")
    with _runtime_stamp(model) as m:
        return m.SerializeToString()


def write_runtime(model, path: Path) -> None:
    """Write `model` (stamped as `runtime_bytes` does) to `path`, as .onnx + .onnx.data when it is large."""
    if isinstance(model, bytes):
        model = _parse(model)
    with _runtime_stamp(model) as m:
        write_model(m, path)


@contextlib.contextmanager
def runtime_file(model):
    """A temporary path holding `model` as `write_runtime` writes it (deleted afterwards): for checking and
    running a large model from one written copy."""
    with scratch_path() as path:
        write_runtime(model, path)
        yield path


def _parse(data: bytes):
    import onnx

    return onnx.ModelProto.FromString(data)


def runtime_source(src):
    """What to hand to onnxruntime.InferenceSession for bytes, a small ModelProto or a file path: unchanged
    when onnxruntime accepts it, else the model re-stamped. Sessions of any size: `inference_session`."""
    if isinstance(src, bytes) or hasattr(src, "SerializeToString"):
        return runtime_bytes(src)
    import onnx

    path = str(src)
    head = onnx.load(path, load_external_data=False)
    check_runtime_opset(head, Path(path).name)
    if head.ir_version and head.ir_version <= ort_max_ir_version():
        return path
    return runtime_bytes(onnx.load(path))


def inference_session(src, so=None, providers=("CPUExecutionProvider",)):
    """onnxruntime.InferenceSession for bytes, a ModelProto or a file path, of any size, stamped with an IR
    version onnxruntime accepts. A large ModelProto goes through a temporary .onnx + .onnx.data (onnxruntime
    reads the weights while the session is built; the files are deleted after); a file whose IR version is too
    new is re-stamped into a temporary pair, its weights copied tensor by tensor, never all in memory."""
    import onnxruntime as ort

    if so is None:
        so = ort.SessionOptions()
        so.log_severity_level = 3
    providers = list(providers)
    if isinstance(src, bytes) or (hasattr(src, "SerializeToString") and not is_large(src)):
        return ort.InferenceSession(runtime_bytes(src), so, providers=providers)
    if hasattr(src, "SerializeToString"):
        with _runtime_stamp(src) as m, model_file(m) as p:
            return ort.InferenceSession(str(p), so, providers=providers)
    import onnx

    path = Path(src)
    head = onnx.load(str(path), load_external_data=False)
    check_runtime_opset(head, path.name)
    if head.ir_version and head.ir_version <= ort_max_ir_version():
        return ort.InferenceSession(str(path), so, providers=providers)
    head.ir_version = ort_max_ir_version()
    with model_file(head, base_dir=path.parent) as p:
        return ort.InferenceSession(str(p), so, providers=providers)


def onnx_file_bytes(path: str | Path) -> int:
    """Bytes on disk of an ONNX model: the .onnx file plus every external-data file it references (read from
    the model's tensor records; the weights themselves are not loaded)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for t in tensors(model.graph)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    files = {(path.parent / loc).resolve() for loc in locations}
    return path.stat().st_size + sum(f.stat().st_size for f in files if f.is_file())


def graph_inputs(model) -> list:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_shape(model) -> tuple[int, ...] | None:
    """Shape of the single input without the batch axis, when static."""
    ins = graph_inputs(model)
    if len(ins) != 1:
        return None
    dims = ins[0].type.tensor_type.shape.dim[1:]
    if not all(d.HasField("dim_value") for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def example_feeds(model, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every graph input: symbolic dims become `batch` (first) or `seq`; ints are small token ids."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else seq) for i, d in enumerate(tt.shape.dim)]
        dtype = _NP.get(tt.elem_type, np.float32)
        if np.issubdtype(dtype, np.integer):
            arr = np.ones(shape, dtype) if "mask" in vi.name else rng.integers(0, 100, shape).astype(dtype)
        elif dtype == np.bool_:
            arr = np.ones(shape, dtype)
        else:
            arr = rng.standard_normal(shape).astype(dtype)
        feeds[vi.name] = arr
    return feeds


def run_onnx(src, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of an ONNX model (path, bytes or ModelProto, any size) in onnxruntime on the CPU; feeds it does
    not take are dropped."""
    sess = inference_session(src)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def run(model_or_bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_onnx(model_or_bytes, feeds)


def save_onnx_verified(model, path: Path, feeds: dict | None = None) -> dict:
    """Write an ONNX model (as .onnx + .onnx.data when large) to a staging folder beside `path`, check the
    written file with onnx.checker and run it in onnxruntime, then move it into place."""
    check_runtime_opset(model)
    path = Path(path)
    feeds = feeds if isinstance(feeds, dict) else example_feeds(model)
    with staged(path) as tmp:
        write_runtime(model, tmp)
        try:
            check_model(tmp)
            outs = run_onnx(tmp, feeds)
        except Exception as e:  # checker / ORT errors
            raise VerificationError(f"the ONNX model does not validate or run: {str(e).splitlines()[0][:200]}", "nothing was written; report this as a bug") from e
        if not all(np.all(np.isfinite(o)) for o in outs if np.issubdtype(o.dtype, np.floating)):
            raise VerificationError("the ONNX model produces non-finite outputs", "nothing was written")
    return {"path": str(path), "bytes": onnx_file_bytes(path)}
