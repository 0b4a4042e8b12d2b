"""A Hugging Face transformers model with its tokenizer: a torch module whose task (causal LM, classifier,
encoder) is decided once from its config (``compressor.task.hf_task``), fed tokenised sentences, and saved
as a ``save_pretrained`` folder with the tokenizer."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.nn.utils import parametrize

from compressor.errors import InputError
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
        # a plain copy only when masks / adapters are attached: a 1 B model is written from itself, shard by shard
        # (safetensors writes from the tensors' memory), never through a second full copy
        parametrized = any(parametrize.is_parametrized(m) for m in self.module.modules())
        (plain_copy(self.module) if parametrized else self.module).save_pretrained(target)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(target)
        return {"hf_folder": str(target)}
