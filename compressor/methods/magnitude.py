"""`magnitude` stage: one-shot magnitude pruning, unstructured (global or layer-wise) or N:M (2:4, 4:8).

The masks stay applied as parametrizations (``compressor.masks.apply_masks``), so a later training stage
(finetune, gradual) keeps pruned weights at exactly zero; export stages bake them into plain zeros.
Re-running on an already-masked model only prunes further (pruned weights stay pruned).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from compressor import masks as M
from compressor.errors import RecipeError
from compressor.methods import _memory as mem
from compressor.methods._params import globs
from compressor.recipe import StageContext, register_method


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "2:4" -> (2, 4) (N removed out of every M). ValueError on anything else."""
    p = str(pattern).strip().lower()
    if p in ("unstructured", "", "none"):
        return None
    try:
        n_str, m_str = p.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {pattern!r}") from None
    if not (1 <= n < m):
        raise ValueError(f"N:M pattern {pattern!r} needs 1 <= N < M (N weights removed in every group of M)")
    return n, m


class MagnitudeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of the selected weights to remove (unstructured)")
    scope: Literal["global", "layerwise"] = Field("global", description="rank |w| across all layers or inside each")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (N smallest removed per M consecutive inputs)")
    convention: Literal["exact_k", "strict_above"] = Field("exact_k", description="exact_k removes round(s·N); strict_above is open_lth's rule")
    include: list[str] | None = globs("to prune (default: every Conv2d/Linear)")
    exclude: list[str] | None = globs("to keep dense, e.g. ['fc'] for the output layer")
    on_indivisible: Literal["error", "skip"] = Field(
        "error", description="N:M only: a layer whose input dim is not a multiple of M raises, or stays dense (skip)")

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, v: str) -> str:
        parse_pattern(v)
        return v


def prune(model: nn.Module, sparsity: float = 0.5, *, scope: str = "global", pattern: str = "unstructured",
          convention: str = "exact_k", include: list[str] | None = None, exclude: list[str] | None = None,
          on_indivisible: str = "error") -> dict:
    """Magnitude-prune `model` in place (masks applied as parametrizations); returns the sparsity report
    (both denominators, see compressor.masks.sparsity_report) plus "pattern", "tensors" and "skipped"."""
    weights = M.prunable_weights(model, include, exclude)
    current = {k: v for k, v in M.current_masks(model).items() if k in weights}
    nm = parse_pattern(pattern)
    skipped: list[str] = []
    if nm is None:
        masks = M.magnitude_masks(weights, sparsity, scope=scope, convention=convention, current=current or None)
    else:
        transposed = M.transposed_names(model, weights)
        if on_indivisible == "skip":
            def in_dim(k):
                w = weights[k]
                return w.shape[0] if k in transposed else w[0].numel()

            skipped = [k for k in weights if in_dim(k) % nm[1]]
            weights = {k: v for k, v in weights.items() if k not in skipped}
            if not weights:
                raise RecipeError(f"no selected layer has an input dim divisible by M={nm[1]}", "pick another N:M pattern")
        masks = M.nm_masks(weights, nm[0], nm[1], transposed=transposed)
        masks = {k: v & current[k] if k in current else v for k, v in masks.items()}
    M.apply_masks(model, masks)
    rep = M.sparsity_report(model)
    rep["pattern"] = pattern if nm else "unstructured"
    rep["tensors"] = len(masks)
    rep["skipped"] = skipped
    return rep


def _memory(fp, p) -> int:
    """Masks, and the ranking of every weight at once (global) or of one tensor at a time (layer-wise / N:M)."""
    return mem.ranking(fp, p.scope if p.pattern == "unstructured" else "layerwise")


@register_method("magnitude", MagnitudeParams, help="one-shot magnitude pruning (global/layer-wise unstructured, or N:M)",
                 kinds=("torch", "hf"), memory_needed=_memory)
def run_magnitude(ctx: StageContext, p: MagnitudeParams) -> dict:
    acc = _accuracy_fn(ctx)
    before = acc()
    rep = prune(ctx.model, p.sparsity, scope=p.scope, pattern=p.pattern, convention=p.convention,
                include=p.include, exclude=p.exclude, on_indivisible=p.on_indivisible)
    out = {k: rep[k] for k in ("sparsity_masked", "sparsity_all_params", "pattern", "tensors", "skipped", "per_tensor")}
    if before is not None:
        out["accuracy_before"] = before
        out["accuracy_after"] = acc()
    return out


def _accuracy_fn(ctx: StageContext):
    """A zero-argument test-accuracy function when the stage has labelled test data, else one returning None."""
    data = ctx.data
    if data is None or getattr(data, "task", None) != "classification" or data.test is None or not ctx.current_model().trains_on_tensors:
        return lambda: None
    from compressor.eval import accuracy

    return lambda: accuracy(ctx.model, data.test)
