"""Batched evaluation that uses a GPU well when there is one and gives the same results on CPU.

* :func:`best_device` — ``cuda`` when available, else ``cpu``.
* :func:`run_batched` — model outputs over a dataset in batches: on CUDA with autocast (bf16, or fp16 on
  GPUs without bf16), optionally replaying a captured CUDA graph for the full-size batches (static shapes;
  the last partial batch is padded to the captured size and sliced), or ``torch.compile(mode=
  "reduce-overhead")``. On CPU it is plain fp32 eager, batch by batch, which is the reference the GPU paths
  are tested against (tolerance set by the AMP dtype).
* :func:`ort_session` / :func:`ort_run_batched` — onnxruntime with the CUDA EP first when it is present
  (``onnxruntime-gpu``), else CPU; ``session.get_providers()`` says which one was taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn


def best_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def amp_dtype(device: torch.device | str) -> torch.dtype | None:
    """bf16 on GPUs that have it, else fp16; None on CPU (fp32 reference)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _inputs_of(dataset) -> Tensor:
    if isinstance(dataset, Tensor):
        return dataset
    if hasattr(dataset, "tensors"):  # TensorDataset
        return dataset.tensors[0]
    if isinstance(dataset, Sequence) and dataset and isinstance(dataset[0], Tensor):
        return torch.stack(list(dataset))
    raise TypeError("dataset must be a Tensor, a TensorDataset or a sequence of Tensors")


class _GraphRunner:
    """One captured CUDA graph for a fixed [batch, ...] input."""

    def __init__(self, model: nn.Module, example: Tensor, dtype: torch.dtype | None):
        self.static_in = example.clone()
        self.dtype = dtype
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up on a side stream, as the CUDA graphs docs require
            for _ in range(3):
                self._fwd(model)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self._fwd(model)

    def _fwd(self, model):
        with torch.autocast("cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return model(self.static_in)

    def __call__(self, x: Tensor) -> Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


@torch.no_grad()
def run_batched(model: nn.Module, dataset, batch_size: int = 256, amp: bool = True, *, device=None,
                cuda_graph: bool | str = "auto", compile: bool = False, progress: bool = False) -> Tensor:
    """Outputs of ``model`` over ``dataset`` (first tensor of a TensorDataset), concatenated, fp32 on CPU.

    ``device``: default :func:`best_device`; the model is moved there (in place). ``amp``: autocast on CUDA.
    ``cuda_graph``: True / False / "auto" (capture when on CUDA and there is more than one full batch; falls
    back to eager if capture fails). ``compile``: use ``torch.compile(mode="reduce-overhead")`` instead.
    """
    x = _inputs_of(dataset)
    device = torch.device(device) if device is not None else best_device()
    model.to(device).eval()
    dt = amp_dtype(device) if amp else None
    n = len(x)
    if n == 0:
        return torch.empty(0)
    use_graph = device.type == "cuda" and not compile and (cuda_graph is True or (cuda_graph == "auto" and n > batch_size))
    fwd = model
    if compile and device.type == "cuda":
        fwd = torch.compile(model, mode="reduce-overhead")
    runner = None
    if use_graph:
        try:
            runner = _GraphRunner(model, x[:batch_size].to(device) if n >= batch_size else
                                  _pad(x[:n], batch_size).to(device), dt)
        except Exception:  # noqa: BLE001 - capture is an optimisation; eager gives the same numbers
            runner = None
    outs = []
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("evaluating", total=n)
    for i in range(0, n, batch_size):
        xb = x[i : i + batch_size].to(device, non_blocking=True)
        m = xb.shape[0]
        if runner is not None:
            y = runner(_pad(xb, batch_size) if m < batch_size else xb)[:m]
        else:
            with torch.autocast(device.type, dtype=dt or torch.float32, enabled=dt is not None):
                y = fwd(xb)
        outs.append(y.float().cpu())
        if bar is not None:
            bar.update(task, advance=m)
    if bar is not None:
        bar.stop()
    return torch.cat(outs)


def _pad(x: Tensor, size: int) -> Tensor:
    if x.shape[0] >= size:
        return x
    return torch.cat([x, x[-1:].expand(size - x.shape[0], *x.shape[1:])])


def ort_providers(prefer_cuda: bool = True) -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    order = ("CUDAExecutionProvider", "CPUExecutionProvider") if prefer_cuda else ("CPUExecutionProvider",)
    return [p for p in order if p in avail]


def ort_session(path: str | Path | bytes, threads: int | None = None, prefer_cuda: bool = True):
    """onnxruntime InferenceSession on the CUDA EP when present (onnxruntime-gpu + a GPU), else CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    from compressor.onnx_utils import runtime_source

    return ort.InferenceSession(runtime_source(path), so, providers=ort_providers(prefer_cuda))


def ort_run_batched(path_or_session, x: np.ndarray | Tensor, batch_size: int = 256) -> np.ndarray:
    """First output of an ONNX model over ``x`` in batches (the single-input case)."""
    sess = path_or_session if hasattr(path_or_session, "run") else ort_session(path_or_session)
    name = sess.get_inputs()[0].name
    x = x.numpy() if isinstance(x, Tensor) else x
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])
