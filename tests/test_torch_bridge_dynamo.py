"""The torch bridge on torch's default exporter (compressor.analysis_export): state-dict names survive, the
TorchScript fallback says it was used, and on Swin-like / ViT-like models the torch path prunes what the ONNX
path of the default export prunes. Oracles: the torch model's own tensors (names and values), onnxruntime runs
of exports made by the TorchScript exporter, and the zero-channel oracle (graphs/zero_oracle.py)."""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.analysis_export import export_for_analysis  # noqa: E402
from compressor.export import export_onnx  # noqa: E402
from compressor.graph import analyze, prune_onnx, select  # noqa: E402
from compressor.graph.torch_bridge import distinct_copy, made_tensors, prune_torch  # noqa: E402
from compressor.methods.structured import StructuredParams, structured_torch  # noqa: E402
from graphs.swin import swin_like  # noqa: E402
from graphs.vit import vit_like  # noqa: E402
from graphs.zero_oracle import zero_torch  # noqa: E402


class Mixed(nn.Module):
    """Every kind of tensor the mapping must keep: conv without bias + BN (running stats are buffers), a float
    buffer and a free parameter unsqueezed in forward (the default optimizer folds those into val_* constants), a
    bias table gathered by an index buffer, a square weight tied between two layers, and a tensor the forward
    makes at a stored width (`torch.ones(16)`)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))
        self.shift = nn.Parameter(torch.randn(8) * 0.1)
        self.table = nn.Parameter(torch.randn(5, 8) * 0.1)
        self.register_buffer("index", torch.tensor([4, 0, 2, 1]))
        self.enc, self.dec = nn.Linear(8, 8), nn.Linear(8, 8)
        self.dec.weight = self.enc.weight  # tied
        self.inp, self.proj, self.head = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))) * self.scale[None, :, None, None] + self.shift[None, :, None, None]
        y = y.mean((2, 3)) + self.table[self.index].sum(0)
        h = self.inp(y) + torch.ones(16) * 0.01
        return self.head(self.dec(torch.relu(self.enc(y)))) + self.proj(torch.relu(h))


def _mixed():
    torch.manual_seed(0)
    m = Mixed().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_(0, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m, (torch.randn(2, 3, 6, 6),)


def test_state_dict_names_and_values_survive_the_default_exporter():
    model, inputs = _mixed()
    e = export_for_analysis(distinct_copy(model), inputs)
    assert e.exporter == "dynamo" and e.note is None
    inits = {i.name: numpy_helper.to_array(i) for i in e.model.graph.initializer}
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    names_of: dict[int, set[str]] = {}  # tied weights: one tensor, several names; torch.export keeps one of them
    for n, t in state.items():
        if t.is_floating_point():
            names_of.setdefault(id(t), set()).add(n)
    assert {"enc.weight", "dec.weight"} in names_of.values()
    for names in names_of.values():
        kept = names & set(inits)
        assert len(kept) == 1, (names, kept)
        n = kept.pop()  # the values are the torch tensors (distinct_copy nudges by < 1e-5)
        np.testing.assert_allclose(inits[n], state[n].detach().numpy(), atol=1e-5)
    ops = {n.op_type for n in e.model.graph.node}
    assert "BatchNormalization" in ops and "GatherND" not in ops  # BN kept as a node; table[index] as Gather
    conv = next(n for n in e.model.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 2  # the exporter's zero bias dropped: no tensor without a torch counterpart


def test_structured_cut_of_tied_and_forward_made_tensors():
    """The stage on Mixed: the tied output layer is cut as one tensor; the group that would slice the tensor the
    forward makes (`torch.ones(8)`, a stored width) is probed and frozen with that reason, not cut blindly."""
    model, inputs = _mixed()
    rep = structured_torch(model, inputs, StructuredParams(ratio=0.5, protect_output=False))
    assert rep["exporter"] == "dynamo" and rep["params_after"] < rep["params_before"]
    assert any("a tensor the forward creates" in f["reason"] for f in rep["torch_frozen"]), rep["torch_frozen"]
    assert model.dec.weight is model.enc.weight and model.enc.weight.shape[0] < 8  # still one tensor, and cut
    assert rep["torch_vs_onnx_max_diff"] < 1e-5


def test_keyword_wrapper_prefix_and_structured_cut_of_an_hf_model(tiny_bert_folder):
    """HF models are exported through the keyword-input wrapper (`model.` prefix): names still map, and the
    torch cut computes what the ONNX cut computes (the stage's own check) on the default exporter."""
    from compressor.io.models import load_model

    lm = load_model(tiny_bert_folder)
    enc = lm.tokenizer(["first sentence here", "second"], return_tensors="pt", padding=True)
    ex = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    e = export_for_analysis(distinct_copy(lm.module), ex)
    assert e.exporter == "dynamo"
    names = {i.name for i in e.model.graph.initializer}
    assert "model.embeddings.word_embeddings.weight" in names
    model = copy.deepcopy(lm.module)
    rep = structured_torch(model, ex, StructuredParams(ratio=0.3))
    assert rep["exporter"] == "dynamo" and rep["params_after"] < rep["params_before"]
    assert rep["torch_vs_onnx_max_diff"] < 1e-4


class DataDependent(nn.Module):
    """torch.export refuses a branch on a tensor's value; the TorchScript tracer records the branch taken."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > -1.0:  # always true for a ReLU output: the trace is right for every batch
            h = h * 2.0
        return self.fc2(h)


def test_fallback_to_torchscript_is_said(caplog):
    torch.manual_seed(0)
    model, x = DataDependent().eval(), torch.randn(4, 4)
    with caplog.at_level("WARNING", logger="compressor"):
        rep = structured_torch(copy.deepcopy(model), (x,), StructuredParams(ratio=0.5, protect_output=False))
    assert rep["exporter"] == "torchscript" and "TorchScript" in rep["exporter_note"]
    assert any("TorchScript" in r.getMessage() for r in caplog.records)  # the one-line note on the log
    assert rep["params_after"] < rep["params_before"]
    with pytest.raises(Exception):  # noqa: B017  (exporter=dynamo: no fallback)
        export_for_analysis(model, (x,), "dynamo")


def test_analyze_json_names_the_exporter():
    from compressor.api import analyze as api_analyze

    model, inputs = vit_like()
    data = torch.utils.data.TensorDataset(inputs[0], torch.zeros(2, dtype=torch.long))
    j = api_analyze(model, data=data).to_json()
    assert j["export"]["exporter"] == "dynamo"
    j_ts = api_analyze(model, data=data, exporter="torchscript").to_json()
    assert j_ts["export"]["exporter"] == "torchscript"
    assert j["summary"]["prunable"] > j_ts["summary"]["prunable"]


# ------------------------------------------------------------------ torch path vs the ONNX path, Swin / ViT


def _default_export(model, inputs) -> onnx.ModelProto:
    """What a user gets from torch.onnx.export(model, inputs) with every default (dynamo, optimized)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, inputs, dynamo=True).model_proto


