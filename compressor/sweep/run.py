"""Sparsity sweeps and knee detection: essential sparsity (RECIPES §2.3, §2.4).

A sweep prunes a model one-shot at every sparsity of a grid — each level starts again from the dense
weights (never cumulative) — and measures quality at each level. Patterns:

* ``omp-global`` (alias ``unstructured``, ``global``): one-shot magnitude, |w| ranked jointly over all
  prunable tensors, exactly round(p·N) weights removed (``exact_k``, §0.3). The essential-sparsity curve.
* ``omp-layerwise`` (``layerwise``): the same fraction p removed from every tensor separately.
* ``random`` (global random, same count) and ``random-erk`` (Erdős–Rényi-Kernel layer densities): baselines.
* ``N:M`` (e.g. ``2:4``): N smallest |w| of every M consecutive input weights removed (one point at N/M);
  ``N:4`` means {1:4, 2:4, 3:4}, ``N:8`` means {2:8, 4:8, 6:8}, ``nm`` both families.

Quality is always "higher is better" and in percent, so ``eps=1.0`` means one point:
accuracy on the test split for labelled data; mean cosine between the pruned and the dense sentence
embeddings on held-out sentences for text/embedding models; cosine to the dense model's outputs otherwise
(KL to the dense outputs is recorded next to it).

Knee detection (§2.4) reports two definitions plus the raw curve: the tolerance point
(:func:`essential_sparsity_tolerance`) and a Kneedle knee (:func:`knee`) cross-checked by the drop-rate
ratio (:func:`drop_rate_knee`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.atomic import atomic_path, write_text_atomic
from compressor.errors import InputError

DEFAULT_GRID: tuple[float, ...] = tuple(round(0.1 * i, 10) for i in range(10))  # 0.0 .. 0.9
NM_FAMILIES: dict[int, tuple[int, ...]] = {4: (1, 2, 3), 8: (2, 4, 6)}  # RECIPES §2.2 [CHOICE]
PATTERN_HELP = "unstructured (omp-global) | layerwise | random | random-erk | N:M e.g. 2:4 | N:4 | N:8 | nm"

__all__ = [
    "DEFAULT_GRID", "Pattern", "Evaluator", "parse_grid", "parse_patterns", "essential_sparsity_tolerance", "knee",
    "drop_rate_knee", "analyze_curve", "default_targets", "make_evaluator", "sweep", "run_sweep", "refine_points",
    "plot_sweep", "write_sweep", "check_outputs_free",
]


# ============================================================================================ knee detection


def _as_curve(curve) -> tuple[np.ndarray, np.ndarray]:
    """(p, metric) arrays sorted by p from: [(p, m), ...], {p: m}, or [{"target"/"sparsity": p, "metric": m}]."""
    if isinstance(curve, dict):
        pairs = list(curve.items())
    else:
        pairs = []
        for pt in curve:
            if isinstance(pt, dict):
                p = pt.get("target", pt.get("sparsity"))
                pairs.append((p, pt["metric"]))
            else:
                p, m = pt
                pairs.append((p, m))
    if not pairs:
        raise InputError("the sweep curve is empty", "sweep at least one sparsity level (the grid always includes 0.0)")
    x = np.array([float(p) for p, _ in pairs], dtype=np.float64)
    y = np.array([float(m) for _, m in pairs], dtype=np.float64)
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        raise InputError("the sweep curve has NaN or infinite values", "check the metric; a diverged model gives NaN outputs")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if np.any(np.diff(x) <= 0):
        raise InputError("the sweep curve has the same sparsity twice", "give each sparsity level once")
    return x, y


def essential_sparsity_tolerance(curve, eps: float = 1.0, relative: bool = False) -> float:
    """Largest sparsity p whose metric is within `eps` of the dense metric, with every smaller p within too.

    eps is in the metric's units (points, for a percent metric) or, with ``relative=True``, in percent of the
    dense metric. The dense metric is the value at p = 0, which the curve must contain (RECIPES §2.4).
    """
    x, y = _as_curve(curve)
    if eps < 0 or not math.isfinite(eps):
        raise InputError(f"eps must be a finite number >= 0, got {eps}", "e.g. eps=1.0 allows a one-point drop")
    if x[0] != 0.0:
        raise InputError("the curve has no dense point (sparsity 0.0)", "include 0.0 in the grid: the drop is measured from it")
    ref = y[0]
    drops = ref - y
    if relative:
        drops = 100.0 * drops / max(abs(ref), 1e-12)
    best = 0.0
    for p, d in zip(x, drops, strict=True):
        if d > eps + 1e-12:
            break
        best = float(p)
    return best


def _normalised(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    xr, yr = x[-1] - x[0], y.max() - y.min()
    if len(x) < 3 or xr <= 0 or yr <= 1e-12 * max(1.0, abs(y).max()):
        return None
    return (x - x[0]) / xr, (y - y.min()) / yr


def knee(curve, min_gap: float = 1e-3) -> float | None:
    """Kneedle knee of a metric-vs-sparsity curve (RECIPES §2.4).

    x = sparsity and y = metric are scaled to [0, 1]; the knee is the grid point where the curve lies furthest
    above the straight line from the first to the last point — the corner of a "flat, then falling" curve,
    i.e. the last sparsity before the sharp drop. None when there is no such corner: fewer than 3 points, a
    flat curve, or a curve that never rises above the chord by more than `min_gap` (a straight or convex one
    that drops from the start).
    """
    x, y = _as_curve(curve)
    norm = _normalised(x, y)
    if norm is None:
        return None
    xn, yn = norm
    chord = yn[0] + (yn[-1] - yn[0]) * xn
    diff = yn - chord
    i = int(np.argmax(diff))
    if diff[i] <= min_gap:
        return None
    return float(x[i])


def drop_rate_knee(curve, delta: float = 0.1) -> float | None:
    """Cross-check of :func:`knee`: the grid point p maximising (drop rate after p) / (drop rate before p).

    Rates are slopes of adjacent segments on the [0, 1]-normalised curve (drops only; rises count as 0),
    each regularised with `delta` so a flat segment does not divide by zero. None for fewer than 3 points or a
    flat curve, and when no point has a ratio above 1 + 1e-9 (nothing falls faster after than before).
    """
    x, y = _as_curve(curve)
    norm = _normalised(x, y)
    if norm is None:
        return None
    xn, yn = norm
    slopes = -np.diff(yn) / np.diff(xn)  # drop rate of each segment
    drops = np.clip(slopes, 0.0, None)
    ratios = (drops[1:] + delta) / (drops[:-1] + delta)  # at interior points 1..n-2
    i = int(np.argmax(ratios))
    if ratios[i] <= 1.0 + 1e-9:
        return None
    return float(x[i + 1])


def analyze_curve(curve, eps: float = 1.0, relative: bool = False) -> dict:
    """Both knee definitions plus the raw curve (RECIPES §2.4: always report both)."""
    x, y = _as_curve(curve)
    pts = list(zip(x.tolist(), y.tolist(), strict=True))
    tol = essential_sparsity_tolerance(pts, eps, relative) if x[0] == 0.0 else None
    kn, kr = knee(pts), drop_rate_knee(pts)
    steps = np.diff(x)
    step = float(steps.max()) if len(steps) else 0.0

    def at(p):
        return None if p is None else float(y[int(np.argmin(np.abs(x - p)))])

    return {
        "tolerance": tol,
        "knee": kn,
        "knee_drop_rate": kr,
        "knee_methods_agree": None if kn is None or kr is None else bool(abs(kn - kr) <= step + 1e-9),
        "metric_dense": float(y[0]) if x[0] == 0.0 else None,
        "metric_at_tolerance": at(tol),
        "metric_at_knee": at(kn),
        "eps": eps,
        "relative": relative,
        "curve": [[float(a), float(b)] for a, b in pts],
    }


# ============================================================================================ grid and patterns


def _check_level(p: float, where: str = "grid") -> float:
    p = float(p)
    if not math.isfinite(p) or not (0.0 <= p < 1.0):
        raise InputError(f"{where} value {p} is outside [0, 1)", "sparsities are fractions of weights removed, e.g. 0.5; 1.0 would remove everything")
    return round(p, 10)


def parse_grid(spec: str | Iterable[float] | None) -> list[float]:
    """Sparsity levels from "0:0.9:0.1" (start:stop:step, stop included), "0,0.3,0.5", or a list of floats.

    Every value must be in [0, 1). 0.0 (the dense reference) is always added. Sorted, duplicates dropped.
    """
    if spec is None:
        return list(DEFAULT_GRID)
    if isinstance(spec, str):
        s = spec.strip()
        if not s:
            raise InputError("the sparsity grid is empty", "e.g. --grid 0:0.9:0.1 or --grid 0,0.3,0.5,0.7")
        if ":" in s:
            parts = s.split(":")
            try:
                start, stop, step = (float(v) for v in parts) if len(parts) == 3 else (None, None, None)
            except ValueError:
                start = None
            if start is None:
                raise InputError(f"grid {spec!r} is not start:stop:step", "e.g. --grid 0:0.9:0.1")
            if not step > 0:
                raise InputError(f"grid step must be > 0, got {step}", "e.g. --grid 0:0.9:0.1")
            _check_level(start), _check_level(stop)
            if stop < start:
                raise InputError(f"grid {spec!r}: stop {stop} is below start {start}", "e.g. --grid 0:0.9:0.1")
            n = int(math.floor((stop - start) / step + 1e-9))
            values = [start + i * step for i in range(n + 1)]
        else:
            try:
                values = [float(v) for v in s.split(",") if v.strip()]
            except ValueError:
                raise InputError(f"grid {spec!r} is not a comma-separated list of numbers", "e.g. --grid 0,0.3,0.5,0.7") from None
    else:
        values = [float(v) for v in spec]
    if not values:
        raise InputError("the sparsity grid is empty", "e.g. --grid 0:0.9:0.1 or grid: [0.0, 0.5, 0.9]")
    levels = {_check_level(v) for v in values}
    levels.add(0.0)
    return sorted(levels)


@dataclass(frozen=True)
class Pattern:
    """One way to prune: kind "magnitude" (scope global|layerwise), "random" (scope global|erk) or "nm"."""

    kind: str
    scope: str = "global"
    n: int = 0
    m: int = 0

    @property
    def curve(self) -> str:
        if self.kind == "magnitude":
            return f"omp-{self.scope}"
        if self.kind == "random":
            return "random" if self.scope == "global" else f"random-{self.scope}"
        return f"N:{self.m}"

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.curve

    @property
    def on_grid(self) -> bool:
        return self.kind != "nm"


_ALIASES = {
    "unstructured": Pattern("magnitude", "global"), "global": Pattern("magnitude", "global"),
    "omp": Pattern("magnitude", "global"), "omp-global": Pattern("magnitude", "global"),
    "layerwise": Pattern("magnitude", "layerwise"), "omp-layerwise": Pattern("magnitude", "layerwise"),
    "random": Pattern("random", "global"), "random-global": Pattern("random", "global"),
    "erk": Pattern("random", "erk"), "random-erk": Pattern("random", "erk"),
}


def _nm(n: int, m: int, spec: str) -> Pattern:
    if m < 2 or n < 1 or n >= m:
        raise InputError(f"invalid N:M pattern {spec!r}: need 1 <= N < M", "N weights are removed from every group of M, e.g. 2:4 (50 %) or 4:8")
    return Pattern("nm", "", n, m)


def parse_patterns(specs: str | Iterable[str] | None) -> list[Pattern]:
    """Patterns from names (see module doc); a string may hold several, comma-separated. Order kept, no duplicates."""
    if specs is None:
        specs = ["unstructured"]
    if isinstance(specs, str):
        specs = [specs]
    out: list[Pattern] = []
    for raw in specs:
        if isinstance(raw, Pattern):
            if raw not in out:
                out.append(raw)
            continue
        for spec in (s.strip() for s in str(raw).split(",")):
            if not spec:
                continue
            key = spec.lower()
            if key in _ALIASES:
                new = [_ALIASES[key]]
            elif key == "nm":
                new = [_nm(n, m, f"{n}:{m}") for m, ns in NM_FAMILIES.items() for n in ns]
            elif ":" in key:
                a, _, b = key.partition(":")
                try:
                    m = int(b)
                except ValueError:
                    raise InputError(f"pattern {spec!r}: M must be an integer", f"patterns: {PATTERN_HELP}") from None
                if a == "n":
                    if m not in NM_FAMILIES:
                        raise InputError(f"pattern {spec!r}: no standard N:M family for M={m}", "use N:4 or N:8, or list patterns like 2:16")
                    new = [_nm(n, m, f"{n}:{m}") for n in NM_FAMILIES[m]]
                else:
                    try:
                        n = int(a)
                    except ValueError:
                        raise InputError(f"pattern {spec!r}: N must be an integer", f"patterns: {PATTERN_HELP}") from None
                    new = [_nm(n, m, spec)]
            else:
                raise InputError(f"unknown pruning pattern {spec!r}", f"patterns: {PATTERN_HELP}")
            out.extend(p for p in new if p not in out)
    if not out:
        raise InputError("no pruning pattern given", f"patterns: {PATTERN_HELP}")
    return out


# ============================================================================================ which tensors


def _block_list(model: nn.Module) -> str | None:
    """Name of the ModuleList holding the transformer blocks (most parameters, all children the same class)."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 1 and len({type(c) for c in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = name, n
    return best


