"""Latency: median wall time of one forward, timed on the device the model runs on (synchronised on CUDA).

Compressed vs original models are timed alternately in one loop (:func:`paired_latency`), so machine noise
hits both alike and cannot fake a ratio.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch import nn

from compressor import device as devices
from compressor.eval.runtime import forward, ort_feeds, ort_session


def _fit_budget(first_s: float, warmup: int, runs: int, budget_s: float) -> tuple[int, int]:
    """(warm-up calls, timed runs) after a first call that took `first_s`: unchanged when they fit in `budget_s`,
    else one warm-up (the first call itself) and the runs that fit, never under 3."""
    if first_s * (warmup + runs) <= budget_s:
        return warmup, runs
    return 1, max(3, min(runs, int(budget_s / max(first_s, 1e-9))))


def timed(fn, runs: int = 30, warmup: int = 5, budget_s: float | None = None) -> float:
    """Median milliseconds of `fn()` over `runs` calls after `warmup` calls. With `budget_s`, the first warm-up
    call is timed and a slow `fn` (an LLM forward on a CPU) gets one warm-up and the runs that fit, never under 3."""
    if budget_s is not None and warmup > 0:
        t = time.perf_counter()
        fn()
        warmup, runs = _fit_budget(time.perf_counter() - t, warmup, runs, budget_s)
        warmup -= 1
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def paired_latency(fn_a, fn_b, runs: int = 30, warmup: int = 5, budget_s: float = 60.0) -> tuple[float, float]:
    """Median ms of two callables timed alternately in one loop, so machine noise hits both alike. The first
    warm-up pair is timed: when `warmup` + `runs` pairs would take over `budget_s` (an LLM forward on a CPU takes
    seconds), the rest of the warm-up is skipped and the runs cut to what fits, never under 3."""
    t = time.perf_counter()
    fn_a()
    fn_b()
    warmup, runs = _fit_budget(time.perf_counter() - t, warmup, runs, budget_s)
    for _ in range(warmup - 1):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(runs):
        t = time.perf_counter()
        fn_a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        fn_b()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def torch_runner(model: nn.Module, example):
    """One forward of a torch module on `example`, on the module's device: autocast with the device's AMP
    dtype on CUDA (as deployed) and synchronised; plain fp32 on CPU."""
    model.eval()
    dev = devices.module_device(model)
    dt = devices.amp_dtype(dev)
    example = devices.to_device(example, dev)

    @torch.no_grad()
    def once():
        with torch.autocast(dev.type, dtype=dt or torch.float32, enabled=dt is not None):
            forward(model, example)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return once


def onnx_runner(session, feeds: dict):
    """One run of an onnxruntime session on the feeds it takes."""
    feeds = ort_feeds(session, feeds)
    return lambda: session.run(None, feeds)


def latency(model, example, runs: int = 30, warmup: int = 5) -> float:
    """Median ms of one forward of a model wrapper on `example`, where the wrapper runs."""
    return timed(model.runner(example), runs, warmup)


def latency_torch(model: nn.Module, example_inputs, runs: int = 30, warmup: int = 5) -> float:
    """Median ms of one forward of a torch module on its device."""
    return timed(torch_runner(model, example_inputs), runs, warmup)


def latency_onnx(path_or_bytes, feeds: dict[str, np.ndarray], runs: int = 30, warmup: int = 5, threads: int | None = None,
                 device=None) -> float:
    """Median ms of one onnxruntime run on `feeds`."""
    return timed(onnx_runner(ort_session(path_or_bytes, threads, device=device), feeds), runs, warmup)
