"""`measure`: size, cost and quality of one model wrapper, the one evaluation that compress(), `compress
eval` and the other tools call; `make_reference`: what the original model's quality is compared against.

Which quality applies is the wrapper's answer (:meth:`Model.quality_metric`); how to run the model is the
wrapper's too, so nothing here asks which kind of model it is.
"""

from __future__ import annotations

import torch

from compressor.eval.latency import latency as latency_of
from compressor.eval.metrics import batches_quality, embedding_fidelity, output_agreement, perplexity, top1
from compressor.io.bundle import Batches


# Held-out texts a perplexity is measured on: 128, fewer for a model over TEXT_PARAMS parameters (a 1.1 B model
# takes ~20 s per batch of 8 on a 2-core CPU: 128 texts before and after would take ten minutes), never under 16.
TEXTS, TEXT_PARAMS, MIN_TEXTS = 128, 200_000_000, 16


def text_count(n_params: int, base: int = TEXTS) -> int:
    """How many held-out texts a model of `n_params` parameters is measured on: `base` up to TEXT_PARAMS
    parameters, then in inverse proportion to the size (multiples of 8, the batch), never under MIN_TEXTS."""
    if n_params <= TEXT_PARAMS:
        return base
    return max(MIN_TEXTS, int(base * TEXT_PARAMS / n_params) // 8 * 8)


def held_out_texts(data, n: int = TEXTS) -> list[str]:
    """Held-out sentences for text models: the data's test texts, else the shipped corpus's odd lines."""
    from compressor.hf import corpus_sentences

    return list((data.test_texts if data is not None and getattr(data, "test_texts", None) else corpus_sentences()[1::2])[:n])


def make_reference(model, data, example) -> dict:
    """What a compressed model's quality is measured against, computed from the original `model` (a wrapper):
    held-out texts (+ the original's embeddings for encoders), or inputs and the original's outputs."""
    if isinstance(getattr(data, "test", None), Batches) and model.module is not None:  # the caller's batch structure
        return {"outputs": data.test.outputs(model.module)}
    metric = model.quality_metric(data)
    if metric == "accuracy":  # labels are the reference
        return {}
    if metric == "perplexity":
        n = text_count(sum(p.numel() for p in model.module.parameters())) if model.module is not None else TEXTS
        return {"texts": held_out_texts(data, n), "embeddings": None}
    if metric == "embedding_fidelity":
        from compressor.hf import embed

        texts = held_out_texts(data)
        return {"texts": texts, "embeddings": embed(model.module, model.tokenizer, texts)}
    inputs = model.reference_inputs(data, example)
    if inputs is None:
        return {}
    return {"inputs": inputs, "outputs": model.outputs(inputs)}


def quality(model, data, reference: dict | None) -> dict:
    """The quality metric of `model` on `data`: accuracy on labels, perplexity on held-out text, or fidelity /
    output agreement against `reference` (None: only metrics that need no reference)."""
    if isinstance(getattr(data, "test", None), Batches) and model.module is not None:  # the caller's batch structure
        return batches_quality(data.test, model.module, reference)
    metric = model.quality_metric(data)
    reference = reference or {}
    if metric == "accuracy":
        x, y = data.test.tensors[0], data.test.tensors[1]
        return {"accuracy": top1(model.outputs(x), y)}
    if metric == "perplexity":
        texts = reference.get("texts") or held_out_texts(data)
        return {"perplexity": perplexity(model.module, model.tokenizer, texts)}
    if metric == "embedding_fidelity" and reference.get("embeddings") is not None:
        return {"embedding_fidelity": embedding_fidelity(model.module, reference["embeddings"], model.tokenizer, reference["texts"])}
    if metric == "output_agreement" and "outputs" in reference:
        return output_agreement(model.outputs(reference["inputs"]), reference["outputs"])
    return {}


@torch.no_grad()
def measure(model, data=None, reference: dict | None = None, example=None, *, latency: bool = False,
            runs: int = 20, warmup: int = 3) -> dict:
    """Size, cost and quality of one model wrapper, where it runs.

    example: inputs for MACs and latency (default: the wrapper's own from `data`). latency: also time one
    forward (labelled with the runtime and device in ``latency_runtime``).
    """
    if example is None:
        example = model.make_example(data)
    m: dict = {}
    m["params"], m["nonzero_params"] = model.param_counts()
    m["macs"] = model.macs(example)
    m["size_bytes"] = model.size_bytes()
    if latency:
        m["latency_ms"] = latency_of(model, example, runs=runs, warmup=warmup)
        m["latency_runtime"] = model.latency_runtime()
    m.update(quality(model, data, reference))
    return m
