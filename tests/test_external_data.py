"""Models past the external-data threshold (compressor/onnx_files.py): the whole ONNX pipeline on small models
with the threshold lowered to 1 KB, checked against the same pipeline in memory and against torch; and (slow)
one genuinely > 2 GiB model through analysis, pruning and onnxruntime, checked against numpy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from compressor import onnx_files
from compressor.errors import InputError


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 96)
        self.fc2 = nn.Linear(96, 40)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _positions(a, atoms, name: str, axis: int) -> np.ndarray:
    """The positions of initializer `name` along `axis` that removing `atoms` removes (from the analysis's
    atom record, not from the pruner)."""
    return next(p for n, ax, p in a.removed_positions(atoms) if n == name and ax == axis)


def _pipeline(root: Path, model: MLP, x: torch.Tensor) -> dict:
    """export -> analyse -> prune -> verified save -> reload -> int8 export; every file's onnxruntime outputs."""
    import copy

    from compressor.export import export_onnx
    from compressor.graph import analyze, prune_onnx
    from compressor.io.models import load_model
    from compressor.onnx_utils import run_onnx, save_onnx_verified
    from compressor.quant import QuantConfig, post_training_quantize
    from compressor.quant.onnx_export import export_quantized

    feeds = {"input": x.numpy()}
    out = {}
    export_onnx(model, (x,), root / "export" / "model.onnx")
    out["export"] = run_onnx(root / "export" / "model.onnx", feeds)[0]
    a = analyze(root / "export" / "model.onnx")
    group = next(g for g in a.groups if g.prunable and len(g.atoms) == 96)  # fc1's outputs / fc2's inputs
    removed = [int(k) for k in np.asarray(group.atoms)[::3]]
    out["rows"] = _positions(a, removed, "fc1.weight", 0)  # what the oracle zeroes
    pruned = prune_onnx(root / "export" / "model.onnx", a, removed)
    save_onnx_verified(pruned, root / "pruned" / "model.onnx", feeds)
    out["pruned"] = run_onnx(root / "pruned" / "model.onnx", feeds)[0]
    loaded = load_model(root / "pruned" / "model.onnx")  # the io path: checker from the path, weights read back
    out["reloaded"] = loaded.outputs(feeds).numpy()
    out["reloaded_size"] = loaded.size_bytes()
    loaded.save(root / "resaved")
    out["resaved"] = run_onnx(root / "resaved" / "model.onnx", feeds)[0]
    q = copy.deepcopy(model)
    qt, _ = post_training_quantize(q, QuantConfig(bits=8, bucket_size=8))
    rep = export_quantized(q, qt, (x,), root / "int8" / "model.onnx", fmt="qdq", atol=1e-5, rtol=1e-5)
    out["int8"] = run_onnx(root / "int8" / "model.onnx", feeds)[0]
    out["int8_report_bytes"] = rep["bytes"]
    with torch.no_grad():
        out["int8_torch"] = q(x).numpy()
    out["removed"] = removed
    out["pruned_model"] = pruned
    return out


def test_whole_onnx_pipeline_through_external_data(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(5, 24)
    monkeypatch.delenv(onnx_files.ENV_VAR, raising=False)
    mem = _pipeline(tmp_path / "memory", model, x)
    monkeypatch.setenv(onnx_files.ENV_VAR, "1024")
    ext = _pipeline(tmp_path / "external", model, x)

    for stage in ("export", "pruned", "resaved", "int8"):
        assert _files(tmp_path / "memory" / stage) == ["model.onnx"], stage
        folder = tmp_path / "external" / stage
        assert _files(folder) == ["model.onnx", "model.onnx.data"], stage  # exactly the pair, no temp left
        head, data = (folder / "model.onnx").stat().st_size, (folder / "model.onnx.data").stat().st_size
        assert head < 8192 and data > 1024 and head < data, (stage, head, data)
        # the header refers to the data file by its final name only
        proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        locs = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locs == {"model.onnx.data"}, stage
        # same onnxruntime outputs as the in-memory path (same weights, same graph)
        np.testing.assert_array_equal(ext[stage], mem[stage], err_msg=stage)
    np.testing.assert_array_equal(ext["reloaded"], mem["reloaded"])
    assert ext["removed"] == mem["removed"]
    assert ext["int8_report_bytes"] == sum(p.stat().st_size for p in (tmp_path / "external" / "int8").iterdir())
    assert ext["reloaded_size"] > 1024  # counted from the weights, not from a serialisation

    # independent oracles: torch. The export is the torch model; the pruned file is the torch model with the
    # removed hidden units zeroed (a zero ReLU unit adds nothing to fc2); int8 is the torch fake-quant forward
    with torch.no_grad():
        ref = model(x).numpy()
        zeroed = MLP().eval()
        zeroed.load_state_dict(model.state_dict())
        rows = torch.as_tensor(mem["rows"])
        assert len(rows) == 32
        zeroed.fc1.weight[rows] = 0
        zeroed.fc1.bias[rows] = 0
        ref_pruned = zeroed(x).numpy()
    np.testing.assert_allclose(ext["export"], ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ext["pruned"], ref_pruned, atol=1e-5, rtol=1e-5)
    assert np.abs(ext["pruned"] - ref).max() > 1e-3  # the pruning changed something
    np.testing.assert_allclose(ext["int8"], ext["int8_torch"], atol=1e-4, rtol=1e-4)
    assert ext["pruned_model"].graph.initializer[0].data_location != TensorProto.EXTERNAL  # caller's model kept


def test_threshold_from_environment(monkeypatch):
    monkeypatch.delenv(onnx_files.ENV_VAR, raising=False)
    assert onnx_files.external_threshold() == onnx_files.EXTERNAL_DATA_BYTES == 1 << 30
    monkeypatch.setenv(onnx_files.ENV_VAR, "4096")
    assert onnx_files.external_threshold() == 4096
    monkeypatch.setenv(onnx_files.ENV_VAR, "lots")
    with pytest.raises(InputError):
        onnx_files.external_threshold()


def _matmul_model(w: np.ndarray):
    from onnx import numpy_helper

    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[1]])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_analysis_export_of_a_large_torch_module_stays_on_the_default_exporter(monkeypatch):
    """Past the threshold the dynamo analysis export has no bytes form: it is verified from a temporary pair,
    not refused into the TorchScript fallback. Oracle: the groups equal those of the same export below it."""
    from compressor.analysis_export import export_for_analysis
    from compressor.graph import analyze

    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = (torch.randn(2, 16),)
    small = export_for_analysis(m, x)
    monkeypatch.setenv(onnx_files.ENV_VAR, "1024")
    large = export_for_analysis(m, x)
    assert onnx_files.is_large(large.model)
    assert (large.exporter, large.note) == ("dynamo", None)
    sizes = lambda a: sorted(g.size for g in a.groups)  # noqa: E731
    assert sizes(analyze(large.model)) == sizes(analyze(small.model))


