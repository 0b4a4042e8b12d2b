"""`essential_sparsity` stage: one-shot magnitude sweep of the (pre-trained) model without retraining, knee
detection, and optionally leave the model pruned at the chosen level (Jaiswal et al., NeurIPS 2023;
docs/essential.md). The sweep itself lives in :mod:`compressor.sweep` (shared with `compress sweep`).

Writes `sweep.json` and `sweep.png` into the stage's output folder. With ``apply: knee`` (or ``tolerance``)
the model keeps a fixed mask (OMP with the chosen `scope`, from the dense weights) at that sparsity, enforced
by :func:`compressor.masks.apply_masks`, so a later fine-tuning stage keeps pruned weights at zero (as the paper does).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compressor.errors import CompressorError, RecipeError
from compressor.methods import _memory as mem
from compressor.methods._params import globs
from compressor.recipe import StageContext, register_method


class EssentialParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grid: list[float] | str = Field("0:0.9:0.1", description="sparsity levels: a list, or 'start:stop:step' (0.0 always added)")
    refine: float | None = Field(0.05, description="extra levels at this spacing next to the knee (null: none)")
    scope: Literal["global", "layerwise"] = Field("global", description="OMP scope of the main curve (and of the applied mask)")
    patterns: list[str] = Field(default_factory=list, description="extra curves: layerwise, random, random-erk, 2:4, N:4, N:8, nm")
    eps: float = Field(1.0, ge=0.0, description="tolerated drop for the tolerance point (metric points, or % with relative)")
    relative: bool = Field(False, description="eps in percent of the dense metric instead of absolute points")
    apply: Literal["knee", "tolerance"] | None = Field(None, description="leave the model pruned at this level (null: measure only)")
    include: list[str] | None = globs("to prune (default: Linear weights inside the transformer blocks)")
    exclude: list[str] | None = globs("to keep dense")
    n_texts: int | None = Field(None, ge=2, description="held-out sentences for text models (default: 256, in inverse proportion "
                                "to the size over 200 M parameters: 40 at 1.1 B, each level is a forward pass over all of them)")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v):
        from compressor.sweep import parse_grid

        try:
            return parse_grid(v)
        except CompressorError as e:
            raise ValueError(str(e)) from None

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v):
        from compressor.sweep import parse_patterns

        if v:
            try:
                parse_patterns(v)
            except CompressorError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("refine")
    @classmethod
    def _refine(cls, v):
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError("refine must be in (0, 1), e.g. 0.05, or null")
        return v


@register_method("essential_sparsity", EssentialParams, kinds=("torch", "hf"),
                 # the dense weights the sweep restores from, and one level's masks at a time
                 memory_needed=lambda fp, p: mem.model_copy(fp) + mem.ranking(fp, p.scope),
                 help="essential sparsity: one-shot magnitude sweep without retraining, knee, optional prune at the knee")
def run_essential(ctx: StageContext, p: EssentialParams) -> dict:
    from compressor.eval.measure import text_count
    from compressor.masks import apply_masks, magnitude_masks, sparsity_report
    from compressor.sweep import default_targets, make_evaluator, parse_patterns, run_sweep, write_sweep

    if ctx.model is None:
        raise RecipeError("essential_sparsity needs a torch or Hugging Face model", "run it on a torch checkpoint or HF folder, not ONNX")
    main = "unstructured" if p.scope == "global" else "layerwise"
    patterns = parse_patterns([main, *p.patterns])
    n_texts = p.n_texts or text_count(sum(t.numel() for t in ctx.model.parameters()), base=256)
    evaluator = make_evaluator(ctx.model, data=ctx.data, tokenizer=ctx.tokenizer, n_texts=n_texts)
    example = ctx.example_inputs if isinstance(ctx.example_inputs, tuple) else None
    result = run_sweep(ctx.model, evaluator, grid=p.grid, patterns=patterns, text_model=ctx.current_model().text_input, include=p.include,
                       exclude=p.exclude, example=example, seed=ctx.seed, refine=p.refine, eps=p.eps, relative=p.relative,
                       inplace=True)  # the working model itself, its weights restored after the sweep
    result["model"] = type(ctx.model).__name__
    result["data"] = getattr(ctx.data, "source", None) or ("corpus" if ctx.tokenizer is not None else None)
    files = write_sweep(result, ctx.workdir, overwrite=True)  # the stage owns its output folder (api checks it)
    ctx.artifacts.update({"sweep_json": files["json"], "sweep_png": files["png"]})
    main_curve = patterns[0].curve
    a = result["analysis"][main_curve]
    out = {"metric": result["metric"], "dense": result["dense"]["metric"], "curve": main_curve,
           "knee": a["knee"], "knee_drop_rate": a["knee_drop_rate"], "tolerance": a["tolerance"],
           "analysis": result["analysis"], "files": files, "seconds": result["seconds"]}
    if p.apply is not None:
        level, chosen = a[p.apply], p.apply
        if level is None:  # no corner on a flat/convex curve: fall back to the tolerance point
            level, chosen = a["tolerance"], "tolerance"
        targets, _ = default_targets(ctx.model, ctx.current_model().text_input, p.include, p.exclude, example)
        masks = magnitude_masks(targets, level, scope=p.scope, convention="exact_k")
        apply_masks(ctx.model, masks)
        rep = sparsity_report(ctx.model, masks)
        out.update({"applied": chosen, "applied_sparsity": level, "sparsity_masked": rep["sparsity_masked"],
                    "sparsity_all_params": rep["sparsity_all_params"],
                    "metric_at_applied": next(pt["metric"] for pt in result["curves"][main_curve] if pt["target"] == level)})
    return out
