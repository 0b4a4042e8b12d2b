"""Remove chosen atoms from an ONNX model: slice every initializer that holds them and rewrite the integers
that encode sizes (Reshape/Expand targets, Split sizes, Slice bounds, constant Gather indices, conv `group`),
then check the model and run it in onnxruntime. The input model is never modified.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressor.errors import CompressorError
from compressor.graph.analysis import Analysis
from compressor.graph.context import SHAPE_SLOTS
from compressor.graph.symbolic import Solver


class PruneError(CompressorError):
    """A selection that cannot be applied (frozen channels, an unsolvable shape constant)."""


class Plan:
    """Which positions of every tensor axis survive a selection."""

    def __init__(self, analysis: Analysis, removed: set[int]):
        self.a = analysis
        self.removed = removed
        self._keep: dict[int, np.ndarray] = {}
        self._count: dict[int, int] = {}
        self._alive: np.ndarray | None = None  # per id: none of its atoms removed
        self.replace: dict[str, np.ndarray] = {}  # constant tensors replaced whole (shrinking index lists)

    def keep(self, arr: np.ndarray | None) -> np.ndarray | None:
        if arr is None:
            return None
        k = self._keep.get(id(arr))
        if k is None:
            look = self.a.ctx.atom_lookup  # set by build(): the ids are final
            if self._alive is None:
                n = len(look.roots)
                removed = np.zeros(n, dtype=bool)
                removed[[a for a in self.removed if 0 <= a < n]] = True  # an atom is an id below n
                self._alive = look.survivors(removed)
            k = self._alive[arr]  # a cyclic composite reads as its own atom (frozen by the analysis)
            self._keep[id(arr)] = k
        return k

    def count(self, arr: np.ndarray) -> int:
        """How many positions of `arr` survive."""
        n = self._count.get(id(arr))
        if n is None:
            n = self._count[id(arr)] = int(np.count_nonzero(self.keep(arr)))
        return n

    def axes(self, tensor: str):
        ctx = self.a.ctx
        return ctx.axes.get(tensor) or ctx.axes.get(ctx.ir.init_of(tensor) or "")

    def new_dim(self, tensor: str, axis: int) -> int | None:
        axes = self.axes(tensor)
        if axes is None or axes[axis] is None:
            return self.a.ir.shape(tensor)[axis] if self.a.ir.shape(tensor) else None
        return self.count(axes[axis])


def _atoms(selection) -> set[int]:
    if hasattr(selection, "atoms"):
        selection = selection.atoms
    return {int(a) for a in selection}


def prune_onnx(model, analysis: Analysis, selection: Iterable[int], *, check: bool = True,
               feeds: dict | None = None, values: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A pruned copy of `model` (the ModelProto/path the analysis was built from) without the selected atoms.
    check: run onnx.checker and one onnxruntime pass (on `feeds`, default synthetic inputs).
    values: initializer values to use instead of the analysed ones (same names and shapes), e.g. the torch
    model's exact weights where the analysis ran on an export whose equal tensors were made distinct."""
    removed = _atoms(selection)
    frozen = {a: r for g in analysis.groups for a, r in g.frozen.items()}
    bad = [a for a in removed if a in frozen]
    if bad:
        raise PruneError(f"{len(bad)} selected channel(s) are frozen: {frozen[bad[0]][0]}", "select prunable groups only")
    for g in analysis.groups:
        if g.atoms and all(a in removed for a in g.atoms):
            raise PruneError(f"selection removes every channel of group {g.name}", "keep at least one per group")
    if model is not None:  # the analysis holds the graph to prune (with shared shape literals unshared)
        given = _graph_of(model)
        if [n.op_type for n in given.graph.node] != [n.op_type for n in analysis.ir.model.graph.node
                                                      if not n.name.endswith("__const")]:
            raise PruneError("the model is not the one the analysis was built from", "analyse this model first")
    plan = Plan(analysis, removed)
    m = _sliced_copy(analysis.ir.model, plan, values)
    edits = _rewrite_nodes(m, plan)
    _apply_edits(m, edits, analysis, plan.replace)
    del m.graph.value_info[:]
    if check:
        verify(m, feeds)
    return m


