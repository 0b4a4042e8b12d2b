"""What compress() returns, and the report's JSON conversion (shared by the in-memory and the streaming path)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class Result:
    """What compress() returns: the compressed model, the report (also written as report.json), files."""

    model: torch.nn.Module | None
    onnx_model: object | None
    report: dict
    output: Path | None
    files: dict = field(default_factory=dict)

    @property
    def before(self) -> dict:
        return self.report["before"]

    @property
    def after(self) -> dict:
        return self.report["after"]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 64 else f"<tensor {list(obj.shape)}>"
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