def _output_layer(model: nn.Module, candidates: list[str], example) -> str | None:
    """Weight name of the prunable layer that runs last in a forward (the output layer)."""
    if not candidates:
        return None
    if example is not None:
        mods = dict(model.named_modules())
        order: list[str] = []
        handles = []
        for name in candidates:
            mname = name.rsplit(".", 1)[0] if "." in name else ""
            mod = mods.get(mname)
            if mod is not None:
                handles.append(mod.register_forward_hook(lambda _m, _i, _o, n=name: order.append(n)))
        try:
            with torch.no_grad():
                _forward(model, example)
        except Exception:  # noqa: BLE001 - fall back to registration order
            order = []
        finally:
            for h in handles:
                h.remove()
        if order:
            return order[-1]
    return candidates[-1]


def default_targets(model: nn.Module, kind: str = "torch", include: list[str] | None = None,
                    exclude: list[str] | None = None, example=None) -> tuple[dict[str, torch.Tensor], str]:
    """({weight name: parameter}, rule) of the tensors a sweep prunes.

    Hugging Face models: the Linear (and GPT-2 Conv1D) weights inside the transformer blocks — for BERT the
    Q, K, V, attention-output, intermediate and output dense of every layer; never embeddings, pooler,
    LayerNorms, biases or the task head (RECIPES §2.1). Other models: every Linear/Conv weight except the output
    layer (the one that runs last). `include` replaces the rule; `exclude` removes from it (glob patterns).
    """
    from compressor.masks import prunable_weights

    if include:
        return prunable_weights(model, include=include, exclude=exclude), f"include={include} exclude={exclude or []}"
    if kind == "hf":
        blocks = _block_list(model)
        if blocks:
            w = prunable_weights(model, include=[f"{blocks}.*"], exclude=exclude)
            return w, f"Linear weights inside the transformer blocks ({blocks}.*); embeddings, pooler, head, LayerNorms, biases stay dense"
    allw = prunable_weights(model)
    out_name = _output_layer(model, list(allw), example)
    ex = list(exclude or []) + ([out_name] if out_name and len(allw) > 1 else [])
    w = prunable_weights(model, exclude=ex or None)
    return w, f"all Linear/Conv weights except the output layer ({out_name})" + (f", exclude={exclude}" if exclude else "")


