"""Masks: selection conventions (exact_k / strict_above / N:M / random / ERK) and enforcement (parametrizations)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor import masks as M
from compressor.errors import RecipeError
from compressor.models import digits_cnn, digits_mlp


@pytest.fixture(scope="module")
def digits():
    from compressor.io.data import load_data

    return load_data("digits")


def _rand_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(16, 8, generator=g), "b.weight": torch.randn(4, 3, 3, 3, generator=g) * 0.3,
            "c.weight": torch.randn(10, 32, generator=g) * 2}


def _pruned(masks):
    return sum(int((~m).sum()) for m in masks.values())


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.77, 0.95])
def test_exact_k_global_removes_exactly_k_and_matches_torch_prune(s):
    w = _rand_weights()
    n = sum(t.numel() for t in w.values())
    masks = M.magnitude_masks(w, s)
    assert _pruned(masks) == round(s * n)
    # second opinion: torch.nn.utils.prune.global_unstructured (L1) on the same tensors (distinct values)
    import torch.nn.utils.prune as tprune

    holders = {k: nn.Module() for k in w}
    for k, h in holders.items():
        h.weight = nn.Parameter(w[k].clone())
    if s > 0:
        tprune.global_unstructured([(h, "weight") for h in holders.values()], pruning_method=tprune.L1Unstructured, amount=s)
        for k, h in holders.items():
            assert torch.equal(h.weight_mask.bool(), masks[k])
    # and everything kept is at least as large as everything pruned
    allw = torch.cat([w[k].abs().flatten() for k in w])
    allm = torch.cat([masks[k].flatten() for k in w])
    if 0 < s:
        assert allw[allm].min() >= allw[~allm].max()


def test_exact_k_with_ties_still_removes_exactly_k():
    w = {"x.weight": torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 3.0]]), "y.weight": torch.ones(3, 2)}
    masks = M.magnitude_masks(w, 0.5)
    assert _pruned(masks) == 7  # round(0.5 * 14)
    # ties broken by flat index: the first seven 1.0 entries in (x, y) order go
    assert masks["x.weight"].flatten().tolist() == [False] * 4 + [True, False, False, True]
    assert masks["y.weight"].flatten().tolist() == [False] + [True] * 5


def test_layerwise_prunes_each_tensor_separately():
    w = _rand_weights(1)
    masks = M.magnitude_masks(w, 0.3, scope="layerwise")
    for k, m in masks.items():
        assert int((~m).sum()) == round(0.3 * m.numel())
        assert w[k].abs()[m].min() >= w[k].abs()[~m].max()


def _open_lth_reference(w: dict, cur: dict, f: float) -> dict:
    """open_lth sparse_global, re-derived with numpy: n_prune = ceil(f * remaining); τ = sorted[n_prune]; keep > τ."""
    alive_vals = np.concatenate([np.abs(w[k].numpy())[cur[k].numpy()] for k in w])
    n_prune = math.ceil(f * alive_vals.size)
    tau = np.sort(alive_vals)[n_prune]
    return {k: torch.from_numpy((np.abs(w[k].numpy()) > tau) & cur[k].numpy()) for k in w}


def test_strict_above_matches_open_lth_and_removes_n_plus_one():
    w = _rand_weights(2)
    cur = {k: torch.ones_like(v, dtype=torch.bool) for k, v in w.items()}
    n = sum(t.numel() for t in w.values())
    for level in range(3):
        masks = M.magnitude_masks(w, 0.2, convention="strict_above", current=cur, fraction_of_remaining=True)
        ref = _open_lth_reference(w, cur, 0.2)
        for k in w:
            assert torch.equal(masks[k], ref[k]), (level, k)
        n_alive = sum(int(c.sum()) for c in cur.values())
        assert _pruned(masks) == (n - n_alive) + math.ceil(0.2 * n_alive) + 1  # distinct values: n_prune + 1
        cur = masks


def test_strict_above_with_ties_removes_all_tied():
    w = {"x.weight": torch.tensor([0.5, 1.0, 1.0, 1.0, 2.0, 3.0])}
    masks = M.magnitude_masks(w, 0.2, convention="strict_above", fraction_of_remaining=True)
    # n_prune = ceil(0.2*6) = 2 ; τ = sorted[2] = 1.0 ; keep > 1.0
    assert masks["x.weight"].tolist() == [False, False, False, False, True, True]
    exact = M.magnitude_masks(w, 0.2, convention="exact_k", fraction_of_remaining=True)
    assert exact["x.weight"].tolist() == [False, False, True, True, True, True]


def test_fraction_of_remaining_keeps_pruned_pruned():
    w = _rand_weights(3)
    first = M.magnitude_masks(w, 0.5)
    # give the pruned weights large magnitudes: they must still stay pruned
    w2 = {k: torch.where(first[k], w[k], torch.full_like(w[k], 100.0)) for k in w}
    second = M.magnitude_masks(w2, 0.2, current=first, fraction_of_remaining=True)
    n_alive = sum(int(m.sum()) for m in first.values())
    for k in w:
        assert not (second[k] & ~first[k]).any()
    assert _pruned(second) == _pruned(first) + math.ceil(0.2 * n_alive)
    # target mode with current: total sparsity reaches the target
    third = M.magnitude_masks(w2, 0.8, current=first)
    n = sum(t.numel() for t in w.values())
    assert _pruned(third) == round(0.8 * n)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan")])
def test_bad_sparsity_is_recipe_error(bad):
    with pytest.raises(RecipeError, match=r"\[0, 1\)"):
        M.magnitude_masks(_rand_weights(), bad)
    with pytest.raises(RecipeError):
        M.random_masks(_rand_weights(), bad)


def test_unknown_scope_and_convention():
    with pytest.raises(RecipeError, match="scope"):
        M.magnitude_masks(_rand_weights(), 0.5, scope="rowwise")
    with pytest.raises(RecipeError, match="convention"):
        M.magnitude_masks(_rand_weights(), 0.5, convention="median")


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (6, 8)])
def test_nm_pattern_holds_in_every_group(n, m):
    w = {"lin.weight": torch.randn(12, 32), "conv.weight": torch.randn(6, 8, 3, 3)}
    masks = M.nm_masks(w, n, m)
    for k, mk in masks.items():
        rows_w = w[k].reshape(w[k].shape[0], -1).abs().reshape(-1, m)
        rows_m = mk.reshape(mk.shape[0], -1).reshape(-1, m)
        assert (rows_m.sum(1) == m - n).all()  # exactly N removed in every group
        kept_min = torch.where(rows_m, rows_w, torch.full_like(rows_w, float("inf"))).min(1).values
        pruned_max = torch.where(~rows_m, rows_w, torch.full_like(rows_w, -1.0)).max(1).values
        assert (kept_min >= pruned_max).all()  # the N smallest went


def test_nm_transposed_conv1d_groups_along_input_rows():
    w = torch.randn(16, 6)  # HF Conv1D layout [in, out]
    mk = M.nm_masks({"c_attn.weight": w}, 2, 4, transposed={"c_attn.weight"})["c_attn.weight"]
    assert mk.shape == w.shape
    assert (mk.t().reshape(6, 4, 4).sum(-1) == 2).all()


def test_nm_bad_patterns():
    w = {"lin.weight": torch.randn(4, 10)}
    with pytest.raises(RecipeError, match="1 <= N < M"):
        M.nm_masks(w, 4, 4)
    with pytest.raises(RecipeError, match="1 <= N < M"):
        M.nm_masks(w, 5, 4)
    with pytest.raises(RecipeError, match="not divisible by M=4"):
        M.nm_masks(w, 2, 4)


def test_random_global_exact_count_and_seeded():
    w = _rand_weights()
    n = sum(t.numel() for t in w.values())
    a = M.random_masks(w, 0.6, seed=1)
    b = M.random_masks(w, 0.6, seed=1)
    c = M.random_masks(w, 0.6, seed=2)
    assert _pruned(a) == round(0.6 * n)
    assert all(torch.equal(a[k], b[k]) for k in w)
    assert any(not torch.equal(a[k], c[k]) for k in w)


def test_erk_densities_follow_formula_and_resolve_dense_layers():
    shapes = {"big.weight": (256, 256), "conv.weight": (32, 16, 3, 3), "tiny.weight": (10, 4)}
    d = M._erk_densities(shapes, 0.2)
    numel = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(numel.values())
    assert math.isclose(sum(d[k] * numel[k] for k in shapes), 0.2 * total, rel_tol=1e-9)
    assert d["tiny.weight"] == 1.0  # ε·(14/40) > 1 → dense, ε re-solved
    ratio = d["big.weight"] / d["conv.weight"]
    expect = (512 / 256**2) / ((32 + 16 + 6) / (32 * 16 * 9))
    assert math.isclose(ratio, expect, rel_tol=1e-9)
    masks = M.random_masks({k: torch.zeros(s) for k, s in shapes.items()}, 0.8, scope="erk")
    assert int(masks["tiny.weight"].sum()) == 40
    assert abs(M.mask_density(masks) - 0.2) < 1e-3


def test_prunable_weights_patterns():
    model = digits_cnn()
    assert list(M.prunable_weights(model)) == ["conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight", "fc.weight"]
    assert list(M.prunable_weights(model, exclude=["fc"])) == ["conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight"]
    assert list(M.prunable_weights(model, include=["conv*"], exclude=["*3.weight"])) == ["conv1.weight", "conv2.weight"]
    with pytest.raises(RecipeError, match="no prunable layer matched"):
        M.prunable_weights(model, include=["encoder.*"])
    with pytest.raises(RecipeError, match="no prunable layer"):
        M.prunable_weights(nn.Sequential(nn.ReLU()))


def test_prunable_weights_hf_conv1d_and_tied():
    pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")
    from transformers.pytorch_utils import Conv1D

    m = nn.Sequential(Conv1D(12, 8), nn.Linear(12, 12))
    m.add_module("tied", nn.Linear(12, 12))
    m.tied.weight = m[1].weight
    m.add_module("emb", nn.Embedding(12, 12))
    m.add_module("head", nn.Linear(12, 12, bias=False))
    m.head.weight = m.emb.weight  # tied to an embedding: must stay dense
    names = list(M.prunable_weights(m))
    assert names == ["0.weight", "1.weight"]
    assert M.transposed_names(m, names) == {"0.weight"}


# ---------------------------------------------------------------- enforcement


@pytest.mark.parametrize("opt,kw", [("sgd", {"momentum": 0.9, "weight_decay": 1e-3}), ("adam", {"weight_decay": 1e-3}),
                                    ("adamw", {"weight_decay": 0.1})])
def test_masked_weights_stay_exactly_zero_through_training(opt, kw, digits):
    from compressor.train import train

    torch.manual_seed(0)
    model = digits_cnn()
    masks = M.magnitude_masks(M.prunable_weights(model), 0.7)
    M.apply_masks(model, masks)
    before = {k: v.detach().clone() for k, v in M.prunable_weights(model).items()}
    grads = {}

    def after_backward(mod):
        for k, p in M.prunable_weights(mod).items():
            grads[k] = p.grad.detach().clone()

    train(model, digits.train, steps=4, batch_size=16, lr=0.05, optimizer=opt, after_backward=after_backward,
          progress=False, device="cpu", **kw)
    stored = M.prunable_weights(model)
    mods = dict(model.named_modules())
    for k, mk in masks.items():
        assert (grads[k][~mk] == 0).all(), k
        assert (stored[k].detach()[~mk] == 0).all(), k  # stored values (optimizer state never moved them)
        assert (mods[k.rsplit(".", 1)[0]].weight.detach()[~mk] == 0).all(), k  # forward weight
        assert not torch.equal(stored[k].detach()[mk], before[k][mk]), k  # the rest did train
    assert M.sparsity_report(model)["sparsity_masked"] == pytest.approx(0.7, abs=1e-4)


def test_sparsity_report_both_denominators():
    model = digits_mlp(hidden=32)  # fc1 64x32, fc2 32x16, fc 16x10 + biases
    w = M.prunable_weights(model, exclude=["fc"])
    masks = M.magnitude_masks(w, 0.5, scope="layerwise")
    M.apply_masks(model, masks)
    rep = M.sparsity_report(model)
    masked = 64 * 32 + 32 * 16
    total = masked + 16 * 10 + 32 + 16 + 10
    assert rep["sparsity_masked"] == pytest.approx((masked // 2) / masked)
    assert rep["sparsity_all_params"] == pytest.approx((masked // 2) / total)
    assert set(rep["per_tensor"]) == {"fc1.weight", "fc2.weight"}
    # baked model: zeros counted from the plain weights instead
    baked = M.plain_copy(model)
    rep2 = M.sparsity_report(baked)
    assert rep2["pruned"] == masked // 2
    assert rep2["per_tensor"]["fc.weight"] == 0.0


def test_current_masks_bake_and_plain_state_dict():
    torch.manual_seed(0)
    model = digits_cnn().eval()
    masks = M.magnitude_masks(M.prunable_weights(model), 0.6)
    M.apply_masks(model, masks)
    cur = M.current_masks(model)
    assert set(cur) == set(masks) and all(torch.equal(cur[k], masks[k]) for k in masks)
    sd = M.plain_state_dict(model)
    assert "conv1.weight" in sd and not any("parametrizations" in k for k in sd)
    fresh = digits_cnn().eval()
    fresh.load_state_dict(sd)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # deepcopies are independent: baking one leaves the other masked and working
    twin = copy.deepcopy(model)
    M.bake_masks(model)
    assert not M.has_masks(model) and M.has_masks(twin)
    with torch.no_grad():
        assert torch.equal(twin(x), fresh(x)) and torch.equal(model(x), fresh(x))
    assert (model.conv1.weight[~masks["conv1.weight"]] == 0).all()


def test_reapply_replaces_mask():
    model = digits_mlp(hidden=32)
    w = M.prunable_weights(model)
    M.apply_masks(model, M.magnitude_masks(w, 0.3))
    w = M.prunable_weights(model)  # now the parametrization originals
    m2 = M.magnitude_masks(w, 0.6, current=M.current_masks(model))
    M.apply_masks(model, m2)
    assert M.sparsity_report(model)["sparsity_masked"] == pytest.approx(0.6, abs=1e-3)
    with pytest.raises(RecipeError, match="different model"):
        M.apply_masks(model, {"fc1.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(RecipeError, match="different model"):
        M.apply_masks(model, {"nope.weight": torch.ones(3, 3, dtype=torch.bool)})


def test_onnx_export_of_masked_model_has_zeros_and_matches_onnxruntime(tmp_path):
    import onnx
    from onnx import numpy_helper

    from compressor.export import export_onnx, run_onnx

    torch.manual_seed(0)
    model = digits_cnn().eval()
    masks = M.magnitude_masks(M.prunable_weights(model), 0.8)
    M.apply_masks(model, masks)
    # perturb stored values at pruned positions: the forward and the export must still see zeros
    with torch.no_grad():
        for k, p in M.prunable_weights(model).items():
            p[~masks[k]] = 5.0
    path = tmp_path / "m.onnx"
    x = torch.randn(6, 1, 8, 8)
    export_onnx(M.plain_copy(model), (x,), path)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    for k, mk in masks.items():
        assert k in inits, k  # plain names
        assert (inits[k][~mk.numpy()] == 0).all()
        assert (inits[k][mk.numpy()] != 0).all()
    got = run_onnx(str(path), {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)
    # the parametrized model itself also exports correctly (Where node), just with parametrization names
    raw = tmp_path / "raw.onnx"
    export_onnx(model, (x,), raw)
    np.testing.assert_allclose(run_onnx(str(raw), {"input": x.numpy()})[0], ref, atol=1e-5, rtol=1e-4)


def test_plain_copy_bakes_every_parametrization_and_leaves_the_model_working():
    """One copy for every export/save: masks and an un-merged SaRA adapter become plain weights in an eval-mode
    copy; the source keeps its parametrizations, training flag and forward."""
    from compressor.sara import SaRAOptimizer

    torch.manual_seed(0)
    model = digits_mlp(hidden=32).train()
    M.apply_masks(model, M.magnitude_masks(M.prunable_weights(model, include=["fc1"]), 0.5))
    opt = SaRAOptimizer(model, fraction=0.2, include=["fc2"], lambda_rank=0.0)  # parametrizes fc2.weight
    with torch.no_grad():
        for v in opt.adapter.values():
            v.add_(0.5)  # the adapted values differ from the base: only a real bake carries them
    x = torch.randn(5, 64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    plain = M.plain_copy(model)
    assert plain is not model and not plain.training and model.training
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    sd = plain.state_dict()
    assert {"fc1.weight", "fc2.weight"} <= set(sd) and not any("parametrizations" in k for k in sd)
    assert M.plain_state_dict(model).keys() == sd.keys()
    fresh = digits_mlp(hidden=32).eval()
    fresh.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), expected) and torch.equal(fresh(x), expected)
        assert torch.equal(model(x), expected)  # the source still runs its parametrized forward
    assert parametrize.is_parametrized(model.fc1) and parametrize.is_parametrized(model.fc2)
    # an unparametrized model is copied too (callers may change the copy)
    dense = digits_mlp(hidden=32)
    assert M.plain_copy(dense) is not dense


def test_hf_conv1d_absent_only_when_transformers_is_not_installed(monkeypatch):
    """No transformers -> no Conv1D; any other import failure is a real error, not a silent 'no Conv1D'
    (which would leave GPT-2 projections out of pruning)."""
    import sys
    import types

    real = M.hf_conv1d()
    assert real is not None and real.__name__ == "Conv1D"  # transformers is installed here
    monkeypatch.setitem(sys.modules, "transformers.pytorch_utils", types.ModuleType("transformers.pytorch_utils"))
    with pytest.raises(ImportError, match="Conv1D"):  # installed but broken: surfaces
        M.hf_conv1d()
    monkeypatch.setitem(sys.modules, "transformers.pytorch_utils", None)
    with pytest.raises(ModuleNotFoundError):
        M.hf_conv1d()

    class NotInstalled:  # an import system without transformers
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] == "transformers":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    for name in [n for n in sys.modules if n.split(".")[0] == "transformers"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NotInstalled, *sys.meta_path])
    assert M.hf_conv1d() is None
