"""Walk the graph with the per-op rules, then turn channel ids into coupled classes (atoms) and groups.

Atom: a class of channel ids that must be removed together (a conv output channel with the BN entries,
the next conv's input column, a residual partner...). Group: the atoms of one prunable dimension (a conv's
output channels; the heads of an attention block; the within-head dims of Q and K), used to rank and
select. A group lists its members: every initializer axis it slices, with the positions.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import json

import numpy as np

from compressor.graph import rules as R
from compressor.graph import symbolic
from compressor.graph.context import SHAPE_SLOTS, Ctx
from compressor.graph.ids import AtomLookup, split_tuples
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


class InitAtoms:
    """The atoms of every position of every initializer axis, in one array.

    Axis k (keys[k] = (initializer, axis), initializers in graph order) holds the positions pos[k]:pos[k + 1]
    (numbered across all axes), whose atoms are flat[at[k]:at[k + 1]], position by position; arity[k] is the
    atom count of each of its positions when they share it (-1 when not: factorised and plain ids mixed).
    """

    def __init__(self, ir: GraphIR, ctx: Ctx, look: AtomLookup):
        self.keys: list[tuple[str, int]] = []
        self.index: dict[str, list[int]] = {}  # initializer -> k of each of its axes
        arrays = []
        for name in ir.initializers:
            axes = ctx.axes.get(name)
            if axes is not None:
                self.index[name] = list(range(len(self.keys), len(self.keys) + len(axes)))
                self.keys += [(name, ax) for ax in range(len(axes))]
                arrays += axes
        sizes = [len(a) for a in arrays]
        self.pos = [0, *itertools.accumulate(sizes)]
        self.flat, self.counts = look.expand(np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64))
        if look.plain:
            self.at, self.arity = self.pos, [1] * len(arrays)
            return
        self.at = np.concatenate([[0], np.cumsum(self.counts)])[self.pos].tolist()
        starts = [p for p, n in zip(self.pos, sizes, strict=False) if n]  # reduceat wants non-empty runs
        lo = iter(np.minimum.reduceat(self.counts, starts).tolist() if starts else [])
        hi = iter(np.maximum.reduceat(self.counts, starts).tolist() if starts else [])
        self.arity = []
        for n in sizes:
            a, b = (next(lo), next(hi)) if n else (0, 0)
            self.arity.append(a if a == b else -1)

    def size(self, k: int) -> int:
        return self.pos[k + 1] - self.pos[k]

    def atoms(self, k: int) -> np.ndarray:
        """Every atom of axis k, position by position (a view)."""
        return self.flat[self.at[k]:self.at[k + 1]]

    def slots(self, k: int) -> list[np.ndarray]:
        """Axis k's atoms slot by slot (one array per factor) when its positions share an arity, else all of
        them as one slot."""
        ar = self.arity[k]
        if ar < 0:
            return [self.atoms(k)]
        return [self.flat[self.at[k] + s:self.at[k + 1]:ar] for s in range(ar)]

    def positions(self) -> dict[str, list[list[tuple[int, ...]]]]:
        """initializer -> per axis -> the atoms of every position (Analysis.atom_positions)."""
        return {name: [split_tuples(self.atoms(k), self.counts[self.pos[k]:self.pos[k + 1]]) for k in ks]
                for name, ks in self.index.items()}


@dataclasses.dataclass
class Analysis:
    groups: list[Group]
    ctx: Ctx
    ir: GraphIR
    init_atoms: InitAtoms
    export: dict = dataclasses.field(default_factory=dict)  # torch input: which exporter made the graph (api.analyze)

    @functools.cached_property
    def atom_positions(self) -> dict[str, list[list[tuple[int, ...]]]]:
        """initializer -> per axis -> the atoms of every position (built on first use)."""
        return self.init_atoms.positions()

    def removed_positions(self, atoms) -> list[tuple[str, int, np.ndarray]]:
        """(initializer, axis, positions) a selection removes: every position that holds one of `atoms`.
        The one input the independent zero-channel oracle (graphs/zero_oracle.py) takes from the analysis;
        read from the atoms recorded at analysis time, not from the pruner's Plan."""
        ia = self.init_atoms
        hit = np.isin(ia.flat, np.fromiter((int(a) for a in atoms), dtype=np.int64))
        seen = np.concatenate([[0], np.cumsum(hit)])  # selected atoms before each flat entry
        bounds = np.concatenate([[0], np.cumsum(ia.counts)])  # each position's run in flat
        removed = seen[bounds[1:]] > seen[bounds[:-1]]
        out = []
        for k, (name, axis) in enumerate(ia.keys):
            pos = np.flatnonzero(removed[ia.pos[k]:ia.pos[k + 1]])
            if len(pos):
                out.append((name, axis, pos))
        return out

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
                            "prunable_channels": sum(g.size - len(g.frozen) for g in self.groups)}} | (
            {"export": self.export} if self.export else {})

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


