"""How a sweep measures quality: an :class:`Evaluator` per model and data, chosen in one place
(:func:`make_evaluator`), which measures the dense model once and then scores each pruned copy against it.

Quality is always "higher is better" and in percent, so ``eps=1.0`` means one point: accuracy on the test
split for labelled data; mean cosine between the pruned and the dense sentence embeddings on held-out
sentences for text/embedding models; mean cosine of next-token logits for causal LMs; cosine to the dense
model's outputs otherwise (KL to the dense outputs is recorded next to it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compressor import eval as ev
from compressor.device import module_device
from compressor.errors import InputError
from compressor.eval.runtime import first_tensor
from compressor.task import is_causal_lm


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The model's outputs over `x` in fp32 on the CPU (compressor.eval runs them on the model's device)."""
    return ev.predict(model.eval(), x, batch_size).float().cpu()


def _agreement(out: torch.Tensor, ref: torch.Tensor) -> dict:
    a = ev.output_agreement(out, ref)
    return {"output_cosine": a["output_cosine"], "output_kl": a["output_kl"]}


@dataclass
class Evaluator:
    """Quality of a (pruned) model relative to the dense one. `fn(model)` returns {"metric": percent, ...}."""

    metric: str
    description: str
    dense: dict
    fn: Callable[[nn.Module], dict]
    n_samples: int = 0
    example: object = None  # a small batch of the inputs it scores (tuple or dict): where the output layer is seen

    def __call__(self, model: nn.Module) -> dict:
        return self.fn(model)


def _embedding_evaluator(model, tokenizer, texts: list[str], batch_size: int) -> Evaluator:
    from compressor.hf import embed

    ref = embed(model, tokenizer, texts, batch_size)
    ref_nn = _nearest(ref)

    def fn(m):
        e = embed(m, tokenizer, texts, batch_size)
        cos = (e * ref).sum(1)
        return {"metric": 100.0 * float(cos.mean()), "embedding_cosine_min": float(cos.min()),
                "nn_agreement": 100.0 * float((_nearest(e) == ref_nn).float().mean())}

    dense = {"metric": 100.0, "embedding_cosine_min": 1.0, "nn_agreement": 100.0}
    example = dict(tokenizer(texts[:1], return_tensors="pt", truncation=True))  # one sentence: no padding needed
    return Evaluator("embedding_cosine_%", f"mean cosine (×100) between pruned and dense sentence embeddings on {len(texts)} held-out sentences",
                     dense, fn, len(texts), example)


def _nearest(e: torch.Tensor) -> torch.Tensor:
    """Index of each embedding's nearest other embedding (retrieval top-1)."""
    s = e @ e.T
    s.fill_diagonal_(-float("inf"))
    return s.argmax(1)


def _lm_evaluator(model, tokenizer, texts: list[str], batch_size: int, max_length: int = 64) -> Evaluator:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = [tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
               for i in range(0, len(texts), batch_size)]

    @torch.no_grad()
    def logits(m):
        dev = module_device(m)
        m.eval()
        outs = []
        for enc in batches:
            lg = first_tensor(m(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))).float().cpu()
            outs.append(lg[enc["attention_mask"].bool()])
        return torch.cat(outs)

    ref = logits(model)

    def fn(m):
        out = logits(m)
        a = _agreement(out, ref)
        return {"metric": 100.0 * a["output_cosine"], "output_kl": a["output_kl"],
                "top1_agreement": 100.0 * float((out.argmax(1) == ref.argmax(1)).float().mean())}

    example = {k: batches[0][k][:2] for k in ("input_ids", "attention_mask")}
    return Evaluator("output_cosine_%", f"mean cosine (×100) of next-token logits to the dense model on {len(texts)} held-out texts",
                     {"metric": 100.0, "output_kl": 0.0, "top1_agreement": 100.0}, fn, len(texts), example)


def make_evaluator(model: nn.Module, *, data=None, tokenizer=None, n_texts: int = 256,
                   batch_size: int = 32) -> Evaluator:
    """Pick the metric for this model and data (module doc) and measure the dense model once.

    The one place where the model's kind and task choose how quality is measured: labelled data → accuracy;
    a Hugging Face model with its tokenizer → logits agreement (causal LMs) or embedding cosine (encoders);
    other inputs → output cosine."""
    if data is not None and data.task == "classification" and data.test is not None:
        x, y = data.test.tensors[0], data.test.tensors[1]
        ref = _outputs(model, x)
        dense_acc = 100.0 * ev.accuracy(model, data.test)

        def fn(m):
            out = _outputs(m, x)
            return {"metric": 100.0 * float((out.argmax(1) == y).float().mean()), **_agreement(out, ref)}

        return Evaluator("accuracy_%", f"top-1 accuracy (%) on the {len(x)} test samples of {data.source or 'the data'}",
                         {"metric": dense_acc, "output_cosine": 1.0, "output_kl": 0.0}, fn, len(x), (x[:2],))
    if tokenizer is not None:  # a text model with its tokenizer
        from compressor.hf import corpus_sentences

        texts = None
        if data is not None:
            texts = data.test_texts or data.texts
        source = "the data"
        if not texts:
            texts, source = corpus_sentences()[1::2], "the shipped corpus (odd lines)"
        texts = list(texts)[:n_texts]
        if len(texts) < 2:
            raise InputError(f"need at least 2 held-out sentences to measure quality, got {len(texts)}", "give a longer text file with --data text:PATH")
        make = _lm_evaluator if is_causal_lm(model) else _embedding_evaluator
        ev_ = make(model, tokenizer, texts, batch_size)
        ev_.description += f" from {source}"
        return ev_
    if data is not None and (data.test is not None or data.train is not None):
        x = (data.test or data.train).tensors[0]
        ref = _outputs(model, x)

        def fn(m):
            a = _agreement(_outputs(m, x), ref)
            return {"metric": 100.0 * a["output_cosine"], "output_kl": a["output_kl"]}

        return Evaluator("output_cosine_%", f"mean cosine (×100) of outputs to the dense model on {len(x)} inputs (KL alongside)",
                         {"metric": 100.0, "output_kl": 0.0}, fn, len(x), (x[:2],))
    raise InputError("a sweep needs data to measure quality at each sparsity",
                     "pass --data (digits | npz:PATH | text:PATH for HF text models | random)")

