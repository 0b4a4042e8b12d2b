"""Lottery tickets on digits (docs/lottery.md): IMP with weight rewinding vs learning-rate rewinding vs the random
re-initialisation control (same mask, fresh init), per pruning round, averaged over seeds.

DigitsCNN (94k parameters; all conv/linear weights prunable, 94.2k of them), scikit-learn digits (1,347 train /
450 test images). Every level trains T = `--epochs` epochs (SGD momentum 0.9, lr 0.05, ×0.1 at 50 % and 75 %,
wd 1e-4, batch 64); rewind point k = `--rewind-epochs` epochs; each round prunes `--fraction` of the remaining
weights globally (exact_k). Level 0 of the weight-rewinding run is the dense network.

    .venv/bin/python benchmarks/lottery.py            # -> benchmarks/results/lottery.json (741 s on a loaded 2-core machine)
    .venv/bin/python benchmarks/lottery.py --seeds 1 --levels 3 --epochs 8   # quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from compressor.io.data import load_data
from compressor.methods.lottery import imp_rewind
from compressor.models import digits_cnn

RESULTS = Path(__file__).resolve().parent / "results"


def ms(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "runs": xs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--levels", type=int, default=6)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--epochs", type=float, default=15)
    ap.add_argument("--rewind-epochs", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "lottery.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data("digits")
    common = dict(levels=args.levels, fraction=args.fraction, rewind_epochs=args.rewind_epochs, epochs=args.epochs,
                  lr=0.05, momentum=0.9, weight_decay=1e-4, schedule="step", progress=False, device="cpu")
    t0 = time.perf_counter()
    per_seed = []
    for seed in range(args.seeds):
        ts = time.perf_counter()
        w = imp_rewind(digits_cnn(), data, variant="weight", random_reinit_control=True, seed=seed, **common)
        lr = imp_rewind(digits_cnn(), data, variant="lr", seed=seed, **common)
        per_seed.append({"seed": seed, "weight_rewinding": w["levels"], "lr_rewinding": lr["levels"],
                         "rewind_step": w["rewind_step"], "total_steps": w["total_steps"], "seconds": time.perf_counter() - ts})
        print(f"seed {seed}: {time.perf_counter() - ts:.0f} s", file=sys.stderr)

    dense = ms([s["weight_rewinding"][0]["accuracy"] for s in per_seed])
    rows = []
    for lvl in range(args.levels + 1):
        row = {
            "level": lvl,
            "sparsity_masked": per_seed[0]["weight_rewinding"][lvl]["sparsity_masked"],
            "sparsity_all_params": per_seed[0]["weight_rewinding"][lvl]["sparsity_all_params"],
            "weight_rewind_acc": ms([s["weight_rewinding"][lvl]["accuracy"] for s in per_seed]),
            "lr_rewind_acc": ms([s["lr_rewinding"][lvl]["accuracy"] for s in per_seed]),
        }
        if lvl > 0:
            row["random_reinit_acc"] = ms([s["weight_rewinding"][lvl]["random_reinit_accuracy"] for s in per_seed])
        # LMC "matching": accuracy ≥ mean dense − one std of dense (Frankle et al. 2020); plus the 0.5-pt criterion
        row["weight_rewind_matching"] = row["weight_rewind_acc"]["mean"] >= dense["mean"] - dense["std"]
        row["weight_rewind_within_0.5pt"] = row["weight_rewind_acc"]["mean"] >= dense["mean"] - 0.005
        rows.append(row)

    def f(d):
        return f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}" if d else "—"

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"IMP on digits, DigitsCNN, {args.seeds} seeds (test n=450; mean ± std, %)")
    for col in ("level", "sparsity", "weight rewind", "LR rewind", "random re-init", "dense"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["level"]), f"{100 * r['sparsity_masked']:.1f} %", f(r["weight_rewind_acc"]), f(r["lr_rewind_acc"]),
                      f(r.get("random_reinit_acc")), f(dense))
    Console().print(table)

    out = {
        "benchmark": "lottery",
        "command": "python benchmarks/lottery.py " + " ".join(sys.argv[1:]),
        "config": {**{k: v for k, v in common.items() if k not in ("progress",)}, "seeds": args.seeds, "model": "digits_cnn()",
                   "data": "digits (1347 train / 450 test)", "prunable": "all Conv2d/Linear weights, global exact_k",
                   "threads": args.threads},
        "dense_acc": dense,
        "levels": rows,
        "per_seed": per_seed,
        "seconds_total": time.perf_counter() - t0,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "processor": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} in {out['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
