"""Streaming structured pruning of Hugging Face checkpoint folders (compressor.checkpoint).

Oracle: the source model loaded by transformers with the removed positions zeroed in torch, the positions taken
from Analysis.removed_positions (not from the cut plan the code slices by), compared with the pruned folder
loaded by transformers from its own config.json. Expected config fields are counted from the selection's atoms.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import weakref
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")
safetensors = pytest.importorskip("safetensors")

from compressor.checkpoint import checkpoint_scores, prune_checkpoint  # noqa: E402
from compressor.checkpoint.hfconfig import updated_config  # noqa: E402
from compressor.checkpoint.shards import Checkpoint  # noqa: E402
import compressor.checkpoint.shards as shards  # noqa: E402
from compressor.checkpoint.verify import verify_pruned  # noqa: E402
from compressor.errors import InputError, VerificationError  # noqa: E402
from compressor.graph import analyze, select  # noqa: E402

VOCAB = 128


def small_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over the most common words of the shipped sentences (ids < vocab)."""
    from collections import Counter
    from importlib import resources

    from tokenizers import Tokenizer, models, pre_tokenizers

    text = resources.files("compressor").joinpath("data/sentences.txt").read_text(encoding="utf-8").lower().split()
    words = ["<unk>", "<s>", "</s>"] + [w for w, _ in Counter(text).most_common(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="</s>")


def llama(tied=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied, eos_token_id=2, bos_token_id=1)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def save(model, folder: Path, dtype=torch.float32, shard="24KB") -> Path:
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    small_tokenizer().save_pretrained(folder)
    model.float()
    return folder


def export_analysis(model):
    from compressor.export import export_onnx
    from compressor.graph.torch_bridge import distinct_copy

    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        export_onnx(distinct_copy(model), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, Path(d) / "m.onnx")
        return analyze(Path(d) / "m.onnx")


def zeroed_reference(folder: Path, analysis, atoms, ids):
    """The source model's logits with every removed position zeroed (positions from removed_positions)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, axis, pos in analysis.removed_positions(atoms):
            key = name[len("model."):] if name.startswith("model.") else name
            if key in params:
                params[key].index_fill_(axis, torch.as_tensor(pos, dtype=torch.long), 0)
        return model(input_ids=ids).logits


def folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory):
    model = llama()
    root = tmp_path_factory.mktemp("llama")
    folders = {"fp32": save(model, root / "fp32"), "bf16": save(model, root / "bf16", torch.bfloat16)}
    return model, export_analysis(model), folders


def removed_by_kind(analysis, sel) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for g in analysis.groups:
        out.setdefault(f"{g.kind}:{g.size}", []).append(len(sel.per_group.get(g.id, [])))
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_heads_and_ffn_cut_matches_zeroed_source(llama_case, tmp_path, dtype):
    _, a, folders = llama_case
    src = folders[dtype]
    before = folder_digest(src)
    sel = select(a, checkpoint_scores(src, a), 0.5, heads=True, head_dim=False)
    out = tmp_path / "pruned"
    rep = prune_checkpoint(src, a, sel, out, max_shard_size=20_000, verify="layers" if dtype == "bf16" else "none")
    assert folder_digest(src) == before  # the source is only read
    if dtype == "bf16":  # the built-in check agrees with the test's own oracle below
        assert rep["verification"]["max_abs_diff"] < 1e-4 and rep["verification"]["generated_tokens"] == 4
    # expected widths from the selection itself: KV groups (size 2), query heads per KV group (size 4), FFN (96)
    kinds = removed_by_kind(a, sel)
    kv_removed, q_removed = set(kinds["heads:2"]), set(kinds["heads:4"])
    assert len(kv_removed) == len(q_removed) == 1 and set(kinds["channels:96"]) == {48}
    kv = 2 - kv_removed.pop()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == kv and cfg["num_attention_heads"] == kv * (4 - q_removed.pop())
    assert cfg["intermediate_size"] == 48 and cfg["head_dim"] == 8 and cfg["hidden_size"] == 64
    # shards: several, each under the bound (+ its header), dtype kept, index complete
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == rep["shards"] > 1
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    for name in shards:  # a tensor over the bound gets a shard of its own
        with safetensors.safe_open(out / name, framework="pt") as f:
            tensors = [f.get_tensor(k) for k in f.keys()]
        assert {t.dtype for t in tensors} == {want}
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors) <= 20_000
    assert set(index["weight_map"]) == set(Checkpoint(src).keys())
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    ids = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
    ref = zeroed_reference(src, a, sel.atoms, ids)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = pruned(input_ids=ids).logits
        gen = pruned.generate(ids[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=2)
    assert float((got - ref).abs().max()) < 1e-4
    assert gen.shape == (1, 7)
    assert rep["params_after"] == sum(p.numel() for p in pruned.parameters())


def test_reads_and_writes_one_tensor_at_a_time(llama_case, tmp_path, monkeypatch):
    _, a, folders = llama_case
    live, peak, reads = set(), [0], []
    real = Checkpoint.read

    def tracked(self, key):
        t = real(self, key)
        reads.append(key)
        live.add(key)
        peak[0] = max(peak[0], len(live))
        weakref.finalize(t, live.discard, key)
        return t

    monkeypatch.setattr(Checkpoint, "read", tracked)
    monkeypatch.setattr(shards, "QUEUE_BYTES", 0)  # no queue: one tensor produced while the writer has the last
    scores = checkpoint_scores(folders["fp32"], a)
    assert peak[0] == 1
    sel = select(a, scores, 0.25, head_dim=False)  # FFN only
    reads.clear()
    prune_checkpoint(folders["fp32"], a, sel, tmp_path / "out", max_shard_size=20_000, verify="none")
    assert peak[0] <= 2  # the tensor being written and the next one, never more of the checkpoint at once
    assert sorted(reads) == sorted(Checkpoint(folders["fp32"]).keys())  # each tensor read exactly once


def test_shard_writer_bounds_its_queue_and_reports_its_errors(tmp_path):
    """The writer thread's queue: a put that would go over the byte budget waits for the writer (here: a writer
    not yet started), one item is always let through, and a failed write is raised on the producer's side."""
    import threading

    w = shards._Writer(100)
    w.put(("open", tmp_path / "a.bin"), 0)
    w.put(("data", b"x" * 60), 60)
    second = threading.Thread(target=w.put, args=(("data", b"y" * 60), 60))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # 120 bytes would be queued: waits for the writer
    w.start()
    second.join(5)
    assert not second.is_alive()
    w.put(("close", None), 0)
    w.finish()
    assert (tmp_path / "a.bin").read_bytes() == b"x" * 60 + b"y" * 60
    big = shards._Writer(10)
    big.start()
    big.put(("open", tmp_path / "b.bin"), 0)
    big.put(("data", b"z" * 50), 50)  # larger than the budget: alone in the queue, so let through
    big.put(("close", None), 0)
    big.finish()
    assert (tmp_path / "b.bin").stat().st_size == 50
    bad = shards._Writer(100)
    bad.start()
    bad.put(("open", tmp_path / "missing" / "c.bin"), 0)
    with pytest.raises(FileNotFoundError):
        bad.finish()


