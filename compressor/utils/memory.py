"""How much memory there is, and how much a model takes: what the up-front memory check of a recipe compares
(compressor.recipe.check_memory). Figures are bytes; :func:`fmt_bytes` writes them for people.

COMPRESSOR_MEMORY_AVAILABLE (bytes, or with a unit: "512M", "3.5G") overrides what the machine reports: a cap
for a shared machine, and how the tests make every recipe refuse without needing a small machine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

ENV = "COMPRESSOR_MEMORY_AVAILABLE"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """'4096', '512M', '3.5G', '2GiB', '2GB' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
    if m is None:
        raise ValueError(f"not a memory size: {text!r} (e.g. 512M, 3.5G)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def available_bytes(device: torch.device | str | None = None) -> int:
    """Memory a new allocation can take now: free memory of the CUDA device for a CUDA `device`, else the
    host's available RAM (psutil, else /proc/meminfo); capped by COMPRESSOR_MEMORY_AVAILABLE when set."""
    cap = os.environ.get(ENV)
    limit = parse_bytes(cap) if cap else None
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free = torch.cuda.mem_get_info(dev)[0]
    else:
        free = _host_available()
    return free if limit is None else min(free, limit)


def _host_available() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: never refuse for lack of a figure


@dataclass(frozen=True)
class Footprint:
    """What a stage's memory estimate starts from: the model as loaded (weights in their dtype)."""

    n_params: int  # parameters + buffers, shared tensors once
    param_bytes: int  # their bytes in the model's dtype(s)
    largest_bytes: int  # the largest single tensor
    hidden: int = 0  # a transformer's hidden size when known (activation estimates), else 0
    n_layers: int = 0
    kind: str = ""  # the model wrapper's kind (hf, torch, onnx) when known: some stages cost less on some kinds

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.n_params


def footprint(module=None, onnx_model=None) -> Footprint:
    """The footprint of a torch module (or an ONNX graph's initializers); tensors that share storage count once."""
    seen: set = set()
    n = total = largest = 0
    if module is not None:
        for t in list(module.parameters()) + list(module.buffers()):
            key = (t.untyped_storage().data_ptr(), t.data_ptr()) if t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            n += t.numel()
            b = t.numel() * t.element_size()
            total += b
            largest = max(largest, b)
        cfg = getattr(module, "config", None)
        hidden = int(getattr(cfg, "hidden_size", 0) or 0)
        layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
        return Footprint(n, total, largest, hidden, layers)
    if onnx_model is not None:
        import numpy as np

        for init in onnx_model.graph.initializer:
            count = int(np.prod(init.dims)) if len(init.dims) else 1
            size = len(init.raw_data) if init.raw_data else count * 4
            n += count
            total += size
            largest = max(largest, size)
    return Footprint(n, total, largest)
