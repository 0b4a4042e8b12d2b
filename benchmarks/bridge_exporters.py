"""Torch bridge: TorchScript vs torch's default (dynamo) exporter for analysis, on the test graphs.

For each model: analysis-export time (warm: one export of another model first), prunable groups of the analysis,
and the torch path (`structured` stage at ratio 0.3, torch defaults) against the ONNX path of the file torch's
default `torch.onnx.export(model, args)` writes (same selection settings: head_dim off). Prints a table, writes
benchmarks/results/bridge_exporters.json and the table in docs/export.md (between its bridge_exporters markers).

Each model × exporter is measured in a fresh child process (spawned, so it does not inherit this one's memory):
after the warm-up, the child resets its peak RSS (Linux /proc/self/clear_refs, 5) before each measured call and
reads VmHWM after it, so `*_peak_rss_mb` is that call's peak, the process's resident baseline (torch, the model)
included.

    PYTHONPATH=$PWD python benchmarks/bridge_exporters.py
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import io
import json
import logging
import multiprocessing
import re
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


MODELS = {"digits_cnn": lambda: (digits_cnn().eval(), (torch.randn(8, 1, 8, 8),)),
          "swin_like": swin_like, "vit_like": vit_like,
          "maxvit_like": REGRESSIONS["maxvit_like"].build}
LABELS = {"digits_cnn": "DigitsCNN", "swin_like": "Swin-like (`graphs/swin.py`)", "vit_like": "ViT-like (`graphs/vit.py`)",
          "maxvit_like": "MaxViT-like (`graphs/regressions.py`)"}
DOC = Path(__file__).resolve().parents[1] / "docs" / "export.md"
MARK = ("<!-- bridge_exporters table -->", "<!-- /bridge_exporters table -->")


def _measured(fn):
    """(result, seconds, peak RSS MB) of fn(): the peak is reset first, so it is this call's."""
    Path("/proc/self/clear_refs").write_text("5")
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return out, round(seconds, 2), round(int(hwm.group(1)) / 1024) if hwm else None


def _child(name: str, ex: str | None) -> dict:
    """One model with one exporter (None: the default torch.onnx.export file) in this fresh process."""
    logging.disable(logging.WARNING)
    export_for_analysis(distinct_copy(digits_cnn().eval()), (torch.randn(2, 1, 8, 8),), "dynamo")  # warm-up
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    if ex is None:
        (groups, removed), _, rss = _measured(lambda: _onnx_path(model, inputs, 0.3))
        return {"onnx_default_groups": groups, "onnx_default_removed": round(removed, 4), "onnx_default_peak_rss_mb": rss}
    e, secs, rss = _measured(lambda: export_for_analysis(distinct_copy(model), inputs, ex))
    row = {f"{ex}_export_s": secs, f"{ex}_export_peak_rss_mb": rss, f"{ex}_groups": len(analyze(e.model).prunable_groups)}
    del e
    m = copy.deepcopy(model)
    before = sum(p.numel() for p in m.parameters())
    rep, secs, rss = _measured(lambda: structured_torch(m, inputs, StructuredParams(ratio=0.3, exporter=ex)))
    return row | {f"{ex}_stage_s": secs, f"{ex}_stage_peak_rss_mb": rss,
                  f"{ex}_removed": round(1 - sum(p.numel() for p in m.parameters()) / before, 4),
                  f"{ex}_torch_frozen": [f["group"] for f in rep["torch_frozen"]]}


def table(rows: list[dict]) -> str:
    """The docs/export.md table of a result's rows."""
    lines = ["| model | TorchScript export | dynamo export | groups (TorchScript) | groups (dynamo) | "
             "groups (default `torch.onnx.export` file) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {LABELS.get(r['model'], r['model'])} | {r['torchscript_export_s']} s, "
                     f"{r['torchscript_export_peak_rss_mb']} MB | {r['dynamo_export_s']} s, "
                     f"{r['dynamo_export_peak_rss_mb']} MB | {r['torchscript_groups']} | {r['dynamo_groups']} | "
                     f"{r['onnx_default_groups']} |")
    return "\n".join(lines)


def write_table(rows: list[dict], doc: Path = DOC) -> None:
    text = doc.read_text()
    head, rest = text.split(MARK[0] + "\n", 1)
    _, tail = rest.split(MARK[1], 1)
    doc.write_text(f"{head}{MARK[0]}\n{table(rows)}\n{MARK[1]}{tail}")


def main() -> None:
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for name in MODELS:
        row = {"model": name}
        for ex in ("torchscript", "dynamo", None):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                row |= pool.submit(_child, name, ex).result()
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results" / "bridge_exporters.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    write_table(rows)
    print(table(rows))


if __name__ == "__main__":
    main()