_STANDARD = ("", "ai.onnx")  # the ONNX operator set; ops of other domains get the default (freezing) rule


def run_rules(ir: GraphIR, strict: bool = False) -> Ctx:
    """Walk the graph with the per-op rules. A rule that fails (an internal error, not a user's) freezes what
    its node touches with the error as the reason; strict: it raises instead (the tests' mode)."""
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
                    R.default_rule_out(ctx, node, o)
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
            try:
                fn(ctx, node)
            except Exception as e:
                if strict:
                    raise
                R.default_rule(ctx, node, f"internal error in its rule ({type(e).__name__}: {e})")
    for name in ir.outputs:
        ctx.freeze_axes(ctx.ax(name), f"graph output '{name}'")
    look = ctx.ids.atom_lookup()  # the ids are final from here on (build() reuses it)
    if look.deep_ids is not None:
        _freeze_cycles(ctx, look)
    for out, refs, why in ctx.size_refs:  # sizes read through Shape must move with the axis they size
        if not len(out) or not _atoms_cover(look, out, refs):
            ctx.freeze(out, why)
            for r in refs:
                ctx.freeze(r, why)
    for a, b in ctx.ids.conflicts:
        ctx.freeze(np.array([a, b]), "incompatible factorisations of one axis (reshape)")
    return ctx


def _freeze_cycles(ctx: Ctx, look: AtomLookup) -> None:
    """Composite ids that contain themselves: a reshape factorised an axis into pieces that include the axis'
    own ids, e.g. timm's interleaved rotary `stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)`
    multiplied with x (a permutation within pairs, which a product of factors cannot express). No position
    map through them is consistent, so every id reachable from them is frozen, naming the reshapes."""
    ids = ctx.ids.reachable(np.flatnonzero(look.deep))
    nodes = dict.fromkeys(f"{n.op_type} '{n.name or n.output[0]}'" for n, arr in ctx.factorised
                          if len(arr) and look.deep_ids[arr].any())
    ctx.cyclic_why = f"cyclic reshape factorisation ({', '.join(list(nodes)[:3]) or 'reshape'})"
    ctx.freeze(ids, ctx.cyclic_why)


def _atoms_cover(look, out: np.ndarray, refs: list[np.ndarray]) -> bool:
    """Whether the atoms of `out` include those of every array in `refs`. Equal roots have equal atoms, so
    roots of refs within the roots of out settle it without expanding composites (the common case)."""
    roots = look.roots
    have = set(roots[out].tolist())
    if all(have.issuperset(roots[r].tolist()) for r in refs):
        return True
    have = {a for ats in look.many(out) for a in ats}
    return all({a for ats in look.many(r) for a in ats} <= have for r in refs)


def _run_starts(x: np.ndarray) -> np.ndarray:
    """Where a run of equal values begins in x (sorted: the first of every distinct value)."""
    out = np.ones(len(x), dtype=bool)
    out[1:] = x[1:] != x[:-1]
    return out


def _components(edge: np.ndarray, node: np.ndarray, n: int) -> np.ndarray:
    """Connected components of the ids below n linked by hyperedges (node[i] lies on edge[i]): every id's
    smallest fellow (an id on no edge is its own)."""
    label = np.arange(n, dtype=np.int64)
    if not len(node):
        return label
    low = np.empty(int(edge.max()) + 1, dtype=np.int64)
    while True:
        low.fill(n)
        np.minimum.at(low, edge, label[node])
        new = label.copy()
        np.minimum.at(new, node, low[edge])
        new = new[new]  # a label is an id of the same component: jump through it
        if np.array_equal(new, label):
            return label
        label = new


