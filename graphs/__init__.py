"""Reference model zoo for the ONNX dependency-graph analyser (compressor.graph) and its second opinion.

Every entry builds a small, seeded, eval-mode torch model plus example inputs, exports to ONNX with the
project's exporter, and carries `expected`: facts about its coupled channel groups that an analyser must
find, derived by reasoning about the architecture (written as data, never computed by our analyser).

Members are written as `(parameter name, "out" | "in")`:
  "out"  the parameter's output-channel axis (Conv/Linear weight dim 0, bias, BN/LN scale and shift,
         depthwise conv weight dim 0, Embedding weight dim 1, free parameters' channel axis);
  "in"   the input-channel axis (Conv/Linear weight dim 1).

`expected` keys (all optional except `groups` on the hand-written models):
  groups     list of groups, each a list of members (the exact prunable groups, graph outputs frozen)
  num_groups number of prunable groups
  tied       lists of members that must all fall in one group
  separate   pairs of members that must be in different groups
  frozen     members whose channels reach a graph output (never prunable)
  tp         what torch-pruning gives where it legitimately differs: {"num_groups": n, "why": "..."}

Usage:
    import graphs
    model, inputs = graphs.ZOO["residual"].build()
    graphs.export("residual", "residual.onnx")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

Member = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    source: str  # where the architecture comes from
    description: str  # what the model is and what it tests
    builder: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    ignored: tuple[str, ...]  # module names whose outputs are graph outputs (tp's ignored_layers)
    expected: dict
    tags: tuple[str, ...] = ()

    def build(self, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """Fresh model (eval mode, seeded) and example inputs."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, inputs = self.builder()
        return model.eval(), inputs

    def ignored_modules(self, model: nn.Module) -> list[nn.Module]:
        mods = dict(model.named_modules())
        return [mods[n] for n in self.ignored]


ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in ZOO:
        raise ValueError(f"duplicate zoo entry {entry.name!r}")
    ZOO[entry.name] = entry
    return entry


def export(name: str, path: str | Path, *, verify: bool = True, seed: int = 0) -> dict:
    """Export zoo model `name` to ONNX at `path` with the project's exporter (compressor.export.export_onnx:
    TorchScript exporter, opset 17, no constant folding, TrainingMode.EVAL, dynamic batch), verified against
    torch in onnxruntime. Returns the exporter's report plus the entry name."""
    from compressor.export import export_onnx

    entry = ZOO[name]
    model, inputs = entry.build(seed)
    report = export_onnx(model, inputs, path, input_names=list(entry.input_names),
                         output_names=list(entry.output_names), verify=verify)
    report["name"] = name
    return report


def names(tag: str | None = None, exclude: tuple[str, ...] = ()) -> list[str]:
    """Zoo entry names, optionally only those with `tag`, skipping those with any tag in `exclude`."""
    return [n for n, e in ZOO.items() if (tag is None or tag in e.tags) and not set(exclude) & set(e.tags)]


from graphs import basic, hf, inception, mobilenet, resnet  # noqa: E402,F401  (registers the entries)

__all__ = ["ZOO", "ZooEntry", "export", "names", "register"]
