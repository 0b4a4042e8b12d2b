"""Group importance (torch-pruning's defaults; docs/structured.md): per member a local channel score, reduced across
members onto the group's atoms, then normalised.

    magnitude  Σ |w|^p over the member's slice (p=2 "l2", p=1 "l1"); out- and in-channel members of Conv /
               Gemm / MatMul weights and BN / LN scales (biases excluded)
    bn         |γ| of BatchNormalization scales only (Network Slimming)
    taylor     Σ |w · ∂L/∂w| over the slice, gradients given by name (the torch bridge computes them)
    random     seeded uniform scores
A position of a factored axis (768 = 12 heads × 64 dims) adds its score to each of its atoms.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from compressor.graph.analysis import Analysis, Group
from compressor.utils.channel_sums import position_scores

MEMBER_KINDS = {"conv", "convT", "linear", "bn", "ln"}
REDUCTIONS = ("mean", "sum", "max", "first")
# the methods whose per-position score is Σ|w|^p, by default exponent (the ones a precomputed axis sum can serve)
MAGNITUDE_EXPONENT = {"l1": 1.0, "l2": 2.0}
NORMALIZERS = ("mean", "max", "sum", "none", "standarization", "gaussian")


def _member_axes(analysis: Analysis, method: str) -> list[tuple[str, int]]:
    kinds = {"bn"} if method == "bn" else MEMBER_KINDS
    out: list[tuple[str, int]] = []
    for r in analysis.ctx.roles:
        if r.kind not in kinds:
            continue
        for ax in (r.out_axis, r.in_axis):
            if ax is not None and (r.init, ax) not in out:
                out.append((r.init, ax))
    return out


def group_scores(analysis: Analysis, method: str = "l2", *, p: float | None = None, reduction: str = "mean",
                 normalizer: str = "mean", grads: dict[str, np.ndarray] | None = None,
                 weights: dict[str, np.ndarray] | None = None, seed: int = 0,
                 groups: set[int] | None = None,
                 axis_sums: Callable[[str, int], np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """{group id: score per atom (in Group.atoms order)} for every group, or for the ids in `groups` only
    (the others are left out, and a tensor none of them touches is never read: a streamed cut of the FFN
    reads the FFN weights alone). Each tensor is read once, whatever the number of its scored axes.
    axis_sums(name, axis): Σ|w|^p per position, computed elsewhere (compressor.checkpoint.axis_sums, ahead of
    the analysis with this call's exponent p); used instead of reading `weights` for l1/l2."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}")
    wanted = [g for g in analysis.groups if groups is None or g.id in groups]
    if method == "random":
        rng = np.random.default_rng(seed)
        drawn = {g.id: rng.random(g.size) for g in analysis.groups}  # the same draws whatever `groups` is
        return {g.id: drawn[g.id] for g in wanted}
    if method == "taylor" and not grads:
        raise ValueError("taylor importance needs gradients (grads={initializer name: dL/dw})")
    p = p if p is not None else (1.0 if method in ("l1", "bn") else 2.0)
    weights = weights or analysis.ir.initializers
    ia = analysis.init_atoms
    top = max((max(g.atoms, default=-1) for g in analysis.groups), default=-1) + 1
    top = max(top, int(ia.flat.max()) + 1 if len(ia.flat) else 0)
    atom_group = np.full(top, -1, dtype=np.int64)  # atom -> id of the scored group holding it, else -1
    atom_index = np.zeros(top, dtype=np.int64)  # atom -> its index in that group's atoms
    for g in wanted:
        ats = np.asarray(g.atoms, dtype=np.int64)
        atom_group[ats] = g.id
        atom_index[ats] = np.arange(len(ats))
    size = {g.id: g.size for g in wanted}
    # per group: (member number, score vector) of each member, stacked in member order as before
    acc: dict[int, list[tuple[int, np.ndarray]]] = {g.id: [] for g in wanted}
    by_name: dict[str, list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]] = {}
    for m, (name, axis) in enumerate(_member_axes(analysis, method)):
        ks = ia.index.get(name)
        if ks is None or axis >= len(ks) or name not in weights:
            continue
        k = ks[axis]
        flat = ia.atoms(k)
        counts = ia.counts[ia.pos[k]:ia.pos[k + 1]]
        gid = atom_group[flat]
        hit = gid >= 0
        if not hit.any():
            continue  # no scored group here: the tensor is not read for this axis
        position = np.repeat(np.arange(len(counts)), counts)
        by_name.setdefault(name, []).append((m, axis, position[hit], gid[hit], atom_index[flat][hit]))
    for name, axes in by_name.items():
        if method == "taylor" and grads.get(name) is None:
            continue
        if axis_sums is not None and method in MAGNITUDE_EXPONENT:
            w, scores = None, lambda axis, name=name: axis_sums(name, axis)
        else:
            w = weights[name]  # one read per tensor
            scores = lambda axis, w=w, name=name: position_scores(  # noqa: E731
                w, axis, p, grads.get(name) if method == "taylor" else None)
        for m, axis, position, gid, index in axes:
            s = scores(axis)[position]
            for g in np.unique(gid).tolist():  # in order of first use, as the positions list them
                sel = gid == g
                acc[g].append((m, np.bincount(index[sel], weights=s[sel], minlength=size[g])))
        del w
    out = {}
    for g in wanted:
        vs = [v for _, v in sorted(acc[g.id], key=lambda mv: mv[0])]
        if not vs:
            out[g.id] = np.ones(g.size)
            continue
        stack = np.stack(vs)
        v = {"mean": stack.mean(0), "sum": stack.sum(0), "max": stack.max(0), "first": stack[0]}[reduction]
        out[g.id] = normalize(v, normalizer)
    return out


def normalize(v: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return v
    if how == "mean":
        return v / (v.mean() + 1e-12)
    if how == "max":
        return v / (v.max() + 1e-12)
    if how == "sum":
        return v / (v.sum() + 1e-12)
    if how == "standarization":
        return (v - v.min()) / (v.max() - v.min() + 1e-12)
    if how == "gaussian":
        return (v - v.mean()) / (v.std() + 1e-12)
    raise ValueError(how)


def member_count(analysis: Analysis, group: Group) -> int:
    """How many weight members contribute to a group's score (0: ranking falls back to ties)."""
    names = {n for n, _ in _member_axes(analysis, "l2")}
    return sum(m.name in names for m in group.members)
