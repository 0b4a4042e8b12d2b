"""Compact storage of pruned weights inside an ONNX file, verified in onnxruntime against the dense model.

Two encodings, chosen per initializer (``method="auto"`` takes the smaller):

* ``sparse_initializer`` — the ONNX-native ``GraphProto.sparse_initializer`` (values + int64 linear indices,
  the only index type the ONNX checker accepts). onnxruntime 1.32 runs these on CPU for any op: it turns
  them into dense initializers when the session loads. Cost: ``nnz * (itemsize + 8)`` bytes, so with fp32 it
  is smaller than dense only above ~67% sparsity.
* ``bitmask`` — values (fp32, nnz + 1) plus a packed 1-bit-per-entry mask, rebuilt by a few standard ops
  placed in front of the graph (Reshape → BitShift → Mod → Slice → Cast → CumSum → Mul → Gather → Reshape,
  opset >= 11). Every input is a constant, so onnxruntime's constant folding replaces the subgraph by the
  dense initializer at session load: no per-inference cost. Cost: ``(nnz + 1) * itemsize + N / 8`` bytes,
  smaller than dense from ~3% sparsity and smaller than ``sparse_initializer`` unless sparsity > ~98%.

Both only shrink the *file*: at run time onnxruntime holds the dense weight (no sparse kernels for
MatMul/Gemm/Conv on its CPU EP). Weights are restored exactly (bit-for-bit values), so outputs match the
dense model; :func:`compact_onnx` checks that in onnxruntime before writing anything.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np

from compressor.errors import InputError, VerificationError

FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # onnx TensorProto.FLOAT / FLOAT16 / DOUBLE


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def encoded_sizes(nnz: int, numel: int, itemsize: int) -> dict[str, int]:
    return {"dense": numel * itemsize, "sparse_initializer": nnz * (itemsize + 8),
            "bitmask": (nnz + 1) * itemsize + math.ceil(numel / 8)}


def _bitmask_nodes(name: str, arr: np.ndarray, prefix: str):
    """(initializers, nodes) that rebuild ``arr`` under ``name`` from values + packed mask."""
    from onnx import TensorProto, helper, numpy_helper

    flat = arr.ravel()
    mask = flat != 0
    vals = np.concatenate([np.zeros(1, arr.dtype), flat[mask]])  # index 0 = the zero every pruned entry gathers
    p = prefix
    inits = [
        numpy_helper.from_array(np.packbits(mask), f"{p}bits"),
        numpy_helper.from_array(vals, f"{p}vals"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), f"{p}col"),
        numpy_helper.from_array(np.arange(7, -1, -1, dtype=np.uint8), f"{p}shifts"),
        numpy_helper.from_array(np.array([2], np.uint8), f"{p}two"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{p}flat"),
        numpy_helper.from_array(np.array([0], np.int64), f"{p}start"),
        numpy_helper.from_array(np.array([flat.size], np.int64), f"{p}numel"),
        numpy_helper.from_array(np.array(0, np.int64), f"{p}axis"),
        numpy_helper.from_array(np.array(arr.shape, np.int64), f"{p}shape"),
    ]
    n = helper.make_node
    nodes = [
        n("Reshape", [f"{p}bits", f"{p}col"], [f"{p}b_col"]),
        n("BitShift", [f"{p}b_col", f"{p}shifts"], [f"{p}b_shift"], direction="RIGHT"),
        n("Mod", [f"{p}b_shift", f"{p}two"], [f"{p}b_bit"]),
        n("Reshape", [f"{p}b_bit", f"{p}flat"], [f"{p}b_flat"]),
        n("Slice", [f"{p}b_flat", f"{p}start", f"{p}numel"], [f"{p}b_mask"]),
        n("Cast", [f"{p}b_mask"], [f"{p}m64"], to=TensorProto.INT64),
        n("CumSum", [f"{p}m64", f"{p}axis"], [f"{p}cs"]),
        n("Mul", [f"{p}cs", f"{p}m64"], [f"{p}pos"]),  # k-th kept entry -> k (1-based); pruned -> 0
        n("Gather", [f"{p}vals", f"{p}pos"], [f"{p}dense_flat"]),
        n("Reshape", [f"{p}dense_flat", f"{p}shape"], [name]),
    ]
    for nd in nodes:
        nd.name = f"{p}{nd.op_type}_{nd.output[0].rsplit('_', 1)[-1]}"
    return inits, nodes


def compact_model(model, *, min_sparsity: float = 0.5, method: str = "auto", min_elements: int = 256):
    """Return (new ModelProto, per-tensor report). ``model`` is not modified."""
    import onnx
    from onnx import helper, numpy_helper

    if method not in ("auto", "bitmask", "sparse_initializer"):
        raise InputError(f"unknown compact method {method!r}", fix="use auto, bitmask or sparse_initializer")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    opset = _opset(m)
    graph_inputs = {i.name for i in g.input}
    used_names = {i.name for i in g.initializer} | {o for nd in g.node for o in nd.output} | graph_inputs
    keep, new_nodes, new_inits, sparse, rows = [], [], [], [], []
    for k, init in enumerate(g.initializer):
        dt = FLOAT_TYPES.get(init.data_type)
        numel = int(np.prod(init.dims)) if len(init.dims) else 1
        if dt is None or numel < min_elements or init.name in graph_inputs or init.data_location == 1:
            keep.append(init)
            continue
        arr = numpy_helper.to_array(init)
        nnz = int(np.count_nonzero(arr))
        s = 1.0 - nnz / numel
        if s < min_sparsity:
            keep.append(init)
            continue
        sizes = encoded_sizes(nnz, numel, arr.dtype.itemsize)
        options = ["bitmask", "sparse_initializer"] if method == "auto" else [method]
        if opset < 11:
            options = [o for o in options if o != "bitmask"]
        options = [o for o in options if sizes[o] < sizes["dense"]]
        if not options:
            keep.append(init)
            rows.append({"name": init.name, "shape": list(init.dims), "sparsity": s, "encoding": "dense",
                         "dense_bytes": sizes["dense"], "bytes": sizes["dense"]})
            continue
        enc = min(options, key=lambda o: sizes[o])
        if enc == "sparse_initializer":
            flat = arr.ravel()
            idx = np.flatnonzero(flat).astype(np.int64)
            sparse.append(helper.make_sparse_tensor(numpy_helper.from_array(flat[idx], init.name),
                                                    numpy_helper.from_array(idx, f"{init.name}__sp_idx"), list(arr.shape)))
        else:
            prefix = f"__sp{k}_"
            while any(n.startswith(prefix) for n in used_names):
                prefix = "_" + prefix
            inits, nodes = _bitmask_nodes(init.name, arr, prefix)
            new_inits += inits
            new_nodes += nodes
        rows.append({"name": init.name, "shape": list(init.dims), "sparsity": s, "encoding": enc,
                     "dense_bytes": sizes["dense"], "bytes": sizes[enc]})
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    g.sparse_initializer.extend(sparse)
    if new_nodes:
        old = list(g.node)
        del g.node[:]
        g.node.extend(new_nodes + old)
    return m, rows


def random_feeds(model, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs from the graph's input types (symbolic dims: batch for the first, seq otherwise)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if j == 0 else seq)
                for j, d in enumerate(tt.shape.dim)]
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dt, np.floating):
            feeds[vi.name] = rng.standard_normal(dims).astype(dt)
        elif dt == np.bool_:
            feeds[vi.name] = np.ones(dims, dt)
        else:  # ids / masks: small non-negative ints are valid for any vocabulary
            feeds[vi.name] = rng.integers(0, 2, dims).astype(dt)
    return feeds


def _session(model):
    from compressor.onnx_utils import inference_session

    return inference_session(model)  # bytes, path or ModelProto of any size


def compact_onnx(src: str | Path, dst: str | Path, *, min_sparsity: float = 0.5, method: str = "auto",
                 feeds: dict[str, np.ndarray] | None = None, atol: float = 1e-5, rtol: float = 1e-5) -> dict:
    """Write ``dst``: ``src`` with its pruned initializers stored compactly; verified in onnxruntime first.

    Raises VerificationError (nothing written) when the compact model's outputs differ from the dense one's.
    The report gives both file sizes, the saving, the zlib-compressed size of the dense file for reference
    (what generic compression already gets) and the encoding chosen per tensor.
    """
    import onnx

    from compressor.onnx_files import is_large, staged
    from compressor.onnx_utils import onnx_file_bytes, runtime_bytes, write_runtime

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise InputError(f"ONNX file not found: {src}")
    model = onnx.load(str(src))  # with its external data, if any
    compact, rows = compact_model(model, min_sparsity=min_sparsity, method=method)
    feeds = feeds if feeds is not None else random_feeds(model)
    ref = _session(src).run(None, feeds)
    del model
    out = _session(compact).run(None, feeds)
    worst = max((float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()) if np.size(a) else 0.0)
                for a, b in zip(out, ref, strict=True))
    if not all(np.allclose(a, b, atol=atol, rtol=rtol) for a, b in zip(out, ref, strict=True)):
        raise VerificationError(f"compact ONNX outputs differ from the dense model (max |diff| {worst:.3g})",
                                fix="report this model; use method='sparse_initializer' or keep the dense file")
    with staged(dst) as tmp:  # one file, or .onnx + .onnx.data past the external-data threshold
        write_runtime(compact, tmp)
    dense, small = onnx_file_bytes(src), onnx_file_bytes(dst)
    # zlib sizes for reference, only for models that are one file in memory anyway
    one_file = dense == src.stat().st_size and not is_large(compact)
    dense_zlib = len(zlib.compress(src.read_bytes(), 6)) if one_file else None
    compact_zlib = len(zlib.compress(runtime_bytes(compact), 6)) if one_file else None
    return {
        "src": str(src), "dst": str(dst), "dense_bytes": dense, "compact_bytes": small,
        "saving": 1.0 - small / dense, "ratio": dense / small,
        "dense_zlib_bytes": dense_zlib, "compact_zlib_bytes": compact_zlib,
        "max_abs_diff": worst, "tensors": rows,
        "note": "file size only: onnxruntime densifies these weights when the session loads",
    }