def _graph_of(model):
    """The model's graph for comparing op types: a file is read without its weights, a ModelProto is not
    copied (one more copy of a multi-GB model only to compare node lists)."""
    from compressor.graph.ir import load_model

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, str | Path) and Path(model).is_file():
        return onnx.load(str(model), load_external_data=False)
    return load_model(model)


def dry_run(analysis: Analysis, atoms: set[int], nodes: list | None = None, strict: bool = False) -> str | None:
    """Why removing `atoms` cannot be written into the graph (an unsolvable size constant), or None.
    nodes: the graph's nodes with an op in _REWRITTEN (in graph order), to spare many dry runs reading all.
    An internal error (a bug, not a refusal) is a reason too, unless strict (the tests' mode): it raises."""
    try:
        _rewrite_nodes(analysis.ir.model, Plan(analysis, set(atoms)), apply=False, nodes=nodes)
    except PruneError as e:
        return e.message
    except Exception as e:
        if strict:
            raise
        return f"internal error ({type(e).__name__}: {e})"
    return None


def literal_rewrites(analysis: Analysis, atoms: set[int]) -> list[str]:
    """The nodes whose literal size constants (reshape targets, split sizes, slice bounds, gather indices) a
    cut of `atoms` rewrites, in graph order: in the torch module they are Python values of its forward."""
    solver = _rewrite_nodes(analysis.ir.model, Plan(analysis, set(atoms)), apply=False)
    return list(dict.fromkeys(solver.rewritten))


def validate_groups(analysis: Analysis, strict: bool = False) -> int:
    """Freeze every prunable group whose smallest cut (one atom) cannot be rewritten; returns how many.

    One dry run with one atom of every group; only when it fails are groups tried one by one."""
    probes = {g.id: next(a for a in reversed(g.atoms) if a not in g.frozen)
              for g in analysis.groups if g.prunable and g.size > 1}
    if not probes:
        return 0
    nodes = [n for n in analysis.ir.model.graph.node if n.op_type in _REWRITTEN]
    if dry_run(analysis, set(probes.values()), nodes, strict) is None:
        return 0
    bad = 0
    for g in analysis.groups:
        if g.id not in probes:
            continue
        why = dry_run(analysis, {probes[g.id]}, nodes, strict)
        if why is not None:
            for a in g.atoms:
                g.frozen.setdefault(a, [f"dry run: {why}"])
            bad += 1
    return bad


# ------------------------------------------------------------------------------------------ tensors
def _slice(arr: np.ndarray, axes, plan: Plan) -> np.ndarray | None:
    out, changed = arr, False
    for k, a in enumerate(axes):
        keep = plan.keep(a)
        if keep is not None and not keep.all():
            out = np.compress(keep, out, axis=k)
            changed = True
    return out if changed else None


def _sliced_copy(src, plan: Plan, values: dict[str, np.ndarray] | None):
    """A copy of `src` with every initializer and Constant that holds removed atoms sliced. Initializers are
    built one at a time into the new model (a copy of the whole model, then slices on top, would hold the
    weights twice over: protobuf frees a replaced field only with its message)."""
    from compressor.onnx_files import copy_fields

    m = onnx.ModelProto()
    copy_fields(src, m, skip="graph")
    copy_fields(src.graph, m.graph, skip="initializer")
    ctx = plan.a.ctx
    for init in src.graph.initializer:
        v = None if values is None else values.get(init.name)
        if v is not None and tuple(v.shape) != tuple(init.dims):
            v = None
        if v is None and init.data_location == 1:  # analysed without reading it (external data, a checkpoint)
            v = plan.a.ir.initializers[init.name]
        axes = ctx.axes.get(init.name)
        new = None
        if axes is not None:
            new = _slice(numpy_helper.to_array(init) if v is None else v, axes, plan)
        if new is None and v is not None:
            new = v
        if new is None:
            m.graph.initializer.add().CopyFrom(init)
        else:
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
            m.graph.initializer.append(numpy_helper.from_array(np.asarray(new, dtype=dtype), init.name))
        del new
    for node in m.graph.node:
        if node.op_type == "Constant" and node.output[0] in ctx.axes and node.output[0] in plan.a.ir.consts:
            new = _slice(plan.a.ir.consts[node.output[0]], ctx.axes[node.output[0]], plan)
            if new is not None:
                _set_const(node, new)
    return m


