"""Channel ids: union-find over integer ids, where an id may be *composite* (a tuple of other ids).

Every position of every static tensor axis carries an id. Ops unify ids that must be pruned together.
A reshape that splits a hidden axis of 768 into (12 heads, 64 dims) declares each of the 768 ids composite:
id[h*64 + d] = (head[h], dim[d]). A position is removed when *any* of its atoms is removed, so pruning a
head atom removes 64 positions and pruning a dim atom removes 12 (one per head): the removed set stays a
product set and the reshape stays valid. Atoms are the classes that are not composite.
"""

from __future__ import annotations

import numpy as np


class ChannelIds:
    def __init__(self):
        self.parent: list[int] = []
        self.comp: dict[int, tuple[int, ...]] = {}  # root -> component ids (ordered, most significant first)
        self.conflicts: list[tuple[int, int]] = []  # pairs whose factorisations disagreed (caller freezes)
        self._atoms: dict[int, tuple[int, ...]] | None = None

    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self._atoms = None
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
        self._atoms = None
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
        """union(x, y) for every pair, with the common case (two plain, non-composite roots) inlined."""
        p, comp, union = self.parent, self.comp, self.union
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            if x == y:
                continue
            rx = x
            while p[rx] != rx:
                rx = p[rx]
            while p[x] != rx:
                p[x], x = rx, p[x]
            ry = y
            while p[ry] != ry:
                ry = p[ry]
            while p[y] != ry:
                p[y], y = ry, p[y]
            if rx == ry:
                continue
            if rx in comp or ry in comp:
                union(rx, ry)
                continue
            self._atoms = None
            p[ry] = rx

    def set_composite(self, e: int, parts: tuple[int, ...]) -> None:
        r = self.find(e)
        self._atoms = None
        old = self.comp.get(r)
        if old is None:
            self.comp[r] = tuple(parts)
        elif len(old) != len(parts):
            self.conflicts.append((e, parts[0]))
        else:
            for x, y in zip(old, parts, strict=True):
                self.union(x, y)

    def root_array(self) -> np.ndarray:
        """find(x) for every id at once (pointer jumping on a copy; the forest itself is left as it is)."""
        r = np.array(self.parent, dtype=np.int64)
        while True:
            nxt = r[r]
            if np.array_equal(nxt, r):
                return r
            r = nxt

    def atom_lookup(self):
        """A fast atoms(): (roots array, per-root cache) for reading many positions after the walk.
        Valid until the next union / fresh / set_composite."""
        return AtomLookup(self)

    def set_composite_fresh(self, ids: np.ndarray, parts) -> None:
        """set_composite(e, parts[i]) for ids just made by fresh() (their own roots, not yet composite)."""
        self._atoms = None
        self.comp.update(zip(ids.tolist(), parts, strict=True))

    def atoms(self, e: int) -> tuple[int, ...]:
        """The atom roots a position's id stands for (itself when not composite)."""
        if self._atoms is None:
            self._atoms = {}
        r = self.find(e)
        hit = self._atoms.get(r)
        if hit is not None:
            return hit
        out = self._expand(r, 0)
        self._atoms[r] = out
        return out

    def _expand(self, r: int, depth: int) -> tuple[int, ...]:
        if depth > 32:  # a cycle (x declared composite of something containing x): caller freezes
            raise RecursionError("cyclic composite channel id")
        c = self.comp.get(r)
        if c is None:
            return (r,)
        out: tuple[int, ...] = ()
        for x in c:
            out += self._expand(self.find(x), depth + 1)
        return out


class AtomLookup:
    """ids.atoms() for many positions at once, once the union-find no longer changes."""

    def __init__(self, ids: ChannelIds):
        self.ids = ids
        self.roots = ids.root_array()
        self._root = self.roots.tolist()
        self.cache: dict[int, tuple[int, ...]] = {}
        self._sub: dict[int, tuple[tuple[int, ...], int]] = {}  # composite root -> (atoms, nesting height)

    def root_atoms(self, r: int) -> tuple[int, ...]:
        """atoms() of a root id (RecursionError for a cyclic composite, like atoms())."""
        hit = self.cache.get(r)
        if hit is None:
            hit = self._expand(r, 0)[0] if r in self.ids.comp else (r,)
            self.cache[r] = hit
        return hit

    def _expand(self, r: int, depth: int) -> tuple[tuple[int, ...], int]:
        """ChannelIds._expand with memo: raises exactly where it would (depth + height > 32)."""
        if depth > 32:
            raise RecursionError("cyclic composite channel id")
        c = self.ids.comp.get(r)
        if c is None:
            return (r,), 0
        hit = self._sub.get(r)
        if hit is not None:
            if depth + hit[1] > 32:
                raise RecursionError("cyclic composite channel id")
            return hit
        if depth + 1 > 32:
            raise RecursionError("cyclic composite channel id")
        root, comp = self._root, self.ids.comp
        parts = [root[x] for x in c]
        if not any(p in comp for p in parts):  # one level: the parts are atoms
            hit = (tuple(parts), 1)
        else:
            out: tuple[int, ...] = ()
            h = 1
            for p in parts:
                got, hp = self._expand(p, depth + 1)
                out += got
                if hp + 1 > h:
                    h = hp + 1
            hit = (out, h)
        self._sub[r] = hit
        return hit

    def many(self, arr: np.ndarray, safe: bool = True) -> list[tuple[int, ...]]:
        """[atoms(e) for e in arr]; safe: a cyclic composite gives (root,) instead of raising."""
        cache, out = self.cache, []
        for r in self.roots[arr].tolist():
            hit = cache.get(r)
            if hit is None:
                try:
                    hit = self.root_atoms(r)
                except RecursionError:
                    if not safe:
                        raise
                    hit = (r,)  # not cached: a non-safe caller must still see the error
            out.append(hit)
        return out
