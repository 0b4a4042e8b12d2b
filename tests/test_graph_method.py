"""The torch bridge, the `structured` recipe method and `compress analyze`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import graphs
from compressor.errors import RecipeError
from compressor.export import export_onnx
from compressor.graph import analyze, prune_onnx, select
from compressor.graph.torch_bridge import prune_torch
from compressor.methods.structured import StructuredParams, structured_onnx, structured_torch
from compressor.models import digits_cnn
from compressor.onnx_utils import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.mark.parametrize("name", ["residual", "grouped", "bert", "llama"])
def test_bridge_matches_onnx_pruning(tmp_path, name):
    """The torch cut computes exactly what the ONNX cut computes (heads pruned whole on the torch side)."""
    entry = graphs.ZOO[name]
    if "hf" in entry.tags:
        pytest.importorskip("transformers", reason="Hugging Face zoo models need transformers (the hf extra)")
    model, inputs = entry.build()
    path = tmp_path / "m.onnx"
    graphs.export(name, path)
    a = analyze(path)
    sel = select(a, "l2", 0.4, heads=True, head_dim=False, protect_output=False, protect_embeddings=False)
    pruned = prune_onnx(onnx.load(str(path)), a, sel)
    before = sum(p.numel() for p in model.parameters())
    prune_torch(model, a, sel)
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        out = model(*inputs)
    got = run(pruned, {n: t.numpy() for n, t in zip(entry.input_names, inputs, strict=True)})[0]
    np.testing.assert_allclose(got, out.numpy(), atol=1e-5)
    # the pruned torch model still exports and verifies (it can be fine-tuned and re-exported)
    export_onnx(model, inputs, tmp_path / "again.onnx", input_names=list(entry.input_names))


def test_structured_torch_taylor_and_reexport(tmp_path, digits):
    torch.manual_seed(0)
    model = digits_cnn().eval()  # the method prunes in place
    x = digits.test.tensors[0][:16]
    batches = [(digits.train.tensors[0][:64], digits.train.tensors[1][:64])]
    rep = structured_torch(model, (x,), StructuredParams(ratio=0.5, importance="taylor", protect_output=False),
                           batches=batches)
    assert rep["params_after"] < rep["params_before"] and rep["mac_reduction"] > 0.3
    assert rep["torch_vs_onnx_max_diff"] < 1e-4
    export_onnx(model, (x,), tmp_path / "pruned.onnx")


def test_structured_onnx_refuses_taylor_and_prunes(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "cnn.onnx"
    export_onnx(digits_cnn().eval(), (torch.randn(2, 1, 8, 8),), path)
    model = onnx.load(str(path))
    with pytest.raises(RecipeError, match="taylor"):
        structured_onnx(model, StructuredParams(importance="taylor"))
    pruned, rep = structured_onnx(model, StructuredParams(ratio=0.5, target="macs", protect_output=False))
    assert rep["mac_reduction"] >= 0.5 and rep["params_after"] < rep["params_before"]
    onnx.checker.check_model(pruned)


@pytest.mark.slow
def test_recipe_end_to_end(tmp_path, trained_cnn):
    from compressor.api import compress
    from compressor.recipe import load_recipe

    rec = load_recipe("channel-prune-50")
    res = compress(trained_cnn, rec, "digits", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "report.json").exists()
    stage = res.report["stages"][0]
    assert stage["method"] == "structured"
    assert stage["result"]["mac_reduction"] > 0.5  # 50 % of every group's channels: measured 0.728
    assert res.after["params"] < res.before["params"]


def test_cli_analyze(tmp_path):
    from compressor.cli import app

    torch.manual_seed(0)
    path = tmp_path / "cnn.onnx"
    export_onnx(digits_cnn().eval(), (torch.randn(2, 1, 8, 8),), path)
    r = CliRunner().invoke(app, ["analyze", str(path), "--json"])
    assert r.exit_code == 0, r.output
    js = json.loads(r.output)
    assert js["summary"]["prunable"] >= 2 and all("members" in g for g in js["groups"])
    r = CliRunner().invoke(app, ["analyze", str(path), "--all"])
    assert r.exit_code == 0 and "graph output" in r.output
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    r = CliRunner().invoke(app, ["analyze", str(bad)])
    assert r.exit_code == 2 and "error" in r.output


def test_structured_torch_hf_keyword_inputs():
    """HF models take keyword inputs: the export wraps them, the bridge still finds every parameter."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    rep = structured_torch(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                           StructuredParams(ratio=0.5, heads=True))
    assert rep["params_after"] < rep["params_before"] and rep["torch_vs_onnx_max_diff"] < 1e-4
    attn = model.encoder.layer[0].attention.self
    # BertConfig derives head_dim from hidden_size / num_attention_heads: no config.json says fewer heads of the
    # same head_dim, so the heads stay (and the report says why); the FFN is cut
    assert attn.query.out_features == 32 and attn.num_attention_heads == 4 and model.config.num_attention_heads == 4
    assert rep["heads"]["heads_after"] == rep["heads"]["heads_before"] == 8
    assert "bert derives head_dim from hidden_size / num_attention_heads" in rep["heads"]["note"]
    assert model.encoder.layer[0].intermediate.dense.out_features == 32
