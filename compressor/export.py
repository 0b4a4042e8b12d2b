"""Export torch models to ONNX and verify the export numerically before it is written.

Exporter choice: torch.onnx's TorchScript exporter (`dynamo=False`) with constant folding off and
TrainingMode.EVAL. Measured on torch 2.13: it keeps parameter names as initializer names ("conv1.weight") and
BatchNormalization as its own node, and is 2-3x faster than the dynamo exporter on the small test models
(benchmarks/bridge_exporters.py). The torch bridge's analysis export is compressor.analysis_export: torch's
default (dynamo) exporter, which lets the analyser find more groups, with this exporter as its fallback. The exported file is run in onnxruntime against the torch model on the example
inputs and on a second, different batch; if they disagree beyond tolerance nothing is written.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from compressor.errors import VerificationError
from compressor.onnx_files import external_threshold, scratch_path, staged
from compressor.onnx_utils import onnx_file_bytes, run_onnx, write_runtime
from compressor.utils import progress as bars

OPSET = 17


class TensorOutputs(nn.Module):
    """Adapter: call the wrapped model with keyword inputs and return plain tensors (HF ModelOutput → tuple).

    Only the first output is kept for HF models (last_hidden_state / logits): that is what deployments use
    and what the verification compares.
    """

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *args):
        out = self.model(**dict(zip(self.input_names, args, strict=True)))
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
            return out.last_hidden_state
        if hasattr(out, "logits") and out.logits is not None:
            return out.logits
        if isinstance(out, tuple | list):
            return tuple(o for o in out if isinstance(o, torch.Tensor))
        return out[0]


def _as_named(model: nn.Module, example_inputs, input_names):
    """Normalise inputs to (module, args tuple, input names)."""
    if isinstance(example_inputs, dict):
        names = list(example_inputs)
        return TensorOutputs(model, names), tuple(example_inputs.values()), names
    args = tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)
    names = list(input_names) if input_names else (["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))])
    return model, args, names


def _to_numpy(x) -> list[np.ndarray]:
    if isinstance(x, torch.Tensor):
        return [x.detach().float().cpu().numpy()]
    if hasattr(x, "last_hidden_state") and x.last_hidden_state is not None:
        return _to_numpy(x.last_hidden_state)
    if hasattr(x, "logits") and x.logits is not None:
        return _to_numpy(x.logits)
    out = []
    for item in x:
        if isinstance(item, torch.Tensor):
            out += _to_numpy(item)
    return out


def _second_batch(args: tuple, resize_batch: bool) -> tuple:
    """A different batch for verification: for float inputs fresh values with the same mean/std and, when the
    batch axis is dynamic, one more sample (catches shapes baked in by tracing); integer inputs (token ids,
    masks) are reused, rolled along the batch."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for a in args:
        if a.is_floating_point():
            std = float(a.float().std()) if a.numel() > 1 else 1.0
            shape = (a.shape[0] + 1, *a.shape[1:]) if resize_batch and a.dim() > 0 else a.shape
            out.append((torch.randn(shape, generator=g) * (std or 1.0) + float(a.float().mean())).to(a.dtype))
        else:
            out.append(torch.roll(a, 1, dims=0) if a.dim() > 0 and a.shape[0] > 1 else a.clone())
    return tuple(out)


def compare(onnx_outputs: list[np.ndarray], torch_outputs: list[np.ndarray], atol: float, rtol: float) -> float:
    """Max absolute difference; raises VerificationError if any output differs beyond atol + rtol·max|ref|."""
    if len(onnx_outputs) != len(torch_outputs):
        raise VerificationError(f"ONNX model has {len(onnx_outputs)} outputs, torch model {len(torch_outputs)}", "report this as a bug")
    worst = 0.0
    for i, (a, b) in enumerate(zip(onnx_outputs, torch_outputs, strict=True)):
        if a.shape != b.shape:
            raise VerificationError(f"output {i}: ONNX shape {a.shape} vs torch {b.shape}", "the export is wrong; nothing was written")
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        bound = atol + rtol * float(np.max(np.abs(b))) if b.size else atol
        if not np.isfinite(diff) or diff > bound:
            raise VerificationError(
                f"exported model disagrees with the source: output {i} max |diff| = {diff:.3g} > tolerance {bound:.3g}",
                "nothing was written; the model may have data-dependent control flow or a shape that tracing baked in",
            )
        worst = max(worst, diff)
    return worst