# ============================================================================================ evaluation


def _forward(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def _out_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputError(f"cannot read a tensor from the model output ({type(out).__name__})", "the model should return a tensor or logits")


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    dev = _device(model)
    model.eval()
    return torch.cat([_out_tensor(_forward(model, x[i : i + batch_size].to(dev))).float().cpu() for i in range(0, len(x), batch_size)])


def _agreement(out: torch.Tensor, ref: torch.Tensor) -> dict:
    from compressor.evaluate import output_agreement

    a = output_agreement(out, ref)
    return {"output_cosine": a["output_cosine"], "output_kl": a["output_kl"]}


@dataclass
class Evaluator:
    """Quality of a (pruned) model relative to the dense one. `fn(model)` returns {"metric": percent, ...}."""

    metric: str
    description: str
    dense: dict
    fn: Callable[[nn.Module], dict]
    n_samples: int = 0

    def __call__(self, model: nn.Module) -> dict:
        return self.fn(model)


def _embedding_evaluator(model, tokenizer, texts: list[str], batch_size: int) -> Evaluator:
    from compressor.hf import embed

    ref = embed(model, tokenizer, texts, batch_size)
    ref_nn = _nearest(ref)

    def fn(m):
        e = embed(m, tokenizer, texts, batch_size)
        cos = (e * ref).sum(1)
        return {"metric": 100.0 * float(cos.mean()), "embedding_cosine_min": float(cos.min()),
                "nn_agreement": 100.0 * float((_nearest(e) == ref_nn).float().mean())}

    dense = {"metric": 100.0, "embedding_cosine_min": 1.0, "nn_agreement": 100.0}
    return Evaluator("embedding_cosine_%", f"mean cosine (×100) between pruned and dense sentence embeddings on {len(texts)} held-out sentences",
                     dense, fn, len(texts))


def _nearest(e: torch.Tensor) -> torch.Tensor:
    """Index of each embedding's nearest other embedding (retrieval top-1)."""
    s = e @ e.T
    s.fill_diagonal_(-float("inf"))
    return s.argmax(1)


def _lm_evaluator(model, tokenizer, texts: list[str], batch_size: int, max_length: int = 64) -> Evaluator:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = [tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
               for i in range(0, len(texts), batch_size)]

    @torch.no_grad()
    def logits(m):
        dev = _device(m)
        m.eval()
        outs = []
        for enc in batches:
            lg = _out_tensor(m(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))).float().cpu()
            outs.append(lg[enc["attention_mask"].bool()])
        return torch.cat(outs)

    ref = logits(model)

    def fn(m):
        out = logits(m)
        a = _agreement(out, ref)
        return {"metric": 100.0 * a["output_cosine"], "output_kl": a["output_kl"],
                "top1_agreement": 100.0 * float((out.argmax(1) == ref.argmax(1)).float().mean())}

    return Evaluator("output_cosine_%", f"mean cosine (×100) of next-token logits to the dense model on {len(texts)} held-out texts",
                     {"metric": 100.0, "output_kl": 0.0, "top1_agreement": 100.0}, fn, len(texts))


