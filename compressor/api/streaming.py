"""compress() on a Hugging Face safetensors folder whose recipe never needs the model in memory (one `structured`
stage, optionally followed by a torch export): cut tensor by tensor from the shards (compressor.checkpoint)."""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import torch

from compressor import device as devices
from compressor import eval as ev
from compressor.api.analysis import analyze
from compressor.api.preflight import _check_output
from compressor.api.result import Result, _jsonable
from compressor.recipe import Recipe
from compressor.utils.atomic import write_text_atomic


def _streams(model, rec: Recipe, output) -> bool:
    """A Hugging Face safetensors folder pruned by a recipe of one `structured` stage (optionally followed by an
    `export` to torch, which for such a folder is the pruned HF folder itself) into a folder never needs the model
    in memory: it is cut tensor by tensor from the shards (compressor.checkpoint) instead."""
    from compressor.checkpoint import streamable
    from compressor.methods.structured import streams

    methods = [s.method for s in rec.stages]
    torch_export = methods == ["structured", "export"] and rec.stages[1].params.format == "torch"
    return (output is not None and isinstance(model, str | Path) and streamable(model)
            and (methods == ["structured"] or torch_export) and streams(rec.stages[0].params))


def _compress_streaming(src: Path, rec: Recipe, out_dir: Path, *, seed: int, overwrite: bool, resume: bool, device,
                        t0: float, on_stage=None) -> Result:
    """compress() for the streaming case: the pruned folder is written to OUTPUT/model (or the export stage's filename;
    verified against the
    source with its removed channels zeroed) and report.json beside it; no model object is returned."""
    from compressor.checkpoint.shards import Checkpoint
    from compressor.methods.structured import axis_sums_for, structured_checkpoint
    from compressor.utils.phases import PRUNING_PHASES, Phases, process_startup

    _check_output(out_dir, src, overwrite, resume)
    if on_stage is not None:
        on_stage(1, rec.stages[0])
    phases = Phases()
    startup = process_startup(t0)
    if startup is not None:
        phases.add("startup", startup)
    params = copy.deepcopy(rec.stages[0].params)
    Checkpoint(src).prefetch()  # the kernel reads the shards while the analysis (CPU only) runs
    sums = axis_sums_for(src, params)  # and a worker process computes the importance's channel sums
    try:
        with phases("analysis"):
            analysis = analyze(src)  # groups only: the weights are read from the shards below
        analysis_phases = dict(analysis.export.get("seconds", {}))
        export = rec.stages[1] if len(rec.stages) > 1 else None  # a torch export: the cut folder is its output
        folder = out_dir / (export.params.filename if export is not None else "model")
        result = structured_checkpoint(src, analysis, params, folder, seed=seed, device=device,
                                       overwrite=overwrite, phases=phases, sums=sums)
    finally:
        if sums is not None:
            sums.close()
    del analysis
    stages = [{"stage": 1, "method": "structured", "params": params.model_dump(mode="json"), "result": result}]
    if export is not None:
        if on_stage is not None:
            on_stage(2, export)
        stages.append({"stage": 2, "method": "export", "params": export.params.model_dump(mode="json"),
                       "result": {"torch": {"hf_folder": str(folder)},
                                  "streamed": "the folder stage 1 wrote and verified is the torch export"}})
    phases.add("other", time.time() - t0 - sum(s for k, s in phases.seconds.items() if k != "startup"))
    pruning = round(sum(phases.seconds.get(k, 0.0) for k in PRUNING_PHASES), 3)
    files = {"hf_folder": str(folder)}
    report = _jsonable({
        "model": str(src), "model_kind": "hf", "model_format": "hf_folder", "streaming": True,
        "recipe": rec.to_dict(), "recipe_hash": rec.hash, "data": None, "seed": seed,
        "stages": stages,
        "before": {"params": result["params_before"], "file_bytes": ev.file_size(src)},
        "after": {"params": result["params_after"], "file_bytes": ev.file_size(folder)},
        "files": files, "warnings": {}, "seconds": round(time.time() - t0, 2),
        "phases": phases.seconds, "analysis_phases": analysis_phases,
        "analysis_plus_pruning": {"seconds": pruning, "phases": list(PRUNING_PHASES)},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "device": devices.label(device)},
    })
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2))
    return Result(None, None, report, out_dir, files)
