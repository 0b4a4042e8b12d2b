"""Property tests: on randomly generated small conv / MLP graphs (random widths, residual adds, concats, grouped
and depthwise convs, flatten → FC), pruning any random selection of prunable channels equals zeroing them."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.graph import analyze, prune_onnx
from compressor.onnx_utils import example_feeds
from graphs import zero_oracle

pytest.importorskip("hypothesis", reason="hypothesis (the dev extra) is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, p: str) -> str:
        self.k += 1
        return f"{p}{self.k}"

    def init(self, shape, scale=0.5) -> str:
        n = self.name("w")
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), n))
        return n

    def op(self, op, ins, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def conv(self, x, cin, cout, k=3, groups=1):
        w = self.init((cout, cin // groups, k, k))
        y = self.op("Conv", [x, w, self.init((cout,), 0.1)], pads=[k // 2] * 4, group=groups)
        bn = [self.init((cout,), 0.2) for _ in range(3)]
        var = self.name("v")
        self.inits.append(numpy_helper.from_array(self.rng.uniform(0.5, 1.5, cout).astype(np.float32), var))
        return self.op("Relu", [self.op("BatchNormalization", [y, *bn[:2], bn[2], var])])


@st.composite
def conv_graphs(draw):
    seed = draw(st.integers(0, 10_000))
    b = Builder(seed)
    c = draw(st.sampled_from([4, 6, 8]))
    x = b.conv("x", 3, c)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["plain", "residual", "concat", "grouped", "depthwise"]))
        if kind == "plain":
            w = draw(st.sampled_from([4, 6, 8, 12]))
            x, c = b.conv(x, c, w, k=draw(st.sampled_from([1, 3]))), w
        elif kind == "residual":
            h = b.conv(x, c, draw(st.sampled_from([4, 8])), k=1)
            x = b.op("Add", [x, b.conv(h, len_of(b, h), c)])
        elif kind == "concat":
            w1, w2 = draw(st.sampled_from([2, 4, 6])), draw(st.sampled_from([2, 4]))
            x, c = b.op("Concat", [b.conv(x, c, w1, k=1), b.conv(x, c, w2)], axis=1), w1 + w2
        elif kind == "grouped" and c % 2 == 0:
            x = b.conv(x, c, c, groups=2)
        elif kind == "depthwise":
            x = b.conv(x, c, c, groups=c)
    if draw(st.booleans()):  # flatten of a 6×6 map → FC
        feat, fdim = b.op("Flatten", [x], axis=1), c * 36
    else:
        feat, fdim = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), c
    h = b.op("Relu", [b.op("Gemm", [feat, b.init((16, fdim), 0.1), b.init((16,), 0.1)], transB=1)])
    b.op("Gemm", [h, b.init((3, 16)), b.init((3,))], transB=1)
    b.nodes[-1].output[0] = "y"
    g = helper.make_graph(b.nodes, "rand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], b.inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), draw(st.integers(0, 2**31 - 1))


def len_of(b: Builder, name: str) -> int:
    """Output channels of the conv feeding `name` (Relu ← BN ← Conv)."""
    by_out = {n.output[0]: n for n in b.nodes}
    n = by_out[name]
    while n.op_type != "Conv":
        n = by_out[n.input[0]]
    w = next(i for i in b.inits if i.name == n.input[1])
    return w.dims[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_graphs())
def test_random_selection_equals_zeroing(case):
    model, seed = case
    a = analyze(model)
    rng = np.random.default_rng(seed)
    atoms = set()
    for g in a.prunable_groups:
        cand = [x for x in g.atoms if x not in g.frozen]
        k = int(rng.integers(0, len(cand)))  # 0 … all but one of the group's channels
        atoms |= set(rng.choice(cand, size=min(k, g.size - 1), replace=False).tolist())
    if not atoms:
        return  # nothing prunable drawn (e.g. every channel feeds a frozen axis)
    pruned = prune_onnx(model, a, atoms)
    removed = a.removed_positions(atoms)
    assert removed and zero_oracle.removed_params(model, pruned) > 0, "a non-empty selection removed nothing"
    feeds = example_feeds(model, batch=2, seed=seed % 1000)
    problems = zero_oracle.check(model, pruned, removed, feeds=feeds)
    assert not problems, problems[:3]
