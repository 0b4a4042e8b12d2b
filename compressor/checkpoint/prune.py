"""Structured pruning of a Hugging Face checkpoint folder without loading the model.

    scores = checkpoint_scores(src, analysis)                  # L2 group importance, one tensor at a time
    sel = select(analysis, scores, 0.25, heads=True, head_dim=False)
    report = prune_checkpoint(src, analysis, sel, out)          # new shards + config.json + the other files

Every tensor is read once from its shard, sliced along the cut plan (compressor.graph.torch_bridge.cut_plan),
and appended to an output shard whose header was computed from the planned shapes (compressor.checkpoint.
shards), so peak memory is about the largest tensor twice, whatever the model size. The Analysis may come
from an ONNX export of the model (initializer names carry the export wrapper's ``model.`` prefix) or from a
weightless analysis (names = checkpoint keys); values are always read from the shards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compressor.checkpoint.axis_sums import AxisSums
from compressor.checkpoint.hfconfig import LLAMA, check_against_model, family, updated_config
from compressor.checkpoint.shards import INDEX, ITEMSIZE, Checkpoint, FloatView, plan_shards, write_shards
from compressor.errors import InputError
from compressor.graph.analysis import Analysis
from compressor.graph.importance import MAGNITUDE_EXPONENT, group_scores
from compressor.graph.torch_bridge import cut_plan
from compressor.utils.atomic import current_umask
from compressor.utils.phases import Phases

# buffers a model rebuilds from config.json (never saved), so a cut of them needs no checkpoint counterpart
REBUILT = ("rotary_emb.inv_freq", ".masked_bias", ".attn.bias", "position_ids")
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


def key_map(analysis: Analysis, ckpt: Checkpoint, tied: bool) -> dict[str, str]:
    """{analysis initializer name: checkpoint key} for every initializer the checkpoint holds, the export
    wrapper's ``model.`` prefix removed when that matches more keys; with tied embeddings an lm_head absent
    from the checkpoint maps onto the input embedding it shares."""
    names = list(analysis.init_atoms.index)
    keys = set(ckpt.keys())
    best: dict[str, str] = {}
    for strip in ("", "model."):
        m = {n: n[len(strip):] for n in names if n.startswith(strip) and n[len(strip):] in keys}
        if len(m) > len(best):
            best = m
    if tied:
        embed = next((k for k in keys if k.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))), None)
        for n in names:
            if n not in best and n.endswith("lm_head.weight") and embed:
                best[n] = embed
    if not best:
        raise InputError("no initializer of the analysis names a tensor of this checkpoint",
                         "analyse this very model (its export or its config)")
    return best


def _tied(cfg: dict) -> bool:
    return bool(cfg.get("tie_word_embeddings", True))


def streamable(folder: str | Path) -> bool:
    """True for a Hugging Face folder with safetensors weights of a model type whose config.json fields the
    cut knows how to update (compressor.checkpoint.hfconfig.FAMILIES)."""
    from compressor.checkpoint.hfconfig import FAMILIES

    folder = Path(folder)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    return model_type in FAMILIES and any(folder.glob("*.safetensors"))


def checkpoint_scores(src_dir: str | Path, analysis: Analysis, method: str = "l2", *, sums: AxisSums | None = None,
                      **kwargs) -> dict[int, np.ndarray]:
    """compressor.graph.importance.group_scores with the values read from the shards, one tensor at a time
    (the `importance` argument of compressor.graph.select). sums: the per-axis sums of this checkpoint, started
    before the analysis (compressor.checkpoint.axis_sums), for l1/l2 of the exponent it was made with."""
    ckpt = Checkpoint(src_dir)
    cfg = json.loads((Path(src_dir) / "config.json").read_text())
    names = key_map(analysis, ckpt, _tied(cfg))
    exponent = kwargs.get("p") or MAGNITUDE_EXPONENT.get(method)
    usable = sums is not None and sums.p == exponent
    axis_sums = (lambda name, axis: sums.get(names[name], axis)) if usable else None
    return group_scores(analysis, method, weights=FloatView(ckpt, names), axis_sums=axis_sums, **kwargs)


def checkpoint_plan(analysis: Analysis, selection, ckpt: Checkpoint, cfg: dict) -> dict[str, dict[int, list[int]]]:
    """The cut plan by checkpoint key, checked against the checkpoint's shapes."""
    names = key_map(analysis, ckpt, _tied(cfg))
    plan: dict[str, dict[int, list[int]]] = {}
    for name, cuts in cut_plan(analysis, selection).items():
        key = names.get(name)
        if key is None:
            if name.endswith(REBUILT) or (name.endswith("lm_head.weight") and _tied(cfg)):
                continue
            raise InputError(f"the analysis cuts {name!r}, which this checkpoint does not hold",
                             "analyse this very model (its export or its config)")
        if name.endswith("lm_head.weight") and key not in ckpt.keys():
            continue
        if key in plan and name.endswith("lm_head.weight"):
            continue  # a tied lm_head: its embedding's cut is the one written
        plan[key] = cuts
    for name, key in names.items():
        sizes = tuple(analysis.init_atoms.size(k) for k in analysis.init_atoms.index[name])
        if sizes != ckpt.shape(key):
            raise InputError(f"{key}: checkpoint shape {ckpt.shape(key)}, analysis shape {sizes}",
                             "analyse this very model (its export or its config)")
    return plan


