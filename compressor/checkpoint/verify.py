"""Check a pruned checkpoint folder against its source with an oracle that shares no code with the cut.

The oracle: the source model, loaded by transformers, with every removed position of every cut tensor set to
zero in torch (a removed head's q/k/v rows and o_proj columns, a removed FFN channel's gate/up rows and
down_proj column). Heads and FFN channels contribute nothing once zeroed, so the zeroed source computes
exactly what the smaller model computes; the pruned folder is loaded by transformers from its own
config.json, so a wrong config field or a wrongly sliced tensor shows as a difference.

    mode "model":  both whole models on a few random token sequences (logits), then `generate` on the pruned.
    mode "layers": one decoder layer at a time from both folders, on the same random hidden states (for models
                   that do not fit twice in memory), tensors outside the layers compared value by value, then
                   `generate` on the pruned model reloaded tensor by tensor in bf16.
A cut of the residual stream (hidden size) is not exact under RMSNorm/LayerNorm (the norm's mean runs over
fewer channels), so with such a cut only the reload and `generate` are checked, and the report says so.
"""

from __future__ import annotations

import gc
import re
import time
from pathlib import Path

import torch

from compressor.checkpoint.shards import Checkpoint
from compressor.errors import InputError, VerificationError


def _auto(config):
    import transformers

    from compressor.task import hf_task

    task = hf_task(config)
    cls = {"causal-lm": transformers.AutoModelForCausalLM, "classifier": transformers.AutoModelForSequenceClassification,
           "encoder": transformers.AutoModel}[task]
    return cls, task


def _load(folder: Path, dtype=torch.float32):
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    cls, task = _auto(config)
    model = cls.from_pretrained(folder, local_files_only=True, dtype=dtype, attn_implementation="eager")
    return model.eval(), task


def _param(tensors: dict[str, torch.Tensor], key: str, prefix: str) -> torch.Tensor | None:
    """A model tensor by checkpoint key (the checkpoint may hold the base model without its prefix)."""
    if key in tensors:
        return tensors[key]
    if key.startswith(prefix):
        return tensors.get(key[len(prefix):])
    return tensors.get(prefix + key)


def zero_removed(model: torch.nn.Module, plan: dict[str, dict[int, list[int]]], keys=None) -> None:
    """Set the removed positions of the cut tensors to zero in place (tied tensors are zeroed once)."""
    tensors = dict(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", "") + "."
    with torch.no_grad():
        for key, cuts in plan.items():
            if keys is not None and key not in keys:
                continue
            t = _param(tensors, key, prefix)
            if t is None:
                raise VerificationError(f"{key} is cut but the model has no such tensor", "report this as a bug")
            for ax, idx in cuts.items():
                t.index_fill_(ax, torch.tensor(idx, dtype=torch.long), 0)


def _out(o) -> torch.Tensor:
    if isinstance(o, torch.Tensor):
        return o
    return o.logits if hasattr(o, "logits") else (o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0])


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return float((a.float() - b.float()).abs().max()), float(b.float().abs().max())


