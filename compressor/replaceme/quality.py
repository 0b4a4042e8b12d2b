"""How a ReplaceMe-pruned model compares with the dense one: the measurements behind its baseline table.

Kept apart from the algorithm on purpose: this is evaluation, and built on compressor.eval: :func:`dense_reference` and :func:`quality`
(:func:`count_params` is compressor.eval's).
"""

from __future__ import annotations

import torch
from torch import nn

from compressor import eval as ev
from compressor.eval import count_params  # noqa: F401  (re-exported: the baseline tables count with it)
from compressor.task import is_causal_lm


def _outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Outputs flattened per sample, fp32 on the CPU (compressor.eval runs them on the model's device)."""
    o = ev.predict(model.eval(), inputs).float().cpu()
    return o.reshape(o.shape[0], -1)


@torch.no_grad()
def dense_reference(dense: nn.Module, *, tokenizer=None, texts: list[str] | None = None,
                    inputs: torch.Tensor | None = None):
    """What :func:`quality` compares against, computed once for several pruned models: the dense model's
    sentence embeddings (encoders on texts) or outputs (on inputs); None for causal LMs (perplexity needs none)."""
    if texts is not None and tokenizer is not None:
        if is_causal_lm(dense):
            return None
        from compressor.hf import embed

        return embed(dense, tokenizer, texts)
    if inputs is not None:
        return _outputs(dense, inputs)
    return None


@torch.no_grad()
def quality(model: nn.Module, dense: nn.Module, *, tokenizer=None, texts: list[str] | None = None,
            inputs: torch.Tensor | None = None, reference=None) -> dict:
    """How close a pruned model stays to the dense one on held-out data: embedding cosine fidelity (encoders),
    perplexity (causal LMs), or mean output cosine (plain torch models). `reference`: the dense model's
    :func:`dense_reference` on the same data, when the caller already has it."""
    if texts is not None and tokenizer is not None:
        if is_causal_lm(model):
            return {"perplexity": ev.perplexity(model, tokenizer, texts)}
        from compressor.hf import embed

        ref = reference if reference is not None else embed(dense, tokenizer, texts)
        return {"embedding_fidelity": float((embed(model, tokenizer, texts) * ref).sum(1).mean())}
    if inputs is not None:
        ref = reference if reference is not None else _outputs(dense, inputs)
        return {"output_cosine": float(torch.nn.functional.cosine_similarity(_outputs(model, inputs), ref, dim=-1).mean())}
    return {}
