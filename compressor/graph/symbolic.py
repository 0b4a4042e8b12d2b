"""Shape arithmetic: small integer tensors (Shape → Gather → Concat → Reshape chains) evaluated as constants,
with each integer remembering where it came from, so pruning can rewrite the constants it depends on.

A `Sym` is one integer: its value (None when it depends on a dynamic dim) and an expression:
    ("c", tensor, flat_index)   a literal in an initializer / Constant: rewritable
    ("d", tensor, axis)         the size of a tensor axis (from Shape): follows pruning by itself
    ("k",)                      a literal we must not touch (from ConstantOfShape, comparisons...)
    (op, a, b)                  "add" "sub" "mul" "div" "mod" "neg" "max" "min" of other Syms
Solving "this entry must become v" walks the expression down to one rewritable literal.

Speed matters here: three quarters of a transformer export's nodes are shape arithmetic. Syms are slotted
objects that carry the (tensor, axis) sizes they depend on (`dims`, built once from their operands), and
layout ops on flat (rank ≤ 1) tensors move Syms with list operations; numpy object arrays are used only
for higher ranks (and for anything numpy would refuse, so errors stay numpy's).
"""

from __future__ import annotations

import numpy as np

MAX_ELEMS = 64  # larger integer tensors are data (position ids, masks), not shape arithmetic


class Sym:
    """One integer of a shape computation (immutable by convention: Syms are shared between tensors)."""

    __slots__ = ("value", "expr", "dims")

    def __init__(self, value: int | float | None, expr: tuple, dims: tuple[tuple[str, int], ...] = ()):
        self.value = value
        self.expr = expr
        self.dims = dims  # (tensor, axis) sizes this value depends on, in leaf order (repeats kept)

    def __repr__(self) -> str:
        return f"Sym({self.value!r}, {self.expr!r})"

    def leaves(self) -> list[tuple]:
        k = self.expr[0]
        if k in ("c", "d", "k"):
            return [self.expr]
        out = []
        for a in self.expr[1:]:
            out += a.leaves()
        return out

    def has_literal(self) -> bool:
        return any(e[0] == "c" for e in self.leaves())


_KEEP = ("k",)  # shared expression of untouchable literals


class SymTensor:
    __slots__ = ("shape", "elems")

    def __init__(self, shape: tuple[int, ...], elems: list[Sym]):
        self.shape = shape
        self.elems = elems  # flat, row-major

    def __repr__(self) -> str:
        return f"SymTensor({self.shape!r}, {self.elems!r})"

    def values(self) -> np.ndarray | None:
        vals = [e.value for e in self.elems]
        if any(v is None for v in vals):
            return None
        return np.array(vals).reshape(self.shape)

    def ints(self) -> list[int] | None:
        """The values as flat Python ints (None if any is unknown); like values(), without the array."""
        vals = [e.value for e in self.elems]
        if all(type(v) is int for v in vals):
            return vals
        if any(v is None for v in vals):
            return None
        return [int(x) for x in np.array(vals).reshape(-1)]  # floats (and mixes with ints) as numpy casts them


def from_const(name: str, arr: np.ndarray) -> SymTensor | None:
    if arr.ndim > 2 or arr.size > MAX_ELEMS or arr.dtype.kind not in "iu":  # integers only (not bool)
        return None
    if arr.size == 1:  # most shape literals: one axis index or size
        return SymTensor(arr.shape, [Sym(arr.item(), ("c", name, 0))])
    return SymTensor(arr.shape, [Sym(v, ("c", name, i)) for i, v in enumerate(arr.reshape(-1).tolist())])


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


# Per-op evaluators: (node, ins, shape_of, attr) -> SymTensor, or None when the node is not shape arithmetic.
# They run only when the first input is symbolic (Shape: whatever its input).

def _shape(node, ins, shape_of, attr):
    x = node.input[0]
    shp = shape_of(x)
    if shp is None:
        return None
    r = len(shp)
    start, end = attr(node, "start", 0), attr(node, "end", r)
    start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
    start, end = max(0, min(start, r)), max(0, min(end, r))
    el = [Sym(shp[i], ("d", x, i), ((x, i),)) for i in range(start, end)]
    return SymTensor((len(el),), el)


def _identity(node, ins, shape_of, attr):
    if node.op_type == "Cast" and attr(node, "to", 7) not in (6, 7, 12, 13):  # to float: leaves shape arithmetic
        return None
    return ins[0]


def _arith(node, ins, shape_of, attr):
    if len(ins) != 2 or ins[1] is None:
        return None
    bc = _broadcast(ins[0], ins[1])
    if bc is None:
        return None
    xa, xb, shp = bc
    o = _ARITH[node.op_type]
    return SymTensor(tuple(shp), [Sym(_apply(o, x.value, y.value), (o, x, y), x.dims + y.dims)
                                  for x, y in zip(xa, xb, strict=True)])


def _neg(node, ins, shape_of, attr):
    return SymTensor(ins[0].shape, [Sym(None if x.value is None else -x.value, ("neg", x), x.dims) for x in ins[0].elems])


def _equal(node, ins, shape_of, attr):
    if len(ins) < 2 or ins[1] is None:
        return None
    bc = _broadcast(ins[0], ins[1])
    if bc is None:
        return None
    xa, xb, shp = bc
    return SymTensor(shp, [Sym(None if x.value is None or y.value is None else int(x.value == y.value), _KEEP)
                           for x, y in zip(xa, xb, strict=True)])


def _where(node, ins, shape_of, attr):
    if len(ins) < 3 or ins[1] is None or ins[2] is None:
        return None
    n = max(len(ins[0].elems), len(ins[1].elems), len(ins[2].elems))

    def at(t, i):
        return t.elems[i] if len(t.elems) == n else t.elems[0]

    el = []
    for i in range(n):
        c = at(ins[0], i).value
        el.append(Sym(None, _KEEP) if c is None else at(ins[1], i) if c else at(ins[2], i))
    return SymTensor((n,), el)


