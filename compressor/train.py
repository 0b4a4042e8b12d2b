"""The one training loop every recipe shares.

- Deterministic data order: epoch e is shuffled with seed `seed + e`, so a run can be positioned at any
  step k (weight/LR rewinding) by skipping k // ipe epochs and k % ipe batches, exactly as open_lth does.
- AMP (bf16 autocast) on CUDA; plain fp32 on CPU.
- DDP when launched by `torchrun` (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA; each rank takes a strided
  shard of the same permutation, so the global batch order matches the single-process run.
- Hooks: `after_backward(model)` (e.g. mask gradients), `before_step(model, step)`, `after_step(model, step)`
  (e.g. re-apply masks, gradual pruning schedules).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from compressor.device import resolve as resolve_device
from compressor.errors import InputError

LossFn = Callable[[nn.Module, tuple], torch.Tensor]


def classification_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch[0], batch[1]
    return nn.functional.cross_entropy(model(x), y)


def ddp_context() -> tuple[int, int]:
    """(rank, world_size); initialises the process group once when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def make_optimizer(params, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise InputError(f"unknown optimizer {name!r}", "use sgd, adam or adamw")


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: float | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 0.05,
    optimizer: str | torch.optim.Optimizer = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    loss_fn: LossFn | None = None,
    lr_lambda: Callable[[int], float] | None = None,
    cosine: bool = False,
    after_backward: Callable[[nn.Module], None] | None = None,
    before_step: Callable[[nn.Module, int], None] | None = None,
    after_step: Callable[[nn.Module, int], None] | None = None,
    params=None,
    seed: int = 0,
    device: torch.device | str | None = None,
    amp: bool = True,
    start_step: int = 0,
    grad_clip: float | None = None,
    progress: bool = True,
    description: str = "training",
) -> dict:
    """Train `model` in place from step `start_step` to the end; returns {"steps", "final_loss", "lr"}.

    Length is `steps` or `epochs` (fractional allowed). The LR at step t is lr * lr_lambda(t)
    (or a cosine decay over the whole run when cosine=True), so a run started at step k sees the
    schedule positioned at k.
    """
    n = len(dataset)
    if n == 0:
        raise InputError("the training data is empty", "give data with at least one sample")
    rank, world = ddp_context()
    device = resolve_device(device)
    model.to(device).train()
    ipe = math.ceil(n / (batch_size * world))  # iterations per epoch
    if steps is None:
        if epochs is None:
            raise ValueError("train() needs steps or epochs")
        steps = int(round(epochs * ipe))
    loss_fn = loss_fn or classification_loss
    if lr_lambda is None and cosine:
        total = max(steps, 1)
        lr_lambda = lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))  # noqa: E731
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else make_optimizer(
        [p for p in (params if params is not None else model.parameters()) if p.requires_grad], optimizer, lr, momentum, weight_decay
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = amp and device.type == "cuda"
    bar = None
    if progress and rank == 0 and steps - start_step > 0:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                       TimeRemainingColumn(), transient=True)
        bar.start()
        task = bar.add_task(description, total=steps - start_step, loss=float("nan"))
    step = start_step
    last_loss = float("nan")
    try:
        while step < steps:
            epoch, offset = divmod(step, ipe)
            order = epoch_order(n, epoch, seed)[rank::world]
            for b in range(offset, ipe):
                if step >= steps:
                    break
                idx = order[b * batch_size : (b + 1) * batch_size]
                if len(idx) == 0:
                    step += 1
                    continue
                batch = tuple(t.to(device, non_blocking=True) for t in dataset[idx])
                if lr_lambda is not None:
                    for g, base in zip(opt.param_groups, base_lrs, strict=True):
                        g["lr"] = base * lr_lambda(step)
                if before_step is not None:
                    before_step(model, step)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss = loss_fn(net, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if after_backward is not None:
                    after_backward(model)
                if grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
                if after_step is not None:
                    after_step(model, step)
                step += 1
                last_loss = float(loss.detach())
                if bar is not None:
                    bar.update(task, advance=1, loss=last_loss)
    finally:
        if bar is not None:
            bar.stop()
    model.eval()
    return {"steps": step, "iterations_per_epoch": ipe, "final_loss": last_loss, "lr": [g["lr"] for g in opt.param_groups]}
