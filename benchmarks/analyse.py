"""ONNX dependency-graph analysis speed: our analyser (compressor.graph.analyze) vs torch-pruning's
DependencyGraph on the same models, in the same run, plus how analysis time grows with transformer depth.

    python benchmarks/analyse.py                 # whole zoo + BERT/GPT-2 with 4, 8, 16, 32 blocks
    python benchmarks/analyse.py --quick         # hand-written zoo + bert/gpt2, depths 4 and 8
    python benchmarks/analyse.py --blocks 4 8 16 32 64 --repeats 5
    python benchmarks/analyse.py --real-only     # just the deployment-size models (below)

Per zoo model: export time (compressor.export, verified), our analyze() time on the ONNX file, tp's
build_dependency time and get_all_groups time on the torch model (median of --repeats each), ratio tp/ours.
Real size: the same comparison on models at the size they are deployed: the real pretrained MiniLM-L6
(all-MiniLM-L6-v2, 22.7 M parameters, sequence 128) and a ResNet-18 layout (11.7 M parameters, 224x224,
random weights; torchvision's BasicBlock stages 64-128-256-512). tp's build runs the model forward once, so
at these sizes its cost includes real compute, as it does for a user.
Scaling: analysis time per block for each depth and a linear-growth check (marginal time per block at the
deepest pair vs the shallowest pair, and R² of a straight-line fit). Every step runs under a time limit
(--timeout) and its failure is recorded instead of stopping the run. Writes benchmarks/results/analyse.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import graphs  # noqa: E402
from graphs import hf as zoo_hf  # noqa: E402
from graphs.tp_oracle import _deadline, build_dg, tp_groups  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "analyse.json"


def _timed(fn, repeats: int, timeout: float) -> dict:
    """Median wall time of `fn()` over `repeats` runs, each under `timeout` s; errors are recorded."""
    times, result = [], None
    try:
        for k in range(repeats + 1):  # run 0 warms caches and lazy imports: not timed, for either tool
            t = time.perf_counter()
            with _deadline(timeout), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                result = fn()
            if k:
                times.append(time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - a benchmark records failures (timeouts included) and goes on
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}", "runs": len(times)}
    return {"ok": True, "s": statistics.median(times), "min_s": min(times), "runs": len(times), "result": result}


def _analyze():
    try:
        from compressor.graph import analyze
    except Exception:  # noqa: BLE001 - the analyser may not import yet; report it
        traceback.print_exc()
        return None
    return analyze


def bench_model(name: str, model, inputs, onnx_path: Path, analyze, repeats: int, timeout: float,
                ignored=(), with_tp: bool = True) -> dict:
    row: dict = {"name": name, "params": sum(p.numel() for p in model.parameters())}
    if analyze is not None:
        r = _timed(lambda: analyze(onnx_path), repeats, timeout)
        a = r.pop("result", None)
        row["ours"] = r
        if a is not None:
            row["ours"]["groups"] = len(a.groups)
            row["ours"]["prunable_groups"] = sum(1 for g in a.groups if g.prunable)
    if with_tp:
        rb = _timed(lambda: build_dg(model, inputs), repeats, timeout)
        dg = rb.pop("result", None)
        row["tp_build"] = rb
        if dg is not None:
            rg = _timed(lambda: tp_groups(model, inputs, ignored, dg=dg), 1, timeout)
            groups = rg.pop("result", None)
            row["tp_groups"] = rg | ({"groups": len(groups)} if groups is not None else {})
        if row.get("ours", {}).get("ok") and rb.get("ok"):
            row["ratio_tp_build_over_ours"] = rb["s"] / row["ours"]["s"]
            if row.get("tp_groups", {}).get("ok"):
                row["ratio_tp_total_over_ours"] = (rb["s"] + row["tp_groups"]["s"]) / row["ours"]["s"]
    return row


def phases(onnx_path: Path, repeats: int) -> dict:
    """Best-of-`repeats` time of each phase of analyze(): load, GraphIR, the per-op walk, grouping, validation."""
    from compressor.graph import analysis
    from compressor.graph.ir import GraphIR, load_model
    from compressor.graph.prune import validate_groups

    best: dict[str, float] = {}
    walk = [0.0]
    real_walk = analysis.run_rules

    def timed_walk(ir):  # build() calls the walk first: its own time, so grouping = build - walk, same run
        t0 = time.perf_counter()
        try:
            return real_walk(ir)
        finally:
            walk[0] = time.perf_counter() - t0

    analysis.run_rules = timed_walk
    try:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            m = load_model(onnx_path)
            t1 = time.perf_counter()
            ir = GraphIR(m)
            t2 = time.perf_counter()
            a = analysis.build(ir)
            t3 = time.perf_counter()
            validate_groups(a)
            t4 = time.perf_counter()
            for k, v in (("load", t1 - t0), ("graph_ir", t2 - t1), ("walk", walk[0]), ("grouping", t3 - t2 - walk[0]),
                         ("validation", t4 - t3)):
                best[k] = min(best.get(k, float("inf")), v)
    finally:
        analysis.run_rules = real_walk
    return {k: v * 1e3 for k, v in best.items()}


def _export(model, inputs, input_names, path: Path) -> dict:
    from compressor.export import export_onnx

    t = time.perf_counter()
    export_onnx(model, inputs, path, input_names=list(input_names), output_names=["logits"])
    return {"export_s": time.perf_counter() - t, "onnx_nodes": _node_count(path)}


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path)).graph.node)


def zoo_section(names: list[str], tmp: Path, analyze, repeats: int, timeout: float) -> list[dict]:
    rows = []
    for name in names:
        entry = graphs.ZOO[name]
        try:
            model, inputs = entry.build()
            path = tmp / f"{name}.onnx"
            info = _export(model, inputs, entry.input_names, path)
        except Exception as e:  # noqa: BLE001
            rows.append({"name": name, "error": f"build/export: {type(e).__name__}: {str(e)[:200]}"})
            print(f"{name:12s} build/export failed: {e}")
            continue
        row = bench_model(name, model, inputs, path, analyze, repeats, timeout, entry.ignored) | info
        if analyze is not None:
            row["ours_phases_ms"] = phases(path, max(repeats, 10))
        rows.append(row)
        ours = f"{row['ours']['s'] * 1e3:8.1f} ms" if row.get("ours", {}).get("ok") else f"{'failed':>11s}"
        tpb = f"{row['tp_build']['s'] * 1e3:8.1f} ms" if row["tp_build"].get("ok") else f"{'failed':>11s}"
        tpg = (f"{row['tp_groups']['s'] * 1e3:8.1f} ms" if row.get("tp_groups", {}).get("ok")
               else f"{'timeout' if 'Timeout' in str(row.get('tp_groups', {})) else 'failed':>11s}")
        ratio = row.get("ratio_tp_build_over_ours")
        print(f"{name:12s} nodes {info['onnx_nodes']:5d}  ours {ours}  tp build {tpb}  tp groups {tpg}  "
              f"tp build / ours {ratio:6.2f}x" if ratio else f"{name:12s} ours {ours}  tp build {tpb}  tp groups {tpg}")
    for row in rows:
        ph = row.get("ours_phases_ms")
        if ph:
            print(f"{row['name']:12s} phases (best of 10, ms): " + "  ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    return rows


def scaling_section(families: list[str], blocks: list[int], tmp: Path, analyze, repeats: int, timeout: float,
                    with_tp: bool) -> dict:
    out = {}
    for fam in families:
        rows = []
        for L in blocks:
            try:
                model, inputs = zoo_hf.BUILDERS[fam]("eager", layers=L)
                path = tmp / f"{fam}_{L}.onnx"
                info = _export(model, inputs, zoo_hf.TEXT, path)
            except Exception as e:  # noqa: BLE001
                rows.append({"blocks": L, "error": f"build/export: {type(e).__name__}: {str(e)[:200]}"})
                continue
            ignored = ("classifier",) if fam == "bert" else ("lm_head",)
            row = bench_model(f"{fam}-{L}", model, inputs, path, analyze, repeats, timeout, ignored, with_tp)
            row |= info | {"blocks": L}
            if row.get("ours", {}).get("ok"):
                row["ours_ms_per_block"] = row["ours"]["s"] * 1e3 / L
            rows.append(row)
            per = row.get("ours_ms_per_block")
            tpb = row.get("tp_build", {})
            print(f"{fam:5s} {L:3d} blocks  nodes {info['onnx_nodes']:6d}  ours "
                  + (f"{row['ours']['s'] * 1e3:8.1f} ms ({per:.2f} ms/block)" if per else "failed")
                  + (f"  tp build {tpb['s'] * 1e3:8.1f} ms" if tpb.get("ok") else ""))
        out[fam] = {"rows": rows, "linearity": _linearity(rows)}
        lin = out[fam]["linearity"]
        if lin:
            print(f"{fam:5s} linear-growth check: marginal ms/block {lin['marginal_ms_per_block_first']:.2f} → "
                  f"{lin['marginal_ms_per_block_last']:.2f} (ratio {lin['marginal_ratio']:.2f}), R² {lin['r2']:.4f}, "
                  f"linear: {lin['linear']}")
    return out


class ResNet18(torch.nn.Module):
    """torchvision's resnet18 layout (stem 7x7/2 + max-pool, stages of two BasicBlocks at 64/128/256/512)."""

    def __init__(self, num_classes: int = 1000):
        from graphs.resnet import BasicBlock

        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def real_section(tmp: Path, analyze, repeats: int, timeout: float) -> list[dict]:
    builders = {"resnet18": lambda: (ResNet18().eval(), (torch.randn(1, 3, 224, 224),), ("input",), ("fc",))}
    try:
        from compressor.export import TensorOutputs
        from compressor.hf import load_minilm

        def minilm():
            model, _ = load_minilm()
            ids = torch.randint(1000, 20000, (1, 128))
            names = ("input_ids", "attention_mask")
            return TensorOutputs(model, list(names)).eval(), (ids, torch.ones_like(ids)), names, ()

        builders["minilm_l6_real"] = minilm
    except ImportError:
        pass
    rows = []
    for name, make in builders.items():
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                model, inputs, input_names, ignored = make()
            path = tmp / f"{name}.onnx"
            info = _export(model, inputs, input_names, path) | {"onnx_mb": path.stat().st_size / 2**20}
        except Exception as e:  # noqa: BLE001
            rows.append({"name": name, "error": f"build/export: {type(e).__name__}: {str(e)[:200]}"})
            print(f"{name:14s} build/export failed: {e}")
            continue
        row = bench_model(name, model, inputs, path, analyze, repeats, timeout, ignored) | info
        rows.append(row)
        ours, tpb = row.get("ours", {}), row.get("tp_build", {})
        print(f"{name:14s} {info['onnx_mb']:6.1f} MB  nodes {info['onnx_nodes']:5d}  "
              + (f"ours {ours['s'] * 1e3:8.1f} ms" if ours.get("ok") else "ours failed")
              + (f"  tp build {tpb['s'] * 1e3:8.1f} ms" if tpb.get("ok") else "  tp failed")
              + (f"  tp build / ours {row['ratio_tp_build_over_ours']:6.2f}x" if "ratio_tp_build_over_ours" in row else ""))
    return rows


