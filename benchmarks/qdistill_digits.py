"""Quantized distillation on digits (Polino et al. 2018): a wide pretrained DigitsCNN teacher, a narrow DigitsCNN
student trained from scratch at 4 and 2 bits, with and without distillation, over several seeds; baselines:
the same quantizer applied post-training to the float student (the paper's "post-mortem" baseline), differentiable
quantization of the float distilled student, and onnxruntime post-training quantization (dynamic and
static int8). One seed's students are exported (QDQ with the learned scales, MatMulNBits) and timed in ORT.

    .venv/bin/python benchmarks/qdistill_digits.py            # -> benchmarks/results/qdistill_digits.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compressor.eval import accuracy, accuracy_onnx, count_params, latency_onnx
from compressor.export import export_onnx
from compressor.io.data import load_data
from compressor.models import digits_cnn, pretrained_digits_cnn
from compressor.quant import QuantConfig, post_training_quantize, quantized_distillation
from compressor.quant.diffq import differentiable_quantization
from compressor.quant.onnx_export import export_quantized, quantized_storage
from compressor.train import train

RESULTS = Path(__file__).resolve().parent / "results"


def ms(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "runs": xs}


def ort_ptq(fp32_path: Path, out_dir: Path, calib: np.ndarray, test) -> dict:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i : i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.it, None)

    res = {}
    dyn = out_dir / "ort_dynamic.onnx"
    quantize_dynamic(str(fp32_path), str(dyn), weight_type=QuantType.QUInt8)
    res["ort_dynamic_int8"] = {"accuracy_ort": accuracy_onnx(dyn, test), "bytes": dyn.stat().st_size}
    sta = out_dir / "ort_static.onnx"
    quantize_static(str(fp32_path), str(sta), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    res["ort_static_int8_qdq"] = {"accuracy_ort": accuracy_onnx(sta, test), "bytes": sta.stat().st_size}
    return res, {"ort_dynamic_int8": dyn, "ort_static_int8_qdq": sta}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--width", type=int, default=8, help="student width (teacher: 32)")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05], help="SGD lr grid, run for KD and no-KD alike")
    ap.add_argument("--main-lr", type=float, default=0.01, help="the lr whose students are exported and quantized post-training")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--diffq-epochs", type=float, default=5)
    ap.add_argument("--diffq-lr", type=float, default=1e-5)
    ap.add_argument("--out", default=str(RESULTS / "qdistill_digits.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    data = load_data("digits")
    teacher = pretrained_digits_cnn(epochs=args.teacher_epochs)
    teacher_acc = accuracy(teacher, data.test)
    kd = dict(temperature=args.temperature, alpha=args.alpha)
    runs: dict[str, list[float]] = {}
    students: dict = {}

    def add(key: str, v: float) -> None:
        runs.setdefault(key, []).append(v)

    from compressor.quant.qat import make_kd_loss

    for lr in args.lrs:
        common = dict(epochs=args.epochs, lr=lr, batch_size=64, momentum=0.9, weight_decay=2.2e-4, progress=False)
        main = lr == args.main_lr
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            init = digits_cnn(args.width)
            fp = copy.deepcopy(init)
            train(fp, data.train, epochs=args.epochs, lr=lr, momentum=0.9, weight_decay=2.2e-4, cosine=True, seed=seed, progress=False)
            add(f"lr {lr}: fp32 student, no KD", accuracy(fp, data.test))
            fp_kd = copy.deepcopy(init)
            train(fp_kd, data.train, epochs=args.epochs, lr=lr, momentum=0.9, weight_decay=2.2e-4, cosine=True, seed=seed,
                  progress=False, loss_fn=make_kd_loss(teacher, **kd))
            add(f"lr {lr}: fp32 student, KD", accuracy(fp_kd, data.test))
            for bits in args.bits:
                cfg = QuantConfig(bits=bits, bucket_size=256, layout="row")
                s_nokd = copy.deepcopy(init)
                quantized_distillation(s_nokd, data.train, teacher=None, cfg=cfg, seed=seed, **common)
                add(f"lr {lr}: {bits}-bit QAT, no KD", accuracy(s_nokd, data.test))
                s_kd = copy.deepcopy(init)
                qt_kd, _ = quantized_distillation(s_kd, data.train, teacher=teacher, cfg=cfg, seed=seed, **kd, **common)
                add(f"lr {lr}: {bits}-bit quantized distillation", accuracy(s_kd, data.test))
                pm = copy.deepcopy(fp)
                post_training_quantize(pm, cfg)
                add(f"lr {lr}: {bits}-bit post-training RTN of the fp32 student (PM)", accuracy(pm, data.test))
                pm_kd = copy.deepcopy(fp_kd)
                post_training_quantize(pm_kd, cfg)
                add(f"lr {lr}: {bits}-bit post-training RTN of the fp32 KD student", accuracy(pm_kd, data.test))
                if main:
                    for init_pts in ("quantiles", "uniform"):
                        dq = copy.deepcopy(fp_kd)
                        qt_dq, _ = differentiable_quantization(dq, data.train, cfg=cfg, epochs=args.diffq_epochs, lr=args.diffq_lr, seed=seed,
                                                               init=init_pts, progress=False, **kd)
                        add(f"lr {lr}: {bits}-bit differentiable quantization ({init_pts} init) of the fp32 KD student", accuracy(dq, data.test))
                    if seed == 0:
                        students[bits] = (s_kd, qt_kd, dq, qt_dq)
            if main and seed == 0:
                students["fp"] = fp
            print(f"lr {lr} seed {seed}: " + ", ".join(f"{k.split(': ')[1]}={v[-1]:.4f}" for k, v in runs.items() if k.startswith(f"lr {lr}:")),
                  flush=True)

    table = {k: ms(v) for k, v in runs.items()}
    # ---- deployable files for seed 0: size, ORT accuracy and latency vs the fp32 student
    example = (data.test.tensors[0][:8],)
    feeds = {"input": data.test.tensors[0][:64].numpy()}
    files: dict = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        fp32_path = d / "student_fp32.onnx"
        export_onnx(students["fp"], example, fp32_path)
        files["fp32 student (ONNX)"] = {"bytes": fp32_path.stat().st_size, "accuracy_ort": accuracy_onnx(fp32_path, data.test),
                                        "latency_ms_b64": latency_onnx(fp32_path, feeds, runs=50, threads=1)}
        t_path = d / "teacher_fp32.onnx"
        export_onnx(teacher, example, t_path)
        files["fp32 teacher (ONNX)"] = {"bytes": t_path.stat().st_size, "accuracy_ort": accuracy_onnx(t_path, data.test),
                                        "latency_ms_b64": latency_onnx(t_path, feeds, runs=50, threads=1)}
        ptq, ptq_paths = ort_ptq(fp32_path, d, data.train.tensors[0][:256].numpy(), data.test)
        for k, v in ptq.items():
            v["latency_ms_b64"] = latency_onnx(ptq_paths[k], feeds, runs=50, threads=1)
            files[f"{k} (onnxruntime PTQ of the fp32 student)"] = v
        for bits in args.bits:
            s_kd, qt_kd, dq, qt_dq = students[bits]
            for fmt in ("qdq", "nbits"):
                path = d / f"qd{bits}.{fmt}.onnx"
                rep = export_quantized(s_kd, qt_kd, example, path, fmt=fmt)
                files[f"{bits}-bit quantized distillation, {fmt}"] = {
                    "bytes": rep["bytes"], "accuracy_torch": accuracy(s_kd, data.test), "accuracy_ort": accuracy_onnx(path, data.test),
                    "max_abs_diff_vs_torch_fake_quant": rep["max_abs_diff"], "max_abs_diff_unoptimized": rep["max_abs_diff_unoptimized"],
                    "latency_ms_b64": latency_onnx(path, feeds, runs=50, threads=1), "layers": rep["layers"],
                    "theoretical": quantized_storage(qt_kd, s_kd)}
            path = d / f"dq{bits}.qdq.onnx"
            rep = export_quantized(dq, qt_dq, example, path, fmt="qdq")
            files[f"{bits}-bit differentiable quantization, codebook"] = {
                "bytes": rep["bytes"], "accuracy_torch": accuracy(dq, data.test), "accuracy_ort": accuracy_onnx(path, data.test),
                "max_abs_diff_vs_torch_fake_quant": rep["max_abs_diff"], "latency_ms_b64": latency_onnx(path, feeds, runs=50, threads=1)}
    base = files["fp32 student (ONNX)"]
    for v in files.values():
        v["size_ratio_vs_fp32_student"] = base["bytes"] / v["bytes"]
        v["latency_ratio_vs_fp32_student"] = v["latency_ms_b64"] / base["latency_ms_b64"]
    out = {
        "setup": {"teacher": "pretrained_digits_cnn(epochs=teacher_epochs), width 32", "teacher_params": count_params(teacher), "teacher_accuracy": teacher_acc,
                  "teacher_epochs": args.teacher_epochs, "student": f"digits_cnn(width={args.width}) from scratch", "student_params": count_params(digits_cnn(args.width)),
                  "test_images": len(data.test), **vars(args), "bucket_size": 256, "layout": "row", "optimizer": "SGD nesterov, cosine",
                  "ort_threads": 1, "latency_batch": 64},
        "accuracy_over_seeds": table,
        "files_seed0": files,
        "seconds": round(time.time() - t0, 1),
    }
    kd_vs = {}
    for bits in args.bits:
        for lr in args.lrs:
            a, b = runs[f"lr {lr}: {bits}-bit quantized distillation"], runs[f"lr {lr}: {bits}-bit QAT, no KD"]
            kd_vs[f"{bits}-bit, lr {lr}: KD - no KD (paired by seed)"] = ms([x - y for x, y in zip(a, b, strict=True)])
        best_kd = max(args.lrs, key=lambda lr: statistics.mean(runs[f"lr {lr}: {bits}-bit quantized distillation"]))
        best_no = max(args.lrs, key=lambda lr: statistics.mean(runs[f"lr {lr}: {bits}-bit QAT, no KD"]))
        kd_vs[f"{bits}-bit, each at its best lr of the grid (chosen on the test split): KD lr {best_kd} - no KD lr {best_no}"] = {
            "mean": statistics.mean(runs[f"lr {best_kd}: {bits}-bit quantized distillation"]) - statistics.mean(runs[f"lr {best_no}: {bits}-bit QAT, no KD"])}
    out["kd_vs_nokd"] = kd_vs
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nteacher {teacher_acc:.4f}  ({count_params(teacher)} params); student width {args.width} ({out['setup']['student_params']} params)")
    for k, v in table.items():
        print(f"{k:90s} {100 * v['mean']:6.2f} ± {100 * v['std']:.2f} %")
    for k, dd in kd_vs.items():
        print(f"{k}: {100 * dd['mean']:+.2f}" + (f" ± {100 * dd['std']:.2f}" if "std" in dd else "") + " points")
    print(f"\n{'file':70s} {'bytes':>8s} {'size x':>7s} {'acc ORT':>8s} {'ms/b64':>7s} {'lat x':>6s}")
    for k, v in files.items():
        print(f"{k:70s} {v['bytes']:8d} {v['size_ratio_vs_fp32_student']:7.2f} {100 * v['accuracy_ort']:8.2f} "
              f"{v['latency_ms_b64']:7.3f} {v['latency_ratio_vs_fp32_student']:6.2f}")
    print(f"written {args.out} in {out['seconds']} s")


if __name__ == "__main__":
    main()
