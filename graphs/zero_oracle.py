"""Zero-channel oracle written independently of the pruner (compressor/graph/prune.py).

Removing channels must give the same outputs as zeroing them in the original model. This oracle takes one
thing from the analyser: the list of (initializer name, axis, positions) a selection removes
(`Analysis.removed_positions(atoms)`). It never reads `Plan`, `ctx.axes` or any other analysis internal:

- zero_onnx: the ORIGINAL ONNX model with those positions set to 0 (numpy_helper; same shapes);
- zero_torch: the same on a torch module, by parameter name (names = initializer names for models exported
  by compressor.export);
- slice_problems: every listed initializer of the pruned model must be the original with exactly those
  positions deleted (np.delete), every other float initializer unchanged;
- compare: both models run in onnxruntime on the same inputs; the largest absolute difference.

A bug in the pruner's own position map (an offset, a swapped reshape factor, a consumer cut at the wrong place)
makes the pruned model a consistent cut of *other* channels: the old oracle (compressor/graph/oracle.py, built
on the same Plan) agrees with it, this one does not (scripts/mutate_pruner.py shows it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from compressor.onnx_utils import example_feeds  # random inputs from the graph's input types

Removed = Sequence[tuple[str, int, Iterable[int]]]


def _by_name(removed: Removed) -> dict[str, list[tuple[int, np.ndarray]]]:
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, axis, pos in removed:
        out.setdefault(name, []).append((int(axis), np.asarray(list(pos), dtype=np.int64)))
    return out


def _zeroed(arr: np.ndarray, cuts: list[tuple[int, np.ndarray]]) -> np.ndarray:
    arr = arr.copy()
    for axis, pos in cuts:
        idx: list = [slice(None)] * arr.ndim
        idx[axis] = pos
        arr[tuple(idx)] = 0
    return arr


def zero_onnx(model: onnx.ModelProto, removed: Removed) -> onnx.ModelProto:
    """A copy of `model` with the listed positions of its float initializers set to 0."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    cuts = _by_name(removed)
    missing = set(cuts) - {i.name for i in m.graph.initializer}
    if missing:
        raise KeyError(f"removed positions name initializers the model does not have: {sorted(missing)[:5]}")
    for i, init in enumerate(m.graph.initializer):
        if init.name in cuts:
            arr = numpy_helper.to_array(init)
            if np.issubdtype(arr.dtype, np.floating):
                m.graph.initializer[i].CopyFrom(numpy_helper.from_array(_zeroed(arr, cuts[init.name]), init.name))
    return m


def zero_torch(module, removed: Removed):
    """A deep copy of a torch module with the listed positions of its parameters/buffers (by name) set to 0."""
    import torch

    m = copy.deepcopy(module)
    tensors = dict(m.named_parameters()) | dict(m.named_buffers())
    cuts = _by_name(removed)
    missing = set(cuts) - set(tensors)
    if missing:
        raise KeyError(f"removed positions name tensors the module does not have: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, c in cuts.items():
            t = tensors[name]
            if t.is_floating_point():
                t.copy_(torch.from_numpy(_zeroed(t.detach().cpu().numpy(), c)))
    return m


def slice_problems(original: onnx.ModelProto, pruned: onnx.ModelProto, removed: Removed) -> list[str]:
    """Where the pruned model's float initializers are not the original's with the listed positions deleted."""
    cuts = _by_name(removed)
    after = {i.name: i for i in pruned.graph.initializer}
    problems = []
    for init in original.graph.initializer:
        arr = numpy_helper.to_array(init)
        if not np.issubdtype(arr.dtype, np.floating):
            continue  # size constants are rewritten, not sliced
        if init.name not in after:
            problems.append(f"{init.name}: missing from the pruned model")
            continue
        want = arr
        for axis, pos in sorted(cuts.get(init.name, []), key=lambda c: -c[0]):
            want = np.delete(want, pos, axis=axis)
        got = numpy_helper.to_array(after[init.name])
        if got.shape != want.shape:
            problems.append(f"{init.name}: shape {list(got.shape)}, expected {list(want.shape)}")
        elif not np.array_equal(got, want):
            problems.append(f"{init.name}: values are not the original's with the removed positions deleted")
    return problems


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return worst


def compare(original: onnx.ModelProto, pruned: onnx.ModelProto, removed: Removed,
            feeds: dict[str, np.ndarray] | None = None) -> float:
    """Largest |zeroed original - pruned| over all outputs on the same inputs (inf when shapes differ)."""
    feeds = example_feeds(original) if feeds is None else feeds
    return max_abs_diff(run(zero_onnx(original, removed), feeds), run(pruned, feeds))


def check(original: onnx.ModelProto, pruned: onnx.ModelProto, removed: Removed, *, atol: float = 1e-4,
          feeds: dict[str, np.ndarray] | None = None, slices: bool = True) -> list[str]:
    """Everything this oracle finds wrong with `pruned` (empty: equivalent). slices: also check the
    initializers (turn off for exports whose weights the analysis rewrote, e.g. unshared copies)."""
    problems = slice_problems(original, pruned, removed) if slices else []
    try:
        d = compare(original, pruned, removed, feeds)
    except Exception as e:  # noqa: BLE001 - a pruned model that does not run is a finding, not a crash
        return [*problems, f"does not run: {type(e).__name__}: {str(e).splitlines()[0][:200]}"]
    if not d <= atol:
        problems.append(f"outputs differ from the zeroed original by {d:.3g} (> {atol})")
    return problems


def removed_params(original: onnx.ModelProto, pruned: onnx.ModelProto) -> int:
    """How many initializer entries the pruning removed."""
    def count(m):
        return sum(int(np.prod(i.dims)) for i in m.graph.initializer)
    return count(original) - count(pruned)
