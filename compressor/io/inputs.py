"""Example inputs for a loaded model: what to trace, time and verify with (from the data, the model file, or a
given shape). One answer for the API, the CLI's export and the analyser's torch path."""

from __future__ import annotations

import torch

from compressor.errors import InputError
from compressor.io.data import DataBundle
from compressor.io.models import LoadedModel


def example_inputs_for(loaded: LoadedModel, data: DataBundle | None, input_shape: tuple[int, ...] | None = None, batch: int = 8):
    """Inputs to trace, time and verify with: from the data, the model file, or the given shape."""
    if loaded.kind == "onnx":
        from compressor.onnx_utils import example_feeds

        feeds = example_feeds(loaded.onnx, batch=batch)
        if data is not None and data.test is not None and len(feeds) == 1:
            name = next(iter(feeds))
            feeds[name] = data.test.tensors[0][:batch].numpy().astype(feeds[name].dtype)
        return feeds
    if loaded.kind == "hf":
        from compressor.hf import corpus_sentences

        if loaded.tokenizer is None:
            raise InputError("this Hugging Face folder has no tokenizer", "save the tokenizer into the folder (tokenizer.save_pretrained)")
        texts = (data.texts if data is not None and data.texts else corpus_sentences())[:batch]
        enc = loaded.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    if data is not None and data.test is not None:
        return (data.test.tensors[0][:batch].clone(),)
    if loaded.example_inputs is not None:
        return tuple(loaded.example_inputs)
    if input_shape is not None:
        return (torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0)),)
    raise InputError("cannot tell what input this model takes", "pass --data (e.g. digits) or --input-shape C,H,W")