def verify_onnx(path_or_bytes, model: nn.Module, example_inputs, *, input_names=None, atol: float = 1e-4,
                rtol: float = 1e-3, extra_batches: bool = True, dynamic_batch: bool = True) -> dict:
    """Run the ONNX model and the torch model on the same inputs; raise VerificationError on disagreement."""
    module, args, names = _as_named(model, example_inputs, input_names)
    resize = dynamic_batch and all(a.is_floating_point() for a in args)
    batches = [args] + ([_second_batch(args, resize)] if extra_batches else [])
    worst = 0.0
    with torch.no_grad():
        for k, batch in enumerate(batches):
            try:
                ref = _to_numpy(module(*batch))
            except RuntimeError:
                if k == 0:
                    raise
                batch = _second_batch(args, resize_batch=False)  # the torch model itself needs this batch size
                ref = _to_numpy(module(*batch))
            feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, batch, strict=True)}
            try:
                got = run_onnx(path_or_bytes, feeds)
            except Exception as e:  # onnxruntime raises its own exception types
                raise VerificationError(
                    f"exported model fails in onnxruntime on a batch of shape {[list(a.shape) for a in batch]}: {str(e).splitlines()[0][:160]}",
                    "nothing was written; the model may hard-code a shape (e.g. the batch size) that tracing baked in",
                ) from e
            worst = max(worst, compare(got, ref, atol, rtol))
    return {"max_abs_diff": worst, "batches": len(batches), "atol": atol, "rtol": rtol}


@contextlib.contextmanager
def _traced_sdpa_flags():
    """The TorchScript tracer returns tensor sizes as 0-d tensors, so an SDPA flag computed from them
    (`is_causal=q.shape[-2] > 1`, `scale=q.shape[-1] ** -0.5`) reaches scaled_dot_product_attention as a
    Tensor, which it refuses ("argument 'is_causal' must be bool, not Tensor"). While tracing, such flags are
    turned into the Python values they have for the example inputs (what Hugging Face's SDPA path does);
    the export is verified against the model on a second batch afterwards."""
    sdpa = F.scaled_dot_product_attention

    def shim(*args, **kwargs):
        if isinstance(kwargs.get("is_causal"), torch.Tensor):
            kwargs["is_causal"] = bool(kwargs["is_causal"])
        if isinstance(kwargs.get("scale"), torch.Tensor):
            kwargs["scale"] = float(kwargs["scale"])
        if len(args) > 5 and isinstance(args[5], torch.Tensor):  # is_causal given by position
            args = (*args[:5], bool(args[5]), *args[6:])
        return sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = shim
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers: what the export's initializers will hold."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@bars.step("exporting to ONNX")
def export_onnx(model: nn.Module, example_inputs, path: str | Path, *, input_names: list[str] | None = None,
                output_names: list[str] | None = None, dynamic_batch: bool = True, dynamic_axes: dict | None = None,
                atol: float = 1e-4, rtol: float = 1e-3, verify: bool = True, opset: int = OPSET) -> dict:
    """Export `model` to ONNX at `path`, verified against torch; returns {"path", "bytes", "max_abs_diff"}.

    example_inputs: a tensor, a tuple of tensors, or a dict of named tensors (HF models).
    Nothing is written unless verification passes (atomic rename).
    """
    path = Path(path)
    was_training = model.training
    model.eval()
    module, args, names = _as_named(model, example_inputs, input_names)
    if dynamic_axes is None and dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in names}
        if isinstance(example_inputs, dict):  # token inputs: sequence length is dynamic too
            dynamic_axes = {n: {0: "batch", 1: "sequence"} for n in names}
    with contextlib.ExitStack() as stack:
        # torch writes a model past the external-data threshold to a file path (external data beside it for
        # > 2 GiB; an in-memory buffer cannot hold it); onnx.load reads it back with its weights
        target = stack.enter_context(scratch_path()) if _state_bytes(model) > external_threshold() else io.BytesIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _traced_sdpa_flags():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, args, target if isinstance(target, io.BytesIO) else str(target), dynamo=False,
                    do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL, opset_version=opset,
                    input_names=names, output_names=output_names, dynamic_axes=dynamic_axes,
                )
        finally:
            model.train(was_training)
        import onnx

        proto = (onnx.ModelProto.FromString(target.getvalue()) if isinstance(target, io.BytesIO)
                 else onnx.load(str(target)))
    report = {"path": str(path), "opset": opset, "exporter": "torchscript"}
    with staged(path) as tmp:  # written (as .onnx + .onnx.data when large), verified from disk, then moved in place
        write_runtime(proto, tmp)
        if verify:
            report.update(verify_onnx(tmp, model, example_inputs, input_names=names, atol=atol, rtol=rtol,
                                      dynamic_batch=bool(dynamic_axes)))
    report["bytes"] = onnx_file_bytes(path)
    return report
