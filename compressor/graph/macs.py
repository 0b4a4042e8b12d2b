"""Multiply-accumulates of an analysed ONNX graph, before or after removing a set of atoms, without building
the pruned model (used to hit a MAC-reduction target). Dynamic dims count as `dynamic` (default 1; the
sequence length for transformers matters only for activation×activation MatMuls)."""

from __future__ import annotations

import math

from compressor.graph.analysis import Analysis


def count_macs(analysis: Analysis, removed: set[int] | None = None, dynamic: int = 1) -> int:
    from compressor.graph.prune import Plan

    plan = Plan(analysis, set(removed or ()))
    ctx = analysis.ctx

    def sizes(name: str) -> list[int] | None:
        axes = plan.axes(name)
        if axes is None:
            shp = analysis.ir.shape(name)
            return None if shp is None else [dynamic if s is None else s for s in shp]
        return [dynamic if a is None else plan.count(a) for a in axes]

    total = 0
    for node in analysis.ir.nodes:
        op = node.op_type
        if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        out = sizes(node.output[0])
        a, w = sizes(node.input[0]), sizes(node.input[1])
        if out is None or a is None or w is None:
            continue
        if op == "Conv":
            total += math.prod(out) * math.prod(w[1:])
        elif op == "ConvTranspose":
            total += math.prod(a) * math.prod(w[1:])
        elif op == "Gemm":
            k = a[0] if ctx.attr(node, "transA", 0) else a[-1]
            total += math.prod(out) * k
        else:
            total += math.prod(out) * a[-1]
    return total
