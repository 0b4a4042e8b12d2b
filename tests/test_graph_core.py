"""Analyser and pruning on small hand-made graphs: bad inputs, unknown ops, layout ops, selection rules,
importance against torch-pruning's GroupMagnitudeImportance."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compressor.errors import InputError
from compressor.export import export_onnx
from compressor.graph import PruneError, analyze, prune_onnx, select
from compressor.graph.importance import group_scores
from compressor.graph.macs import count_macs
from compressor.graph.oracle import max_diff, zero_channels
from compressor.onnx_utils import example_feeds, run


def _ones_like_feeds(model):
    return example_feeds(model, batch=2)


def test_analyze_path_and_json(net_onnx):
    _, p = net_onnx
    a = analyze(p)
    js = a.to_json()
    names = {g["name"]: g for g in js["groups"]}
    assert names["c1.weight:0"]["prunable"] and names["c1.weight:0"]["size"] == 8
    members = {(m["name"], m["axis"]) for m in names["c2.weight:0"]["members"]}
    assert ("fc.weight", 1) in members  # flatten: channel c ↦ features c*16 … c*16+15
    fc_in = next(m for m in a.groups if m.name == "c2.weight:0").members
    assert len(next(m for m in fc_in if m.name == "fc.weight").indices) == 16 * 16
    assert not names["fc.weight:0"]["prunable"] and "graph output" in names["fc.weight:0"]["reasons"][0]


def test_input_is_never_modified(net_onnx):
    _, p = net_onnx
    model = onnx.load(str(p))
    before = model.SerializeToString()
    a = analyze(model)
    prune_onnx(model, a, select(a, "l2", 0.5))
    assert model.SerializeToString() == before


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage-not-a-protobuf" * 10)
    with pytest.raises(InputError, match="not a valid ONNX model"):
        analyze(bad)
    with pytest.raises(InputError, match="not found"):
        analyze(tmp_path / "missing.onnx")


def _linear_model(middle_nodes, inits, width=6, extra_inputs=()):
    """x[N,4] -> Gemm(W1: 4->width) -> middle -> Gemm(W2: width->3) -> y."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((width, 4)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((3, width)).astype(np.float32), "w2")
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1, name="fc1"), *middle_nodes,
             helper.make_node("Gemm", ["m", "w2"], ["y"], transB=1, name="fc2")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]), *extra_inputs],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w1, w2, *inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_unknown_op_freezes_with_reason():
    node = helper.make_node("MyFancyOp", ["h"], ["m"], domain="custom.ops", name="fancy")
    model = _linear_model([node], [])
    model.opset_import.append(helper.make_opsetid("custom.ops", 1))
    a = analyze(model)
    g = next(g for g in a.groups if g.name == "w1:0")
    assert not g.prunable
    assert any("MyFancyOp 'fancy'" in r and "no rule" in r for r in g.reasons)


def test_constant_gather_and_strided_slice():
    idx = numpy_helper.from_array(np.array([0, 2, 3, 5], dtype=np.int64), "idx")
    model = _linear_model([helper.make_node("Gather", ["h", "idx"], ["m"], axis=1, name="pick")], [idx])
    w2 = numpy_helper.from_array(np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32), "w2")
    model.graph.initializer[1].CopyFrom(w2)
    a = analyze(model)
    g = next(g for g in a.groups if g.name == "w1:0")
    # positions 1 and 4 are dropped by the gather: removable alone; 0 and 2 are gathered (coupled with w2 columns)
    atoms = [g.atoms[i] for i in (1, 2)]
    pruned = prune_onnx(model, a, atoms)
    feeds = example_feeds(model)
    assert max_diff(run(zero_channels(a, atoms), feeds), run(pruned, feeds)) < 1e-5
    assert numpy_helper.to_array(next(i for i in pruned.graph.initializer if i.name == "idx")).tolist() == [0, 1, 3]

    starts, ends, axes, steps = (numpy_helper.from_array(np.array([v], dtype=np.int64), n)
                                 for v, n in ((0, "s"), (6, "e"), (1, "a"), (2, "st")))
    m2 = _linear_model([helper.make_node("Slice", ["h", "s", "e", "a", "st"], ["m"], name="strided")],
                       [starts, ends, axes, steps])
    m2.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones((3, 3), np.float32), "w2"))
    g2 = next(g for g in analyze(m2).groups if g.name == "w1:0")
    assert not g2.prunable and any("step 2" in r for r in g2.reasons)


def test_frozen_selection_is_refused(net_onnx):
    _, p = net_onnx
    a = analyze(p)
    frozen = next(g for g in a.groups if not g.prunable)
    with pytest.raises(PruneError, match="frozen"):
        prune_onnx(p, a, frozen.atoms[:1])
    g = next(g for g in a.groups if g.prunable)
    with pytest.raises(PruneError, match="every channel"):
        prune_onnx(p, a, g.atoms)


