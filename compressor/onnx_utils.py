"""Small ONNX helpers shared by the API and stages: example feeds from graph inputs, verified saving."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.errors import VerificationError
from compressor.utils.atomic import atomic_path

_NP = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64, 9: np.bool_}


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


def run(model_or_bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from compressor.export import run_onnx

    src = model_or_bytes if isinstance(model_or_bytes, bytes | str | Path) else model_or_bytes.SerializeToString()
    return run_onnx(src, feeds)


def save_onnx_verified(model, path: Path, feeds: dict | None = None) -> dict:
    """Check an ONNX model, run it in onnxruntime, then write it atomically."""
    import onnx

    try:
        onnx.checker.check_model(model)
        outs = run(model, feeds if isinstance(feeds, dict) else example_feeds(model))
    except Exception as e:  # checker / ORT errors
        raise VerificationError(f"the ONNX model does not validate or run: {str(e).splitlines()[0][:200]}", "nothing was written; report this as a bug") from e
    if not all(np.all(np.isfinite(o)) for o in outs if np.issubdtype(o.dtype, np.floating)):
        raise VerificationError("the ONNX model produces non-finite outputs", "nothing was written")
    data = model.SerializeToString()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return {"path": str(path), "bytes": len(data)}
