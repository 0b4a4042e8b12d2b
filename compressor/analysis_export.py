"""Export a torch model for channel analysis (the torch bridge): torch's default exporter, TorchScript as fallback.

The bridge (compressor.graph.torch_bridge) analyses an ONNX export of the torch model and cuts the torch tensors
the analysis names, so the export must keep every parameter/buffer as an initializer named like the state dict.

torch's default exporter (`torch.onnx.export(..., dynamo=True)`, i.e. torch.export) does, with its optimizer off:
parameters and buffers become initializers under their state-dict names (a keyword-input wrapper adds its
`model.` prefix, as with TorchScript; tied weights are one initializer under one of their names), tensors made in
forward become `<module>.lifted_tensor_N` initializers, BatchNormalization stays one node. Its default optimizer
would break the mapping: it folds BatchNorm into the Conv weight (still named `conv.weight`, other values),
constant-folds `param.unsqueeze(..)` / `weight.T` into new `val_*` initializers and gathers of a parameter by an
index buffer into a constant. So the export here runs with `optimize=False`, then folds only what does not touch a
float state-dict tensor (shape arithmetic: Shape/Gather/CastLike/Concat chains a static shape turns into
literals, index buffers), writes a GatherND whose indices end in 1 as the Gather it is (`table[index]`) and drops
the zero bias it gives a bias-free Conv.
Shapes are static (the example inputs'): the analysis export is never run on another batch size.

Measured on the Swin-like and ViT-like test models (docs/export.md): the analyser finds 4 and 3 prunable groups
on the TorchScript exporter's graph, 14 and 10 on this export (14 and 6 on the file torch.onnx.export writes with
its defaults). If torch.export cannot capture the model (data-dependent control flow, unsupported ops) or
its ONNX disagrees with torch, the TorchScript exporter (compressor.export) is used and the result says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import time
import warnings

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from compressor.errors import CompressorError, InputError, VerificationError

EXPORTERS = ("auto", "dynamo", "torchscript")
log = logging.getLogger("compressor")


@dataclasses.dataclass
class AnalysisExport:
    """An ONNX export of a torch model for analysis, and which exporter made it."""

    model: onnx.ModelProto
    exporter: str  # "dynamo" (torch's default exporter) | "torchscript"
    seconds: float
    note: str | None = None  # why the TorchScript fallback was used

    def info(self) -> dict:
        return {"exporter": self.exporter, "export_seconds": round(self.seconds, 2)} | (
            {"exporter_note": self.note} if self.note else {})


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and logs warnings (e.g. skipped torchvision ops): not ours to show."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def _state_names(module: nn.Module) -> set[str]:
    tensors = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    return {n for n, t in tensors.items() if t.is_floating_point()}


def _fold_shapes(model, keep: set[str]) -> None:
    """Constant-fold the onnx_ir model in place except nodes reading a float state-dict tensor (those must stay
    initializers under their names); constants left are lifted to initializers, dead nodes removed."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding as cf

    def should_fold(node):
        if any(v is not None and v.is_initializer() and v.name in keep for v in node.inputs):
            return False
        return None  # onnxscript's own rules (size limits, ops it never folds)

    fold = cf.FoldConstantsPass(shape_inference=True, input_size_limit=cf.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                output_size_limit=cf.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT, should_fold=should_fold)
    ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([fold, common.RemoveUnusedNodesPass()], steps=2, early_stop=True),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.RemoveUnusedNodesPass(),
    )(model)


def _gathernd_as_gather(model: onnx.ModelProto) -> int:
    """GatherND(data, indices[..., 1]) with batch_dims 0 is Gather(data, indices[..., 0], axis=0) (torch's
    `table[index]`); the analyser has a rule for Gather. Returns how many nodes were rewritten."""
    inits = {i.name: i for i in model.graph.initializer}
    n = 0
    for node in model.graph.node:
        if node.op_type != "GatherND" or node.input[1] not in inits:
            continue
        if any(a.name == "batch_dims" and a.i != 0 for a in node.attribute):
            continue
        idx = numpy_helper.to_array(inits[node.input[1]])
        if idx.ndim < 1 or idx.shape[-1] != 1:
            continue
        name = f"{node.input[1]}__gather"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(idx[..., 0]), name))
        node.op_type, node.input[1] = "Gather", name
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("axis", 0))
        n += 1
    return n


