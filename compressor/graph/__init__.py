"""ONNX dependency-graph analyser and structured pruning (DepGraph / SPA style, on the ONNX graph).

    a = analyze("model.onnx")            # coupled channel groups: a.groups, a.to_json()
    sel = select(a, ratio=0.3)           # atoms to remove (importance-ranked)
    pruned = prune_onnx(model, a, sel)   # a smaller onnx.ModelProto, checked and run in onnxruntime
"""

from __future__ import annotations

from compressor.graph.analysis import Analysis, Group, Member, build
from compressor.graph.ir import GraphIR, load_model


def analyze(model_or_path) -> Analysis:
    """Coupled channel groups of an ONNX model (path, bytes or ModelProto; never modified)."""
    return build(GraphIR(load_model(model_or_path)))


def __getattr__(name):  # heavier pieces load on first use
    if name in ("prune_onnx", "PruneError"):
        from compressor.graph import prune

        return getattr(prune, name)
    if name in ("select", "Selection"):
        from compressor.graph import select as sel

        return getattr(sel, name)
    raise AttributeError(name)


__all__ = ["Analysis", "Group", "Member", "PruneError", "Selection", "analyze", "prune_onnx", "select"]
