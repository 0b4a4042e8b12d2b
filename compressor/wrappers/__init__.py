"""Model wrappers: one class per kind of model, each answering the same questions (device placement,
example inputs, batched forward, task, parameter / MAC counts, size, saving) so no other module branches on
the kind. ``compressor.io.models.load_model`` returns one; :func:`wrap` makes one from an in-memory object.

* :class:`Model` — the interface (``compressor.wrappers.base``).
* :class:`TorchModel` — a plain torch ``nn.Module``.
* :class:`HFModel` — a Hugging Face transformers model + tokenizer (task from ``compressor.task``).
* :class:`OnnxModel` — an ``onnx.ModelProto`` run in onnxruntime.
"""

from __future__ import annotations

from torch import nn

from compressor.errors import InputError
from compressor.wrappers.base import ACCURACY, AGREEMENT, EMBEDDING, PERPLEXITY, Model, is_input_mismatch
from compressor.wrappers.hf_model import HFModel
from compressor.wrappers.onnx_model import OnnxModel
from compressor.wrappers.torch_model import TorchModel, deployable, plain_copy, save_torch

KINDS: dict[str, type[Model]] = {"torch": TorchModel, "hf": HFModel, "onnx": OnnxModel}


def is_hf_module(module: nn.Module) -> bool:
    """A transformers model (it carries a config with a model_type)."""
    return hasattr(module, "config") and hasattr(module.config, "model_type")


def from_parts(kind: str, *, module: nn.Module | None = None, onnx=None, tokenizer=None, **fields) -> Model:
    """A wrapper of the named kind ("torch" | "hf" | "onnx") around a module or ONNX graph."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; one of {sorted(KINDS)}")
    return KINDS[kind].build(module=module, onnx=onnx, tokenizer=tokenizer, **fields)


def wrap(obj, *, tokenizer=None) -> Model:
    """A wrapper around an in-memory model: a wrapper (returned as is), an nn.Module (transformers models
    become HFModel) or an onnx.ModelProto. The caller's object is never moved or modified by the wrapper."""
    if isinstance(obj, Model):
        return obj
    if isinstance(obj, nn.Module):
        return HFModel(obj, tokenizer) if is_hf_module(obj) else TorchModel(obj)
    try:
        import onnx

        if isinstance(obj, onnx.ModelProto):
            return OnnxModel(obj, format="onnx")
    except ImportError:  # pragma: no cover - onnx is a dependency
        pass
    raise InputError(f"cannot use a {type(obj).__name__} as a model", "pass a path, a torch nn.Module or an onnx.ModelProto")


__all__ = [
    "ACCURACY", "AGREEMENT", "EMBEDDING", "HFModel", "KINDS", "Model", "OnnxModel", "PERPLEXITY", "TorchModel",
    "deployable", "from_parts", "is_hf_module", "is_input_mismatch", "plain_copy", "save_torch", "wrap",
]
