"""Running models over data: one forward on example inputs, batched outputs over a dataset (torch: fp32 on
CPU, autocast on CUDA with the AMP dtype of ``compressor.device``, optionally replaying a captured CUDA graph
or ``torch.compile``), and onnxruntime sessions whose execution provider follows the device policy.

On CPU the batched forward is plain fp32 eager, batch by batch: the reference the GPU paths are tested against
(tolerance set by the AMP dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from compressor import device as devices
from compressor.utils import progress as bars
from compressor.utils.outputs import first_tensor  # noqa: F401  (here since eval was its only user)


def forward(model: nn.Module, inputs):
    """One forward of `model` on inputs (a tensor, a tuple/list of tensors, or a dict of keyword tensors),
    moved to the model's device first. Returns (output, batch size)."""
    dev = devices.module_device(model)
    if isinstance(inputs, dict):
        return model(**devices.to_device(inputs, dev)), next(iter(inputs.values())).shape[0]
    args = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    return model(*devices.to_device(args, dev)), args[0].shape[0]


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
            return first_tensor(model(self.static_in))

    def __call__(self, x: Tensor) -> Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


@torch.no_grad()
def run_batched(model: nn.Module, dataset, batch_size: int = 256, amp: bool = True, *, device=None,
                cuda_graph: bool | str = "auto", compile: bool = False, progress: bool = False) -> Tensor:
    """Outputs of ``model`` over ``dataset`` (first tensor of a TensorDataset), concatenated, fp32 on CPU.

    ``device``: any ``--device`` spec (default ``auto``); the model runs there and is moved back to where the
    caller had it before this returns. ``amp``:
    autocast on CUDA. ``cuda_graph``: True / False / "auto" (capture when on CUDA and there is more than one
    full batch; falls back to eager if capture fails). ``compile``: ``torch.compile(mode="reduce-overhead")``.
    """
    x = _inputs_of(dataset)
    device = devices.resolve(device)
    home = devices.module_device(model)
    try:
        return _run_batched(model.to(device).eval(), x, batch_size, amp, device, cuda_graph, compile, progress)
    finally:
        model.to(home)


def _run_batched(model: nn.Module, x: Tensor, batch_size: int, amp: bool, device: torch.device,
                 cuda_graph: bool | str, compile: bool, progress: bool) -> Tensor:
    dt = devices.amp_dtype(device) if amp else None
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
    with bars.progress("evaluating", total=n, show=progress) as bar:
        for i in range(0, n, batch_size):
            xb = x[i : i + batch_size].to(device, non_blocking=True)
            m = xb.shape[0]
            if runner is not None:
                y = runner(_pad(xb, batch_size) if m < batch_size else xb)[:m]
            else:
                with torch.autocast(device.type, dtype=dt or torch.float32, enabled=dt is not None):
                    y = first_tensor(fwd(xb))
            outs.append(y.float().cpu())
            bar.advance(m)
    return torch.cat(outs)


def _pad(x: Tensor, size: int) -> Tensor:
    if x.shape[0] >= size:
        return x
    return torch.cat([x, x[-1:].expand(size - x.shape[0], *x.shape[1:])])


def predict(model: nn.Module, x: Tensor, batch_size: int = 256, device=None, amp: bool = True, progress: bool = False) -> Tensor:
    """Outputs of `model` over `x` on the model's own device (or `device`), fp32 on CPU; no graph capture."""
    return run_batched(model, x, batch_size, amp, device=device if device is not None else devices.module_device(model),
                       cuda_graph=False, progress=progress)


# --------------------------------------------------------------------------------------------- onnxruntime


def ort_providers(device=None) -> list[str]:
    """Execution providers for `device` (any ``--device`` spec): the CUDA EP first on a GPU when this
    onnxruntime build has it, always the CPU EP."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    order = ("CUDAExecutionProvider", "CPUExecutionProvider") if devices.resolve(device).type == "cuda" else ("CPUExecutionProvider",)
    return [p for p in order if p in avail]


def ort_session(path: str | Path | bytes, threads: int | None = None, device=None):
    """onnxruntime InferenceSession (from a path, bytes or a ModelProto of any size) on the providers of
    `device`; ``session.get_providers()`` says which ran."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    from compressor.onnx_utils import inference_session

    return inference_session(path, so, providers=ort_providers(device))


def session_label(session) -> str:
    """Where an onnxruntime session runs, in ``compressor.device.label`` terms."""
    return devices.label("cuda") if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


def ort_feeds(session, feeds: dict) -> dict[str, np.ndarray]:
    """The feeds this session takes (others dropped), as numpy arrays."""
    names = {i.name for i in session.get_inputs()}
    return {k: (v.numpy() if isinstance(v, Tensor) else v) for k, v in feeds.items() if k in names}


def ort_run_batched(path_or_session, x: np.ndarray | Tensor, batch_size: int = 256, device=None) -> np.ndarray:
    """First output of an ONNX model over ``x`` in batches (the single-input case)."""
    sess = path_or_session if hasattr(path_or_session, "run") else ort_session(path_or_session, device=device)
    name = sess.get_inputs()[0].name
    x = x.numpy() if isinstance(x, Tensor) else x
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def onnx_predict(path_or_bytes, x: np.ndarray, batch_size: int = 256, device=None) -> np.ndarray:
    return ort_run_batched(path_or_bytes, x, batch_size, device=device)
