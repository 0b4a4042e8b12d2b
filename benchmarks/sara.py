"""SaRA vs LoRA vs full fine-tuning (and a random-sparse control), side by side in one run (SaRA: docs/sara.md).

Task (b), digits: a DigitsCNN pre-trained on classes 0–4 of scikit-learn digits is adapted to classes 5–9.
  task      = accuracy on the held-out 5–9 test images (5-way: logits 5–9)
  retention = accuracy on the held-out 0–4 test images (5-way: logits 0–4), i.e. what the adaptation kept
              of the pre-trained network (task-incremental protocol; adaptation only sees 5–9 labels)
Task (a), MiniLM (--task minilm): the real all-MiniLM-L6-v2 plus a new 2-way head (trained densely by every
  method) learns "real sentence vs the same words shuffled" on the shipped corpus (even lines train, odd lines
  test); retention = mean cosine of the adapted encoder's sentence embeddings to the original's on held-out
  sentences (×100).

Methods at a comparable trainable budget: `sara` (smallest-|w| fraction = LoRA's trainable fraction, nuclear
norm on 2-D weights, re-selection half-way), `sparse-random` (same count, random positions: does "smallest
magnitude" matter?), `lora` (peft LoRA on every conv/linear), `full` (AdamW on everything). LR per method
from a small grid, chosen on a validation split (seed 0) by task accuracy; then ≥ 3 seeds.

Each run is a fresh subprocess so its peak RSS is its own: memory = VmHWM − RSS just before the adapter /
optimizer is built (Linux; CPU), or torch.cuda.max_memory_allocated on CUDA. Also the exact bytes of
gradients + optimizer state at the end of training (what SaRA shrinks).

    .venv/bin/python benchmarks/sara.py                       # digits, 3 seeds (~5 min on one core)
    .venv/bin/python benchmarks/sara.py --task minilm --seeds 1 --steps 120
    .venv/bin/python benchmarks/sara.py --quick               # smoke run

Writes benchmarks/results/sara.json (one key per task).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("sara", "sparse-random", "lora", "full")
LR_GRID = {
    "digits": {"full": [1e-4, 3e-4, 1e-3, 3e-3], "lora": [3e-4, 1e-3, 3e-3, 1e-2], "sara": [1e-3, 3e-3, 1e-2, 3e-2],
               "sparse-random": [1e-3, 3e-3, 1e-2, 3e-2]},
    "minilm": {"full": [2e-5, 1e-4], "lora": [3e-4, 1e-3], "sara": [3e-4, 1e-3], "sparse-random": [3e-4, 1e-3]},
}
LORA_TARGETS = {
    "digits": ["conv1", "conv2", "conv3", "fc1", "fc"],
    "minilm": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
}


# ------------------------------------------------------------------------------------------- memory


def _status(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) * 1024 if m else 0


def reset_peak() -> int:
    """Reset VmHWM (Linux: write 5 to clear_refs) and return the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


# ------------------------------------------------------------------------------------------- tasks


def digits_task(seed: int):
    """(train 5–9, val 5–9, test 5–9, test 0–4, train 0–4) with labels kept as 0..9."""
    from torch.utils.data import TensorDataset

    from compressor.io.data import load_data

    d = load_data("digits")
    xtr, ytr = d.train.tensors
    xte, yte = d.test.tensors
    old_tr, new_tr = ytr < 5, ytr >= 5
    g = torch.Generator().manual_seed(1234)
    idx = new_tr.nonzero().squeeze(1)
    idx = idx[torch.randperm(len(idx), generator=g)]
    n_val = len(idx) // 5
    val, fit = idx[:n_val], idx[n_val:]
    return {
        "pretrain": TensorDataset(xtr[old_tr], ytr[old_tr]),
        "fit": TensorDataset(xtr[fit], ytr[fit]),
        "val": TensorDataset(xtr[val], ytr[val]),
        "test_new": TensorDataset(xte[yte >= 5], yte[yte >= 5]),
        "test_old": TensorDataset(xte[yte < 5], yte[yte < 5]),
    }


def pretrain_digits(seed: int, path: Path) -> dict:
    from safetensors.torch import save_file

    from compressor.models import digits_cnn
    from compressor.train import train

    data = digits_task(seed)
    torch.manual_seed(seed)
    model = digits_cnn()
    # classes 0–4 only, over their 5 logits (the 5–9 rows of the head stay at their random init)
    train(model, data["pretrain"], epochs=10, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=1e-4,
          seed=seed, progress=False, cosine=True, loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0])[:, :5], b[1]))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return {"old_test_acc": restricted_acc(model, data["test_old"], 0)}


@torch.no_grad()
def restricted_acc(model, ds, first: int) -> float:
    model.eval()
    x, y = ds.tensors
    pred = model(x)[:, first:first + 5].argmax(1) + first
    return float((pred == y).float().mean())


