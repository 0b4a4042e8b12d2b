"""The list-based layout fast paths of compressor.graph.symbolic move Syms exactly as numpy moves elements
(the general path): same shape, same Sym objects in the same order, or the same refusal."""

from __future__ import annotations

import pytest

from compressor.graph import symbolic as S

pytest.importorskip("hypothesis", reason="hypothesis (the dev extra) is not installed")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class _Node:
    def __init__(self, op: str, attrs: dict):
        self.op_type, self.attrs, self.input = op, attrs, ["x"]


def _attr(node, name, default=None):
    return node.attrs.get(name, default)


def _tensor(shape: tuple[int, ...], tag: str) -> S.SymTensor:
    n = 1
    for s in shape:
        n *= s
    return S.SymTensor(shape, [S.Sym(i, ("c", tag, i)) for i in range(n)])


def _ints(values: list[int] | None) -> S.SymTensor | None:
    return None if values is None else S.SymTensor((len(values),), [S.Sym(v, ("c", "p", i)) for i, v in enumerate(values)])


def _outcome(fn, *args):
    try:
        t = fn(*args)
    except Exception as e:  # the fast path must refuse what numpy refuses, the same way
        return type(e).__name__
    return None if t is None else (tuple(t.shape), [id(e) for e in t.elems])


shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
small = st.integers(-4, 4)


@settings(max_examples=400, deadline=None)
@given(op=st.sampled_from(["Unsqueeze", "Squeeze", "Reshape", "Concat", "Gather", "Slice"]), shape=shapes,
       a=st.lists(small, min_size=0, max_size=3), b=st.lists(small, min_size=0, max_size=3),
       c=st.one_of(st.none(), st.lists(small, min_size=0, max_size=3)), axis=st.integers(-2, 1),
       d=st.one_of(st.none(), st.lists(small, min_size=0, max_size=3)), as_attr=st.booleans(), shape2=shapes)
def test_layout_fast_paths_match_numpy(op, shape, a, b, c, d, axis, as_attr, shape2):
    x = _tensor(shape, "x")
    attrs: dict = {}
    if op in ("Unsqueeze", "Squeeze"):
        ins = [x] if as_attr else [x, _ints(a)]
        if as_attr:
            attrs["axes"] = a
    elif op == "Reshape":
        ins = [x, _ints(a)]
    elif op == "Concat":
        ins = [x, _tensor(shape2, "y")]
        attrs["axis"] = axis
    elif op == "Gather":
        ins = [x, S.SymTensor((), [S.Sym(a[0], ("c", "i", 0))]) if as_attr and a else _ints(a)]
        attrs["axis"] = axis
    else:
        ins = [x, _ints(a), _ints(b), _ints(c), _ints(d)]  # starts, ends, axes, steps
    node = _Node(op, attrs)
    fast = _outcome(S._EVAL[op], node, ins, None, _attr)
    ref = _outcome(S._numpy_layout, node, ins, _attr)
    assert fast == ref


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 4), k=st.integers(1, 2), data=st.data())
def test_flat_slice_matches_numpy(n, k, data):
    """torch's Pad export flips its pads with negative-step slices: bounds past either end included."""
    bound = st.lists(st.integers(-6, 6), min_size=k, max_size=k)
    steps = data.draw(st.one_of(st.none(), st.lists(st.sampled_from([-2, -1, 1, 2]), min_size=k, max_size=k)))
    axes = data.draw(st.sampled_from([None, [0] * k, [-1] * k]))
    ins = [_tensor((n,), "x"), _ints(data.draw(bound)), _ints(data.draw(bound)), _ints(axes), _ints(steps)]
    node = _Node("Slice", {})
    assert _outcome(S._EVAL["Slice"], node, ins, None, _attr) == _outcome(S._numpy_layout, node, ins, _attr)
