"""Checks made from a Hugging Face folder's config.json and shard headers before any weight is read: a recipe
whose stages cannot run on the model, or cannot fit, is refused in seconds instead of after loading gigabytes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from compressor import device as devices
from compressor.errors import InputError
from compressor.recipe import Recipe, check_kinds, check_memory, needs_teacher
from compressor.utils.memory import Footprint


def folder_footprint(model) -> Footprint | None:
    """The footprint of a Hugging Face safetensors folder from config.json and the shards' headers (no weight
    read); None for anything else."""
    p = Path(model).expanduser() if isinstance(model, str | Path) else None
    if p is None or not p.is_dir() or not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        return None
    from compressor.checkpoint.shards import ITEMSIZE, Checkpoint

    try:
        cfg = json.loads((p / "config.json").read_text())
        meta = Checkpoint(p).meta.values()
    except (OSError, ValueError, KeyError, InputError):
        return None  # an unreadable folder: load_model says what is wrong with it
    sizes = [(math.prod(shape), math.prod(shape) * ITEMSIZE.get(dtype, 4)) for dtype, shape in meta]
    text = cfg.get("text_config") or cfg
    return Footprint(sum(n for n, _ in sizes), sum(b for _, b in sizes), max((b for _, b in sizes), default=0),
                     int(text.get("hidden_size") or 0), int(text.get("num_hidden_layers") or 0), "hf")


def _check_before_loading(model, rec: Recipe, dev, teacher) -> None:
    """A recipe that cannot run on a Hugging Face folder (a torch-only stage, a stage that cannot fit) is refused
    before gigabytes of weights are read. The same checks run again on the loaded model."""
    fp = folder_footprint(model)
    if fp is not None:
        check_kinds(rec, "hf")
        teacher_copy = fp.param_bytes if teacher is None and needs_teacher(rec) else 0
        check_memory(rec, fp, dev, fp.param_bytes + teacher_copy)  # the model itself is still to load


def check_sweep_memory(model, device=None) -> None:
    """`compress sweep` on a Hugging Face folder: refused in one line before loading when the model and what the
    sweep keeps beside it cannot fit (compressor.sweep.check_sweep_fits)."""
    from compressor.sweep import check_sweep_fits

    fp = folder_footprint(model)
    if fp is not None:
        check_sweep_fits(fp, devices.resolve(device), fp.param_bytes)  # the model is still to load


def _check_output(output: Path, source: Path | None, overwrite: bool, resume: bool) -> None:
    """The output folder is usable: not the input model (`source`) or a folder holding it, not a file, and not a
    finished result (report.json) unless `overwrite` (or `resume`)."""
    if source is not None:
        src = source.resolve()
        out = output.resolve()
        if out == src or src.is_relative_to(out) and out != Path("/"):
            raise InputError(f"output {output} would overwrite the input model", "choose another -o/--output folder")
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} exists and is a file", "give a folder path for -o/--output")
    if output.is_dir() and (output / "report.json").exists() and not (overwrite or resume):
        raise InputError(f"output folder {output} already holds a result (report.json)", "choose another -o, or pass --overwrite (or --resume)")