def _linearity(rows: list[dict]) -> dict | None:
    pts = [(r["blocks"], r["ours"]["s"]) for r in rows if r.get("ours", {}).get("ok")]
    if len(pts) < 3:
        return None
    xs, ys = zip(*pts, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    icpt = my - slope * mx
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in pts)
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-12
    first = (ys[1] - ys[0]) / (xs[1] - xs[0])
    last = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    ratio = last / first if first > 0 else float("inf")
    # linear: the cost of one more block at the deepest size is at most 2x its cost at the shallowest size
    return {"slope_ms_per_block": slope * 1e3, "intercept_ms": icpt * 1e3, "r2": 1 - ss_res / ss_tot,
            "marginal_ms_per_block_first": first * 1e3, "marginal_ms_per_block_last": last * 1e3,
            "marginal_ratio": ratio, "linear": bool(ratio <= 2.0)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="hand-written zoo + bert/gpt2, depths 4 and 8")
    ap.add_argument("--models", nargs="*", default=None, help="zoo entries (default: all)")
    ap.add_argument("--blocks", nargs="*", type=int, default=[4, 8, 16, 32])
    ap.add_argument("--families", nargs="*", default=["bert", "gpt2"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per timed step (tp on LLaMA never ends)")
    ap.add_argument("--no-tp-scaling", action="store_true", help="skip tp in the depth sweep")
    ap.add_argument("--real-only", action="store_true", help="only the deployment-size models")
    ap.add_argument("--no-real", action="store_true", help="skip the deployment-size models")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.real_only and args.out == RESULTS:  # a partial run never overwrites the full record
        args.out = RESULTS.with_name("analyse_real.json")
    torch.set_num_threads(1)
    names = args.models or (graphs.names(exclude=("hf",)) + ["bert", "gpt2"] if args.quick else list(graphs.ZOO))
    blocks = [4, 8] if args.quick and args.blocks == [4, 8, 16, 32] else args.blocks
    analyze = _analyze()
    import torch_pruning

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        zoo = [] if args.real_only else zoo_section(names, tmp, analyze, args.repeats, args.timeout)
        real = [] if args.no_real else real_section(tmp, analyze, args.repeats, args.timeout)
        scaling = {} if args.real_only else scaling_section(args.families, blocks, tmp, analyze, args.repeats,
                                                            args.timeout, with_tp=not args.no_tp_scaling)
    ratios = [r["ratio_tp_build_over_ours"] for r in zoo if "ratio_tp_build_over_ours" in r]
    result = {
        "command": "python benchmarks/analyse.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "torch_pruning": torch_pruning.__version__, "threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine()},
        "analyser_available": analyze is not None,
        "zoo": zoo,
        "summary": {"models": len(zoo), "median_ratio_tp_build_over_ours": statistics.median(ratios) if ratios else None,
                    "tp_failures": [r["name"] for r in zoo if not r.get("tp_groups", {}).get("ok", False)],
                    "ours_failures": [r["name"] for r in zoo if not r.get("ours", {}).get("ok", False)]},
        "real_size": real,
        "scaling": scaling,
        "wall_s": time.perf_counter() - t0,
    }
    from compressor.utils.atomic import write_text_atomic

    write_text_atomic(args.out, json.dumps(result, indent=1, default=str))
    print(f"median tp build / ours: {result['summary']['median_ratio_tp_build_over_ours']}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
