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

import numpy as np

from compressor.graph.analysis import Analysis, Group

MEMBER_KINDS = {"conv", "convT", "linear", "bn", "ln"}
REDUCTIONS = ("mean", "sum", "max", "first")
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


def _position_scores(w: np.ndarray, axis: int, p: float, grad: np.ndarray | None) -> np.ndarray:
    x = np.abs(w.astype(np.float64) * grad.astype(np.float64)) if grad is not None else np.abs(w.astype(np.float64)) ** p
    other = tuple(i for i in range(w.ndim) if i != axis)
    return x.sum(axis=other) if other else x


def group_scores(analysis: Analysis, method: str = "l2", *, p: float | None = None, reduction: str = "mean",
                 normalizer: str = "mean", grads: dict[str, np.ndarray] | None = None,
                 weights: dict[str, np.ndarray] | None = None, seed: int = 0) -> dict[int, np.ndarray]:
    """{group id: score per atom (in Group.atoms order)} for every group."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}")
    if method == "random":
        rng = np.random.default_rng(seed)
        return {g.id: rng.random(g.size) for g in analysis.groups}
    if method == "taylor" and not grads:
        raise ValueError("taylor importance needs gradients (grads={initializer name: dL/dw})")
    p = p if p is not None else (1.0 if method in ("l1", "bn") else 2.0)
    weights = weights or analysis.ir.initializers
    index = {g.id: {a: i for i, a in enumerate(g.atoms)} for g in analysis.groups}
    atom_group = {a: g.id for g in analysis.groups for a in g.atoms}
    acc = {g.id: [] for g in analysis.groups}  # per group: list of per-member score vectors
    for name, axis in _member_axes(analysis, method):
        pos = analysis.atom_positions.get(name)
        if pos is None or name not in weights:
            continue
        grad = grads.get(name) if method == "taylor" else None
        if method == "taylor" and grad is None:
            continue
        s = _position_scores(weights[name], axis, p, grad)
        per_group: dict[int, np.ndarray] = {}
        for i, ats in enumerate(pos[axis]):
            for a in ats:
                gid = atom_group.get(a)
                if gid is None:
                    continue
                v = per_group.setdefault(gid, np.zeros(len(index[gid])))
                v[index[gid][a]] += s[i]
        for gid, v in per_group.items():
            acc[gid].append(v)
    out = {}
    for g in analysis.groups:
        vs = acc[g.id]
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
