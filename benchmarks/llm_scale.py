"""LLM-size runs (issue 16): wall time and peak RSS of each step a user would type, on random-weight Hugging Face
folders of real layouts, next to torch-pruning's MetaPruner on the same model.

    .venv/bin/python benchmarks/llm_scale.py --cache /big/cache            # build the folders once, run every step
    .venv/bin/python benchmarks/llm_scale.py --cache DIR --steps tp,analyze  # a few steps (merged into the JSON)
    .venv/bin/python benchmarks/llm_scale.py --cache DIR --steps recipes --recipes demo,sara --timeout 600
                                                      # shipped recipes: one row each, completed / refused / hang / crash
    .venv/bin/python benchmarks/llm_scale.py --quick --cache /tmp/q        # a tiny Llama: smoke test of the harness
    .venv/bin/python benchmarks/llm_scale.py --table                       # docs/benchmarks.md table from the JSON

Layouts: TinyLlama-1.1B (22 layers, hidden 2048, FFN 5632, 32 query / 4 KV heads, vocab 32000; fp32 safetensors
shards + a byte-level BPE tokenizer trained offline on compressor/data/sentences.txt) and a Llama-3-8B layout as
config.json only. The folders are written tensor by tensor (model built on the meta device, each tensor filled
with random values and written with its shard): building never holds more than one shard.

Each step runs in a fresh subprocess; its peak RSS is that process's own (os.wait4's rusage), its wall time
includes interpreter start-up and imports, as a user sees them. A step that exceeds --timeout is killed and
recorded as a hang; a non-zero exit is a failure with the last line it printed. Steps are independent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "llm_scale.json"
DOC = ROOT / "docs" / "benchmarks.md"
SENTENCES = ROOT / "compressor" / "data" / "sentences.txt"
BEGIN, END = "<!-- llm_scale table: benchmarks/llm_scale.py --table -->", "<!-- end llm_scale table -->"
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- llm_scale summary: benchmarks/llm_scale.py --table -->", "<!-- end llm_scale summary -->"

LAYOUTS = {
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0),
    # --quick: the same family at toy size (multi-shard, GQA), for a harness smoke test in seconds
    "quick-llama": dict(vocab_size=4096, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5),
    "quick-config": dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5),
}
STEPS = ("analyze", "analyze_config", "structured", "structured_heads", "replaceme", "magnitude", "magnitude_layerwise", "sweep", "int8", "tp",
         "recipes")
# step `recipes`: one row per shipped recipe, "recipe:NAME", run as a user would on the folder (text data given);
# its status says completed / refused (exit 2, one line: the reason) / hang / crash
RECIPE = "recipe:"


# ------------------------------------------------------------------------------------------- building


def llama_config(layout: str):
    from transformers import LlamaConfig

    return LlamaConfig(**LAYOUTS[layout], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained offline on the shipped sentences (pad = eos, as TinyLlama's chat tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=4000, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(folder)


def build_folder(folder: Path, layout: str, shard_bytes: int, seed: int = 0) -> dict:
    """Random-weight HF folder of `layout`: config.json, safetensors shards of at most `shard_bytes` + index,
    tokenizer. The model is built on the meta device; each tensor is filled and written with its shard."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    cfg = llama_config(layout)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items() if "rotary_emb" not in k}
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 4 * int(torch.Size(shape).numel())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.empty(shape).normal_(0.0, 0.02, generator=gen)
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * 4
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(folder)
    build_tokenizer(folder)
    return {"layout": layout, "params": total // 4, "bytes": total, "shards": len(shards)}


def build_config_only(folder: Path, layout: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(layout)
    cfg.save_pretrained(folder)
    return {"layout": layout, "config_only": True}


def ensure_models(cache: Path, quick: bool, model: Path | None = None) -> dict:
    """The folders in `cache` (built once; a folder is complete when its .done marker exists); `model`: an existing
    folder of the big layout to use instead of building one."""
    big, cfg_only = ("quick-llama", "quick-config") if quick else ("tinyllama-1.1b", "llama-3-8b")
    shard = 64 << 10 if quick else 2 << 30
    info = {}
    if model is not None:
        files = list(model.glob("*.safetensors"))
        info[big] = {"layout": big, "path": str(model.resolve()), "bytes": sum(f.stat().st_size for f in files), "shards": len(files),
                     "given": True}
    for layout, builder in ((big, lambda f: build_folder(f, big, shard)), (cfg_only, lambda f: build_config_only(f, cfg_only))):
        if layout in info:
            continue
        folder = cache / layout
        done = folder / ".done"
        if not done.exists():
            t0 = time.time()
            meta = builder(folder)
            meta["build_seconds"] = round(time.time() - t0, 1)
            done.write_text(json.dumps(meta))
        info[layout] = {**json.loads(done.read_text()), "path": str(folder)}
    text = cache / "calib.txt"
    if not text.exists():
        text.write_text(SENTENCES.read_text(encoding="utf-8"))
    for scope in ("global", "layerwise"):  # the shipped magnitude-50 fine-tunes (torch only): a user writes these
        (cache / f"magnitude-50-{scope}.yaml").write_text(
            f"name: magnitude-50-{scope}\ndescription: one-shot {scope} magnitude 50 %, saved as an HF folder\n"
            f"stages:\n  - method: magnitude\n    sparsity: 0.5\n    scope: {scope}\n")
    info["model"], info["config"] = big, cfg_only
    return info


# ------------------------------------------------------------------------------------------- steps


def step_commands(info: dict, cache: Path, quick: bool, tp_ratio: float) -> dict[str, list[str]]:
    """{step: the command line a user would type}, `compress` standing for the console script."""
    model, cfg = info[info["model"]]["path"], info[info["config"]]["path"]
    out = cache / "out"
    grid = "0.3,0.6"
    texts = "8" if quick else "32"
    return {
        "analyze": ["compress", "analyze", model],
        "analyze_config": ["compress", "analyze", cfg],
        # FFN channels 25 % (the streaming cut); with --heads as well: 25 % of TinyLlama's 32 query heads asks 24,
        # which LlamaConfig refuses (2048 % 24); 16 and 32 are equally near, so all heads stay and the report says
        # why (compressor.graph.heads)
        "structured": ["compress", "prune", model, "--ratio", "0.25", "-o", f"{out}/structured", "--overwrite"],
        "structured_heads": ["compress", "prune", model, "--ratio", "0.25", "--heads", "-o", f"{out}/structured_heads",
                             "--overwrite"],
        "replaceme": ["compress", model, "-r", "replaceme-2", "-d", f"text:{cache / 'calib.txt'}", "-o", f"{out}/replaceme", "--overwrite"],
        "magnitude": ["compress", model, "-r", str(cache / "magnitude-50-global.yaml"), "-o", f"{out}/magnitude", "--overwrite"],
        "magnitude_layerwise": ["compress", model, "-r", str(cache / "magnitude-50-layerwise.yaml"), "-o", f"{out}/magnitude_lw", "--overwrite"],
        "sweep": ["compress", "sweep", model, "-o", f"{out}/sweep", "--grid", grid, "--texts", texts, "--overwrite"],
        "int8": ["compress", model, "-r", "int8-export", "-o", f"{out}/int8", "--overwrite"],
        "tp": ["python", "benchmarks/llm_scale.py", "--tp-child", model, "--tp-ratio", str(tp_ratio)],
    }


def recipe_commands(info: dict, cache: Path, names: list[str] | None = None) -> dict[str, list[str]]:
    """{"recipe:NAME": `compress MODEL -r NAME -d text:CALIB -o OUT --overwrite`} for the shipped recipes (or `names`)."""
    from compressor.recipe import shipped_recipes

    model = info[info["model"]]["path"]
    return {f"{RECIPE}{n}": ["compress", model, "-r", n, "-d", f"text:{cache / 'calib.txt'}", "-o", f"{cache}/out/recipe-{n}",
                             "--overwrite"] for n in (names or sorted(shipped_recipes()))}


def recipe_status(res: dict) -> dict:
    """A recipe row's status: completed, refused (exit 2: a user-facing refusal, its line the reason), hang, crash."""
    status = {"ok": "completed", "hang": "hang"}.get(res["status"])
    if status is None:
        status = "refused" if res["exit_code"] == 2 else "crash"
    return {**res, "status": status}


def argv_for(cmd: list[str]) -> list[str]:
    """The user's command as this interpreter runs it (the console script is `python -m compressor.cli`)."""
    if cmd[0] == "compress":
        return [sys.executable, "-m", "compressor.cli", *cmd[1:]]
    return [sys.executable, str(ROOT / cmd[1]), *cmd[2:]]


def run_step(name: str, cmd: list[str], timeout: float) -> dict:
    """Run one step in a fresh process: status ok / failed / hang, wall seconds, the process's own peak RSS.

    The peak comes from /usr/bin/time (which forks the step from a tiny process: a child forked straight from this
    one would carry this process's RSS into its own ru_maxrss across exec) and, for a step killed as a hang, from
    the largest VmHWM read in /proc while it ran."""
    t0 = time.time()
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    log, rss_file = tmp / f"llm_scale_{name}_{os.getpid()}.log", tmp / f"llm_scale_{name}_{os.getpid()}.rss"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    timer = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] if Path("/usr/bin/time").exists() else []
    rss_file.unlink(missing_ok=True)
    hwm, status, rc = 0, "ok", None
    with open(log, "w+b") as f:
        proc = subprocess.Popen(timer + argv_for(cmd), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                hwm = max(hwm, _session_hwm(proc.pid))
            if time.time() - t0 > timeout:
                os.killpg(proc.pid, 9)
                proc.wait()
                status = "hang"
                break
        f.seek(0)
        output = f.read().decode(errors="replace")
    log.unlink(missing_ok=True)
    seconds = time.time() - t0
    peak, timed = hwm or None, rss_file.read_text() if rss_file.exists() else ""
    if status == "ok":
        figures = [ln for ln in timed.splitlines() if ln.strip().isdigit()]
        peak = int(figures[-1]) * 1024 if figures else peak
    rss_file.unlink(missing_ok=True)
    signal = re.search(r"terminated by signal (\d+)", timed)
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    res = {"step": name, "command": " ".join(cmd), "status": status, "seconds": round(seconds, 1), "peak_rss_bytes": peak,
           "exit_code": rc, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if status == "hang":
        res["reason"] = f"killed after {timeout:.0f} s"
    elif rc != 0 or signal:
        res["status"] = "failed"
        last = lines[-1][:300] if lines else f"exit code {rc}"
        res["reason"] = f"killed by signal {signal.group(1)} (9: out of memory) after: {last}" if signal else last
    found = [json.loads(ln) for ln in lines if ln.startswith('{"tp_result"')]
    if found:
        res.update(found[-1]["tp_result"])
    if res["status"] == "ok" and "-o" in cmd:
        res.update(report_phases(Path(cmd[cmd.index("-o") + 1]) / "report.json"))
    return res


def report_phases(report: Path) -> dict:
    """A streamed prune's own timings from its report.json: seconds per phase, the analysis's own phases, and
    `analysis_plus_pruning` (compressor.utils.phases.PRUNING_PHASES summed); {} for a report without them."""
    try:
        rep = json.loads(report.read_text())
    except (OSError, ValueError):
        return {}
    if "phases" not in rep:
        return {}
    result = rep["stages"][0]["result"] if rep.get("stages") else {}
    return {"phases": rep["phases"], "analysis_phases": rep.get("analysis_phases", {}),
            "analysis_plus_pruning": rep.get("analysis_plus_pruning"),
            "params_before": result.get("params_before"), "params_after": result.get("params_after"),
            "worker_peak_rss_bytes": result.get("importance_worker_peak_rss_bytes")}


OURS = ("compressor: analysis + pruning = the phases analysis (weightless trace and groups, the exporter's imports "
        "included), importance (L2 from the shards: the channel sums come from a worker process started with the "
        "analysis, so this phase mostly waits for it), selection, plan, cut (every output shard written, with "
        "O_DIRECT) and files (index, config.json, tokenizer, rename) of the streamed `compress prune`, from its "
        "report.json; not counted: process startup (python, torch, transformers imports), the verification against "
        "the zeroed source, the generate check, removing the previous output, the report. Peak RSS: the command's "
        "process plus the worker's own peak (added, although they need not coincide)")
THEIRS = ("torch-pruning: graph + step = MetaPruner's constructor (dependency graph traced on the loaded model) and "
          "pruner.step() (importance and the in-memory cut); not counted: process startup, loading the weights, "
          "saving (nothing is saved)")


def comparison(steps: list[dict], current: set[str]) -> dict | None:
    """compressor's analysis + pruning next to torch-pruning's graph + step on the same folder (the structured and
    tp steps), with both processes' peak RSS and wall time; None unless both steps finished."""
    by = {s["step"]: s for s in steps}
    ours, tp = by.get("structured"), by.get("tp")
    if not (ours and tp and ours["status"] == tp["status"] == "ok" and ours.get("analysis_plus_pruning")
            and "graph_seconds" in tp):
        return None
    a = ours["analysis_plus_pruning"]["seconds"]
    b = round(tp["graph_seconds"] + tp["step_seconds"], 2)
    return {"compressor_analysis_plus_pruning_seconds": a, "torch_pruning_graph_plus_step_seconds": b,
            "ratio": round(a / b, 3) if b else None,
            "compressor_peak_rss_bytes": ours["peak_rss_bytes"] + (ours.get("worker_peak_rss_bytes") or 0),
            "torch_pruning_peak_rss_bytes": tp["peak_rss_bytes"],
            "compressor_wall_seconds": ours["seconds"], "torch_pruning_wall_seconds": tp["seconds"],
            "compressor_params_after": ours.get("params_after"), "torch_pruning_params_after": tp.get("params_after"),
            # one invocation stamps its steps with one run id: a later run of other steps keeps the pairing
            "same_run": (ours["run"] == tp["run"]) if "run" in ours and "run" in tp else {"structured", "tp"} <= current,
            "definitions": {"compressor": OURS, "torch_pruning": THEIRS,
                            "ratio": "compressor seconds / torch-pruning seconds (below 1: compressor is faster)"}}


def _session_hwm(sid: int) -> int:
    """The largest VmHWM (peak RSS) among the running processes of session `sid` (the step and its timer)."""
    best = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) != sid:
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            continue
    return best


# ------------------------------------------------------------------------------------------- torch-pruning


def tp_child(folder: str, ratio: float) -> None:
    """torch-pruning's MetaPruner on the HF folder as its LLM example does it: GQA heads declared per projection,
    head and channel ratio `ratio`, lm_head ignored. Prints one JSON line with its own timings."""
    import torch
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    t_load = time.time() - t0
    cfg = model.config
    cfg.use_cache = False  # as torch-pruning's LLM example: no key/value cache objects in the traced outputs
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    example = torch.randint(0, min(cfg.vocab_size, 4000), (1, 32))
    before = sum(p.numel() for p in model.parameters())
    t1 = time.time()
    pruner = tp.pruner.MetaPruner(model, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
                                  pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True,
                                  prune_head_dims=False, head_pruning_ratio=ratio, global_pruning=False,
                                  output_transform=lambda out: out.logits)
    t_graph = time.time() - t1
    t2 = time.time()
    pruner.step()
    t_step = time.time() - t2
    after = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model(example)  # the pruned model still runs
    print(json.dumps({"tp_result": {"load_seconds": round(t_load, 2), "graph_seconds": round(t_graph, 2), "step_seconds": round(t_step, 2),
                                    "params_before": before, "params_after": after, "torch_pruning": tp.__version__}}))


# ------------------------------------------------------------------------------------------- results


def merge(path: Path, run: dict) -> dict:
    """Steps of this run replace those of the same name in the existing JSON (a subset rerun keeps the others)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    steps = {s["step"]: s for s in old.get("steps", [])} if old.get("layout") == run["layout"] else {}
    steps.update({s["step"]: s for s in run["steps"]})
    run["steps"] = [steps[k] for k in STEPS if k in steps] + [steps[k] for k in sorted(steps) if k.startswith(RECIPE)]
    return run


def _placeholders(text: str, result: dict) -> str:
    """A command as the docs show it: the given model folder as MODEL and the cache folder as CACHE (the paths of
    the machine that ran it mean nothing to a reader)."""
    for m in result.get("models", {}).values():
        if m.get("given") and m.get("path"):
            text = text.replace(m["path"], "MODEL")
    return text.replace(result.get("cache") or "\0", "CACHE")


def table(result: dict) -> str:
    """The markdown table of a result JSON: step, command, status, wall time, peak RSS (and x the checkpoint)."""
    ckpt = result.get("checkpoint_bytes") or 0
    rows = [f"Layout `{result['layout']}` ({ckpt / 2**30:.1f} GiB fp32 checkpoint), {result['environment']['machine']}; "
            f"`{_placeholders(result['command'], result)}`.", "",
            "| step | command | status | wall s | peak RSS GiB | × checkpoint | measured |", "|---|---|---|---|---|---|---|"]
    for s in result["steps"]:
        rss = s.get("peak_rss_bytes")
        status = s["status"] if s["status"] in ("ok", "completed") else f"{s['status']}: {s.get('reason', '')}"
        status = status.replace("|", "\\|")[:160]
        if s["step"] == "tp" and s["status"] == "ok":
            status += f" (graph {s['graph_seconds']} s + step {s['step_seconds']} s)"
        if s.get("analysis_plus_pruning") and s["status"] == "ok":
            ph = s["phases"]
            status += (f" (analysis {ph.get('analysis')} s + importance {ph.get('importance')} s + cut "
                       f"{ph.get('cut')} s = {s['analysis_plus_pruning']['seconds']} s; verify {ph.get('verify')} s, "
                       f"generate {ph.get('generate')} s)")
        cmd = _placeholders(s["command"], result)
        when = s.get("measured", "earlier run")  # steps are merged into the JSON run by run
        rows.append(f"| {s['step']} | `{cmd}` | {status} | {s['seconds']} | "
                    f"{rss / 2**30:.2f} | {rss / ckpt:.2f} | {when} |" if rss and ckpt
                    else f"| {s['step']} | `{cmd}` | {status} | {s['seconds']} | - | - | {when} |")
    c = result.get("comparison")
    if c:
        gb = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"  # noqa: E731
        rows += ["", f"Side by side{' (same run)' if c['same_run'] else ' (steps from different runs)'}: compressor's "
                 f"analysis + pruning **{c['compressor_analysis_plus_pruning_seconds']} s** vs torch-pruning's graph + "
                 f"step **{c['torch_pruning_graph_plus_step_seconds']} s** (ratio {c['ratio']}); peak RSS "
                 f"{gb(c['compressor_peak_rss_bytes'])} vs {gb(c['torch_pruning_peak_rss_bytes'])}; whole command "
                 f"{c['compressor_wall_seconds']} s (verified, saved) vs {c['torch_pruning_wall_seconds']} s (nothing "
                 f"saved); parameters after {c['compressor_params_after']} vs {c['torch_pruning_params_after']}. "
                 f"{c['definitions']['compressor']}. {c['definitions']['torch_pruning']}."]
    return "\n".join(rows)


LABELS = {"analyze": "`compress analyze` of the folder", "analyze_config": "of the 8B config.json",
          "structured": "`compress prune` FFN 25 % (streamed, verified, saved)",
          "tp": "torch-pruning MetaPruner on the same folder (load, graph, step; nothing saved)"}


def summary(result: dict) -> str:
    """The README's lines: the steps that finished, as `step: wall s / peak RSS GiB`, next to torch-pruning's."""
    done = [s for s in result["steps"] if s["status"] in ("ok", "completed") and s.get("peak_rss_bytes")]
    label = lambda step: LABELS.get(step, f"recipe {step[len(RECIPE):]} (completed)" if step.startswith(RECIPE) else step)  # noqa: E731
    parts = [f"{label(s['step'])} {s['seconds']} s / {s['peak_rss_bytes'] / 2**30:.2f} GiB" for s in done]
    refused = sum(s["status"] == "refused" for s in result["steps"])
    if refused:
        parts.append(f"{refused} other shipped recipes refused up front in one line")
    ckpt = (result.get("checkpoint_bytes") or 0) / 2**30
    c = result.get("comparison")
    side = (f" Analysis + pruning {c['compressor_analysis_plus_pruning_seconds']} s vs torch-pruning's graph + step "
            f"{c['torch_pruning_graph_plus_step_seconds']} s ({'same run' if c['same_run'] else 'different runs'}, "
            f"ratio {c['ratio']}).") if c else ""
    return (f"LLM scale, `{result['layout']}` layout ({ckpt:.1f} GiB fp32; `benchmarks/llm_scale.py`, wall time / "
            f"peak RSS): " + "; ".join(parts) + "." + side + " Every step, failures included: "
            "[benchmarks.md](docs/benchmarks.md#llm-scale-benchmarksllm_scalepy).")


def _replace_block(doc: Path, begin: str, end: str, body: str, heading: str | None) -> None:
    text = doc.read_text(encoding="utf-8")
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif heading is not None:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + block + "\n"
    else:
        return
    doc.write_text(text, encoding="utf-8")


def write_table(result: dict, doc: Path = DOC, readme: Path | None = None) -> None:
    """The docs table, and the README's summary line where README.md has its markers."""
    _replace_block(doc, BEGIN, END, table(result), "## LLM scale (`benchmarks/llm_scale.py`)")
    if readme is not None and readme.exists():
        _replace_block(readme, README_BEGIN, README_END, summary(result), None)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, help="folder for the generated models and outputs (several GB)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    ap.add_argument("--quick", action="store_true", help="tiny Llama layouts: a smoke test of the harness")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per step before it counts as a hang")
    ap.add_argument("--tp-ratio", type=float, default=0.25, help="torch-pruning's channel and head ratio")
    ap.add_argument("--tp-timeout", type=float, default=600, help="seconds before torch-pruning's step counts as a hang")
    ap.add_argument("--model", type=Path, help="use this existing HF folder of the layout instead of building one in --cache")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON (default {RESULTS.relative_to(ROOT)}; --quick: CACHE/llm_scale.json)")
    ap.add_argument("--table", action="store_true", help="only rewrite the docs/benchmarks.md table from the JSON")
    ap.add_argument("--recipes", help="step recipes: a comma list of shipped recipe names (default: every one)")
    ap.add_argument("--tp-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tp_child:
        tp_child(args.tp_child, args.tp_ratio)
        return None
    if args.table:
        write_table(json.loads((args.out or RESULTS).read_text()), DOC, README)
        return None
    if args.cache is None:
        ap.error("--cache is required (the models are built there)")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        ap.error(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
    cache = args.cache.resolve()
    info = ensure_models(cache, args.quick, args.model)
    commands = step_commands(info, cache, args.quick, args.tp_ratio)
    if "recipes" in steps:
        names = [n.strip() for n in args.recipes.split(",") if n.strip()] if args.recipes else None
        recipes = recipe_commands(info, cache, names)
        commands.update(recipes)
        i = steps.index("recipes")
        steps[i : i + 1] = list(recipes)
    results, run_id = [], time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())  # which steps were measured together
    for name in steps:
        print(f"[llm_scale] {name}: {' '.join(commands[name])}", flush=True)
        res = run_step(name, commands[name], args.tp_timeout if name == "tp" else args.timeout)
        if name.startswith(RECIPE):
            res = recipe_status(res)
        print(f"[llm_scale]   {res['status']} {res['seconds']} s, peak RSS {(res['peak_rss_bytes'] or 0) / 2**30:.2f} GiB"
              + (f" — {res['reason']}" if "reason" in res else ""), flush=True)
        results.append({**res, "run": run_id})
    import torch

    run = {"command": "python benchmarks/llm_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "layout": info["model"], "config_layout": info["config"], "cache": str(cache),
           "checkpoint_bytes": info[info["model"]].get("bytes"), "models": {k: info[k] for k in (info["model"], info["config"])},
           "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                           "machine": f"{os.cpu_count()} CPUs, {_ram_gib():.0f} GiB RAM"},
           "steps": results}
    out = args.out or (cache / "llm_scale.json" if args.quick else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    run = merge(out, run)
    run["comparison"] = comparison(run["steps"], {r["step"] for r in results})
    out.write_text(json.dumps(run, indent=2))
    print(table(run))
    return run


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


if __name__ == "__main__":
    main()
