"""The harness of benchmarks/llm_scale.py: each step in its own process, its own peak RSS, hangs and failures
recorded with their reason, a table regenerated from the JSON; and (slow) the --quick layout end to end.

Oracles: processes that allocate a known amount of memory, exit with a known message, or sleep past the limit;
safetensors' own reader for the built folder; transformers' loader for the model it describes."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("llm_scale", ROOT / "benchmarks" / "llm_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _python(monkeypatch, bench, code: str):
    monkeypatch.setattr(bench, "argv_for", lambda cmd: [sys.executable, "-c", code])


def test_step_peak_rss_is_the_child_s_own(bench, monkeypatch):
    _python(monkeypatch, bench, "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); print('done')")
    big = bench.run_step("alloc", ["compress", "x"], timeout=120)
    _python(monkeypatch, bench, "print('small')")
    small = bench.run_step("small", ["compress", "y"], timeout=120)
    assert big["status"] == small["status"] == "ok" and big["exit_code"] == 0
    assert big["peak_rss_bytes"] >= 300 << 20  # the 300 MB it touched
    assert small["peak_rss_bytes"] < 200 << 20  # not the earlier child's peak (getrusage(CHILDREN) would say 300)
    assert big["command"] == "compress x"


def test_step_failure_and_hang_are_recorded_with_a_reason(bench, monkeypatch):
    _python(monkeypatch, bench, "import sys; print('working'); sys.exit('error: the model is too big — use bf16')")
    failed = bench.run_step("f", ["compress", "f"], timeout=120)
    assert failed["status"] == "failed" and failed["exit_code"] == 1
    assert failed["reason"] == "error: the model is too big — use bf16"
    _python(monkeypatch, bench, "import time; time.sleep(60)")
    hung = bench.run_step("h", ["compress", "h"], timeout=2)
    assert hung["status"] == "hang" and hung["seconds"] < 30 and "killed after 2 s" in hung["reason"]


def test_table_and_merge(bench, tmp_path):
    run = {"layout": "tinyllama-1.1b", "command": "python benchmarks/llm_scale.py", "cache": "/c", "checkpoint_bytes": 4 << 30,
           "environment": {"machine": "2 CPUs"},
           "steps": [{"step": "magnitude", "command": "compress /c/m -r x", "status": "ok", "seconds": 10.0, "peak_rss_bytes": 6 << 30},
                     {"step": "tp", "command": "python t", "status": "hang", "reason": "killed after 600 s", "seconds": 600.0,
                      "peak_rss_bytes": 5 << 30}]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(run))
    rerun = {**run, "steps": [{"step": "analyze", "command": "compress analyze /c/m", "status": "failed", "reason": "a | b",
                               "seconds": 1.0, "peak_rss_bytes": None}]}
    merged = bench.merge(path, rerun)
    assert [s["step"] for s in merged["steps"]] == ["analyze", "magnitude", "tp"]  # the harness's step order, old steps kept
    text = bench.table(merged)
    assert "| magnitude | `compress CACHE/m -r x` | ok | 10.0 | 6.00 | 1.50 |" in text
    assert "hang: killed after 600 s" in text and "failed: a \\| b" in text
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\ntext\n")
    bench.write_table(merged, doc)
    bench.write_table(merged, doc)  # rewriting replaces the block
    assert doc.read_text().count(bench.BEGIN) == 1 and "| tp |" in doc.read_text()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{bench.README_BEGIN}\nold\n{bench.README_END}\n\nrest\n")
    bench.write_table(merged, doc, readme)
    text = readme.read_text()  # the finished steps only, from the JSON; the rest of the README kept
    assert "magnitude 10.0 s / 6.00 GiB" in text and "MetaPruner" not in text and "old" not in text and text.endswith("rest\n")


@pytest.mark.slow
def test_quick_layout_end_to_end(bench, tmp_path):
    from safetensors import safe_open

    run = bench.main(["--quick", "--cache", str(tmp_path), "--steps", "analyze_config,magnitude,tp", "--timeout", "600", "--tp-timeout", "60"])
    folder = tmp_path / "quick-llama"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1  # written shard by shard
    total = 0
    for shard in shards:
        with safe_open(str(folder / shard), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert total * 4 == index["metadata"]["total_size"]
    steps = {s["step"]: s for s in run["steps"]}
    assert set(steps) == {"analyze_config", "magnitude", "tp"}
    assert steps["magnitude"]["status"] == "ok" and steps["magnitude"]["peak_rss_bytes"] > 0
    assert all(s["status"] in ("ok", "failed", "hang") for s in steps.values())
    assert all("reason" in s for s in steps.values() if s["status"] != "ok")
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "magnitude" / "model")
    assert abs(sum(float((p == 0).float().mean()) for n, p in out.named_parameters() if "layers" in n and p.dim() == 2) /
               sum(1 for n, p in out.named_parameters() if "layers" in n and p.dim() == 2) - 0.5) < 0.1


def test_a_tokenizer_without_pad_token_pads_with_eos(bench, tmp_path):
    """TinyLlama-like folders often ship a tokenizer with no pad token: batches of sentences pad with eos instead of
    failing with transformers' 'Asking to pad but the tokenizer does not have a padding token'."""
    from compressor.io.models import load_model

    folder = tmp_path / "m"
    bench.build_folder(folder, "quick-llama", 1 << 20)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.exists():
            cfg = json.loads(f.read_text())
            cfg.pop("pad_token", None)
            f.write_text(json.dumps(cfg))
    import transformers

    assert transformers.AutoTokenizer.from_pretrained(folder).pad_token is None  # the folder really has none
    loaded = load_model(folder)
    example = loaded.make_example(None)
    assert loaded.tokenizer.pad_token == "</s>" and example["input_ids"].shape[0] == 8
    assert (example["attention_mask"] == 0).any()  # sentences of different lengths were padded


