"""Structured pruning speed-up: onnxruntime CPU latency next to the MAC reduction, dense vs pruned, in one run.

Models (random weights; latency does not depend on values): a VGG-style CNN (8 conv-BN-ReLU layers,
64→256 channels, 32×32 input, batch 8) and a BERT encoder from a transformers config (hidden 256, 4 layers,
8 heads, FFN 1024, sequence 128, batch 4). Each is exported with compressor.export, analysed, and pruned at
25 % and 50 % of the channels of every prunable group (local, group L2; the transformer keeps its embedding
width and prunes FFN channels and within-head dims). Latency: median of interleaved dense/pruned rounds on
one CPU thread (the machine is shared, interleaving keeps the comparison fair).

    .venv/bin/python benchmarks/prune_speed.py          # -> benchmarks/results/prune_speed.json
Goal: at 50 % on the CNN, latency speed-up ≥ 0.8 × MAC reduction factor (dense MACs / pruned MACs).

GPU mode (issue 13): ResNet-50 (torchvision's when importable, else benchmarks/resnet50.py), 50 % of the
channels, dense vs ours with device-aware widths (round_to auto = 8 in bf16) vs ours with round_to 1 vs
torch-pruning's MagnitudePruner, all in bf16 + channels_last, timed with CUDA graphs (interleaved medians) at
batch 64 and 256. MACs counted by torch-pruning's own counter (independent of compressor.graph.macs).

    python benchmarks/prune_speed.py --device cuda      # -> benchmarks/results/prune_speed_cuda.json
Goal (issue 13): latency gain ≥ 0.7 × MAC reduction at batch 256 with the device-aware widths.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compressor.export import export_onnx
from compressor.graph import analyze, prune_onnx, select
from compressor.graph.macs import count_macs

RESULTS = Path(__file__).resolve().parent / "results"


class VGG(nn.Module):
    def __init__(self, widths=(64, 64, 128, 128, 256, 256, 256, 256), num_classes=10):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if i in (1, 3, 5):
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def build_cnn():
    torch.manual_seed(0)
    m = VGG().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
    return m, (torch.randn(8, 3, 32, 32),), 1


def build_bert():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                  intermediate_size=1024, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    m = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))  # distinct values: the exporter merges identical initializers
    ids = torch.randint(0, 1000, (4, 128))
    return m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 128


def session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def interleaved_latency(models: list, feeds: dict, rounds: int, runs: int) -> list[float]:
    sessions = [session(m) for m in models]
    per = [[] for _ in models]
    for s in sessions:
        for _ in range(3):
            s.run(None, feeds)
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            ts = []
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feeds)
                ts.append(time.perf_counter() - t)
            per[i].append(statistics.median(ts))
    return [statistics.median(p) * 1e3 for p in per]


def bench(name: str, builder, ratios: list[float], rounds: int, runs: int) -> dict:
    model, example, dyn = builder()  # dyn: size used for dynamic dims when counting MACs (the sequence length;
    # batch scales every op alike, so the ratio is right per sample)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        export_onnx(model, example, path)
        dense = onnx.load(str(path))
    t0 = time.perf_counter()
    a = analyze(dense)
    t_analyse = time.perf_counter() - t0
    feeds = {k: v.numpy() for k, v in (example.items() if isinstance(example, dict) else
                                       zip([i.name for i in dense.graph.input], example, strict=False))}
    pruned, rows = [], []
    for r in ratios:
        t0 = time.perf_counter()
        sel = select(a, "l2", r, protect_output=False, heads=False)
        p = prune_onnx(dense, a, sel)
        t_prune = time.perf_counter() - t0
        pruned.append(p)
        rows.append({"ratio": r, "removed_channels": len(sel.atoms), "prune_s": round(t_prune, 3),
                     "macs_dense": count_macs(a, dynamic=dyn), "macs_pruned": count_macs(a, sel.atoms, dynamic=dyn),
                     "params_dense": sum(int(np.prod(i.dims)) for i in dense.graph.initializer),
                     "params_pruned": sum(int(np.prod(i.dims)) for i in p.graph.initializer)})
    lat = interleaved_latency([dense, *pruned], feeds, rounds, runs)
    for row, ms in zip(rows, lat[1:], strict=True):
        row["latency_dense_ms"] = round(lat[0], 3)
        row["latency_pruned_ms"] = round(ms, 3)
        row["mac_reduction_factor"] = round(row["macs_dense"] / row["macs_pruned"], 3)
        row["latency_speedup"] = round(lat[0] / ms, 3)
        row["speedup_over_mac_factor"] = round(row["latency_speedup"] / row["mac_reduction_factor"], 3)
    return {"model": name, "analyse_s": round(t_analyse, 3), "groups": len(a.groups),
            "prunable_groups": len(a.prunable_groups), "results": rows}


def _tp_pruned(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """torch-pruning's own 50 %-channel cut (group L2 magnitude, the classifier kept), as its README does it."""
    import copy

    import torch_pruning as tp

    m = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=[m.fc])
    pruner.step()
    return m


def _ours(model: nn.Module, example: torch.Tensor, ratio: float, device, round_to) -> tuple[nn.Module, dict]:
    import copy

    from compressor.methods.structured import StructuredParams, structured_torch

    m = copy.deepcopy(model)
    rep = structured_torch(m, (example,), StructuredParams(ratio=ratio, round_to=round_to), device=device)
    return m, rep


