"""Zero-channel equivalence (DESIGN oracle 1): zeroing the selected channels in the original model must give
the same outputs as removing them. Used by the tests and benchmarks.

Zeroing writes 0 into every float initializer position that holds a selected atom, on every axis: the
producers (so the channel is exactly 0) and the consumers (so a channel that is not produced by weights,
e.g. a GQA query head whose output is a mix of V, still contributes nothing). Exact except where
statistics span the pruned axis (LayerNorm, RMSNorm, softmax over channels): Group.approximate says so.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.graph.analysis import Analysis
from compressor.graph.prune import Plan


def zero_channels(analysis: Analysis, atoms) -> onnx.ModelProto:
    """A copy of the analysed model with the selected atoms' weights zeroed (same shapes)."""
    m = onnx.ModelProto()
    m.CopyFrom(analysis.ir.model)
    plan = Plan(analysis, {int(a) for a in atoms})
    for i, init in enumerate(m.graph.initializer):
        axes = analysis.ctx.axes.get(init.name)
        arr = numpy_helper.to_array(init)
        if axes is None or not np.issubdtype(arr.dtype, np.floating):
            continue
        arr = arr.copy()
        for k, a in enumerate(axes):
            keep = plan.keep(a)
            if keep is None or keep.all():
                continue
            idx = [slice(None)] * arr.ndim
            idx[k] = ~keep
            arr[tuple(idx)] = 0
        m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    return m


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
               for x, y in zip(a, b, strict=True))
