"""ReplaceMe depth pruning: folding is exact, configs stay consistent (save → reload → generate), bad input is
refused, and on the real MiniLM it beats naive block dropping at every depth (slow)."""

import pytest
import torch

from compressor.errors import CompressorError
from compressor.methods import replaceme as R

transformers = pytest.importorskip("transformers")


def _seed_weights(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # non-trivial norms/biases, so nothing folds by accident
    return model.eval()


def _calib_ids(n=24, length=16, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g)


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return _seed_weights(transformers.LlamaForCausalLM(cfg))


@pytest.fixture(scope="module")
def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                                  num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("estimator", ["ls", "cosine"])
def test_llama_gqa_prune_fold_save_reload_generate(tiny_llama, tmp_path, estimator):
    pruned, rep = R.prune(tiny_llama, _calib_ids(), n_blocks=2, estimator=estimator, cosine_epochs=2)
    assert rep["blocks_after"] == 3 and pruned.config.num_hidden_layers == 3
    assert len(pruned.model.layers) == 3 and tiny_llama.config.num_hidden_layers == 5  # input untouched
    assert rep["fold_check_rel_err"] < 1e-4
    # layer indices used by the KV cache follow the new positions
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    prompt = torch.tensor([[1, 5, 9, 13, 17]])
    out1 = pruned.generate(prompt, max_new_tokens=5, do_sample=False)
    pruned.save_pretrained(tmp_path / "m")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert reloaded.config.num_hidden_layers == 3
    out2 = reloaded.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(out1, out2) and out1.shape[1] == 10
    assert sum(p.numel() for p in reloaded.parameters()) == rep["params_after"]


def test_bert_post_norm_fold_is_exact(tiny_bert):
    pruned, rep = R.prune(tiny_bert, _calib_ids(), n_blocks=1, estimator="ls")
    assert rep["structure"] == "post-norm"
    assert rep["fold_check_rel_err"] < 1e-4
    assert pruned.config.num_hidden_layers == 4


def test_ls_beats_no_transform_on_calibration_distribution(tiny_llama):
    ids = _calib_ids(48)
    ls, rep = R.prune(tiny_llama, ids, n_blocks=2, estimator="ls")
    none, _ = R.prune(tiny_llama, ids, n_blocks=2, estimator="none", start=rep["start"])
    held = _calib_ids(16, seed=1)
    with torch.no_grad():
        ref = tiny_llama.model(held).last_hidden_state
        err_ls = (ls.model(held).last_hidden_state - ref).norm()
        err_none = (none.model(held).last_hidden_state - ref).norm()
    assert err_ls < err_none


def test_bad_inputs(tiny_llama):
    with pytest.raises(CompressorError, match="first block"):
        R.prune(tiny_llama, _calib_ids(), n_blocks=5)
    with pytest.raises(CompressorError, match="first block"):
        R.prune(tiny_llama, _calib_ids(), n_blocks=1, start=0)
    with pytest.raises(CompressorError, match="does not fit"):
        R.prune(tiny_llama, _calib_ids(), n_blocks=2, start=4)
    with pytest.raises(CompressorError):
        R.prune(tiny_llama, _calib_ids()[:0], n_blocks=1)
    with pytest.raises(CompressorError):
        R.prune(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)), torch.randn(8, 4), n_blocks=1)


def test_calibration_text_too_short():
    from compressor.hf import load_minilm

    model, tok = load_minilm()
    with pytest.raises(CompressorError):
        R.prune(model, [""], n_blocks=1, tokenizer=tok)


def test_recipe_stage_on_hf_folder(tmp_path, tiny_bert_folder):
    from compressor.api import compress

    recipe = {"name": "rm", "stages": [{"method": "replaceme", "n_blocks": 1, "calib_samples": 64, "eval_samples": 32}]}
    res = compress(tiny_bert_folder, recipe, None, tmp_path / "out")
    stage = res.report["stages"][0]["result"]
    assert stage["blocks_after"] == 1 and set(stage["comparison"]) >= {"dense", "replaceme-ls", "naive-drop-last", "same-cut-no-T"}
    folder = tmp_path / "out" / "model"
    reloaded = transformers.AutoModel.from_pretrained(folder)
    assert reloaded.config.num_hidden_layers == 1
    assert res.after["params"] < res.before["params"]


@pytest.mark.slow
def test_minilm_replaceme_beats_naive_drop_at_every_depth():
    from compressor.hf import corpus_sentences, embed, load_minilm

    model, tok = load_minilm()
    s = corpus_sentences()
    calib, held = s[0::2][:256], s[1::2][:128]
    ref = embed(model, tok, held)
    for n in (1, 2, 3):
        pruned, _ = R.prune(model, calib, n_blocks=n, estimator="ls", tokenizer=tok)
        naive, _ = R.naive_drop(model, n)
        q_rm = R.quality(pruned, model, tokenizer=tok, texts=held, reference=ref)["embedding_fidelity"]
        q_nd = R.quality(naive, model, tokenizer=tok, texts=held, reference=ref)["embedding_fidelity"]
        assert q_rm > q_nd, (n, q_rm, q_nd)
