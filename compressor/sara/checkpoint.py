"""Compact SaRA adaptation files (safetensors) and loading them onto a base model.

Format (the paper's file, plus a fingerprint): tensor `values/<param>` holds the adapted weights at the *initial* mask
positions (boolean-mask gather order), `full/<param>` holds densely trained parameters (e.g. a new head);
metadata `sara` is JSON with the threshold θ and, per base parameter, its shape and a SHA-256 of its base
bytes. No indices are stored: loading recomputes M = |w_base| < θ from the base, which is only valid on the
exact same base weights, hence the fingerprints: any difference (shape, values, missing tensor) is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from compressor.errors import InputError
from compressor.sara.core import SaRAAdapter, Selection, fingerprint
from compressor.utils.atomic import atomic_path

FORMAT = "compressor.sara/1"


def save_adaptation(adapter: SaRAAdapter, path: str | Path) -> dict:
    """Write the adaptation of `adapter` (a SaRAAdapter, before or after training) to `path` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"values/{n}": v.cpu().contiguous() for n, v in adapter.adapted_initial_values().items()}
    named = dict(adapter.model.named_parameters())
    for n in adapter.selection.full:
        tensors[f"full/{n}"] = named[n].detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "threshold": repr(adapter.threshold),
        "base": {n: {"shape": list(s), "sha256": fp} for n, (s, fp) in adapter.base_fingerprints.items()},
        "counts": {n: int(d.initial_idx.numel()) for n, d in adapter.deltas.items()},
        "full": list(adapter.selection.full),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"sara": json.dumps(meta)})
    return {"path": str(path), "bytes": path.stat().st_size, "values": sum(int(c) for c in meta["counts"].values())}


def read_adaptation(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"SaRA adaptation file not found: {path}", "give the .safetensors written by the sara stage")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("sara")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise InputError(f"cannot read {path} as safetensors ({type(e).__name__}: {e})", "give a file written by save_adaptation") from e
    if meta is None:
        raise InputError(f"{path} is not a SaRA adaptation (no 'sara' metadata)", "give a file written by save_adaptation")
    try:
        meta = json.loads(meta)
    except ValueError as e:
        raise InputError(f"{path}: the SaRA metadata is not valid JSON ({e})", "the file is corrupt or edited; re-save it with save_adaptation") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"{path}: unknown SaRA adaptation format {got!r}", f"this version reads {FORMAT}")
    _check_meta(meta, tensors, path)
    return meta, tensors


def _check_meta(meta: dict, tensors: dict, path: Path) -> None:
    """The metadata fields and tensors load_adaptation reads, with their types (a damaged or hand-edited file
    must be refused here, not fail later with a KeyError)."""
    def bad(what: str):
        return InputError(f"{path}: SaRA metadata {what}", "the file is corrupt or edited; re-save it with save_adaptation")

    for key, typ in (("base", dict), ("counts", dict), ("full", list)):
        if not isinstance(meta.get(key), typ):
            raise bad(f"field {key!r} is missing or not a {typ.__name__}")
    try:
        float(meta.get("threshold"))  # written as repr(float)
    except (TypeError, ValueError):
        raise bad(f"field 'threshold' is missing or not a number ({meta.get('threshold')!r:.40})") from None
    for n, info in meta["base"].items():
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("shape"), list)
                and all(isinstance(d, int) for d in info["shape"])):
            raise bad(f"'base' entry {n!r} needs 'shape' (list of ints) and 'sha256'")
    for n, c in meta["counts"].items():
        if n not in meta["base"] or not isinstance(c, int) or isinstance(c, bool):
            raise bad(f"'counts' entry {n!r} must be an integer for a parameter listed in 'base'")
        if f"values/{n}" not in tensors:
            raise bad(f"has no tensor 'values/{n}'")
    for n in meta["full"]:
        if not isinstance(n, str) or f"full/{n}" not in tensors:
            raise bad(f"lists densely trained {n!r} without its tensor 'full/{n}'")


def check_base(model: nn.Module, meta: dict, path: str | Path = "adaptation") -> None:
    """Refuse a base model that is not the one the adaptation was trained from."""
    named = dict(model.named_parameters())
    for n, info in meta["base"].items():
        if n not in named:
            raise InputError(
                f"{path}: the base model has no parameter {n!r} (the adaptation was made for another architecture)",
                "load the adaptation onto the base checkpoint it was trained from",
            )
        p = named[n]
        if list(p.shape) != info["shape"]:
            raise InputError(
                f"{path}: parameter {n!r} has shape {list(p.shape)} in this base but {info['shape']} in the adaptation's base",
                "load the adaptation onto the base checkpoint it was trained from",
            )
    for n, info in meta["base"].items():
        p = named[n]
        if fingerprint(p) != info["sha256"]:
            raise InputError(
                f"{path}: parameter {n!r} differs from the base the adaptation was trained on (fingerprint mismatch), "
                "so the selected entries would not match",
                "load it onto the exact pre-trained base checkpoint (unmodified weights)",
            )


def load_adaptation(model: nn.Module, path: str | Path, *, attach: bool = False):
    """Apply a saved adaptation to `model` (the exact base it was trained from).

    attach=False: merge in place (ordinary parameters hold the adapted weights); returns the model.
    attach=True: return a SaRAAdapter on the model with the saved values (to continue training).
    """
    meta, tensors = read_adaptation(path)
    check_base(model, meta, path)
    threshold = float(meta["threshold"])
    named = dict(model.named_parameters())
    masks = {}
    for n, count in meta["counts"].items():
        m = named[n].detach().abs() < threshold
        if int(m.sum()) != count or tensors[f"values/{n}"].numel() != count:
            raise InputError(f"{path}: {n!r} selects {int(m.sum())} entries but the file holds {count}", "the file is corrupt or edited")
        masks[n] = m
    sel = Selection(threshold, masks, sum(named[n].numel() for n in meta["base"]), list(meta["full"]))
    with torch.no_grad():
        for n in meta["full"]:
            src = tensors[f"full/{n}"]
            if n not in named or named[n].shape != src.shape:
                raise InputError(f"{path}: densely trained parameter {n!r} does not fit this model", "load onto the matching base")
            named[n].copy_(src.to(named[n].dtype))
    adapter = SaRAAdapter(model, sel)
    with torch.no_grad():
        for n, d in adapter.deltas.items():
            d.values.copy_(tensors[f"values/{n}"].to(d.values.dtype))
    adapter.sync()
    if attach:
        return adapter
    return adapter.merge()
