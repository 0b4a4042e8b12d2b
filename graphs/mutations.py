"""Planted bugs in the pruner's position map, to show which zero-channel oracle catches them.

Each mutation is applied by patching `compressor.graph.prune.Plan` (the map from selected atoms to the
positions cut in every tensor) for the duration of a `with mutated(name):` block. The old oracle
(compressor/graph/oracle.py) builds its zeroed model from the same Plan, so a bug that cuts *other* channels
consistently everywhere passes it: the pruned model equals its (equally wrong) zeroed model. The independent
oracle (graphs/zero_oracle.py) zeroes the positions the analysis recorded for the selection and fails.

Used by scripts/mutate_pruner.py (the table) and tests/test_oracle_mutations.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import onnx

from compressor.graph import analyze, prune_onnx, select
from compressor.graph import prune as prune_mod
from compressor.graph.analysis import Analysis
from compressor.graph.oracle import max_diff, zero_channels
from compressor.onnx_utils import example_feeds, run
from graphs import zero_oracle

Mutation = Callable[[Analysis, set[int]], set[int]]


def _by_group(a: Analysis, removed: set[int]):
    for g in a.groups:
        sel = [i for i, x in enumerate(g.atoms) if x in removed]
        if sel:
            yield g, sel


def _relabel(a: Analysis, removed: set[int], index_map) -> set[int]:
    """Move every selected atom of a group to the atom at index_map(i, n) of that group (unless frozen)."""
    out = set(removed)
    for g, sel in _by_group(a, removed):
        n = len(g.atoms)
        for i in sel:
            j = index_map(i, n) % n
            if g.atoms[j] not in g.frozen and g.atoms[j] not in out:
                out.discard(g.atoms[i])
                out.add(g.atoms[j])
    return out


def off_by_one(a: Analysis, removed: set[int]) -> set[int]:
    """Each selected channel's position taken one too far (i → i + 1 in its group)."""
    return _relabel(a, removed, lambda i, n: i + 1)


def reversed_order(a: Analysis, removed: set[int]) -> set[int]:
    """The position map read from the wrong end (i → n - 1 - i)."""
    return _relabel(a, removed, lambda i, n: n - 1 - i)


def concat_offset(a: Analysis, removed: set[int]) -> set[int]:
    """The second part of a concatenated axis cut without its offset (i → i - n/2 for i ≥ n/2)."""
    return _relabel(a, removed, lambda i, n: i - n // 2 if i >= n // 2 else i)


def reshape_factor(a: Analysis, removed: set[int]) -> set[int]:
    """Heads and head dims swapped (the factors of a reshaped axis): a selection in a `heads` group is cut
    in the `head_dim` group of the same root, at the same indices, and the other way round."""
    by_root: dict[str, dict[str, list]] = {}
    for g in a.groups:
        if g.kind in ("heads", "head_dim"):
            by_root.setdefault(g.name.split("/")[0], {}).setdefault(g.kind, []).append(g)
    out = set(removed)
    for kinds in by_root.values():  # every heads slot (GQA: KV heads, query heads per KV head) with the head dims
        pairs = [(h, d) for h in kinds.get("heads", []) for d in kinds.get("head_dim", [])[:1]]
        for src, dst in [p for h, d in pairs for p in ((h, d), (d, h))]:
            for i, x in enumerate(src.atoms):
                if x in removed and i < len(dst.atoms) - 1 and dst.atoms[i] not in dst.frozen:
                    out.discard(x)
                    out.add(dst.atoms[i])
    return out


def skip_group(a: Analysis, removed: set[int]) -> set[int]:
    """One group the selection touches is left uncut (a consumer loop that skips an entry)."""
    groups = list(_by_group(a, removed))
    if not groups:
        return set(removed)
    g, _ = groups[len(groups) // 2]
    return set(removed) - set(g.atoms)


MUTATIONS: dict[str, Mutation] = {"off-by-one": off_by_one, "reversed-order": reversed_order,
                                  "concat-offset": concat_offset, "reshape-factor": reshape_factor,
                                  "skip-group": skip_group}


@contextlib.contextmanager
def mutated(name: str | None):
    """Plan (hence prune_onnx and the old oracle) with the named bug planted; None: unchanged."""
    if name is None:
        yield
        return
    fn = MUTATIONS[name]
    original = prune_mod.Plan.__init__

    def init(self, analysis, removed):
        original(self, analysis, fn(analysis, set(removed)))

    prune_mod.Plan.__init__ = init
    try:
        yield
    finally:
        prune_mod.Plan.__init__ = original


def case(model: onnx.ModelProto, seed: int = 1, ratio: float = 0.3):
    """(analysis, atoms): a random selection of exact (not LayerNorm-approximate) groups' channels."""
    a = analyze(model)
    sel = select(a, "random", ratio, protect_output=False, heads=True, seed=seed)
    exact = {g.id for g in a.groups if not g.approximate}
    return a, {x for gid, v in sel.per_group.items() if gid in exact for x in v}


def verdicts(model: onnx.ModelProto, a: Analysis, atoms: set[int], mutation: str | None) -> dict[str, object]:
    """Whether the old and the new oracle pass the pruned model under `mutation`, and whether it changed the cut."""
    changed = mutation is not None and MUTATIONS[mutation](a, set(atoms)) != set(atoms)
    with mutated(mutation):
        try:
            pruned = prune_onnx(model, a, atoms, check=False)
        except Exception as e:  # noqa: BLE001 - a mutation that breaks the pruner outright fails both
            return {"changed": changed, "old": False, "new": False, "why": f"prune: {type(e).__name__}"}
        feeds = example_feeds(model, batch=2)
        try:
            old = max_diff(run(zero_channels(a, atoms), feeds), run(pruned, feeds)) < 1e-4
        except Exception:  # noqa: BLE001
            old = False
    removed = a.removed_positions(atoms)
    problems = zero_oracle.check(model, pruned, removed, feeds=feeds)
    outputs_only = not zero_oracle.check(model, pruned, removed, feeds=feeds, slices=False)
    return {"changed": changed, "old": old, "new": not problems, "new_outputs": outputs_only,
            "why": problems[0] if problems else ""}

