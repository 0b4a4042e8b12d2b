"""Evaluation: the one place that runs models over data and measures them.

Public API (everything else in the package is an implementation detail):

* ``measure(model, data, reference, example, latency=...)`` — params, non-zeros, MACs, size, (latency) and
  quality of a model wrapper (``compressor.wrappers``); ``make_reference(model, data, example)`` — what a
  compressed model's quality is compared against; ``quality(model, data, reference)``; ``held_out_texts``.
* ``outputs(model, x)`` — batched forward, fp32 on CPU, of a wrapper or a torch module (on its device).
* metrics: ``output_agreement``, ``accuracy``, ``accuracy_onnx``, ``top1``, ``perplexity``,
  ``embedding_fidelity``, ``count_params``, ``count_nonzero_params``, ``count_macs``, ``onnx_macs``,
  ``onnx_param_count``, ``file_size``.
* latency: ``latency``, ``paired_latency``, ``timed``, ``latency_torch``, ``latency_onnx``.
* running: ``forward``, ``run_batched`` (CUDA graphs / torch.compile on GPU), ``predict``, ``ort_session``,
  ``ort_providers``, ``ort_run_batched``, ``onnx_predict``.
"""

from __future__ import annotations

import torch

from compressor.eval.latency import latency, latency_onnx, latency_torch, paired_latency, timed
from compressor.eval.measure import held_out_texts, make_reference, measure, quality
from compressor.eval.metrics import (
    accuracy,
    accuracy_onnx,
    count_macs,
    count_nonzero_params,
    count_params,
    embedding_fidelity,
    file_size,
    onnx_macs,
    onnx_param_count,
    output_agreement,
    perplexity,
    top1,
)
from compressor.eval.runtime import (
    forward,
    onnx_predict,
    ort_providers,
    ort_run_batched,
    ort_session,
    predict,
    run_batched,
)


def outputs(model, x, batch_size: int = 256) -> torch.Tensor:
    """Batched outputs of `model` over `x`, fp32 on CPU: a wrapper runs where it is placed (ONNX in
    onnxruntime); a bare torch module runs on its own device."""
    if isinstance(model, torch.nn.Module):
        return predict(model, x, batch_size)
    return model.outputs(x, batch_size)  # a compressor.wrappers.Model


__all__ = [
    "accuracy", "accuracy_onnx", "count_macs", "count_nonzero_params", "count_params", "embedding_fidelity",
    "file_size", "forward", "held_out_texts", "latency", "latency_onnx", "latency_torch", "make_reference", "measure",
    "onnx_macs", "onnx_param_count", "onnx_predict", "ort_providers", "ort_run_batched", "ort_session", "output_agreement",
    "outputs", "paired_latency", "perplexity", "predict", "quality", "run_batched", "timed", "top1",
]
