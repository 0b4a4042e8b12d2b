"""Shape arithmetic: small integer tensors (Shape → Gather → Concat → Reshape chains) evaluated as constants,
with each integer remembering where it came from, so pruning can rewrite the constants it depends on.

A `Sym` is one integer: its value (None when it depends on a dynamic dim) and an expression:
    ("c", tensor, flat_index)   a literal in an initializer / Constant: rewritable
    ("d", tensor, axis)         the size of a tensor axis (from Shape): follows pruning by itself
    ("k",)                      a literal we must not touch (from ConstantOfShape, comparisons...)
    (op, a, b)                  "add" "sub" "mul" "div" "mod" "neg" "max" "min" of other Syms
Solving "this entry must become v" walks the expression down to one rewritable literal.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MAX_ELEMS = 64  # larger integer tensors are data (position ids, masks), not shape arithmetic


@dataclasses.dataclass(frozen=True)
class Sym:
    value: int | float | None
    expr: tuple

    def leaves(self) -> list[tuple]:
        k = self.expr[0]
        if k in ("c", "d", "k"):
            return [self.expr]
        out = []
        for a in self.expr[1:]:
            out += a.leaves()
        return out

    def dims(self) -> list[tuple[str, int]]:
        """(tensor, axis) sizes this value depends on."""
        return [(e[1], e[2]) for e in self.leaves() if e[0] == "d"]

    def has_literal(self) -> bool:
        return any(e[0] == "c" for e in self.leaves())


@dataclasses.dataclass
class SymTensor:
    shape: tuple[int, ...]
    elems: list[Sym]  # flat, row-major

    def values(self) -> np.ndarray | None:
        if any(e.value is None for e in self.elems):
            return None
        return np.array([e.value for e in self.elems]).reshape(self.shape)


def from_const(name: str, arr: np.ndarray) -> SymTensor | None:
    if arr.ndim > 2 or arr.size > MAX_ELEMS or not np.issubdtype(arr.dtype, np.integer):
        return None
    flat = arr.reshape(-1)
    return SymTensor(tuple(arr.shape), [Sym(int(v), ("c", name, i)) for i, v in enumerate(flat)])


_ARITH = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Mod": "mod", "Max": "max", "Min": "min"}


def _apply(op: str, a, b):
    if a is None or b is None:
        return None
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    if op == "div":
        return a // b if isinstance(a, int) and isinstance(b, int) else a / b
    if op == "mod":
        return a % b
    if op == "max":
        return max(a, b)
    if op == "min":
        return min(a, b)
    raise ValueError(op)


def _broadcast(a: SymTensor, b: SymTensor) -> tuple[list[Sym], list[Sym], tuple] | None:
    if len(a.elems) == len(b.elems):
        return a.elems, b.elems, a.shape if len(a.shape) >= len(b.shape) else b.shape
    if len(a.elems) == 1:
        return a.elems * len(b.elems), b.elems, b.shape
    if len(b.elems) == 1:
        return a.elems, b.elems * len(a.elems), a.shape
    return None


def evaluate(node, ins: list[SymTensor | None], shape_of, attr) -> list[SymTensor] | None:
    """Sym outputs of `node` from sym inputs, or None when the node is not shape arithmetic."""
    op = node.op_type
    if op == "Shape":
        shp = shape_of(node.input[0])
        if shp is None:
            return None
        r = len(shp)
        start, end = attr(node, "start", 0), attr(node, "end", r)
        start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
        start, end = max(0, min(start, r)), max(0, min(end, r))
        el = [Sym(shp[i], ("d", node.input[0], i)) for i in range(start, end)]
        return [SymTensor((len(el),), el)]
    if any(i is None for i in ins[:1]) and op != "Shape":
        return None
    if op in ("Identity", "Cast"):
        to = attr(node, "to", 7)
        if op == "Cast" and to not in (6, 7, 12, 13):  # to float: leaves shape arithmetic (numeric use)
            return None
        return [ins[0]]
    if op in _ARITH and len(ins) == 2 and ins[1] is not None:
        bc = _broadcast(ins[0], ins[1])
        if bc is None:
            return None
        xa, xb, shp = bc
        o = _ARITH[op]
        return [SymTensor(tuple(shp), [Sym(_apply(o, x.value, y.value), (o, x, y)) for x, y in zip(xa, xb, strict=True)])]
    if op == "Neg":
        return [SymTensor(ins[0].shape, [Sym(None if x.value is None else -x.value, ("neg", x)) for x in ins[0].elems])]
    structural = _structural(node, ins, attr)
    if structural is not None:
        return [structural]
    if op == "Equal":
        if ins[1] is None:
            return None
        bc = _broadcast(ins[0], ins[1])
        if bc is None:
            return None
        xa, xb, shp = bc
        return [SymTensor(shp, [Sym(None if x.value is None or y.value is None else int(x.value == y.value), ("k",))
                                for x, y in zip(xa, xb, strict=True)])]
    if op == "Where":
        if len(ins) < 3 or ins[1] is None or ins[2] is None:
            return None
        n = max(len(ins[0].elems), len(ins[1].elems), len(ins[2].elems))

        def at(t, i):
            return t.elems[i] if len(t.elems) == n else t.elems[0]

        el = []
        for i in range(n):
            c = at(ins[0], i).value
            el.append(Sym(None, ("k",)) if c is None else at(ins[1], i) if c else at(ins[2], i))
        return [SymTensor((n,), el)]
    if op == "ConstantOfShape":
        shp = ins[0].values()
        if shp is None or shp.size != 1 or int(shp[0]) > MAX_ELEMS:
            return None
        val = attr(node, "value", None)
        v = 0 if val is None else np.asarray(val).reshape(-1)[0].item()
        if not isinstance(v, int):
            return None
        return [SymTensor((int(shp[0]),), [Sym(v, ("k",))] * int(shp[0]))]
    return None


class Solver:
    """Collects literal rewrites so that shape expressions evaluate to wanted values after pruning."""

    def __init__(self, new_dim):
        self.new_dim = new_dim  # (tensor, axis) -> new size or None
        self.edits: dict[tuple[str, int], int] = {}

    def eval(self, s: Sym):
        e = s.expr
        k = e[0]
        if k == "c":
            return self.edits.get((e[1], e[2]), s.value)
        if k == "d":
            return self.new_dim(e[1], e[2])
        if k == "k":
            return s.value
        if k == "neg":
            v = self.eval(e[1])
            return None if v is None else -v
        return _apply(k, self.eval(e[1]), self.eval(e[2]))

    def solve(self, s: Sym, want: int) -> bool:
        """Make `s` evaluate to `want` by editing one literal; False if impossible."""
        got = self.eval(s)
        if got == want:
            return True
        e = s.expr
        k = e[0]
        if k == "c":
            key = (e[1], e[2])
            if key in self.edits and self.edits[key] != want:
                return False
            self.edits[key] = want
            return True
        if k in ("d", "k"):
            return False
        if k == "neg":
            return self.solve(e[1], -want)
        a, b = e[1], e[2]
        va, vb = self.eval(a), self.eval(b)
        if k == "add":
            return (b.has_literal() and va is not None and self.solve(b, want - va)) or \
                   (a.has_literal() and vb is not None and self.solve(a, want - vb))
        if k == "sub":
            return (a.has_literal() and vb is not None and self.solve(a, want + vb)) or \
                   (b.has_literal() and va is not None and self.solve(b, va - want))
        if k == "mul":
            if b.has_literal() and va and want % va == 0:
                return self.solve(b, want // va)
            if a.has_literal() and vb and want % vb == 0:
                return self.solve(a, want // vb)
            return False
        if k == "div":
            if a.has_literal() and vb:
                return self.solve(a, want * vb)
            if b.has_literal() and va and want and va % want == 0:
                return self.solve(b, va // want)
            return False
        return False


def _obj(t: SymTensor) -> np.ndarray:
    a = np.empty(len(t.elems), dtype=object)
    a[:] = t.elems
    return a.reshape(t.shape)


def _sym(a) -> SymTensor:
    if not isinstance(a, np.ndarray):  # numpy hands back the element itself for a scalar pick
        one = np.empty((), dtype=object)
        one[()] = a
        a = one
    return SymTensor(tuple(a.shape), list(a.reshape(-1)))


def _ints(t: SymTensor | None) -> list[int] | None:
    v = None if t is None else t.values()
    return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]


def _structural(node, ins: list, attr) -> SymTensor | None:
    """Layout ops on small integer tensors (torch's Pad export reshapes, flips and transposes its pads):
    move the Syms around like numpy moves elements."""
    op = node.op_type
    x = _obj(ins[0])
    if op == "Unsqueeze":
        axes = attr(node, "axes") or _ints(ins[1] if len(ins) > 1 else None)
        if axes is None:
            return None
        for ax in sorted(a % (x.ndim + len(axes)) for a in axes):
            if ax > x.ndim:  # what np.expand_dims would refuse
                x = np.expand_dims(x, ax)
            x = x.reshape(x.shape[:ax] + (1,) + x.shape[ax:])  # np.expand_dims, minus its per-call overhead
        return _sym(x)
    if op == "Squeeze":
        axes = attr(node, "axes") or _ints(ins[1] if len(ins) > 1 else None)
        return _sym(x.squeeze() if axes is None else x.squeeze(tuple(a % x.ndim for a in axes)))
    if op == "Reshape":
        shape = _ints(ins[1] if len(ins) > 1 else None)
        if shape is None:
            return None
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
        return _sym(x.reshape(shape))
    if op == "Transpose":
        return _sym(x.transpose(attr(node, "perm") or list(reversed(range(x.ndim)))))
    if op == "Concat":
        if any(i is None for i in ins):
            return None
        return _sym(np.concatenate([_obj(i) for i in ins], axis=attr(node, "axis", 0)))
    if op == "Gather":
        idx = None if len(ins) < 2 or ins[1] is None else ins[1].values()
        if idx is None:
            return None
        return _sym(np.take(x, np.asarray(idx).astype(np.int64), axis=attr(node, "axis", 0)))
    if op == "Slice":
        vals = [_ints(i) for i in ins[1:]] + [None] * (5 - len(ins))
        starts, ends, axes, steps = vals[:4]
        if starts is None or ends is None:
            return None
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        for s0, e0, a, st in zip(starts, ends, axes, steps, strict=True):
            ax = a % x.ndim  # range(*indices) is right for negative steps too (a slice object is not)
            x = np.take(x, list(range(*slice(s0, e0, st).indices(x.shape[ax]))), axis=ax)
        return _sym(x)
    return None
