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
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            if x != y:
                self.union(x, y)

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
