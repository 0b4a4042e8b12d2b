"""compressor.eval against independent oracles: accuracy recomputed from the module's own forward, perplexity of
a uniform model equal to the vocabulary size, agreement of identical / negated outputs, the reference the
compressed model is compared with, latency labelled with the device it ran on, and the API / CLI device policy."""

import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compressor import device as devices
from compressor import eval as ev
from compressor.errors import InputError
from compressor.io.data import random_inputs
from compressor.wrappers import wrap


def small_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def test_measure_accuracy_and_counts_match_an_independent_computation(digits):
    m = small_mlp()
    x, y = digits.test.tensors
    with torch.no_grad():
        want = float((m(x).argmax(1) == y).float().mean())
    got = ev.measure(wrap(m), digits, None, (x[:8],))
    assert got["accuracy"] == pytest.approx(want, abs=1e-9)
    assert got["params"] == 64 * 16 + 16 + 16 * 10 + 10
    assert got["macs"] == 64 * 16 + 16 * 10
    assert "latency_ms" not in got


def test_output_agreement_identical_and_negated():
    a = torch.randn(6, 10)
    same = ev.output_agreement(a, a)
    assert same["output_cosine"] == pytest.approx(1.0, abs=1e-6) and same["output_kl"] == pytest.approx(0.0, abs=1e-6)
    assert ev.output_agreement(-a, a)["output_cosine"] == pytest.approx(-1.0, abs=1e-6)


class Uniform(nn.Module):
    """A causal 'LM' whose logits are all equal: every token has probability 1/V, so perplexity is V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.w)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_bert_folder):
    from compressor.io.models import load_model

    tok = load_model(tiny_bert_folder).tokenizer
    texts = ["a short sentence", "another, somewhat longer sentence about nothing"]
    assert ev.perplexity(Uniform(tok.vocab_size), tok, texts) == pytest.approx(tok.vocab_size, rel=1e-4)


def test_reference_for_unlabelled_data_is_the_originals_outputs():
    m = small_mlp()
    data = random_inputs((1, 8, 8), seed=0)
    w = wrap(m)
    ref = ev.make_reference(w, data, w.make_example(data))
    x = data.test.tensors[0][:256]
    torch.testing.assert_close(ref["inputs"], x)
    with torch.no_grad():
        torch.testing.assert_close(ref["outputs"], m(x))
    got = ev.measure(w, data, ref)
    assert got["output_cosine"] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        m[3].weight.mul_(-1)
        m[3].bias.mul_(-1)
    assert ev.measure(w, data, ref)["output_cosine"] == pytest.approx(-1.0, abs=1e-5)


def test_latency_is_labelled_with_the_device_it_ran_on():
    m = small_mlp()
    got = ev.measure(wrap(m), None, None, (torch.randn(4, 1, 8, 8),), latency=True, runs=3, warmup=1)
    assert got["latency_ms"] > 0 and got["latency_runtime"] == f"torch-{devices.label('cpu')}"


def test_outputs_of_a_bare_module_run_where_it_is():
    m = small_mlp()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ev.outputs(m, x), m(x))
        torch.testing.assert_close(ev.outputs(wrap(m), x), m(x))


def test_conv1d_absent_only_when_transformers_is_not_installed(monkeypatch):
    from compressor.eval.metrics import _conv1d_type

    monkeypatch.setitem(sys.modules, "transformers.pytorch_utils", None)  # import raises ModuleNotFoundError
    assert _conv1d_type() is None
    broken = types.ModuleType("transformers.pytorch_utils")  # present, but without Conv1D: a broken install
    monkeypatch.setitem(sys.modules, "transformers.pytorch_utils", broken)
    with pytest.raises(ImportError):
        _conv1d_type()


def test_evaluate_model_on_cpu_leaves_the_callers_module(digits):
    from compressor.api import evaluate_model

    m = small_mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    got = evaluate_model(m, digits, device="cpu", latency=False)
    assert 0.0 <= got["accuracy"] <= 1.0 and "latency_ms" not in got
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with pytest.raises(InputError, match="device"):
        evaluate_model(m, digits, device="tpu")


def test_compress_report_labels_latency_with_the_device(digits):
    from compressor.api import compress

    res = compress(small_mlp(), {"name": "noop", "stages": [{"method": "finetune", "epochs": 0.05}]}, digits,
                   device="cpu")
    assert res.before["latency_runtime"] == res.after["latency_runtime"] == "torch-cpu"
    assert res.report["environment"]["device"] == "cpu"
    assert next(res.model.parameters()).device.type == "cpu"


def test_bench_kernels_api_writes_json(tmp_path):
    from compressor.api import bench_kernels

    out = tmp_path / "k.json"
    res = bench_kernels(device="cpu", threads="1", shapes="32x32", sparsities="0.5", rows="1", repeats=1, output=out)
    run = res["runs"]["cpu-threads1-custom"]
    assert run["device"] == "cpu" and run["linear"] and json.loads(out.read_text())["runs"].keys() == res["runs"].keys()
    with pytest.raises(InputError, match="shapes"):
        bench_kernels(device="cpu", shapes="32by32", output=out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compress_on_gpu_times_there_and_returns_on_the_callers_device(digits):
    from compressor.api import compress

    res = compress(small_mlp(), {"name": "noop", "stages": [{"method": "finetune", "epochs": 0.05}]}, digits,
                   device="cuda")
    label = devices.label(devices.resolve("cuda"))
    assert res.before["latency_runtime"] == res.after["latency_runtime"] == f"torch-{label}"
    assert res.report["environment"]["device"] == label
    assert next(res.model.parameters()).device.type == "cpu"  # the caller's module was on the CPU
    assert 0.5 < res.after["accuracy"] <= 1.0


def test_latency_budget_cuts_runs_of_a_slow_forward(monkeypatch):
    """Closed form on a fake clock: a forward of 0.25 s under a 2 s budget gets its first call as the only warm-up
    and 2 / 0.25 = 8 timed runs (pairs: 2 / 0.5 = 4); a fast one keeps 5 warm-ups + 30 runs; never under 3 runs."""
    import importlib

    lat = importlib.import_module("compressor.eval.latency")  # the package re-exports a function of that name
    clock = {"t": 0.0}
    monkeypatch.setattr(lat.time, "perf_counter", lambda: clock["t"])

    def forward(seconds, calls):
        def fn():
            clock["t"] += seconds
            calls.append(1)
        return fn

    calls: list = []
    assert lat.timed(forward(0.25, calls), runs=30, warmup=5, budget_s=2.0) == pytest.approx(250.0)
    assert len(calls) == 1 + 8
    calls.clear()
    lat.timed(forward(0.001, calls), runs=30, warmup=5, budget_s=2.0)
    assert len(calls) == 5 + 30
    calls.clear()
    lat.timed(forward(10.0, calls), runs=30, warmup=5, budget_s=2.0)
    assert len(calls) == 1 + 3
    a, b = [], []
    ms = lat.paired_latency(forward(0.25, a), forward(0.25, b), runs=30, warmup=5, budget_s=2.0)
    assert ms == pytest.approx((250.0, 250.0)) and len(a) == len(b) == 1 + 4