def _onnx_removed(m: onnx.ModelProto, ratio: float, freeze_prefix: tuple[str, ...] = ()) -> tuple[int, float]:
    """(prunable groups, fraction of initializer values removed) of the ONNX path at the torch path's defaults."""
    a = analyze(m)
    groups = len(a.prunable_groups)
    for g in a.groups:  # groups the torch module cannot follow, frozen on the ONNX side too (see the test)
        if g.name.startswith(freeze_prefix) and freeze_prefix:
            g.frozen.update({x: ["frozen for the comparison"] for x in g.atoms})
    p = StructuredParams(ratio=ratio)
    sel = select(a, p.importance, ratio, protect_output=p.protect_output, protect_embeddings=p.protect_embeddings,
                 heads=p.heads, head_dim=False)
    size = lambda mp: sum(int(np.prod(i.dims)) for i in mp.graph.initializer)  # noqa: E731
    return groups, 1 - size(prune_onnx(m, a, sel)) / size(m)


def _torch_removed(model, inputs, ratio: float, exporter: str = "auto") -> tuple[int, float, dict]:
    m = copy.deepcopy(model)
    before = sum(p.numel() for p in m.parameters())  # counted here, from the torch module
    rep = structured_torch(m, inputs, StructuredParams(ratio=ratio, exporter=exporter))
    return rep["prunable_groups"], 1 - sum(p.numel() for p in m.parameters()) / before, rep | {"module": m}


