"""The independent zero-channel oracle (graphs/zero_oracle.py) catches bugs planted in the pruner's position
map (graphs/mutations.py) that the old oracle, built on the pruner's own Plan, lets through."""

from __future__ import annotations

import onnx
import pytest

import graphs
from graphs.mutations import MUTATIONS, case, verdicts

FAST = ["cnn", "concat", "llama"]  # a plain CNN, a concatenation, a factorised (heads × head_dim) transformer


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("mut")
    out = {}
    for name in FAST:
        graphs.export(name, root / f"{name}.onnx")
        model = onnx.load(str(root / f"{name}.onnx"))
        out[name] = (model, *case(model))
    return out


@pytest.mark.parametrize("name", FAST)
def test_unmutated_pruner_passes_both_oracles(cases, name):
    model, a, atoms = cases[name]
    v = verdicts(model, a, atoms, None)
    assert v["old"] and v["new"], v["why"]


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_new_oracle_catches_each_mutation(cases, mutation):
    caught = 0
    for name, (model, a, atoms) in cases.items():
        v = verdicts(model, a, atoms, mutation)
        if not v["changed"]:
            continue  # e.g. heads/head_dim swapped on a CNN: no such factors
        assert not v["new"], f"{mutation} on {name}: the independent oracle passed a wrong cut"
        assert v["old"], f"{mutation} on {name}: expected the old oracle to be fooled ({v['why']})"
        caught += 1
    assert caught, f"{mutation} changed no cut on {FAST}"


def test_outputs_alone_catch_a_relabelled_cut(cases):
    """Without its initializer check, running the zeroed original against the pruned model still finds an
    off-by-one cut."""
    model, a, atoms = cases["cnn"]
    v = verdicts(model, a, atoms, "off-by-one")
    assert v["changed"] and not v["new_outputs"]


def test_torch_zeroing_matches_onnx_zeroing(cases):
    """zero_torch (by parameter name) and zero_onnx (by initializer) zero the same channels: same outputs."""
    import numpy as np
    import torch

    from graphs import zero_oracle

    model, a, atoms = cases["cnn"]
    torch_model, inputs = graphs.ZOO["cnn"].build()
    removed = a.removed_positions(atoms)
    with torch.no_grad():
        want = zero_oracle.zero_torch(torch_model, removed)(*inputs).numpy()
        before = torch_model(*inputs).numpy()
    feeds = {i.name: t.numpy() for i, t in zip(model.graph.input, inputs, strict=False)}
    got = zero_oracle.run(zero_oracle.zero_onnx(model, removed), feeds)[0]
    assert np.abs(got - want).max() < 1e-4 and np.abs(before - want).max() > 1e-3