def _constant_of_shape(node, ins, shape_of, attr):
    shp = ins[0].values()
    if shp is None or shp.size != 1 or int(shp[0]) > MAX_ELEMS:
        return None
    val = attr(node, "value", None)
    v = 0 if val is None else np.asarray(val).reshape(-1)[0].item()
    if not isinstance(v, int):
        return None
    return SymTensor((int(shp[0]),), [Sym(v, _KEEP)] * int(shp[0]))


def _opt(ins: list, k: int) -> SymTensor | None:
    return ins[k] if len(ins) > k else None


def _ints(t: SymTensor | None) -> list[int] | None:
    return None if t is None else t.ints()


def _unsqueeze(node, ins, shape_of, attr):
    axes = attr(node, "axes") or _ints(_opt(ins, 1))
    if axes is None:
        return None
    x = ins[0]
    shape = list(x.shape)
    rank = len(shape) + len(axes)
    for ax in sorted(a % rank for a in axes):
        if ax > len(shape):  # numpy refuses it: let it say so
            return _numpy_layout(node, ins, attr)
        shape.insert(ax, 1)
    return SymTensor(tuple(shape), x.elems)  # inserting size-1 axes keeps the row-major order


def _squeeze(node, ins, shape_of, attr):
    axes = attr(node, "axes") or _ints(_opt(ins, 1))
    shape = ins[0].shape
    if axes is None:
        return SymTensor(tuple(s for s in shape if s != 1), ins[0].elems)
    if not shape:
        return _numpy_layout(node, ins, attr)
    drop = {a % len(shape) for a in axes}
    if len(drop) != len(axes) or any(shape[a] != 1 for a in drop):
        return _numpy_layout(node, ins, attr)
    return SymTensor(tuple(s for k, s in enumerate(shape) if k not in drop), ins[0].elems)


def _reshape(node, ins, shape_of, attr):
    shape = _ints(_opt(ins, 1))
    if shape is None:
        return None
    x = ins[0]
    if len(shape) > len(x.shape) and 0 in shape[len(x.shape):]:
        return _numpy_layout(node, ins, attr)
    shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    n, known = len(x.elems), 1
    for v in shape:
        if v != -1:
            known *= v
    free = shape.count(-1)
    if any(v < -1 for v in shape) or free > 1 or (free and (known <= 0 or n % known)) or (not free and known != n):
        return _numpy_layout(node, ins, attr)
    return SymTensor(tuple(n // known if v == -1 else v for v in shape), x.elems)


def _concat(node, ins, shape_of, attr):
    if any(i is None for i in ins):
        return None
    if attr(node, "axis", 0) not in (0, -1) or any(len(i.shape) != 1 for i in ins):
        return _numpy_layout(node, ins, attr)
    el = [e for i in ins for e in i.elems]
    return SymTensor((len(el),), el)


def _gather(node, ins, shape_of, attr):
    idx_t = _opt(ins, 1)
    if idx_t is None or any(e.value is None for e in idx_t.elems):
        return None
    x = ins[0]
    idx = [e.value for e in idx_t.elems]
    n = len(x.elems)
    if len(x.shape) != 1 or attr(node, "axis", 0) not in (0, -1) or \
            any(type(i) is not int or not -n <= i < n for i in idx):
        return _numpy_layout(node, ins, attr)
    return SymTensor(idx_t.shape, [x.elems[i] for i in idx])  # np.take on a flat tensor, negatives included


def _slice(node, ins, shape_of, attr):
    vals = [_ints(i) for i in ins[1:]] + [None] * (5 - len(ins))
    starts, ends, axes, steps = vals[:4]
    if starts is None or ends is None:
        return None
    x = ins[0]
    if len(x.shape) != 1 or len(ends) != len(starts) or (axes is not None and len(axes) != len(starts)) or \
            (steps is not None and (len(steps) != len(starts) or 0 in steps)):
        return _numpy_layout(node, ins, attr)
    el = x.elems
    for k, (s0, e0) in enumerate(zip(starts, ends, strict=True)):  # every axis is axis 0 of a flat tensor
        pick = range(*slice(s0, e0, 1 if steps is None else steps[k]).indices(len(el)))  # right for step < 0
        el = [el[i] for i in pick]
    return SymTensor((len(el),), el)


def _transpose(node, ins, shape_of, attr):
    return _numpy_layout(node, ins, attr)


_EVAL = {"Shape": _shape, "Identity": _identity, "Cast": _identity, "Neg": _neg, "Equal": _equal, "Where": _where,
         "ConstantOfShape": _constant_of_shape, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Reshape": _reshape,
         "Concat": _concat, "Gather": _gather, "Slice": _slice, "Transpose": _transpose,
         **dict.fromkeys(_ARITH, _arith)}
OPS = frozenset(_EVAL)  # the op types that can produce shape arithmetic


def evaluate(node, ins: list[SymTensor | None], shape_of, attr) -> list[SymTensor] | None:
    """Sym outputs of `node` from sym inputs, or None when the node is not shape arithmetic."""
    op = node.op_type
    fn = _EVAL.get(op)
    if fn is None or (op != "Shape" and (not ins or ins[0] is None)):
        return None
    out = fn(node, ins, shape_of, attr)
    return None if out is None else [out]


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


def _numpy_layout(node, ins: list, attr) -> SymTensor | None:
    """Layout ops on small integer tensors of any rank (torch's Pad export reshapes, flips and transposes its
    pads): move the Syms around like numpy moves elements. The fast paths above handle flat tensors."""
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
