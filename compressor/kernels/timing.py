"""Model latency as a deployment would see it, on the device the model will run on.

- CPU: eager forward under ``torch.inference_mode`` (one thread count, whatever torch is set to).
- CUDA: the forward captured once in a CUDA graph and replayed, so per-kernel launch overhead (which at small
  batches hides what pruning saves; issue 13 measured 0.97x for a 3.2x MAC cut in eager mode) is not timed.
  The model runs in ``dtype`` (bf16 by default: the tensor-core path) and, for 4-D inputs, channels_last.

:func:`runner` gives zero-argument callables; time several of them round-robin with
``kernels.calibrate.time_interleaved`` (medians of interleaved calls), so a ratio between two models is not
faked by the machine drifting between them.
Which device is the caller's choice (``compressor.device``); nothing here picks one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn


def _prepare_args(args: tuple, device: torch.device, dtype: torch.dtype | None, channels_last: bool) -> tuple:
    out = []
    for a in args:
        if isinstance(a, Tensor):
            a = a.to(device)
            if dtype is not None and a.is_floating_point():
                a = a.to(dtype)
            if channels_last and a.dim() == 4:
                a = a.contiguous(memory_format=torch.channels_last)
        out.append(a)
    return tuple(out)


def runner(model: nn.Module, args: tuple, device: torch.device | str, *, dtype: torch.dtype | None = None,
           channels_last: bool = False, cuda_graph: bool = True) -> Callable[[], object]:
    """A zero-argument function running a private copy of `model` on `args` on `device` (the caller's model is
    not moved or cast). CUDA: replays a captured graph when `cuda_graph` (falls back to eager if capture fails)."""
    device = torch.device(device)
    m = copy.deepcopy(model).eval().to(device)
    if dtype is not None:
        m = m.to(dtype)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    xs = _prepare_args(tuple(args), device, dtype, channels_last)

    def eager():
        with torch.inference_mode():
            return m(*xs)

    if device.type != "cuda" or not cuda_graph:
        return eager
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():  # warm-up on a side stream, as the CUDA graphs docs require
            for _ in range(3):
                m(*xs)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = m(*xs)
    except RuntimeError:  # a model that cannot be captured (host syncs, dynamic shapes): time it eagerly
        return eager

    def replay():
        graph.replay()
        return out

    return replay