def test_staged_pair_never_clobbers_a_foreign_data_file_and_replaces_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv(onnx_files.ENV_VAR, "1024")
    m = _matmul_model(np.arange(32 * 16, dtype=np.float32).reshape(32, 16))
    foreign = tmp_path / "model.onnx.data"
    foreign.write_bytes(b"user data")
    with pytest.raises(InputError):
        onnx_files.save_model(m, tmp_path / "model.onnx")
    assert foreign.read_bytes() == b"user data" and _files(tmp_path) == ["model.onnx.data"]
    foreign.unlink()
    onnx_files.save_model(m, tmp_path / "model.onnx")
    assert _files(tmp_path) == ["model.onnx", "model.onnx.data"]
    with pytest.raises(RuntimeError), onnx_files.staged(tmp_path / "model.onnx") as tmp:  # a crash mid-write
        onnx_files.write_model(_matmul_model(np.zeros((32, 16), np.float32)), tmp)
        raise RuntimeError("crash")
    assert _files(tmp_path) == ["model.onnx", "model.onnx.data"]  # untouched, no temp folder left
    back = onnx.load(str(tmp_path / "model.onnx"))
    assert onnx.numpy_helper.to_array(back.graph.initializer[0])[1, 0] == 16
    monkeypatch.delenv(onnx_files.ENV_VAR)
    onnx_files.save_model(m, tmp_path / "model.onnx")  # now small: one file, the old pair's data removed
    assert _files(tmp_path) == ["model.onnx"]


# ------------------------------------------------------------------------------------------- > 2 GiB
D, H = 4096, 81920  # two fp32 weights of 1.25 GiB each: 2.5 GiB, past protobuf's 2 GiB
CHUNK = 2048


def _block(name: str, start: int, rows: int, cols: int) -> np.ndarray:
    """Deterministic weights, generated in chunks (never the whole tensor in memory)."""
    rng = np.random.default_rng([sum(map(ord, name)), start])
    return ((rng.random((rows, cols), dtype=np.float32) - 0.5) * np.float32(2 / np.sqrt(cols))).astype(np.float32)


def _write_big_model(folder: Path) -> Path:
    """x[n, D] -> MatMul W1[D, H] -> Add b1 -> Relu -> MatMul W2[H, D] -> Add b2, written straight to
    model.onnx + model.onnx.data with onnx helpers (the weights go to disk chunk by chunk)."""
    specs = [("w1", (D, H)), ("b1", (H,)), ("w2", (H, D)), ("b2", (D,))]
    inits, offset = [], 0
    with open(folder / "model.onnx.data", "wb") as f:
        for name, shape in specs:
            rows = shape[0] if len(shape) == 2 else 1
            cols = shape[-1]
            for start in range(0, rows, CHUNK):
                f.write(_block(name, start, min(CHUNK, rows - start), cols).tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            for k, v in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(4 * rows * cols))):
                t.external_data.add(key=k, value=v)
            t.data_location = TensorProto.EXTERNAL
            inits.append(t)
            offset += 4 * rows * cols
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    (folder / "model.onnx").write_bytes(m.SerializeToString())  # the graph only: a few hundred bytes
    return folder / "model.onnx"