def make_evaluator(model: nn.Module, *, kind: str = "torch", data=None, tokenizer=None, n_texts: int = 256,
                   batch_size: int = 32) -> Evaluator:
    """Pick the metric for this model and data (module doc) and measure the dense model once."""
    from compressor import evaluate as ev

    if data is not None and data.task == "classification" and data.test is not None:
        x, y = data.test.tensors[0], data.test.tensors[1]
        ref = _outputs(model, x)
        dense_acc = 100.0 * ev.accuracy(model, data.test)

        def fn(m):
            out = _outputs(m, x)
            return {"metric": 100.0 * float((out.argmax(1) == y).float().mean()), **_agreement(out, ref)}

        return Evaluator("accuracy_%", f"top-1 accuracy (%) on the {len(x)} test samples of {data.source or 'the data'}",
                         {"metric": dense_acc, "output_cosine": 1.0, "output_kl": 0.0}, fn, len(x))
    if kind == "hf" and tokenizer is not None:
        from compressor.hf import corpus_sentences

        texts = None
        if data is not None:
            texts = data.test_texts or data.texts
        source = "the data"
        if not texts:
            texts, source = corpus_sentences()[1::2], "the shipped corpus (odd lines)"
        texts = list(texts)[:n_texts]
        if len(texts) < 2:
            raise InputError(f"need at least 2 held-out sentences to measure quality, got {len(texts)}", "give a longer text file with --data text:PATH")
        cfg = getattr(model, "config", None)
        archs = getattr(cfg, "architectures", None) or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        ev_ = _lm_evaluator(model, tokenizer, texts, batch_size) if causal else _embedding_evaluator(model, tokenizer, texts, batch_size)
        ev_.description += f" from {source}"
        return ev_
    if data is not None and (data.test is not None or data.train is not None):
        x = (data.test or data.train).tensors[0]
        ref = _outputs(model, x)

        def fn(m):
            a = _agreement(_outputs(m, x), ref)
            return {"metric": 100.0 * a["output_cosine"], "output_kl": a["output_kl"]}

        return Evaluator("output_cosine_%", f"mean cosine (×100) of outputs to the dense model on {len(x)} inputs (KL alongside)",
                         {"metric": 100.0, "output_kl": 0.0}, fn, len(x))
    raise InputError("a sweep needs data to measure quality at each sparsity",
                     "pass --data (digits | npz:PATH | text:PATH for HF text models | random)")


