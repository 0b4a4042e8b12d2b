"""`export` stage: write the current model as verified ONNX and/or a torch checkpoint (or HF folder)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compressor.masks import plain_copy
from compressor.recipe import StageContext, register_method


class ExportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["onnx", "torch", "both"] = Field("onnx", description="what to write into the output folder")
    atol: float = Field(1e-4, gt=0, description="absolute tolerance of the torch vs onnxruntime check")
    rtol: float = Field(1e-3, ge=0, description="relative tolerance (times max |output|)")
    filename: str = Field("model", description="file stem inside the output folder")


@register_method("export", ExportParams, help="write verified ONNX and/or torch files of the current model")
def run_export(ctx: StageContext, p: ExportParams) -> dict:
    from compressor.export import export_onnx
    from compressor.io.models import save_torch
    from compressor.onnx_utils import save_onnx_verified

    out: dict = {}
    if ctx.model_kind == "onnx":
        path = ctx.workdir / f"{p.filename}.onnx"
        out["onnx"] = save_onnx_verified(ctx.onnx_model, path, ctx.example_inputs)
        ctx.artifacts["onnx"] = str(path)
        return out
    model = plain_copy(ctx.model)
    if p.format in ("onnx", "both"):
        path = ctx.workdir / f"{p.filename}.onnx"
        out["onnx"] = export_onnx(model, ctx.example_inputs, path, atol=p.atol, rtol=p.rtol)
        ctx.artifacts["onnx"] = str(path)
    if p.format in ("torch", "both"):
        if ctx.model_kind == "hf":
            folder = ctx.workdir / p.filename
            model.save_pretrained(folder)
            if ctx.tokenizer is not None:
                ctx.tokenizer.save_pretrained(folder)
            out["torch"] = {"hf_folder": str(folder)}
            ctx.artifacts["hf_folder"] = str(folder)
        else:
            args = tuple(ctx.example_inputs.values()) if isinstance(ctx.example_inputs, dict) else ctx.example_inputs
            out["torch"] = save_torch(model, ctx.workdir / f"{p.filename}.pt2", args)
            ctx.artifacts.update({k: v for k, v in out["torch"].items() if k != "program_error"})
    return out
