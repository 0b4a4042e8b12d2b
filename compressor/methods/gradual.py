"""`gradual` stage: gradual magnitude pruning during training (Zhu & Gupta 2017; docs/gradual.md).

Sparsity follows the cubic schedule s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(nΔt))³, updated every Δt steps
from t₀ to t₀ + nΔt (n + 1 mask updates), then training continues at s_f to recover. Masks are monotone (once
pruned, stays pruned), ranked on the masked weights, per layer by default (the TF reference) or globally.
Training goes through the shared loop (`compressor.train.train`); the mask update runs in its `after_step`
hook and also zeroes the optimizer state of newly pruned weights, so stored weights stay exactly zero.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from compressor import masks as M
from compressor.errors import RecipeError
from compressor.methods import _memory as mem
from compressor.methods._params import CosineOrConstant, Epochs, SGDParams, globs
from compressor.recipe import StageContext, register_method


def cubic_sparsity(step: int, final: float, initial: float = 0.0, begin: int = 0, frequency: int = 1, n: int = 1) -> float:
    """Zhu & Gupta target sparsity after `step` training steps: s_i before t₀; held between the update points
    t₀ + jΔt; s_f from t₀ + nΔt on."""
    if step < begin:
        return initial
    j = min((step - begin) // frequency, n)
    frac = j * frequency / (n * frequency)
    return final + (initial - final) * (1.0 - frac) ** 3


class GradualPruner:
    """The `after_step` hook: after optimizer step number t (= step + 1 steps done) at an update point, prune
    to cubic_sparsity(t) and re-apply masks. `history` records (t, target, achieved)."""

    def __init__(self, weights_fn, final: float, initial: float, begin: int, frequency: int, n: int,
                 scope: str = "layerwise", optimizer=None):
        self.weights_fn, self.final, self.initial = weights_fn, final, initial
        self.begin, self.frequency, self.n, self.scope = begin, frequency, n, scope
        self.optimizer = optimizer
        self.history: list[tuple[int, float, float]] = []

    def update_points(self) -> list[int]:
        return [self.begin + j * self.frequency for j in range(self.n + 1)]

    def prune_to(self, model: nn.Module, target: float, t: int) -> None:
        weights = self.weights_fn(model)
        current = {k: v for k, v in M.current_masks(model).items() if k in weights}
        masks = M.magnitude_masks(weights, target, scope=self.scope, current=current or None)
        M.apply_masks(model, masks)
        if self.optimizer is not None:
            M.mask_optimizer_state(self.optimizer, model)
        self.history.append((t, target, 1.0 - M.mask_density(masks)))

    def __call__(self, model: nn.Module, step: int) -> None:
        t = step + 1
        if t < self.begin or (t - self.begin) % self.frequency or (t - self.begin) // self.frequency > self.n:
            return
        target = cubic_sparsity(t, self.final, self.initial, self.begin, self.frequency, self.n)
        if target > 0:
            self.prune_to(model, target, t)


def gradual_prune(model: nn.Module, dataset, final_sparsity: float, *, initial_sparsity: float = 0.0,
                  epochs: float | None = None, steps: int | None = None, begin_fraction: float = 0.0,
                  end_fraction: float = 0.7, frequency: int = 10, scope: str = "layerwise",
                  include: list[str] | None = None, exclude: list[str] | None = None, batch_size: int = 64,
                  lr: float = 0.01, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
                  cosine: bool = True, seed: int = 0, device=None, progress: bool = True) -> dict:
    """Train `model` in place while pruning it gradually to `final_sparsity`; masks stay applied.

    begin/end fractions place t₀ and t₀ + nΔt inside the run; n = max(1, round((end − begin) / frequency)).
    Returns {"schedule": [[t, target, achieved], ...], "steps", "final_loss", "sparsity_masked", ...}.
    """
    from compressor.device import module_device
    from compressor.train import ddp_context, make_optimizer, train, training_device

    M.check_sparsity(final_sparsity, "final_sparsity")
    M.check_sparsity(initial_sparsity, "initial_sparsity")
    if initial_sparsity > final_sparsity:
        raise RecipeError(f"initial_sparsity {initial_sparsity} is above final_sparsity {final_sparsity}", "gradual pruning only adds zeros")
    if not 0.0 <= begin_fraction < end_fraction <= 1.0:
        raise RecipeError(f"need 0 <= begin_fraction < end_fraction <= 1, got {begin_fraction}, {end_fraction}",
                          "e.g. begin_fraction 0.0, end_fraction 0.7 leaves the last 30 % of training to recover")
    names = list(M.prunable_weights(model, include, exclude))  # validates the patterns before training
    caller_device = module_device(model)
    dev = training_device(model, device)

    def weights_fn(mod):
        w = M.prunable_weights(mod, include, exclude)
        return {k: w[k] for k in names}

    if steps is None:
        if epochs is None:
            raise RecipeError("gradual pruning needs a training length", "give epochs or steps")
        _, world = ddp_context(dev)
        steps = int(round(epochs * math.ceil(len(dataset) / (batch_size * world))))
    begin = int(round(begin_fraction * steps))
    end = int(round(end_fraction * steps))
    frequency = max(1, min(int(frequency), max(1, end - begin)))
    n = max(1, round((end - begin) / frequency))
    model.to(dev)  # the optimizer is built where the parameters train
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, lr, momentum, weight_decay)
    pruner = GradualPruner(weights_fn, final_sparsity, initial_sparsity, begin, frequency, n, scope, opt)
    if begin == 0 and initial_sparsity > 0:
        pruner.prune_to(model, initial_sparsity, 0)
    info = train(model, dataset, steps=steps, batch_size=batch_size, optimizer=opt, cosine=cosine, seed=seed,
                 device=dev, after_step=pruner, progress=progress, description="gradual pruning")
    model.to(caller_device)  # results on the caller's device
    rep = M.sparsity_report(model)
    return {"schedule": [list(h) for h in pruner.history], "begin_step": begin, "frequency": frequency, "n_updates": n,
            "steps": info["steps"], "final_loss": info["final_loss"],
            **{k: rep[k] for k in ("sparsity_masked", "sparsity_all_params", "per_tensor")}}


class GradualParams(SGDParams):
    schedule: CosineOrConstant = "cosine"
    final_sparsity: float = Field(0.8, ge=0.0, lt=1.0, description="s_f, reached at end_fraction of training")
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="s_i, applied at begin_fraction")
    epochs: Epochs = Field(20.0, description="total training length (pruning + recovery)")
    begin_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="t₀ as a fraction of training")
    end_fraction: float = Field(0.7, gt=0.0, le=1.0, description="t₀ + nΔt as a fraction of training")
    frequency: int = Field(10, ge=1, description="Δt: steps between mask updates")
    scope: Literal["layerwise", "global"] = "layerwise"
    include: list[str] | None = globs("to prune (default: every Conv2d/Linear)")
    exclude: list[str] | None = globs("to keep dense")

    @model_validator(mode="after")
    def _order(self):
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError("initial_sparsity must not exceed final_sparsity")
        if self.begin_fraction >= self.end_fraction:
            raise ValueError("begin_fraction must be below end_fraction")
        return self


@register_method("gradual", GradualParams, help="gradual magnitude pruning during training (Zhu & Gupta cubic schedule)",
                 kinds=("torch",), needs_labels="train", fp32=True,
                 memory_needed=lambda fp, p: mem.training(fp, p.optimizer, p.momentum) + mem.ranking(fp, p.scope))
def run_gradual(ctx: StageContext, p: GradualParams) -> dict:
    from compressor.methods.magnitude import _accuracy_fn

    data = ctx.data
    if data is None or data.task != "classification" or data.train is None:
        raise RecipeError("the gradual stage trains, so it needs labelled data", "pass --data digits or --data npz:FILE with x and y")
    acc = _accuracy_fn(ctx)
    before = acc()
    out = gradual_prune(ctx.model, data.train, p.final_sparsity, initial_sparsity=p.initial_sparsity, epochs=p.epochs,
                        begin_fraction=p.begin_fraction, end_fraction=p.end_fraction, frequency=p.frequency,
                        scope=p.scope, include=p.include, exclude=p.exclude, batch_size=p.batch_size, lr=p.lr,
                        optimizer=p.optimizer, momentum=p.momentum, weight_decay=p.weight_decay,
                        cosine=p.schedule == "cosine", seed=ctx.seed, device=ctx.device)
    ctx.model.cpu().eval()
    out["accuracy_before"], out["accuracy_after"] = before, acc()
    return out
