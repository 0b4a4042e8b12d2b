"""Quantizer properties (Polino et al. 2018) and quantized ONNX export agreeing with the torch fake-quant forward."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compressor.errors import InputError, VerificationError
from compressor.quant import QuantConfig, compression_ratio, post_training_quantize, quantize, quantize_tensor
from compressor.quant.onnx_export import build_quantized_onnx, export_quantized

pytest.importorskip("hypothesis", reason="hypothesis (the dev extra) is not installed")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), bucket=st.sampled_from([None, 1, 7, 16, 256]), layout=st.sampled_from(["flat", "row"]),
       rows=st.integers(1, 9), cols=st.integers(1, 70), seed=st.integers(0, 10_000))
def test_linear_levels_and_error_bound(bits, bucket, layout, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(rows, cols, generator=g) * 3
    q = quantize_tensor(v, bits, bucket, layout=layout)
    s = 2**bits
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= s - 1
    deq = q.dequantize()
    assert deq.shape == v.shape
    # error bound: at most half a step of its own bucket (plus float slack)
    from compressor.quant.quantizer import bucketize

    vb, k = bucketize(v, bucket, layout)
    db, _ = bucketize(deq, bucket, layout)
    err = (vb - db).abs()
    assert torch.all(err <= q.scale[:, None] / 2 + 1e-5 * (1 + vb.abs()))
    # every bucket's values lie on a grid of s levels between its min and max, min and max attained
    grid = torch.round((db - q.offset[:, None]) / q.scale[:, None])
    assert torch.allclose(grid * q.scale[:, None] + q.offset[:, None], db, atol=1e-5)
    assert torch.all(grid >= -1e-3) and torch.all(grid <= s - 1 + 1e-3)
    spread = vb.max(1).values - vb.min(1).values
    full = spread > 1e-6
    assert torch.all(q.codes.amax(1)[full] == s - 1) and torch.all(q.codes.amin(1) == 0)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), bucket=st.sampled_from([None, 5, 16]), seed=st.integers(0, 10_000), shift=st.floats(-3, 3))
def test_affine_integer_zero_point(bits, bucket, seed, shift):
    v = torch.randn(4, 24, generator=torch.Generator().manual_seed(seed)) + shift
    q = quantize_tensor(v, bits, bucket, scaling="affine", layout="row")
    s = 2**bits
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= s - 1
    assert int(q.zero_point.min()) >= 0 and int(q.zero_point.max()) <= s - 1
    from compressor.quant.quantizer import bucketize

    vb, _ = bucketize(v, bucket, "row")
    db, _ = bucketize(q.dequantize(), bucket, "row")
    # the integer zero point shifts the grid by up to half a step: error ≤ one step
    assert torch.all((vb - db).abs() <= q.scale[:, None] * (1 + 1e-4))
    # zero is exactly representable (code == zero point)
    x = v.clone()
    x[:, 3] = 0.0
    assert torch.all(quantize_tensor(x, bits, bucket, scaling="affine", layout="row").dequantize()[:, 3] == 0)


def test_levels_count_is_2_to_the_bits_per_bucket():
    v = torch.linspace(-1, 1, 4096)
    for bits in (2, 3, 4, 8):
        q = quantize_tensor(v, bits, 512)
        for row in q.codes:
            assert len(torch.unique(row)) == 2**bits
        absmax = quantize_tensor(v, bits, 512, scaling="absmax")
        assert len(torch.unique(absmax.codes[0])) <= 2**bits - 1


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(300, generator=g)
    v[0], v[1] = 0.0, 1.0  # fix the bucket's min/max so the grid is the same in every draw
    det = quantize(v, 2, None)
    acc = torch.zeros_like(v)
    n = 3000
    for _ in range(n):
        acc += quantize(v, 2, None, stochastic=True, generator=g)
    mean = acc / n
    step = 1 / 3
    # stochastic: mean error ~ step·sqrt(p(1-p)/n) ≤ 0.0031; deterministic rounding is biased by up to step/2
    assert float((mean - v).abs().max()) < 0.015
    assert float((det - v).abs().max()) > 0.1 * step


def test_compression_ratio_matches_recipes_numbers():
    assert compression_ratio(4, 256) == pytest.approx(7.53, abs=0.01)
    assert compression_ratio(2, 256) == pytest.approx(14.2, abs=0.05)
    # a commonly quoted 3.82 for 8 bit is off: the formula gives 256·32 / (256·8 + 64) = 3.879
    assert compression_ratio(8, 256) == pytest.approx(3.879, abs=0.001)


@pytest.mark.parametrize("bits", [1, 9, 0, 3.5])
def test_unsupported_bit_width(bits):
    with pytest.raises(InputError, match="bit width"):
        quantize_tensor(torch.randn(10), bits)


def test_constant_bucket_is_exact():
    v = torch.full((40,), 0.25)
    assert torch.equal(quantize(v, 2, 16), v)


# --------------------------------------------------------------------------------------------- export


class Tiny(nn.Module):
    """conv + BN + a layer type with no quantized kernel (PReLU) + 3-D Linear (MatMul path) + 2-D Linear (Gemm)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.PReLU()
        self.proj = nn.Linear(16, 32)
        self.fc = nn.Linear(6 * 8 * 32, 10)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))  # [N, 6, 8, 16]
        x = self.proj(x)  # Linear on the last axis: Transpose + MatMul in ONNX
        return self.fc(torch.flatten(x, 1))