def _load_by_tensor(folder: Path, dtype):
    """The model of `folder` built on the meta device and filled one checkpoint tensor at a time, cast to
    `dtype` as it is read (from_pretrained maps every shard, so a cast load of a large fp32 folder peaks at
    the mapped shards plus the model); buffers the model rebuilds from its config (rotary tables) are made
    by constructing their module again on the CPU."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    cls, task = _auto(config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    finally:
        torch.set_default_dtype(default)
    names = set(model.state_dict())
    prefix = model.base_model_prefix + "."
    ckpt = Checkpoint(folder)
    state = {}
    for key in ckpt.keys():
        name = key if key in names else (prefix + key if prefix + key in names else key[len(prefix):])
        state[name] = ckpt.read(key).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(mod)(config=config))
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise VerificationError(f"the pruned checkpoint lacks {meta[0]}", "report this as a bug")
    return model.eval(), task


def _generates(folder: Path, vocab: int, dtype, by_tensor: bool = False) -> int:
    model, task = _load_by_tensor(folder, dtype) if by_tensor else _load(folder, dtype)
    if task != "causal-lm":
        return 0
    ids = torch.randint(3, vocab, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
    new = int(gen.shape[1] - ids.shape[1])
    if new != 4:
        raise VerificationError(f"the pruned model generated {new} tokens instead of 4", "report this as a bug")
    return new


def _whole(src: Path, out: Path, plan, ids, tolerance: float) -> dict:
    ref_model, _ = _load(src)
    zero_removed(ref_model, plan)
    with torch.no_grad():
        ref = _out(ref_model(input_ids=ids))
    del ref_model
    gc.collect()
    pruned, _ = _load(out)
    with torch.no_grad():
        got = _out(pruned(input_ids=ids))
    del pruned
    return {"max_abs_diff": _diff(got, ref)[0], "scale": _diff(got, ref)[1]}


def _layer_stack(model):
    """(base model, its decoder layers, the checkpoint key prefix of layer i without the i)."""
    base = getattr(model, model.base_model_prefix, model)
    layers, rotary = getattr(base, "layers", None), getattr(base, "rotary_emb", None)
    if layers is None or rotary is None:
        raise InputError("layer-by-layer verification supports decoder models with rotary embeddings (Llama family)",
                         "verify: model (whole model, needs memory for both) or none")
    return base, layers, next(n for n, m in model.named_modules() if m is layers)


def _layers(src: Path, out: Path, plan, shape, tolerance: float) -> dict:
    import transformers

    cfgs, stacks, ckpts = [], [], [Checkpoint(src), Checkpoint(out)]
    ckpts[1].prefetch()  # written with O_DIRECT, so not in the page cache: read ahead while the layers compute
    for folder in (src, out):
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        config._attn_implementation = "eager"
        with torch.device("meta"):
            skel = _auto(config)[0].from_config(config)
        cfgs.append(config)
        stacks.append((skel, *_layer_stack(skel)))
    n, length = shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, length, cfgs[0].hidden_size, generator=g)
    pos = torch.arange(length)[None].expand(n, -1)
    mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None].expand(n, 1, -1, -1)
    rotary = type(stacks[0][1].rotary_emb)(config=cfgs[0])
    cos_sin = rotary(hidden, pos)
    worst, scale = 0.0, 0.0
    for i in range(cfgs[0].num_hidden_layers):
        outs = []
        for side, ((skel, _, layers, path), ckpt) in enumerate(zip(stacks, ckpts, strict=True)):
            layer = layers[i].to_empty(device="cpu").float()
            keys = {name: f"{path}.{i}.{name}" for name in layer.state_dict()}
            prefix = skel.base_model_prefix + "."
            have = set(ckpt.keys())
            keys = {name: k if k in have else k[len(prefix):] for name, k in keys.items()}
            layer.load_state_dict({name: ckpt.read(k).float() for name, k in keys.items()}, assign=True)  # no copy
            if side == 0:
                with torch.no_grad():
                    for name, k in keys.items():
                        for ax, idx in plan.get(k, {}).items():
                            layer.get_parameter(name).index_fill_(ax, torch.tensor(idx, dtype=torch.long), 0)
            with torch.no_grad():
                o = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            outs.append(o[0] if isinstance(o, tuple) else o)
            layers[i] = layer.to("meta")
        d, s = _diff(outs[1], outs[0])
        worst, scale = max(worst, d), max(scale, s)
    outside = 0
    layer_keys = re.compile(r"(^|\.)layers\.\d+\.")
    for key in ckpts[0].keys():  # embeddings, final norm, lm_head: compared value by value
        if key in plan or layer_keys.search(key):
            continue
        if key in ckpts[1].meta:
            if not torch.equal(ckpts[0].read(key), ckpts[1].read(key)):
                raise VerificationError(f"{key} is not cut but differs in the pruned checkpoint", "report this as a bug")
            outside += 1
    return {"max_abs_diff": worst, "scale": scale, "layers": cfgs[0].num_hidden_layers, "tensors_equal": outside}


def verify_pruned(src: str | Path, out: str | Path, plan: dict[str, dict[int, list[int]]], *, mode: str = "model",
                  sequences: int = 3, length: int = 12, tolerance: float = 1e-4) -> dict:
    """Compare the pruned folder `out` with `src` whose removed positions are zeroed; raises
    VerificationError beyond `tolerance` × max(1, |reference|). Returns what was compared, and under
    "seconds" the time of the comparison ("verify") and of the reload-and-generate check ("generate")."""
    import transformers

    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    config = transformers.AutoConfig.from_pretrained(src, local_files_only=True)
    vocab = config.vocab_size
    hidden_cut = config.to_dict().get("hidden_size") != transformers.AutoConfig.from_pretrained(
        out, local_files_only=True).to_dict().get("hidden_size")
    report: dict = {"mode": mode}
    if hidden_cut:
        report["compared"] = "not compared: a residual-stream cut is not exact under the norms"
    elif mode == "model":
        ids = torch.randint(3, vocab, (sequences, length), generator=torch.Generator().manual_seed(0))
        report |= _whole(src, out, plan, ids, tolerance)
    else:
        report |= _layers(src, out, plan, (sequences, length), tolerance)
    if "max_abs_diff" in report and report["max_abs_diff"] > tolerance * max(1.0, report["scale"]):
        raise VerificationError(f"the pruned checkpoint differs from the zeroed source by {report['max_abs_diff']:.3g}",
                                "report this as a bug")
    t1 = time.perf_counter()
    if mode == "model":
        report["generated_tokens"] = _generates(out, vocab, torch.float32)
    else:  # reloaded tensor by tensor in bf16: about half the pruned fp32 checkpoint
        report["generated_tokens"] = _generates(out, vocab, torch.bfloat16, by_tensor=True)
    report["seconds"] = {"verify": t1 - t0, "generate": time.perf_counter() - t1}
    return report
