"""Attention-head pruning keeps head layouts the model's config.json can say (compressor.graph.heads).

Layout: hidden 64, 16 query heads of head_dim 4 in 4 KV groups (TinyLlama's shape in small: there 2048 / 32 / 4).
LlamaConfig wants hidden % heads == 0, so only 1, 2, 4, 8 or 16 heads are valid, while 25 % or 40 % of the heads
per KV group or per slot give 12 or 9. Oracles, independent of the pruning code: transformers loads the written
config (its own validation) and the pruned model is compared with the source model whose removed heads and
FFN channels are zeroed, the removed ones found by matching the pruned weight rows against the source rows.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")
pytest.importorskip("safetensors")

from typer.testing import CliRunner  # noqa: E402

from compressor.cli import app  # noqa: E402
from tests.test_checkpoint_stream import VOCAB, save  # noqa: E402

HIDDEN, HEADS, KV, HD = 64, 16, 4, 4


def gqa_llama(weak_kv=()):
    """The test layout; KV groups in `weak_kv` get weights 100x smaller (their q/k/v rows, o_proj columns)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HD,
                                   max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    per = HEADS // KV
    with torch.no_grad():
        for layer in model.model.layers:
            att = layer.self_attn
            for g in weak_kv:
                q = slice(g * per * HD, (g + 1) * per * HD)
                att.q_proj.weight[q] *= 0.01
                att.o_proj.weight[:, q] *= 0.01
                att.k_proj.weight[g * HD:(g + 1) * HD] *= 0.01
                att.v_proj.weight[g * HD:(g + 1) * HD] *= 0.01
    return model


def matched_rows(src: torch.Tensor, cut: torch.Tensor, block: int) -> list[int]:
    """Which `block`-row blocks of `src` the blocks of `cut` are (exact copies)."""
    a, b = src.reshape(-1, block * src.shape[1]), cut.reshape(-1, block * cut.shape[1])
    found = [next(i for i in range(a.shape[0]) if torch.equal(a[i], row)) for row in b]
    assert found == sorted(found)  # the cut keeps the order of what it keeps
    return found


def kept_layout(src, pruned) -> list[dict]:
    """Per layer: the source's kept query heads, KV heads and FFN channels, read from the pruned weights."""
    out = []
    for s, p in zip(src.model.layers, pruned.model.layers, strict=True):
        out.append({"q": matched_rows(s.self_attn.q_proj.weight, p.self_attn.q_proj.weight, HD),
                    "kv": matched_rows(s.self_attn.k_proj.weight, p.self_attn.k_proj.weight, HD),
                    "ffn": matched_rows(s.mlp.gate_proj.weight, p.mlp.gate_proj.weight, 1)})
    return out


