"""ReplaceMe on the real pretrained MiniLM-L6 (all-MiniLM-L6-v2): remove 1, 2 and 3 of its 6 blocks and measure
embedding cosine fidelity to the dense model on held-out sentences (never used for calibration), for
ReplaceMe-LS, ReplaceMe-cosine and two baselines: the same cut without T (drop by distance only) and naive
drop of the last n blocks. Also the calibration's peak memory and time.

    .venv/bin/python benchmarks/replaceme_minilm.py            # -> benchmarks/results/replaceme_minilm.json
    .venv/bin/python benchmarks/replaceme_minilm.py --calib 128 --held-out 64   # quick look

Calibration: even-indexed sentences of the shipped corpus (compressor.hf.corpus_sentences); evaluation:
odd-indexed ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from compressor import replaceme as R
from compressor.hf import corpus_sentences, embed, load_minilm

RESULTS = Path(__file__).resolve().parent / "results" / "replaceme_minilm.json"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=512, help="calibration sentences")
    ap.add_argument("--held-out", type=int, default=256, help="held-out sentences for fidelity")
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_minilm()
    s = corpus_sentences()
    calib, held = s[0::2][: args.calib], s[1::2][: args.held_out]
    ref = embed(model, tok, held)

    def fid(m) -> float:
        return R.quality(m, model, tokenizer=tok, texts=held, reference=ref)["embedding_fidelity"]

    rows = []
    for n in args.depths:
        row: dict = {"removed_blocks": n}
        t = time.perf_counter()
        ls, rep = R.prune(model, calib, n_blocks=n, estimator="ls", tokenizer=tok)
        row["replaceme_ls"] = fid(ls)
        row["ls_seconds"] = time.perf_counter() - t
        row["cut_start"] = rep["start"]
        row["calibration"] = rep["calibration"]  # seconds, peak memory (RSS delta) and what all hidden states would take
        row["params_after"] = rep["params_after"]
        t = time.perf_counter()
        cos, _ = R.prune(model, calib, n_blocks=n, estimator="cosine", tokenizer=tok)
        row["replaceme_cosine"] = fid(cos)
        row["cosine_seconds"] = time.perf_counter() - t
        none, _ = R.prune(model, calib, n_blocks=n, estimator="none", tokenizer=tok, start=rep["start"])
        row["same_cut_no_T"] = fid(none)
        naive, _ = R.naive_drop(model, n)
        row["naive_drop_last"] = fid(naive)
        rows.append(row)
        print(f"remove {n}: cut at block {row['cut_start']}  LS {row['replaceme_ls']:.4f}  cosine {row['replaceme_cosine']:.4f}  "
              f"same cut, no T {row['same_cut_no_T']:.4f}  naive drop {row['naive_drop_last']:.4f}  "
              f"(LS {row['ls_seconds']:.1f} s, calibration peak {rep['calibration']['peak_memory_mb']:.0f} MB "
              f"vs {rep['calibration']['all_hidden_states_mb']:.0f} MB for all hidden states)")
    result = {
        "benchmark": "replaceme_minilm",
        "command": " ".join([".venv/bin/python benchmarks/replaceme_minilm.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": {"calibration_sentences": len(calib), "held_out_sentences": len(held), "threads": args.threads,
                   "metric": "mean cosine of mean-pooled L2-normalised embeddings to the dense model"},
        "params_dense": sum(p.numel() for p in model.parameters()),
        "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    """Markdown table (as in docs/replaceme.md)."""
    print(f"\nMiniLM-L6, {result['config']['calibration_sentences']} calibration / "
          f"{result['config']['held_out_sentences']} held-out sentences, embedding fidelity (cosine to dense)\n")
    print("| blocks removed | cut | params | ReplaceMe-LS | ReplaceMe-cosine | same cut, no T | naive drop (last n) "
          "| LS time (s) | calib. time (s) | calib. peak RSS (MB) | calib. tensors held (MB) | all hidden states (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        c = r["calibration"]
        cut = f"{r['cut_start']}–{r['cut_start'] + r['removed_blocks'] - 1}"
        print(f"| {r['removed_blocks']} | {cut} | {r['params_after'] / 1e6:.2f} M | {r['replaceme_ls']:.4f} "
              f"| {r['replaceme_cosine']:.4f} | {r['same_cut_no_T']:.4f} | {r['naive_drop_last']:.4f} "
              f"| {r['ls_seconds']:.1f} | {c['seconds']:.1f} | {c['peak_memory_mb']:.0f} | {c['held_tensors_peak_mb']:.0f} "
              f"| {c['all_hidden_states_mb']:.0f} |")


if __name__ == "__main__":
    main()
