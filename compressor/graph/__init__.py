"""ONNX dependency-graph analyser and structured pruning (DepGraph / SPA style, on the ONNX graph).

    a = analyze("model.onnx")            # coupled channel groups: a.groups, a.to_json()
    sel = select(a, ratio=0.3)           # atoms to remove (importance-ranked)
    pruned = prune_onnx(model, a, sel)   # a smaller onnx.ModelProto, checked and run in onnxruntime
"""

from __future__ import annotations

import contextlib
import gc

from compressor.graph.analysis import Analysis, Group, Member, build
from compressor.graph.ir import GraphIR, load_model
from compressor.graph.prune import PruneError, prune_onnx
from compressor.graph.selection import Selection, select


def analyze(model_or_path, *, validate: bool = True, strict: bool = False) -> Analysis:
    """Coupled channel groups of an ONNX model (path, bytes or ModelProto; never modified).

    validate: try writing a one-channel cut of every prunable group into the graph (no inference run) and
    freeze the groups whose size constants cannot be rewritten.
    strict: an internal error (a rule or dry run that fails) raises instead of freezing what it touches with
    the error as the reason; the tests use it so a bug stays visible."""
    from compressor.graph.prune import validate_groups

    with _no_gc_pauses():
        a = build(GraphIR(load_model(model_or_path)), strict)
        if validate:
            validate_groups(a, strict)
    return a


@contextlib.contextmanager
def _no_gc_pauses():
    """The analysis allocates many small acyclic objects; in a process that already holds a large heap (a
    torch model, a training loop) each cyclic-GC pass walks all of that heap, which made analysis time grow
    faster than the graph. Collection is paused for the call and runs normally after it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def analyze_model(model, *, arch: str | None = None, trust_pickle: bool = False, data=None) -> Analysis:
    """Any model the CLI accepts (ONNX, torch checkpoint, HF folder, nn.Module): ONNX is analysed directly,
    the rest is exported with compressor.export first (initializer names = torch parameter names)."""
    import tempfile
    from pathlib import Path

    import onnx
    from torch import nn

    from compressor.api import example_inputs_for
    from compressor.export import export_onnx
    from compressor.graph.torch_bridge import distinct_copy
    from compressor.io.data import load_data
    from compressor.io.models import LoadedModel
    from compressor.io.models import load_model as load_any

    if isinstance(model, onnx.ModelProto | bytes) or (isinstance(model, str | Path) and str(model).endswith(".onnx")):
        return analyze(model)
    loaded = LoadedModel("torch", "object", module=model) if isinstance(model, nn.Module) else \
        load_any(model, arch=arch, trust_pickle=trust_pickle)
    if loaded.kind == "onnx":
        return analyze(loaded.onnx)
    bundle = load_data(data) if isinstance(data, str) else data
    example = example_inputs_for(loaded, bundle)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(distinct_copy(loaded.module), example, path)
        return analyze(path)


__all__ = ["Analysis", "Group", "Member", "PruneError", "Selection", "analyze", "analyze_model", "prune_onnx", "select"]
