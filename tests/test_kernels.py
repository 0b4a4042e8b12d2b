"""Sparse kernels: SparseLinear == dense for every format, format choice follows the break-even table,
swap verifies and restores, compact ONNX is smaller and runs the same in onnxruntime, GPU paths (marked
`gpu`, skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compressor import masks as M
from compressor.errors import VerificationError
from compressor.eval import runtime as G
from compressor.kernels import (
    DecisionCache,
    SparseConv2d,
    SparseLinear,
    swap_sparse_kernels,
    unswap_sparse_kernels,
)
from compressor.kernels import calibrate as KC
from compressor.kernels import formats as KF
from compressor.kernels import onnx_sparse as OS

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR) tensor support is in beta")
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch.cuda.is_available() is False: no CUDA device on this machine")


def pruned_linear(o=128, i=256, s=0.9, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < s] = 0
    return lin


def block_weight(o=128, i=128, s=0.9, block=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(o // block, i // block, generator=g) >= s
    return torch.randn(o, i, generator=g) * keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


def pruned_mlp(s=0.95, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
    with torch.no_grad():
        for lin in (m[0], m[2]):
            lin.weight[torch.rand_like(lin.weight) < s] = 0
    return m.eval()


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["dense", "csr", "bsr"])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_dense_fp32(fmt, bias):
    lin = pruned_linear(bias=bias)
    x = torch.randn(3, 5, 256)  # leading dims are flattened and restored
    sl = SparseLinear.from_dense(lin, mode=fmt)
    assert sl.fmt == fmt and sl.weight.layout == {"dense": torch.strided, "csr": torch.sparse_csr, "bsr": torch.sparse_bsr}[fmt]
    with torch.no_grad():
        torch.testing.assert_close(sl(x), lin(x), atol=1e-5, rtol=1e-5)
        back = sl.to_linear()
        assert torch.equal(back.weight, lin.weight)
        torch.testing.assert_close(back(x), lin(x), atol=0, rtol=0)


def test_sparse_linear_uses_masked_weight():
    """A still-parametrized (masked) Linear: the effective, masked weight is what gets packed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    masks = M.magnitude_masks({"0.weight": model[0].weight.detach()}, 0.9)
    M.apply_masks(model, masks)
    x = torch.randn(7, 64)
    sl = SparseLinear.from_dense(model[0], mode="csr")
    assert abs(sl.sparsity - 0.9) < 0.01
    with torch.no_grad():
        torch.testing.assert_close(sl(x), model(x), atol=1e-5, rtol=1e-5)


def test_24_detection_and_cpu_refusal():
    w = torch.randn(64, 128)
    g = w.reshape(64, 32, 4)
    g.scatter_(-1, g.abs().argsort(-1)[..., :2], 0.0)
    assert KF.is_semi_structured_24(w)
    unstructured = pruned_linear(64, 128, 0.5).weight.detach()
    assert not KF.is_semi_structured_24(unstructured)
    ok, why = KF.semi24_support(w.half(), "cpu", torch.float16)
    assert not ok and "CUDA" in why
    with pytest.raises(ValueError, match="not usable"):
        KC.choose_format(w, "cpu", mode="semi24")


