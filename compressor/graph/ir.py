"""A read-only view of an ONNX graph for the analyser: tensors with shapes, constants, initializer aliases.

Loading never modifies the caller's model (we work on a copy). Shapes come from ONNX shape inference
(strict mode off, data propagation on, so Shape→Gather→Concat→Reshape chains get static sizes where the
inputs are static); a dynamic dimension is `None` and keeps its dim_param name in `dim_names` so two
dynamic dims can be recognised as the same one (batch, sequence).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from compressor.errors import InputError

Shape = list  # list[int | None]; None = dynamic


def load_model(model_or_path):
    """ModelProto from a path, bytes or ModelProto (copied, so the caller's object is never touched)."""
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
        m = _load_path(path)
    except Exception as e:
        raise InputError(f"{path} is not a valid ONNX model ({type(e).__name__}: {str(e)[:120]})",
                         "re-export the model; the file may be truncated or corrupt") from e
    if not m.graph.node:
        raise InputError(f"{path} has an empty graph", "re-export the model")
    return m


def _load_path(path: Path):
    """onnx.load without its Python walk over every tensor looking for external data when the file cannot
    have any: an external tensor names its file under the key "location", so bytes without that word
    parse directly (same ModelProto); otherwise onnx.load does the full job."""
    import onnx

    with open(path, "rb") as f:
        external = b"location" in f.read()
    return onnx.load_model(str(path), load_external_data=external)


def _dims(type_proto) -> tuple[Shape, list] | None:
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    sizes, names = [], []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            sizes.append(int(d.dim_value))
            names.append(None)
        else:
            sizes.append(None)
            names.append(d.dim_param or None)
    return sizes, names


class GraphIR:
    """Nodes in topological order, tensor shapes and element types, constant values, initializer aliases."""

    def __init__(self, model):
        import onnx
        from onnx import numpy_helper

        unshare_small_ints(model)
        self.model = model  # our copy, with shared shape literals duplicated (see unshare_small_ints)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:  # inference is a best effort: unknown shapes freeze what they touch
            inferred = model
        g = inferred.graph
        self.initializers: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.consts: dict[str, np.ndarray] = dict(self.initializers)  # + Constant node outputs
        self.const_nodes: dict[str, object] = {}  # Constant output name -> node
        self.alias: dict[str, str] = {}  # Identity output -> initializer name
        self.shapes: dict[str, Shape] = {}
        self.dim_names: dict[str, list] = {}
        self.elem_type: dict[str, int] = {}
        for vi in [*g.input, *g.value_info, *g.output]:
            d = _dims(vi.type)
            self.elem_type[vi.name] = vi.type.tensor_type.elem_type
            if d is not None:
                self.shapes[vi.name], self.dim_names[vi.name] = d
        for name, arr in self.initializers.items():
            self.shapes[name] = list(arr.shape)
            self.dim_names[name] = [None] * arr.ndim
        self.nodes = _toposort(list(model.graph.node), set(self.initializers) | {i.name for i in model.graph.input})
        for n in self.nodes:
            if n.op_type == "Constant" and n.attribute:
                val = _constant_value(n)
                if val is not None:
                    self.consts[n.output[0]] = val
                    self.const_nodes[n.output[0]] = n
                    self.shapes[n.output[0]] = list(val.shape)
                    self.dim_names[n.output[0]] = [None] * val.ndim
            elif n.op_type == "Identity" and n.input[0] in self.initializers:
                self.alias[n.output[0]] = n.input[0]
            elif n.op_type == "Identity" and n.input[0] in self.alias:
                self.alias[n.output[0]] = self.alias[n.input[0]]
        init_names = set(self.initializers)
        self.inputs = [i.name for i in model.graph.input if i.name not in init_names]
        self.outputs = [o.name for o in model.graph.output]
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)

    def init_of(self, name: str) -> str | None:
        """The initializer a tensor is (directly or through Identity), else None."""
        if name in self.initializers:
            return name
        return self.alias.get(name)

    def shape(self, name: str) -> Shape | None:
        s = self.shapes.get(name)
        return None if s is None else list(s)

    def value(self, name: str) -> np.ndarray | None:
        """Constant value of an initializer / Constant / Identity-of-initializer, else None."""
        if name in self.consts:
            return self.consts[name]
        a = self.alias.get(name)
        return self.consts.get(a) if a else None


def _constant_value(node) -> np.ndarray | None:
    from onnx import helper, numpy_helper

    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name in ("value_int", "value_float"):
        return np.array(helper.get_attribute_value(a), dtype=np.int64 if a.name == "value_int" else np.float32)
    if a.name in ("value_ints", "value_floats"):
        return np.array(list(helper.get_attribute_value(a)), dtype=np.int64 if a.name == "value_ints" else np.float32)
    return None


def _toposort(nodes: list, available: set[str]) -> list:
    """Kahn's order (ONNX requires it already; exporters occasionally don't honour it)."""
    have = set(available) | {""}
    out, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in have for i in n.input):
                out.append(n)
                have.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # inputs never produced (subgraph captures, bad model): keep order
            out.extend(rest)
            break
        pending = rest
    return out


def unshare_small_ints(model, max_elems: int = 64) -> int:
    """Give every consumer its own copy of a small integer constant (Constant node or initializer).

    Exporters reuse one literal for unrelated sizes (LLaMA's head_dim 16 feeds the K and the V reshape);
    pruning K's head dim and V's head dim differently must rewrite them separately. Returns the copies made.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    small: dict[str, object] = {}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            t = n.attribute[0].t
            if t.data_type in (6, 7) and math.prod(t.dims) <= max_elems:
                small[n.output[0]] = numpy_helper.to_array(t)
    for init in g.initializer:
        if init.data_type in (6, 7) and math.prod(init.dims) <= max_elems:
            small[init.name] = numpy_helper.to_array(init)
    users: dict[str, list] = {}
    for n in g.node:
        for i in set(n.input):
            if i in small:
                users.setdefault(i, []).append(n)
    out_names = {o.name for o in g.output}
    made = 0
    new_nodes = []
    for name, nodes in users.items():
        if len(nodes) < 2 or name in out_names:
            continue
        for k, n in enumerate(nodes[1:], 1):
            copy = f"{name}__u{k}"
            new_nodes.append(helper.make_node("Constant", [], [copy], name=f"{copy}__const",
                                              value=numpy_helper.from_array(small[name], copy)))
            for j, i in enumerate(n.input):
                if i == name:
                    n.input[j] = copy
            made += 1
    if new_nodes:  # constants first keeps the graph topologically sorted
        nodes = list(g.node)
        del g.node[:]
        g.node.extend(new_nodes + nodes)
    return made