def test_verification_whole_and_by_layer_and_it_catches_a_wrong_cut(llama_case, tmp_path):
    _, a, folders = llama_case
    src = folders["fp32"]
    sel = select(a, checkpoint_scores(src, a), 0.5, heads=True, head_dim=False)
    rep = prune_checkpoint(src, a, sel, tmp_path / "out", verify="model")
    assert rep["verification"]["max_abs_diff"] < 1e-4 and rep["verification"]["generated_tokens"] == 4
    plan = {k.replace("model.model.", "model."): v for k, v in
            __import__("compressor.graph.torch_bridge", fromlist=["cut_plan"]).cut_plan(a, sel).items()}
    layered = verify_pruned(src, tmp_path / "out", plan, mode="layers")
    assert layered["layers"] == 2 and layered["max_abs_diff"] < 1e-4 and layered["generated_tokens"] == 4
    # the same folder against a plan that names other FFN channels: both oracles must object
    key = "model.layers.1.mlp.down_proj.weight"
    wrong = {k: dict(v) for k, v in plan.items()}
    wrong[key] = {1: [(i + 1) % 96 for i in plan[key][1]]}
    for mode in ("model", "layers"):
        with pytest.raises(VerificationError, match="differs from the zeroed source"):
            verify_pruned(src, tmp_path / "out", wrong, mode=mode)


