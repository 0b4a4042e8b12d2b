"""Walk the graph with the per-op rules, then turn channel ids into coupled classes (atoms) and groups.

Atom: a class of channel ids that must be removed together (a conv output channel with the BN entries,
the next conv's input column, a residual partner...). Group: the atoms of one prunable dimension (a conv's
output channels; the heads of an attention block; the within-head dims of Q and K), used to rank and
select. A group lists its members: every initializer axis it slices, with the positions.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from compressor.graph import rules as R
from compressor.graph import symbolic
from compressor.graph.context import SHAPE_SLOTS, Ctx
from compressor.graph.ir import GraphIR

ROOT_KINDS = ("conv", "convT", "linear", "embedding")


@dataclasses.dataclass
class Member:
    name: str  # initializer name (torch parameter name for models exported by compressor.export)
    axis: int
    indices: np.ndarray  # positions along `axis` removed when the whole group is removed

    def to_json(self) -> dict:
        return {"name": self.name, "axis": self.axis, "indices": self.indices.tolist()}


@dataclasses.dataclass
class Group:
    id: int
    name: str  # "<root initializer>:<axis>" (+ "/slot k" for a factor of a reshaped axis)
    atoms: list[int]  # atom ids, in channel order of the root axis
    members: list[Member]
    frozen: dict[int, list[str]]  # atom -> reasons, for the atoms that cannot be removed
    approximate: list[str]  # why zero-channel equivalence holds only approximately (LayerNorm, softmax...)
    protected: dict[str, list[int]]  # "embedding" / "output" -> atoms kept by default selection
    kind: str = "channels"  # channels | heads (outer factor of a reshaped axis) | head_dim (inner factor)

    @property
    def size(self) -> int:
        return len(self.atoms)

    @property
    def prunable(self) -> bool:
        return len(self.frozen) < len(self.atoms)

    @property
    def reasons(self) -> list[str]:
        seen: dict[str, None] = {}
        for rs in self.frozen.values():
            for r in rs:
                seen.setdefault(r, None)
        return list(seen)

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "kind": self.kind, "size": self.size, "prunable": self.prunable,
                "frozen_atoms": len(self.frozen), "reasons": self.reasons[:8], "approximate": self.approximate[:4],
                "protected": {k: len(v) for k, v in self.protected.items()},
                "members": [m.to_json() for m in self.members]}


@dataclasses.dataclass
class Analysis:
    groups: list[Group]
    ctx: Ctx
    ir: GraphIR
    atom_positions: dict[str, list[list[tuple[int, ...]]]]  # initializer -> per axis -> atoms per position

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, atom: int) -> Group | None:
        for g in self.groups:
            if atom in g.atoms:
                return g
        return None

    def to_json(self) -> dict:
        return {"groups": [g.to_json() for g in self.groups],
                "summary": {"groups": len(self.groups), "prunable": len(self.prunable_groups),
                            "channels": sum(g.size for g in self.groups),
                            "prunable_channels": sum(g.size - len(g.frozen) for g in self.groups)}}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


_STANDARD = ("", "ai.onnx")  # the ONNX operator set; ops of other domains get the default (freezing) rule


def run_rules(ir: GraphIR) -> Ctx:
    ctx = Ctx(ir)
    for name in ir.inputs:
        axes = ctx.fresh_axes(ir.shape(name))
        ctx.freeze_axes(axes, f"graph input '{name}'")
        ctx.set(name, axes)
    sym, syms, size, attr, rules = ctx.sym, ctx.syms, ctx.size, ctx.attr, R.RULES  # hoisted: ~500 nodes
    for node in ir.nodes:
        op = node.op_type
        standard = node.domain in _STANDARD
        inputs = node.input
        if op == "Constant" and standard and not inputs:  # ids and syms of a constant: made where it is used
            continue
        ins = [sym(i) for i in inputs]
        if op in symbolic.OPS:  # shape arithmetic: outputs are values, their ids stay frozen
            outs = symbolic.evaluate(node, ins, size, attr)
            if outs is not None:
                for o, s in zip(node.output, outs, strict=False):
                    syms[o] = s
                    ctx.set_fresh_frozen(o, node, "auxiliary output")
                continue
        if any(ins):  # some input is shape arithmetic
            slots = SHAPE_SLOTS.get(op, ())
            for k, (i, s) in enumerate(zip(inputs, ins, strict=True)):
                if s is not None and k not in slots:  # a dimension's value used as data: its size must not change
                    why = ctx.why(node, f"uses the size of this axis as a value (input '{i}')")
                    for t, axis in dict.fromkeys(d for e in s.elems for d in e.dims):
                        a = ctx.ax(t)
                        if a is not None and a[axis] is not None:
                            ctx.freeze(a[axis], why)
        fn = rules.get(op)
        if fn is None or not standard:
            R.default_rule(ctx, node)
        else:
            fn(ctx, node)
    for name in ir.outputs:
        ctx.freeze_axes(ctx.ax(name), f"graph output '{name}'")
    look = ctx.ids.atom_lookup() if ctx.size_refs else None  # the ids are final from here on
    ctx.atom_lookup = look  # still valid after the walk (freezing does not touch ids): build() may reuse it
    for out, refs, why in ctx.size_refs:  # sizes read through Shape must move with the axis they size
        if not len(out) or not _atoms_cover(look, out, refs):
            ctx.freeze(out, why)
            for r in refs:
                ctx.freeze(r, why)
    for a, b in ctx.ids.conflicts:
        ctx.freeze(np.array([a, b]), "incompatible factorisations of one axis (reshape)")
    return ctx


def _atoms_cover(look, out: np.ndarray, refs: list[np.ndarray]) -> bool:
    """Whether the atoms of `out` include those of every array in `refs`. Equal roots have equal atoms, so
    roots of refs within the roots of out settle it without expanding composites (the common case)."""
    roots = look.roots
    have = set(roots[out].tolist())
    if all(have.issuperset(roots[r].tolist()) for r in refs):
        return True
    have = {a for ats in look.many(out) for a in ats}
    return all({a for ats in look.many(r) for a in ats} <= have for r in refs)


def _atoms_of(ctx: Ctx, e: int) -> tuple[int, ...]:
    try:
        return ctx.ids.atoms(e)
    except RecursionError:
        return (ctx.ids.find(e),)


def build(ir: GraphIR) -> Analysis:
    ctx = run_rules(ir)
    look = ctx.ids.atom_lookup()  # the ids no longer change: read atoms through one roots array
    ctx.atom_lookup = look
    frozen: dict[int, list[str]] = {}
    for arr, reason in ctx.frozen:
        try:
            uniq = dict.fromkeys(a for ats in look.many(arr, safe=False) for a in ats)
        except RecursionError:
            uniq = None
        if uniq is None:  # a cyclic composite: element by element, as the reason changes part-way
            for e in arr.tolist():
                try:
                    ats = ctx.ids.atoms(e)
                except RecursionError:
                    ats = (ctx.ids.find(e),)
                    reason = "cyclic reshape factorisation"
                for a in ats:
                    rs = frozen.setdefault(a, [])
                    if reason not in rs and len(rs) < 4:
                        rs.append(reason)
            continue
        for a in uniq:  # one reason per array: repeats of an atom within it change nothing
            rs = frozen.get(a)
            if rs is None:
                frozen[a] = [reason]
            elif reason not in rs and len(rs) < 4:
                rs.append(reason)
    approx: dict[int, list[str]] = {}
    for arr, reason in ctx.approx:
        for a in dict.fromkeys(a for ats in look.many(arr) for a in ats):
            rs = approx.setdefault(a, [])
            if reason not in rs and len(rs) < 3:
                rs.append(reason)
    positions: dict[str, list[list[tuple[int, ...]]]] = {}
    for name in ir.initializers:
        axes = ctx.axes.get(name)
        if axes is None:
            continue
        positions[name] = [look.many(a) for a in axes]

    # ---- groups: atoms linked slot by slot on producer axes, then on the other parameter axes
    parent: dict[int, int] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def link_axis(pos: list[tuple[int, ...]], only_new: bool) -> None:
        if len(pos) <= 1:
            return
        arity = {len(p) for p in pos}
        slots = range(next(iter(arity))) if len(arity) == 1 else [None]
        for s in slots:  # repeats of an atom link nothing new: each distinct atom once, in order
            atoms = dict.fromkeys(a for p in pos for a in p) if s is None else dict.fromkeys([p[s] for p in pos])
            atoms = [a for a in atoms if a not in parent] if only_new else list(atoms)
            if not atoms:
                continue
            first = find(atoms[0])
            for a in atoms[1:]:
                ra = find(a)
                if ra != first:
                    parent[ra] = first

    roots = [r for r in ctx.roles if r.kind in ROOT_KINDS and r.out_axis is not None]
    root_ids = {id(r) for r in roots}
    others = [r for r in ctx.roles if id(r) not in root_ids]
    for r in roots:
        pos = positions.get(r.init, [])
        if r.out_axis < len(pos):
            link_axis(pos[r.out_axis], only_new=False)
    for r in others + [r for r in roots if r.in_axis is not None]:
        pos = positions.get(r.init, [])
        axes = [r.in_axis] if id(r) in root_ids else ([r.out_axis] if r.out_axis is not None else range(len(pos)))
        for ax in axes:
            if ax is not None and ax < len(pos):
                link_axis(pos[ax], only_new=True)
    by_root: dict[int, list[int]] = {}
    label: dict[int, str] = {}
    kinds: dict[int, str] = {}
    seen: set[int] = set()
    for r in roots + others:  # atoms in discovery order; the first sighting names and kinds the group
        pos = positions.get(r.init, [])
        axes = [r.out_axis, r.in_axis] if r.kind in ROOT_KINDS else range(len(pos))
        for ax in axes:
            if ax is None or ax >= len(pos) or len(pos[ax]) <= 1:
                continue
            arity = {len(p) for p in pos[ax]}
            for p in pos[ax]:
                for s, a in enumerate(p):
                    if a in seen or a not in parent:
                        continue
                    seen.add(a)
                    g = find(a)
                    by_root.setdefault(g, []).append(a)
                    if g not in label:
                        slot = (s, len(p)) if len(arity) == 1 and len(p) > 1 else None
                        label[g] = f"{r.init}:{ax}" + (f"/{slot[0]}" if slot is not None else "")
                        kinds[g] = "channels" if slot is None else ("head_dim" if slot[0] == slot[1] - 1 else "heads")

    protect_embed = {a for r in ctx.roles if r.kind == "embedding" and r.out_axis is not None
                     for p in positions.get(r.init, [[]] * 2)[r.out_axis] for a in p}
    protect_out: set[int] = set()
    for r in roots:
        pos = positions.get(r.init)
        if pos is None or r.in_axis is None or _feeds_output(ir, r.node) is False:
            continue
        protect_out |= {a for p in pos[r.in_axis] for a in p}

    atom_group: dict[int, int] = {}
    groups: list[Group] = []
    for gi, (g, atoms) in enumerate(by_root.items()):
        for a in atoms:
            atom_group[a] = gi
        apx = sorted({s for a in atoms for s in approx.get(a, [])})
        prot = {k: [a for a in atoms if a in s] for k, s in (("embedding", protect_embed), ("output", protect_out))}
        groups.append(Group(gi, label[g], atoms, [], {a: frozen[a] for a in atoms if a in frozen}, apx,
                            {k: v for k, v in prot.items() if v}, kinds[g]))
    gis_of: dict[tuple[int, ...], tuple[int, ...]] = {}  # atoms of a position -> its groups (set order kept)
    for name, axes in positions.items():
        for ax, pos in enumerate(axes):
            hits: dict[int, list[int]] = {}
            for i, p in enumerate(pos):
                gis = gis_of.get(p)
                if gis is None:
                    gis = gis_of[p] = tuple({atom_group[a] for a in p if a in atom_group})
                for gi in gis:
                    hits.setdefault(gi, []).append(i)
            for gi, idx in hits.items():
                groups[gi].members.append(Member(name, ax, np.array(idx, dtype=np.int64)))
    return Analysis(groups, ctx, ir, positions)



_PASS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Transpose", "Dropout"}


def _feeds_output(ir: GraphIR, node_name: str) -> bool:
    """Whether a layer's output is a graph output, up to bias adds and layout ops (the output layer)."""
    if not hasattr(ir, "_by_name"):
        ir._by_name = {n.name: n for n in ir.nodes}
    node = ir._by_name.get(node_name)
    if node is None:
        return False
    t = node.output[0]
    outputs = set(ir.outputs)
    for _ in range(16):
        if t in outputs:
            return True
        users = ir.consumers.get(t, [])
        if len(users) != 1:
            return False
        u = users[0]
        bias_add = u.op_type == "Add" and any(ir.init_of(i) for i in u.input if i != t)
        if u.op_type not in _PASS and not bias_add:
            return False
        t = u.output[0]
    return False