def test_selection_rules(net_onnx):
    _, p = net_onnx
    a = analyze(p)
    c2 = next(g for g in a.groups if g.name == "c2.weight:0")
    c1 = next(g for g in a.groups if g.name == "c1.weight:0")
    s = select(a, "l2", 0.5, protect_output=False)
    assert len(s.per_group[c1.id]) == 4 and len(s.per_group[c2.id]) == 8
    s = select(a, "l2", 0.5, protect_output=True)
    assert s.per_group[c2.id] == []  # c2 feeds the output layer
    s = select(a, "l2", 0.4, round_to=4, protect_output=False)
    assert (c2.size - len(s.per_group[c2.id])) % 4 == 0 and (c1.size - len(s.per_group[c1.id])) % 4 == 0
    s = select(a, "l2", 0.9, max_layer_ratio=0.25, protect_output=False)
    assert len(s.per_group[c1.id]) == 2
    s = select(a, "l2", 0.5, scope="global", protect_output=False)
    assert len(s.atoms) == 12  # half of the 24 channels, split between groups by score
    s = select(a, "l2", 0.3, target="macs", protect_output=False)
    red = 1 - count_macs(a, s.atoms) / count_macs(a)
    assert 0.3 <= red < 0.45 and s.macs_after < s.macs_before


def test_importance_matches_torch_pruning(net_onnx):
    tp = pytest.importorskip("torch_pruning")
    m, p = net_onnx
    a = analyze(p)
    ours = group_scores(a, "l2")
    g = next(g for g in a.groups if g.name == "c1.weight:0")
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(m.c1, tp.prune_conv_out_channels, idxs=list(range(8)))
    theirs = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")(group)
    np.testing.assert_allclose(ours[g.id], theirs.detach().numpy(), rtol=1e-4)


class Misc(nn.Module):
    """ConvTranspose, GroupNorm (exported as Reshape/InstanceNorm/Reshape), InstanceNorm, Pad, Resize, Tile,
    ReduceMean/ReduceMax."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.c2 = nn.Conv2d(6, 12, 3, padding=1)
        self.c3 = nn.Conv2d(12, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.gn(self.c1(x)))
        x = nn.functional.pad(self.inorm(self.up(x)), (1, 1, 1, 1))
        x = nn.functional.interpolate(torch.sigmoid(self.c2(x)), scale_factor=2, mode="nearest")
        x = x.repeat(1, 1, 1, 1) * 2.0 - x.mean(dim=(2, 3), keepdim=True)
        return self.fc(torch.tanh(self.c3(x)).amax(dim=(2, 3)))


def test_misc_ops_zero_channel_equivalence(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "misc.onnx"
    export_onnx(Misc().eval(), (torch.randn(2, 3, 6, 6),), path)
    model = onnx.load(str(path))
    a = analyze(model)
    by = {g.name: g for g in a.groups}
    assert by["c1.weight:0/0"].kind == "heads" and by["c1.weight:0/0"].size == 2  # GroupNorm: whole groups…
    assert by["c1.weight:0/1"].approximate  # …and within-group positions (statistics change)
    assert {"up.weight:1", "c2.weight:0", "c3.weight:0"} <= {g.name for g in a.prunable_groups}
    feeds = example_feeds(model)
    for g in a.prunable_groups:
        atoms = {x for x in g.atoms if x not in g.frozen}
        atoms = set(sorted(atoms)[: max(1, len(atoms) // 3)])
        d = max_diff(run(zero_channels(a, atoms), feeds), run(prune_onnx(model, a, atoms), feeds))
        assert d < (5e-3 if g.approximate else 1e-5), (g.name, d)


class ShapeScaledAttention(nn.Module):
    """SDPA without an explicit scale: 1/sqrt(head_dim) is computed from Shape(q) at run time, and the output
    reshape takes its width from the input's shape."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.qkv, self.o, self.fc = h, nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.reshape(b, s, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.fc(self.o(y.transpose(1, 2).reshape(b, s, d)).mean(1))


def test_sizes_used_as_values_freeze(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "attn.onnx"
    export_onnx(ShapeScaledAttention().eval(), (torch.randn(2, 5, 32),), path)
    a = analyze(path)
    by = {g.kind: g for g in a.groups if g.name.startswith("qkv.weight:0")}
    assert not by["head_dim"].prunable and any("as a value" in r for r in by["head_dim"].reasons)
    assert not by["heads"].prunable and any("another tensor's size" in r for r in by["heads"].reasons)
    assert next(g for g in a.groups if g.name == "o.weight:0").prunable


def test_protect_output_spares_only_the_output_layer(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import graphs

    pytest.importorskip("transformers", reason="Hugging Face zoo models need transformers (the hf extra)")
    graphs.export("bert", tmp_path / "bert.onnx")
    a = analyze(tmp_path / "bert.onnx")
    protected = [g for g in a.groups if g.protected.get("output")]
    assert [g.name for g in protected] == ["bert.pooler.dense.weight:0"]  # the classifier's input features
    sel = select(a, "l2", 0.5)
    ffn = [g for g in a.groups if "intermediate" in g.name]
    assert all(len(sel.per_group[g.id]) == g.size // 2 for g in ffn)
