"""Weightless analysis: HF configs traced on the meta device (compressor.skeleton, compressor.graph.weightless)
and ONNX files whose weights live in external data.

Oracles: the same models built with real weights and exported by torch.onnx's dynamo exporter directly
(group structure must be identical), the torch state dict (values read lazily from the shards), and the same
ONNX file with its weights inline.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the hf extra) is not installed")

from compressor.errors import InputError  # noqa: E402
from compressor.graph import analyze  # noqa: E402
from compressor.graph.importance import group_scores  # noqa: E402
from compressor.graph.weightless import analyze_hf  # noqa: E402


def signature(a, strip: str = "", tied: dict | None = None) -> list:
    """Every group as (kind, size, prunable, frozen atoms, members (name, axis, positions)), sorted: what must
    not depend on how the graph was obtained (group ids follow graph order, which may differ). Names lose
    `strip` and tied names become the first one."""
    out = []
    tied = tied or {}
    for g in a.groups:
        names = [m.name[len(strip):] if strip and m.name.startswith(strip) else m.name for m in g.members]
        ms = tuple(sorted((tied.get(n, n), m.axis, tuple(m.indices.tolist())) for n, m in zip(names, g.members, strict=True)))
        out.append((g.kind, g.size, g.prunable, len(g.frozen), ms))
    return sorted(out)


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),
    "bert": lambda: transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=128),
}


class _Tokens(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        o = self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _real_model(cfg):
    from compressor.task import hf_task

    cls = {"causal-lm": transformers.AutoModelForCausalLM, "encoder": transformers.AutoModel}[hf_task(cfg)]
    torch.manual_seed(0)
    return cls.from_config(cfg, attn_implementation="eager").eval()


def _full_export_analysis(model):
    """The oracle: the model with its real weights through torch.onnx's dynamo exporter, analysed."""
    d = torch.export.Dim.DYNAMIC
    prog = torch.onnx.export(_Tokens(model).eval(), (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)),
                             dynamo=True, optimize=False, input_names=["input_ids", "attention_mask"], verbose=False,
                             dynamic_shapes={"input_ids": {0: d, 1: d}, "attention_mask": {0: d, 1: d}})
    return analyze(prog.model_proto, strict=True)


@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=pytest.mark.slow),
                                  pytest.param("bert", marks=pytest.mark.slow)])
def test_config_only_analysis_equals_the_full_weight_export(arch, tmp_path):
    cfg = CONFIGS[arch]()
    cfg.save_pretrained(tmp_path)
    got = analyze_hf(tmp_path / "config.json", strict=True)
    # nothing but config.json was there to read, and the proto holds no weight bytes
    assert all(i.data_location == 1 and not i.raw_data for i in got.ir.model.graph.initializer
               if len(i.dims) and i.dims[0] >= 32)
    model = _real_model(cfg)
    first: dict[int, str] = {}
    tied = {n: first.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)}
    want = _full_export_analysis(model)
    assert signature(got) == signature(want, "m.", tied)
    # buffers built from the config and not in a checkpoint (rotary inv_freq) keep their values in the graph
    from onnx import numpy_helper

    saved, buffers = model.state_dict(), dict(model.named_buffers())
    kept = [i for i in got.ir.model.graph.initializer if i.name in buffers and i.name not in saved]
    for i in kept:
        np.testing.assert_allclose(numpy_helper.to_array(i), buffers[i.name].numpy(), rtol=1e-6)
    assert kept or arch != "llama"
    assert sum(g.prunable for g in got.groups) > 0
    with pytest.raises(InputError, match="config.json alone"):
        group_scores(got)