def test_vit_torch_path_prunes_what_the_default_onnx_export_prunes():
    model, inputs = vit_like()
    onnx_groups, onnx_frac = _onnx_removed(_default_export(model, inputs), 0.3)
    # the default export merges equal initializers (a fresh model's LayerNorm weights), which couples groups:
    # the export of a copy whose equal tensors were made distinct is the stronger comparison
    onnx_groups = max(onnx_groups, _onnx_removed(_default_export(distinct_copy(model), inputs), 0.3)[0])
    groups, frac, rep = _torch_removed(model, inputs, 0.3)
    assert rep["exporter"] == "dynamo" and not rep["torch_frozen"]
    assert groups >= onnx_groups and frac >= 0.95 * onnx_frac, (groups, onnx_groups, frac, onnx_frac)
    # the TorchScript export (the bridge's old default) finds fewer groups: what this change is for
    assert _torch_removed(model, inputs, 0.3, "torchscript")[0] < groups
    _check_pruned(model, rep["module"], inputs)


def test_swin_torch_path_prunes_what_the_default_onnx_export_prunes():
    """One group differs by nature: stage 1's residual stream, which the torchvision-style forward reads back as
    `c // heads` to split qkv, so the torch module cannot follow its cut (the bridge probes it and freezes it,
    naming the reshape; the ONNX path rewrites the literal). With that group frozen on both sides the torch path
    removes at least 0.95x what the default export's ONNX path removes, and finds at least its groups."""
    model, inputs = swin_like()
    m = _default_export(model, inputs)
    onnx_groups, _ = _onnx_removed(m, 0.3)
    groups, frac, rep = _torch_removed(model, inputs, 0.3)
    assert rep["exporter"] == "dynamo"
    frozen = [f["group"] for f in rep["torch_frozen"]]
    assert frozen == ["patch_embed.weight:0"] and "Reshape" in rep["torch_frozen"][0]["reason"]
    assert groups + len(frozen) >= onnx_groups, (groups, onnx_groups)
    _, onnx_frac = _onnx_removed(m, 0.3, freeze_prefix=("patch_embed.weight:0",))
    assert frac >= 0.95 * onnx_frac, (frac, onnx_frac)
    _check_pruned(model, rep["module"], inputs)


def _check_pruned(original, pruned, inputs):
    """The pruned torch module runs in onnxruntime like in torch (exported by the TorchScript exporter, which
    shares nothing with the analysis export) and is smaller."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = export_onnx(pruned, inputs, Path(__import__("tempfile").mkdtemp()) / "pruned.onnx", dynamic_batch=False)
    assert rep["max_abs_diff"] < 1e-4
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in original.parameters())


@pytest.mark.parametrize("build", [swin_like, vit_like], ids=["swin", "vit"])
def test_torch_cut_equals_zeroed_channels(build):
    """Zero-channel oracle on the exact groups (MLP hidden widths; LayerNorm-coupled groups are approximate):
    the torch module cut through the dynamo analysis equals the original with those channels zeroed."""
    model, inputs = build()
    a = analyze(export_for_analysis(distinct_copy(model), inputs).model)
    sel = select(a, "l2", 0.3, protect_output=True, head_dim=False)
    exact = {g.id for g in a.groups if not g.approximate}
    atoms = {x for gid, v in sel.per_group.items() if gid in exact for x in v}
    assert atoms
    cut = copy.deepcopy(model)
    prune_torch(cut, a, atoms, made_tensors(cut, a))
    with torch.no_grad():
        got, want = cut(*inputs), zero_torch(model, a.removed_positions(atoms))(*inputs)
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in model.parameters())
    assert (got - want).abs().max() < 1e-4


def test_both_exporters_cut_a_cnn_alike():
    """On a plain CNN both exports give the same groups, the same cut and the same MACs per sample (the dynamo
    export has the batch of 16 baked in; the report divides it out)."""
    from compressor.models import digits_cnn

    torch.manual_seed(0)
    model, x = digits_cnn().eval(), torch.randn(16, 1, 8, 8)
    reps = {ex: structured_torch(copy.deepcopy(model), (x,), StructuredParams(ratio=0.5, exporter=ex))
            for ex in ("dynamo", "torchscript")}
    keys = ("prunable_groups", "removed_channels", "params_after", "macs_before", "macs_after")
    assert {k: reps["dynamo"][k] for k in keys} == {k: reps["torchscript"][k] for k in keys}
    assert reps["dynamo"]["exporter"] == "dynamo" and reps["torchscript"]["exporter"] == "torchscript"
