"""Whole attention heads, chosen per attention block so that the kept head layout is one the model accepts.

A reshaped axis such as Q's (kv heads, query heads per kv head, head_dim) gives one "heads" group per outer
factor (slots 0, 1, ... of the same root axis); removing atoms from several slots keeps the product of the
kept slot sizes as heads (2 of 4 KV groups × 6 of 8 query heads = 12 heads). So the ratio is applied to that
product, not to each slot: the kept head count is the one nearest to heads × (1 - ratio) among the layouts
that are possible (whole atoms, frozen/protected atoms kept, at most `max_layer_ratio` removed, at least one
head) and that `rule` accepts. Ties: the larger count (prefer keeping more heads). Blocks of the same slot
sizes (the layers of one model) share one layout, since a config holds one head count for every layer: among
the layouts of the chosen count, the one whose kept atoms carry the largest share of each slot's importance
(product over slots, summed over the blocks), then the one with more atoms kept in the outer slot (more KV
heads). Inside each slot of each block its least important candidates go. Head counts take no `round_to`: a kept width is heads × head_dim, and head_dim (its own
group) is what rounding keeps a multiple.

rule(kept, sizes) -> why this layout cannot be written (one line), or None: the model's own constraint (for a
Hugging Face model, what transformers' config validation accepts: compressor.checkpoint.hfconfig.head_rule).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from compressor.graph.analysis import Group

HeadRule = Callable[[tuple[int, ...], tuple[int, ...]], "str | None"]


def blocks(groups: list[Group]) -> list[list[Group]]:
    """The heads groups by attention block (same root axis), each block in slot order."""
    by_root: dict[str, list[tuple[int, Group]]] = {}
    for g in groups:
        if g.kind == "heads":
            root, _, slot = g.name.rpartition("/")
            by_root.setdefault(root, []).append((int(slot) if slot.isdigit() else 0, g))
    return [[g for _, g in sorted(v, key=lambda t: t[0])] for v in by_root.values()]


def _share(g: Group, cand: list[int], scores: np.ndarray, keep: int) -> float:
    """Fraction of the slot's importance kept when its `size - keep` least important candidates go."""
    if keep == g.size:
        return 1.0
    pos = {a: i for i, a in enumerate(g.atoms)}
    vals = np.abs(np.asarray(scores, dtype=np.float64))
    total = float(vals.sum())
    gone = sorted(vals[pos[a]] for a in cand)[: g.size - keep]
    return (total - float(sum(gone))) / total if total > 0 else keep / g.size


def _choose(layouts: list[tuple[int, ...]], target: float) -> int | None:
    """The head count nearest to `target` among the layouts' products; ties go to the larger count."""
    counts = {int(np.prod(k)) for k in layouts}
    return max(counts, key=lambda n: (-abs(n - target), n)) if counts else None


def select_blocks(blocks_: list[list[Group]], cands: dict[int, list[int]], scores: dict[int, np.ndarray], ratio: float,
                  max_layer_ratio: float, rule: HeadRule | None) -> tuple[dict[int, list[int]], list[dict]]:
    """({group id: removed atoms}, per block what was asked and kept). Blocks of the same slot sizes (the layers
    of one model) get one layout, since a config holds one head and one KV head count for every layer; its
    importance is the sum of the blocks' kept shares."""
    removed: dict[int, list[int]] = {}
    infos = []
    by_sizes: dict[tuple[int, ...], list[list[Group]]] = {}
    for b in blocks_:
        by_sizes.setdefault(tuple(g.size for g in b), []).append(b)
    for sizes, same in by_sizes.items():
        total = int(np.prod(sizes))
        target = total * (1 - ratio)
        free = [min(min(len(cands[b[i].id]) for b in same), n - 1) for i, n in enumerate(sizes)]  # every block can give
        ranges = [range(n, n - f - 1, -1) for n, f in zip(sizes, free, strict=True)]
        possible = [k for k in itertools.product(*ranges)
                    if 1 - np.prod(k) / total <= max_layer_ratio + 1e-9]  # all-kept is always possible
        why = {k: (rule(k, sizes) if rule is not None and k != sizes else None) for k in possible}
        valid = [k for k in possible if why[k] is None]
        count = _choose(valid, target)
        shares = {k: sum(float(np.prod([_share(g, cands[g.id], scores[g.id], n) for g, n in zip(b, k, strict=True)]))
                         for b in same) for k in valid if np.prod(k) == count}
        kept = max(shares, key=lambda k: (shares[k], k))
        unconstrained = _choose(possible, target)  # what the ratio alone would give
        because = None
        if unconstrained != count:
            because = next(why[k] for k in possible if np.prod(k) == unconstrained and why[k])
        for b in same:
            for g, n in zip(b, kept, strict=True):
                pos = {a: i for i, a in enumerate(g.atoms)}
                removed[g.id] = sorted(cands[g.id], key=lambda a, g=g, pos=pos: (scores[g.id][pos[a]], pos[a]))[: g.size - n]
            infos.append({"heads": total, "asked": target, "kept": count, "slots": list(sizes), "kept_slots": list(kept),
                          "why": because})
    return removed, infos


def summary(infos: list[dict], ratio: float) -> dict | None:
    """The report's `heads` entry: asked vs achieved head ratio over every block, and one line saying why."""
    if not infos:
        return None
    before, after = sum(i["heads"] for i in infos), sum(i["kept"] for i in infos)
    achieved = 1 - after / before
    first = infos[0]
    same = all((i["heads"], i["kept"]) == (first["heads"], first["kept"]) for i in infos)
    if same:
        per = " per block" + (f", {len(infos)} blocks" if len(infos) > 1 else "")
        asked, kept = f"{first['asked']:.3g} of {first['heads']}{per}", f"{first['kept']}"
    else:
        asked, kept = f"{before * (1 - ratio):.3g} of {before} in {len(infos)} blocks", f"{after}"
    reasons = list(dict.fromkeys(i["why"] for i in infos if i["why"]))
    because = f"; {reasons[0]}" if reasons else ""
    line = f"heads: {ratio:.0%} asked ({asked}){because}; kept {kept} ({achieved:.0%} removed)"
    return {"asked_ratio": ratio, "achieved_ratio": round(achieved, 6), "heads_before": before, "heads_after": after,
            "blocks": len(infos), "reasons": reasons, "note": line}
