"""Dense vs sparse linear kernels on real layer sizes, measured side by side in one run.

(The code behind ``benchmarks/kernels.py`` and ``compress bench-kernels``.)

    python benchmarks/kernels.py                      # CPU, 1 thread then 2 threads, full grid
    python benchmarks/kernels.py --quick              # small grid (what `compress bench-kernels` runs)
    python benchmarks/kernels.py --device cuda        # GPU: 2:4 semi-structured vs dense bf16, CSR vs dense

For each (shape, rows, sparsity pattern) every format is timed round-robin (dense, csr, bsr / semi24 ...),
``--repeats`` times after a warm-up, and the medians are compared: drift and other load on the machine hit
all formats alike. CPU timings use ``torch.set_num_threads(N)`` for each N in ``--threads`` (default 1,2;
1 thread is the stable figure). Results merge into ``benchmarks/results/kernels.json`` under a key per
device and thread count, with the device name and torch version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from compressor.kernels import formats as KF
from compressor.kernels.calibrate import time_interleaved
from compressor.kernels.sparse_linear import SparseConv2d
from compressor.utils.atomic import write_text_atomic

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]  # (out, in) = nn.Linear weight shape
QUICK_SHAPES = [(768, 768), (4096, 4096)]
SPARSITIES = [0.5, 0.7, 0.9, 0.95]


def unstructured(o: int, i: int, s: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(o, i, generator=gen)
    k = round(s * w.numel())
    idx = torch.randperm(w.numel(), generator=gen)[:k]
    w.view(-1)[idx] = 0
    return w


def two_four(o: int, i: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(o, i, generator=gen)
    g = w.reshape(o, i // 4, 4)
    drop = g.abs().argsort(-1)[..., :2]
    g.scatter_(-1, drop, 0.0)
    return g.reshape(o, i)


def block_sparse(o: int, i: int, s: float, block: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(o, i, generator=gen)
    keep = torch.rand(o // block, i // block, generator=gen) >= s
    return w * keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


def bench_cpu(shapes, rows_list, sparsities, repeats: int, gen) -> list[dict]:
    out = []
    for o, i in shapes:
        repeats_here = max(3, repeats // 2) if o * i >= 4096 * 4096 else repeats
        for rows in rows_list:
            x = torch.randn(rows, i, generator=gen)
            b = torch.randn(o, generator=gen)
            cases = [(f"unstructured-{s:.2f}", unstructured(o, i, s, gen)) for s in sparsities]
            cases.append(("2:4", two_four(o, i, gen)))
            cases.append(("block16-0.90", block_sparse(o, i, 0.9, 16, gen)))
            for pattern, w in cases:
                st = KF.weight_stats(w, 16)
                fmts = {"dense": w, "csr": KF.pack(w, "csr")}
                skipped = {}
                if st.block_sparsity >= 0.3:
                    fmts["bsr"] = KF.pack(w, "bsr", block=16)
                else:
                    skipped["bsr"] = f"only {st.block_sparsity:.2f} of 16x16 blocks empty: BSR stores them all (>3x slower than dense in a probe)"
                fns = {k: (lambda p=p, k=k, x=x, b=b: KF.linear(x, p, k, b)) for k, p in fmts.items()}
                # correctness of every format on this very input, fp32
                ref = KF.linear(x, w, "dense", b)
                for k, p in fmts.items():
                    torch.testing.assert_close(KF.linear(x, p, k, b), ref, atol=1e-3, rtol=1e-4)
                t = time_interleaved(fns, "cpu", repeats=repeats_here, warmup=1)
                row = {"shape": [o, i], "rows": rows, "pattern": pattern, "sparsity": round(st.sparsity, 4),
                       "block_sparsity": round(st.block_sparsity, 4), "ms": t,
                       "speedup_vs_dense": {k: t["dense"] / v for k, v in t.items() if k != "dense"}, "skipped": skipped}
                out.append(row)
                sp = "  ".join(f"{k} {v:.2f}x" for k, v in row["speedup_vs_dense"].items())
                print(f"  {o:>5}x{i:<5} rows={rows:<4} {pattern:<18} dense {t['dense']:8.3f} ms   {sp}", flush=True)
    return out


def bench_conv(repeats: int, gen) -> list[dict]:
    out = []
    for (c, hw, n) in [(256, 14, 8), (64, 32, 8)]:
        for s in (0.9, 0.95):
            conv = torch.nn.Conv2d(c, c, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(unstructured(c, c * 9, s, gen).reshape(c, c, 3, 3))
            sc = SparseConv2d(conv, "csr")
            x = torch.randn(n, c, hw, hw, generator=gen)
            torch.testing.assert_close(sc(x), conv(x), atol=1e-3, rtol=1e-4)
            with torch.no_grad():
                t = time_interleaved({"dense": lambda conv=conv, x=x: conv(x), "csr_im2col": lambda sc=sc, x=x: sc(x)}, "cpu", repeats=repeats, warmup=1)
            row = {"conv": [c, c, 3, 3], "input": [n, c, hw, hw], "sparsity": s, "ms": t, "speedup": t["dense"] / t["csr_im2col"]}
            out.append(row)
            print(f"  conv {c}x{c}x3x3 on {n}x{c}x{hw}x{hw} s={s}: dense {t['dense']:.2f} ms, im2col+CSR {row['speedup']:.2f}x", flush=True)
    return out


def bench_cuda(shapes, rows_list, sparsities, repeats: int, gen) -> list[dict]:
    out = []
    dev = torch.device("cuda")
    half = torch.bfloat16
    for o, i in shapes:
        for rows in rows_list:
            x32 = torch.randn(rows, i, generator=gen).to(dev)
            xh = x32.to(half)
            b32 = torch.randn(o, generator=gen).to(dev)
            bh = b32.to(half)
            w24 = two_four(o, i, gen).to(dev)
            wh = w24.to(half)
            ok, why = KF.semi24_support(wh, dev, half)
            fns = {"dense_bf16": lambda xh=xh, wh=wh, bh=bh: KF.linear(xh, wh, "dense", bh)}
            if ok:
                p24 = KF.pack(wh, "semi24")
                torch.testing.assert_close(KF.linear(xh, p24, "semi24", bh).float(), KF.linear(xh, wh, "dense", bh).float(),
                                           atol=0.25, rtol=2e-2)
                fns["semi24_bf16"] = lambda xh=xh, p24=p24, bh=bh: KF.linear(xh, p24, "semi24", bh)
            t = time_interleaved(fns, dev, repeats=repeats, warmup=3, min_time_s=0.2)
            row = {"shape": [o, i], "rows": rows, "pattern": "2:4", "dtype": "bfloat16", "ms": t,
                   "speedup_vs_dense": ({"semi24_bf16": t["dense_bf16"] / t["semi24_bf16"]} if ok else {}),
                   "skipped": {} if ok else {"semi24_bf16": why}}
            out.append(row)
            print(f"  {o:>5}x{i:<5} rows={rows:<4} 2:4 bf16   dense {t['dense_bf16']:.4f} ms  "
                  + (f"semi24 {row['speedup_vs_dense']['semi24_bf16']:.2f}x" if ok else f"semi24 skipped: {why}"), flush=True)
            for s in sparsities:
                w = unstructured(o, i, s, gen).to(dev)
                pc = KF.pack(w, "csr")
                t = time_interleaved({"dense": lambda w=w, x32=x32, b32=b32: KF.linear(x32, w, "dense", b32),
                                      "csr": lambda pc=pc, x32=x32, b32=b32: KF.linear(x32, pc, "csr", b32)}, dev, repeats=repeats, warmup=3, min_time_s=0.2)
                row = {"shape": [o, i], "rows": rows, "pattern": f"unstructured-{s:.2f}", "dtype": "float32", "ms": t,
                       "speedup_vs_dense": {"csr": t["dense"] / t["csr"]}}
                out.append(row)
                print(f"  {o:>5}x{i:<5} rows={rows:<4} {row['pattern']:<18} fp32 dense {t['dense']:.4f} ms  csr {row['speedup_vs_dense']['csr']:.2f}x", flush=True)
    return out


def bench_onnx(tmp_dir: Path, sparsities=(0.5, 0.9)) -> list[dict]:
    """File size of a BERT-sized FFN (768->3072->768) pruned by global magnitude: dense vs compact encodings."""
    from compressor import masks as M
    from compressor.export import export_onnx
    from compressor.kernels.onnx_sparse import compact_onnx

    out = []
    for s in sparsities:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768))
        M.apply_masks(m, M.magnitude_masks({"0.weight": m[0].weight.detach(), "2.weight": m[2].weight.detach()}, s))
        M.bake_masks(m)
        src = tmp_dir / f"ffn{s}.onnx"
        export_onnx(m, (torch.randn(4, 768),), src)
        row = {"model": "FFN 768-3072-768", "sparsity": s}
        for meth in ("auto", "sparse_initializer"):
            r = compact_onnx(src, tmp_dir / f"ffn{s}_{meth}.onnx", method=meth)
            row[meth] = {k: r[k] for k in ("dense_bytes", "compact_bytes", "saving", "dense_zlib_bytes", "compact_zlib_bytes", "max_abs_diff")}
        out.append(row)
        print(f"  ONNX FFN s={s}: dense {row['auto']['dense_bytes']/1e6:.2f} MB, auto {row['auto']['compact_bytes']/1e6:.2f} MB, "
              f"sparse_initializer {row['sparse_initializer']['compact_bytes']/1e6:.2f} MB, zlib(dense) "
              f"{row['auto']['dense_zlib_bytes']/1e6:.2f} MB, max|diff| {row['auto']['max_abs_diff']}", flush=True)
    return out


def goals(rows: list[dict], device: str) -> dict:
    g = {}
    if device == "cpu":
        for r in rows:
            if r.get("shape") == [4096, 4096] and r["pattern"] in ("unstructured-0.90", "unstructured-0.95"):
                best = max(r["speedup_vs_dense"].values())
                g[f"cpu_sparse_beats_dense_4096_{r['pattern']}_rows{r['rows']}"] = {"best_speedup": round(best, 3), "met": best > 1.0}
    else:
        for r in rows:
            if r.get("shape") == [4096, 4096] and r["pattern"] == "2:4":
                sp = r["speedup_vs_dense"].get("semi24_bf16")
                g[f"gpu_24_vs_dense_bf16_4096_rows{r['rows']}"] = {"speedup": sp, "goal": 1.3,
                                                                    "met": (sp is not None and sp >= 1.3)}
    return g


def main(argv=None) -> dict:
    """The benchmarks/kernels.py command line: parse, then :func:`run_bench`."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--threads", default="1,2", help="CPU thread counts to run, e.g. 1 or 1,2")
    ap.add_argument("--rows", default="128,1", help="tokens per matmul (batch x sequence)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="768x768 and 4096x4096 only, sparsities 0.5/0.9, no conv")
    ap.add_argument("--shapes", default=None, help="override the weight shapes (out x in), e.g. 768x768,4096x4096")
    ap.add_argument("--sparsities", default=None, help="override the unstructured sparsities, e.g. 0.9,0.95")
    ap.add_argument("--no-conv", action="store_true")
    ap.add_argument("--onnx-only", action="store_true", help="only the compact-ONNX file-size comparison")
    ap.add_argument("--out", default=str(Path("benchmarks") / "results" / "kernels.json"))
    a = ap.parse_args(argv)
    from compressor.device import resolve

    return run_bench(
        device=resolve(a.device), threads=[int(t) for t in a.threads.split(",")],
        shapes=[tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")] if a.shapes else None,
        sparsities=[float(v) for v in a.sparsities.split(",")] if a.sparsities else None,
        rows=[int(r) for r in a.rows.split(",")], repeats=a.repeats, conv=not a.no_conv, quick=a.quick,
        onnx_only=a.onnx_only, out=Path(a.out),
        command="python benchmarks/kernels.py " + " ".join(str(x) for x in (argv if argv is not None else sys.argv[1:])))


def run_bench(*, device, threads=(1, 2), shapes=None, sparsities=None, rows=(128, 1), repeats: int = 9, conv: bool = True,
              quick: bool = False, onnx_only: bool = False, out: Path = Path("benchmarks") / "results" / "kernels.json",
              command: str | None = None) -> dict:
    """Time dense vs sparse kernels on `device` (a torch.device: CPU runs CSR/BSR per thread count, CUDA runs
    2:4 semi-structured); results are merged per device into the JSON file `out` and returned."""
    device = torch.device(device)
    custom = shapes is not None or sparsities is not None
    shapes = list(shapes) if shapes is not None else (QUICK_SHAPES if quick else SHAPES)
    sparsities = list(sparsities) if sparsities is not None else ([0.5, 0.9] if quick else SPARSITIES)
    rows_list = list(rows)
    gen = torch.Generator().manual_seed(0)
    results: dict = {}
    out_path = Path(out)
    if out_path.exists():
        try:
            results = json.loads(out_path.read_text())
        except ValueError:
            results = {}
    results.setdefault("runs", {})
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "repeats": repeats,
            "command": command or f"compress bench-kernels --device {device}",
            "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    kind = device.type
    if onnx_only:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            results["onnx_compact"] = meta | {"rows": bench_onnx(Path(d))}
        kind = "none"
    with torch.no_grad():
        if kind == "none":
            pass
        elif kind == "cpu":
            for th in threads:
                torch.set_num_threads(th)
                print(f"CPU, torch.set_num_threads({th}), MKL={torch.backends.mkl.is_available()}", flush=True)
                lin = bench_cpu(shapes, rows_list, sparsities, repeats, gen)
                convs = bench_conv(repeats, gen) if (conv and not quick) else []
                key = f"cpu-threads{th}" + ("-quick" if quick else "") + ("-custom" if custom else "")
                results["runs"][key] = meta | {"device": "cpu", "device_name": platform.processor() or "cpu", "threads": th,
                                                "linear": lin, "conv": convs, "goals": goals(lin, "cpu"),
                                                "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        else:
            index = device.index if device.index is not None else 0
            name = torch.cuda.get_device_name(index)
            cap = torch.cuda.get_device_capability(index)
            print(f"CUDA {name} sm{cap[0]}{cap[1]}, cuSPARSELt={getattr(torch._C, '_has_cusparselt', False)}", flush=True)
            with torch.cuda.device(index):
                lin = bench_cuda(shapes, rows_list, sparsities, max(repeats, 20), gen)
            results["runs"]["cuda" + ("-quick" if quick else "") + ("-custom" if custom else "")] = meta | {
                "device": "cuda", "device_name": name, "capability": list(cap),
                "cusparselt": bool(getattr(torch._C, "_has_cusparselt", False)), "linear": lin, "goals": goals(lin, "cuda")}
    write_text_atomic(out_path, json.dumps(results, indent=1))
    for k, run in results["runs"].items():
        if run.get("goals"):
            print(k, json.dumps(run["goals"]))
    print(f"wrote {out_path}")
    return results
