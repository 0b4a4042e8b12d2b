"""`imp_rewind` stage: iterative magnitude pruning with rewinding (lottery tickets; docs/lottery.md).

Algorithm (as in open_lth, the lottery-ticket authors' code; docs/lottery.md):
1. θ₀ (a fresh seeded init, or the given weights with ``init: given``); pre-train k steps → θ_k (saved).
2. Level 0: load θ_k, train steps k → T (fresh optimizer; LR schedule and data order positioned at k).
3. Level ℓ = 1..L: prune a fraction f of the *remaining* weights globally by |w| of the level's trained
   weights (M_ℓ ⊆ M_{ℓ−1}), then
   * ``weight`` rewinding: weights ← M_ℓ ⊙ θ_k, train k → T;
   * ``lr`` rewinding (Renda et al.): keep the trained weights M_ℓ ⊙ W_T, train k → T with the LR schedule
     rewound to k (k = 0 gives Renda's full-budget retraining);
   * ``finetune``: keep M_ℓ ⊙ W_T, train the same T − k steps at the schedule's final (constant) LR.
   Optionally the random re-initialisation control: the same M_ℓ on a fresh init θ₀', trained k → T.
4. The stage leaves the last level's trained, masked network in ``ctx.model``.

Every finished level is checkpointed under ``workdir/checkpoints/imp_rewind-stage<N>/`` (θ_k, masks, trained
weights, per-level report, recipe/params/model/data fingerprints). With ``resume`` a killed run continues after
the last finished level and ends bit-identical to an uninterrupted run on CPU; resuming with a different
recipe, model or data raises RecipeError and leaves the checkpoints untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compressor import masks as M
from compressor.errors import RecipeError
from compressor.methods import _memory as mem
from compressor.methods._params import Epochs, LearningRate, SGDParams, WeightDecay, globs
from compressor.recipe import StageContext, register_method
from compressor.utils.atomic import atomic_path, write_text_atomic

CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------------------------------------- schedules


def make_lr_lambda(schedule: str, total_steps: int, milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1,
                   warmup_steps: int = 0) -> Callable[[int], float]:
    """LR factor at step t over a run of `total_steps` (open_lth: γ^{#milestones ≤ t} × min(1, t / warmup))."""
    T = max(1, int(total_steps))
    ms = sorted(int(round(f * T)) for f in milestones)

    def lam(t: int) -> float:
        if schedule == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * min(t, T) / T))
        elif schedule == "step":
            f = gamma ** sum(1 for m in ms if m <= t)
        elif schedule == "constant":
            f = 1.0
        else:
            raise RecipeError(f"unknown LR schedule {schedule!r}", "use step, cosine or constant")
        if warmup_steps > 0:
            f *= min(1.0, t / warmup_steps)
        return f

    return lam


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Fresh default (PyTorch) init of every submodule that has reset_parameters, seeded; in place."""
    torch.manual_seed(seed)
    for mod in model.modules():
        if hasattr(mod, "reset_parameters") and callable(mod.reset_parameters):
            mod.reset_parameters()
    return model


# ---------------------------------------------------------------------------------------------- checkpoints


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _data_digest(dataset) -> str:
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        return f"len={len(dataset)}"
    return _digest({str(i): t for i, t in enumerate(tensors)})


class Checkpoints:
    """One folder per IMP run: meta.json, theta_k.pt, level_NNN.pt, levels.json (written on rank 0 only)."""

    def __init__(self, folder: Path | None, meta: dict, resume: bool, write: bool = True):
        self.folder, self.meta, self.write = folder, meta, write and folder is not None
        self.levels: list[dict] = []  # loaded level payloads on resume
        self.theta_k: dict | None = None
        if folder is None:
            return
        meta_path = folder / "meta.json"
        if resume and meta_path.is_file():
            old = json.loads(meta_path.read_text(encoding="utf-8"))
            diff = [k for k in meta if k != "info" and old.get(k) != meta[k]]
            if diff:
                raise RecipeError(
                    f"cannot resume: the checkpoints in {folder} come from a different {', '.join(diff)}",
                    "resume with the same recipe, model, data and seed, or write to a new output folder (nothing was overwritten)",
                )
            if (folder / "theta_k.pt").is_file():
                self.theta_k = torch.load(folder / "theta_k.pt", weights_only=True)
            i = 0
            while (folder / f"level_{i:03d}.pt").is_file():
                self.levels.append(torch.load(folder / f"level_{i:03d}.pt", weights_only=True))
                i += 1
        elif self.write:
            folder.mkdir(parents=True, exist_ok=True)
            for old in list(folder.glob("level_*.pt")) + [folder / "theta_k.pt", folder / "levels.json"]:
                old.unlink(missing_ok=True)  # a fresh (non-resumed) run replaces a previous run's checkpoints
            write_text_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True))

    def _save(self, name: str, obj) -> None:
        if not self.write:
            return
        with atomic_path(self.folder / name) as tmp:
            torch.save(obj, tmp)

    def save_theta_k(self, state: dict, step: int) -> None:
        self.theta_k = {"state": state, "step": step}
        self._save("theta_k.pt", self.theta_k)

    def save_level(self, i: int, payload: dict, reports: list[dict]) -> None:
        self._save(f"level_{i:03d}.pt", payload)
        if self.write:
            write_text_atomic(self.folder / "levels.json", json.dumps(reports, indent=2))


# ---------------------------------------------------------------------------------------------- algorithm


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in M.plain_state_dict(model).items()}


def _load_masked(model: nn.Module, state: dict, masks: dict | None) -> None:
    """Make `model` hold `state` (plain names) with `masks` enforced (or no masks)."""
    M.bake_masks(model)
    model.load_state_dict(state)
    if masks:
        M.apply_masks(model, masks)


def imp_rewind(model: nn.Module, data, *, levels: int = 8, fraction: float = 0.2, target_sparsity: float | None = None,
               rewind_steps: int | None = None, rewind_epochs: float = 1.0, variant: str = "weight",
               epochs: float = 20.0, batch_size: int = 64, lr: float = 0.05, optimizer: str = "sgd",
               momentum: float = 0.9, weight_decay: float = 1e-4, schedule: str = "step",
               milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1, warmup_epochs: float = 0.0,
               scope: str = "global", convention: str = "exact_k", include: list[str] | None = None,
               exclude: list[str] | None = None, init: str = "reset", random_reinit_control: bool = False,
               seed: int = 0, device=None, workdir: str | Path | None = None, resume: bool = False,
               recipe_hash: str = "", checkpoint_name: str = "imp_rewind", progress: bool = True,
               on_level: Callable[[int, dict], None] | None = None) -> dict:
    """Run IMP with rewinding on `model` (in place) with `data` (a classification DataBundle).

    Returns {"levels": [{"level", "density", "sparsity_masked", "sparsity_all_params", "accuracy",
    ["random_reinit_accuracy"]}, ...], "dense_accuracy", "rewind_step", "total_steps", ...}; afterwards `model`
    holds the last level's trained weights with its masks applied. `on_level(i, report)` runs after level i
    is checkpointed (tests use it to simulate a kill).
    """
    from compressor.device import module_device
    from compressor.eval import accuracy
    from compressor.train import barrier, ddp_context, train, training_device

    if variant not in ("weight", "lr", "finetune"):
        raise RecipeError(f"unknown IMP variant {variant!r}", "use weight (weight rewinding), lr (LR rewinding) or finetune")
    if not 0.0 < fraction < 1.0:
        raise RecipeError(f"fraction must be in (0, 1), got {fraction}", "0.2 prunes 20 % of the remaining weights per level")
    if init not in ("reset", "given"):
        raise RecipeError(f"unknown init {init!r}", "use reset (fresh seeded init) or given (the model's weights as θ₀)")
    if data is None or getattr(data, "task", None) != "classification" or data.train is None or data.test is None:
        raise RecipeError("IMP with rewinding trains and evaluates, so it needs labelled data with a test split",
                          "pass --data digits or --data npz:FILE with x and y")
    if target_sparsity is not None:
        M.check_sparsity(target_sparsity, "target_sparsity")
        levels = max(1, math.ceil(math.log(1.0 - target_sparsity) / math.log(1.0 - fraction) - 1e-9))
    M.prunable_weights(model, include, exclude)  # validates patterns before any training

    caller_device = module_device(model)
    device = training_device(model, device)
    rank, world = ddp_context(device)
    ipe = math.ceil(len(data.train) / (batch_size * world))
    T = int(round(epochs * ipe))
    k = int(rewind_steps) if rewind_steps is not None else int(round(rewind_epochs * ipe))
    if not 0 <= k < T:
        raise RecipeError(f"rewind step {k} must be in [0, {T}) (the training length in steps)", "lower rewind_epochs / rewind_steps")
    lam = make_lr_lambda(schedule, T, milestones, gamma, int(round(warmup_epochs * ipe)))
    final_factor = lam(T - 1)
    train_kw = dict(batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
                    seed=seed, device=device, progress=progress)

    M.bake_masks(model)
    given_state = _cpu_state(model)
    template = copy.deepcopy(model).cpu()  # plain architecture for fresh inits

    params = dict(levels=levels, fraction=fraction, rewind_step=k, variant=variant, total_steps=T, batch_size=batch_size,
                  lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                  milestones=list(milestones), gamma=gamma, warmup_epochs=warmup_epochs, scope=scope,
                  convention=convention, include=include, exclude=exclude, init=init,
                  random_reinit_control=random_reinit_control, world_size=world)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "recipe_hash": recipe_hash,
        "params": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16],
        "model": _digest(given_state),
        "data": _data_digest(data.train),
        "seed": seed,
        "info": params,
    }
    folder = Path(workdir) / "checkpoints" / checkpoint_name if workdir is not None else None
    ck = Checkpoints(folder, meta, resume, write=rank == 0)
    barrier()  # every rank has read (resume) before rank 0 replaces or adds files

    # θ_k
    if ck.theta_k is not None:
        theta_k = ck.theta_k["state"]
    else:
        if init == "reset":
            reinitialize(model, seed)
        torch.manual_seed(seed)
        if k > 0:
            train(model, data.train, steps=k, lr_lambda=lam, description="pre-training to the rewind point", **train_kw)
        theta_k = _cpu_state(model)
        ck.save_theta_k(theta_k, k)

    reports: list[dict] = [p["report"] for p in ck.levels]
    masks: dict | None = ck.levels[-1]["masks"] if ck.levels else None
    trained: dict | None = ck.levels[-1]["final_state"] if ck.levels else None
    names = list(M.prunable_weights(template, include, exclude))

    for level in range(len(ck.levels), levels + 1):
        if level > 0:
            _load_masked(model, trained, masks)
            w = M.prunable_weights(model, include, exclude)
            masks = M.magnitude_masks({n: w[n] for n in names}, fraction, scope=scope, convention=convention,
                                      current=masks, fraction_of_remaining=True)
        start = theta_k if (level == 0 or variant == "weight") else trained
        _load_masked(model, start, masks)
        torch.manual_seed(seed + level)
        level_lam = (lambda t: final_factor) if (variant == "finetune" and level > 0) else lam
        train(model, data.train, steps=T, start_step=k, lr_lambda=level_lam,
              description=f"IMP level {level}/{levels}", **train_kw)
        model.cpu()
        rep = M.sparsity_report(model, masks or {n: torch.ones(template.get_parameter(n).shape, dtype=torch.bool) for n in names})
        report = {"level": level, "density": 1.0 - rep["sparsity_masked"], "sparsity_masked": rep["sparsity_masked"],
                  "sparsity_all_params": rep["sparsity_all_params"], "accuracy": accuracy(model, data.test)}
        if random_reinit_control and level > 0:
            ctrl = reinitialize(copy.deepcopy(template), seed + 7919 * level)
            M.apply_masks(ctrl, masks)
            torch.manual_seed(seed + level)
            train(ctrl, data.train, steps=T, start_step=k, lr_lambda=lam, description=f"random re-init control {level}", **train_kw)
            report["random_reinit_accuracy"] = accuracy(ctrl.cpu(), data.test)
        trained = _cpu_state(model)
        reports.append(report)
        ck.save_level(level, {"masks": masks or {}, "final_state": trained, "report": report}, reports)
        barrier()  # rank 0's checkpoint is complete before any rank goes on (or is killed and resumes from it)
        if on_level is not None:
            on_level(level, report)

    # leave the last level's network (trained, masked) in the model
    _load_masked(model, trained, masks)
    model.to(caller_device).eval()
    return {"levels": reports, "dense_accuracy": reports[0]["accuracy"], "rewind_step": k, "total_steps": T,
            "iterations_per_epoch": ipe, "variant": variant, "final_sparsity": reports[-1]["sparsity_masked"],
            "final_accuracy": reports[-1]["accuracy"], "resumed_levels": len(ck.levels),
            "checkpoints": str(folder) if folder is not None else None}


# ---------------------------------------------------------------------------------------------- recipe stage


class IMPParams(SGDParams):
    levels: int = Field(8, ge=1, le=100, description="pruning rounds after the dense level 0")
    fraction: float = Field(0.2, gt=0.0, lt=1.0, description="fraction of the remaining weights pruned per round")
    target_sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="if set, levels = rounds needed to reach it")
    variant: Literal["weight", "lr", "finetune"] = Field("weight", description="weight rewinding, LR rewinding or fine-tuning")
    rewind_epochs: float = Field(1.0, ge=0.0, description="rewind point k in epochs (0 = original LTH reset to init)")
    rewind_steps: int | None = Field(None, ge=0, description="rewind point k in iterations (overrides rewind_epochs)")
    epochs: Epochs = Field(20.0, description="training length T of every level")
    lr: LearningRate = 0.05
    weight_decay: WeightDecay = 1e-4
    schedule: Literal["step", "cosine", "constant"] = Field("step", description="step: ×gamma at the milestones")
    milestones: list[float] = Field([0.5, 0.75], description="step-schedule milestones as fractions of T")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    scope: Literal["global", "layerwise"] = "global"
    convention: Literal["exact_k", "strict_above"] = "exact_k"
    include: list[str] | None = globs("to prune (default: every Conv2d/Linear)")
    exclude: list[str] | None = globs("to keep dense, e.g. ['fc'] for the output layer")
    init: Literal["reset", "given"] = Field("reset", description="reset: fresh seeded θ₀; given: the model's weights are θ₀")
    random_reinit_control: bool = Field(False, description="also train the same mask from a fresh init per level")


@register_method("imp_rewind", IMPParams, help="iterative magnitude pruning with weight/LR rewinding (lottery tickets)",
                 kinds=("torch",), needs_labels="train+test", fp32=True,
                 # the init template and the rewind point are copies; a random re-init control is one more
                 memory_needed=lambda fp, p: (2 + p.random_reinit_control) * mem.model_copy(fp) + mem.training(fp, p.optimizer, p.momentum)
                 + mem.ranking(fp, p.scope))
def run_imp_rewind(ctx: StageContext, p: IMPParams) -> dict:
    out = imp_rewind(ctx.model, ctx.data, levels=p.levels, fraction=p.fraction, target_sparsity=p.target_sparsity,
                     rewind_steps=p.rewind_steps, rewind_epochs=p.rewind_epochs, variant=p.variant, epochs=p.epochs,
                     batch_size=p.batch_size, lr=p.lr, optimizer=p.optimizer, momentum=p.momentum,
                     weight_decay=p.weight_decay, schedule=p.schedule, milestones=tuple(p.milestones), gamma=p.gamma,
                     warmup_epochs=p.warmup_epochs, scope=p.scope, convention=p.convention, include=p.include,
                     exclude=p.exclude, init=p.init, random_reinit_control=p.random_reinit_control, seed=ctx.seed,
                     device=ctx.device, workdir=ctx.workdir, resume=ctx.resume, recipe_hash=ctx.recipe_hash,
                     checkpoint_name=f"imp_rewind-stage{ctx.stage_index}")
    ctx.model.cpu().eval()
    return out
