"""ONNX dependency-graph analyser and structured pruning (DepGraph / SPA style, on the ONNX graph).

    a = analyze("model.onnx")            # coupled channel groups: a.groups, a.to_json()
    sel = select(a, ratio=0.3)           # atoms to remove (importance-ranked)
    pruned = prune_onnx(model, a, sel)   # a smaller onnx.ModelProto, checked and run in onnxruntime
"""

from __future__ import annotations

from compressor.graph.analysis import Analysis, Group, Member, build
from compressor.graph.ir import GraphIR, load_model
from compressor.graph.prune import PruneError, prune_onnx
from compressor.graph.selection import Selection, select


def analyze(model_or_path) -> Analysis:
    """Coupled channel groups of an ONNX model (path, bytes or ModelProto; never modified)."""
    return build(GraphIR(load_model(model_or_path)))


__all__ = ["Analysis", "Group", "Member", "PruneError", "Selection", "analyze", "prune_onnx", "select"]
