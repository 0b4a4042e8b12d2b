"""GraphIR, the analyser's view of an ONNX file: the fast paths it takes (single-read loading, lazy weight
decoding, weightless shape inference, the already-sorted check) must give exactly what the slow ones give."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import compressor.graph.ir as IR
from compressor.export import export_onnx
from compressor.graph import analyze
from compressor.graph.ir import GraphIR, load_model, tensor_to_array


@pytest.fixture(scope="module")
def net_path(net_onnx):
    return net_onnx[1]


def test_lazy_initializers_decode_like_numpy_helper(net_path):
    m = onnx.load(str(net_path))
    ir = GraphIR(load_model(net_path))
    assert set(ir.initializers) == {i.name for i in m.graph.initializer}
    for init in m.graph.initializer:
        ref = numpy_helper.to_array(init)
        got = ir.initializers[init.name]
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref)
        assert ir.const_shape(init.name) == ref.shape and ir.shape(init.name) == list(ref.shape)
        assert np.array_equal(ir.value(init.name), ref) and np.array_equal(ir.consts[init.name], ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.int32, np.int8, np.uint8])
def test_tensor_fast_path_matches_numpy_helper(dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    t = numpy_helper.from_array(arr, "x")
    assert t.raw_data  # the fast path is taken
    got = tensor_to_array(t)
    assert got.dtype == numpy_helper.to_array(t).dtype and np.array_equal(got, arr)
    got[0, 0, 0] = 1  # a private, writable copy (numpy_helper gives one too)
    t2 = helper.make_tensor("y", TensorProto.INT64, [3], [4, 5, 6])  # typed field, no raw_data: general path
    assert tensor_to_array(t2).tolist() == [4, 5, 6]


def test_out_of_order_nodes_are_sorted_and_analyse_the_same(net_path, tmp_path):
    m = onnx.load(str(net_path))
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    p = tmp_path / "reversed.onnx"
    onnx.save(m, str(p))
    ir = GraphIR(load_model(p))
    seen = set(ir.initializers) | set(ir.inputs) | {""}
    for n in ir.nodes:  # topological
        assert all(i in seen for i in n.input), n.name
        seen.update(n.output)
    assert analyze(p).to_json() == analyze(net_path).to_json()


def test_external_data_is_loaded(net_path, tmp_path):
    m = onnx.load(str(net_path))
    p = tmp_path / "ext.onnx"
    onnx.save_model(m, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
                    size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    loaded = load_model(p)
    assert all(i.data_location == 0 for i in loaded.graph.initializer)
    assert analyze(p).to_json() == analyze(net_path).to_json()


def test_weightless_shape_inference_view_gives_the_same_analysis(net_path, monkeypatch):
    ref = analyze(net_path).to_json()
    calls = []
    real = onnx.shape_inference.infer_shapes

    def spy(model, *a, **kw):
        calls.append(sum(len(i.raw_data) for i in model.graph.initializer))
        return real(model, *a, **kw)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    analyze(net_path)
    full = calls[-1]
    monkeypatch.setattr(IR, "_VIEW_BYTES", 0)  # the view even for this small model: weights > 4 KiB as inputs
    assert analyze(net_path).to_json() == ref
    assert calls[-1] < full  # the weights did not go through inference


def test_shared_small_constant_gets_one_copy_per_consumer():
    shape = numpy_helper.from_array(np.array([2, -1], dtype=np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["a"], name="r1"),
             helper.make_node("Reshape", ["y", "shape"], ["b"], name="r2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
                                       helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 6]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    ir = GraphIR(load_model(m))
    r1, r2 = (n for n in ir.nodes if n.op_type == "Reshape")
    assert r1.input[1] == "shape" and r2.input[1] != "shape"
    assert np.array_equal(ir.value(r2.input[1]), [2, -1])
    assert ir.shape("a") == [2, 6] and ir.shape("b") == [2, 4]
    onnx.checker.check_model(ir.model)
    assert len(m.graph.node) == 2  # the caller's model is untouched


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(512, 600)  # 1.2 MB of weights: the file is memory-mapped when loaded
        self.fc2 = nn.Linear(600, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_large_file_parses_from_a_memory_map_and_weights_stay_encoded(tmp_path):
    torch.manual_seed(0)
    p = tmp_path / "wide.onnx"
    export_onnx(Wide().eval(), (torch.randn(2, 512),), p)
    assert p.stat().st_size > (1 << 20)
    from_file = load_model(p)
    ref = onnx.load(str(p))
    assert from_file.SerializeToString() == ref.SerializeToString()
    a = analyze(p)
    assert a.to_json() == analyze(ref).to_json()
    assert "fc1.weight" not in a.ir.initializers._arrays  # the analysis read dims only, never the values
    assert np.array_equal(a.ir.initializers["fc1.weight"], numpy_helper.to_array(
        next(i for i in ref.graph.initializer if i.name == "fc1.weight")))
