"""The sweep itself: every pattern at every sparsity of the grid, each level pruned one-shot from the dense
weights (never cumulative) and scored by an :class:`~compressor.sweep.evaluators.Evaluator`."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from compressor.errors import InputError
from compressor.sweep.evaluators import Evaluator, make_evaluator
from compressor.sweep.grid import Pattern, parse_grid, parse_patterns, refine_points
from compressor.sweep.knee import analyze_curve
from compressor.sweep.targets import default_targets
from compressor.utils import progress as bars
from compressor.utils.memory import Footprint, available_bytes, fmt_bytes, footprint


def _curve_names(patterns: Sequence[Pattern]) -> dict[Pattern, str]:
    """Curve of each pattern: grid patterns have their own; N:M patterns share one curve per M ("N:4"), named
    after the pattern itself ("2:4") when it is the only one with that M."""
    per_m: dict[int, int] = {}
    for p in patterns:
        if not p.on_grid:
            per_m[p.m] = per_m.get(p.m, 0) + 1
    return {p: (p.label if not p.on_grid and per_m[p.m] == 1 else p.curve) for p in patterns}


def _level_jobs(patterns: Sequence[Pattern], grid: Sequence[float],
                names: dict[Pattern, str] | None = None) -> list[tuple[Pattern, float, str]]:
    """(pattern, sparsity, curve) jobs. Each N:M curve also gets its dense point (a magnitude mask at 0.0, i.e.
    nothing removed, measured through the same path as every other level)."""
    names = names or _curve_names(patterns)
    jobs = []
    for pat in patterns:
        if pat.on_grid:
            jobs.extend((pat, p, names[pat]) for p in grid)
        else:
            if not any(c == names[pat] for _, _, c in jobs):
                jobs.append((Pattern("magnitude", "global"), 0.0, names[pat]))
            jobs.append((pat, pat.n / pat.m, names[pat]))
    return jobs


def sweep_bytes(fp: Footprint) -> int:
    """Memory a sweep needs beside the loaded model (upper bound: every weight pruned): the dense copy of the pruned
    tensors it restores every level from (at most the model: 1 x its bytes), each level's boolean masks (1 B per
    weight) and the magnitude ranking's scratch for the largest tensor (compressor.masks.RANK_BYTES_PER_WEIGHT)."""
    from compressor.masks import RANK_BYTES_PER_WEIGHT

    return fp.param_bytes + fp.n_params + RANK_BYTES_PER_WEIGHT * (fp.largest_bytes // 4)


def check_sweep_fits(fp: Footprint, device=None, held: int = 0) -> None:
    """Refuse in one line a sweep that cannot fit: :func:`sweep_bytes` plus `held` (a model still to load, or
    the private copy of a caller's model)."""
    need = sweep_bytes(fp) + held
    free = available_bytes(device)
    if need > free:
        raise InputError(f"the sweep would need about {fmt_bytes(need)} of memory for a {fmt_bytes(fp.param_bytes)} model "
                         f"(the model, a copy of the pruned weights, one level's masks), and {fmt_bytes(free)} is available",
                         "free memory, sweep a bf16 checkpoint, or prune fewer tensors (--include / --exclude)")


def run_sweep(model: nn.Module, evaluator: Evaluator, *, grid: Iterable[float] | str | None = None,
              patterns: Iterable[str] | str | Sequence[Pattern] | None = None, text_model: bool = False,
              include: list[str] | None = None, exclude: list[str] | None = None, example=None, seed: int = 0,
              refine: float | None = None, eps: float = 1.0, relative: bool = False, progress: bool = True,
              on_level: Callable[[dict], None] | None = None, inplace: bool = False) -> dict:
    """Sweep `model` over `grid` × `patterns` with `evaluator`; returns the JSON-ready result.

    Works on a private copy: `model` is never modified; with `inplace` (a model the caller owns) it works on
    `model` itself and puts its weights back at the end, so the sweep holds one model plus a copy of the pruned
    tensors, not two models. Every level restores the dense weights before pruning,
    so levels are independent (not cumulative). With `refine` (e.g. 0.05), points at that spacing are added
    between the grid neighbours of the first grid curve's knee (its tolerance point when it has no knee) and
    swept for every grid pattern. The pruned tensors are :func:`default_targets` (`text_model`: the transformer-blocks rule of a text model, else every layer but the output one, picks its
    rule); the output layer is found by a forward on `example`, by default the evaluator's own inputs.
    """
    from compressor.masks import sparsity_report, transposed_names

    t0 = time.perf_counter()
    grid, pats = parse_grid(grid), parse_patterns(patterns)
    if refine is not None and not (0.0 < refine < 1.0):
        raise InputError(f"refine step must be in (0, 1), got {refine}", "e.g. refine=0.05")
    eps = float(eps)
    if eps < 0 or not math.isfinite(eps):
        raise InputError(f"eps must be a finite number >= 0, got {eps}", "e.g. eps=1.0 allows a one-point drop")
    work = (model if inplace else copy.deepcopy(model)).eval()
    example = example if example is not None else evaluator.example
    targets, rule = default_targets(work, text_model, include, exclude, example)
    transposed = transposed_names(work, targets)
    dense = {k: w.detach().clone() for k, w in targets.items()}
    n_weights = sum(w.numel() for w in dense.values())
    curves: dict[str, list[dict]] = {}

    def run_jobs(jobs, bar):
        for pat, p, curve in jobs:
            bar.update(description=f"sweep {pat.label if curve == names.get(pat) else 'dense'} @ {p:.0%}")
            masks = pat.masks(dense, p, seed, transposed)
            with torch.no_grad():
                for k, w in targets.items():
                    w.copy_(dense[k])
                    w.masked_fill_(~masks[k].to(w.device), 0)
            rep = sparsity_report(work, masks)
            t = time.perf_counter()
            res = evaluator(work)
            point = {"pattern": pat.label if curve == names.get(pat) else "dense", "target": float(p),
                     "sparsity": rep["sparsity_masked"], "sparsity_all_params": rep["sparsity_all_params"],
                     "pruned": rep["pruned"], **res, "eval_seconds": time.perf_counter() - t}
            curves.setdefault(curve, []).append(point)
            if on_level is not None:
                on_level(point)
            bar.advance()

    names = _curve_names(pats)
    jobs = _level_jobs(pats, grid, names)
    refined: list[float] = []
    try:
        with bars.progress("sweep", total=len(jobs), show=progress and len(jobs) > 1) as bar:
            run_jobs(jobs, bar)
            grid_pats = [p for p in pats if p.on_grid]
            if refine is not None and grid_pats:
                a = analyze_curve(curves[grid_pats[0].curve], eps, relative)
                center = a["knee"] if a["knee"] is not None else a["tolerance"]
                if center is not None:
                    refined = refine_points(grid, center, refine)
                if refined:
                    extra = _level_jobs(grid_pats, refined)
                    bar.update(total=len(jobs) + len(extra))
                    run_jobs(extra, bar)
                    for c in {p.curve for p in grid_pats}:
                        curves[c].sort(key=lambda d: d["target"])
    finally:
        if inplace:  # the caller's model back as it came (dense weights, masks of an earlier stage untouched)
            with torch.no_grad():
                for k, w in targets.items():
                    w.copy_(dense[k])
    analysis = {c: analyze_curve(pts, eps, relative) for c, pts in curves.items()}
    for a in analysis.values():
        a.pop("curve")
    return {
        "metric": evaluator.metric,
        "metric_description": evaluator.description,
        "higher_is_better": True,
        "dense": evaluator.dense,
        "n_samples": evaluator.n_samples,
        "targets": {"rule": rule, "n_tensors": len(dense), "n_weights": n_weights, "names": list(dense)},
        "grid": grid,
        "refined": refined,
        "patterns": [p.label for p in pats],
        "seed": seed,
        "eps": eps,
        "relative": relative,
        "curves": curves,
        "analysis": analysis,
        "seconds": time.perf_counter() - t0,
    }


def sweep(model, data=None, *, tokenizer=None, grid=None, patterns=None, eps: float = 1.0,
          relative: bool = False, refine: float | None = None, include: list[str] | None = None,
          exclude: list[str] | None = None, n_texts: int = 256, seed: int = 0, progress: bool = True,
          arch: str | None = None, trust_pickle: bool = False) -> dict:
    """Essential-sparsity sweep of a model (path, nn.Module or LoadedModel) on data (spec string or DataBundle).

    Validates grid and patterns before any work. Returns the result dict that :func:`write_sweep` saves.
    """
    from compressor.io.data import DataBundle, load_data
    from compressor.io.models import load_model

    grid_l, pats = parse_grid(grid), parse_patterns(patterns)
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
    if loaded.module is None:  # an ONNX graph: nothing to mask
        raise InputError("sweep prunes torch or Hugging Face models, not ONNX", "sweep the torch checkpoint (or HF folder) the ONNX came from")
    fp = footprint(loaded.module)
    check_sweep_fits(fp, loaded.device, 0 if loaded.owned else fp.param_bytes)  # not ours: swept on a copy
    tok = tokenizer if tokenizer is not None else loaded.tokenizer
    bundle = data if isinstance(data, DataBundle) or data is None else load_data(data)
    ev_ = make_evaluator(loaded.module, data=bundle, tokenizer=tok, n_texts=n_texts)
    example = None
    if bundle is not None and (bundle.test is not None or bundle.train is not None):
        example = ((bundle.test or bundle.train).tensors[0][:2],)
    res = run_sweep(loaded.module, ev_, grid=grid_l, patterns=pats, text_model=loaded.text_input, include=include, exclude=exclude,
                    example=example, seed=seed, refine=refine, eps=eps, relative=relative, progress=progress,
                    inplace=loaded.owned)  # a model loaded here is ours: no second copy
    res["model"] = str(loaded.path) if loaded.path else type(loaded.module).__name__
    res["data"] = bundle.source if bundle is not None else "corpus"
    return res

