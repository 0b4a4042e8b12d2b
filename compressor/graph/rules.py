"""Per-op rules: how channel ids flow across an op's axes. One small function per op type.

A rule reads its inputs' axis ids from the Ctx, unifies ids that must be pruned together, and sets its
outputs' axis ids (sharing an input's array when positions correspond one to one). Anything a rule cannot
account for is frozen with the op, node name and reason. An op with no rule freezes everything it touches.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable

import numpy as np

from compressor.graph.context import Ctx

RULES: dict[str, Callable] = {}


def rule(*ops: str):
    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


def default_rule(ctx: Ctx, node, reason: str = "no rule for this op") -> None:
    """Freeze every id the node touches; outputs get fresh frozen ids (shape inference gives their sizes)."""
    why = ctx.why(node, reason)
    for i in node.input:
        ctx.freeze_axes(ctx.ax(i), why)
    for o in node.output:
        ctx.set_fresh_frozen(o, node, reason)


# ------------------------------------------------------------------------------------------ elementwise
UNARY = ("Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Erf", "Sigmoid", "HardSigmoid", "HardSwish",
         "Tanh", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Sqrt", "Exp", "Log", "Neg", "Abs", "Reciprocal",
         "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Not", "IsNaN",
         "IsInf", "Identity", "Cast", "CastLike", "Clip", "Dropout", "Shrink", "BitwiseNot")


@rule(*UNARY)
def unary(ctx: Ctx, node) -> None:
    """Same positions in and out (extra inputs such as Clip bounds / Dropout ratio are scalars)."""
    x = ctx.ax(node.input[0])
    if x is None:
        return default_rule(ctx, node, "unknown input shape")
    for o in node.output:
        ctx.set(o, list(x), node)


def broadcast(ctx: Ctx, node, names: list[str]) -> list | None:
    """Numpy broadcasting: aligned axes of equal size are unified; size-1 axes do not couple."""
    axes = [ctx.ax(n) for n in names if n]
    if any(a is None for a in axes):
        return None
    rank = max(len(a) for a in axes)
    out = []
    for k in range(rank):
        cols = [a[len(a) - rank + k] for a in axes if len(a) - rank + k >= 0]
        full = [c for c in cols if c is None or len(c) > 1]
        static = [c for c in full if c is not None]
        if not static and full:  # a dynamic axis: never a channel
            out.append(None)
            continue
        if len(static) < len(full):  # static against unknown size: the positions must not move
            for c in static:
                ctx.freeze(c, ctx.why(node, "broadcast against an axis of unknown size"))
        for c in static[1:]:
            ctx.unify(static[0], c, "broadcast sizes differ", node)
        out.append(static[0] if static else cols[0])
    return out


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
      "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "BitShift", "BitwiseAnd", "BitwiseOr")
def elementwise(ctx: Ctx, node) -> None:
    names = list(node.input)
    exponent = ctx.ir.const_shape(names[1]) if node.op_type == "Pow" else None
    if exponent is not None and math.prod(exponent) == 1:
        names = names[:1]  # constant exponent: unary
    out = broadcast(ctx, node, names)
    if out is None:
        return default_rule(ctx, node, "unknown input shape")
    for n in node.input:  # a constant operand with a channel axis is a free parameter (scale, shift, pos. emb.)
        if ctx.ir.init_of(n):  # read from dims and dtype: the values may not be there (a weightless graph)
            shape = ctx.ir.const_shape(n)
            if len(shape) and math.prod(shape) > 1 and ctx.ir.const_kind(n) == "f":
                ctx.role(n, "free", node)
    ctx.set(node.output[0], out, node)


@rule("Softmax", "LogSoftmax")
def softmax(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None:
        return default_rule(ctx, node, "unknown input shape")
    axis = ctx.attr(node, "axis", -1)
    ctx.mark_approx(x[axis], ctx.why(node, "softmax normalises over this axis"))
    ctx.set(node.output[0], list(x), node)


# ------------------------------------------------------------------------------------------ parameterised
def _spatial_freeze(ctx: Ctx, node, x: list, start: int = 2) -> None:
    for a in x[start:]:
        ctx.freeze(a, ctx.why(node, "spatial axis"))


def _fresh_spatial(ctx: Ctx, node, out_name: str, rank: int) -> list:
    shp = ctx.ir.shape(out_name) or [None] * rank
    sp = ctx.fresh_axes(shp[2:]) if len(shp) == rank else [None] * (rank - 2)
    ctx.freeze_axes(sp, ctx.why(node, "spatial axis"))
    return sp


@rule("Conv")
def conv(ctx: Ctx, node) -> None:
    x, w = ctx.ax(node.input[0]), ctx.ax(node.input[1])
    if x is None or w is None or x[1] is None:
        return default_rule(ctx, node, "unknown input shape")
    g = ctx.attr(node, "group", 1)
    cin, cout, cin_g = len(x[1]), len(w[0]), len(w[1])
    why = ctx.why(node, "kernel axis")
    for a in w[2:]:
        ctx.freeze(a, why)
    _spatial_freeze(ctx, node, x)
    if g == 1:
        ctx.unify(x[1], w[1])
    elif cin_g == 1 and cin == g:  # depthwise (channel multiplier m): input r feeds outputs r*m … r*m+m-1
        m = cout // g
        for r in range(g):
            for t in range(m):
                ctx.ids.union(int(x[1][r]), int(w[0][r * m + t]))
    else:  # grouped: every group must keep the same within-group positions (in and out)
        m = cout // g
        for r in range(g):
            ctx.unify(x[1][r * cin_g:(r + 1) * cin_g], w[1])
            if r:
                ctx.unify(w[0][r * m:(r + 1) * m], w[0][:m])
    if len(node.input) > 2 and node.input[2]:
        ctx.unify(ctx.ax(node.input[2])[0], w[0])
        ctx.role(node.input[2], "bias", node, out_axis=0)
    ctx.role(node.input[1], "conv", node, out_axis=0, in_axis=1, groups=g)
    ctx.set(node.output[0], [x[0], w[0], *_fresh_spatial(ctx, node, node.output[0], len(x))], node)


@rule("ConvTranspose")
def conv_transpose(ctx: Ctx, node) -> None:
    x, w = ctx.ax(node.input[0]), ctx.ax(node.input[1])
    if x is None or w is None or x[1] is None:
        return default_rule(ctx, node, "unknown input shape")
    g = ctx.attr(node, "group", 1)
    for a in w[2:]:
        ctx.freeze(a, ctx.why(node, "kernel axis"))
    _spatial_freeze(ctx, node, x)
    ctx.unify(x[1], w[0])
    if g == 1:
        out_c = w[1]
    elif len(w[1]) == 1 and len(x[1]) == g:  # depthwise transpose: output r comes from input r only
        out_c = w[0]
    else:
        return default_rule(ctx, node, "grouped ConvTranspose is not supported")
    if len(node.input) > 2 and node.input[2]:
        ctx.unify(ctx.ax(node.input[2])[0], out_c)
        ctx.role(node.input[2], "bias", node, out_axis=0)
    ctx.role(node.input[1], "convT", node, out_axis=1, in_axis=0, groups=g)
    ctx.set(node.output[0], [x[0], out_c, *_fresh_spatial(ctx, node, node.output[0], len(x))], node)


@rule("Gemm")
def gemm(ctx: Ctx, node) -> None:
    a, b = ctx.ax(node.input[0]), ctx.ax(node.input[1])
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return default_rule(ctx, node, "unknown input shape")
    ta, tb = ctx.attr(node, "transA", 0), ctx.attr(node, "transB", 0)
    m, ka = (a[1], a[0]) if ta else (a[0], a[1])
    kb, n = (b[1], b[0]) if tb else (b[0], b[1])
    ctx.unify(ka, kb, "contracted sizes differ", node)
    out = [m, n]
    if len(node.input) > 2 and node.input[2]:
        c = ctx.ax(node.input[2])
        if c is not None:
            for k in range(1, len(c) + 1):
                if c[-k] is not None and len(c[-k]) > 1:
                    ctx.unify(c[-k], out[-k])
            ctx.role(node.input[2], "bias", node, out_axis=len(c) - 1)
    t = ctx.init_through(node.input[1])
    if t is not None:
        perm = t[1] if not tb else t[1][::-1]
        ctx.role(t[0], "linear", node, out_axis=perm[1], in_axis=perm[0])
    ctx.set(node.output[0], out, node)


@rule("MatMul")
def matmul(ctx: Ctx, node) -> None:
    a, b = ctx.ax(node.input[0]), ctx.ax(node.input[1])
    if a is None or b is None:
        return default_rule(ctx, node, "unknown input shape")
    a2 = a if len(a) > 1 else [None, a[0]]
    b2 = b if len(b) > 1 else [b[0], None]
    ctx.unify(a2[-1], b2[-2], "contracted sizes differ", node)
    batch_a, batch_b = a2[:-2], b2[:-2]
    rank = max(len(batch_a), len(batch_b))
    batch = []
    for k in range(rank):
        cols = [x[len(x) - rank + k] for x in (batch_a, batch_b) if len(x) - rank + k >= 0]
        full = [c for c in cols if c is None or len(c) > 1]
        if any(c is None for c in full):
            batch.append(None)
            continue
        for c in full[1:]:
            ctx.unify(full[0], c)  # attention: heads of Q and K (and scores and V) are aligned
        batch.append(full[0] if full else cols[0])
    out = batch + ([a2[-2]] if len(a) > 1 else []) + ([b2[-1]] if len(b) > 1 else [])
    t = ctx.init_through(node.input[1])
    if t is not None and len(t[1]) == 2:
        ctx.role(t[0], "linear", node, out_axis=t[1][1], in_axis=t[1][0])
    ctx.set(node.output[0], out, node)


@rule("BatchNormalization", "InstanceNormalization")
def batchnorm(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None or len(x) < 2:
        return default_rule(ctx, node, "unknown input shape")
    for i, n in enumerate(node.input[1:], 1):
        p = ctx.ax(n)
        if p is not None and p:
            ctx.unify(p[0], x[1])
            ctx.role(n, "bn" if i == 1 else "norm", node, out_axis=0)
    if node.op_type == "InstanceNormalization":
        for s in x[2:]:
            ctx.mark_approx(s, ctx.why(node, "statistics over this axis"))
    ctx.set(node.output[0], list(x), node)
    for o in node.output[1:]:  # training-mode outputs
        default_rule_out(ctx, node, o)


def default_rule_out(ctx: Ctx, node, name: str) -> None:
    ctx.set_fresh_frozen(name, node, "auxiliary output")


@rule("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
def layernorm(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None:
        return default_rule(ctx, node, "unknown input shape")
    axis = ctx.attr(node, "axis", -1)
    axis = axis + len(x) if axis < 0 else axis
    for s in x[axis:]:
        ctx.mark_approx(s, ctx.why(node, "normalisation statistics span this axis"))
    for i, n in enumerate(node.input[1:3], 1):
        p = ctx.ax(n)
        if p is None:
            continue
        for k in range(1, len(p) + 1):
            if p[-k] is not None and len(p[-k]) > 1:
                ctx.unify(p[-k], x[-k])
        ctx.role(n, "ln" if i == 1 else "norm", node, out_axis=len(p) - 1)
    ctx.set(node.output[0], list(x), node)
    for o in node.output[1:]:
        default_rule_out(ctx, node, o)


@rule("GroupNormalization")
def groupnorm(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None or x[1] is None:
        return default_rule(ctx, node, "unknown input shape")
    g = ctx.attr(node, "num_groups")
    c = len(x[1])
    grp, pos = ctx.ids.fresh(g), ctx.ids.fresh(c // g)
    for i, e in enumerate(x[1].tolist()):  # channel = (group, position in group)
        ctx.ids.set_composite(e, (int(grp[i // (c // g)]), int(pos[i % (c // g)])))
    ctx.mark_approx(pos, ctx.why(node, "group statistics span the channels of a group"))
    ctx.info[node.name] = {"groups": grp}
    for n in node.input[1:3]:
        p = ctx.ax(n)
        if p:
            ctx.unify(p[0], x[1] if len(p[0]) == c else grp)
            ctx.role(n, "norm", node, out_axis=0)
    ctx.set(node.output[0], list(x), node)


# ------------------------------------------------------------------------------------------ pooling / reductions
@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Resize", "Upsample")
def pool(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None or len(x) < 3:
        return default_rule(ctx, node, "unknown input shape")
    _spatial_freeze(ctx, node, x)
    for o in node.output:
        ctx.set(o, [x[0], x[1], *_fresh_spatial(ctx, node, o, len(x))], node)


_EXACT_REDUCE = {"ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare"}  # zeroed channels add nothing


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare")
def reduce(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None:
        return default_rule(ctx, node, "unknown input shape")
    axes = ctx.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        v = ctx.value(node.input[1])
        if v is None:
            return default_rule(ctx, node, "reduction axes are not constant")
        axes = v.reshape(-1).tolist()
    if axes is None or len(axes) == 0:
        if ctx.attr(node, "noop_with_empty_axes", 0):
            return unary(ctx, node)
        axes = list(range(len(x)))
    axes = {a + len(x) if a < 0 else a for a in axes}
    keep = ctx.attr(node, "keepdims", 1)
    out = []
    for k, a in enumerate(x):
        if k in axes:
            if node.op_type not in _EXACT_REDUCE:
                ctx.mark_approx(a, ctx.why(node, "reduced over this axis"))
            if keep:
                one = ctx.ids.fresh(1)
                out.append(one)
        else:
            out.append(a)
    ctx.set(node.output[0], out, node)


# ------------------------------------------------------------------------------------------ layout
@rule("Transpose")
def transpose(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None:
        return default_rule(ctx, node, "unknown input shape")
    perm = ctx.attr(node, "perm") or list(reversed(range(len(x))))
    ctx.set(node.output[0], [x[p] for p in perm], node)


def _axes_input(ctx: Ctx, node, rank: int) -> list[int] | None:
    axes = ctx.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        v = ctx.value(node.input[1])
        if v is None:
            return None
        axes = v.reshape(-1).tolist()
    return None if axes is None else [int(a) + rank if a < 0 else int(a) for a in axes]


@rule("Squeeze")
def squeeze(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None:
        return default_rule(ctx, node, "unknown input shape")
    axes = _axes_input(ctx, node, len(x))
    if axes is None:
        if len(node.input) > 1 and node.input[1]:
            return default_rule(ctx, node, "squeeze axes are not constant")
        axes = [k for k, a in enumerate(x) if a is not None and len(a) == 1]
    for k in axes:  # a squeezed axis must keep its one position (e.g. unbind of q/k/v: Split, then Squeeze)
        if k < len(x) and x[k] is not None:
            ctx.freeze(x[k], ctx.why(node, "squeezed axis"))
    ctx.set(node.output[0], [a for k, a in enumerate(x) if k not in axes], node)


@rule("Unsqueeze")
def unsqueeze(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None:
        return default_rule(ctx, node, "unknown input shape")
    rank = len(x) + len(_axes_input(ctx, node, 0) or [])
    axes = _axes_input(ctx, node, rank)
    if axes is None:
        return default_rule(ctx, node, "unsqueeze axes are not constant")
    out, it = [], iter(x)
    for k in range(rank):
        out.append(ctx.ids.fresh(1) if k in axes else next(it))
    ctx.set(node.output[0], out, node)


@rule("Concat")
def concat(ctx: Ctx, node) -> None:
    xs = [ctx.ax(n) for n in node.input]
    if any(x is None for x in xs):
        return default_rule(ctx, node, "unknown input shape")
    rank = len(xs[0])
    axis = ctx.attr(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    out = []
    for k in range(rank):
        cols = [x[k] for x in xs]
        if k == axis:  # offsets: input i's position p lands at p + sum of earlier widths
            out.append(None if any(c is None for c in cols) else np.concatenate(cols))
        else:
            for c in cols[1:]:
                ctx.unify(cols[0], c)
            out.append(cols[0])
    ctx.set(node.output[0], out, node)


@rule("Split")
def split(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None:
        return default_rule(ctx, node, "unknown input shape")
    axis = ctx.attr(node, "axis", 0)
    axis = axis + len(x) if axis < 0 else axis
    a = x[axis]
    sizes = ctx.attr(node, "split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        v = ctx.value(node.input[1])
        if v is None:
            return default_rule(ctx, node, "split sizes are not constant")
        sizes = v.reshape(-1).tolist()
    if a is None:
        for o in node.output:
            ctx.set(o, [*x[:axis], None, *x[axis + 1:]], node)
        return
    if sizes is None:  # an equal split (`num_outputs`, or no sizes at all): parts stay equal after the cut,
        n = len(node.output)  # so every part loses the same positions (the rewriter keeps it an equal split)
        step = math.ceil(len(a) / n)
        sizes = [min(step, len(a) - i * step) for i in range(n)]
        if n > 1:
            _couple_chunks(ctx, node, a, step)
    s_sym = ctx.sym(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if s_sym is not None and any((node.input[0], axis) in el.dims for el in s_sym.elems):
        if len(set(sizes)) != 1:
            ctx.freeze(a, ctx.why(node, "split sizes computed from the axis size"))
        else:
            _couple_chunks(ctx, node, a, int(sizes[0]))
    off = 0
    for o, s in zip(node.output, sizes, strict=False):
        ctx.set(o, [*x[:axis], a[off:off + int(s)], *x[axis + 1:]], node)
        off += int(s)


@rule("Slice")
def slice_(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None:
        return default_rule(ctx, node, "unknown input shape")
    vals = [ctx.value(n) if i < len(node.input) and n else None for i, n in enumerate(node.input)][1:]
    if ctx.attr(node, "starts") is not None:  # opset < 10
        vals = [np.array(ctx.attr(node, "starts")), np.array(ctx.attr(node, "ends")), ctx.attr(node, "axes"), None]
    starts, ends = vals[0], vals[1]
    axes = vals[2] if len(vals) > 2 and vals[2] is not None else None
    steps = vals[3] if len(vals) > 3 and vals[3] is not None else None
    out = list(x)
    if starts is None or ends is None:
        axes_known = None if axes is None else [int(a) % len(x) for a in np.asarray(axes).reshape(-1)]
        for k in (axes_known if axes_known is not None else range(len(x))):
            if x[k] is not None:
                ctx.freeze(x[k], ctx.why(node, "slice bounds are not constant"))
                shp = ctx.ir.shape(node.output[0])
                out[k] = ctx.fresh_axes([shp[k] if shp else None])[0]
                ctx.freeze(out[k], ctx.why(node, "slice bounds are not constant"))
        ctx.set(node.output[0], out, node)
        return
    starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
    axes = list(range(len(starts))) if axes is None else [int(a) % len(x) for a in np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else np.asarray(steps).reshape(-1).tolist()
    bound_syms = [ctx.sym(n) for n in node.input[1:3]]
    for s, e, k, st in zip(starts.tolist(), ends.tolist(), axes, steps, strict=True):
        a = x[k]
        if a is None:
            continue
        lo, hi, step = slice(int(s), int(e), int(st)).indices(len(a))
        if step != 1:  # kept positions would stop being evenly spaced after pruning
            ctx.freeze(a, ctx.why(node, f"slice with step {step}"))
        elif any((node.input[0], k) in el.dims for b in bound_syms if b for el in b.elems):
            _couple_chunks(ctx, node, a, hi - lo)
        for b in bound_syms:  # bounds read from another tensor's size: both must keep their size
            for t, j in {d for el in (b.elems if b else []) for d in el.dims if d != (node.input[0], k)}:
                ref = ctx.ax(t)
                if ref is not None and j < len(ref) and ref[j] is not None:
                    ctx.size_refs.append((np.array([], dtype=np.int64), [ref[j], a],
                                          ctx.why(node, "slice bounds read another tensor's size")))
        out[k] = a[lo:hi:step]
    ctx.set(node.output[0], out, node)


def _couple_chunks(ctx: Ctx, node, a: np.ndarray, chunk: int) -> None:
    """Bounds computed from the axis' own size (torch.chunk): every chunk must lose the same positions."""
    if chunk <= 0 or len(a) % chunk:
        ctx.freeze(a, ctx.why(node, "bounds computed from the axis size, uneven chunks"))
        return
    for r in range(1, len(a) // chunk):
        ctx.unify(a[:chunk], a[r * chunk:(r + 1) * chunk])


@rule("Gather")
def gather(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    idx_axes = ctx.ax(node.input[1])
    if x is None or idx_axes is None:
        return default_rule(ctx, node, "unknown input shape")
    axis = ctx.attr(node, "axis", 0)
    axis = axis + len(x) if axis < 0 else axis
    a = x[axis]
    idx = ctx.value(node.input[1])
    if a is None:
        mid = list(idx_axes)
    elif idx is not None:  # constant indices: output positions are the gathered input positions
        flat = np.asarray(idx).reshape(-1).astype(np.int64) % len(a)
        if idx.ndim == 0:
            ctx.freeze(a[flat], ctx.why(node, f"position {int(flat[0])} is selected by a constant index"))
            mid = []
        elif idx.ndim == 1:
            mid = [a[flat]]
        else:
            ctx.freeze(a, ctx.why(node, "multi-dimensional constant indices"))
            mid = ctx.fresh_axes(list(idx.shape))
            ctx.freeze_axes(mid, ctx.why(node, "multi-dimensional constant indices"))
    else:  # runtime indices (embedding lookup): the indexed axis cannot be pruned
        ctx.freeze(a, ctx.why(node, "indexed by runtime values"))
        mid = list(idx_axes)
        if axis == 0 and len(x) == 2:
            ctx.role(node.input[0], "embedding", node, out_axis=1)
    ctx.set(node.output[0], [*x[:axis], *mid, *x[axis + 1:]], node)


@rule("Expand")
def expand(ctx: Ctx, node) -> None:
    """Broadcast to a shape: a size-1 axis grown to n gets n fresh ids (copies, e.g. GQA's repeat_kv)."""
    x = ctx.ax(node.input[0])
    out_shape = ctx.ir.shape(node.output[0])
    target = ctx.sym(node.input[1])
    if x is None or (out_shape is None and target is None):
        return default_rule(ctx, node, "unknown shape")
    if target is not None:  # broadcast(input, target): a 1 or -1 in the target keeps the input's size
        rank = max(len(x), len(target.elems))
        out_shape = []
        for k in range(rank):
            j, t = k - (rank - len(x)), k - (rank - len(target.elems))
            n = len(x[j]) if j >= 0 and x[j] is not None else (1 if j < 0 else None)
            v = target.elems[t].value if t >= 0 else 1
            out_shape.append(n if v in (1, -1) or (n is not None and n > 1 and v is None) else
                             (v if n in (1, None) and v is not None and (n == 1 or v > 1) else n if v == n else v))
    rank = len(out_shape)
    out = []
    for k in range(rank):
        j = k - (rank - len(x))
        src = x[j] if j >= 0 else None
        size = out_shape[k]
        if src is not None and size is not None and len(src) == size:
            out.append(src)
        elif size is None:
            out.append(None)
        else:
            out.append(ctx.ids.fresh(size))
    ctx.refs_sizes(node, node.input[1], out)
    ctx.set(node.output[0], out, node)


@rule("Tile")
def tile(ctx: Ctx, node) -> None:
    x, reps = ctx.ax(node.input[0]), ctx.value(node.input[1])
    if x is None or reps is None:
        return default_rule(ctx, node, "repeats are not constant")
    out = [None if a is None else np.tile(a, int(r)) for a, r in zip(x, reps.reshape(-1).tolist(), strict=True)]
    ctx.set(node.output[0], out, node)


@rule("Pad")
def pad(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    pads = ctx.attr(node, "pads")
    if pads is None and len(node.input) > 1:
        v = ctx.value(node.input[1])
        pads = None if v is None else v.reshape(-1).tolist()
    if x is None or pads is None or (len(node.input) > 3 and node.input[3]):
        return default_rule(ctx, node, "pads are not constant")
    out = ctx.fresh_axes(ctx.ir.shape(node.output[0])) or [None] * len(x)
    for k, a in enumerate(x):
        if pads[k] == 0 and pads[k + len(x)] == 0:
            out[k] = a
        else:
            ctx.freeze(a, ctx.why(node, "padded axis"))
            ctx.freeze(out[k], ctx.why(node, "padded axis"))
    ctx.set(node.output[0], out, node)


@rule("Constant")
def constant(ctx: Ctx, node) -> None:
    """Constants get their ids lazily, when an op uses them."""


@rule("Shape")
def shape(ctx: Ctx, node) -> None:
    """Shape values are tracked as shape arithmetic (compressor.graph.symbolic); here only the ids."""
    default_rule_out(ctx, node, node.output[0])


@rule("ConstantOfShape", "Range", "EyeLike")
def fresh_output(ctx: Ctx, node) -> None:
    """Outputs whose sizes come from integer inputs: fresh ids; an axis sized by Shape(t)[k] of a static axis
    shares t's ids, so both shrink together."""
    shp = ctx.ir.shape(node.output[0])
    s = ctx.sym(node.input[0]) if node.op_type == "ConstantOfShape" else None
    out = ctx.fresh_axes(shp)
    if out is not None and s is not None and len(s.elems) == len(out):
        for k, e in enumerate(s.elems):
            if e.expr[0] == "d":
                ref = ctx.ax(e.expr[1])
                if ref is not None and ref[e.expr[2]] is not None and out[k] is not None and \
                        len(ref[e.expr[2]]) == len(out[k]):
                    out[k] = ref[e.expr[2]]
    if node.op_type == "ConstantOfShape":
        ctx.refs_sizes(node, node.input[0], out)
    ctx.set(node.output[0], out, node)


# ------------------------------------------------------------------------------------------ reshape
def _segments(sizes: list) -> list[list[int]]:
    """Split axis indices into runs of static axes separated by dynamic ones."""
    runs, cur = [], []
    for k, s in enumerate(sizes):
        if s is None:
            runs.append(cur)
            cur = []
        else:
            cur.append(k)
    runs.append(cur)
    return runs


def _refine(a: list[int], b: list[int]) -> list[int] | None:
    """Common refinement of two factorisations of one number (None if they interleave)."""
    ca = list(itertools.accumulate(a, operator.mul))
    cb = list(itertools.accumulate(b, operator.mul))
    if (ca[-1] if ca else 1) != (cb[-1] if cb else 1):
        return None
    pts = sorted({int(v) for v in ca + cb})
    pieces, prev = [], 1
    for p in pts:
        if p % prev:
            return None
        pieces.append(p // prev)
        prev = p
    return pieces


def reshape_run(ctx: Ctx, node, xin: list, sin: list[int], sout: list[int]) -> list | None:
    """Map one run of static axes (sizes sin) onto output sizes sout: a split makes each input id composite
    of piece ids, a merge makes fresh composite ids. Size-1 axes carry nothing and are frozen."""
    if sin == sout and all(s > 1 for s in sin):  # nothing regrouped (the general path gives the same)
        return list(xin)
    keep_in = [k for k, s in enumerate(sin) if s > 1]
    keep_out = [k for k, s in enumerate(sout) if s > 1]
    pieces = _refine([sin[k] for k in keep_in], [sout[k] for k in keep_out])
    if pieces is None:
        return None
    why = ctx.why(node, "size-1 axis") if 1 in sin or 1 in sout else None
    for k, s in enumerate(sin):
        if s == 1:
            ctx.freeze(xin[k], why)
    arrays: list = [None] * len(pieces)
    pos = 0
    set_composite = ctx.ids.set_composite
    for k in keep_in:
        n, start = 1, pos
        while n < sin[k]:
            n *= pieces[pos]
            pos += 1
        if pos - start == 1:
            arrays[start] = xin[k]
            continue
        parts = [ctx.ids.fresh(pieces[i]) for i in range(start, pos)]
        arrays[start:pos] = parts
        # position p of the input axis is (part ids at p's row-major multi-index), as numpy lays it out
        for e, tup in zip(xin[k].tolist(), itertools.product(*(p.tolist() for p in parts)), strict=True):
            set_composite(e, tup)
        ctx.factorised.append((node, xin[k]))
    out: list = [None] * len(sout)
    pos = 0
    for k in range(len(sout)):
        if sout[k] == 1:
            out[k] = ctx.ids.fresh(1)
            ctx.freeze(out[k], why)
            continue
        n, start = 1, pos
        while n < sout[k]:
            n *= pieces[pos]
            pos += 1
        if pos - start == 1:
            out[k] = arrays[start]
            continue
        fresh = ctx.ids.fresh(sout[k])
        ctx.ids.set_composite_fresh(fresh, itertools.product(*(arrays[i].tolist() for i in range(start, pos))))
        ctx.factorised.append((node, fresh))
        out[k] = fresh
    return out


def reshape_axes(ctx: Ctx, node, x: list, sizes_in: list, sizes_out: list) -> list | None:
    """Align runs of static axes between dynamic ones (k-th dynamic in ↔ k-th dynamic out)."""
    rin, rout = _segments(sizes_in), _segments(sizes_out)
    out: list = [None] * len(sizes_out)
    if len(rin) != len(rout):  # dynamic dims merged or split: only the trailing static runs can be aligned
        rin, rout = rin[-1:], rout[-1:]
        lead_in = [k for r in _segments(sizes_in)[:-1] for k in r]
        lead_out = [k for r in _segments(sizes_out)[:-1] for k in r]
        why = ctx.why(node, "merged with a dynamic axis")
        for k in lead_in:
            ctx.freeze(x[k], why)
        for k in lead_out:
            out[k] = ctx.ids.fresh(sizes_out[k])
            ctx.freeze(out[k], why)
    for ri, ro in zip(rin, rout, strict=True):
        if not ri and not ro:  # two dynamic axes side by side: nothing between them
            continue
        got = reshape_run(ctx, node, [x[k] for k in ri], [sizes_in[k] for k in ri], [sizes_out[k] for k in ro])
        if got is None:  # e.g. [B, S, 64] -> [B*S, 64]: align the longest common trailing product
            ci = list(itertools.accumulate([sizes_in[k] for k in reversed(ri)], operator.mul))
            co = list(itertools.accumulate([sizes_out[k] for k in reversed(ro)], operator.mul))
            common = [v for v in ci if v in co]
            if common:
                ni, no = ci.index(common[-1]) + 1, co.index(common[-1]) + 1
                tail = reshape_run(ctx, node, [x[k] for k in ri[-ni:]], [sizes_in[k] for k in ri[-ni:]],
                                   [sizes_out[k] for k in ro[-no:]])
                if tail is not None:
                    why = ctx.why(node, "merged with a dynamic axis")
                    for k in ri[:-ni]:
                        ctx.freeze(x[k], why)
                    for k in ro[:-no]:
                        out[k] = ctx.ids.fresh(sizes_out[k])
                        ctx.freeze(out[k], why)
                    for k, a in zip(ro[-no:], tail, strict=True):
                        out[k] = a
                    continue
        if got is None:
            why = ctx.why(node, "reshape regroups axes that do not nest")
            for k in ri:
                ctx.freeze(x[k], why)
            for k in ro:
                out[k] = ctx.ids.fresh(sizes_out[k])
                ctx.freeze(out[k], why)
            continue
        for k, a in zip(ro, got, strict=True):
            out[k] = a
    return out


@rule("Reshape")
def reshape(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    sin = ctx.size(node.input[0])
    target = ctx.sym(node.input[1])
    inferred = ctx.ir.shape(node.output[0])
    if x is None or (target is None and inferred is None):
        return default_rule(ctx, node, "unknown shape")
    if target is not None:
        sout = []
        for k, e in enumerate(target.elems):
            v = e.value
            if v == 0 and not ctx.attr(node, "allowzero", 0):
                v = sin[k]
            sout.append(v)
        if inferred is not None and len(inferred) == len(sout):
            sout = [i if s is None else s for s, i in zip(sout, inferred, strict=True)]
        if -1 in sout:
            known = [s for s in sout if s not in (None, -1)]
            n_dyn_in = sum(s is None for s in sin)
            if n_dyn_in == sum(s is None for s in sout) and all(s is not None for s in known):
                rest = math.prod(s for s in sin if s is not None)
                div = math.prod(known)
                sout = [rest // div if s == -1 else s for s in sout] if div and rest % div == 0 else \
                    [None if s == -1 else s for s in sout]
            else:
                sout = [None if s == -1 else s for s in sout]
        if inferred is not None and len(inferred) == len(sout):
            sout = [i if s is None else s for s, i in zip(sout, inferred, strict=True)]
    else:
        sout = inferred
    out = reshape_axes(ctx, node, x, sin, sout)
    ctx.refs_sizes(node, node.input[1], out)
    ctx.set(node.output[0], out, node)


@rule("Flatten")
def flatten(ctx: Ctx, node) -> None:
    x = ctx.ax(node.input[0])
    if x is None:
        return default_rule(ctx, node, "unknown input shape")
    sin = ctx.size(node.input[0])
    axis = ctx.attr(node, "axis", 1)
    axis = axis + len(x) if axis < 0 else axis

    def prod(s):
        return None if any(v is None for v in s) else math.prod(s)

    sout = [prod(sin[:axis]), prod(sin[axis:])]
    out = reshape_axes(ctx, node, x, sin, sout)
    ctx.set(node.output[0], out, node)