def _reasons(look: AtomLookup, entries: list[tuple[np.ndarray, str]], rank: np.ndarray, cap: int,
             cyclic: str | None = None) -> tuple[list[int], list[str]]:
    """The first `cap` distinct reasons of every ranked atom (rank[a] >= 0) over (ids, reason) entries, in
    entry order, as (rank, reason) pairs sorted by rank, then by reason order.

    cyclic: from an entry's first cyclic composite on, that entry gives this reason instead of its own (the
    composite itself reads as its root); None: a cyclic composite reads as its root, the reason unchanged."""
    if not entries:
        return [], []
    arrays, texts = zip(*entries, strict=True)
    lens = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    ids = np.concatenate(arrays)
    entry = np.repeat(np.arange(len(arrays)), lens)
    after = None  # per id: at or past its entry's first cyclic composite
    if cyclic is not None and (deep := look.deep[look.roots[ids]]).any():
        seen = np.concatenate([[0], np.cumsum(deep)])
        after = seen[1:] > np.repeat(seen[np.cumsum(lens) - lens], lens)
    atom, cnt = look.expand(ids)
    if not look.plain:
        entry = np.repeat(entry, cnt)
        after = None if after is None else np.repeat(after, cnt)
    keep = rank[atom] >= 0
    atom, entry = atom[keep], entry[keep]
    hit = np.flatnonzero(np.bincount(entry, minlength=len(arrays))).tolist()
    names: dict[str, int] = {}  # the reasons of the entries that reach a ranked atom, numbered
    number = np.zeros(len(arrays), dtype=np.int64)
    number[hit] = [names.setdefault(texts[e], len(names)) for e in hit]
    order, reason = 2 * entry, number[entry]  # order: entries in turn, an entry's cyclic reason after its own
    if after is not None:
        after = after[keep]
        order = order + after
        reason = np.where(after, names.setdefault(cyclic, len(names)), reason)
    nr, span = len(names), 2 * len(arrays)
    pair, order = np.divmod(np.sort((atom * nr + reason) * span + order), span)
    first = _run_starts(pair)  # a reason repeated on an atom adds nothing
    atom, reason = np.divmod(pair[first], nr)
    rest, reason = np.divmod(np.sort((rank[atom] * span + order[first]) * nr + reason), nr)
    rk = rest // span
    idx = np.arange(len(rk))
    within = idx - np.maximum.accumulate(np.where(_run_starts(rk), idx, 0))
    text = list(names)
    return rk[within < cap].tolist(), [text[r] for r in reason[within < cap].tolist()]


def _add_members(groups: list[Group], inits: InitAtoms, atom_group: np.ndarray) -> None:
    """Per initializer axis and group (in axis order), the positions that hold one of the group's atoms."""
    total = inits.pos[-1]
    hit = atom_group[inits.flat]
    where = np.repeat(np.arange(total), inits.counts)  # the position of every atom
    key = np.sort(hit[hit >= 0] * total + where[hit >= 0])
    g, p = np.divmod(key[_run_starts(key)], total)
    starts = np.array(inits.pos)
    k = np.searchsorted(starts, p, side="right") - 1
    cut = np.flatnonzero((g[1:] != g[:-1]) | (k[1:] != k[:-1])) + 1
    first = np.concatenate([[0], cut]) if len(p) else cut
    for gi, ki, idx in zip(g[first].tolist(), k[first].tolist(), np.split(p - starts[k], cut), strict=True):
        groups[gi].members.append(Member(*inits.keys[ki], idx))


