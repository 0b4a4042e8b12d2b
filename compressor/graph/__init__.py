"""ONNX dependency-graph analyser and structured pruning (DepGraph / SPA style, on the ONNX graph).

    a = analyze("model.onnx")            # coupled channel groups: a.groups, a.to_json()
    sel = select(a, ratio=0.3)           # atoms to remove (importance-ranked)
    pruned = prune_onnx(model, a, sel)   # a smaller onnx.ModelProto, checked and run in onnxruntime
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

from compressor.graph.analysis import Analysis, Group, Member, build
from compressor.graph.ir import ExternalData, GraphIR, load_model
from compressor.graph.prune import PruneError, prune_onnx
from compressor.graph.selection import Selection, select
from compressor.utils import progress as bars


@bars.step("analysing the graph")
def analyze(model_or_path, *, validate: bool = True, strict: bool = False, external=None, phases=None) -> Analysis:
    """Coupled channel groups of an ONNX model (path, bytes or ModelProto; never modified).

    validate: try writing a one-channel cut of every prunable group into the graph (no inference run) and
    freeze the groups whose size constants cannot be rewritten.
    strict: an internal error (a rule or dry run that fails) raises instead of freezing what it touches with
    the error as the reason; the tests use it so a bug stays visible.
    external: name -> ndarray for the initializers whose data is outside the proto (a weightless graph's
    checkpoint, see compressor.graph.weightless); read when a value is needed (importance), never kept.
    phases: a compressor.utils.phases.Phases that gets the seconds of "graph" (load, IR), "groups" and
    "validate"."""
    from compressor.graph.prune import validate_groups
    from compressor.utils.phases import Phases

    phases = Phases.optional(phases)
    with _no_gc_pauses():
        with phases("graph"):
            if isinstance(model_or_path, str | Path) and external is None:  # weights beside the file stay there
                m = load_model(model_or_path, external_data=False)
                external = ExternalData(m, Path(model_or_path).parent) or None
            else:
                m = load_model(model_or_path)
            ir = GraphIR(m, external)
        with phases("groups"):
            a = build(ir, strict)
        if validate:
            with phases("validate"):
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


__all__ = ["Analysis", "Group", "Member", "PruneError", "Selection", "analyze", "prune_onnx", "select"]
