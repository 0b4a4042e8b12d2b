"""Metrics of one model: size (parameters, non-zeros, MACs, file size) and quality (accuracy, output
agreement, embedding fidelity, perplexity).

Quality of a compressed model is always measured on held-out data: the test split for labelled data,
held-out lines for text, and agreement with the original model's outputs when there are no labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor import device as devices
from compressor.eval.runtime import forward, ort_run_batched, predict
from compressor.io.bundle import Batches

# --------------------------------------------------------------------------------------------- size


def count_params(model: nn.Module) -> int:
    """Parameters of a torch module, tied parameters once."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def count_nonzero_params(model: nn.Module) -> int:
    """Non-zero entries of the effective parameters: a parametrized (masked) weight counts as its masked
    value, not its stored original; tied parameters count once."""
    from torch.nn.utils.parametrize import ParametrizationList

    seen, n = set(), 0

    def add(t: torch.Tensor, key: int) -> None:
        nonlocal n
        if key not in seen:
            seen.add(key)
            n += int(torch.count_nonzero(t.detach()))

    for mod in model.modules():
        if isinstance(mod, ParametrizationList):
            continue  # holds the unmasked `original`; counted through the owner below
        for p in mod.parameters(recurse=False):
            add(p, id(p))
        for name in getattr(mod, "parametrizations", {}):
            add(getattr(mod, name), id(mod.parametrizations[name].original))
    return n


def onnx_param_count(model) -> tuple[int, int]:
    """(parameters, non-zero parameters) of an ONNX graph: its float initializers, without BatchNorm
    running statistics (buffers in torch, not parameters)."""
    from onnx import numpy_helper

    stats = {n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (3, 4) if len(n.input) > i}
    total = nz = 0
    for init in model.graph.initializer:
        if init.name in stats:
            continue
        a = numpy_helper.to_array(init)
        if a.dtype.kind == "f":
            total += a.size
            nz += int(np.count_nonzero(a))
    return total, nz


def _conv1d_type():
    """GPT-2's Conv1D class, or None when transformers is not installed. A transformers install that is
    present but fails to import is a real error, not an absence: it propagates."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "transformers":
            return None
        raise
    return Conv1D


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates per sample of Conv / Linear / GPT-2 Conv1D layers (attention score matmuls excluded)."""
    conv1d = _conv1d_type()
    total = [0]

    def hook(mod, inp, out):
        out_t = out[0] if isinstance(out, tuple) else out
        if isinstance(mod, nn.modules.conv._ConvNd):
            k = mod.weight.shape[1] * int(np.prod(mod.weight.shape[2:]))
            total[0] += out_t.numel() * k
        elif isinstance(mod, nn.Linear):
            total[0] += out_t.numel() * mod.in_features
        elif conv1d is not None and isinstance(mod, conv1d):
            total[0] += out_t.numel() * mod.weight.shape[0]

    types = (nn.modules.conv._ConvNd, nn.Linear) + ((conv1d,) if conv1d else ())
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, types)]
    try:
        _, batch = forward(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return int(total[0] // max(batch, 1))


def onnx_macs(model_proto) -> int:
    """MACs per sample of Conv / Gemm / MatMul nodes from inferred shapes (symbolic dims count as 1)."""
    from compressor.onnx_files import infer_shapes

    m = infer_shapes(model_proto)  # a weightless view when the model is large
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in m.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in m.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if not out:
            continue
        n_out = int(np.prod(out))
        if node.op_type in ("Conv", "ConvInteger"):
            w = shapes.get(node.input[1])
            if w:
                total += n_out * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul", "MatMulInteger"):
            a = shapes.get(node.input[0])
            if a:
                trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
                total += n_out * (a[0] if (trans_a and len(a) == 2) else a[-1])
    return total


def file_size(path: str | Path) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    if p.suffix.lower() == ".onnx" and p.is_file():  # with its external-data file(s)
        from compressor.onnx_utils import onnx_file_bytes

        return onnx_file_bytes(p)
    return p.stat().st_size if p.exists() else 0


# --------------------------------------------------------------------------------------------- quality


def top1(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Fraction of rows whose arg-max is the label."""
    logits = torch.as_tensor(logits)
    return float((logits.argmax(1) == torch.as_tensor(labels)).float().mean())


def accuracy(model: nn.Module, dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of a torch classifier on a TensorDataset (x, y), on the model's device."""
    if isinstance(dataset, Batches):  # the caller's forward_fn and label position
        return batches_quality(dataset, model, None).get("accuracy", float("nan"))
    x, y = dataset.tensors[0], dataset.tensors[1]
    return top1(predict(model, x, batch_size), y)


def accuracy_onnx(path_or_bytes, dataset, batch_size: int = 256, device=None) -> float:
    """Top-1 accuracy of a single-input ONNX classifier on a TensorDataset (x, y)."""
    x, y = dataset.tensors[0].numpy(), dataset.tensors[1].numpy()
    return top1(ort_run_batched(path_or_bytes, x, batch_size, device=device), y)


def output_agreement(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Cosine similarity of flattened outputs and KL(ref || out) of softmax outputs (for logits)."""
    out, ref = out.float().cpu().flatten(1), ref.float().cpu().flatten(1)
    cos = float(nn.functional.cosine_similarity(out, ref, dim=1).mean())
    kl = float(nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean"))
    return {"output_cosine": cos, "output_kl": kl}


def embedding_fidelity(model: nn.Module, reference: nn.Module | torch.Tensor, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Mean cosine between the model's sentence embeddings and the reference model's (or given embeddings)."""
    from compressor.hf import embed

    e = embed(model, tokenizer, texts, batch_size)
    r = reference if isinstance(reference, torch.Tensor) else embed(reference, tokenizer, texts, batch_size)
    return float((e * r.cpu()).sum(1).mean())


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 8) -> float:
    """Token-level perplexity of a causal LM on texts (padding excluded), on the model's device."""
    dev = devices.module_device(model)
    nll, count = 0.0, 0
    # one pass, no KV cache to fill (HF models; a plain module may not take the keyword)
    no_cache = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        logits = model(input_ids=ids, attention_mask=mask, **no_cache).logits.float()
        lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        m = mask[:, 1:].float()
        nll -= float((lp * m).sum())
        count += int(m.sum())
    return float(np.exp(nll / max(count, 1)))


def batches_quality(data: Batches, model: nn.Module, reference: dict | None) -> dict:
    """Quality on batches of any structure (io.bundle.Batches): accuracy when they carry labels and the output
    is one logit row per sample; agreement with the original model's outputs (reference["outputs"]) otherwise."""
    out = data.outputs(model)
    y = data.labels()
    if y is not None and out.ndim == 2 and out.shape[0] == y.shape[0]:
        return {"accuracy": top1(out, y)}
    if reference and reference.get("outputs") is not None:
        return output_agreement(out, reference["outputs"])
    return {}
