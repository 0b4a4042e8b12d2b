"""The device policy: the one place that answers "which device", "which AMP dtype", "where is this module",
"which process-group backend" and "how do we label where a number was measured".

Every command's ``--device auto|cpu|cuda|cuda:N`` and every API's ``device=`` go through :func:`resolve`.
``auto`` is the GPU of this process when there is one (``cuda:LOCAL_RANK`` under torchrun, so eight ranks
on an eight-GPU machine use eight GPUs), else the CPU. Functions that move work to a device return their
results on the caller's device (see :func:`to_device`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from compressor.errors import InputError

DEVICE_HELP = "auto (the GPU when there is one, else CPU) | cpu | cuda | cuda:N"


def local_rank() -> int:
    """This process's rank on its node under torchrun (0 when not distributed)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def resolve(spec: str | torch.device | None = "auto") -> torch.device:
    """A concrete device (always with an index for CUDA) from a user's spec; refuses what this machine lacks."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"device {spec!r} asked for, but torch sees no CUDA device", "use --device cpu (or auto)")
        if spec == "cuda":
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        try:
            index = int(spec.split(":", 1)[1])
        except ValueError:
            raise InputError(f"device {spec!r} is not understood", f"use {DEVICE_HELP}") from None
        if not 0 <= index < torch.cuda.device_count():
            raise InputError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    raise InputError(f"device {spec!r} is not understood", f"use {DEVICE_HELP}")


def amp_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for evaluation and training on `device`: bf16 on GPUs that have it, else fp16;
    None on CPU, where fp32 is the reference every other path is tested against."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters (or, failing those, buffers) live; CPU for a module with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def tensor_device(obj) -> torch.device:
    """The device of the first tensor found in a tensor / tuple / list / dict (CPU when there is none)."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for v in values:
        if isinstance(v, (torch.Tensor, tuple, list, dict)):
            d = tensor_device(v)
            if isinstance(v, torch.Tensor) or d.type != "cpu":
                return d
    return torch.device("cpu")


def to_device(obj, device: torch.device | str):
    """Move every tensor inside a tensor / tuple / list / dict to `device` (other values unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_device(v, device) for v in obj)
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj


def label(device: torch.device | str) -> str:
    """How a report names where a number was measured: ``cpu`` or ``cuda:0 (NVIDIA H200)``."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type


def process_group_backend(device: torch.device | str) -> str:
    """nccl when the training device is a GPU, gloo whenever it is the CPU (even on a machine with CUDA)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"
