"""Recipe method `sara`: fine-tune only the smallest-magnitude weights (SaRA, Hu et al. ICLR 2025; docs/sara.md).

The stage trains the selected entries through the shared loop (`compressor.train.train`) with the SaRA
optimizer (memory-efficient form, nuclear-norm penalty, progressive re-selection), saves the compact
adaptation (threshold + values + base fingerprints, safetensors) into the work dir and merges it into the
model's weights so later stages (export) see an ordinary model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compressor.errors import RecipeError
from compressor.methods import _memory as mem
from compressor.methods._params import TrainParams, WeightDecay, globs
from compressor.recipe import StageContext, register_method
from compressor.sara import SaRAOptimizer, save_adaptation, select, state_bytes


class SaRAParams(TrainParams):
    threshold: float | None = Field(None, gt=0, description="train entries with |w| < threshold (reference: 2e-3)")
    fraction: float | None = Field(None, gt=0, lt=1, description="or: train this fraction of smallest-|w| entries")
    lambda_rank: float = Field(5e-4, ge=0, description="nuclear-norm penalty weight (0 = off)")
    rank_min_dim: int = Field(64, ge=0, description="penalise 2-D weights with min(rows, cols) > this")
    penalize: Literal["values", "update"] = "values"
    progressive: float | None = Field(0.5, gt=0, lt=1, description="re-select at this fraction of the run; null = never")
    reset_state: bool = True
    skip_step: bool = False
    epochs: float | None = Field(None, gt=0, description="passes over the training split (or give steps)")
    steps: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0, description="default 1e-3·exp(-350·threshold), the reference's")
    weight_decay: WeightDecay = 1e-2
    max_grad_norm: float | None = Field(1.0, gt=0)
    cosine: bool = True
    include: list[str] | None = globs("to consider (default: every parameter)")
    exclude: list[str] = globs("never to train", empty_list=True)
    full: list[str] = globs("trained densely instead (e.g. a new head)", empty_list=True)
    full_lr: float | None = Field(None, gt=0)
    save: str | None = Field("sara_adapter.safetensors", description="adaptation file in the work dir; null = don't save")

    @model_validator(mode="after")
    def _one_of(self):
        if self.threshold is not None and self.fraction is not None:
            raise ValueError("give threshold or fraction, not both")
        if self.threshold is None and self.fraction is None:
            self.threshold = 2e-3
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.steps is None and self.epochs is None:
            self.epochs = 5.0
        return self


@register_method("sara", SaRAParams, help="SaRA: fine-tune only the smallest-|w| weights (sparse, low-rank penalty)", kinds=("torch",),
                 needs_labels="train", fp32=True, memory_needed=lambda fp, p: mem.model_copy(fp) + mem.training(fp, "adam") // 2)
def run_sara(ctx: StageContext, p: SaRAParams) -> dict:
    import math
    import time

    from compressor.eval import accuracy
    from compressor.train import barrier, is_writer, train, training_device

    data = ctx.data
    if data is None or getattr(data, "train", None) is None or data.task != "classification":
        raise RecipeError(
            "the sara stage fine-tunes on labelled data and got none",
            "pass classification data, e.g. --data digits or --data npz:PATH with x and y",
        )
    model = ctx.model
    before = accuracy(model, data.test) if data.test is not None else None
    # the adapter and optimizer are built where the model trains, so their tensors sit next to the parameters
    model.to(training_device(model, ctx.device))
    sel = select(model, threshold=p.threshold, fraction=p.fraction, include=p.include, exclude=p.exclude, full=p.full)
    ipe = math.ceil(len(data.train) / p.batch_size)
    steps = p.steps if p.steps is not None else int(round(p.epochs * ipe))
    opt = SaRAOptimizer(
        model, selection=sel, lr=p.lr, weight_decay=p.weight_decay, lambda_rank=p.lambda_rank,
        rank_min_dim=p.rank_min_dim, penalize=p.penalize,
        progressive_step=int(round(p.progressive * steps)) if p.progressive is not None else None,
        reset_state=p.reset_state, skip_step=p.skip_step, max_grad_norm=p.max_grad_norm, full_lr=p.full_lr, seed=ctx.seed,
    )
    trainable = opt.adapter.trainable_count()
    t0 = time.perf_counter()
    out = train(model, data.train, steps=steps, batch_size=p.batch_size, lr=opt.defaults["lr"], optimizer=opt,
                cosine=p.cosine, seed=ctx.seed, description="sara")
    result = {
        **{k: v for k, v in sel.summary().items() if k != "per_param"},
        "trainable": trainable,
        "lr": opt.defaults["lr"],
        "steps": out["steps"],
        "final_loss": out["final_loss"],
        "rank_params": opt.rank_names,
        "reselected": opt.reselected,
        "trainable_after_reselection": sum(v.numel() for v in opt.adapter.values()),
        "grad_and_optimizer_bytes": state_bytes(opt),
        "train_seconds": time.perf_counter() - t0,
    }
    if p.save:
        path = ctx.workdir / p.save
        if is_writer():  # under torchrun every rank holds the same adaptation; rank 0 writes it
            info = save_adaptation(opt.adapter, path)
            result["adaptation"] = info["path"]
            result["adaptation_bytes"] = info["bytes"]
        barrier()
        ctx.artifacts["sara_adaptation"] = path
    opt.adapter.merge()
    model.cpu().eval()
    result["accuracy_before"] = before
    result["accuracy_after"] = accuracy(model, data.test) if data.test is not None else None
    return result
