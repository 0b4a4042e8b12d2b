"""Memory discipline of compress(): only the copies a recipe needs (issue 16, deliverable 4), and the up-front
refusal of a stage that cannot fit.

The oracle counts what the garbage collector can see, independently of the code under test: the distinct
storages of live nn.Parameter objects shaped like the model's big weight, sampled when each stage starts and
when a training loop starts (the peak of a training stage: the model, and the student beside it when
distilling). A copy of the model made anywhere shows up as one more such storage.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import compressor.train
from compressor.api import compress

WIDTH = 2048  # the big weight: 2048 x 2048 fp32 = 17 MB, most of the model


def wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))


def weight_copies() -> int:
    """Distinct storages of live parameters shaped like the big weight."""
    gc.collect()
    seen = set()
    for obj in gc.get_objects():
        if type(obj) is nn.Parameter and tuple(obj.shape) == (WIDTH, WIDTH):
            seen.add(obj.untyped_storage().data_ptr())
    return len(seen)


@pytest.fixture
def sampled(monkeypatch):
    """(samples list, on_stage callback): copies counted at each stage start and at each training loop start."""
    samples: list[tuple[str, int]] = []
    real_train = compressor.train.train

    def train(*args, **kwargs):
        samples.append(("train", weight_copies()))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(compressor.train, "train", train)
    return samples, lambda i, stage: samples.append((stage.method, weight_copies()))


@pytest.fixture
def pickled_mlp(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(wide_mlp(), path)
    gc.collect()
    return path


MAGNITUDE_50 = {"name": "m50", "stages": [{"method": "magnitude", "sparsity": 0.5, "scope": "global"},
                                          {"method": "finetune", "epochs": 0.2, "lr": 0.01}]}
QDISTILL = {"name": "qd", "stages": [{"method": "qdistill", "bits": 4, "epochs": 0.2, "export": []}]}
QDISTILL_LATE = {"name": "qd2", "stages": [{"method": "magnitude", "sparsity": 0.5},
                                           {"method": "qdistill", "bits": 4, "epochs": 0.2, "export": []}]}


def test_magnitude_recipe_keeps_one_copy_of_a_loaded_model(pickled_mlp, sampled, tmp_path):
    samples, on_stage = sampled
    compress(pickled_mlp, MAGNITUDE_50, "digits", tmp_path / "out", trust_pickle=True, measure_latency=False, on_stage=on_stage)
    assert [m for m, _ in samples] == ["magnitude", "finetune", "train"]
    # no teacher, no second working copy: the loaded model is the one pruned and fine-tuned
    assert max(n for _, n in samples) == 1, samples


def test_distilling_first_stage_holds_model_and_student_only(pickled_mlp, sampled, tmp_path):
    samples, on_stage = sampled
    compress(pickled_mlp, QDISTILL, "digits", tmp_path / "out", trust_pickle=True, measure_latency=False, on_stage=on_stage)
    # at the stage start only the working model (it is the teacher: nothing changed it yet); in training the student too
    assert dict(samples) == {"qdistill": 1, "train": 2}, samples


def test_distilling_after_a_change_keeps_a_teacher(pickled_mlp, sampled, tmp_path):
    samples, on_stage = sampled
    res = compress(pickled_mlp, QDISTILL_LATE, "digits", tmp_path / "out", trust_pickle=True, measure_latency=False, on_stage=on_stage)
    # the teacher is the unpruned input model: one copy beside the working model from the start, the student in training
    assert dict(samples) == {"magnitude": 2, "qdistill": 2, "train": 3}, samples
    assert res.report["memory"]["teacher_copy"] is True


def test_caller_module_is_copied_once_and_never_changed(sampled, tmp_path):
    samples, on_stage = sampled
    model = wide_mlp()
    before = model[3].weight.detach().clone()
    compress(model, MAGNITUDE_50, "digits", None, measure_latency=False, on_stage=on_stage)
    assert max(n for _, n in samples) == 2, samples  # the caller's module + the working copy
    assert torch.equal(model[3].weight, before)


def test_essential_sweep_reuses_the_working_model(pickled_mlp, sampled, tmp_path, monkeypatch):
    """Every grid point is evaluated on the one working model (weights restored from a copy of the pruned tensors),
    and the model comes out of a measure-only sweep with its weights as they went in."""
    from compressor.sweep.evaluators import Evaluator

    samples, on_stage = sampled
    real_call = Evaluator.__call__

    def call(self, model):
        samples.append(("level", weight_copies()))
        return real_call(self, model)

    monkeypatch.setattr(Evaluator, "__call__", call)
    recipe = {"name": "es", "stages": [{"method": "essential_sparsity", "grid": "0:0.5:0.25", "refine": None, "patterns": [], "apply": None}]}
    res = compress(pickled_mlp, recipe, "digits", None, trust_pickle=True, measure_latency=False, on_stage=on_stage)
    levels = [n for m, n in samples if m == "level"]
    assert len(levels) == 3 and max(n for _, n in samples) == 1, samples
    original = torch.load(pickled_mlp, weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), res.model.state_dict().values(), strict=True))


def test_latency_reloads_the_released_original(pickled_mlp, tmp_path):
    res = compress(pickled_mlp, {"name": "m", "stages": [{"method": "magnitude", "sparsity": 0.5}]}, "digits", tmp_path / "out",
                   trust_pickle=True)
    assert res.before["latency_ms"] > 0 and res.after["latency_ms"] > 0
    assert res.before["nonzero_params"] > res.after["nonzero_params"]


def test_a_large_original_is_timed_before_the_stages_and_never_reloaded(pickled_mlp, tmp_path, monkeypatch):
    """Over UNPAIRED_LATENCY_BYTES the original is timed while it is loaded, the result after the stages: the file
    is read once, and the report says the two timings were not paired."""
    import compressor.api as api

    loads = []
    real = api.load_model
    monkeypatch.setattr(api, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    monkeypatch.setattr(api, "UNPAIRED_LATENCY_BYTES", 0)
    res = compress(pickled_mlp, {"name": "m", "stages": [{"method": "magnitude", "sparsity": 0.5}]}, "digits", tmp_path / "out",
                   trust_pickle=True)
    assert len(loads) == 1  # the first load only
    assert res.before["latency_ms"] > 0 and res.after["latency_ms"] > 0
    assert "not alternately" in res.report["warnings"]["latency_unpaired"]


# ------------------------------------------------------------------------------------------- up-front refusal

from compressor.errors import RecipeError  # noqa: E402
from compressor.recipe import load_recipe, shipped_recipes  # noqa: E402
from compressor.utils.memory import ENV, available_bytes, parse_bytes  # noqa: E402


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_refuses_up_front_when_memory_is_short(name, cnn_state_file, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "1K")
    out = tmp_path / "out"
    with pytest.raises(RecipeError) as e:
        compress(cnn_state_file, name, "digits", out, arch="compressor.models:digits_cnn")
    msg = str(e.value)
    first = load_recipe(name).stages[0].method
    assert "\n" not in msg and f"stage 1 ({first})" in msg and "1.0 KB is available" in msg, msg
    assert "would need about" in msg and ("bf16" in msg or "streaming" in msg)  # what it needs, and a fix
    assert not out.exists()  # refused before anything was written


def test_the_stage_that_does_not_fit_is_named(cnn_state_file, tmp_path, monkeypatch):
    """An ONNX export (3.5 fp32 copies) fits where a magnitude ranking does not (the CNN's largest tensor holds
    most of its weights, and the radix select's scratch is ~20 bytes per weight of that tensor, plus a byte of
    mask per weight): with room for one and not the other, the run is refused at the magnitude stage, still before
    anything ran."""
    weights = sum(t.numel() * t.element_size() for t in torch.load(cnn_state_file).values())
    largest = max(t.numel() for t in torch.load(cnn_state_file).values())
    assert 7 * weights // 2 < 20 * largest + weights // 4  # the layout this test needs
    monkeypatch.setenv(ENV, str(7 * weights // 2 + 1024))  # 3.5 fp32 copies fit, one tensor's ranking scratch does not
    recipe = {"name": "two", "stages": [{"method": "export"}, {"method": "magnitude", "sparsity": 0.5, "scope": "global"}]}
    with pytest.raises(RecipeError, match=r"stage 2 \(magnitude\)"):
        compress(cnn_state_file, recipe, "digits", tmp_path / "o", arch="compressor.models:digits_cnn")
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv(ENV, str(64 * weights))
    compress(cnn_state_file, recipe, "digits", tmp_path / "o", arch="compressor.models:digits_cnn", measure_latency=False)


def test_cli_refusal_is_one_line_and_exit_2(cnn_state_file, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, ENV: "1K"}
    r = subprocess.run([sys.executable, "-m", "compressor.cli", str(cnn_state_file), "--arch", "compressor.models:digits_cnn",
                        "-r", "magnitude-50", "-d", "digits", "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "magnitude" in lines[0] and "1.0 KB is available" in lines[0], r.stderr


def test_memory_sizes_parse_and_cap():
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("3.5G") == int(3.5 * (1 << 30)) and parse_bytes("2GiB") == 2 << 30
    assert parse_bytes("4096") == 4096
    with pytest.raises(ValueError):
        parse_bytes("lots")
    import psutil

    assert abs(available_bytes("cpu") - psutil.virtual_memory().available) < (1 << 30)


# ------------------------------------------------------------------------------------------- checkpoint dtype


def _llama_folder(tmp_path_factory, name: str, dtype=torch.float32, layers: int | None = None):
    """A tiny Llama saved in `dtype` with a BPE tokenizer (the benchmark's builder, trained offline); its folder and
    config."""
    import importlib.util
    from pathlib import Path

    transformers = pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("llm_scale", Path(__file__).resolve().parents[1] / "benchmarks" / "llm_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = tmp_path_factory.mktemp(name) / "llama"
    torch.manual_seed(0)
    cfg = bench.llama_config("quick-llama")
    if layers is not None:
        cfg.num_hidden_layers = layers
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(folder)
    bench.build_tokenizer(folder)
    return folder, cfg


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    return _llama_folder(tmp_path_factory, "bf16", torch.bfloat16)[0]


def _saved_dtypes(folder) -> set[str]:
    from safetensors import safe_open

    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return out


def test_a_bf16_checkpoint_stays_bf16_through_stages_that_do_not_need_fp32(bf16_llama, tmp_path):
    assert _saved_dtypes(bf16_llama) == {"BF16"}
    res = compress(bf16_llama, {"name": "m", "stages": [{"method": "magnitude", "sparsity": 0.5}]}, None, tmp_path / "o",
                   measure_latency=False)
    assert {p.dtype for p in res.model.parameters()} == {torch.bfloat16}
    assert _saved_dtypes(tmp_path / "o" / "model") == {"BF16"}  # not doubled to fp32 on the way
    assert "upcast" not in res.report["stages"][0]


def test_a_stage_that_needs_fp32_upcasts_once_and_says_so(bf16_llama, tmp_path):
    recipe = {"name": "m", "stages": [{"method": "magnitude", "sparsity": 0.5}, {"method": "export", "format": "onnx"}]}
    res = compress(bf16_llama, recipe, None, tmp_path / "o", measure_latency=False)
    assert "upcast" not in res.report["stages"][0] and res.report["stages"][1]["upcast"] == "bfloat16 -> float32"
    assert {p.dtype for p in res.model.parameters()} == {torch.float32}
    assert (tmp_path / "o" / "model.onnx").exists()


# ------------------------------------------------------------------------------------------- ReplaceMe


@pytest.fixture(scope="module")
def fp32_llama(tmp_path_factory):
    """A tiny fp32 Llama folder (6 blocks) with the benchmark's BPE tokenizer."""
    folder, cfg = _llama_folder(tmp_path_factory, "fp32", layers=6)
    return folder, (cfg.vocab_size, cfg.hidden_size)


def test_replaceme_recipe_makes_no_copy_of_the_model(fp32_llama, tmp_path, monkeypatch):
    """The shipped replaceme-2 recipe, baselines included: at the stage start and at every quality measurement
    inside it (dense, the cut without T, naive drop, the pruned model) one model is alive: its embedding and
    lm_head, two storages of shape (vocab, hidden), and no third."""
    import yaml

    import compressor.methods.replaceme as stage
    from compressor.recipe import shipped_recipes

    folder, shape = fp32_llama

    def copies() -> int:
        gc.collect()
        return len({o.untyped_storage().data_ptr() for o in gc.get_objects() if type(o) is nn.Parameter and tuple(o.shape) == shape})

    samples: list[int] = []
    real_quality = stage.quality

    def quality(*args, **kwargs):
        samples.append(copies())
        return real_quality(*args, **kwargs)

    monkeypatch.setattr(stage, "quality", quality)
    rec = yaml.safe_load(shipped_recipes()["replaceme-2"].read_text(encoding="utf-8"))
    rec["stages"][0].update(calib_samples=96, eval_samples=16)
    res = compress(folder, rec, None, tmp_path / "out", measure_latency=False, on_stage=lambda i, st: samples.append(copies()))
    assert len(samples) == 2 + 4 and set(samples) == {2}
    assert len(res.report["stages"][0]["result"]["comparison"]) == 4
    assert res.model.config.num_hidden_layers == 4


def test_torch_export_estimate_depends_on_the_kind():
    """A Hugging Face model is saved from its own tensors (safetensors gathers their bytes once: 1 model); a plain
    torch model is copied and its program serialised (2 models). The ONNX export's 3.5 fp32 copies do not depend on it."""
    from compressor.recipe import REGISTRY
    from compressor.utils.memory import Footprint

    spec = REGISTRY["export"]
    gib = 1 << 30
    for kind, copies in (("hf", 1), ("torch", 2), ("", 2)):
        fp = Footprint(n_params=gib // 4, param_bytes=gib, largest_bytes=gib // 8, kind=kind)
        assert spec.memory_needed(fp, spec.params(format="torch")) == copies * gib
        assert spec.memory_needed(fp, spec.params(format="onnx")) == 7 * gib // 2