# ============================================================================================ the sweep


def _masks_for(pattern: Pattern, dense: dict[str, torch.Tensor], p: float, seed: int, transposed: set[str]):
    from compressor.masks import magnitude_masks, nm_masks, random_masks

    if pattern.kind == "magnitude":
        return magnitude_masks(dense, p, scope=pattern.scope, convention="exact_k")
    if pattern.kind == "random":
        return random_masks(dense, p, scope=pattern.scope, seed=seed)
    return nm_masks(dense, pattern.n, pattern.m, transposed=transposed)


def _curve_names(patterns: Sequence[Pattern]) -> dict[Pattern, str]:
    """Curve of each pattern: grid patterns have their own; N:M patterns share one curve per M ("N:4"), named
    after the pattern itself ("2:4") when it is the only one with that M."""
    per_m: dict[int, int] = {}
    for p in patterns:
        if p.kind == "nm":
            per_m[p.m] = per_m.get(p.m, 0) + 1
    return {p: (p.label if p.kind == "nm" and per_m[p.m] == 1 else p.curve) for p in patterns}


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


def refine_points(grid: Sequence[float], center: float, step: float) -> list[float]:
    """Points at `step` spacing strictly between the grid neighbours of `center` that are not in the grid yet."""
    g = sorted(grid)
    i = g.index(center) if center in g else int(np.argmin(np.abs(np.array(g) - center)))
    lo = g[i - 1] if i > 0 else g[i]
    hi = g[i + 1] if i + 1 < len(g) else g[i]
    pts = []
    k = 1
    while lo + k * step < hi - 1e-9:
        v = round(lo + k * step, 10)
        if v not in g and 0.0 <= v < 1.0:
            pts.append(v)
        k += 1
    return pts