class ShuffleTask:
    """Sentences of the shipped corpus, half with their words shuffled; label 1 = original order."""

    def __init__(self, texts: list[str], seed: int):
        import random

        rng = random.Random(seed)
        self.texts, self.labels = [], []
        for i, t in enumerate(texts):
            words = t.split()
            if i % 2 and len(words) > 3:
                w = words[:]
                while w == words:
                    rng.shuffle(w)
                self.texts.append(" ".join(w))
                self.labels.append(0)
            else:
                self.texts.append(t)
                self.labels.append(1)


def minilm_data(n_train: int, n_test: int):
    from compressor.hf import corpus_sentences

    s = [t for t in corpus_sentences() if len(t.split()) > 5]
    train_s, test_s = s[0::2][:n_train], s[1::2][:n_test]
    return train_s, test_s


class Classifier(torch.nn.Module):
    def __init__(self, encoder, dim: int = 384):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(dim, 2)

    def forward(self, input_ids, attention_mask):
        from compressor.hf import last_hidden, mean_pool

        h = last_hidden(self.encoder(input_ids=input_ids, attention_mask=attention_mask))
        return self.head(mean_pool(h, attention_mask))


# ----------------------------------------------------------------------------------------- one run


def state_bytes(opt) -> int:
    from compressor.sara import state_bytes as sb

    return sb(opt)


