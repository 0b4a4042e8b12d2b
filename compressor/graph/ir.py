"""A read-only view of an ONNX graph for the analyser: tensors with shapes, constants, initializer aliases.

Loading never modifies the caller's model (we work on a copy). Shapes come from ONNX shape inference
(strict mode off, data propagation on, so Shape→Gather→Concat→Reshape chains get static sizes where the
inputs are static); a dynamic dimension is `None` and keeps its dim_param name in `dim_names` so two
dynamic dims can be recognised as the same one (batch, sequence).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from compressor.errors import InputError

Shape = list  # list[int | None]; None = dynamic


def load_model(model_or_path, *, external_data: bool = True):
    """ModelProto from a path, bytes or ModelProto (copied, so the caller's object is never touched).
    external_data=False: initializers whose data is in another file keep their reference (nothing read;
    see ExternalData) unless a node attribute holds such data."""
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(model_or_path)
        return m
    if isinstance(model_or_path, bytes):
        try:
            return onnx.load_from_string(model_or_path)
        except Exception as e:  # protobuf DecodeError and friends
            raise InputError(f"not a valid ONNX model: {str(e)[:120]}", "pass an .onnx file exported by torch.onnx or onnx") from e
    path = Path(model_or_path)
    if not path.exists():
        raise InputError(f"ONNX file not found: {path}", "check the path")
    try:
        m = _load_path(path, external_data)
    except Exception as e:
        raise InputError(f"{path} is not a valid ONNX model ({type(e).__name__}: {str(e)[:120]})",
                         "re-export the model; the file may be truncated or corrupt") from e
    if not m.graph.node:
        raise InputError(f"{path} has an empty graph", "re-export the model")
    return m


def _load_path(path: Path, external_data: bool = True):
    """onnx.load, reading the file once: the external-data pass (a Python walk over every tensor) runs only
    when some tensor actually says its data lives in another file (and external_data asks for it)."""
    import onnx

    m = onnx.ModelProto()
    if path.stat().st_size > (1 << 20):  # parse straight from the page cache: no 100 MB bytes copy first
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            m.ParseFromString(view)  # the message copies what it keeps (checked: nothing aliases the map)
    else:
        m.ParseFromString(path.read_bytes())
    if external_data and _has_external_data(m) or not external_data and _graph_attr_external(m.graph):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(m, str(path.parent))
    return m


def _has_external_data(m) -> bool:
    """Whether any tensor (initializer, or tensor attribute at any depth) keeps its data in another file."""
    if any(t.data_location == 1 for t in m.graph.initializer):
        return True
    return _graph_attr_external(m.graph)


def _graph_attr_external(g) -> bool:
    for n in g.node:
        for a in n.attribute:
            t = a.type  # TENSOR 4, GRAPH 5, TENSORS 9, GRAPHS 10
            if t == 4 and a.t.data_location == 1:
                return True
            if t == 9 and any(x.data_location == 1 for x in a.tensors):
                return True
            if t == 5 and (any(x.data_location == 1 for x in a.g.initializer) or _graph_attr_external(a.g)):
                return True
            if t == 10 and any(any(x.data_location == 1 for x in sg.initializer) or _graph_attr_external(sg)
                               for sg in a.graphs):
                return True
    return False


def _dims(type_proto) -> tuple[Shape, list] | None:
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    sizes, names = [], []
    for d in tt.shape.dim:
        v = d.dim_value  # 0 when unset (a dim_param or nothing): dynamic
        if v > 0:
            sizes.append(v)
            names.append(None)
        else:
            sizes.append(None)
            names.append(d.dim_param or None)
    return sizes, names


# ONNX TensorProto data types decoded without onnx.numpy_helper (little-endian raw_data, as every exporter
# writes it): the analyser decodes hundreds of tiny shape constants and numpy_helper's generic path dominates.
_RAW_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 10: np.float16,
               11: np.float64, 12: np.uint32, 13: np.uint64}


def tensor_to_array(t) -> np.ndarray:
    """numpy_helper.to_array, with a fast path for plain raw_data tensors (same values, same dtype)."""
    dt = _RAW_DTYPES.get(t.data_type)
    if dt is not None and t.raw_data and t.data_location != 1 and np.little_endian:
        return np.frombuffer(t.raw_data, dtype=dt).reshape(tuple(t.dims)).copy()
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
_VIEW_BYTES = 8 << 20  # weights below this go through inference as they are: copying the nodes costs more


def _infer(model):
    """ONNX shape inference on a weightless view of the model: large initializers (never shape arithmetic)
    are declared as typed graph inputs instead of being serialised through the call, so a 100 MB model costs
    what its graph costs. Inference needs only their type and dims."""
    import onnx

    from compressor.onnx_files import weightless_view

    # sizes from dims (ByteSize() would encode every tensor to count its bytes)
    big = [b for b in (math.prod(i.dims) * _ITEM_BYTES.get(i.data_type, 4) for i in model.graph.initializer) if b > 4096]
    if sum(big) > _VIEW_BYTES:
        model = weightless_view(model, min_bytes=4097)
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is a best effort: unknown shapes freeze what they touch
        return None


class LazyArrays(Mapping):
    """name -> ndarray of TensorProtos, decoded on first access: the analysis itself needs only the dims of
    the weights (and the values of small shape constants), so a large model is not copied into numpy.

    external: where tensors whose data lives outside the proto are read from (name -> ndarray), e.g. a
    checkpoint's safetensors shards for a weightless graph (compressor.skeleton). Those are read on every
    access and never kept, so scoring a model holds one tensor at a time."""

    def __init__(self, tensors: dict[str, object], external=None):
        self._tensors = tensors
        self._arrays: dict[str, np.ndarray] = {}
        self.external = external  # public: a weightless analysis's CheckpointReader (checkpoint keys, shards)

    def __getitem__(self, name: str) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None:
            t = self._tensors[name]
            if self.external is not None and t.data_location == 1:
                return self.external(name)
            arr = self._arrays[name] = tensor_to_array(t)
        return arr

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class ExternalData:
    """name -> ndarray of an initializer whose data is in a file beside the model, read on each call: an
    analysis of a multi-GB ONNX file reads a weight only when a score needs it (GraphIR's `external`)."""

    def __init__(self, model, folder: str | Path):
        self.folder = str(folder)
        self._tensors = {i.name: i for i in model.graph.initializer if i.data_location == 1}

    def __bool__(self) -> bool:
        return bool(self._tensors)

    def __call__(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self._tensors[name], self.folder)


class _Consts(Mapping):
    """Initializers (decoded lazily) followed by Constant node values, as one read-only mapping."""

    def __init__(self, initializers: LazyArrays, constants: dict[str, np.ndarray]):
        self._inits, self._constants = initializers, constants

    def __getitem__(self, name: str) -> np.ndarray:
        v = self._constants.get(name)
        return v if v is not None else self._inits[name]

    def __contains__(self, name) -> bool:
        return name in self._constants or name in self._inits

    def __iter__(self):
        yield from self._inits
        yield from self._constants

    def __len__(self) -> int:
        return len(self._inits) + len(self._constants)


class GraphIR:
    """Nodes in topological order, tensor shapes and element types, constant values, initializer aliases."""

    def __init__(self, model, external=None):
        g = model.graph
        # Every pass below reads node fields; protobuf builds new strings on each read, so read them once.
        recs = [[n, n.op_type, list(n.input), list(n.output)] for n in g.node]
        unshare_small_ints(model, recs)
        self.model = model  # our copy, with shared shape literals duplicated (see unshare_small_ints)
        order = _toposort(recs, {i.name for i in g.initializer} | {i.name for i in g.input})
        if order is not recs:  # shape inference (and any file we write) needs the sorted order too
            _set_nodes(g, [r[0] for r in order], order)
            recs = order
        self.nodes = [r[0] for r in recs]
        inferred = _infer(model)
        init_protos = {i.name: i for i in g.initializer}
        self.initializers = LazyArrays(init_protos, external)  # name -> ndarray
        self.const_values: dict[str, np.ndarray] = {}  # Constant node outputs
        self.consts = _Consts(self.initializers, self.const_values)  # initializers + Constant node outputs
        self.init_dims: dict[str, tuple[int, ...]] = {n: tuple(i.dims) for n, i in init_protos.items()}
        self.init_types: dict[str, int] = {n: i.data_type for n, i in init_protos.items()}
        self.const_nodes: dict[str, object] = {}  # Constant output name -> node
        self.alias: dict[str, str] = {}  # Identity output -> initializer name
        self.shapes: dict[str, Shape] = {}
        self.dim_names: dict[str, list] = {}
        self.elem_type: dict[str, int] = {}
        shapes, dim_names, elem_type = self.shapes, self.dim_names, self.elem_type
        gi = inferred.graph if inferred is not None else g
        # the inferred graph may list large initializers as extra inputs (see _infer): read the original ones
        for vis in (gi.input[:len(g.input)], gi.value_info, gi.output):
            for vi in vis:
                t = vi.type
                elem_type[vi.name] = t.tensor_type.elem_type
                d = _dims(t)
                if d is not None:
                    shapes[vi.name], dim_names[vi.name] = d
        for name, dims in self.init_dims.items():
            shapes[name] = list(dims)
            dim_names[name] = [None] * len(dims)
        const_values, initializers, alias = self.const_values, self.initializers, self.alias
        self.producer = producer = {}
        self.consumers: dict[str, list] = {}
        consumers = self.consumers
        for n, op, ins, outs in recs:
            for o in outs:
                producer[o] = n
            for i in ins:
                if i:
                    c = consumers.get(i)
                    if c is None:
                        consumers[i] = [n]
                    else:
                        c.append(n)
            if op == "Constant":
                if n.attribute:
                    val = _constant_value(n)
                    if val is not None:
                        o = outs[0]
                        const_values[o] = val
                        self.const_nodes[o] = n
                        shapes[o] = list(val.shape)
                        dim_names[o] = [None] * val.ndim
            elif op == "Identity":
                src = ins[0]
                if src in initializers:
                    alias[outs[0]] = src
                elif src in alias:
                    alias[outs[0]] = alias[src]
        init_names = set(self.initializers)
        self.inputs = [i.name for i in g.input if i.name not in init_names]
        self.outputs = [o.name for o in g.output]

    def init_of(self, name: str) -> str | None:
        """The initializer a tensor is (directly or through Identity), else None."""
        if name in self.initializers:
            return name
        return self.alias.get(name)

    def shape(self, name: str) -> Shape | None:
        s = self.shapes.get(name)
        return None if s is None else list(s)

    def const_shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of a constant (initializer, Constant, Identity of an initializer) without decoding it."""
        v = self.const_values.get(name)
        if v is not None:
            return v.shape
        d = self.init_dims.get(name)
        if d is None:
            a = self.alias.get(name)
            d = self.init_dims.get(a) if a else None
        return d

    def const_kind(self, name: str) -> str | None:
        """numpy dtype kind ("f", "i", "u", "b"...) of a constant, without decoding it; None if not one."""
        v = self.const_values.get(name)
        if v is not None:
            return v.dtype.kind
        init = self.init_of(name)
        if init is None:
            return None
        dt = _RAW_DTYPES.get(self.init_types[init])
        if dt is not None:
            return np.dtype(dt).kind
        return "b" if self.init_types[init] == 9 else "f"  # bool; bfloat16 and the 8-bit floats

    def value(self, name: str) -> np.ndarray | None:
        """Constant value of an initializer / Constant / Identity-of-initializer, else None."""
        v = self.const_values.get(name)
        if v is not None:
            return v
        if name in self.initializers:
            return self.initializers[name]
        a = self.alias.get(name)
        return self.initializers[a] if a else None


def _constant_value(node) -> np.ndarray | None:
    a = node.attribute[0]
    if a.name == "value":
        return tensor_to_array(a.t)
    from onnx import helper

    if a.name in ("value_int", "value_float"):
        return np.array(helper.get_attribute_value(a), dtype=np.int64 if a.name == "value_int" else np.float32)
    if a.name in ("value_ints", "value_floats"):
        return np.array(list(helper.get_attribute_value(a)), dtype=np.int64 if a.name == "value_ints" else np.float32)
    return None


def _toposort(recs: list, available: set[str]) -> list:
    """Kahn's order of node records [node, op, inputs, outputs] (ONNX requires it already; exporters
    occasionally don't honour it). Returns `recs` itself when it is already in order."""
    have = set(available)
    have.add("")
    out, pending = [], recs
    while pending:
        rest = []
        for r in pending:
            for i in r[2]:
                if i not in have:
                    rest.append(r)
                    break
            else:
                out.append(r)
                have.update(r[3])
        if not rest and pending is recs:  # one pass, nothing deferred: the file was in order (the norm)
            return recs
        if len(rest) == len(pending):  # inputs never produced (subgraph captures, bad model): keep order
            out.extend(rest)
            break
        pending = rest
    return out


def _set_nodes(g, nodes: list, recs: list) -> None:
    """Replace g.node by `nodes` (in that order; the container copies them) and point the records at the
    messages now in the graph."""
    del g.node[:]
    g.node.extend(nodes)
    for r, n in zip(recs, g.node, strict=True):
        r[0] = n


def unshare_small_ints(model, recs: list, max_elems: int = 64) -> int:
    """Give every consumer its own copy of a small integer constant (Constant node or initializer).

    Exporters reuse one literal for unrelated sizes (LLaMA's head_dim 16 feeds the K and the V reshape);
    pruning K's head dim and V's head dim differently must rewrite them separately. `recs`: node records
    [node, op, inputs, outputs] in graph order (GraphIR's), kept in step. Returns the copies made.
    """
    from onnx import NodeProto, helper

    g = model.graph
    small: dict[str, object] = {}  # name -> TensorProto (read only for the ones that are shared)
    for n, op, _, outs in recs:
        if op == "Constant" and n.attribute and n.attribute[0].name == "value":
            t = n.attribute[0].t
            if t.data_type in (6, 7) and math.prod(t.dims) <= max_elems:
                small[outs[0]] = t
    for init in g.initializer:
        if init.data_type in (6, 7) and math.prod(init.dims) <= max_elems:
            small[init.name] = init
    if not small:
        return 0
    users: dict[str, list] = {}
    for r in recs:
        ins = r[2]
        for i in (ins if len(ins) < 2 else dict.fromkeys(ins)):
            if i in small:
                users.setdefault(i, []).append(r)
    out_names = {o.name for o in g.output}
    made = 0
    new_nodes, new_recs = [], []
    for name, rs in users.items():
        if len(rs) < 2 or name in out_names:
            continue
        tensor = small[name]
        for k, r in enumerate(rs[1:], 1):
            copy = f"{name}__u{k}"
            node = NodeProto()
            node.op_type, node.name = "Constant", f"{copy}__const"
            node.output.append(copy)
            attr = node.attribute.add()
            attr.name, attr.type = "value", helper.AttributeProto.TENSOR
            attr.t.CopyFrom(tensor)  # an initializer copies its data fields only: clear what names it
            attr.t.name = copy
            attr.t.ClearField("doc_string")
            new_nodes.append(node)
            new_recs.append([node, "Constant", [], [copy]])
            n, ins = r[0], r[2]
            for j in range(len(ins)):
                if ins[j] == name:
                    ins[j] = copy
                    n.input[j] = copy
            made += 1
    if new_nodes:  # constants first keeps the graph topologically sorted
        recs[:0] = new_recs
        _set_nodes(g, new_nodes + [r[0] for r in recs[len(new_recs):]], recs)
    return made