def build(ir: GraphIR, strict: bool = False) -> Analysis:
    ctx = run_rules(ir, strict)
    look = ctx.ids.atom_lookup()  # the ids no longer change: read atoms as arrays
    ctx.atom_lookup = look
    inits = InitAtoms(ir, ctx, look)
    n = len(look.roots)
    empty = np.zeros(0, dtype=np.int64)

    # ---- groups: atoms linked slot by slot on producer axes, then the atoms new on the other parameter axes.
    # Every axis slot is a hyperedge over its atoms; an only-new one links just the atoms no earlier one had.
    roots = [r for r in ctx.roles if r.kind in ROOT_KINDS and r.out_axis is not None]
    root_ids = {id(r) for r in roots}
    others = [r for r in ctx.roles if id(r) not in root_ids]
    links: list[tuple[int, bool]] = []  # (axis k, only new atoms)
    for r in roots:
        ks = inits.index.get(r.init, [])
        if r.out_axis < len(ks):
            links.append((ks[r.out_axis], False))
    for r in others + [r for r in roots if r.in_axis is not None]:
        ks = inits.index.get(r.init, [])
        axes = [r.in_axis] if id(r) in root_ids else ([r.out_axis] if r.out_axis is not None else range(len(ks)))
        links += [(ks[ax], True) for ax in axes if ax is not None and ax < len(ks)]
    slots = [(s, new) for k, new in links if inits.size(k) > 1 for s in inits.slots(k)]
    edge = np.repeat(np.arange(len(slots)), [len(s) for s, _ in slots])
    node = np.concatenate([s for s, _ in slots]) if slots else empty
    first_edge = np.full(n, len(slots), dtype=np.int64)
    np.minimum.at(first_edge, node, edge)
    linked = ~np.array([new for _, new in slots], dtype=bool)[edge] | (first_edge[node] == edge)
    component = _components(edge[linked], node[linked], n)
    in_group = first_edge < len(slots)

    # atoms in discovery order (root axes first); the first atom of a group names and kinds it
    pieces = []
    for r in roots + others:
        ks = inits.index.get(r.init, [])
        axes = (r.out_axis, r.in_axis) if r.kind in ROOT_KINDS else range(len(ks))
        pieces += [ks[ax] for ax in axes if ax is not None and ax < len(ks) and inits.size(ks[ax]) > 1]
    seq = np.concatenate([inits.atoms(k) for k in pieces]) if pieces else empty
    piece_at = list(itertools.accumulate((inits.at[k + 1] - inits.at[k] for k in pieces), initial=0))
    seen = np.full(n, len(seq), dtype=np.int64)  # where each atom is first seen
    np.minimum.at(seen, seq, np.arange(len(seq)))
    seen[~in_group] = len(seq)
    found = np.flatnonzero(seen < len(seq))
    found = found[np.argsort(seen[found])]
    comp = component[found]
    lead = np.full(n, len(found), dtype=np.int64)
    np.minimum.at(lead, comp, np.arange(len(found)))
    lead = np.sort(lead[lead < len(found)])  # index in `found` of every group's first atom, in group order
    gid = np.full(n, -1, dtype=np.int64)
    gid[comp[lead]] = np.arange(len(lead))
    group_of = gid[comp]
    order = np.argsort(group_of * len(found) + np.arange(len(found)))
    atoms = found[order]  # every group's atoms in turn, each in discovery order
    sizes = np.bincount(group_of, minlength=len(lead)).tolist()
    atom_group = np.full(n, -1, dtype=np.int64)
    atom_group[found] = group_of
    rank = np.full(n, -1, dtype=np.int64)
    rank[atoms] = np.arange(len(atoms))

    protect = {"embedding": np.zeros(n, dtype=bool), "output": np.zeros(n, dtype=bool)}
    for r in ctx.roles:
        ks = inits.index.get(r.init)
        if r.kind == "embedding" and r.out_axis is not None and ks is not None:
            protect["embedding"][inits.atoms(ks[r.out_axis])] = True
    for r in roots:
        ks = inits.index.get(r.init)
        if ks is None or r.in_axis is None or _feeds_output(ir, r.node) is False:
            continue
        protect["output"][inits.atoms(ks[r.in_axis])] = True
    atom_list, group_list = atoms.tolist(), group_of[order].tolist()
    frozen: list[dict[int, list[str]]] = [{} for _ in sizes]
    for rk, why in zip(*_reasons(look, ctx.frozen, rank, 4, ctx.cyclic_why or "cyclic reshape factorisation"), strict=True):
        reasons = frozen[group_list[rk]].setdefault(atom_list[rk], [])
        reasons.append(why)
    approx: list[set[str]] = [set() for _ in sizes]
    for rk, why in zip(*_reasons(look, ctx.approx, rank, 3), strict=True):
        approx[group_list[rk]].add(why)

    groups: list[Group] = []
    ends = list(itertools.accumulate(sizes, initial=0))
    for gi, (at, lo, hi) in enumerate(zip(lead.tolist(), ends[:-1], ends[1:], strict=True)):
        p = int(seen[found[at]])  # where the group's first atom was seen: which axis, which slot
        j = bisect.bisect_right(piece_at, p) - 1
        name, ax = inits.keys[pieces[j]]
        ar = inits.arity[pieces[j]]
        s = (p - piece_at[j]) % ar if ar > 1 else None
        label = f"{name}:{ax}" + (f"/{s}" if s is not None else "")
        kind = "channels" if s is None else ("head_dim" if s == ar - 1 else "heads")
        mine = atoms[lo:hi]
        prot = {k: mine[mask[mine]].tolist() for k, mask in protect.items()}
        groups.append(Group(gi, label, atom_list[lo:hi], [], frozen[gi], sorted(approx[gi]),
                            {k: v for k, v in prot.items() if v}, kind))

    _add_members(groups, inits, atom_group)
    return Analysis(groups, ctx, ir, inits)



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