def _set_const(node, arr: np.ndarray) -> None:
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr)))


# ------------------------------------------------------------------------------------------ integers
_REWRITTEN = frozenset({"Reshape", "Expand", "ConstantOfShape", "Slice", "Split", "Gather", "Conv", "ConvTranspose",
                        "GroupNormalization"})  # the ops _rewrite_nodes looks at


def _rewrite_nodes(m, plan: Plan, apply: bool = True, nodes: list | None = None) -> Solver:
    """Solve every size constant for the plan; with apply, also set attributes (conv group, split sizes) on
    m's nodes (without, m may be the analysis' own graph: a dry run). nodes: m's nodes with an op in
    _REWRITTEN, in graph order, where the caller has them already (all of m's are read otherwise)."""
    a = plan.a
    ctx = a.ctx
    solver = Solver(plan.new_dim)
    solver.rewritten = []  # where a literal (size constant, split sizes) changes: Python values in torch code
    wants: list[tuple[object, int, str]] = []  # (sym, value, where) to re-check at the end

    def set_attr(node, name: str, value) -> None:
        if name in ("split", "num_groups") and ctx.attr(node, name) != value:  # (torch's GroupNorm keeps its own)
            solver.rewritten.append(f"{node.op_type} '{node.name}'")
        if apply:
            _set_attr(node, name, value)

    def want(sym, value: int, where: str) -> None:
        before = dict(solver.edits)
        if not solver.solve(sym, value):
            raise PruneError(f"cannot rewrite the size constant of {where} to {value}",
                             "freeze this group (it feeds a shape computation we cannot rewrite)")
        if solver.edits != before:
            solver.rewritten.append(where)
        wants.append((sym, value, where))

    for node in m.graph.node if nodes is None else nodes:
        op = node.op_type
        if op not in _REWRITTEN or (node.output and node.output[0] in ctx.syms):  # shape arithmetic itself
            continue  # follows its inputs
        where = f"{op} '{node.name}'"
        if op in ("Reshape", "Expand", "ConstantOfShape"):
            s = ctx.sym(node.input[1] if op != "ConstantOfShape" else node.input[0])
            out = plan.axes(node.output[0])
            if s is None or out is None:
                continue
            off = len(out) - len(s.elems)
            for k, e in enumerate(s.elems):
                arr = out[k + off] if k + off >= 0 else None
                if arr is None or e.value in (None, -1, 0) or (op == "Expand" and e.value == 1):
                    continue
                new = plan.count(arr)
                if not new:  # a literal 0 means "copy the input's size" to Reshape: never write one
                    raise PruneError(f"{where}: the cut empties output axis {k + off}", "freeze this group")
                if new != len(arr) or solver.eval(e) != e.value:
                    want(e, new, where)
        elif op == "Slice":
            _rewrite_slice(node, plan, solver, want, where)
        elif op == "Split":
            _rewrite_split(node, plan, solver, want, where, set_attr)
        elif op == "Gather":
            replaced = len(plan.replace)
            _rewrite_gather(node, plan, want, where)
            if len(plan.replace) > replaced:  # an index list that shrinks
                solver.rewritten.append(where)
        elif op in ("Conv", "ConvTranspose"):
            x, w = plan.axes(node.input[0]), plan.axes(node.input[1])
            g = ctx.attr(node, "group", 1)
            if g > 1 and x is not None and x[1] is not None and len(x[1]) == g:  # depthwise: groups shrink
                depthwise = len(w[1]) == 1 if op == "Conv" else len(w[1]) == 1
                if depthwise:
                    set_attr(node, "group", plan.count(x[1]))
        elif op == "GroupNormalization" and node.name in ctx.info:
            set_attr(node, "num_groups", plan.count(ctx.info[node.name]["groups"]))
    for sym, value, where in wants:  # one literal may serve several consumers: all must still agree
        if solver.eval(sym) != value and not (where.endswith(" end") and value >= 0 and solver.eval(sym) >= value):
            raise PruneError(f"conflicting rewrites of a size constant used by {where}", "freeze this group")
    return solver