def test_a_step_killed_by_a_signal_says_so(bench, monkeypatch):
    _python(monkeypatch, bench, "import os, signal; print('stage 1/1 magnitude', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    res = bench.run_step("k", ["compress", "k"], timeout=120)
    assert res["status"] == "failed" and res["reason"].startswith("killed by signal 9") and "stage 1/1 magnitude" in res["reason"]


def test_recipe_rows_say_completed_refused_hang_or_crash(bench, monkeypatch, tmp_path):
    info = {"model": "m", "m": {"path": "/c/m"}}
    cmds = bench.recipe_commands(info, tmp_path, ["demo", "sara"])
    assert list(cmds) == ["recipe:demo", "recipe:sara"]
    assert cmds["recipe:demo"][:5] == ["compress", "/c/m", "-r", "demo", "-d"] and cmds["recipe:demo"][5].startswith("text:")
    every = bench.recipe_commands(info, tmp_path)
    from compressor.recipe import shipped_recipes

    assert sorted(every) == sorted(f"recipe:{n}" for n in shipped_recipes())
    outcomes = {}
    for name, code in (("refused", "import sys; sys.stderr.write('error: would need 9 GB — use bf16\\n'); sys.exit(2)"),
                       ("crash", "raise RuntimeError('boom')"), ("completed", "print('ok')")):
        _python(monkeypatch, bench, code)
        outcomes[name] = bench.recipe_status(bench.run_step(f"recipe:{name}", ["compress", name], timeout=120))
    assert {k: v["status"] for k, v in outcomes.items()} == {"refused": "refused", "crash": "crash", "completed": "completed"}
    assert outcomes["refused"]["reason"] == "error: would need 9 GB — use bf16"
    assert outcomes["crash"]["reason"].startswith("RuntimeError: boom")
    hung = bench.recipe_status({"status": "hang", "exit_code": None})
    assert hung["status"] == "hang"
    run = {"layout": "l", "steps": [outcomes["refused"], outcomes["completed"]]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"layout": "l", "steps": [{"step": "analyze", "status": "ok"}]}))
    merged = bench.merge(path, run)
    assert [s["step"] for s in merged["steps"]] == ["analyze", "recipe:completed", "recipe:refused"]


def test_structured_step_records_the_report_phases_side_by_side_with_tp(bench, monkeypatch, tmp_path):
    """Oracle: a child that writes a known report.json into its -o folder and a tp child that prints known
    timings; the comparison is their sums and ratio, and the table says it."""
    out = tmp_path / "out"
    phases = {"startup": 2.0, "analysis": 3.0, "importance": 1.5, "selection": 0.1, "plan": 0.2, "cut": 2.0,
              "files": 0.2, "verify": 9.0, "generate": 4.0, "other": 0.1}
    report = {"phases": phases, "analysis_phases": {"export": 1.0, "onnx": 1.5, "total": 2.9},
              "analysis_plus_pruning": {"seconds": 7.0, "phases": ["analysis", "importance", "selection", "plan",
                                                                   "cut", "files"]},
              "stages": [{"result": {"params_before": 100, "params_after": 80}}]}
    code = (f"import json, pathlib; p = pathlib.Path({str(out)!r}); p.mkdir(parents=True, exist_ok=True); "
            f"(p / 'report.json').write_text(json.dumps({report!r}))")
    _python(monkeypatch, bench, code)
    ours = bench.run_step("structured", ["compress", "prune", "m", "-o", str(out)], timeout=120)
    assert ours["status"] == "ok" and ours["phases"] == phases and ours["analysis_plus_pruning"]["seconds"] == 7.0
    assert ours["params_after"] == 80 and ours["analysis_phases"]["onnx"] == 1.5
    tp = {"load_seconds": 2.0, "graph_seconds": 2.5, "step_seconds": 7.5, "params_after": 60}
    _python(monkeypatch, bench, f"import json; print(json.dumps({{'tp_result': {tp!r}}}))")
    theirs = bench.run_step("tp", ["python", "t"], timeout=120)
    c = bench.comparison([ours, theirs], {"structured", "tp"})
    assert c["compressor_analysis_plus_pruning_seconds"] == 7.0 and c["torch_pruning_graph_plus_step_seconds"] == 10.0
    assert c["ratio"] == 0.7 and c["same_run"] and c["torch_pruning_params_after"] == 60
    assert c["compressor_peak_rss_bytes"] == ours["peak_rss_bytes"] and c["torch_pruning_wall_seconds"] == theirs["seconds"]
    assert bench.comparison([ours, theirs], {"tp"})["same_run"] is False
    # run ids (one per invocation) decide when present: a later run of other steps keeps the pairing
    paired = [{**ours, "run": "r1"}, {**theirs, "run": "r1"}]
    assert bench.comparison(paired, {"replaceme"})["same_run"] is True
    assert bench.comparison([paired[0], {**theirs, "run": "r2"}], {"structured", "tp"})["same_run"] is False
    assert bench.comparison([ours, {**theirs, "status": "hang"}], {"structured", "tp"}) is None
    run = {"layout": "tinyllama-1.1b", "command": "c", "cache": str(tmp_path), "checkpoint_bytes": 4 << 30,
           "environment": {"machine": "2 CPUs"}, "steps": [ours, theirs], "comparison": c}
    text = bench.table(run)
    assert "analysis + pruning **7.0 s** vs torch-pruning's graph + step **10.0 s** (ratio 0.7)" in text
    assert "= 7.0 s; verify 9.0 s" in text
