"""magnitude (one-shot, unstructured / N:M) and gradual (Zhu & Gupta) stages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compressor import masks as M
from compressor.errors import RecipeError
from compressor.methods.gradual import cubic_sparsity, gradual_prune
from compressor.methods.magnitude import prune
from compressor.models import digits_cnn, digits_example_inputs, digits_mlp
from compressor.recipe import StageContext, load_recipe, run_recipe


@pytest.fixture(scope="module")
def digits():
    from compressor.io.data import load_data

    return load_data("digits")


@pytest.mark.parametrize("name", ["magnitude-50", "nm-2-4", "gradual-80", "imp-rewind"])
def test_shipped_recipes_validate(name):
    r = load_recipe(name)
    assert r.stages and r.stages[-1].method == "export"


@pytest.mark.parametrize("stage,match", [
    ({"method": "magnitude", "sparsity": 1.0}, "sparsity"),
    ({"method": "magnitude", "sparsity": -0.2}, "sparsity"),
    ({"method": "magnitude", "pattern": "4:4"}, "1 <= N < M"),
    ({"method": "magnitude", "pattern": "two:four"}, "N:M"),
    ({"method": "gradual", "final_sparsity": 0.3, "initial_sparsity": 0.5}, "initial_sparsity"),
    ({"method": "imp_rewind", "fraction": 1.0}, "fraction"),
    ({"method": "imp_rewind", "variant": "magic"}, "variant"),
])
def test_bad_recipe_params_are_recipe_errors(stage, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe({"name": "x", "stages": [stage]})


def test_global_unstructured_prune_exact_and_both_denominators():
    torch.manual_seed(0)
    model = digits_cnn()
    rep = prune(model, 0.5)
    n_masked = rep["masked_numel"]
    assert rep["pruned"] == round(0.5 * n_masked)
    assert rep["sparsity_all_params"] == pytest.approx(rep["pruned"] / rep["total_params"])
    assert rep["sparsity_all_params"] < rep["sparsity_masked"]  # BN/biases are dense
    # pruning again to a higher target only adds zeros
    before = M.current_masks(model)
    prune(model, 0.7)
    after = M.current_masks(model)
    assert all(not (after[k] & ~before[k]).any() for k in before)
    assert M.sparsity_report(model)["pruned"] == round(0.7 * n_masked)


def test_layerwise_and_exclude():
    model = digits_cnn()
    rep = prune(model, 0.4, scope="layerwise", exclude=["fc", "conv1"])
    assert set(rep["per_tensor"]) == {"conv2.weight", "conv3.weight", "fc1.weight"}
    for k, s in rep["per_tensor"].items():
        n = model.get_parameter(k.replace(".weight", ".parametrizations.weight.original")).numel()
        assert s == pytest.approx(round(0.4 * n) / n)
    assert not M.has_masks(model.fc) and (model.fc.weight != 0).all()
    with pytest.raises(RecipeError, match="no prunable layer matched"):
        prune(digits_cnn(), 0.5, include=["decoder.*"])


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_prune_pattern_on_model_and_skip(pattern):
    n, m = map(int, pattern.split(":"))
    model = digits_cnn()
    with pytest.raises(RecipeError, match="not divisible"):  # conv1 has 1·3·3 = 9 inputs per output
        prune(model, pattern=pattern)
    rep = prune(model, pattern=pattern, on_indivisible="skip")
    assert rep["skipped"] == ["conv1.weight"]
    for k, mk in M.current_masks(model).items():
        groups = mk.reshape(mk.shape[0], -1).reshape(-1, m)
        assert (groups.sum(1) == m - n).all(), k
    assert rep["sparsity_masked"] == pytest.approx(n / m)


def test_magnitude_stage_then_export_has_zeros_and_runs_in_onnxruntime(tmp_path, digits):
    import onnx
    from onnx import numpy_helper

    from compressor.eval import accuracy, accuracy_onnx

    recipe = load_recipe({"name": "t", "stages": [{"method": "magnitude", "sparsity": 0.6},
                                                  {"method": "export", "format": "onnx"}]})
    torch.manual_seed(0)
    ctx = StageContext(model=digits_cnn().eval(), data=digits, example_inputs=digits_example_inputs(), workdir=tmp_path)
    reports = run_recipe(recipe, ctx)
    res = reports[0]["result"]
    assert res["sparsity_masked"] == pytest.approx(0.6, abs=1e-4)
    assert 0.0 <= res["accuracy_after"] <= 1.0 and 0.0 <= res["accuracy_before"] <= 1.0
    masks = M.current_masks(ctx.model)  # masks still applied after the export stage
    assert masks
    path = tmp_path / "model.onnx"
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    for k, mk in masks.items():
        assert (inits[k][~mk.numpy()] == 0).all()
    assert accuracy_onnx(str(path), digits.test) == pytest.approx(accuracy(ctx.model, digits.test), abs=1e-6)


# ------------------------------------------------------------------------------------------------ gradual


def _zhu_gupta(t, s_i, s_f, t0, dt, n):
    """Zhu & Gupta's schedule written out independently: value at the last update point at or before t."""
    if t < t0:
        return s_i
    last = min(t0 + ((t - t0) // dt) * dt, t0 + n * dt)
    return s_f + (s_i - s_f) * (1 - (last - t0) / (n * dt)) ** 3


def test_cubic_schedule_matches_formula():
    s_f, s_i, t0, dt, n = 0.8, 0.1, 10, 5, 4
    assert cubic_sparsity(15, s_f, s_i, t0, dt, n) == pytest.approx(0.8 + (0.1 - 0.8) * 0.75**3)
    assert cubic_sparsity(30, s_f, s_i, t0, dt, n) == pytest.approx(0.8)
    for t in range(0, 60):
        assert cubic_sparsity(t, s_f, s_i, t0, dt, n) == pytest.approx(_zhu_gupta(t, s_i, s_f, t0, dt, n))
    # TF reference at the update points: p = clip((t − begin)/(end − begin), 0, 1); s = tgt + (init − tgt)(1 − p)^3
    for t in range(t0, t0 + n * dt + 1, dt):
        p = min(max((t - t0) / (n * dt), 0.0), 1.0)
        assert cubic_sparsity(t, s_f, s_i, t0, dt, n) == pytest.approx(s_f + (s_i - s_f) * (1 - p) ** 3)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_gradual_prune_follows_schedule_and_keeps_zeros(opt, digits):
    torch.manual_seed(0)
    model = digits_mlp(hidden=64)
    out = gradual_prune(model, digits.train, 0.75, steps=40, begin_fraction=0.1, end_fraction=0.6, frequency=5,
                        optimizer=opt, lr=0.01 if opt == "sgd" else 1e-3, progress=False, device="cpu")
    t0, dt, n = out["begin_step"], out["frequency"], out["n_updates"]
    assert (t0, dt, n) == (4, 5, 4)
    sched = out["schedule"]
    assert [row[0] for row in sched] == [t0 + j * dt for j in range(1, n + 1)]  # t0 itself targets s_i = 0
    numel = {k: v.numel() for k, v in M.prunable_weights(model).items()}
    for t, target, achieved in sched:
        assert target == pytest.approx(_zhu_gupta(t, 0.0, 0.75, t0, dt, n))
        expect = sum(round(target * v) for v in numel.values()) / sum(numel.values())  # layer-wise exact_k
        assert achieved == pytest.approx(expect, abs=1e-9)
    assert out["sparsity_masked"] == pytest.approx(0.75, abs=2e-3)
    masks = M.current_masks(model)
    for k, w in M.prunable_weights(model).items():
        assert (w.detach()[~masks[k]] == 0).all()  # stored values zero: optimizer state was cleared too
        assert math.isclose(1 - float(masks[k].float().mean()), 0.75, abs_tol=2e-3)


def test_gradual_stage_reports_accuracy(digits, tmp_path):
    recipe = load_recipe({"name": "g", "stages": [{"method": "gradual", "final_sparsity": 0.6, "epochs": 4, "frequency": 4,
                                                   "lr": 0.1}]})
    torch.manual_seed(0)
    ctx = StageContext(model=digits_mlp(hidden=64), data=digits, workdir=tmp_path)
    res = run_recipe(recipe, ctx)[0]["result"]
    assert res["sparsity_masked"] == pytest.approx(0.6, abs=2e-3)
    assert res["accuracy_after"] > res["accuracy_before"] + 0.3  # it trained (untrained MLP ≈ 10 %)
    with pytest.raises(RecipeError, match="labelled data"):
        run_recipe(recipe, StageContext(model=digits_cnn(), data=None, workdir=tmp_path))
    assert np.isfinite(res["final_loss"])