def build(method: str, model: torch.nn.Module, *, lr: float, fraction: float, seed: int, task: str, steps: int, lora_r: int,
          lambda_rank: float):
    """Returns (model_to_train, optimizer, trainable count, adapter or None)."""
    from compressor.sara import SaRAOptimizer, Selection, select

    full = ["head.*"] if task == "minilm" else []
    if method == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
        return model, opt, sum(p.numel() for p in model.parameters()), None
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        cfg = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS[task],
                         modules_to_save=["head"] if task == "minilm" else None)
        pm = get_peft_model(model, cfg)
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        return pm, opt, sum(p.numel() for p in params), None
    sel = select(model, fraction=fraction, full=full)
    if method == "sparse-random":
        g = torch.Generator().manual_seed(seed)
        names = [n for n, _ in model.named_parameters() if n not in sel.full]
        named = dict(model.named_parameters())
        sizes = torch.tensor([named[n].numel() for n in names])
        flat = torch.zeros(int(sizes.sum()), dtype=torch.bool)
        flat[torch.randperm(len(flat), generator=g)[: sel.selected]] = True
        masks, off = {}, 0
        for n, s in zip(names, sizes.tolist(), strict=True):
            m = flat[off:off + s].view(named[n].shape)
            off += s
            if m.any():
                masks[n] = m
        sel = Selection(sel.threshold, masks, sel.total, sel.full)
    opt = SaRAOptimizer(model, selection=sel, lr=lr, lambda_rank=lambda_rank, rank_min_dim=32 if task == "digits" else 64,
                        progressive_step=steps // 2, seed=seed, full_lr=lr)
    return model, opt, opt.adapter.trainable_count(), opt.adapter


def run_one(cfg: dict) -> dict:
    """One adaptation run (called in a fresh subprocess)."""
    torch.set_num_threads(cfg.get("threads", 1))
    from safetensors.torch import load_file

    from compressor.train import train

    task, method, seed = cfg["task"], cfg["method"], cfg["seed"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if task == "digits":
        from compressor.models import digits_cnn

        data = digits_task(seed)
        model = digits_cnn()
        model.load_state_dict(load_file(cfg["base"]))
        for m in model.modules():  # keep the pre-trained BN statistics (same for every method)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.0
        fit = data["fit"]

        def loss_fn(m, b):
            return torch.nn.functional.cross_entropy(m(b[0])[:, 5:], b[1] - 5)

        batch_size = 32
    else:
        from torch.utils.data import TensorDataset

        from compressor.hf import load_minilm, tokenize

        enc, tok = load_minilm()
        torch.manual_seed(seed)
        model = Classifier(enc)
        train_s, test_s = minilm_data(cfg["n_train"], cfg["n_test"])
        st = ShuffleTask(train_s, seed)
        if cfg.get("validate"):  # last fifth of the training sentences as validation
            k = len(st.texts) * 4 // 5
            val_texts, val_labels = st.texts[k:], st.labels[k:]
            st.texts, st.labels = st.texts[:k], st.labels[:k]
        t = tokenize(tok, st.texts, max_length=cfg["max_length"])
        fit = TensorDataset(t["input_ids"], t["attention_mask"], torch.tensor(st.labels))

        def loss_fn(m, b):
            return torch.nn.functional.cross_entropy(m(b[0], b[1]), b[2])

        batch_size = 16
    model.to(device)
    import peft  # noqa: F401  (imports and a first forward happen before the baseline, for every method)

    import compressor.sara  # noqa: F401

    with torch.no_grad():
        first = tuple(t.to(device) for t in fit[:batch_size])
        model.train()
        model(*first[:-1])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda0 = torch.cuda.memory_allocated()
    rss0 = reset_peak()
    t0 = time.perf_counter()
    net, opt, trainable, adapter = build(method, model, lr=cfg["lr"], fraction=cfg["fraction"], seed=seed, task=task,
                                         steps=cfg["steps"], lora_r=cfg["lora_r"], lambda_rank=cfg["lambda_rank"])
    peak_state = [0]

    def track(_m, _step):  # grads + optimizer state peak over the run (SaRA's shrinks at re-selection)
        peak_state[0] = max(peak_state[0], state_bytes(opt))

    info = train(net, fit, steps=cfg["steps"], batch_size=batch_size, optimizer=opt, loss_fn=loss_fn, cosine=True,
                 seed=seed, device=device, progress=False, after_step=track)
    wall = time.perf_counter() - t0
    peak = (_status("VmHWM") - rss0) if not cuda else 0
    out = {**cfg, "trainable": trainable, "train_seconds": wall, "final_loss": info["final_loss"],
           "grad_and_optimizer_bytes": peak_state[0], "peak_rss_delta_bytes": peak}
    if cuda:
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated() - cuda0
    if adapter is not None:
        out["trainable_after_reselection"] = sum(v.numel() for v in adapter.values())
        out["threshold"] = adapter.threshold
        adapter.merge()
    elif method == "lora":
        net = net.merge_and_unload()
    model = net.cpu().eval()
    if task == "digits":
        split = data["val"] if cfg.get("validate") else data["test_new"]
        out["task"] = restricted_acc(model, split, 5)
        out["retention"] = restricted_acc(model, data["test_old"], 0)
    else:
        from compressor.hf import embed

        texts, labels = (val_texts, val_labels) if cfg.get("validate") else (lambda s: (s.texts, s.labels))(ShuffleTask(test_s, seed + 1))
        with torch.no_grad():
            correct = 0
            for i in range(0, len(texts), 64):
                t = tokenize(tok, texts[i:i + 64], max_length=cfg["max_length"])
                correct += int((model(t["input_ids"], t["attention_mask"]).argmax(1) == torch.tensor(labels[i:i + 64])).sum())
        out["task"] = correct / len(texts)
        ref, _ = load_minilm()
        e_ref = embed(ref, tok, test_s, max_length=cfg["max_length"])
        out["retention"] = float((embed(model.encoder, tok, test_s, max_length=cfg["max_length"]) * e_ref).sum(1).mean()) * 100
    return out


def spawn(cfg: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"worker failed for {cfg['method']}: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def lora_fraction(task: str, r: int) -> tuple[int, int]:
    """(LoRA trainable count, base parameter count) for the budget match."""
    from peft import LoraConfig, get_peft_model

    if task == "digits":
        from compressor.models import digits_cnn

        model = digits_cnn()
        base_n = sum(p.numel() for p in model.parameters())
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS[task]))
        return sum(p.numel() for p in pm.parameters() if p.requires_grad), base_n
    from compressor.hf import load_minilm

    enc, _ = load_minilm()
    base_n = sum(p.numel() for p in enc.parameters())
    pm = get_peft_model(enc, LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS[task]))
    return sum(p.numel() for p in pm.parameters() if p.requires_grad), base_n