def bench_torch(device: str, ratio: float, batches: list[int], size: int, repeats: int) -> dict:
    """Dense vs ours (device-aware widths, and round_to 1) vs torch-pruning on `device`, bf16 on CUDA."""
    import sys

    import torch_pruning as tp

    from compressor.device import label, resolve
    from compressor.kernels.calibrate import time_interleaved
    from compressor.kernels.timing import runner

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from resnet50 import resnet50

    dev = resolve(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else None
    torch.manual_seed(0)
    dense, source = resnet50()
    dense.eval()
    example = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    ours, rep_ours = _ours(dense, example, ratio, dev, "auto")
    t_ours = time.perf_counter() - t0
    ours1, rep_ours1 = _ours(dense, example, ratio, dev, 1)
    t0 = time.perf_counter()
    tpm = _tp_pruned(dense, example, ratio)
    t_tp = time.perf_counter() - t0
    models = {"dense": dense, "ours": ours, "ours_round1": ours1, "torch_pruning": tpm}
    macs = {k: int(tp.utils.count_ops_and_params(m, example)[0]) for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    rows = []
    for b in batches:
        x = torch.randn(b, 3, size, size)
        run = {k: runner(m, (x,), dev, dtype=dtype, channels_last=True, cuda_graph=True) for k, m in models.items()}
        ms = time_interleaved(run, dev, repeats=repeats, warmup=3)
        for k in models:
            if k == "dense":
                continue
            mac_red = macs["dense"] / macs[k]
            gain = ms["dense"] / ms[k]
            rows.append({"batch": b, "model": k, "dense_ms": round(ms["dense"], 4), "pruned_ms": round(ms[k], 4),
                         "mac_reduction": round(mac_red, 3), "latency_gain": round(gain, 3),
                         "gain_over_mac_reduction": round(gain / mac_red, 3)})
        del run
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"model": "resnet50", "source": source, "device": label(dev), "dtype": str(dtype or torch.float32),
            "channels_last": True, "timing": "cuda graphs, interleaved medians" if dev.type == "cuda" else "eager",
            "input": [3, size, size], "ratio": ratio, "round_to_ours": rep_ours["round_to"], "macs": macs, "params": params,
            "prune_s": {"ours": round(t_ours, 2), "torch_pruning": round(t_tp, 2)},
            "mac_reduction_ours_report": rep_ours["mac_reduction"], "mac_reduction_ours_round1_report": rep_ours1["mac_reduction"],
            "results": rows,
            "goal": "ours at batch 256: gain_over_mac_reduction >= 0.7"}


def main_torch(args) -> None:
    out = {"benchmark": "prune_speed", "host": platform.node(), "torch": torch.__version__,
           "command": f"benchmarks/prune_speed.py --device {args.device} --batches {args.batches} --size {args.size}",
           "models": [bench_torch(args.device, float(args.ratios.split(",")[-1]), [int(b) for b in args.batches.split(",")],
                                  args.size, args.repeats)]}
    path = args.out if args.out != RESULTS / "prune_speed.json" else RESULTS / f"prune_speed_{args.device.split(':')[0]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"{'model':14} {'batch':>5} {'MACs ×':>7} {'latency ×':>9} {'lat/MAC':>7} {'dense ms':>9} {'pruned ms':>9}")
    for r in out["models"][0]["results"]:
        print(f"{r['model']:14} {r['batch']:5d} {r['mac_reduction']:7.2f} {r['latency_gain']:9.2f} "
              f"{r['gain_over_mac_reduction']:7.2f} {r['dense_ms']:9.3f} {r['pruned_ms']:9.3f}")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--models", default="cnn,bert")
    ap.add_argument("--out", type=Path, default=RESULTS / "prune_speed.json")
    ap.add_argument("--device", default="cpu", help="cpu: onnxruntime benchmark above; cuda / cuda:N: ResNet-50 on the GPU")
    ap.add_argument("--batches", default="64,256", help="GPU mode: batch sizes")
    ap.add_argument("--size", type=int, default=224, help="GPU mode: input resolution")
    ap.add_argument("--repeats", type=int, default=30, help="GPU mode: interleaved timing rounds")
    args = ap.parse_args()
    if args.device != "cpu":
        main_torch(args)
        return
    torch.set_num_threads(1)
    ratios = [float(r) for r in args.ratios.split(",")]
    builders = {"cnn": build_cnn, "bert": build_bert}
    out = {"benchmark": "prune_speed", "host": platform.node(), "cpu_threads": 1,
           "command": "benchmarks/prune_speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                              if k != "out"),
           "models": [bench(m, builders[m], ratios, args.rounds, args.runs) for m in args.models.split(",")]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    print(f"{'model':6} {'ratio':>5} {'MACs ×':>7} {'latency ×':>9} {'lat/MAC':>7} {'dense ms':>9} {'pruned ms':>9}")
    for m in out["models"]:
        for r in m["results"]:
            print(f"{m['model']:6} {r['ratio']:5.2f} {r['mac_reduction_factor']:7.2f} {r['latency_speedup']:9.2f} "
                  f"{r['speedup_over_mac_factor']:7.2f} {r['latency_dense_ms']:9.2f} {r['latency_pruned_ms']:9.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
