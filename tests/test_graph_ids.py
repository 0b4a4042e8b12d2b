"""Property test: the array-based channel-id code agrees with the recursive code it replaced.

compressor/graph/ids.py was rewritten for speed: `ChannelIds.union_arrays` inlines the union, and
`AtomLookup` (ChannelIds.atom_lookup()) flattens nested composite ids with numpy instead of recursing, and
marks the composites nested more than 32 levels deep (the cyclic ones) as `deep` so that they keep the old
behaviour: `ChannelIds.atoms()` raised RecursionError for them; the analyser read them as their own root.
No model in the repository reaches a deep or cyclic composite, so this test builds random id forests that
do: fresh ids, unions (one by one and through union_arrays), composites set one by one and in fresh batches,
nested composites, chains of composites just above and below the depth limit, and composites of themselves.
Every operation is applied both to the new `ChannelIds` and to `_RefIds`, the implementation before the
rewrite (commit e66fb2a, copied below), and at random points the two are compared on every id:

- roots and composite table are the same, and `conflicts` name the same classes (not always the same ids:
  union_arrays records the two roots where the reference recorded the ids it was given);
- `AtomLookup.many(arr, safe=True)` gives the reference atoms, or `(root,)` where the reference raises;
  `safe=False` and `check` raise RecursionError exactly where the reference does;
- `expand` gives those atoms concatenated with their counts; `deep` / `deep_ids` / `plain` say the same;
- `survivors(removed)` is True exactly for the ids none of whose (safe) atoms is removed (Plan.keep);
- the lookup is reused while the ids are unchanged and rebuilt after a change.

A second test checks analysis._reasons (frozen / approx reasons per atom, with the switch to the cyclic
reason part-way through an array) against the loops build() had before the rewrite.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from compressor.graph.analysis import _reasons
from compressor.graph.ids import ChannelIds

pytest.importorskip("hypothesis", reason="hypothesis (the dev extra) is not installed")
from hypothesis import given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CYCLIC = "cyclic reshape factorisation"


class _RefIds:
    """ChannelIds as of e66fb2a (the recursive reference): union-find, composites, atoms()."""

    def __init__(self):
        self.parent: list[int] = []
        self.comp: dict[int, tuple[int, ...]] = {}
        self.conflicts: list[tuple[int, int]] = []

    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        ca, cb = self.comp.pop(ra, None), self.comp.pop(rb, None)
        self.parent[rb] = ra
        if ca is not None and cb is not None:
            if len(ca) != len(cb):
                self.comp[ra] = ca
                self.conflicts.append((a, b))
                return
            self.comp[ra] = ca
            for x, y in zip(ca, cb, strict=True):
                self.union(x, y)
        elif ca is not None or cb is not None:
            self.comp[ra] = ca if ca is not None else cb

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            if x != y:
                self.union(x, y)

    def set_composite(self, e: int, parts: tuple[int, ...]) -> None:
        r = self.find(e)
        old = self.comp.get(r)
        if old is None:
            self.comp[r] = tuple(parts)
        elif len(old) != len(parts):
            self.conflicts.append((e, parts[0]))
        else:
            for x, y in zip(old, parts, strict=True):
                self.union(x, y)

    def atoms(self, e: int) -> tuple[int, ...]:
        return self._expand(self.find(e), 0)  # (the memo of the original changes nothing here)

    def _expand(self, r: int, depth: int) -> tuple[int, ...]:
        if depth > 32:
            raise RecursionError("cyclic composite channel id")
        c = self.comp.get(r)
        if c is None:
            return (r,)
        out: tuple[int, ...] = ()
        for x in c:
            out += self._expand(self.find(x), depth + 1)
        return out


class _Both:
    """Applies every operation to the new ChannelIds and to the reference alike (and notes it for a failure)."""

    def __init__(self):
        self.new, self.ref = ChannelIds(), _RefIds()

    @property
    def n(self) -> int:
        return len(self.ref.parent)

    def fresh(self, k: int) -> np.ndarray:
        a, b = self.new.fresh(k), self.ref.fresh(k)
        assert np.array_equal(a, b)
        note(f"fresh({k}) -> {a.tolist()}")
        return a

    def union(self, a: int, b: int) -> None:
        note(f"union({a}, {b})")
        self.new.union(a, b)
        self.ref.union(a, b)

    def union_arrays(self, a: list[int], b: list[int]) -> None:
        note(f"union_arrays({a}, {b})")
        self.new.union_arrays(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64))
        self.ref.union_arrays(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64))

    def set_composite(self, e: int, parts: tuple[int, ...]) -> None:
        note(f"set_composite({e}, {parts})")
        self.new.set_composite(e, parts)
        self.ref.set_composite(e, parts)

    def composite_batch(self, parts: list[tuple[int, ...]]) -> np.ndarray:
        """fresh ids, each made composite of its parts (parts may name the new ids themselves: -1 - i)."""
        ids = self.fresh(len(parts))
        parts = [tuple(int(ids[-1 - x]) if x < 0 else x for x in p) for p in parts]
        note(f"set_composite_fresh({ids.tolist()}, {parts})")
        self.new.set_composite_fresh(ids, iter(parts))  # any iterable, as rules.py passes itertools.product
        for e, p in zip(ids.tolist(), parts, strict=True):
            self.ref.set_composite(e, p)
        return ids


def _random_ops(rng: random.Random, both: _Both, check) -> None:
    """A random sequence of operations; `check()` is called at random points and at the end."""
    both.fresh(rng.randint(2, 6))
    hot: list[int] = []  # ids made composite: preferred as parts and union partners (nesting, cycles)

    def pick() -> int:
        return rng.choice(hot) if hot and rng.random() < 0.4 else rng.randrange(both.n)

    for _ in range(rng.randint(1, 30)):
        op = rng.random()
        if op < 0.12:
            both.fresh(rng.randint(1, 6))
        elif op < 0.30:
            both.union(pick(), pick())
        elif op < 0.42:
            k = rng.randint(0, 8)
            a = [pick() for _ in range(k)]
            b = [x if rng.random() < 0.15 else pick() for x in a]  # some pairs equal
            both.union_arrays(a, b)
        elif op < 0.60:
            e = pick()
            parts = tuple(pick() for _ in range(rng.randint(1, 3)))
            if rng.random() < 0.2:  # cyclic: a composite of something containing itself
                parts = parts[:-1] + (e,)
            both.set_composite(e, parts)
            hot.append(e)
        elif op < 0.75:  # a reshape-like batch: fresh ids composite of existing (or batch-mate) ids
            width = rng.randint(1, 3)
            k = rng.randint(1, 6)
            pool = list(range(both.n))
            parts = [tuple(rng.choice(pool) if rng.random() < 0.9 else -1 - rng.randrange(k)
                           for _ in range(width)) for _ in range(k)]
            hot.extend(both.composite_batch(parts).tolist())
        elif op < 0.90:  # a chain c[i] = (c[i-1], ...) around the depth limit (33 levels raise)
            length = rng.choice([1, 2, 31, 32, 33, 34, 40])
            base = pick()
            extra = [pick() for _ in range(rng.randint(0, 1))]
            if rng.random() < 0.5:  # in one fresh batch: ids[j] = (ids[j-1], *extra), ids[j-1] written -j
                first = -length if rng.random() < 0.3 else base  # -length: the last link, a cycle through all
                ids = both.composite_batch([(first, *extra)] + [(-j, *extra) for j in range(1, length)])
            else:
                ids = both.fresh(length)
                prev = base
                for e in ids.tolist():
                    both.set_composite(e, (prev, *extra))
                    prev = e
            hot.extend(rng.sample(ids.tolist(), min(3, length)))
        else:
            check()
    check()


def _expected(ref: _RefIds) -> list[tuple[int, ...] | None]:
    """Per id: the reference atoms, or None where the reference raises RecursionError."""
    out = []
    for e in range(len(ref.parent)):
        try:
            out.append(ref.atoms(e))
        except RecursionError:
            out.append(None)
    return out


def _compare(both: _Both, rng: random.Random) -> None:
    new, ref, n = both.new, both.ref, both.n
    assert len(new.parent) == n
    assert new.comp == ref.comp
    roots = [ref.find(e) for e in range(n)]
    # conflicts: the same classes, pair by pair. Not the same ids: where union_arrays meets two composite
    # roots it calls union(root_x, root_y), so the pair names the roots where the reference named x and y
    # (build() freezes the pair's atoms: the same either way).
    assert [(roots[a], roots[b]) for a, b in new.conflicts] == [(roots[a], roots[b]) for a, b in ref.conflicts]
    exp = _expected(ref)
    safe = [a if a is not None else (r,) for a, r in zip(exp, roots, strict=True)]
    raises = np.array([a is None for a in exp], dtype=bool)

    look = new.atom_lookup()
    assert new.atom_lookup() is look  # no change since: reused
    assert look.roots.tolist() == roots
    assert look.plain == (not ref.comp)
    assert np.array_equal(look.deep[look.roots], raises)
    assert not look.deep[~np.isin(np.arange(n), roots)].any()  # deep is read at roots only
    assert (look.deep_ids is None) == (not raises.any())
    if look.deep_ids is not None:
        assert np.array_equal(look.deep_ids, raises)

    every = np.arange(n, dtype=np.int64)
    assert look.many(every) == safe
    for e in range(n):  # safe=False / check / ChannelIds.atoms() raise exactly where the reference raises
        arr = every[e:e + 1]
        if raises[e]:
            with pytest.raises(RecursionError):
                look.many(arr, safe=False)
            with pytest.raises(RecursionError):
                look.check(arr)
            with pytest.raises(RecursionError):
                new.atoms(e)
        else:
            assert look.many(arr, safe=False) == [exp[e]]
            look.check(arr)
            assert new.atoms(e) == exp[e]

    arrays = [every, every[:0], every[::-1]]
    arrays += [np.array([rng.randrange(n) for _ in range(rng.randint(1, 12))], dtype=np.int64) for _ in range(4)]
    for arr in arrays:  # any order, repeats, empty
        want = [safe[e] for e in arr.tolist()]
        assert look.many(arr, safe=True) == want
        flat, cnt = look.expand(arr)
        assert flat.tolist() == [a for t in want for a in t]
        assert cnt.tolist() == [len(t) for t in want]
        if raises[arr].any():
            with pytest.raises(RecursionError):
                look.many(arr, safe=False)
            with pytest.raises(RecursionError):
                look.expand(arr, safe=False)
            with pytest.raises(RecursionError):
                look.check(arr)
        else:
            assert look.many(arr, safe=False) == want
            look.check(arr)

    for p in (0.0, 0.1, 0.4):  # Plan.keep: a position survives when none of its atoms is removed
        removed = np.array([rng.random() < p for _ in range(n)], dtype=bool)
        alive = look.survivors(removed)
        assert alive.tolist() == [not removed[list(t)].any() for t in safe]


settings_ = settings(max_examples=150, derandomize=True, deadline=None)


@settings_
@given(st.randoms(use_true_random=False))
def test_atom_lookup_matches_recursive_reference(rng):
    both = _Both()
    _random_ops(rng, both, lambda: _compare(both, rng))
    look = both.new.atom_lookup()
    both.new.fresh(1)  # any change: a new lookup
    assert both.new.atom_lookup() is not look


def _ref_reasons(ref: _RefIds, entries, cap: int, cyclic: bool) -> dict[int, list[str]]:
    """build()'s loops before the rewrite: per atom its first `cap` distinct reasons, in entry order; with
    `cyclic`, from an array's first cyclic composite on its reason becomes CYCLIC (the composite reads as its
    root). Without, a cyclic composite reads as its root, the reason unchanged."""
    out: dict[int, list[str]] = {}
    for arr, reason in entries:
        for e in arr.tolist():
            try:
                ats = ref.atoms(e)
            except RecursionError:
                ats = (ref.find(e),)
                if cyclic:
                    reason = CYCLIC
            for a in ats:
                rs = out.setdefault(a, [])
                if reason not in rs and len(rs) < cap:
                    rs.append(reason)
    return out


@settings_
@given(st.randoms(use_true_random=False))
def test_reasons_match_reference(rng):
    both = _Both()
    _random_ops(rng, both, lambda: None)
    n = both.n
    texts = ["a", "b", "c", "d", "e", CYCLIC]
    entries = [(np.array([rng.randrange(n) for _ in range(rng.randint(1, 10))], dtype=np.int64),
                rng.choice(texts[:-1]) if rng.random() < 0.9 else CYCLIC)
               for _ in range(rng.randint(0, 12))]
    rank = np.full(n, -1, dtype=np.int64)
    ranked = rng.sample(range(n), rng.randint(0, n))
    rank[ranked] = np.arange(len(ranked))
    look = both.new.atom_lookup()
    for cap, cyclic in ((4, CYCLIC), (3, None), (1, CYCLIC)):
        ref = _ref_reasons(both.ref, entries, cap, cyclic is not None)
        want = [(int(rank[a]), r) for a in ranked for r in ref.get(a, [])]
        got = _reasons(look, entries, rank, cap, cyclic)
        assert list(zip(*got, strict=True)) == want
