"""`export` stage: write the current model as verified ONNX and/or a torch checkpoint (or HF folder)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compressor.methods import _memory as mem
from compressor.recipe import StageContext, register_method
from compressor.train import barrier, is_writer


class ExportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["onnx", "torch", "both"] = Field("onnx", description="what to write into the output folder")
    atol: float = Field(1e-4, gt=0, description="absolute tolerance of the torch vs onnxruntime check")
    rtol: float = Field(1e-3, ge=0, description="relative tolerance (times max |output|)")
    filename: str = Field("model", description="file stem inside the output folder")


def _memory(fp, p) -> int:
    onnx = mem.onnx_export(fp) if p.format in ("onnx", "both") else 0
    # torch: a plain copy + its serialised program; a Hugging Face folder is saved from the model's own tensors,
    # whose bytes safetensors gathers for the file (one shard: the whole model under transformers' 50 GB default)
    copies = 1 if fp.kind == "hf" else 2
    torch_files = copies * mem.model_copy(fp) if p.format in ("torch", "both") else 0
    return max(onnx, torch_files)


@register_method("export", ExportParams, help="write verified ONNX and/or torch files of the current model", memory_needed=_memory,
                 fp32=lambda p: p.format in ("onnx", "both"))  # ONNX is traced and verified in fp32
def run_export(ctx: StageContext, p: ExportParams) -> dict:
    model = ctx.current_model()
    out: dict = {}
    writer = is_writer()  # under torchrun rank 0 writes; the other ranks record the same paths and wait
    # an ONNX model has no torch form: it is always written as (verified) ONNX, whatever `format` says
    if p.format in ("onnx", "both") or model.module is None:
        path = ctx.workdir / f"{p.filename}.onnx"
        out["onnx"] = model.export_onnx(path, ctx.example_inputs, atol=p.atol, rtol=p.rtol) if writer else {"path": str(path)}
        ctx.artifacts["onnx"] = str(path)
    if p.format in ("torch", "both") and model.module is not None and writer:
        out["torch"] = model.save(ctx.workdir, p.filename, ctx.example_inputs)
        ctx.artifacts.update({k: v for k, v in out["torch"].items() if k != "program_error"})
    barrier()
    return out