def _rewrite_slice(node, plan: Plan, solver: Solver, want, where: str) -> None:
    ctx = plan.a.ctx
    x = plan.axes(node.input[0])
    if x is None or len(node.input) < 3:
        return
    starts, ends = ctx.sym(node.input[1]), ctx.sym(node.input[2])
    axes_v = ctx.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if starts is None or ends is None:
        return
    axes = list(range(len(starts.elems))) if axes_v is None else [int(v) % len(x) for v in axes_v.reshape(-1)]
    for s, e, k in zip(starts.elems, ends.elems, axes, strict=True):
        arr = x[k]
        if arr is None or s.value is None or e.value is None:
            continue
        keep = plan.keep(arr)
        n, new_n = len(arr), int(keep.sum())
        lo, hi, _ = slice(int(s.value), int(e.value), 1).indices(n)
        new_lo, new_hi = int(keep[:lo].sum()), int(keep[:hi].sum())

        def clamp(v, new_n=new_n):
            return None if v is None else max(0, min(new_n, v + new_n if v < 0 else v))

        if clamp(solver.eval(s)) != new_lo:
            want(s, new_lo - new_n if s.value < 0 else new_lo, where + " start")
        if clamp(solver.eval(e)) != new_hi:
            want(e, new_hi - new_n if e.value < 0 else new_hi, where + " end")


def _rewrite_split(node, plan: Plan, solver: Solver, want, where: str, set_attr) -> None:
    ctx = plan.a.ctx
    x = plan.axes(node.input[0])
    if x is None:
        return
    axis = ctx.attr(node, "axis", 0) % len(x)
    if x[axis] is None:
        return
    new = [plan.count(plan.axes(o)[axis]) for o in node.output]
    if ctx.attr(node, "split") is not None:
        set_attr(node, "split", new)
    elif len(node.input) > 1 and node.input[1]:
        s = ctx.sym(node.input[1])
        if s is None:
            raise PruneError(f"{where}: split sizes are not constant", "freeze this group")
        for e, v in zip(s.elems, new, strict=True):
            want(e, v, where)
    elif len(set(new)) > 1:
        raise PruneError(f"{where}: an equal split would become unequal", "prune the same number in every part")