def mean_std(xs: list[float]) -> dict:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--task", choices=["digits", "minilm"], default="digits")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="adaptation steps (digits: 210 ≈ 12 epochs; minilm: 150)")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank (digits 4, minilm 8); SaRA's fraction matches it")
    ap.add_argument("--lambda-rank", type=float, default=5e-4)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-grid", action="store_true", help="skip the LR grid; use the middle LR of each grid")
    ap.add_argument("--quick", action="store_true", help="1 seed, few steps, no grid")
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--n-test", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS / "sara.json")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return {}
    torch.set_num_threads(1)
    task = args.task
    steps = args.steps or (210 if task == "digits" else 150)
    lora_r = args.lora_r or (4 if task == "digits" else 8)
    seeds = 1 if args.quick else args.seeds
    if args.quick:
        steps = min(steps, 30)
    methods = args.methods.split(",")
    n_lora, n_base = lora_fraction(task, lora_r)
    fraction = n_lora / n_base
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="sara_bench_"))
    common = {"task": task, "steps": steps, "lora_r": lora_r, "fraction": fraction, "lambda_rank": args.lambda_rank,
              "n_train": args.n_train, "n_test": args.n_test, "max_length": args.max_length}
    bases, before = {}, {}
    for s in range(seeds):
        if task == "digits":
            bases[s] = str(tmp / f"base{s}.safetensors")
            before[s] = pretrain_digits(s, Path(bases[s]))
            d = digits_task(s)
            from safetensors.torch import load_file

            from compressor.models import digits_cnn

            m = digits_cnn()
            m.load_state_dict(load_file(bases[s]))
            before[s]["new_test_acc"] = restricted_acc(m, d["test_new"], 5)
        else:
            bases[s] = ""
    # LR per method: validation task accuracy on seed 0 (ties → the smaller LR, which retains more)
    grid_runs, chosen = [], {}
    for meth in methods:
        lrs = LR_GRID[task][meth]
        if args.no_grid or args.quick:
            chosen[meth] = lrs[len(lrs) // 2]
            continue
        best = None
        for lr in lrs:
            r = spawn({**common, "method": meth, "seed": 0, "lr": lr, "base": bases[0], "validate": True})
            grid_runs.append({k: r[k] for k in ("method", "lr", "task", "retention")})
            print(f"  grid {meth:14s} lr={lr:g}: val task {r['task']:.4f} retention {r['retention']:.4f}", flush=True)
            if best is None or r["task"] > best[0] + 1e-9:
                best = (r["task"], lr)
        chosen[meth] = best[1]
    runs = []
    for s in range(seeds):
        for meth in methods:
            r = spawn({**common, "method": meth, "seed": s, "lr": chosen[meth], "base": bases[s]})
            runs.append(r)
            print(f"seed {s} {meth:14s} lr={r['lr']:g} task {r['task']:.4f} retention {r['retention']:.4f} "
                  f"trainable {r['trainable']} state {r['grad_and_optimizer_bytes'] / 1e6:.3f} MB "
                  f"peak {r['peak_rss_delta_bytes'] / 1e6:.1f} MB {r['train_seconds']:.1f} s", flush=True)
    summary = {}
    for meth in methods:
        rs = [r for r in runs if r["method"] == meth]
        summary[meth] = {
            "lr": chosen[meth],
            "trainable": rs[0]["trainable"],
            "trainable_fraction": rs[0]["trainable"] / n_base,
            **{k: mean_std([r[k] for r in rs]) for k in ("task", "retention", "train_seconds", "peak_rss_delta_bytes",
                                                          "grad_and_optimizer_bytes")},
        }
        if "peak_cuda_bytes" in rs[0]:
            summary[meth]["peak_cuda_bytes"] = mean_std([r["peak_cuda_bytes"] for r in rs])
    print(f"\n{task}: {seeds} seed(s), {steps} steps, LoRA r={lora_r} → budget {n_lora} ({100 * fraction:.2f}% of {n_base})")
    print(f"{'method':14s} {'lr':>8s} {'trainable':>10s} {'task':>15s} {'retention':>15s} {'grad+opt MB':>11s} {'peak RSS MB':>12s} {'time s':>7s}")
    for meth, v in summary.items():
        print(f"{meth:14s} {v['lr']:8.0e} {v['trainable']:10d} {v['task']['mean']:8.4f}±{v['task']['std']:.4f} "
              f"{v['retention']['mean']:8.4f}±{v['retention']['std']:.4f} {v['grad_and_optimizer_bytes']['mean'] / 1e6:11.3f} "
              f"{v['peak_rss_delta_bytes']['mean'] / 1e6:12.1f} {v['train_seconds']['mean']:7.1f}")
    if "full" in summary:
        for meth in summary:
            if meth != "full":
                for key in ("grad_and_optimizer_bytes", "peak_rss_delta_bytes"):
                    f = summary["full"][key]["mean"]
                    summary[meth][f"{key}_vs_full"] = summary[meth][key]["mean"] / f if f else None
    if "lora" in summary and "sara" in summary:
        for key in ("grad_and_optimizer_bytes", "peak_rss_delta_bytes"):
            f = summary["lora"][key]["mean"]
            summary["sara"][f"{key}_vs_lora"] = summary["sara"][key]["mean"] / f if f else None
    result = {
        "task": task,
        "command": "python benchmarks/sara.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "protocol": __doc__.split("\n\n")[1] if task == "digits" else __doc__.split("\n\n")[1],
        "steps": steps, "seeds": seeds, "lora_r": lora_r, "budget": n_lora, "base_params": n_base, "fraction": fraction,
        "lambda_rank": args.lambda_rank,
        "before": before, "lr_grid": grid_runs, "summary": summary, "runs": runs,
        "seconds": time.perf_counter() - t_start,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                        "device": "cuda" if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.is_file() else {}
    existing[task] = result
    args.out.write_text(json.dumps(existing, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