def run_sweep(model: nn.Module, evaluator: Evaluator, *, grid: Iterable[float] | str | None = None,
              patterns: Iterable[str] | str | Sequence[Pattern] | None = None, kind: str = "torch",
              include: list[str] | None = None, exclude: list[str] | None = None, example=None, seed: int = 0,
              refine: float | None = None, eps: float = 1.0, relative: bool = False, progress: bool = True,
              on_level: Callable[[dict], None] | None = None) -> dict:
    """Sweep `model` over `grid` × `patterns` with `evaluator`; returns the JSON-ready result.

    Works on a private copy: `model` is never modified. Every level restores the dense weights before pruning,
    so levels are independent (not cumulative). With `refine` (e.g. 0.05), points at that spacing are added
    between the grid neighbours of the first grid curve's knee (its tolerance point when it has no knee) and
    swept for every grid pattern.
    """
    from compressor.masks import sparsity_report, transposed_names

    t0 = time.perf_counter()
    grid, pats = parse_grid(grid), parse_patterns(patterns)
    if refine is not None and not (0.0 < refine < 1.0):
        raise InputError(f"refine step must be in (0, 1), got {refine}", "e.g. refine=0.05")
    eps = float(eps)
    if eps < 0 or not math.isfinite(eps):
        raise InputError(f"eps must be a finite number >= 0, got {eps}", "e.g. eps=1.0 allows a one-point drop")
    work = copy.deepcopy(model).eval()
    targets, rule = default_targets(work, kind, include, exclude, example)
    transposed = transposed_names(work, targets)
    dense = {k: w.detach().clone() for k, w in targets.items()}
    n_weights = sum(w.numel() for w in dense.values())
    curves: dict[str, list[dict]] = {}

    def run_jobs(jobs, bar=None, task=None):
        for pat, p, curve in jobs:
            if bar is not None:
                bar.update(task, description=f"{pat.label if curve == names[pat] else 'dense'} @ {p:.0%}")
            masks = _masks_for(pat, dense, p, seed, transposed)
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
            if bar is not None:
                bar.advance(task)

    names = _curve_names(pats)
    jobs = _level_jobs(pats, grid, names)
    bar = _progress_bar(progress, len(jobs))
    task = bar.add_task("sweep", total=len(jobs)) if bar is not None else None
    refined: list[float] = []
    try:
        run_jobs(jobs, bar, task)
        grid_pats = [p for p in pats if p.on_grid]
        if refine is not None and grid_pats:
            a = analyze_curve(curves[grid_pats[0].curve], eps, relative)
            center = a["knee"] if a["knee"] is not None else a["tolerance"]
            if center is not None:
                refined = refine_points(grid, center, refine)
            if refined:
                extra = _level_jobs(grid_pats, refined)
                if bar is not None:
                    bar.update(task, total=len(jobs) + len(extra))
                run_jobs(extra, bar, task)
                for c in {p.curve for p in grid_pats}:
                    curves[c].sort(key=lambda d: d["target"])
    finally:
        if bar is not None:
            bar.stop()
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


def _progress_bar(enabled: bool, total: int):
    if not enabled or total <= 1:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    bar.start()
    return bar


