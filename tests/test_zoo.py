"""The reference model zoo (graphs/): entries build deterministically, their `expected` data names real
parameters and axes, and every entry exports with the project's exporter (verified in onnxruntime) keeping
parameter names as initializer names and BatchNormalization unfolded."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import graphs  # noqa: E402
from graphs.tp_oracle import _owners, axis_label  # noqa: E402

ALL = list(graphs.ZOO)
HAND = graphs.names(exclude=("hf",))
HF = graphs.names("hf")


def test_registry_covers_the_brief():
    assert {"cnn", "residual", "concat", "depthwise", "grouped", "mlp", "split"} <= set(HAND)
    assert {"bert", "gpt2", "llama", "vit", "bert_sdpa", "gpt2_sdpa", "llama_sdpa", "vit_sdpa"} <= set(HF)
    for e in graphs.ZOO.values():
        assert e.description and e.source and e.expected and e.ignored and e.input_names


def _members_in(expected: dict):
    for key in ("groups", "tied", "separate"):
        for group in expected.get(key, []):
            yield from group
    yield from expected.get("frozen", [])


@pytest.mark.parametrize("name", ALL)
def test_expected_names_real_parameters_and_axes(name):
    """Typos in hand-written expectations would make every oracle pass vacuously: check each member exists
    and that its axis label is an axis that parameter has."""
    model, _ = graphs.ZOO[name].build()
    owners = _owners(model)
    params = dict(model.named_parameters())
    for pname, label in _members_in(graphs.ZOO[name].expected):
        assert pname in params, f"{name}: expected names unknown parameter {pname}"
        labels = {axis_label(model, pname, d, owners) for d in range(params[pname].dim())}
        assert label in labels, f"{name}: {pname} has axes {labels}, not {label!r}"
    for ign in graphs.ZOO[name].ignored:
        assert ign in dict(model.named_modules())


@pytest.mark.parametrize("name", HAND)
def test_hand_written_groups_partition_the_out_channels(name):
    """Each conv/linear output axis is in exactly one expected group, or frozen (reaches the output)."""
    model, _ = graphs.ZOO[name].build()
    exp = graphs.ZOO[name].expected
    count = Counter(m for g in exp["groups"] for m in map(tuple, g))
    frozen = {tuple(m) for m in exp["frozen"]}
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d | nn.Linear):
            member = (f"{mname}.weight", "out")
            assert count[member] + (member in frozen) == 1, f"{name}: {member} in {count[member]} groups"


@pytest.mark.parametrize("name", ALL)
def test_build_is_seeded_eval_and_fast(name):
    graphs.ZOO[name].build()  # warm the import of transformers for HF entries
    t = time.perf_counter()
    m1, x1 = graphs.ZOO[name].build()
    with torch.no_grad():
        y1 = m1(*x1)
    elapsed = time.perf_counter() - t
    m2, x2 = graphs.ZOO[name].build()
    assert not m1.training
    assert all(torch.equal(a, b) for a, b in zip(x1, x2, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))
    with torch.no_grad():
        assert torch.equal(y1, m2(*x2))
    assert isinstance(y1, torch.Tensor) and torch.isfinite(y1).all()
    assert elapsed < 2.0, f"{name}: build + forward took {elapsed:.2f} s"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_export")
    cache: dict[str, tuple] = {}

    def get(name):
        if name not in cache:
            t = time.perf_counter()
            report = graphs.export(name, root / f"{name}.onnx")
            cache[name] = (onnx.load(str(root / f"{name}.onnx")), report, time.perf_counter() - t)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ALL)
def test_export_keeps_names_and_batchnorm(exported, name):
    proto, report, _ = exported(name)
    assert report["max_abs_diff"] < 1e-3  # onnxruntime agrees with torch on two batches
    model, _ = graphs.ZOO[name].build()
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    for pname, p in model.named_parameters():
        # every parameter is its own initializer, same name, same (torch) layout: nothing folded, transposed
        # or deduplicated (the exporter merges equal-valued initializers, hence the zoo's random init)
        assert inits.get(pname) == list(p.shape), f"{name}: {pname} is not an initializer of shape {list(p.shape)}"
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == n_bn
    assert [o.name for o in proto.graph.output] == list(graphs.ZOO[name].output_names)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param, f"{name}: batch axis is not dynamic"


def test_whole_zoo_exports_quickly(exported):
    total = sum(exported(n)[2] for n in ALL)
    assert total < 60, f"building + exporting the zoo took {total:.1f} s"


def test_export_dedup_hazard_is_real(tmp_path):
    """Why the zoo re-draws HF parameters: with HF's own init (zero biases, unit LayerNorm scales) the exporter
    merges equal-valued parameters into one initializer, so unrelated layers would share a tensor."""
    pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")
    from transformers import BertConfig, BertModel

    from compressor.export import export_onnx

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    export_onnx(model, {"input_ids": ids}, tmp_path / "b.onnx")
    inits = {i.name for i in onnx.load(str(tmp_path / "b.onnx")).graph.initializer}
    missing = [n for n, _ in model.named_parameters() if f"model.{n}" not in inits and n not in inits]
    assert missing, "the exporter no longer deduplicates equal initializers: graphs/hf.py's note can go"
