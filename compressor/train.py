"""The one training loop every recipe shares.

- Deterministic data order: epoch e is shuffled with seed `seed + e`, so a run can be positioned at any
  step k (weight/LR rewinding) by skipping k // ipe epochs and k % ipe batches, exactly as open_lth does.
- Device: the model's own device unless `device=` says otherwise (compressor.device.resolve: "cuda" means
  cuda:LOCAL_RANK under torchrun); a model moved for training goes back to the caller's device afterwards.
- AMP (device.amp_dtype: bf16, or fp16 on GPUs without bf16) on CUDA; plain fp32 on CPU.
- DDP when launched by `torchrun` (WORLD_SIZE > 1): the backend follows the TRAINING device (gloo on CPU even
  when CUDA exists, nccl on GPUs); each rank pins cuda:LOCAL_RANK; each rank takes a strided shard of the same
  permutation, so the global batch order matches the single-process run. Writes are rank 0's (`is_writer`),
  followed by `barrier()` before any rank reads them back.
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

from compressor import device as D
from compressor.errors import InputError
from compressor.utils import progress as bars

LossFn = Callable[[nn.Module, tuple], torch.Tensor]


def classification_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch[0], batch[1]
    return nn.functional.cross_entropy(model(x), y)


def ddp_context(device: torch.device | str) -> tuple[int, int]:
    """(rank, world_size); initialises the process group once when launched by torchrun (WORLD_SIZE > 1).

    `device` is where this rank trains: its backend is nccl for a GPU and gloo for the CPU (even on a machine
    with CUDA, where nccl would fail with "No backend type associated with device type cpu"). A GPU rank is
    pinned to its device first, so NCCL's communicator and every default-device allocation use cuda:LOCAL_RANK.
    """
    if dist.is_available() and dist.is_initialized():  # started by the caller (any world size, e.g. 1)
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(D.process_group_backend(device))
    return dist.get_rank(), dist.get_world_size()


def is_writer() -> bool:
    """True on the process that writes files (rank 0, or the only process when not distributed)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed): after rank 0 writes, before any rank reads back."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def training_device(model: nn.Module, device: torch.device | str | None = None) -> torch.device:
    """Where `model` trains: `device` resolved by the device policy, else the model's current device.

    Under torchrun with several ranks each rank must own its GPU: an explicit cuda:N that is not this rank's
    cuda:LOCAL_RANK would put every rank on one GPU, so it is refused with the fix.
    """
    dev = D.resolve(device) if device is not None else D.module_device(model)  # both carry a CUDA index
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dev.type == "cuda" and device is not None:
        mine = D.resolve("cuda")
        if dev != mine:
            raise InputError(f"rank {D.local_rank()} of {world} was asked to train on {dev}, which is not its own GPU {mine}",
                             "pass --device cuda (or auto): each torchrun rank then uses cuda:LOCAL_RANK")
    return dev


def _move_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Put optimizer state next to its parameters again (after the model went back to the caller's device)."""
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.device != p.device and v.dim() > 0:
                st[k] = v.to(p.device)


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
    caller_device = D.module_device(model)
    device = training_device(model, device)
    rank, world = ddp_context(device)
    model.to(device).train()
    ipe = math.ceil(n / (batch_size * world))  # iterations per epoch
    if steps is None:
        if epochs is None:
            raise ValueError("train() needs steps or epochs")
        steps = int(round(epochs * ipe))
    loss_fn = loss_fn or getattr(dataset, "loss", None) or classification_loss  # Batches carry the caller's loss
    if lr_lambda is None and cosine:
        total = max(steps, 1)
        lr_lambda = lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))  # noqa: E731
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else make_optimizer(
        [p for p in (params if params is not None else model.parameters()) if p.requires_grad], optimizer, lr, momentum, weight_decay
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    net: nn.Module = model
    if world > 1 or (dist.is_available() and dist.is_initialized()):
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = D.amp_dtype(device) if amp else None
    # fp16 (GPUs without bf16) needs loss scaling; with bf16 / fp32 the scaler is a pass-through
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step = start_step
    last_loss = float("nan")
    show = progress and rank == 0 and steps - start_step > 0
    with bars.progress(description, total=steps - start_step, show=show, loss=float("nan")) as bar:
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
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    loss = loss_fn(net, batch)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                if after_backward is not None:
                    after_backward(model)
                if grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                scaler.step(opt)
                scaler.update()
                if after_step is not None:
                    after_step(model, step)
                step += 1
                last_loss = float(loss.detach())
                bar.advance(1, loss=last_loss)
    model.eval()
    if caller_device != device:  # results on the caller's device, optimizer state next to its parameters
        model.to(caller_device)
        _move_optimizer_state(opt)
    return {"steps": step, "iterations_per_epoch": ipe, "final_loss": last_loss, "lr": [g["lr"] for g in opt.param_groups]}