def test_sparse_conv2d_matches_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.9] = 0
    x = torch.randn(2, 8, 11, 9)
    for fmt in ("csr", "dense"):
        sc = SparseConv2d(conv, fmt)
        with torch.no_grad():
            torch.testing.assert_close(sc(x), conv(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sc.to_conv()(x), conv(x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- break-even


def test_default_table_choices():
    dense_w = pruned_linear(s=0.5).weight.detach()
    sparse_w = pruned_linear(s=0.95).weight.detach()
    mid_w = pruned_linear(s=0.92).weight.detach()
    t = KC.DEFAULT_TABLE["cpu"]
    assert KC.default_decision(dense_w, "cpu", rows=128).format == "dense"
    assert KC.default_decision(sparse_w, "cpu", rows=128).format == "csr"
    # between the batch threshold and the batch-1 threshold: CSR for 128 rows, dense for 1 row
    assert t["csr_min_sparsity"] <= KF.sparsity(mid_w) < t["csr_min_sparsity_rows1"]
    assert KC.default_decision(mid_w, "cpu", rows=128).format == "csr"
    assert KC.default_decision(mid_w, "cpu", rows=1).format == "dense"
    assert KC.default_decision(block_weight(), "cpu", rows=128).format == "bsr"
    # a custom table moves the break-even point
    strict = {"cpu": dict(t, csr_min_sparsity=0.99, csr_min_sparsity_rows1=0.99), "cuda": KC.DEFAULT_TABLE["cuda"]}
    assert KC.default_decision(sparse_w, "cpu", rows=128, table=strict).format == "dense"
    # SparseLinear follows the same choice
    assert SparseLinear.from_dense(pruned_linear(s=0.95), mode="default").fmt == "csr"
    assert SparseLinear.from_dense(pruned_linear(s=0.5), mode="default").fmt == "dense"


def test_auto_uses_cached_measurement_and_json(tmp_path):
    w = pruned_linear(64, 64, s=0.95).weight.detach()
    path = tmp_path / "kernels.json"
    neighbour = tmp_path / "kernels.tmp"  # a user's file with the name a fixed temp name would take
    neighbour.write_text("keep me")
    cache = DecisionCache(path)
    st = KF.weight_stats(w)
    key = KC.cache_key("cpu", w.shape, st.sparsity, st.is_24, 8, w.dtype)
    cache.put(key, KC.Decision("dense", "measured", "pretend dense won", {"dense": 1.0, "csr": 2.0}))
    d = KC.choose_format(w, "cpu", rows=8, mode="auto", cache=cache)
    assert (d.format, d.source) == ("dense", "cache")  # the table alone would say csr at 95%
    assert KC.choose_format(w, "cpu", rows=8, mode="auto", cache=DecisionCache()).format == "csr"
    reloaded = DecisionCache(path)
    assert reloaded.get(key).format == "dense"
    # written through a unique temp file: the neighbour is untouched and no temp file is left
    assert neighbour.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels.json", "kernels.tmp"]


def test_calibrate_measures_and_caches():
    w = pruned_linear(64, 128, s=0.95).weight.detach()
    cache = DecisionCache()
    d = KC.calibrate(w, None, rows=16, device="cpu", repeats=3, cache=cache, margin=1.05)
    assert d.source == "measured" and {"dense", "csr"} <= set(d.timings_ms)
    if d.format != "dense":  # the chosen format really was >= margin faster in this measurement
        assert d.timings_ms["dense"] / d.timings_ms[d.format] >= 1.05
    else:
        assert all(d.timings_ms["dense"] / v < 1.05 for k, v in d.timings_ms.items() if k != "dense")
    again = KC.calibrate(w, None, rows=16, device="cpu", cache=cache)
    assert again.source == "cache" and again.format == d.format


# ---------------------------------------------------------------------------------------------- swap


def test_swap_replaces_and_verifies():
    m = pruned_mlp()
    x = torch.randn(32, 64)
    with torch.no_grad():
        ref = m(x)
    rep = swap_sparse_kernels(m, (x,), min_sparsity=0.5, mode="csr", repeats=2)
    assert isinstance(m[0], SparseLinear) and isinstance(m[2], SparseLinear) and isinstance(m[4], nn.Linear)
    names = {r.name: r for r in rep.layers}
    assert names["0"].format == "csr" and names["0"].shape == (256, 64) and names["0"].sparsity > 0.9
    assert names["0"].rows == 32 and names["0"].speedup is not None
    assert names["4"].format == "dense" and "min_sparsity" in names["4"].reason
    assert rep.max_abs_diff <= 1e-4
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    assert unswap_sparse_kernels(m) == 2 and isinstance(m[0], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=1e-6)
    assert rep.to_dict()["n_swapped"] == 2
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(rep.table())
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") > 2}
    assert {"0", "2", "4"} <= set(rows) and "csr" in rows["0"] and "dense" in rows["4"] and "256x64" in rows["0"]


def test_swap_restores_on_verification_failure(monkeypatch):
    m = pruned_mlp()
    x = torch.randn(8, 64)
    originals = [m[0], m[2]]
    with torch.no_grad():
        ref = m(x)
    real = SparseLinear.forward
    monkeypatch.setattr(SparseLinear, "forward", lambda self, x: real(self, x) + 0.5)  # a broken kernel
    with pytest.raises(VerificationError, match="restored"):
        swap_sparse_kernels(m, (x,), mode="csr", measure=False)
    assert m[0] is originals[0] and m[2] is originals[1]
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def dense_onnx(tmp_path_factory):
    from compressor.export import export_onnx

    m = pruned_mlp(s=0.9)
    path = tmp_path_factory.mktemp("onnx") / "dense.onnx"
    export_onnx(m, (torch.randn(4, 64),), path)
    return m, path


@pytest.mark.parametrize("method", ["auto", "bitmask", "sparse_initializer"])
def test_compact_onnx_smaller_and_same_outputs(dense_onnx, tmp_path, method):
    import onnx

    model, src = dense_onnx
    dst = tmp_path / "compact.onnx"
    rep = OS.compact_onnx(src, dst, method=method)
    assert dst.stat().st_size == rep["compact_bytes"] < rep["dense_bytes"] == src.stat().st_size
    assert {t["encoding"] for t in rep["tensors"] if t["sparsity"] > 0.85} == {"bitmask" if method == "auto" else method}
    proto = onnx.load(str(dst))
    onnx.checker.check_model(proto)
    if method == "sparse_initializer":
        assert len(proto.graph.sparse_initializer) == 2
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    sess = G.ort_session(dst)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(G.ort_run_batched(sess, x, batch_size=2), ref, atol=1e-5, rtol=1e-4)


def test_compact_onnx_refuses_when_outputs_differ(dense_onnx, tmp_path, monkeypatch):
    _, src = dense_onnx
    real = OS.compact_model

    def corrupt(model, **kw):
        m, rows = real(model, **kw)
        from onnx import numpy_helper

        for i, init in enumerate(m.graph.initializer):
            if init.name.endswith("vals"):
                arr = numpy_helper.to_array(init) * 1.5
                m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
        return m, rows

    monkeypatch.setattr(OS, "compact_model", corrupt)
    dst = tmp_path / "bad.onnx"
    with pytest.raises(VerificationError):
        OS.compact_onnx(src, dst, method="bitmask")
    assert not dst.exists()


# ---------------------------------------------------------------------------------------------- eval helpers


def test_run_batched_cpu_matches_model():
    m = pruned_mlp(s=0.5)
    x = torch.randn(37, 64)
    with torch.no_grad():
        ref = m(x)
    out = G.run_batched(m, torch.utils.data.TensorDataset(x, torch.zeros(37)), batch_size=8, device="cpu")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    import onnxruntime as ort

    assert G.ort_providers("cpu") == ["CPUExecutionProvider"]
    provs = G.ort_providers()  # auto: the CUDA EP first exactly on a GPU whose onnxruntime has it; CPU always last
    assert provs[-1] == "CPUExecutionProvider"
    assert (provs[0] == "CUDAExecutionProvider") == (CUDA and "CUDAExecutionProvider" in ort.get_available_providers())


# ---------------------------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
def test_gpu_semi24_matches_dense_bf16():
    w = torch.randn(256, 512, device="cuda")
    g = w.reshape(256, 128, 4)
    g.scatter_(-1, g.abs().argsort(-1)[..., :2], 0.0)
    lin = nn.Linear(512, 256).cuda()
    with torch.no_grad():
        lin.weight.copy_(w)
    ok, why = KF.semi24_support(w.bfloat16(), "cuda", torch.bfloat16)
    if not ok:
        pytest.skip(f"2:4 not supported here: {why}")
    sl = SparseLinear.from_dense(lin, device="cuda", mode="semi24")
    x = torch.randn(64, 512, device="cuda")
    with torch.no_grad():
        ref = nn.functional.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()).float()
        torch.testing.assert_close(sl(x), ref, atol=5e-2, rtol=2e-2)
        assert sl(x).dtype == torch.float32


@gpu
@needs_cuda
def test_gpu_run_batched_graph_matches_cpu():
    m = pruned_mlp(s=0.5)
    x = torch.randn(100, 64)
    with torch.no_grad():
        ref = m(x)
    for graph in (True, False):
        out = G.run_batched(m, x, batch_size=32, device="cuda", cuda_graph=graph)
        torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    out32 = G.run_batched(m, x, batch_size=32, device="cuda", amp=False, cuda_graph=True)
    torch.testing.assert_close(out32, ref, atol=1e-3, rtol=1e-3)


@gpu
@needs_cuda
def test_gpu_swap_csr_on_cuda():
    m = pruned_mlp(s=0.99)
    x = torch.randn(16, 64)
    rep = swap_sparse_kernels(m, (x,), device="cuda", mode="csr", repeats=2)
    assert rep.device.startswith("cuda") and len(rep.swapped) == 2


def test_cli_bench_kernels_small(tmp_path):
    import json

    from typer.testing import CliRunner

    from compressor.cli import app

    out = tmp_path / "k.json"
    (tmp_path / "k.tmp").write_text("keep me")  # the name a fixed temp name would clobber
    r = CliRunner().invoke(app, ["bench-kernels", "--shapes", "64x128", "--sparsities", "0.9", "--rows", "4",
                                 "--repeats", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "k.tmp").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "k.tmp"]
    run = json.loads(out.read_text())["runs"]["cpu-threads1-custom"]
    assert run["torch"] == torch.__version__ and run["threads"] == 1
    pats = {row["pattern"] for row in run["linear"]}
    assert pats == {"unstructured-0.90", "2:4", "block16-0.90"}
    assert all(row["ms"]["dense"] > 0 and "csr" in row["speedup_vs_dense"] for row in run["linear"])


def test_swap_calibrate_mode_measures_each_layer():
    m = pruned_mlp()
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref = m(x)
    rep = swap_sparse_kernels(m, (x,), mode="calibrate", repeats=2, cache=DecisionCache())
    swept = [r for r in rep.layers if r.name in ("0", "2")]
    assert all(r.source in ("measured", "cache") for r in swept)
    for r in swept:  # swapped exactly when the measurement said a sparse format won
        assert isinstance(m.get_submodule(r.name), SparseLinear) == (r.format != "dense")
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- GPU decisions, with fake timings on CPU
# Timings from issue 13 (H200, bf16): 4096x4096 weight x 4096 tokens, dense 0.168 ms, 2:4 0.65 ms.
H200_4096 = {"dense": 0.52, "dense_half": 0.168, "semi24": 0.65}


def _two_four(o: int, i: int) -> torch.Tensor:
    """A 2:4 weight built by hand: in every group of 4 inputs, entries 0 and 2 kept (independent of masks.py)."""
    w = torch.randn(o, i, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(i // 4)
    return w * keep


def test_decide_measured_slower_24_ends_dense_with_the_ratio():
    d = KC.decide(H200_4096, ["semi24"], margin=1.05, extras={"skipped": {"torchao_24": "torchao is not installed"}})
    assert d.format == "dense" and d.source == "measured" and d.options == {}
    assert "kept dense" in d.reason and "0.26x" in d.reason and "0.650 ms" in d.reason and "0.168 ms" in d.reason
    assert "torchao is not installed" in d.reason


def test_decide_takes_the_searched_cusparselt_algorithm_when_it_wins():
    t = {"dense": 0.5, "dense_half": 0.30, "semi24": 0.31, "semi24_search": 0.20}
    d = KC.decide(t, ["semi24"], margin=1.05, extras={"alg_id": 7})
    assert d.format == "semi24" and d.options == {"alg_id": 7}
    assert "1.50x" in d.reason and "alg 7" in d.reason
    # the searched algorithm only counts when it is faster than the default one
    d = KC.decide(dict(t, semi24_search=0.4), ["semi24"], margin=1.05, extras={"alg_id": 7})
    assert d.format == "dense" and "0.97x" in d.reason


def test_auto_on_cuda_measures_instead_of_trusting_the_table(monkeypatch):
    """The table alone would pick 2:4 for a 2048x2048 weight at 4096 rows; measured slower, it stays dense."""
    monkeypatch.setattr(KF, "semi24_support", lambda w, device, dtype=torch.bfloat16: (True, "cusparselt"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    calls = []

    def fake_measure(w, bias, rows, device, fmts, **kw):
        calls.append((tuple(w.shape), rows, torch.device(device).type, tuple(fmts)))
        kw["extras"]["skipped"] = KF.optional_24_paths()
        return dict(H200_4096, csr=3.0, bsr=2.0)

    monkeypatch.setattr(KC, "measure", fake_measure)
    w = _two_four(2048, 2048)
    assert KC.default_decision(w, "cuda", 4096).format == "semi24"  # what the unmeasured table would do
    d = KC.choose_format(w, "cuda", rows=4096, mode="auto", cache=KC.DecisionCache())
    assert calls == [((2048, 2048), 4096, "cuda", ("csr", "bsr", "semi24"))]
    assert d.format == "dense" and d.source == "measured" and "semi24 0.26x" in d.reason


def test_cusparselt_search_reports_why_it_was_not_tried():
    alg, why = KF.cslt_search(torch.zeros(4, 4), torch.zeros(2, 4))  # a plain tensor is not a cuSPARSELt weight
    assert alg is None and why
    paths = KF.optional_24_paths()
    assert set(paths) == {"torchao_24", "fp8_24"} and all(paths.values())