def test_refuses_cuts_config_json_cannot_express(llama_case, tmp_path):
    _, a, folders = llama_case
    src = folders["fp32"]
    with pytest.raises(InputError, match="head_dim"):  # dims within heads
        prune_checkpoint(src, a, select(a, "random", 0.5, head_dim=True), tmp_path / "a")
    ffn = [g for g in a.groups if g.kind == "channels" and g.size == 96]
    with pytest.raises(InputError, match="different intermediate_size per layer"):
        prune_checkpoint(src, a, set(ffn[0].atoms[:5]), tmp_path / "b")  # one layer only
    with pytest.raises(InputError, match="transformers refuses"):  # 8 -> 3 heads: 64 % 3 != 0
        prune_checkpoint(src, a, select(a, checkpoint_scores(src, a), 0.25, heads=True, head_dim=False), tmp_path / "c")
    assert not any(p.name != "fp32" and p.name != "bf16" for p in tmp_path.iterdir())  # nothing written
    # unequal query heads per KV head (head 0 of KV group 0 only): refused, whatever the analysis said
    cfg = json.loads((src / "config.json").read_text())
    shapes = Checkpoint(src).meta
    old = {k: s for k, (_, s) in shapes.items()}
    plan, new = {}, dict(old)
    for i in range(2):
        q, o = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.o_proj.weight"
        plan |= {q: {0: list(range(8))}, o: {1: list(range(8))}}
        new |= {q: (56, 64), o: (64, 56)}
    with pytest.raises(InputError, match=r"keeps \[3, 4\] query heads per KV head"):
        updated_config(cfg, plan, old, new)


