"""Choose which atoms to remove (docs/structured.md): local (each group its own scope) or global (one threshold over
normalised scores), `round_to`, a per-group cap, and a target by ratio of channels or of MACs.

Protected by default: channels that feed the output layer (its input features) and the embedding width of
transformers (the residual stream); heads are pruned only when asked (head_dim is pruned by default), and then
per attention block on the head count, in layouts the model accepts (compressor.graph.heads), in both scopes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from compressor.errors import RecipeError
from compressor.graph import heads as H
from compressor.graph.analysis import Analysis, Group
from compressor.graph.importance import group_scores


@dataclasses.dataclass
class Selection:
    atoms: set[int]
    per_group: dict[int, list[int]]  # group id -> removed atoms
    ratio: float  # the channel ratio used (after a MAC search, the one found)
    macs_before: int | None = None
    macs_after: int | None = None
    heads: dict | None = None  # asked vs kept heads (compressor.graph.heads.summary); None: no head was a candidate

    def to_json(self) -> dict:
        return {"removed": len(self.atoms), "groups_touched": sum(bool(v) for v in self.per_group.values()),
                "ratio": self.ratio, "macs_before": self.macs_before, "macs_after": self.macs_after,
                "heads": self.heads}


TENSOR_CORE_MULTIPLE = 8


def auto_round_to(device_type: str, half_precision: bool) -> int:
    """`round_to: auto` for the device the pruned model runs on: on a GPU in fp16/bf16, kept widths that are
    multiples of 8 (tensor-core GEMM/conv tiles take K and N in multiples of 8 half values; other widths fall
    back to padded or slower kernels); 1 on CPU, where any width runs at its MAC cost."""
    return TENSOR_CORE_MULTIPLE if device_type == "cuda" and half_precision else 1


def candidates(g: Group, protect_output: bool, protect_embeddings: bool, heads: bool, head_dim: bool = True) -> list[int]:
    if (g.kind == "heads" and not heads) or (g.kind == "head_dim" and not head_dim):
        return []
    skip = set(g.frozen)
    if protect_output:
        skip |= set(g.protected.get("output", []))
    if protect_embeddings:
        skip |= set(g.protected.get("embedding", []))
    return [a for a in g.atoms if a not in skip]


def _n_remove(size: int, n_cand: int, ratio: float, max_layer_ratio: float, round_to: int) -> int:
    n = size - math.floor(size * (1 - ratio) + 1e-9)
    n = min(n, math.floor(size * max_layer_ratio + 1e-9), n_cand, size - 1)
    if round_to > 1 and n > 0:
        keep = size - n
        if keep % round_to:
            keep += round_to - keep % round_to
        n = max(0, size - keep)
    return max(0, n)


def _select_ratio(analysis: Analysis, scores: dict[int, np.ndarray], ratio: float, scope: str, round_to: int,
                  max_layer_ratio: float, prot_out: bool, prot_emb: bool, heads: bool,
                  head_dim: bool, head_rule: H.HeadRule | None = None) -> tuple[dict[int, list[int]], list[dict]]:
    per_group: dict[int, list[int]] = {}
    cands = {g.id: candidates(g, prot_out, prot_emb, heads, head_dim) for g in analysis.groups if g.prunable}
    groups = {g.id: g for g in analysis.groups}
    infos = []
    blocks = H.blocks(analysis.groups)  # heads: per attention block, on the head count
    block_cands = {g.id: cands.pop(g.id, []) for b in blocks for g in b}
    removed, infos = H.select_blocks([b for b in blocks if any(block_cands[g.id] for g in b)], block_cands, scores,
                                     ratio, max_layer_ratio, head_rule)
    per_group.update(removed)
    if scope == "local":
        for gid, cand in cands.items():
            g = groups[gid]
            n = _n_remove(g.size, len(cand), ratio, max_layer_ratio, round_to)
            pos = {a: i for i, a in enumerate(g.atoms)}
            order = sorted(cand, key=lambda a: (scores[gid][pos[a]], pos[a]))
            per_group[gid] = order[:n]
        return per_group, infos
    # global: one threshold over all candidate scores, each group capped
    pool = [(float(scores[gid][groups[gid].atoms.index(a)]), gid, a) for gid, cand in cands.items() for a in cand]
    total = sum(groups[gid].size for gid in cands)
    n_total = total - math.floor(total * (1 - ratio) + 1e-9)
    pool.sort()
    caps = {gid: _n_remove(groups[gid].size, len(c), 1.0, max_layer_ratio, 1) for gid, c in cands.items()}
    taken = {gid: [] for gid in cands}
    count = 0
    for _, gid, a in pool:
        if count >= n_total:
            break
        if len(taken[gid]) < caps[gid]:
            taken[gid].append(a)
            count += 1
    if round_to > 1:  # give channels back (highest score first) until the kept width is a multiple
        for gid, t in taken.items():
            keep = groups[gid].size - len(t)
            while t and keep % round_to:
                t.pop()
                keep += 1
    return taken | per_group, infos


def select(analysis: Analysis, importance: str | dict = "l2", ratio: float = 0.5, *, scope: str = "local",
           round_to: int = 1, max_layer_ratio: float = 1.0, target: str = "channels", protect_output: bool = True,
           protect_embeddings: bool = True, heads: bool = False, head_dim: bool = True, grads: dict | None = None,
           seed: int = 0, reduction: str = "mean", normalizer: str = "mean",
           head_rule: H.HeadRule | None = None) -> Selection:
    """Atoms to remove. `importance`: "l2" | "l1" | "bn" | "taylor" | "random", or precomputed
    {group id: scores}. `target="macs"`: `ratio` is the fraction of MACs to remove (bisection on the channel
    ratio). heads: also remove whole attention heads, `ratio` of each block's heads in a layout `head_rule`
    accepts (compressor.graph.heads); head_dim: remove dims within heads (default)."""
    if not 0.0 <= ratio < 1.0:
        raise RecipeError(f"ratio must be in [0, 1), got {ratio}", "e.g. ratio: 0.5")
    if scope not in ("local", "global"):
        raise RecipeError(f"scope must be local or global, got {scope!r}")
    scores = importance if isinstance(importance, dict) else group_scores(
        analysis, importance, grads=grads, seed=seed, reduction=reduction, normalizer=normalizer)
    args = (scope, round_to, max_layer_ratio, protect_output, protect_embeddings, heads, head_dim, head_rule)
    if target == "channels":
        per, infos = _select_ratio(analysis, scores, ratio, *args)
        return Selection({a for v in per.values() for a in v}, per, ratio, heads=H.summary(infos, ratio))
    if target != "macs":
        raise RecipeError(f"target must be channels or macs, got {target!r}")
    from compressor.graph.macs import count_macs

    base = count_macs(analysis)
    lo, hi, best = 0.0, 0.99, None
    for _ in range(14):  # bisection on the channel ratio until removed MACs reach the target
        mid = (lo + hi) / 2
        per, infos = _select_ratio(analysis, scores, mid, *args)
        atoms = {a for v in per.values() for a in v}
        red = 1 - count_macs(analysis, atoms) / max(base, 1)
        if red >= ratio:
            best, hi = (mid, per, atoms, infos), mid
        else:
            lo = mid
    if best is None:
        per, infos = _select_ratio(analysis, scores, hi, *args)
        best = (hi, per, {a for v in per.values() for a in v}, infos)
    r, per, atoms, infos = best
    return Selection(atoms, per, r, base, count_macs(analysis, atoms), heads=H.summary(infos, r))