def sweep(model, data=None, *, tokenizer=None, kind: str | None = None, grid=None, patterns=None, eps: float = 1.0,
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
    if loaded.kind == "onnx":
        raise InputError("sweep prunes torch or Hugging Face models, not ONNX", "sweep the torch checkpoint (or HF folder) the ONNX came from")
    kind = kind or loaded.kind
    tok = tokenizer if tokenizer is not None else loaded.tokenizer
    bundle = data if isinstance(data, DataBundle) or data is None else load_data(data)
    ev_ = make_evaluator(loaded.module, kind=kind, data=bundle, tokenizer=tok, n_texts=n_texts)
    example = None
    if bundle is not None and (bundle.test is not None or bundle.train is not None):
        example = ((bundle.test or bundle.train).tensors[0][:2],)
    res = run_sweep(loaded.module, ev_, grid=grid_l, patterns=pats, kind=kind, include=include, exclude=exclude,
                    example=example, seed=seed, refine=refine, eps=eps, relative=relative, progress=progress)
    res["model"] = str(loaded.path) if loaded.path else type(loaded.module).__name__
    res["data"] = bundle.source if bundle is not None else "corpus"
    return res


# ============================================================================================ outputs


def check_outputs_free(out_dir: str | Path, overwrite: bool = False, names: Iterable[str] = ("sweep.json", "sweep.png")) -> None:
    """Refuse (before any work) to replace an existing result unless `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder", "give a folder for -o")
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        raise InputError(f"{out_dir} already holds {', '.join(existing)}", "choose another -o folder or pass --overwrite")


def plot_sweep(result: dict, path: str | Path, title: str | None = None) -> Path:
    """PNG: metric vs sparsity, one line per curve, knee (★) and tolerance point (○) marked. Written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    ax = fig.add_subplot()
    for i, (name, pts) in enumerate(result["curves"].items()):
        xs = [100 * p["target"] for p in pts]
        ys = [p["metric"] for p in pts]
        style = "--" if name.startswith("random") else (":" if ":" in name else "-")
        (line,) = ax.plot(xs, ys, style, marker="o", ms=3.5, lw=1.6, label=name, zorder=3 + (i == 0))
        a = result["analysis"].get(name, {})
        if a.get("knee") is not None:
            ax.plot([100 * a["knee"]], [a["metric_at_knee"]], ls="none", marker="*", ms=15, color=line.get_color(), mec="black", zorder=6,
                    label=f"knee {name}: {a['knee']:.0%}")
        if a.get("tolerance") is not None and name == next(iter(result["curves"])):
            ax.plot([100 * a["tolerance"]], [a["metric_at_tolerance"]], ls="none", marker="o", ms=11, mfc="none", mec="black", mew=1.5,
                    zorder=6, label=f"≤{result['eps']:g}{'%' if result.get('relative') else ' pt'} drop ({name}): {a['tolerance']:.0%}")
    dense = result["dense"]["metric"]
    thr = dense * (1 - result["eps"] / 100) if result.get("relative") else dense - result["eps"]
    ax.axhline(thr, color="grey", lw=0.8, ls="--", zorder=1)
    ax.set_xlabel("sparsity of the pruned tensors (%)")
    ax.set_ylabel(result["metric"].replace("_%", " (%)").replace("_", " "))
    model_name = Path(str(result.get("model", ""))).name
    ax.set_title(title or f"essential sparsity (one-shot, no retraining): {model_name}", fontsize=10)
    ys_all = [p["metric"] for pts in result["curves"].values() for p in pts]
    lo = min(ys_all)
    ax.set_ylim(max(lo - 0.05 * (dense - lo + 1e-9), lo - 5), dense + 0.08 * max(dense - lo, 1.0))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_sweep(result: dict, out_dir: str | Path, overwrite: bool = False, stem: str = "sweep") -> dict[str, str]:
    """Write `<stem>.json` and `<stem>.png` into out_dir atomically; refuses to replace them unless `overwrite`."""
    out_dir = Path(out_dir)
    check_outputs_free(out_dir, overwrite, (f"{stem}.json", f"{stem}.png"))
    out_dir.mkdir(parents=True, exist_ok=True)
    jp, pp = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    write_text_atomic(jp, json.dumps(result, indent=2) + "\n")
    plot_sweep(result, pp)
    return {"json": str(jp), "png": str(pp)}
