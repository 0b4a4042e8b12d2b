"""What an LLM-size run of a recipe relies on, checked on a tiny Llama folder (issue 16: every shipped recipe
completes on a 1.1 B model or is refused up front in one line):

* a recipe that cannot run on a Hugging Face folder (a torch-only stage, a stage that cannot fit) is refused
  from config.json and the shards' headers, before a weight is loaded; so is `compress sweep`;
* a masked model is saved and sized without a copy of its weights: the folder equals plain_state_dict (the
  deep-copy oracle) and size_bytes equals safetensors' own serialisation;
* the latency pair is skipped (with a warning) when the original cannot be reloaded beside the result.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compressor.api as api
from compressor import masks as M
from compressor.errors import RecipeError
from compressor.utils.memory import ENV

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny fp32 Llama folder with the benchmark's offline BPE tokenizer."""
    spec = importlib.util.spec_from_file_location("llm_scale", ROOT / "benchmarks" / "llm_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = tmp_path_factory.mktemp("llm") / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(bench.llama_config("quick-llama")).save_pretrained(folder)
    bench.build_tokenizer(folder)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the weights is an error: what is refused must be refused before."""
    def boom(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(api, "load_model", boom)


def test_torch_only_recipe_is_refused_before_loading(llama, tmp_path, no_loading):
    with pytest.raises(RecipeError, match=r"stage 2 \(finetune\) does not work on hf models"):
        api.compress(llama, "magnitude-50", None, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_stage_that_cannot_fit_is_refused_before_loading(llama, tmp_path, no_loading, monkeypatch):
    monkeypatch.setenv(ENV, "1M")  # the folder's weights alone are ~10 MB
    with pytest.raises(RecipeError) as e:
        api.compress(llama, {"name": "m", "stages": [{"method": "magnitude", "sparsity": 0.5}]}, None, tmp_path / "o")
    assert "stage 1 (magnitude) would need about" in str(e.value) and "1.0 MB is available" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_folder_footprint_is_the_loaded_model_s(llama):
    fp = api.folder_footprint(llama)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    params = {id(p): p for p in model.parameters()}.values()
    assert fp.n_params == sum(p.numel() for p in params)
    assert fp.param_bytes == 4 * fp.n_params and fp.largest_bytes == 4 * max(p.numel() for p in params)
    assert api.folder_footprint(llama / "config.json") is None


def _cli(args, env_extra):
    env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_sweep_and_recipe_refusals_are_one_line_exit_2_before_loading(llama, tmp_path):
    for args, words in ((["sweep", str(llama), "-o", str(tmp_path / "s"), "--grid", "0.5"], "the sweep would need about"),
                        ([str(llama), "-r", "essential-sparsity", "-o", str(tmp_path / "e")], "stage 1 (essential_sparsity) would need")):
        r = _cli(args, {ENV: "2M"})
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert words in lines[0] and "2.0 MB is available" in lines[0], lines[0]
        assert "Loading weights" not in r.stdout + r.stderr  # refused before transformers read the shards


def test_sweep_api_checks_memory_after_loading(llama, monkeypatch):
    from compressor.errors import InputError
    from compressor.sweep import sweep, sweep_bytes

    fp = api.folder_footprint(llama)
    monkeypatch.setenv(ENV, str(sweep_bytes(fp) - 1))
    with pytest.raises(InputError, match="the sweep would need about"):
        sweep(llama, grid="0.5", n_texts=8, progress=False)


def _masked_llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(1)
    m = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    M.apply_masks(m, M.magnitude_masks(M.prunable_weights(m), 0.5))
    return m


def test_masked_hf_model_is_saved_from_its_own_tensors(tmp_path, monkeypatch):
    import compressor.wrappers.hf_model as hf_model
    from compressor.wrappers.hf_model import HFModel

    m = _masked_llama()
    want = M.plain_state_dict(m)  # the oracle: a deep copy with the masks baked in
    monkeypatch.setattr(hf_model, "plain_copy", lambda *a: (_ for _ in ()).throw(AssertionError("copied")))
    HFModel(m).save(tmp_path)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert M.has_masks(m)  # the model keeps its masks


@pytest.mark.parametrize("which", ["cnn", "masked", "bf16"])
def test_size_bytes_equals_safetensors_serialisation(which):
    from safetensors.torch import save

    from compressor.models import digits_cnn
    from compressor.wrappers import wrap

    m = {"cnn": digits_cnn, "masked": _masked_llama, "bf16": lambda: _masked_llama(torch.bfloat16)}[which]()
    oracle = {k: v.detach().contiguous() for k, v in M.plain_state_dict(m).items()}  # int64 BN counters: mixed dtypes
    assert wrap(m).size_bytes() == len(save(oracle))


def test_latency_is_skipped_when_the_original_cannot_be_reloaded(llama, tmp_path, monkeypatch):
    fp = api.folder_footprint(llama)
    recipe = {"name": "m", "stages": [{"method": "magnitude", "sparsity": 0.5}]}
    # what compress() sees as free when the stages are done: less than the reloaded original + the baked copy
    # (2 x 1.25 x the weights); the up-front stage check reads the machine's figure as usual
    monkeypatch.setattr(api, "available_bytes", lambda device=None: int(2.4 * fp.param_bytes))
    res = api.compress(llama, recipe, None, tmp_path / "o")
    assert "latency_ms" not in res.after and "latency not measured" in res.report["warnings"]["latency_error"]
    monkeypatch.setattr(api, "available_bytes", lambda device=None: int(2.6 * fp.param_bytes))
    res = api.compress(llama, recipe, None, tmp_path / "o2")
    assert res.after["latency_ms"] > 0 and "latency_error" not in res.report["warnings"]