def test_values_come_from_the_shards_one_tensor_at_a_time(tmp_path):
    cfg = CONFIGS["llama"]()  # tied: lm_head.weight is model.embed_tokens.weight, stored once
    model = _real_model(cfg)
    model.save_pretrained(tmp_path / "full")
    model.model.save_pretrained(tmp_path / "base")  # keys without the head class's "model." prefix
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for folder in ("full", "base"):
        a = analyze_hf(tmp_path / folder, strict=True)
        names = [i.name for i in a.ir.model.graph.initializer if i.data_location == 1]
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
        for n in names:
            np.testing.assert_array_equal(a.ir.initializers[n], state[n])
        key = a.ir.initializers.external.key("lm_head.weight")  # where the streaming pruner finds it
        assert key == ("model.embed_tokens.weight" if folder == "full" else "embed_tokens.weight")
        scores = group_scores(a)
        assert len(scores) == len(a.groups) and not a.ir.initializers._arrays  # read, never kept
        assert any(not np.allclose(v, v[0]) for v in scores.values())  # real magnitudes, not the fallback


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path):
    cfg = CONFIGS["llama"]()
    _real_model(cfg).save_pretrained(tmp_path)
    cfg.intermediate_size = 96
    cfg.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="shape"):
        analyze_hf(tmp_path)


def test_external_data_onnx_is_analysed_without_reading_the_weights(net_onnx, tmp_path):
    import onnx

    _, path = net_onnx
    inline = analyze(path, strict=True)
    m = onnx.load(path)
    ext = tmp_path / "net.onnx"
    onnx.save_model(m, ext, save_as_external_data=True, all_tensors_to_one_file=True, location="net.onnx.data",
                    size_threshold=256)
    a = analyze(ext, strict=True)
    assert signature(a) == signature(inline)
    np.testing.assert_allclose(np.concatenate(list(group_scores(a).values())),
                               np.concatenate(list(group_scores(inline).values())))
    (tmp_path / "net.onnx.data").unlink()  # the analysis itself never opens the data file
    b = analyze(ext, strict=True)
    assert signature(b) == signature(inline)
    with pytest.raises(Exception, match="net.onnx.data"):  # onnx's own error for the missing file
        group_scores(b)


def test_api_analyses_hf_folders_weightless_and_falls_back_in_one_line(tiny_bert_folder, monkeypatch):
    from compressor import api, skeleton

    a = api.analyze(tiny_bert_folder)
    assert all(not i.raw_data for i in a.ir.model.graph.initializer if i.data_location == 1)
    assert any(i.data_location == 1 for i in a.ir.model.graph.initializer)

    def broken(*args, **kwargs):
        raise RuntimeError("cannot trace\nsecond line")

    monkeypatch.setattr(skeleton, "skeleton_onnx", broken)
    notes = []
    b = api.analyze(tiny_bert_folder, note=notes.append)
    assert len(notes) == 1 and "cannot trace" in notes[0] and "\n" not in notes[0]
    assert not any(i.data_location == 1 for i in b.ir.model.graph.initializer)  # the full export
    with pytest.raises(InputError, match="without weights"):
        api.analyze(tiny_bert_folder / "config.json")


@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=pytest.mark.slow),
                                  pytest.param("bert", marks=pytest.mark.slow)])
def test_copied_layers_equal_the_traced_ones(arch):
    """Two traced layers copied to four give the graph (and groups) of all four traced."""
    from compressor.skeleton import skeleton_onnx

    cfg = CONFIGS[arch]()
    cfg.num_hidden_layers = 4
    got, want = skeleton_onnx(cfg, repeat=True), skeleton_onnx(cfg, repeat=False)
    assert _depths(got.proto) == _depths(want.proto)  # the same ops at the same distances: wired in sequence
    assert sorted(i.name for i in got.proto.graph.initializer if i.data_location == 1) == \
        sorted(i.name for i in want.proto.graph.initializer if i.data_location == 1)
    assert signature(analyze(got.proto, strict=True)) == signature(analyze(want.proto, strict=True))


def _depths(proto) -> Counter:
    """(op, longest path from the graph inputs) of every non-Constant node, counted."""
    depth = {}
    out = Counter()
    for n in proto.graph.node:  # the exporter's order is topological
        d = 1 + max((depth.get(i, 0) for i in n.input), default=0) if n.op_type != "Constant" else 0
        for o in n.output:
            depth[o] = d
        if n.op_type != "Constant":
            out[n.op_type, d] += 1
    return out
