"""Torch bridge: TorchScript vs torch's default (dynamo) exporter for analysis, on the test graphs.

For each model: analysis-export time (warm: one export of another model first), prunable groups of the analysis,
and the torch path (`structured` stage at ratio 0.3, torch defaults) against the ONNX path of the file torch's
default `torch.onnx.export(model, args)` writes (same selection settings: head_dim off). Prints a table and
writes benchmarks/results/bridge_exporters.json.

    PYTHONPATH=$PWD python benchmarks/bridge_exporters.py
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.analysis_export import export_for_analysis  # noqa: E402
from compressor.graph import analyze, prune_onnx, select  # noqa: E402
from compressor.graph.torch_bridge import distinct_copy  # noqa: E402
from compressor.methods.structured import StructuredParams, structured_torch  # noqa: E402
from compressor.models import digits_cnn  # noqa: E402
from graphs.regressions import REGRESSIONS  # noqa: E402
from graphs.swin import swin_like  # noqa: E402
from graphs.vit import vit_like  # noqa: E402


def _onnx_path(model, inputs, ratio):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        m = torch.onnx.export(model, inputs, dynamo=True).model_proto
    a = analyze(m)
    sel = select(a, "l2", ratio, head_dim=False)
    size = lambda mp: sum(int(np.prod(i.dims)) for i in mp.graph.initializer)  # noqa: E731
    return len(a.prunable_groups), 1 - size(prune_onnx(m, a, sel)) / size(m)


def main() -> None:
    logging.disable(logging.WARNING)
    models = {"digits_cnn": lambda: (digits_cnn().eval(), (torch.randn(8, 1, 8, 8),)),
              "swin_like": swin_like, "vit_like": vit_like,
              "maxvit_like": REGRESSIONS["maxvit_like"].build}
    export_for_analysis(distinct_copy(digits_cnn().eval()), (torch.randn(2, 1, 8, 8),), "dynamo")  # warm-up
    rows = []
    for name, build in models.items():
        torch.manual_seed(0)
        model, inputs = build()
        row = {"model": name}
        for ex in ("torchscript", "dynamo"):
            t = time.perf_counter()
            e = export_for_analysis(distinct_copy(model), inputs, ex)
            row[f"{ex}_export_s"] = round(time.perf_counter() - t, 2)
            row[f"{ex}_groups"] = len(analyze(e.model).prunable_groups)
            m = copy.deepcopy(model)
            before = sum(p.numel() for p in m.parameters())
            t = time.perf_counter()
            rep = structured_torch(m, inputs, StructuredParams(ratio=0.3, exporter=ex))
            row[f"{ex}_stage_s"] = round(time.perf_counter() - t, 2)
            row[f"{ex}_removed"] = round(1 - sum(p.numel() for p in m.parameters()) / before, 4)
            row[f"{ex}_torch_frozen"] = [f["group"] for f in rep["torch_frozen"]]
        row["onnx_default_groups"], row["onnx_default_removed"] = _onnx_path(model, inputs, 0.3)
        row["onnx_default_removed"] = round(row["onnx_default_removed"], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results" / "bridge_exporters.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
