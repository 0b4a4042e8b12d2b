"""Channel ids: union-find over integer ids, where an id may be *composite* (a tuple of other ids).

Every position of every static tensor axis carries an id. Ops unify ids that must be pruned together.
A reshape that splits a hidden axis of 768 into (12 heads, 64 dims) declares each of the 768 ids composite:
id[h*64 + d] = (head[h], dim[d]). A position is removed when *any* of its atoms is removed, so pruning a
head atom removes 64 positions and pruning a dim atom removes 12 (one per head): the removed set stays a
product set and the reshape stays valid. Atoms are the classes that are not composite.
"""

from __future__ import annotations

import itertools

import numpy as np


class ChannelIds:
    def __init__(self):
        self.parent: list[int] = []
        self.comp: dict[int, tuple[int, ...]] = {}  # root -> component ids (ordered, most significant first)
        self.conflicts: list[tuple[int, int]] = []  # pairs whose factorisations disagreed (caller freezes)
        self._atoms: dict[int, tuple[int, ...]] | None = None  # atoms() memo; None after any change
        self._look: tuple[dict, AtomLookup] | None = None  # atom_lookup(), built for the memo of that time

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
        """union(x, y) for every pair, inlined but for two composite roots (their factors are unified too)."""
        p, comp, union = self.parent, self.comp, self.union
        self._atoms = None
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
            if ry in comp:
                if rx in comp:
                    union(rx, ry)
                    continue
                comp[rx] = comp.pop(ry)  # the composite keeps its factors under the new root
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

    def reachable(self, roots) -> np.ndarray:
        """Every id reachable from `roots` through composite factors (the roots included), as roots."""
        seen: set[int] = set()
        stack = [self.find(int(r)) for r in roots]
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            stack += [self.find(x) for x in self.comp.get(r, ())]
        return np.fromiter(seen, dtype=np.int64, count=len(seen))

    def root_array(self) -> np.ndarray:
        """find(x) for every id at once (pointer jumping on a copy; the forest itself is left as it is)."""
        r = np.array(self.parent, dtype=np.int64)
        while True:
            nxt = r[r]
            if np.array_equal(nxt, r):
                return r
            r = nxt

    def atom_lookup(self) -> AtomLookup:
        """atoms() of many positions at once, as arrays. Valid until the next union / fresh / set_composite:
        every change drops the atoms() memo, and the lookup is reused only while that memo is the same."""
        if self._atoms is None:
            self._atoms = {}
        if self._look is None or self._look[0] is not self._atoms:
            self._look = (self._atoms, AtomLookup(self))
        return self._look[1]

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
    """The atoms of every id as arrays, to read many positions at once after the walk (the ids are final).

    Root r stands for the atoms table[start[r] : start[r] + count[r]]: itself when it is not composite, else
    its factors' atoms with nested composites flattened, as ChannelIds.atoms() gives them. A root whose
    expansion nests more than 32 levels deep (a cyclic factorisation) is `deep`: atoms() raises for it, and
    here it reads as its own single atom, or raises where the caller asks for that (safe=False).
    """

    def __init__(self, ids: ChannelIds):
        self.ids = ids
        self.roots = ids.root_array()
        n = len(self.roots)
        self.count = np.ones(n, dtype=np.int64)
        self.start = np.arange(n, dtype=np.int64)
        self.table = self.start  # its first n entries: every id standing for itself
        self.deep = np.zeros(n, dtype=bool)
        self.deep_ids: np.ndarray | None = None  # deep[roots], where any root is deep
        self.plain = not ids.comp  # no composite at all: the atom of an id is its root
        if not self.plain:
            self._expand_composites()

    def _expand_composites(self) -> None:
        comp, n = self.ids.comp, len(self.roots)  # comp is keyed by roots only (union moves it to the new root)
        keys = np.fromiter(comp, dtype=np.int64, count=len(comp))
        lens = np.fromiter(map(len, comp.values()), dtype=np.int64, count=len(comp))
        flat = itertools.chain.from_iterable(comp.values())
        factors = self.roots[np.fromiter(flat, dtype=np.int64, count=int(lens.sum()))]  # every key's factors
        first = np.cumsum(lens) - lens  # where each key's factors begin
        slot = np.full(n, -1, dtype=np.int64)  # composite root -> its index in keys
        slot[keys] = np.arange(len(keys))
        owner = np.repeat(np.arange(len(keys)), lens)
        parts = factors
        child = slot[parts]
        deep = np.zeros(len(keys), dtype=bool)
        if (child >= 0).any():  # nested factorisations: drop the ones nesting too deep, flatten the others
            deep = _heights(child, owner, len(keys)) > 32
            keep = ~deep[owner]
            owner, parts, child = owner[keep], parts[keep], child[keep]
            while (nested := child >= 0).any():  # replace every composite part by its factors, order kept
                cnt = np.where(nested, lens[child], 1)
                src = np.repeat(np.arange(len(parts)), cnt)
                within = np.arange(len(src)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
                sub = child[src]
                parts, owner = parts[src], owner[src]
                m = sub >= 0
                parts[m] = factors[first[sub[m]] + within[m]]
                child = slot[parts]
        counts = np.bincount(owner, minlength=len(keys))
        shallow = ~deep
        self.count[keys[shallow]] = counts[shallow]
        self.start[keys[shallow]] = n + (np.cumsum(counts) - counts)[shallow]
        self.table = np.concatenate([np.arange(n, dtype=np.int64), parts])
        if deep.any():
            self.deep[keys[deep]] = True
            self.deep_ids = self.deep[self.roots]

    def expand(self, arr: np.ndarray, safe: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(atoms, counts): the atoms of every position of `arr` in order, concatenated, and how many each has.
        safe=False: RecursionError for a deep (cyclic) composite, like ChannelIds.atoms()."""
        r = self.roots[arr]
        if not safe:
            self.check(arr)
        cnt = self.count[r]
        if self.plain:
            return r, cnt
        ends = np.cumsum(cnt)
        idx = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(self.start[r] - (ends - cnt), cnt)
        return self.table[idx], cnt

    def check(self, arr: np.ndarray) -> None:
        """RecursionError when `arr` holds a deep (cyclic) composite, as ChannelIds.atoms() would raise."""
        if self.deep_ids is not None and self.deep_ids[arr].any():
            raise RecursionError("cyclic composite channel id")

    def survivors(self, removed: np.ndarray) -> np.ndarray:
        """Per id: whether none of its atoms is removed (`removed`: a mask over the ids)."""
        if self.plain:
            return ~removed[self.roots]
        below = np.concatenate([[0], np.cumsum(removed[self.table])])  # removed table entries before each
        return (below[self.start + self.count] == below[self.start])[self.roots]

    def many(self, arr: np.ndarray, safe: bool = True) -> list[tuple[int, ...]]:
        """[atoms(e) for e in arr]; safe: a cyclic composite gives (root,) instead of raising."""
        flat, cnt = self.expand(arr, safe)
        return split_tuples(flat, cnt)


def split_tuples(flat: np.ndarray, counts: np.ndarray) -> list[tuple[int, ...]]:
    """The ragged rows (counts[i] values each, concatenated in `flat`) as a list of tuples."""
    if not len(counts):
        return []
    k = int(counts[0])
    if (counts == k).all():
        return list(map(tuple, flat.reshape(-1, k).tolist())) if k else [()] * len(counts)
    values, out, pos = flat.tolist(), [], 0
    for c in counts.tolist():
        out.append(tuple(values[pos:pos + c]))
        pos += c
    return out


def _heights(child: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Nesting height of every composite (1: its factors are atoms), capped at 33 (a cycle never settles).
    child: per factor, the index of the composite it is (-1 for an atom); owner: the composite it belongs to."""
    h = np.ones(n, dtype=np.int64)
    while True:
        new = np.ones(n, dtype=np.int64)
        np.maximum.at(new, owner, np.where(child >= 0, h[child], 0) + 1)
        np.minimum(new, 33, out=new)
        if np.array_equal(new, h):
            return h
        h = new
