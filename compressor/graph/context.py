"""The analyser's working state while it walks the graph: axis ids per tensor, shape arithmetic, freezes.

Rules (compressor.graph.rules) read inputs and write outputs through this object; nothing here knows about
particular op types except which inputs of an op are *shape* inputs (read as integers, not as data).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from onnx import AttributeProto, helper, numpy_helper

from compressor.graph import symbolic
from compressor.graph.ids import ChannelIds
from compressor.graph.ir import GraphIR

_INT, _INTS, _FLOAT, _TENSOR = AttributeProto.INT, AttributeProto.INTS, AttributeProto.FLOAT, AttributeProto.TENSOR

Axes = list  # list[np.ndarray | None]; None = dynamic axis (never pruned)

# Inputs read as integer shapes/indices/axes, not as data: a Shape-derived value there is fine.
SHAPE_SLOTS: dict[str, set[int]] = {
    "Reshape": {1}, "Expand": {1}, "ConstantOfShape": {0}, "Slice": {1, 2, 3, 4}, "Split": {1}, "Squeeze": {1},
    "Unsqueeze": {1}, "Tile": {1}, "Resize": {1, 2, 3}, "Upsample": {1}, "Pad": {1, 2, 3}, "TopK": {1},
    "Gather": {1}, "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1}, "ReduceMin": {1}, "ReduceProd": {1},
    "ReduceL1": {1}, "ReduceL2": {1}, "ReduceSumSquare": {1}, "ReduceLogSumExp": {1}, "Clip": {1, 2},
    "Dropout": {1, 2}, "OneHot": {1},
}


@dataclasses.dataclass
class Role:
    """How an initializer is used by a parameterised op (drives importance and the torch bridge)."""

    init: str
    kind: str  # conv | convT | linear | embedding | bn | ln | norm | bias | free
    node: str
    out_axis: int | None = None
    in_axis: int | None = None
    groups: int = 1


class Ctx:
    def __init__(self, ir: GraphIR):
        self.ir = ir
        self.ids = ChannelIds()
        self.axes: dict[str, Axes | None] = {}
        self.syms: dict[str, symbolic.SymTensor] = {}
        self._not_sym: set[str] = set()  # tensors with no constant that is shape arithmetic
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.approx: list[tuple[np.ndarray, str]] = []
        self.roles: list[Role] = []
        self.size_refs: list[tuple[np.ndarray, list[np.ndarray], str]] = []  # see refs_sizes()
        self.info: dict[str, dict] = {}  # node name -> facts a prune-time rewrite needs (e.g. GroupNorm groups)
        self.atom_lookup = None  # ids.AtomLookup, set by build() once the ids are final
        self.factorised: list[tuple[object, np.ndarray]] = []  # (reshape node, ids it made composite)
        self.cyclic_why: str | None = None  # the reason given to ids in a cyclic factorisation (analysis)

    # ---- reading ------------------------------------------------------------------------------------------
    @staticmethod
    def attr(node, name: str, default=None):
        """An attribute's value (ints / floats as Python lists, a string decoded, a tensor as an array)."""
        for a in node.attribute:
            if a.name == name:
                t = a.type
                if not a.ref_attr_name:  # the common types without onnx.helper's dispatch (same values)
                    if t == _INT:
                        return a.i
                    if t == _INTS:
                        return list(a.ints)
                    if t == _FLOAT:
                        return a.f
                    if t == _TENSOR:
                        return numpy_helper.to_array(a.t)
                v = helper.get_attribute_value(a)  # other types; raises for a reference attribute
                return v.decode() if isinstance(v, bytes) else v
        return default

    def ax(self, name: str) -> Axes | None:
        """Id arrays of every axis of tensor `name` (None if its rank is unknown)."""
        if not name:
            return None
        if name in self.axes:
            return self.axes[name]
        init = self.ir.init_of(name)
        key = init or name
        if key in self.axes:
            return self.axes[key]
        shape = self.ir.const_shape(name)  # from dims: a weight is not decoded to be given ids
        if shape is None:
            return None
        axes = [self.ids.fresh(int(s)) for s in shape]  # each constant gets its own ids, once
        self.axes[key] = axes
        return axes

    def size(self, name: str) -> list | None:
        a = self.ax(name)
        if a is not None:
            return [None if x is None else len(x) for x in a]
        return self.ir.shape(name)

    def sym(self, name: str) -> symbolic.SymTensor | None:
        s = self.syms.get(name)
        if s is not None or name in self._not_sym:
            return s
        shape = self.ir.const_shape(name) if name else None
        small = shape is not None and len(shape) <= 2 and math.prod(shape) <= symbolic.MAX_ELEMS
        # larger constants and float ones (a norm's scale) are data: never decoded here, so a weightless graph
        # (compressor.skeleton) is analysed without its weights
        val = self.ir.value(name) if small and self.ir.const_kind(name) in ("i", "u") else None
        s = None if val is None else symbolic.from_const(self.ir.init_of(name) or name, val)
        if s is None:  # not a constant, or one that is data: remembered, as every use asks again
            self._not_sym.add(name)  # (syms is read first: a value computed later still wins)
        else:
            self.syms[name] = s
        return s

    def value(self, name: str) -> np.ndarray | None:
        """Static integer/float value of a constant or fully known shape expression."""
        if not name:
            return None
        v = self.ir.value(name)
        if v is not None:
            return v
        s = self.syms.get(name)
        return None if s is None else s.values()

    def init_through(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        """(initializer, permutation) when `name` is an initializer, possibly through Identity/Transpose."""
        init = self.ir.init_of(name)
        if init:
            return init, tuple(range(len(self.ir.init_dims[init])))
        prod = self.ir.producer.get(name)
        if prod is not None and prod.op_type == "Transpose":
            inner = self.init_through(prod.input[0])
            if inner is not None:
                perm = self.attr(prod, "perm") or list(reversed(range(len(inner[1]))))
                return inner[0], tuple(inner[1][p] for p in perm)
        return None

    # ---- writing ------------------------------------------------------------------------------------------
    def fresh_axes(self, shape: list | None) -> Axes | None:
        if shape is None:
            return None
        return [None if s is None else self.ids.fresh(int(s)) for s in shape]

    def set_fresh_frozen(self, name: str, node, text: str) -> None:
        """set(name, axes) with fresh ids sized by shape inference, all frozen (an output no rule can follow).
        The ids take the inferred sizes, so there is nothing for set()'s cross-check to catch."""
        shape = self.ir.shape(name)
        axes = None
        if shape is not None:
            fresh, why = self.ids.fresh, None
            axes = []
            for s in shape:
                if s is None:
                    axes.append(None)
                    continue
                a = fresh(int(s))
                axes.append(a)
                if s:
                    why = why or self.why(node, text)
                    self.frozen.append((a, why))
        if name:
            self.axes[name] = axes

    def set(self, name: str, axes: Axes | None, node=None) -> None:
        """Record an output's axes; a disagreement with shape inference freezes instead of guessing."""
        if not name:
            return
        inferred = self.ir.shape(name)
        if axes is not None and inferred is not None:
            ok = len(inferred) == len(axes) and all(
                a is None or s is None or len(a) == s for a, s in zip(axes, inferred, strict=False))
            if not ok:
                why = f"{node.op_type} '{node.name}': rule gave shape {[None if a is None else len(a) for a in axes]}, " \
                      f"shape inference says {inferred}" if node is not None else "shape disagreement"
                for a in axes:
                    if a is not None:
                        self.freeze(a, why)
                axes = self.fresh_axes(inferred)
                self.freeze_axes(axes, why)
            elif any(a is None for a in axes):  # a size only shape inference knows (e.g. a sequence length
                for k, (a, s) in enumerate(zip(axes, inferred, strict=True)):  # fixed at export): fresh, frozen
                    if a is None and s is not None:
                        axes[k] = self.ids.fresh(s)
                        self.freeze(axes[k], f"axis {k} of '{name}' has a size known only from shape inference")
        self.axes[name] = axes

    def unify(self, a: np.ndarray | None, b: np.ndarray | None, why: str = "", node=None) -> None:
        """Ids a[i] and b[i] must be pruned together; arrays of different sizes freeze instead, for `why`
        (stated as the node's, when given: the message is only formatted then)."""
        if a is None or b is None or a is b:
            return
        if len(a) != len(b):
            why = self.why(node, why) if node is not None else why or "size mismatch"
            self.freeze(a, why)
            self.freeze(b, why)
            return
        self.ids.union_arrays(a, b)

    def freeze(self, arr: np.ndarray | None, reason: str) -> None:
        if arr is not None and len(arr):
            self.frozen.append((arr, reason))

    def freeze_axes(self, axes: Axes | None, reason: str) -> None:
        for a in axes or []:
            self.freeze(a, reason)

    def mark_approx(self, arr: np.ndarray | None, reason: str) -> None:
        if arr is not None and len(arr) > 1:
            self.approx.append((arr, reason))

    def refs_sizes(self, node, sym_name: str, out_axes: list | None) -> None:
        """A shape input whose entry k reads the size of another static axis (Shape(t)[j]): that size follows
        t's pruning, so output axis k must contain t's axis j atoms (checked after the walk, else frozen)."""
        s = self.sym(sym_name)
        if s is None or out_axes is None:
            return
        off = len(out_axes) - len(s.elems)
        for k, e in enumerate(s.elems):
            refs = []
            for t, j in e.dims:
                a = self.ax(t)
                if a is not None and j < len(a) and a[j] is not None:
                    refs.append(a[j])
            out = out_axes[k + off] if 0 <= k + off < len(out_axes) else None
            if refs and out is not None:
                self.size_refs.append((out, refs, self.why(node, f"entry {k} of its shape input reads another "
                                                                  "tensor's size")))

    def role(self, name: str, kind: str, node, **kw) -> None:
        init = self.ir.init_of(name) if name else None
        if init:
            self.roles.append(Role(init, kind, node.name, **kw))

    @staticmethod
    def why(node, text: str) -> str:
        return f"{node.op_type} '{node.name or node.output[0]}': {text}"