def test_output_folder_rules(llama_case, tmp_path):
    _, a, folders = llama_case
    src = folders["fp32"]
    sel = select(a, checkpoint_scores(src, a), 0.25, head_dim=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        prune_checkpoint(src, a, sel, out, verify="none")
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="overlaps the source"):
        prune_checkpoint(src, a, sel, src / "inside", verify="none")
    prune_checkpoint(src, a, sel, out, verify="none", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind


def test_gpt2_tied_embeddings_ffn_cut_and_heads_refused(tmp_path):
    model = gpt2()
    src = save(model, tmp_path / "gpt2", shard="20KB")
    assert "lm_head.weight" not in Checkpoint(src).keys()  # tied: saved once
    a = export_analysis(model)
    sel = select(a, checkpoint_scores(src, a), 0.25, head_dim=False)
    out = tmp_path / "out"
    rep = prune_checkpoint(src, a, sel, out, verify="model")
    assert json.loads((out / "config.json").read_text())["n_inner"] == 96
    assert rep["config_changes"] == {"n_inner": [128, 96]} and rep["verification"]["generated_tokens"] == 4
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert float((pruned(input_ids=ids).logits - zeroed_reference(src, a, sel.atoms, ids)).abs().max()) < 1e-4
    with pytest.raises(InputError, match="head_dim"):  # GPT-2's head_dim is n_embd / n_head
        prune_checkpoint(src, a, select(a, "l2", 0.5, heads=True, head_dim=False), tmp_path / "heads")


def test_prune_command_streams_and_matches_the_in_memory_path(llama_case, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import compressor.graph.torch_bridge as bridge
    from compressor.api import prune
    from compressor.cli import app

    src = llama_case[2]["fp32"]
    out = tmp_path / "out"
    real = bridge.prune_torch

    def in_memory(*a, **k):
        raise AssertionError("the in-memory path ran")

    monkeypatch.setattr(bridge, "prune_torch", in_memory)
    r = CliRunner().invoke(app, ["prune", str(src), "--ratio", "0.5", "--heads", "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["streaming"] and report["stages"][0]["result"]["verification"]["max_abs_diff"] < 1e-4
    assert report["after"]["params"] < report["before"]["params"]
    r = CliRunner().invoke(app, ["prune", str(src), "--ratio", "0.5", "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 2 and "already holds a result" in r.output
    (tmp_path / "afile").write_text("mine")  # the output rules of every compress(): a file is not a folder
    r = CliRunner().invoke(app, ["prune", str(src), "--ratio", "0.5", "-o", str(tmp_path / "afile"), "--device", "cpu"])
    assert r.exit_code == 2 and "is a file" in r.output and (tmp_path / "afile").read_text() == "mine"
    # oracle: the existing in-memory path (export, prune_torch) on the same folder, same selection rules
    monkeypatch.setattr(bridge, "prune_torch", real)
    memory = prune(str(src), 0.5, heads=True, device="cpu", measure_latency=False).model
    streamed = transformers.AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (streamed(input_ids=ids).logits - memory(input_ids=ids).logits).abs().max()
    assert sum(p.numel() for p in memory.parameters()) == report["after"]["params"]
    assert float(diff) < 1e-4


def test_residual_stream_cut_with_tied_embeddings(tmp_path):
    model = llama(tied=True)
    src = save(model, tmp_path / "src")
    a = export_analysis(model)
    sel = select(a, checkpoint_scores(src, a), 0.25, head_dim=False, protect_embeddings=False, protect_output=False)
    rep = prune_checkpoint(src, a, sel, tmp_path / "out")
    removed = {name: pos for name, axis, pos in a.removed_positions(sel.atoms) if name.endswith("embed_tokens.weight")}
    cols = next(iter(removed.values()))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["hidden_size"] == 64 - len(cols) == 48 and cfg["head_dim"] == 8 and cfg["num_attention_heads"] == 8
    assert rep["verification"]["generated_tokens"] == 4 and "not compared" in rep["verification"]["compared"]
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    keep = [c for c in range(64) if c not in set(cols.tolist())]
    assert torch.equal(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight[:, keep])
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()  # still tied
    norm = pruned.model.layers[1].post_attention_layernorm.weight
    assert torch.equal(norm, model.model.layers[1].post_attention_layernorm.weight[keep])


def test_output_folder_gets_plain_permissions(llama_case, tmp_path):
    import os
    import stat

    from compressor.utils.atomic import current_umask

    _, a, folders = llama_case
    out = tmp_path / "out"
    prune_checkpoint(folders["fp32"], a, select(a, "l2", 0.25, head_dim=False), out, verify="none")
    (tmp_path / "plain").mkdir()
    assert stat.S_IMODE(os.stat(out).st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) \
        == 0o777 & ~current_umask()


def test_report_records_seconds_per_phase(llama_case, tmp_path, monkeypatch):
    """Oracle: delays injected into known phases (the shard writer, the verification, the analysis) show up
    in those phases and only there; the phases add up to the command's own seconds."""
    import time

    import compressor.checkpoint.prune as cprune
    import compressor.graph.weightless as weightless
    from compressor.api import prune
    from compressor.utils.phases import PRUNING_PHASES

    import compressor.checkpoint.verify as cverify

    real_write, real_verify, real_hf = cprune.write_shards, cverify._whole, weightless.analyze_hf

    def slow_write(*a, **k):
        time.sleep(0.3)
        return real_write(*a, **k)

    def slow_verify(*a, **k):  # the comparison verify_pruned times as its "verify" phase
        time.sleep(0.6)
        return real_verify(*a, **k)

    def slow_hf(*a, **k):
        time.sleep(0.4)
        return real_hf(*a, **k)

    monkeypatch.setattr(cprune, "write_shards", slow_write)
    monkeypatch.setattr(cverify, "_whole", slow_verify)
    monkeypatch.setattr(weightless, "analyze_hf", slow_hf)
    src = llama_case[2]["fp32"]
    rep = prune(str(src), 0.25, output=tmp_path / "out", device="cpu").report
    ph = rep["phases"]
    assert ph["cut"] >= 0.3 and ph["verify"] >= 0.6 and ph["analysis"] >= 0.4
    assert ph["importance"] < 0.3 and ph["generate"] > 0
    assert set(PRUNING_PHASES) <= set(ph) and all(v >= 0 for v in ph.values())
    assert rep["analysis_plus_pruning"]["seconds"] == pytest.approx(sum(ph[k] for k in PRUNING_PHASES), abs=1e-2)
    assert rep["analysis_plus_pruning"]["seconds"] < ph["analysis"] + ph["cut"] + 3  # the verification is not in it
    assert sum(v for k, v in ph.items() if k != "startup") == pytest.approx(rep["seconds"], abs=0.1)
    trace = rep["analysis_phases"]
    assert {"export", "onnx", "groups", "total"} <= set(trace) and trace["total"] <= ph["analysis"]


def test_structured_then_torch_export_streams_and_onnx_export_does_not(llama_case, tmp_path, monkeypatch):
    """A torch export after the cut is the streamed HF folder itself (written under the export's filename);
    an ONNX export needs the model in memory, so that recipe takes the in-memory path."""
    import compressor.graph.torch_bridge as bridge
    from compressor.api import _streams, compress
    from compressor.recipe import load_recipe

    src = llama_case[2]["fp32"]
    stages = [{"method": "structured", "ratio": 0.25}, {"method": "export", "format": "torch", "filename": "pruned"}]
    monkeypatch.setattr(bridge, "prune_torch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("in memory")))
    res = compress(str(src), {"name": "s", "stages": stages}, None, tmp_path / "out", device="cpu")
    rep = res.report
    assert rep["streaming"] and [s["method"] for s in rep["stages"]] == ["structured", "export"]
    assert rep["files"]["hf_folder"] == str(tmp_path / "out" / "pruned") and not (tmp_path / "out" / "model").exists()
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "pruned", dtype=torch.float32)
    assert sum(p.numel() for p in pruned.parameters()) == rep["after"]["params"] < rep["before"]["params"]
    onnx = load_recipe({"name": "o", "stages": [stages[0], {"method": "export", "format": "onnx"}]})
    assert not _streams(str(src), onnx, tmp_path / "o")
    assert _streams(str(src), load_recipe({"name": "s", "stages": stages}), tmp_path / "o")
