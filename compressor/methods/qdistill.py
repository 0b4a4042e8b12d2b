"""`qdistill` stage: quantized distillation / differentiable quantization (Polino et al. 2018, docs/quantization.md)
and deployable quantized ONNX export (QDQ with the learned scales, MatMulNBits for Linear layers).

epochs: 0 is post-training quantization with the same quantizer (no training, works on HF models too).
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field

from compressor.errors import InputError, RecipeError
from compressor.methods import _memory as mem
from compressor.methods._params import LearningRate, Momentum, TrainParams, WeightDecay
from compressor.recipe import StageContext, register_method


class QDistillParams(TrainParams):
    bits: int = Field(4, ge=2, le=8, description="bits per quantized weight (2-8)")
    bucket_size: int | None = Field(256, ge=1, description="values sharing one scale/offset; null = whole tensor (flat) / whole row")
    layout: Literal["row", "flat"] = Field("row", description="row: buckets stay inside an output channel (exact ONNX/MatMulNBits blocks); flat: paper")
    scaling: Literal["linear", "absmax", "affine"] = Field(
        "linear", description="linear = paper min-max (float offset); absmax = symmetric; affine = integer zero point (fast ORT kernels)")
    stochastic_rounding: bool = False
    variant: Literal["quantized_distillation", "differentiable_quantization"] = "quantized_distillation"
    distill: bool = Field(True, description="false: train the quantized student on labels only (baseline)")
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the distillation term")
    kl_reduction: Literal["batchmean", "elementwise_mean"] = "batchmean"
    epochs: float = Field(10.0, ge=0, description="0 = post-training quantization, no training")
    lr: LearningRate = Field(0.01, description="quantized distillation ~1e-2; differentiable quantization ~1e-4..1e-5")
    momentum: Momentum = 0.9
    weight_decay: WeightDecay = 2.2e-4
    student: str | None = Field(None, description="package.module:factory for a different (smaller) student, trained from scratch")
    quantize_first_last: bool = True
    export: list[Literal["qdq", "nbits"]] = Field(default_factory=lambda: ["qdq"], description="quantized ONNX files to write")
    atol: float = Field(1e-4, gt=0)
    rtol: float = Field(1e-3, ge=0)


def _build_student(spec: str):
    from torch import nn

    from compressor.io.models import _import_factory

    student = _import_factory(spec)()
    if not isinstance(student, nn.Module):
        raise InputError(f"student factory {spec!r} did not return a torch module", "point it at a function that builds an nn.Module")
    return student


@register_method("qdistill", QDistillParams, help="quantized distillation (2-8 bit) + QDQ / MatMulNBits ONNX export", kinds=("torch", "hf"),
                 needs_labels=lambda p: "train" if p.epochs > 0 else None, distils=lambda p: p.epochs > 0 and p.distill, fp32=True,
                 memory_needed=lambda fp, p: mem.model_copy(fp) + (mem.training(fp, "sgd", p.momentum) if p.epochs > 0 else 0)
                 + mem.onnx_export(fp) + mem.quantized_export(fp, len(p.export)))
def run_qdistill(ctx: StageContext, p: QDistillParams) -> dict:
    from compressor.eval import accuracy
    from compressor.quant.diffq import differentiable_quantization
    from compressor.quant.onnx_export import export_quantized, quantized_storage
    from compressor.quant.qat import (
        QuantConfig,
        check_output_shapes,
        post_training_quantize,
        quantized_distillation,
    )

    cfg = QuantConfig(bits=p.bits, bucket_size=p.bucket_size, scaling=p.scaling, layout=p.layout, stochastic=p.stochastic_rounding,
                      quantize_first_last=p.quantize_first_last)
    if p.variant == "differentiable_quantization" and (p.scaling != "linear" or p.stochastic_rounding):
        raise RecipeError("differentiable_quantization learns its own points", "drop scaling/stochastic_rounding for this variant")
    teacher = ctx.teacher if ctx.teacher is not None else ctx.model
    student = _build_student(p.student) if p.student else copy.deepcopy(ctx.model)
    data = ctx.data
    labelled = data is not None and data.task == "classification" and data.train is not None
    out: dict = {"bits": p.bits, "variant": p.variant if p.epochs > 0 else "post_training"}
    if p.epochs > 0:
        if not labelled:
            raise RecipeError("qdistill with epochs > 0 needs labelled training data",
                              "pass --data digits or npz:FILE with x and y; or set epochs: 0 for post-training quantization")
        if not ctx.current_model().trains_on_tensors:
            raise RecipeError("quantized distillation trains torch models on tensor data", "use epochs: 0 (post-training) for HF models")
        check_output_shapes(teacher.cpu(), student.cpu(), data.train[:2][0])
        common = dict(epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, momentum=p.momentum, temperature=p.temperature,
                      alpha=p.alpha, kl_reduction=p.kl_reduction, seed=ctx.seed, device=ctx.device)
        kd_teacher = teacher if p.distill else None
        if p.variant == "quantized_distillation":
            qt, info = quantized_distillation(student, data.train, teacher=kd_teacher, cfg=cfg, weight_decay=p.weight_decay, **common)
        else:
            qt, info = differentiable_quantization(student, data.train, cfg=cfg, teacher=kd_teacher if p.student else None, **common)
        out["train"] = {k: v for k, v in info.items() if k != "plan"}
        out["plan"] = info["plan"]
    else:
        qt, info = post_training_quantize(student, cfg)
        out["plan"] = info["plan"]
    if labelled and data.test is not None:
        out["accuracy_teacher"] = accuracy(teacher, data.test)
        out["accuracy_quantized"] = accuracy(student, data.test)
    out["storage"] = quantized_storage(qt, student)
    out["exports"] = {}
    from compressor.train import barrier, is_writer

    for fmt in p.export:
        path = ctx.workdir / f"model.{fmt}.onnx"
        if is_writer():  # under torchrun the ranks hold the same student; rank 0 writes the file
            out["exports"][fmt] = export_quantized(student, qt, ctx.example_inputs, path, fmt=fmt, atol=p.atol, rtol=p.rtol)
        barrier()
        ctx.artifacts[f"onnx_{fmt}"] = str(path)
        ctx.artifacts.setdefault("onnx", str(path))  # the deployable file is the stage's main output
    ctx.model = student
    return out
