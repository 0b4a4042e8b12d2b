"""What a Hugging Face model does, decided once: ``causal-lm``, ``classifier`` or ``encoder``.

Loading (which Auto class), evaluation (perplexity vs embedding fidelity), sweeps and ReplaceMe all ask
this question; they all ask it here, so one model is never scored as an LM on one path and as an encoder on
another. The answer comes from the config (its ``architectures`` list, then ``is_decoder``, then whether its
``model_type`` only has a causal-LM head in transformers), falling back to the model's class name.
"""

from __future__ import annotations

from typing import Literal

HFTask = Literal["causal-lm", "classifier", "encoder"]

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_CLASSIFIER_SUFFIXES = ("ForSequenceClassification",)


def _from_names(names: list[str]) -> HFTask | None:
    if any(n.endswith(_CAUSAL_SUFFIXES) for n in names):
        return "causal-lm"
    if any(n.endswith(_CLASSIFIER_SUFFIXES) for n in names):
        return "classifier"
    return None


def _causal_only_model_type(model_type: str) -> bool:
    """True when transformers maps this model type to a causal-LM head and not to a masked-LM head."""
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:  # transformers absent: only configs and class names can answer
        return False
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def hf_task(model_or_config) -> HFTask:
    """The task of a transformers model instance or config (see the module docstring for the rule)."""
    config = getattr(model_or_config, "config", model_or_config)
    names = list(getattr(config, "architectures", None) or [])
    found = _from_names(names)
    if found is None and config is not model_or_config:  # a model instance: its class name says what it is
        found = _from_names([type(model_or_config).__name__])
    if found is not None:
        return found
    if getattr(config, "is_decoder", False):
        return "causal-lm"
    model_type = getattr(config, "model_type", None)
    if model_type and _causal_only_model_type(model_type):
        return "causal-lm"
    return "encoder"


def is_causal_lm(model_or_config) -> bool:
    return hf_task(model_or_config) == "causal-lm"
