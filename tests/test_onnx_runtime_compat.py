"""Models fit the installed onnxruntime: the IR version is lowered to the newest one it loads (found by asking
onnxruntime, not from a table), on every path that writes or runs a model; a too-new opset is refused in one line.

The oracle is onnxruntime itself: a model it refuses directly must run (or be written loadable) through the
project, with the same outputs as numpy computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor import onnx_utils
from compressor.errors import InputError


def _gemm_model(ir_version: int, opset: int = 13):
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    return m, w


def _ort_loads(data: bytes) -> bool:
    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def test_detected_limits_are_what_onnxruntime_loads():
    ir, opset = onnx_utils.ort_max_ir_version(), onnx_utils.ort_max_opset()
    assert _ort_loads(_gemm_model(ir)[0].SerializeToString())
    assert _ort_loads(_gemm_model(ir, opset)[0].SerializeToString())
    assert not _ort_loads(_gemm_model(ir, opset + 1)[0].SerializeToString())
    assert not _ort_loads(_gemm_model(ir + 1)[0].SerializeToString())  # onnx 1.23 with onnxruntime 1.30: 14 vs 13


def test_a_newer_ir_version_than_onnxruntime_knows_still_runs():
    from compressor.export import run_onnx

    m, w = _gemm_model(onnx_utils.ort_max_ir_version() + 1)  # what a newer onnx stamps
    assert not _ort_loads(m.SerializeToString())
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(m.SerializeToString(), {"x": x})[0], x @ w.T, rtol=1e-5)
    np.testing.assert_allclose(onnx_utils.run(m, {"x": x})[0], x @ w.T, rtol=1e-5)
    assert m.ir_version == onnx_utils.ort_max_ir_version() + 1  # the caller's model is not changed


def test_saved_files_get_the_ir_version_onnxruntime_accepts(tmp_path, monkeypatch):
    """IR 14 (what onnx 1.23 stamps) against an onnxruntime whose limit is lower: simulated by lowering the
    detected limit, since the installed pair may agree."""
    from compressor.export import export_onnx, run_onnx
    from compressor.kernels.onnx_sparse import compact_onnx

    monkeypatch.setattr(onnx_utils, "ort_max_ir_version", lambda: 7)
    m, w = _gemm_model(onnx.IR_VERSION)  # 14 with onnx 1.23
    onnx_utils.save_onnx_verified(m, tmp_path / "a.onnx")
    assert onnx.load(str(tmp_path / "a.onnx")).ir_version == 7 and m.ir_version == onnx.IR_VERSION

    export_onnx(torch.nn.Linear(4, 3), torch.randn(2, 4), tmp_path / "b.onnx")
    assert onnx.load(str(tmp_path / "b.onnx")).ir_version == 7

    w[:, :2] = 0  # half the weight pruned, so the compact file stores it sparsely
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    (tmp_path / "dense.onnx").write_bytes(m.SerializeToString())  # as a user's onnx 1.23 would save it
    compact_onnx(tmp_path / "dense.onnx", tmp_path / "c.onnx")
    assert onnx.load(str(tmp_path / "c.onnx")).ir_version == 7
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(run_onnx(tmp_path / "c.onnx", {"x": x})[0], x @ w.T, rtol=1e-5)


def test_an_opset_newer_than_onnxruntime_runs_is_refused_in_one_line(tmp_path):
    from compressor.export import run_onnx

    m, _ = _gemm_model(onnx_utils.ort_max_ir_version(), onnx_utils.ort_max_opset() + 1)
    with pytest.raises(InputError, match=r"opset .* up to \d+") as e:
        onnx_utils.save_onnx_verified(m, tmp_path / "a.onnx")
    assert "\n" not in e.value.message and not (tmp_path / "a.onnx").exists()
    (tmp_path / "b.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(InputError, match="b.onnx uses ONNX opset"):
        run_onnx(tmp_path / "b.onnx", {})


def test_file_size_counts_external_data(tmp_path):
    from compressor.cli import before_after_table
    from compressor.eval import file_size

    m, _ = _gemm_model(onnx_utils.ort_max_ir_version())
    big = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    m.graph.initializer.append(numpy_helper.from_array(big, "unused_big"))
    (tmp_path / "m").mkdir()
    onnx.save_model(m, str(tmp_path / "m" / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "m").iterdir())  # model.onnx + model.onnx.data
    assert (tmp_path / "m" / "model.onnx.data").stat().st_size >= big.nbytes
    assert onnx_utils.onnx_file_bytes(tmp_path / "m" / "model.onnx") == on_disk
    assert file_size(tmp_path / "m" / "model.onnx") == on_disk

    onnx.save(m, str(tmp_path / "one.onnx"))  # everything in one file: no data file to add
    assert file_size(tmp_path / "one.onnx") == (tmp_path / "one.onnx").stat().st_size

    from io import StringIO

    from rich.console import Console

    def change(before, after):
        out = StringIO()
        Console(file=out, width=200).print(before_after_table({"file_bytes": before}, {"file_bytes": after}, "t"))
        return out.getvalue()

    assert "2.00× larger" in change(100, 200) and "4.00× smaller" in change(400, 100) and "same" in change(5, 5)