def _rewrite_gather(node, plan: Plan, want, where: str) -> None:
    ctx = plan.a.ctx
    x = plan.axes(node.input[0])
    idx = ctx.value(node.input[1])
    if x is None or idx is None:
        return
    axis = ctx.attr(node, "axis", 0) % len(x)
    if x[axis] is None:
        return
    keep = plan.keep(x[axis])
    if keep.all():
        return
    flat = idx.reshape(-1).astype(np.int64)
    n, new_n = len(keep), int(keep.sum())
    newpos = np.cumsum(keep) - 1
    s = ctx.sym(node.input[1])
    if s is None:
        raise PruneError(f"{where}: gather indices are not rewritable", "freeze this group")
    out_axes = plan.axes(node.output[0])
    out_keep = plan.keep(out_axes[axis]) if idx.ndim == 1 and out_axes else None
    new_idx = [int(newpos[v % n]) - (new_n if v < 0 else 0) for v in flat.tolist()]
    if out_keep is not None and not out_keep.all():  # gathered positions removed too: the index list shrinks
        leaves = {e.expr[1] for e in s.elems if e.expr[0] == "c"}
        tensor = next(iter(leaves)) if len(leaves) == 1 and all(e.expr[0] == "c" for e in s.elems) else None
        users = plan.a.ir.consumers.get(tensor, []) if tensor else []
        if tensor is None or len(users) != 1:
            raise PruneError(f"{where}: shared or computed gather indices cannot shrink", "freeze this group")
        plan.replace[tensor] = np.array([v for v, k in zip(new_idx, out_keep, strict=True) if k], dtype=idx.dtype)
        return
    for e, target in zip(s.elems, new_idx, strict=True):
        want(e, target, where)


def _set_attr(node, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _apply_edits(m, solver: Solver, analysis: Analysis, replace: dict[str, np.ndarray]) -> None:
    inits = {i.name: k for k, i in enumerate(m.graph.initializer)}
    consts = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
    for t, arr in replace.items():
        if t in inits:
            m.graph.initializer[inits[t]].CopyFrom(numpy_helper.from_array(arr, t))
        else:
            _set_const(consts[t], arr)
    if not solver.edits:
        return
    by_tensor: dict[str, dict[int, int]] = {}
    for (t, i), v in solver.edits.items():
        by_tensor.setdefault(t, {})[i] = v
    ir, ctx = analysis.ir, analysis.ctx
    for t in by_tensor:  # an edited literal must feed shape arithmetic only, never data
        users = list(ir.consumers.get(t, []))
        users += [c for n, src in ir.alias.items() if src == t for c in ir.consumers.get(n, [])]
        for c in users:
            slots = SHAPE_SLOTS.get(c.op_type, set())
            ok = (c.output and c.output[0] in ctx.syms) or any(k in slots for k, i in enumerate(c.input) if i == t)
            if not ok and c.op_type not in ("Identity",):
                raise PruneError(f"size constant '{t}' is also used as data by {c.op_type} '{c.name}'",
                                 "freeze this group")
    for t, changes in by_tensor.items():
        if t in inits:
            arr = numpy_helper.to_array(m.graph.initializer[inits[t]]).copy()
        else:
            arr = ir.consts[t].copy()
        flat = arr.reshape(-1)
        for i, v in changes.items():
            flat[i] = v
        arr = flat.reshape(arr.shape)
        if t in inits:
            m.graph.initializer[inits[t]].CopyFrom(numpy_helper.from_array(arr, t))
        else:
            _set_const(consts[t], arr)


# ------------------------------------------------------------------------------------------ checks
def verify(m, feeds: dict | None = None) -> list[np.ndarray]:
    """onnx.checker, then one onnxruntime run on example feeds; PruneError (with the cause) if either fails."""
    from compressor.onnx_files import check_model, is_large
    from compressor.onnx_utils import example_feeds, run, run_onnx, runtime_file

    if feeds is None:  # integer inputs (token ids, masks) as 0/1: valid for any vocabulary
        feeds = {k: (np.ones_like(v) if "mask" in k else np.zeros_like(v)) if np.issubdtype(v.dtype, np.integer) else v
                 for k, v in example_feeds(m).items()}
    try:
        if not is_large(m):
            onnx.checker.check_model(m)
            return run(m, feeds)
        with runtime_file(m) as path:  # past the external-data threshold: checked and run from one written copy
            check_model(path)
            return run_onnx(path, feeds)
    except PruneError:
        raise
    except Exception as e:
        raise PruneError(f"pruned model does not validate or run: {str(e).splitlines()[0][:240]}",
                         "report this as a bug; freeze the group involved meanwhile") from e
