"""Metrics and costs: quality (accuracy, embedding fidelity, output agreement, perplexity), size
(parameters, non-zeros, MACs, file size) and latency (torch, onnxruntime). CUDA + AMP when present.

Quality of a compressed model is always measured on held-out data: the test split for labelled data,
held-out lines for text, and agreement with the original model's outputs when there are no labels.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.train import default_device


def _progress(total: int, description: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if not enabled or total <= 1:
        return None
    bar = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), transient=True)
    bar.start()
    bar.add_task(description, total=total)
    return bar


def count_params(model: nn.Module) -> int:
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


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except Exception:  # noqa: BLE001 - transformers optional
        return None


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
        batch = _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return int(total[0] // max(batch, 1))


def _call(model: nn.Module, inputs) -> int:
    """Run the model on inputs (tuple or dict); returns the batch size."""
    dev = _module_device(model)
    if isinstance(inputs, dict):
        model(**{k: v.to(dev) for k, v in inputs.items()})
        return next(iter(inputs.values())).shape[0]
    args = inputs if isinstance(inputs, tuple | list) else (inputs,)
    model(*[a.to(dev) for a in args])
    return args[0].shape[0]


def _module_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def onnx_macs(model_proto) -> int:
    """MACs per sample of Conv / Gemm / MatMul nodes from inferred shapes (symbolic dims count as 1)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    m = shape_inference.infer_shapes(model_proto)
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
    del onnx, numpy_helper
    return total


def file_size(path: str | Path) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    if p.suffix.lower() == ".onnx" and p.is_file():  # with its external-data file(s)
        from compressor.onnx_utils import onnx_file_bytes

        return onnx_file_bytes(p)
    return p.stat().st_size if p.exists() else 0


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device=None, amp: bool = True, progress: bool = False) -> torch.Tensor:
    device = torch.device(device) if device else _module_device(model)
    use_amp = amp and device.type == "cuda"
    model.eval()
    outs = []
    for i in range(0, len(x), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            outs.append(model(x[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(outs)


def accuracy(model: nn.Module, dataset, batch_size: int = 256) -> float:
    x, y = dataset.tensors[0], dataset.tensors[1]
    return float((predict(model, x, batch_size).argmax(1) == y).float().mean())


def onnx_predict(path_or_bytes, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    sess = ort_session(path_or_bytes)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def accuracy_onnx(path_or_bytes, dataset, batch_size: int = 256) -> float:
    x, y = dataset.tensors[0].numpy(), dataset.tensors[1].numpy()
    return float((onnx_predict(path_or_bytes, x, batch_size).argmax(1) == y).mean())


def output_agreement(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Cosine similarity of flattened outputs and KL(ref || out) of softmax outputs (for logits)."""
    out, ref = out.float().flatten(1), ref.float().flatten(1)
    cos = float(nn.functional.cosine_similarity(out, ref, dim=1).mean())
    kl = float(nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean"))
    return {"output_cosine": cos, "output_kl": kl}


def embedding_fidelity(model: nn.Module, reference: nn.Module | torch.Tensor, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Mean cosine between the model's sentence embeddings and the reference model's (or given embeddings)."""
    from compressor.hf import embed

    e = embed(model, tokenizer, texts, batch_size)
    r = reference if isinstance(reference, torch.Tensor) else embed(reference, tokenizer, texts, batch_size)
    return float((e * r).sum(1).mean())


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 8) -> float:
    """Token-level perplexity of a causal LM on texts (padding excluded)."""
    dev = _module_device(model)
    nll, count = 0.0, 0
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        m = mask[:, 1:].float()
        nll -= float((lp * m).sum())
        count += int(m.sum())
    return float(np.exp(nll / max(count, 1)))


def _timed(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


@torch.no_grad()
def latency_torch(model: nn.Module, example_inputs, runs: int = 30, warmup: int = 5) -> float:
    """Median wall time (ms) of one forward on the example batch (synchronised on CUDA)."""
    model.eval()
    dev = _module_device(model)

    def once():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            _call(model, example_inputs)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return _timed(once, runs, warmup)


def runner(kind: str, model, example):
    """A zero-argument callable running one forward of `model` on `example` (torch module or ONNX bytes)."""
    if kind == "onnx":
        sess = ort_session(model)
        names = {i.name for i in sess.get_inputs()}
        feeds = {k: v for k, v in example.items() if k in names}
        return lambda: sess.run(None, feeds)
    model.eval()
    dev = _module_device(model)

    @torch.no_grad()
    def once():
        # bf16 autocast on CUDA, as deployed; plain fp32 on CPU
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            _call(model, example)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return once


def paired_latency(fn_a, fn_b, runs: int = 30, warmup: int = 5) -> tuple[float, float]:
    """Median ms of two callables timed alternately in one loop, so machine noise hits both alike."""
    for _ in range(warmup):
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


def ort_session(path_or_bytes, threads: int | None = None):
    """onnxruntime session on the CUDA EP when available, else CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    from compressor.onnx_utils import runtime_source

    return ort.InferenceSession(runtime_source(path_or_bytes), so, providers=providers)


def latency_onnx(path_or_bytes, feeds: dict[str, np.ndarray], runs: int = 30, warmup: int = 5, threads: int | None = None) -> float:
    sess = ort_session(path_or_bytes, threads)
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    return _timed(lambda: sess.run(None, feeds), runs, warmup)


def device_name() -> str:
    d = default_device()
    return torch.cuda.get_device_name(0) if d.type == "cuda" else "cpu"