def _sliced_shape(shape: tuple[int, ...], cuts: dict[int, list[int]] | None) -> tuple[int, ...]:
    return tuple(n - len(set(cuts.get(ax, ()))) for ax, n in enumerate(shape)) if cuts else shape


def _slice(t: torch.Tensor, cuts: dict[int, list[int]] | None) -> torch.Tensor:
    for ax, idx in (cuts or {}).items():
        keep = np.setdiff1d(np.arange(t.shape[ax]), np.asarray(idx, dtype=np.int64))
        t = t.index_select(ax, torch.from_numpy(keep))
    return t


def _temp_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))


def _publish(tmp: Path, out: Path, overwrite: bool) -> Path | None:
    """Rename the finished folder onto `out`; a previous one is moved aside first and returned, for the
    caller to remove (its own phase: the previous result's cost, not this cut's)."""
    old = None
    if out.exists():
        if not overwrite:
            raise InputError(f"{out} already exists", "choose another output folder or pass overwrite")
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's folder is private; the result gets plain mkdir's mode
    os.replace(tmp, out)
    return old


def _copy_others(src: Path, dst: Path, shards: set[str]) -> list[str]:
    """Tokenizer, generation config and every other file beside the weights."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.name in shards or p.name in (INDEX, "config.json") or p.name.endswith(WEIGHT_FILES) \
                or p.name.endswith(".index.json"):
            continue
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / p.name)
        copied.append(p.name)
    return copied


def prune_checkpoint(src_dir: str | Path, analysis: Analysis, selection, out_dir: str | Path, *,
                     max_shard_size: int = 1 << 30, overwrite: bool = False, verify: str = "auto",
                     verify_tolerance: float = 1e-4, phases: Phases | None = None) -> dict:
    """Write `src_dir` with `selection` cut out to `out_dir`, tensor by tensor; returns a report.

    selection: a compressor.graph Selection or a set of atoms. verify: "auto" (layer by layer for a Llama-family
    checkpoint of 1 GiB or more, else the whole model), "model", "layers" or "none" (compressor.checkpoint.verify); it runs on the
    finished folder before it is renamed into place, so a failed check publishes nothing. The source folder
    is only read; `out_dir` appears complete or not at all (an existing one is refused unless `overwrite`).
    phases: gets the seconds of "plan" (shapes, config.json), "cut" (shards written), "files" (index, config,
    tokenizer, rename), "verify" (the comparison), "generate" (the reload and generation check) and "cleanup"
    (removing the folder an overwrite replaced)."""
    from compressor.checkpoint.verify import verify_pruned

    phases = Phases.optional(phases)
    t0 = time.time()
    src, out = Path(src_dir).resolve(), Path(out_dir).resolve()
    if out == src or out.is_relative_to(src) or src.is_relative_to(out):
        raise InputError(f"output {out} overlaps the source checkpoint {src}", "choose a folder outside it")
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists", "choose another output folder or pass overwrite=True")
    if verify not in ("auto", "model", "layers", "none"):
        raise InputError(f"verify must be auto, model, layers or none, got {verify!r}")
    if not (src / "config.json").is_file():
        raise InputError(f"{src} has no config.json", "pass a Hugging Face model folder")
    with phases("plan"):
        cfg = json.loads((src / "config.json").read_text())
        ckpt = Checkpoint(src)
        plan = checkpoint_plan(analysis, selection, ckpt, cfg)
        old = {k: ckpt.shape(k) for k in ckpt.keys()}
        new = {k: _sliced_shape(s, plan.get(k)) for k, s in old.items()}
        new_cfg, changes = updated_config(cfg, plan, old, new)
        check_against_model(new_cfg, new)
        entries = [(k, ckpt.meta[k][0], new[k]) for f in ckpt.files for k in ckpt.keys() if ckpt.shard_of[k] == f]
        shards = plan_shards(entries, max_shard_size)
    tmp = _temp_dir(out)
    try:
        with phases("cut"):
            named = [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", shard) for i, shard in enumerate(shards)]
            total = write_shards(tmp, named, lambda key: _slice(ckpt.read(key), plan.get(key)))
            weight_map = {k: name for name, shard in named for k, _, _ in shard}
        with phases("files"):
            tensor_bytes = sum(ITEMSIZE[d] * int(np.prod(s, dtype=np.int64)) for _, d, s in entries)
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": tensor_bytes}, "weight_map": weight_map},
                                                indent=2))
            (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")
            copied = _copy_others(src, tmp, set(ckpt.files))
        mode = verify if verify != "auto" else (
            "layers" if ckpt.nbytes() >= (1 << 30) and family(cfg) is LLAMA else "model")
        checked = None
        if verify != "none":
            checked = verify_pruned(src, tmp, plan, mode=mode, tolerance=verify_tolerance)
            phases.update(checked.pop("seconds"))
        with phases("files"):
            old_out = _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old_out is not None:
        with phases("cleanup"):
            shutil.rmtree(old_out) if old_out.is_dir() else old_out.unlink()
    params = lambda shapes: sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())  # noqa: E731
    return {"source": str(src), "output": str(out), "tensors": len(new), "tensors_cut": len(plan),
            "shards": len(shards), "bytes_before": ckpt.nbytes(), "bytes_after": tensor_bytes,
            "file_bytes": total, "params_before": params(old), "params_after": params(new),
            "config_changes": {k: list(v) for k, v in changes.items()}, "copied": copied,
            "largest_tensor_bytes": max(ckpt.nbytes(k) for k in old), "verification": checked,
            "seconds": round(time.time() - t0, 2)}
