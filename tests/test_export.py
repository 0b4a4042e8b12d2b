"""Verified export: torch vs onnxruntime on two batches; refusal leaves nothing behind."""

import numpy as np
import onnx
import pytest
import torch

from compressor.errors import VerificationError
from compressor.export import export_onnx
from compressor.models import digits_mlp


def test_export_keeps_names_and_batchnorm(tmp_path, trained_cnn):
    p = tmp_path / "m.onnx"
    rep = export_onnx(trained_cnn, (torch.randn(4, 1, 8, 8),), p)
    assert rep["max_abs_diff"] < 1e-4 and rep["batches"] == 2
    m = onnx.load(str(p))
    names = {i.name for i in m.graph.initializer}
    assert {"conv1.weight", "fc1.weight", "bn1.weight"} <= names
    assert "BatchNormalization" in {n.op_type for n in m.graph.node}


class BakedBatch(torch.nn.Module):
    """Tracing turns int(x.shape[0]) into a constant: the ONNX model is wrong for any other batch size."""

    def forward(self, x):
        return x * int(x.shape[0])


def test_refuses_disagreeing_export(tmp_path):
    p = tmp_path / "bad.onnx"
    with pytest.raises(VerificationError, match="disagrees"):
        export_onnx(BakedBatch(), (torch.rand(4, 3),), p)
    assert not p.exists() and list(tmp_path.iterdir()) == []


def test_refusal_keeps_existing_file(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"previous")
    with pytest.raises(VerificationError):
        export_onnx(BakedBatch(), (torch.rand(4, 3),), p)
    assert p.read_bytes() == b"previous"


def test_tolerance_is_applied(tmp_path):
    m = digits_mlp().eval()
    rep = export_onnx(m, (torch.randn(3, 1, 8, 8),), tmp_path / "m.onnx", atol=1e-6, rtol=1e-5)
    assert rep["max_abs_diff"] <= 1e-5
    # the bound is atol + rtol * max|reference|: a difference just above it is refused, just below accepted
    from compressor.export import compare

    ref = np.array([[1.0, -2.0]], dtype=np.float32)
    assert compare([ref + 0.009], [ref], atol=0.005, rtol=0.0025) == pytest.approx(0.009, abs=1e-6)
    with pytest.raises(VerificationError, match="disagrees"):
        compare([ref + 0.011], [ref], atol=0.005, rtol=0.0025)


def test_api_export_refusals_write_nothing(tmp_path, trained_cnn):
    from compressor.api import export
    from compressor.errors import InputError

    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(InputError, match="exists"):
        export(trained_cnn, out, input_shape=(1, 8, 8))
    assert out.read_bytes() == b"previous"
    rep = export(trained_cnn, out, input_shape=(1, 8, 8), overwrite=True)
    assert rep["max_abs_diff"] < 1e-4 and onnx.load(str(out)).graph.input[0].name == "input"
    with pytest.raises(InputError, match="already ONNX"):
        export(out, tmp_path / "again.onnx")
    assert not (tmp_path / "again.onnx").exists()


class SlightlyBaked(torch.nn.Module):
    """Off by 1e-3 × (batch size difference) on any batch but the traced one: a small, known disagreement."""

    def forward(self, x):
        return x + 1e-3 * int(x.shape[0])


def test_tolerance_decides_refusal(tmp_path):
    rep = export_onnx(SlightlyBaked(), (torch.rand(4, 3),), tmp_path / "loose.onnx", atol=0.1, rtol=0.0)
    assert 1e-4 < rep["max_abs_diff"] < 0.1
    with pytest.raises(VerificationError, match="disagrees"):
        export_onnx(SlightlyBaked(), (torch.rand(4, 3),), tmp_path / "tight.onnx", atol=1e-5, rtol=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loose.onnx"]


def test_hf_export_with_named_inputs(tmp_path, tiny_bert_folder):
    from compressor.io.models import load_model

    lm = load_model(tiny_bert_folder)
    enc = lm.tokenizer(["first sentence here", "second"], return_tensors="pt", padding=True)
    rep = export_onnx(lm.module, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, tmp_path / "b.onnx")
    assert rep["max_abs_diff"] < 1e-3
    m = onnx.load(str(tmp_path / "b.onnx"))
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
