"""Real architectures from Hugging Face transformers (code no one here wrote), built from tiny configs.

Each model is a thin subclass of the HF class whose forward takes positional tensors and returns the logits
tensor (use_cache=False, return_dict=False), so parameter names are exactly HF's and both the ONNX exporter
and torch-pruning can call it. Parameters are re-drawn from a seeded normal: freshly initialised HF models
have many identical tensors (zero biases, unit LayerNorm scales) and the TorchScript exporter deduplicates
initializers by value, which would make one initializer feed several unrelated layers.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from graphs import ZooEntry, register

TINY = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "vocab": 100, "positions": 64}
SEQ = 8


@functools.cache
def _wrapped(cls: type, input_names: tuple[str, ...]) -> type:
    def forward(self, *args):
        kwargs = dict(zip(input_names, args, strict=True))
        if "input_ids" in input_names:
            kwargs["use_cache"] = False
        return cls.forward(self, **kwargs, return_dict=False)[0]

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__})


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "LayerNorm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight",
                              "layernorm_before.weight", "layernorm_after.weight", "layernorm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _text_inputs(batch: int = 2, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, TINY["vocab"], (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    return ids, mask


def _build(cls_path: str, cfg_path: str, cfg_kwargs: dict, impl: str, input_names: tuple[str, ...], inputs_fn):
    import importlib

    mod = importlib.import_module("transformers")
    cfg = getattr(mod, cfg_path)(**cfg_kwargs)
    cfg._attn_implementation = impl
    model = _wrapped(getattr(mod, cls_path), input_names)(cfg)
    return _randomise(model).eval(), inputs_fn()


def _bert_cfg(layers: int = TINY["layers"]) -> dict:
    return dict(vocab_size=TINY["vocab"], hidden_size=TINY["hidden"], num_hidden_layers=layers,
                num_attention_heads=TINY["heads"], intermediate_size=TINY["intermediate"],
                max_position_embeddings=TINY["positions"], num_labels=3)


def _gpt2_cfg(layers: int = TINY["layers"]) -> dict:
    return dict(vocab_size=TINY["vocab"], n_embd=TINY["hidden"], n_layer=layers, n_head=TINY["heads"],
                n_inner=TINY["intermediate"], n_positions=TINY["positions"])


def _llama_cfg(layers: int = TINY["layers"]) -> dict:
    return dict(vocab_size=TINY["vocab"], hidden_size=TINY["hidden"], num_hidden_layers=layers,
                num_attention_heads=TINY["heads"], num_key_value_heads=2, intermediate_size=TINY["intermediate"],
                max_position_embeddings=TINY["positions"])


def _vit_cfg(layers: int = TINY["layers"]) -> dict:
    return dict(image_size=16, patch_size=4, num_channels=3, hidden_size=TINY["hidden"], num_hidden_layers=layers,
                num_attention_heads=TINY["heads"], intermediate_size=TINY["intermediate"], num_labels=10)


TEXT = ("input_ids", "attention_mask")

TP_ATTENTION = {"finer": "attention", "why": "torch-pruning treats the activation×activation MatMuls of attention as "
                "element-wise ops, so Q, K, V outputs and the output projection's input land in one group; in ONNX "
                "Q·Kᵀ contracts head_dim (Q↔K coupled) and softmax·V is a separate MatMul (V↔O coupled), so an ONNX "
                "analyser may report two finer groups whose union is tp's group"}


def build_bert(impl: str = "eager", layers: int = TINY["layers"]):
    return _build("BertForSequenceClassification", "BertConfig", _bert_cfg(layers), impl, TEXT, _text_inputs)


def build_gpt2(impl: str = "eager", layers: int = TINY["layers"]):
    return _build("GPT2LMHeadModel", "GPT2Config", _gpt2_cfg(layers), impl, TEXT, _text_inputs)


def build_llama(impl: str = "eager", layers: int = TINY["layers"]):
    return _build("LlamaForCausalLM", "LlamaConfig", _llama_cfg(layers), impl, TEXT, _text_inputs)


def build_vit(impl: str = "eager", layers: int = TINY["layers"]):
    return _build("ViTForImageClassification", "ViTConfig", _vit_cfg(layers), impl, ("pixel_values",),
                  lambda: (torch.randn(2, 3, 16, 16),))


BUILDERS = {"bert": build_bert, "gpt2": build_gpt2, "llama": build_llama, "vit": build_vit}


def _members(prefix: str, names: list[str], label: str) -> list[tuple[str, str]]:
    return [(f"{prefix}{n}", label) for n in names]


def _bert_expected(L: int = TINY["layers"]) -> dict:
    lay = "bert.encoder.layer.{i}."
    hidden = [("bert.embeddings.word_embeddings.weight", "out"), ("bert.embeddings.position_embeddings.weight", "out"),
              ("bert.embeddings.token_type_embeddings.weight", "out"), ("bert.embeddings.LayerNorm.weight", "out"),
              ("bert.pooler.dense.weight", "in")]
    for i in range(L):
        p = lay.format(i=i)
        hidden += _members(p, ["attention.self.query.weight", "attention.self.key.weight",
                               "attention.self.value.weight", "intermediate.dense.weight"], "in")
        hidden += _members(p, ["attention.output.dense.weight", "attention.output.LayerNorm.weight",
                               "output.dense.weight", "output.LayerNorm.weight"], "out")
    return {
        "blocks": L,
        "tied": [hidden,  # the residual stream: every embedding, every LayerNorm, every block output
                 *[[(lay.format(i=i) + "attention.self.query.weight", "out"),
                    (lay.format(i=i) + "attention.self.key.weight", "out")] for i in range(L)],  # QKᵀ contracts
                 *[[(lay.format(i=i) + "attention.self.value.weight", "out"),
                    (lay.format(i=i) + "attention.output.dense.weight", "in")] for i in range(L)],
                 *[[(lay.format(i=i) + "intermediate.dense.weight", "out"),
                    (lay.format(i=i) + "output.dense.weight", "in")] for i in range(L)],
                 [("bert.pooler.dense.weight", "out"), ("classifier.weight", "in")]],
        "separate": [[(lay.format(i=0) + "intermediate.dense.weight", "out"),
                      (lay.format(i=0) + "attention.self.value.weight", "out")]],
        "frozen": [("classifier.weight", "out"), ("classifier.bias", "out")],
        "heads": {"num_heads": TINY["heads"], "head_dim": TINY["hidden"] // TINY["heads"]},
        "tp": TP_ATTENTION,
    }


def _gpt2_expected(L: int = TINY["layers"]) -> dict:
    h = "transformer.h.{i}."
    hidden = [("transformer.wte.weight", "out"), ("transformer.wpe.weight", "out"), ("transformer.ln_f.weight", "out")]
    for i in range(L):
        hidden += _members(h.format(i=i), ["ln_1.weight", "ln_2.weight", "attn.c_proj.weight", "mlp.c_proj.weight"], "out")
        hidden += _members(h.format(i=i), ["attn.c_attn.weight", "mlp.c_fc.weight"], "in")
    return {
        "blocks": L,
        "tied": [hidden, *[[(h.format(i=i) + "mlp.c_fc.weight", "out"), (h.format(i=i) + "mlp.c_proj.weight", "in")]
                           for i in range(L)]],
        # the fused c_attn [64, 192] holds q | k | v along its out axis: offsets 0, 64, 128
        "fused_qkv": {"param": "transformer.h.0.attn.c_attn.weight", "axis": 1, "splits": [64, 64, 64]},
        # lm_head is tied to wte: its out axis is the vocabulary (wte dim 0), which reaches the output
        "frozen": [("transformer.wte.weight", "dim0")],
        "tied_weights": {"lm_head.weight": "transformer.wte.weight"},
        "separate": [[(h.format(i=0) + "mlp.c_fc.weight", "out"), (h.format(i=0) + "attn.c_attn.weight", "out")]],
    }


def _llama_expected(L: int = TINY["layers"]) -> dict:
    lay = "model.layers.{i}."
    hidden = [("model.embed_tokens.weight", "out"), ("model.norm.weight", "out"), ("lm_head.weight", "in")]
    for i in range(L):
        p = lay.format(i=i)
        hidden += _members(p, ["input_layernorm.weight", "post_attention_layernorm.weight",
                               "self_attn.o_proj.weight", "mlp.down_proj.weight"], "out")
        hidden += _members(p, ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                               "mlp.gate_proj.weight", "mlp.up_proj.weight"], "in")
    return {
        "blocks": L,
        "tied": [hidden,
                 # SwiGLU: gate ⊙ up are multiplied elementwise, then down_proj contracts them
                 *[[(lay.format(i=i) + "mlp.gate_proj.weight", "out"), (lay.format(i=i) + "mlp.up_proj.weight", "out"),
                    (lay.format(i=i) + "mlp.down_proj.weight", "in")] for i in range(L)],
                 # GQA: v_proj (2 kv heads × 16) is repeated to 4 heads, then o_proj contracts them
                 *[[(lay.format(i=i) + "self_attn.v_proj.weight", "out"), (lay.format(i=i) + "self_attn.o_proj.weight", "in")]
                   for i in range(L)]],
        "gqa": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "q_out": 64, "kv_out": 32},
        # rotary embedding rotates pairs (j, j + head_dim/2) of q and k: those dims are coupled inside a head
        "rotary": True,
        "separate": [[(lay.format(i=0) + "mlp.gate_proj.weight", "out"), (lay.format(i=0) + "self_attn.v_proj.weight", "out")]],
        "tp": {"timeout": True, "why": "torch-pruning 1.6 builds the graph in < 1 s but get_all_groups did not "
               "finish in 100 s on this GQA model (measured); no second opinion here"},
        "frozen": [("lm_head.weight", "out")],
    }


def _vit_expected(L: int = TINY["layers"]) -> dict:
    lay = "vit.layers.{i}."
    hidden = [("vit.embeddings.cls_token", "out"), ("vit.embeddings.position_embeddings", "out"),
              ("vit.embeddings.patch_embeddings.projection.weight", "out"), ("vit.layernorm.weight", "out"),
              ("classifier.weight", "in")]
    for i in range(L):
        p = lay.format(i=i)
        hidden += _members(p, ["layernorm_before.weight", "layernorm_after.weight", "attention.o_proj.weight",
                               "mlp.fc2.weight"], "out")
        hidden += _members(p, ["attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight",
                               "mlp.fc1.weight"], "in")
    return {
        "blocks": L,
        "tied": [hidden,
                 *[[(lay.format(i=i) + "attention.q_proj.weight", "out"), (lay.format(i=i) + "attention.k_proj.weight", "out")]
                   for i in range(L)],
                 *[[(lay.format(i=i) + "attention.v_proj.weight", "out"), (lay.format(i=i) + "attention.o_proj.weight", "in")]
                   for i in range(L)],
                 *[[(lay.format(i=i) + "mlp.fc1.weight", "out"), (lay.format(i=i) + "mlp.fc2.weight", "in")]
                   for i in range(L)]],
        "separate": [[(lay.format(i=0) + "mlp.fc1.weight", "out"), (lay.format(i=0) + "attention.v_proj.weight", "out")]],
        "free_parameters": ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings"],
        "frozen": [("classifier.weight", "out"), ("classifier.bias", "out")],
        "patch_conv": "vit.embeddings.patch_embeddings.projection.weight",
        "tp": TP_ATTENTION,
    }


_HF_SPECS = {
    "bert": ("BertForSequenceClassification (transformers)", TEXT, ("logits",), ("classifier",), _bert_expected,
             "BERT encoder, post-LN, separate Q/K/V, GELU FFN, pooler + classifier; residual stream ties every "
             "embedding, LayerNorm and block output."),
    "gpt2": ("GPT2LMHeadModel (transformers)", TEXT, ("logits",), ("lm_head",), _gpt2_expected,
             "GPT-2 decoder, pre-LN, HF Conv1D layers (weight [in, out]: MatMul with constant B in ONNX), fused "
             "c_attn split into q/k/v, lm_head tied to the token embedding."),
    "llama": ("LlamaForCausalLM (transformers)", TEXT, ("logits",), ("lm_head",), _llama_expected,
              "LLaMA decoder with GQA (4 query heads, 2 key/value heads), RMSNorm (Pow/ReduceMean/Mul in ONNX, "
              "weight is a free parameter), rotary embeddings, SwiGLU MLP."),
    "vit": ("ViTForImageClassification (transformers)", ("pixel_values",), ("logits",), ("classifier",), _vit_expected,
            "ViT: 4×4 patch conv, class token and position embedding as free parameters (Concat/Add), pre-LN "
            "blocks, classifier on the class token (Gather/Slice of the sequence axis)."),
}

for _family, (_src, _ins, _outs, _ign, _exp, _desc) in _HF_SPECS.items():
    for _impl in ("eager", "sdpa"):
        register(ZooEntry(
            name=_family if _impl == "eager" else f"{_family}_sdpa", family="hf",
            source=f"{_src}, tiny config, attn_implementation={_impl!r}",
            description=_desc + (" Attention via torch SDPA (exported as MatMul/Softmax)." if _impl == "sdpa" else ""),
            builder=functools.partial(BUILDERS[_family], _impl), input_names=_ins, output_names=_outs,
            ignored=_ign, expected=_exp(), tags=("hf", "transformer", _impl),
        ))
