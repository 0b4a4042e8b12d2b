"""A Hugging Face transformers model with its tokenizer: a torch module whose task (causal LM, classifier,
encoder) is decided once from its config (``compressor.task.hf_task``), fed tokenised sentences, and saved
as a ``save_pretrained`` folder with the tokenizer."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from compressor.errors import InputError
from compressor.masks import baked_state_dict, has_masks
from compressor.task import hf_task
from compressor.wrappers.torch_model import TorchModel, plain_copy


class HFModel(TorchModel):
    kind = "hf"
    text_input = True
    trains_on_tensors = False
    saved_as = "hf_folder"  # the file kind save() writes

    @classmethod
    def build(cls, *, module=None, onnx=None, tokenizer=None, **fields) -> HFModel:
        return cls(module, tokenizer, **fields)

    def __init__(self, module: nn.Module, tokenizer=None, **kwargs):
        super().__init__(module, **kwargs)
        self.tokenizer = tokenizer
        self._task = hf_task(module)

    @property
    def task(self) -> str:
        return self._task

    def make_example(self, data, input_shape=None, batch: int = 8):
        from compressor.hf import corpus_sentences

        if self.tokenizer is None:
            raise InputError("this Hugging Face folder has no tokenizer", "save the tokenizer into the folder (tokenizer.save_pretrained)")
        texts = (data.texts if data is not None and data.texts else corpus_sentences())[:batch]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def input_shape(self, example=None):
        return None  # token sequences: any length

    def reference_inputs(self, data, example):
        return None  # text models are judged on held-out sentences (see Model.quality_metric)

    def save(self, folder: Path, stem: str = "model", example=None) -> dict:
        target = Path(folder) / stem
        # a masked model is saved from its own (zeroed) tensors: a plain copy would double the memory of an LLM
        state = baked_state_dict(self.module)
        if state is None:  # another parametrization (an un-merged adapter): baked into a copy
            plain_copy(self.module).save_pretrained(target)
        else:
            self.module.save_pretrained(target, state_dict=state if has_masks(self.module) else None)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(target)
        return {"hf_folder": str(target)}