def _drop_zero_bias(model: onnx.ModelProto, keep: set[str]) -> int:
    """The exporter gives a bias-free Conv a zero bias it makes itself (`val_N`): not a torch tensor, so the
    bridge would have nothing to cut; the input is optional, so it is dropped. Returns how many were dropped."""
    inits = {i.name: i for i in model.graph.initializer}
    n = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) == 3 and node.input[2] in inits \
                and node.input[2] not in keep and not numpy_helper.to_array(inits[node.input[2]]).any():
            del node.input[2]
            n += 1
    used = {i for node in model.graph.node for i in node.input}
    for init in [i for i in model.graph.initializer if i.name not in used and i.name not in keep]:
        model.graph.initializer.remove(init)
    return n


def dynamo_export(model: nn.Module, example_inputs, *, verify: bool = True) -> onnx.ModelProto:
    """The analysis export through torch's default exporter (see the module docstring), verified against torch
    in onnxruntime on the example inputs and on a second batch of the same shape; raises on failure."""
    import torch

    from compressor.export import _as_named, verify_onnx
    from compressor.onnx_files import is_large
    from compressor.onnx_utils import runtime_bytes

    was = model.training
    model.eval()
    module, args, names = _as_named(model, example_inputs, None)
    try:
        with _quiet(), torch.no_grad():
            prog = torch.onnx.export(module, args, input_names=names, dynamo=True, optimize=False, verify=False,
                                     report=False)
            _fold_shapes(prog.model, _state_names(module))
            proto = prog.model_proto
    finally:
        model.train(was)
    _gathernd_as_gather(proto)
    _drop_zero_bias(proto, _state_names(module))
    large = is_large(proto)  # past the external-data threshold: no bytes form; onnxruntime reads a temporary pair
    src = proto if large else runtime_bytes(proto)  # small: stamped with an IR version onnxruntime accepts
    if verify:
        verify_onnx(src, model, example_inputs, input_names=names, dynamic_batch=False)
    return proto if large else onnx.ModelProto.FromString(src)


def torchscript_export(model: nn.Module, example_inputs) -> onnx.ModelProto:
    """The analysis export through the TorchScript exporter (compressor.export), verified."""
    import tempfile
    from pathlib import Path

    from compressor.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "analysis.onnx"
        export_onnx(model, example_inputs, path)
        return onnx.load(str(path))


def export_for_analysis(model: nn.Module, example_inputs, exporter: str = "auto") -> AnalysisExport:
    """Export `model` (already made distinct: torch_bridge.distinct_copy) for analysis.

    exporter: auto (torch's default exporter, the TorchScript one if that fails, with a note saying why),
    dynamo (no fallback) or torchscript."""
    if exporter not in EXPORTERS:
        raise InputError(f"exporter {exporter!r} is not one of {', '.join(EXPORTERS)}", "e.g. --exporter auto")
    t0 = time.perf_counter()
    note = None
    if exporter != "torchscript":
        try:
            return AnalysisExport(dynamo_export(model, example_inputs), "dynamo", time.perf_counter() - t0)
        except Exception as e:  # torch.export and onnxscript raise many types; the fallback below decides
            if exporter == "dynamo":
                raise
            cause = e.__cause__ or e  # torch.onnx wraps torch.export's error in a generic "step 1/3" one
            why = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()  # no terminal colour codes in a report
            why = why.splitlines()[0][:200] if why else ""
            note = f"torch's default exporter failed ({type(cause).__name__}: {why}); analysed the TorchScript export"
            log.warning("note: %s", note)
    try:
        proto = torchscript_export(model, example_inputs)
    except VerificationError:
        raise
    except Exception as e:  # e.g. a torch.export program (.pt2): the tracer cannot take its graph module
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        if exporter == "torchscript":
            raise InputError(f"the TorchScript exporter cannot export this model ({why})",
                             "use --exporter auto (torch's default exporter)") from e
        raise CompressorError(f"neither exporter can export this model for analysis: {note}; TorchScript: {why}",
                              "export it to ONNX yourself and pass the .onnx file") from e
    return AnalysisExport(proto, "torchscript", time.perf_counter() - t0, note)
