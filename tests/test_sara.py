"""SaRA (Hu et al., ICLR 2025): selection, memory-efficient training, low-rank penalty, re-selection, files.

Oracles: the dense reference optimizer (plain AdamW on full tensors + restoring frozen entries) gives
the same selected-entry trajectory as the sparse form; bit-identity of unselected entries; the merged model
equals the adapted one; a hand-built dense weight (base with values scattered at |w| < θ) equals the loaded
adaptation; an SVD of the learned update with and without the nuclear-norm term.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from compressor.errors import CompressorError
from compressor.sara import (
    SaRAOptimizer,
    load_adaptation,
    read_adaptation,
    save_adaptation,
    select,
    state_bytes,
)
from compressor.train import train


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def toy_data(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0).long()) % 4
    return TensorDataset(x, y)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ selection


def test_selection_is_strict_threshold_over_every_parameter():
    m = small_mlp()
    sel = select(m, fraction=0.1)
    allw = torch.cat([p.detach().abs().flatten() for p in m.parameters()])
    # oracle: the fraction is the k smallest |w| over all tensors (biases included, no type filter)
    k = round(0.1 * allw.numel())
    assert sel.selected == k == int((allw < sel.threshold).sum())
    assert sel.total == allw.numel()
    for name, p in m.named_parameters():
        expected = p.detach().abs() < sel.threshold
        if expected.any():
            assert torch.equal(sel.masks[name], expected)
        else:
            assert name not in sel.masks
    assert any(n.endswith("bias") for n in sel.masks)  # biases are candidates too
    # the same threshold given directly selects the same entries
    sel2 = select(m, threshold=sel.threshold)
    assert sel2.selected == sel.selected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 1e-12}, "selects no weight"),
        ({"threshold": 1e6}, "selects every weight"),
        ({"fraction": 1e-9}, "selects nothing"),
        ({"threshold": 1e-3, "fraction": 0.1}, "exactly one"),
        ({}, "exactly one"),
        ({"threshold": -1.0}, "positive"),
    ],
)
def test_bad_selection_is_a_clear_error(kwargs, match):
    with pytest.raises(CompressorError, match=match):
        select(small_mlp(), **kwargs)


def test_bad_selection_leaves_model_untouched():
    m = small_mlp()
    with pytest.raises(CompressorError):
        SaRAOptimizer(m, threshold=1e6)
    assert all(p.requires_grad for p in m.parameters())
    assert not any("parametrizations" in n for n, _ in m.named_parameters())


# ------------------------------------------------------------------------------- memory-efficient form


def test_no_dense_gradient_or_optimizer_state_for_base_weights():
    m = small_mlp()
    n_params = sum(p.numel() for p in m.parameters())
    opt = SaRAOptimizer(m, fraction=0.1, lambda_rank=0.0, lr=1e-2)
    k = opt.adapter.selection.selected
    x, y = toy_data(64).tensors
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(m(x), y).backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    # only the 1-D value vectors carry gradients; every base weight is frozen and gradient-free
    assert grads and all(n.endswith(".values") for n in grads)
    assert sum(g.numel() for g in grads.values()) == k
    for n, p in m.named_parameters():
        if n.endswith(".original"):
            assert not p.requires_grad and p.grad is None
    # every optimizer tensor is |M|-sized (plus Adam's scalar step counters)
    moment_numel = sum(v.numel() for st in opt.state.values() for key, v in st.items() if key != "step")
    assert moment_numel == 2 * k
    assert state_bytes(opt) < 0.15 * 3 * 4 * n_params  # vs grads + 2 moments of full fine-tuning
    # the module sees the base storage itself (no dense copy per forward)
    lin = m[2]
    assert lin.weight.data_ptr() == lin.parametrizations.weight.original.data_ptr()


def test_sparse_form_matches_dense_reference_optimizer():
    """The sparse op is equivalent to AdamW on full tensors with frozen entries restored every step."""
    data = toy_data(128)
    m_sparse, m_dense = small_mlp(), small_mlp()
    sel = select(m_dense, fraction=0.2)
    masks = {n: sel.masks.get(n) for n, _ in m_dense.named_parameters()}
    w0 = snapshot(m_dense)
    opt_s = SaRAOptimizer(m_sparse, fraction=0.2, lambda_rank=0.0, max_grad_norm=None, lr=5e-3, weight_decay=1e-2)
    opt_d = torch.optim.AdamW(m_dense.parameters(), lr=5e-3, weight_decay=1e-2)

    def restore(model, step):
        with torch.no_grad():
            for n, p in model.named_parameters():
                keep = ~masks[n] if masks[n] is not None else torch.ones_like(p, dtype=torch.bool)
                p[keep] = w0[n][keep]

    train(m_sparse, data, steps=15, batch_size=32, optimizer=opt_s, progress=False)
    train(m_dense, data, steps=15, batch_size=32, optimizer=opt_d, after_step=restore, progress=False)
    opt_s.adapter.merge()
    for (n, a), (_, b) in zip(m_sparse.named_parameters(), m_dense.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_only_selected_entries_change_and_merge_is_exact():
    m = small_mlp()
    w0 = snapshot(m)
    opt = SaRAOptimizer(m, fraction=0.1, lr=1e-2, lambda_rank=1e-3, rank_min_dim=16, progressive_step=10)
    masks = opt.adapter.selection.masks
    train(m, toy_data(), steps=20, batch_size=32, optimizer=opt, progress=False)
    x = toy_data(50, seed=1).tensors[0]
    m.eval()
    with torch.no_grad():
        adapted = m(x)
    opt.adapter.merge()
    assert not any("parametrizations" in n for n, _ in m.named_parameters())
    assert all(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        assert torch.equal(m(x), adapted)
    changed_any = 0
    for n, p in m.named_parameters():
        diff = p.detach() != w0[n]
        mask = masks.get(n, torch.zeros_like(diff))
        assert not (diff & ~mask).any(), f"{n}: an unselected entry changed"
        changed_any += int(diff.sum())
    assert changed_any > 0.9 * opt.adapter.selection.selected


def test_progressive_reselection_freezes_grown_entries():
    m = small_mlp()
    opt = SaRAOptimizer(m, fraction=0.3, lr=3e-2, lambda_rank=0.0, progressive_step=8, weight_decay=0.0)
    data = toy_data()
    train(m, data, steps=8, batch_size=32, optimizer=opt, progress=False)
    opt.adapter.sync()  # the base storage is refreshed on forward; sync after the last update
    at_p = {n: opt.adapter.base(n).detach().clone() for n in opt.adapter.deltas}
    n_before = sum(v.numel() for v in opt.adapter.values())
    # continue from step 8: the re-selection happens on the next optimizer step
    train(m, data, steps=20, start_step=8, batch_size=32, optimizer=opt, progress=False)
    assert opt.reselected
    n_after = sum(v.numel() for v in opt.adapter.values())
    assert 0 < n_after < n_before
    for n, d in opt.adapter.deltas.items():
        now = opt.adapter.base(n).detach().reshape(-1)
        init_mask = torch.zeros_like(now, dtype=torch.bool)
        init_mask[d.initial_idx.long()] = True
        live = torch.zeros_like(init_mask)
        live[d.idx.long()] = True
        grown = init_mask & (at_p[n].reshape(-1).abs() >= opt.threshold)
        assert torch.equal(live, init_mask & ~grown)  # M' = M ∧ (|w| < θ)
        assert torch.equal(now[grown], at_p[n].reshape(-1)[grown])  # frozen at fine-tuned values
    # default resets the Adam state for the new set: 12 updates since the re-selection
    steps = {int(st["step"]) for st in opt.state.values()}
    assert steps == {12}


def test_progressive_keep_state_option_slices_moments():
    m = small_mlp()
    opt = SaRAOptimizer(m, fraction=0.3, lr=3e-2, lambda_rank=0.0, progressive_step=5, reset_state=False, skip_step=True)
    train(m, toy_data(), steps=10, batch_size=32, optimizer=opt, progress=False)
    assert opt.reselected
    assert {int(st["step"]) for st in opt.state.values()} == {9}  # 5 before, skipped one, 4 after
    for p in opt.adapter.values():
        assert opt.state[p]["exp_avg"].shape == p.shape


# ---------------------------------------------------------------------------------- nuclear-norm term


def test_nuclear_norm_term_lowers_rank_of_the_update():
    """A controlled regression: half the weights of a 48×48 layer are tiny (trainable), the target is reachable
    with a full-rank change; the penalty should give a lower-nuclear-norm, lower-effective-rank update."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 48, generator=g)
    w = w.sign() * (0.5 + w.abs())  # large entries stay above θ
    tiny = torch.rand(48, 48, generator=g) < 0.5
    w[tiny] = torch.randn(int(tiny.sum()), generator=g) * 1e-4
    target = w + (torch.randn(48, 48, generator=g) * 0.3) * tiny
    x = torch.randn(512, 48, generator=g)
    data = TensorDataset(x, x @ target.T)

    def run(lam):
        layer = nn.Linear(48, 48, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        opt = SaRAOptimizer(layer, threshold=1e-2, lr=1e-2, lambda_rank=lam, rank_min_dim=16, weight_decay=0.0, max_grad_norm=None)
        assert opt.rank_names == ["weight"]
        info = train(layer, data, steps=100, batch_size=64, optimizer=opt, progress=False,
                     loss_fn=lambda mdl, b: nn.functional.mse_loss(mdl(b[0]), b[1]))
        opt.adapter.merge()
        delta = layer.weight.detach() - w
        assert not (delta[~tiny] != 0).any()
        sv = torch.linalg.svdvals(delta)
        return float(sv.sum()), int((sv > 0.05 * sv[0]).sum()), info["final_loss"]

    nuc0, rank0, loss0 = run(0.0)
    nuc1, rank1, loss1 = run(0.05)
    assert nuc1 < 0.8 * nuc0
    assert rank1 < rank0
    assert loss1 < 0.5 * float((data.tensors[1] - x @ w.T).pow(2).mean())  # still fits much of the task


# ------------------------------------------------------------------------------------------- files


def trained_adapter(seed: int = 0):
    m = small_mlp(seed)
    base = copy.deepcopy(m)
    opt = SaRAOptimizer(m, fraction=0.1, lr=1e-2, lambda_rank=1e-3, rank_min_dim=16, progressive_step=5)
    train(m, toy_data(), steps=10, batch_size=32, optimizer=opt, progress=False)
    return base, m, opt


def test_save_load_round_trip_is_exact(tmp_path):
    base, m, opt = trained_adapter()
    path = tmp_path / "a.safetensors"
    info = save_adaptation(opt.adapter, path)
    k = opt.adapter.selection.selected
    assert info["values"] == k
    assert info["bytes"] < 4 * k + 4096  # values only (no indices, no dense tensors) + JSON header
    opt.adapter.merge()
    loaded = load_adaptation(copy.deepcopy(base), path)
    for (n, a), (_, b) in zip(m.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    # independent oracle: base weight with the stored values scattered at |w_base| < θ (boolean-mask order)
    meta, tensors = read_adaptation(path)
    theta = float(meta["threshold"])
    for n, p in base.named_parameters():
        expected = p.detach().clone()
        mask = expected.abs() < theta
        if mask.any():
            expected[mask] = tensors[f"values/{n}"]
        assert torch.equal(expected, dict(loaded.named_parameters())[n].detach()), n


def test_load_attach_continues_training(tmp_path):
    base, m, opt = trained_adapter()
    path = tmp_path / "a.safetensors"
    save_adaptation(opt.adapter, path)
    adapter = load_adaptation(copy.deepcopy(base), path, attach=True)
    x = toy_data(20, seed=3).tensors[0]
    with torch.no_grad():
        assert torch.equal(adapter.model.eval()(x), m.eval()(x))
    assert sum(v.numel() for v in adapter.values()) == opt.adapter.selection.selected


def test_load_onto_incompatible_base_is_a_clear_error(tmp_path):
    base, m, opt = trained_adapter()
    path = tmp_path / "a.safetensors"
    save_adaptation(opt.adapter, path)
    other = small_mlp(seed=1)  # same shapes, different weights
    with pytest.raises(CompressorError, match="fingerprint mismatch"):
        load_adaptation(other, path)
    nudged = copy.deepcopy(base)
    with torch.no_grad():
        nudged[2].weight[0, 0] += 1e-6  # one entry off is enough
    with pytest.raises(CompressorError, match=r"'2\.weight' differs"):
        load_adaptation(nudged, path)
    wider = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(CompressorError, match="shape"):
        load_adaptation(wider, path)
    with pytest.raises(CompressorError, match="no parameter"):
        load_adaptation(nn.Sequential(nn.Linear(16, 32)), path)
    with pytest.raises(CompressorError, match="not found"):
        load_adaptation(copy.deepcopy(base), tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CompressorError, match="cannot read"):
        load_adaptation(copy.deepcopy(base), junk)
    # a refused load leaves the model untouched
    assert all(p.requires_grad for p in other.parameters())
    assert not any("parametrizations" in n for n, _ in other.named_parameters())


# ------------------------------------------------------------------------------------------- recipe


def test_recipe_stage_trains_saves_and_merges(tmp_path):
    from compressor.io.data import DataBundle
    from compressor.recipe import StageContext, parse_recipe, run_recipe

    data = toy_data(256)
    bundle = DataBundle("classification", TensorDataset(*data[:192]), TensorDataset(*data[192:]), num_classes=4)
    m = small_mlp()
    base = copy.deepcopy(m)
    recipe = parse_recipe({"name": "t", "stages": [{"method": "sara", "fraction": 0.1, "steps": 12, "batch_size": 32,
                                                     "lr": 1e-2, "rank_min_dim": 16}]})
    ctx = StageContext(model=m, data=bundle, workdir=tmp_path)
    (rep,) = run_recipe(recipe, ctx)
    res = rep["result"]
    assert res["steps"] == 12 and res["reselected"] and res["rank_params"] == ["2.weight"]
    assert res["trainable"] == res["selected"] and 0.09 < res["fraction"] < 0.11
    assert not any("parametrizations" in n for n, _ in ctx.model.named_parameters())
    loaded = load_adaptation(base, tmp_path / "sara_adapter.safetensors")
    for (n, a), (_, b) in zip(ctx.model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_recipe_validation_errors():
    from compressor.recipe import parse_recipe

    with pytest.raises(CompressorError, match="not both"):
        parse_recipe({"name": "t", "stages": [{"method": "sara", "fraction": 0.1, "threshold": 1e-3}]})
    with pytest.raises(CompressorError, match="fraction"):
        parse_recipe({"name": "t", "stages": [{"method": "sara", "fraction": 1.5}]})


def test_recipe_stage_without_labels_is_a_clear_error(tmp_path):
    from compressor.recipe import StageContext, parse_recipe, run_recipe

    recipe = parse_recipe({"name": "t", "stages": [{"method": "sara", "fraction": 0.1}]})
    with pytest.raises(CompressorError, match="labelled data"):
        run_recipe(recipe, StageContext(model=small_mlp(), data=None, workdir=tmp_path))


def test_shipped_recipe_validates():
    from compressor.recipe import load_recipe

    r = load_recipe("sara")
    assert r.stages[0].method == "sara"


def test_rank_penalty_gradient_is_the_nuclear_norm_gradient():
    """Oracle: autograd through torch.linalg.matrix_norm(S, 'nuc') on the dense S = W ⊙ M."""
    layer = nn.Linear(80, 70, bias=False)
    opt = SaRAOptimizer(layer, fraction=0.3, lambda_rank=2e-3, lr=1e-3)
    assert opt.rank_names == ["weight"]
    loss, grad = opt.rank_penalty("weight")
    d = opt.adapter.deltas["weight"]
    v = d.values.detach().clone().requires_grad_(True)
    s = torch.zeros(80 * 70).index_put((d.idx.long(),), v).view(70, 80)
    ref = 2e-3 * torch.linalg.matrix_norm(s, "nuc")
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(grad, v.grad, rtol=1e-4, atol=1e-7)
    # penalize="update": zero update → zero penalty and zero gradient (no arbitrary subgradient)
    layer2 = nn.Linear(80, 70, bias=False)
    opt2 = SaRAOptimizer(layer2, fraction=0.3, lambda_rank=2e-3, penalize="update")
    loss2, grad2 = opt2.rank_penalty("weight")
    assert loss2 == 0.0 and not grad2.any()


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    """The digits benchmark end to end (1 seed, 30 steps): every method runs and reports its figures."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("sara_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "sara.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--quick", "--out", str(tmp_path / "sara.json")])
    s = res["summary"]
    assert set(s) == {"sara", "sparse-random", "lora", "full"}
    assert s["sara"]["trainable"] == s["lora"]["trainable"] < 0.1 * s["full"]["trainable"]
    assert s["sara"]["grad_and_optimizer_bytes"]["mean"] < 0.2 * s["full"]["grad_and_optimizer_bytes"]["mean"]