def _numpy_reference(folder: Path, x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """relu(x W1[:, keep] + b1[keep]) W2[keep] + b2, from memory maps of the data file, block by block."""
    data = np.memmap(folder / "model.onnx.data", dtype=np.float32, mode="r")
    w1 = data[: D * H].reshape(D, H)
    b1 = data[D * H : D * H + H]
    w2 = data[D * H + H : 2 * D * H + H].reshape(H, D)
    b2 = data[2 * D * H + H :]
    y = np.zeros((x.shape[0], D), np.float64)
    for s in range(0, H, 8192):
        cols = np.arange(s, min(s + 8192, H))
        cols = cols[keep[cols]]
        h = np.maximum(x.astype(np.float64) @ w1[:, cols] + b1[cols], 0)
        y += h @ w2[cols]
    return (y + b2).astype(np.float32)


@pytest.mark.slow
def test_over_2gib_model_analysed_pruned_and_run(tmp_path):
    from compressor.graph import analyze, prune_onnx
    from compressor.onnx_utils import run_onnx

    src = tmp_path / "src"
    src.mkdir()
    path = _write_big_model(src)
    assert onnx_files.weight_bytes(onnx.load(str(path), load_external_data=False)) > 2**31
    a = analyze(path)
    group = next(g for g in a.groups if g.prunable and len(g.atoms) == H)
    removed = [int(k) for k in np.asarray(group.atoms)[::10]]
    cols = _positions(a, removed, "w1", 1)
    pruned = prune_onnx(path, a, removed)  # checked and run in onnxruntime from a path
    del a
    assert onnx_files.weight_bytes(pruned) > 2**31 and onnx_files.is_large(pruned)
    out = tmp_path / "out" / "model.onnx"
    onnx_files.save_model(pruned, out)
    del pruned
    assert _files(out.parent) == ["model.onnx", "model.onnx.data"]
    assert out.stat().st_size < 4096 and (out.parent / "model.onnx.data").stat().st_size > 2**31

    x = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)
    got = run_onnx(out, {"x": x})[0]
    keep = np.ones(H, bool)
    keep[cols] = False
    assert keep.sum() == H - len(removed)
    np.testing.assert_allclose(got, _numpy_reference(src, x, keep), atol=1e-3, rtol=1e-3)
    if os.environ.get("COMPRESSOR_BIG_TEST_REPORT"):
        print(f"pruned pair: {out.stat().st_size} + {(out.parent / 'model.onnx.data').stat().st_size} bytes")


def test_pair_with_too_new_ir_version_is_restamped_without_loading_it_whole(tmp_path, monkeypatch):
    """onnxruntime refuses an IR version newer than it knows: the header is re-stamped into a temporary pair
    whose data is copied tensor by tensor from the original .data (the original files are not touched)."""
    from compressor.onnx_utils import ort_max_ir_version, run_onnx

    monkeypatch.setenv(onnx_files.ENV_VAR, "1024")
    w = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    path = tmp_path / "model.onnx"
    onnx_files.save_model(_matmul_model(w), path)
    head = onnx.load(str(path), load_external_data=False)
    head.ir_version = ort_max_ir_version() + 1
    path.write_bytes(head.SerializeToString())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(path, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-5)  # numpy oracle
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.slow  # two recipe runs: ~25 s of CPU
def test_recipe_on_an_onnx_pair_writes_a_pair(tmp_path, monkeypatch, trained_cnn):
    """compress() on an ONNX input kept as model + .data: structured pruning and export write a pair whose
    onnxruntime outputs equal those of the same recipe run with one-file models."""
    from compressor.api import compress
    from compressor.export import export_onnx
    from compressor.onnx_utils import run_onnx

    recipe = {"name": "s", "stages": [{"method": "structured", "ratio": 0.3}, {"method": "export"}]}
    outs = {}
    for mode, threshold in (("memory", None), ("external", "1024")):
        if threshold is None:
            monkeypatch.delenv(onnx_files.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(onnx_files.ENV_VAR, threshold)
        src = tmp_path / mode / "in.onnx"
        export_onnx(trained_cnn, (torch.zeros(2, 1, 8, 8),), src)
        compress(src, recipe, "digits", tmp_path / mode / "out")
        outs[mode] = tmp_path / mode / "out"
    assert _files(outs["memory"]) == ["model.onnx", "report.json"]
    assert _files(outs["external"]) == ["model.onnx", "model.onnx.data", "report.json"]
    x = {"input": np.random.default_rng(5).standard_normal((4, 1, 8, 8)).astype(np.float32)}
    got, ref = run_onnx(outs["external"] / "model.onnx", x)[0], run_onnx(outs["memory"] / "model.onnx", x)[0]
    np.testing.assert_array_equal(got, ref)
    dense = run_onnx(tmp_path / "memory" / "in.onnx", x)[0]
    assert got.shape == dense.shape and np.abs(got - dense).max() > 0  # pruned, not a copy of the input