def _tiny():
    torch.manual_seed(0)
    m = Tiny().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 2)
    return m


@pytest.mark.parametrize("scaling,layout,bucket", [("linear", "row", 32), ("absmax", "row", None), ("linear", "flat", 64),
                                                   ("absmax", "flat", 16), ("affine", "row", 16), ("affine", "row", None)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qdq_export_matches_torch_fake_quant(tmp_path, scaling, layout, bucket, bits):
    m = _tiny()
    qt, info = post_training_quantize(m, QuantConfig(bits=bits, bucket_size=bucket, scaling=scaling, layout=layout))
    assert {d["layer"] for d in info["plan"]["kept_float"]} >= {"bn", "act"}  # reported, left in float
    x = torch.randn(5, 1, 8, 16)
    rep = export_quantized(m, qt, (x,), tmp_path / "m.onnx", fmt="qdq", atol=1e-5, rtol=1e-5)
    assert rep["max_abs_diff_unoptimized"] < 2e-6
    model = onnx.load(str(tmp_path / "m.onnx"))
    names = {i.name for i in model.graph.initializer}
    assert not ({"conv.weight", "proj.weight", "fc.weight"} & names)  # float weights are gone
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") == 3
    if scaling == "absmax" and layout == "row" and bucket is None:  # canonical per-channel symmetric QDQ ...
        dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        # ... except before MatMul, where onnxruntime would fuse it into int8-activation MatMulNBits
        assert "conv.weight" in dq and "fc.weight" in dq and "proj.weight" not in dq
    assert rep["bytes"] < rep["fp32_bytes"] / (2.5 if bits == 8 else 4)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("scaling", ["linear", "absmax", "affine"])
def test_matmulnbits_export_runs_and_agrees(tmp_path, bits, scaling):
    m = _tiny()
    qt, _ = post_training_quantize(m, QuantConfig(bits=bits, bucket_size=16, scaling=scaling, layout="row"))
    x = torch.randn(4, 1, 8, 16)
    # stated tolerance: MatMulNBits rebuilds the offset as (q - zp)·scale with a float zp = -β/scale,
    # i.e. ~1 ulp per weight, then accumulates in its own order -> 1e-4 absolute + 1e-4 relative
    rep = export_quantized(m, qt, (x,), tmp_path / "n.onnx", fmt="nbits", atol=1e-4, rtol=1e-4)
    assert rep["layers"]["proj.weight"].startswith("MatMulNBits") and rep["layers"]["fc.weight"].startswith("MatMulNBits")
    assert "DequantizeLinear" in rep["layers"]["conv.weight"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "n.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 and "Gemm" not in ops and "Transpose" not in ops


def test_matmulnbits_fallback_reported(tmp_path):
    m = _tiny()
    qt, _ = post_training_quantize(m, QuantConfig(bits=3, bucket_size=16))
    rep = export_quantized(m, qt, (torch.randn(2, 1, 8, 16),), tmp_path / "n.onnx", fmt="nbits")
    assert "not MatMulNBits: 3-bit" in rep["layers"]["fc.weight"]


def test_export_refuses_wrong_quantized_weights(tmp_path):
    """The oracle can fail: integer codes that do not match the torch weights are refused, nothing written."""
    m = _tiny()
    qt, _ = post_training_quantize(m, QuantConfig(bits=4, bucket_size=16))
    bad = copy.deepcopy(qt)
    bad["fc.weight"].codes = (bad["fc.weight"].codes + 1).clamp(max=15)
    with pytest.raises(VerificationError):
        export_quantized(m, bad, (torch.randn(2, 1, 8, 16),), tmp_path / "bad.onnx", fmt="qdq", atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "bad.onnx").exists()


def test_codebook_export_is_exact():
    """Non-uniform points (differentiable quantization) export through Gather; checked in onnxruntime."""
    from compressor.export import run_onnx
    from compressor.quant.quantizer import QuantizedTensor

    codes = torch.randint(0, 4, (6 * 2, 16), dtype=torch.int16)  # row layout, bucket 16, 2 buckets per row
    qt = QuantizedTensor(codes, torch.rand(12) + 0.1, torch.randn(12), (6, 20), 2, "row", 16, codebook=torch.tensor([0.0, 0.1, 0.7, 1.0]))
    lin = nn.Linear(20, 6)
    with torch.no_grad():
        lin.weight.copy_(qt.dequantize())
    import tempfile
    from pathlib import Path

    from compressor.export import export_onnx

    with tempfile.TemporaryDirectory() as d:
        export_onnx(lin, (torch.randn(3, 20),), Path(d) / "f.onnx")
        qm, _ = build_quantized_onnx(onnx.load(str(Path(d) / "f.onnx")), {"weight": qt})
    x = np.random.default_rng(0).standard_normal((3, 20)).astype(np.float32)
    got = run_onnx(qm.SerializeToString(), {"input": x})[0]
    np.testing.assert_allclose(got, lin(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 16)

    def forward(self, ids):
        return self.out(self.norm(self.emb(ids)))


@pytest.mark.parametrize("fmt,scaling", [("qdq", "linear"), ("nbits", "linear"), ("nbits", "affine"), ("qdq", "absmax")])
def test_embedding_rows_quantized_and_gathered(tmp_path, fmt, scaling):
    torch.manual_seed(0)
    m = TokenModel().eval()
    qt, info = post_training_quantize(m, QuantConfig(bits=4, bucket_size=16, embedding_bits=4, scaling=scaling))
    assert "emb.weight" in qt and qt["emb.weight"].codes.shape == (50, 16)  # one bucket per row
    assert [d["layer"] for d in info["plan"]["kept_float"]] == ["norm"]
    ids = torch.randint(0, 50, (3, 7))
    rep = export_quantized(m, qt, (ids,), tmp_path / "e.onnx", fmt=fmt, atol=1e-5, rtol=1e-5)
    assert rep["layers"]["emb.weight"].startswith("Gather on 4-bit codes")
    assert rep["max_abs_diff_unoptimized"] < 1e-5
    # plain (non-embedding) default leaves the table float and says so
    _, info2 = post_training_quantize(TokenModel(), QuantConfig(bits=4))
    assert {d["layer"] for d in info2["plan"]["kept_float"]} == {"emb", "norm"}


def test_reused_fp32_graph_gets_the_trained_parameters(tmp_path):
    """fp32_onnx of the model *before* training: every parameter (not just quantized ones) is refreshed."""
    from compressor.export import export_onnx

    m = _tiny()
    x = torch.randn(3, 1, 8, 16)
    export_onnx(m, (x,), tmp_path / "before.onnx")
    before = onnx.load(str(tmp_path / "before.onnx"))
    with torch.no_grad():
        m.bn.weight.mul_(1.5)
        m.proj.bias.add_(0.3)  # float parameters changed by "training"
    qt, _ = post_training_quantize(m, QuantConfig(bits=4, bucket_size=16))
    rep = export_quantized(m, qt, (x,), tmp_path / "q.onnx", fmt="nbits", fp32_onnx=before, atol=1e-5, rtol=1e-4)
    assert rep["max_abs_diff_unoptimized"] < 1e-4