def check_against_zeroed_source(src, out_dir) -> tuple[transformers.PreTrainedModel, list[dict]]:
    """Reload the pruned folder (transformers validates its config), check grouped-query attention maps each
    kept query head to its own KV head, and compare with the source whose removed heads / channels are zeroed."""
    cfg = transformers.AutoConfig.from_pretrained(out_dir)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    assert HIDDEN % heads == 0 and heads % kv == 0 and cfg.head_dim == HD
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    layout = kept_layout(src, pruned)
    zeroed = gqa_llama()
    zeroed.load_state_dict(src.state_dict())
    with torch.no_grad():
        for lay, layer in zip(layout, zeroed.model.layers, strict=True):
            assert len(lay["q"]) == heads and len(lay["kv"]) == kv
            for i, q in enumerate(lay["q"]):  # pruned q head i reads pruned KV head i // (heads / kv)
                assert q // (HEADS // KV) == lay["kv"][i // (heads // kv)]
            for h in set(range(HEADS)) - set(lay["q"]):
                layer.self_attn.o_proj.weight[:, h * HD:(h + 1) * HD] = 0
            for c in set(range(96)) - set(lay["ffn"]):
                layer.mlp.down_proj.weight[:, c] = 0
        ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
        diff = (pruned(input_ids=ids).logits - zeroed(input_ids=ids).logits).abs().max()
        gen = pruned.generate(ids[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=2)
    assert float(diff) < 1e-4 and gen.shape == (1, 7)
    return pruned, layout


def prune_cli(src, out, *args):
    r = CliRunner().invoke(app, ["prune", str(src), *map(str, args), "--heads", "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return r.output, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory):
    model = gqa_llama()
    return model, save(model, tmp_path_factory.mktemp("gqa") / "src")


def test_streamed_heads_nearest_valid_count(gqa_folder, tmp_path):
    """40 %: 16 x 0.6 = 9.6 heads; 9 (3 KV x 3) is refused by LlamaConfig, the nearest valid count is 8."""
    src_model, src = gqa_folder
    output, report = prune_cli(src, tmp_path / "o", "--ratio", "0.4")
    stage = report["stages"][0]["result"]
    assert report["streaming"] and stage["verification"]["max_abs_diff"] < 1e-4
    pruned, _ = check_against_zeroed_source(src_model, tmp_path / "o" / "model")
    assert pruned.config.num_attention_heads == 8
    heads = stage["heads"]
    assert heads["heads_before"] == 2 * HEADS and heads["heads_after"] == 16 and heads["achieved_ratio"] == 0.5
    assert "not a multiple of the number of attention heads (9)" in heads["note"] and heads["note"] in \
        " ".join(output.split())


def test_streamed_heads_tie_keeps_more(gqa_folder, tmp_path):
    """25 %: 12 heads asked, 8 and 16 are equally near: the larger is kept (no head removed), said, not refused."""
    src_model, src = gqa_folder
    output, report = prune_cli(src, tmp_path / "o", "--ratio", "0.25")
    heads = report["stages"][0]["result"]["heads"]
    assert heads["heads_after"] == heads["heads_before"] and heads["achieved_ratio"] == 0
    assert "(12)" in heads["note"] and "kept 16 (0% removed)" in heads["note"]
    pruned, layout = check_against_zeroed_source(src_model, tmp_path / "o" / "model")
    assert pruned.config.num_attention_heads == HEADS and len(layout[0]["ffn"]) == 72  # the FFN is still cut


def test_in_memory_heads_and_macs_target(tmp_path):
    """The in-memory path (a MAC target does not stream): the same layout rule, the config.json it saves says
    the kept heads, and which heads go follows importance: two weak KV groups go whole (2 KV x 4 kept)."""
    src_model = gqa_llama(weak_kv=(0, 2))
    src = save(src_model, tmp_path / "src")
    _, report = prune_cli(src, tmp_path / "o", "--ratio", "0.5", "--target", "macs")
    assert not report.get("streaming") and report["after"]["params"] < report["before"]["params"]
    pruned, layout = check_against_zeroed_source(src_model, tmp_path / "o" / "model")
    heads = report["stages"][0]["result"]["heads"]  # the MAC search's 60 % asks 6.3 heads: 6 is refused, 8 kept
    assert "heads (6)" in heads["note"] and heads["heads_after"] == 16
    assert pruned.config.num_attention_heads == 8 and all(lay["kv"] == [1, 3] for lay in layout)


def test_streamed_heads_follow_importance(tmp_path):
    """50 %: 8 heads as 2 KV x 4 or 4 KV x 2; with KV groups 0 and 2 weak, those two groups go in every layer."""
    src_model = gqa_llama(weak_kv=(0, 2))
    src = save(src_model, tmp_path / "src")
    prune_cli(src, tmp_path / "o", "--ratio", "0.5")
    pruned, layout = check_against_zeroed_source(src_model, tmp_path / "o" / "model")
    assert pruned.config.num_key_value_heads == 2 and all(lay["kv"] == [1, 3] for lay in layout)


def test_in_memory_heads_qwen2_config_gets_head_dim(tmp_path):
    """Qwen2's config has no head_dim field (the model reads getattr(config, "head_dim", hidden / heads)): after
    heads are cut in memory, the saved config.json must carry head_dim or the folder reloads with other shapes."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64,
                                   eos_token_id=2, bos_token_id=1)
    src = save(transformers.Qwen2ForCausalLM(cfg).eval(), tmp_path / "src")
    _, report = prune_cli(src, tmp_path / "o", "--ratio", "0.5", "--target", "macs")
    heads = report["stages"][0]["result"]["heads"]
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model").eval()
    assert pruned.config.head_dim == HD and 2 * pruned.config.num_attention_heads == heads["heads_after"] < 2 * HEADS
    assert pruned.model.layers[0].self_attn.q_proj.out_features == pruned.config.num_attention_heads * HD
    with torch.no_grad():
        gen = pruned.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                              pad_token_id=2)
    assert gen.shape == (1, 6)
