"""config.json after a structured cut: which fields change, and whether the cut can be written there at all.

A Hugging Face model is rebuilt from config.json alone, so a cut is only valid when the config can say it:
one head count, one KV head count and one FFN width for every layer, head_dim unchanged, and (with grouped
query attention) every kept KV head serving the same number of kept query heads, in order, since
transformers maps query head h to KV head h // (heads / kv_heads). Anything else is refused in one line.
The widths are read from the cut tensors' new shapes (per family: which tensor and axis says which field);
the final check builds the model from the new config on the meta device and compares every tensor shape.
"""

from __future__ import annotations

import dataclasses
import re

from compressor.errors import InputError


@dataclasses.dataclass(frozen=True)
class Family:
    heads: tuple[str, int] | None  # (key suffix, axis) whose size / head_dim is the query head count
    kv: tuple[str, int] | None
    ffn: tuple[str, int] | None
    hidden: tuple[str, int]
    fields: dict[str, str]  # role -> config field
    head_dim_field: str | None  # None: head_dim is hidden / heads, so heads cannot change alone


LLAMA = Family(("self_attn.q_proj.weight", 0), ("self_attn.k_proj.weight", 0), ("mlp.gate_proj.weight", 0),
               ("embed_tokens.weight", 1),
               {"heads": "num_attention_heads", "kv": "num_key_value_heads", "ffn": "intermediate_size",
                "hidden": "hidden_size"}, "head_dim")
GPT2 = Family(None, None, ("mlp.c_fc.weight", 1), ("wte.weight", 1),
              {"heads": "n_head", "ffn": "n_inner", "hidden": "n_embd"}, None)
BERT = Family(None, None, ("intermediate.dense.weight", 0), ("word_embeddings.weight", 1),
              {"heads": "num_attention_heads", "ffn": "intermediate_size", "hidden": "hidden_size"}, None)
FAMILIES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gpt2": GPT2, "bert": BERT}
LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer)\.(\d+)\.")


def family(cfg: dict) -> Family:
    fam = FAMILIES.get(cfg.get("model_type", ""))
    if fam is None:
        raise InputError(f"streaming pruning does not know how config.json of model_type "
                         f"{cfg.get('model_type')!r} names its widths",
                         f"supported: {', '.join(sorted(FAMILIES))}; or prune in memory")
    return fam


def head_dim(cfg: dict, fam: Family) -> int:
    hd = cfg.get(fam.head_dim_field) if fam.head_dim_field else None
    return int(hd) if hd else cfg[fam.fields["hidden"]] // cfg[fam.fields["heads"]]


def _per_layer(role: str, spec, shapes: dict[str, tuple], div: int = 1) -> int | None:
    """The one value of a role's width over all layers (None when no tensor has it); refuses mixed values."""
    suffix, axis = spec
    seen = {k: shapes[k][axis] for k in shapes if k.endswith(suffix)}
    if not seen:
        return None
    values = sorted(set(seen.values()))
    if len(values) > 1:
        raise InputError(f"the cut leaves a different {role} per layer ({values[:4]}), which config.json "
                         f"cannot express", "select with scope: local (the same ratio in every layer)")
    if values[0] % div:
        raise InputError(f"the cut leaves {values[0]} rows in {suffix}, not whole heads of {div}",
                         "keep head_dim: select with head_dim=False")
    return values[0] // div


def _heads_removed(plan: dict, layer_of: dict[str, str], layer: str, suffix: str, hd: int) -> set[int]:
    """The heads whose rows the plan removes from one layer's projection; refuses a part of a head."""
    key = next((k for k in layer_of if k.endswith(suffix) and layer_of[k] == layer), None)
    rows = sorted(plan[key].get(0, [])) if key else []
    gone = {r // hd for r in rows}
    if len(rows) != len(gone) * hd:
        raise InputError(f"layer {layer}: the cut removes part of a head in {suffix}, so head_dim would change",
                         "select with head_dim=False")
    return gone


def _check_gqa(plan: dict[str, dict[int, list[int]]], fam: Family, cfg: dict, hd: int) -> None:
    """Removed query rows must be whole heads, and kept query heads equal in number per kept KV head."""
    heads, kv = cfg[fam.fields["heads"]], cfg.get(fam.fields["kv"]) or cfg[fam.fields["heads"]]
    per = heads // kv
    layer_of = {k: m.group(1) for k in plan if (m := LAYER.search(k))}
    for layer in sorted({layer_of[k] for k in layer_of if k.endswith((fam.heads[0], fam.kv[0]))}):
        q_gone = _heads_removed(plan, layer_of, layer, fam.heads[0], hd)
        kv_gone = _heads_removed(plan, layer_of, layer, fam.kv[0], hd)
        kept = [sum(q not in q_gone for q in range(g * per, (g + 1) * per)) for g in range(kv) if g not in kv_gone]
        orphans = [q for q in range(heads) if q // per in kv_gone and q not in q_gone]
        if orphans or len(set(kept)) > 1:
            raise InputError(f"layer {layer}: the cut keeps {kept} query heads per KV head"
                             + (f" and query heads {orphans[:4]} without their KV head" if orphans else "")
                             + "; config.json needs the same number for every KV head",
                             "remove whole KV groups or the same query heads in every group (the analysis groups "
                             "'heads' do so)")


def updated_config(cfg: dict, plan: dict[str, dict[int, list[int]]], old: dict[str, tuple],
                   new: dict[str, tuple]) -> tuple[dict, dict]:
    """(new config dict, {field: (old, new)} changed) for a cut given by checkpoint key; refuses cuts the
    config cannot express. `old`/`new`: every checkpoint tensor's shape before and after."""
    fam = family(cfg)
    hd = head_dim(cfg, fam)
    out = dict(cfg)
    changed: dict[str, tuple] = {}
    touched_heads = any(k.endswith(fam.heads[0]) for k in plan) if fam.heads else False
    for role in ("heads", "kv", "ffn", "hidden"):
        spec = getattr(fam, role)
        if spec is None:
            continue
        value = _per_layer(fam.fields[role], spec, new, hd if role in ("heads", "kv") else 1)
        before = cfg.get(fam.fields[role])
        if role == "ffn" and before is None:  # GPT-2: n_inner None means 4 x n_embd
            before = 4 * cfg[fam.fields["hidden"]]
        if value is not None and value != before:
            out[fam.fields[role]] = value
            changed[fam.fields[role]] = (before, value)
    if touched_heads:
        _check_gqa(plan, fam, cfg, hd)
    if fam.head_dim_field:
        out[fam.head_dim_field] = hd  # written explicitly: the default (hidden / heads) would change with them
    elif out[fam.fields["hidden"]] // out[fam.fields["heads"]] != hd:
        raise InputError("this model type derives head_dim from hidden size / heads, so the cut would change it",
                         "prune the FFN only (no heads, residual stream protected)")
    return out, changed


def check_against_model(cfg: dict, new: dict[str, tuple]) -> None:
    """Build the model of the new config on the meta device and compare every tensor shape with the cut."""
    import torch
    import transformers

    from compressor.task import hf_task

    cause = _refusal(cfg)  # transformers' own validation (e.g. hidden size % heads)
    if cause:
        raise InputError(f"transformers refuses the pruned config.json: {cause}",
                         "choose a ratio whose kept head count divides the hidden size, or prune the FFN only")
    config = transformers.AutoConfig.for_model(**cfg)
    auto = {"causal-lm": transformers.AutoModelForCausalLM, "classifier": transformers.AutoModelForSequenceClassification,
            "encoder": transformers.AutoModel}[hf_task(config)]
    with torch.device("meta"):
        model = auto.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = model.base_model_prefix + "."
    for key, shape in new.items():
        want = expected.get(key, expected.get(key[len(prefix):] if key.startswith(prefix) else prefix + key))
        if want is not None and want != tuple(shape):
            raise InputError(f"{key}: the cut gives {tuple(shape)}, the new config.json builds {want}",
                             "this cut cannot be expressed in config.json; select with heads/head_dim off")


def head_rule(cfg: dict):
    """compressor.graph.heads' rule for this config: why a kept head layout cannot be written to config.json, or
    None. `kept`/`sizes` are a block's heads slots: (KV heads, query heads per KV head) with grouped query
    attention, (heads,) without. transformers' own config class decides (LlamaConfig wants hidden_size %
    num_attention_heads == 0, others may check more or less), so the rule follows the installed version; a model
    type that derives head_dim from hidden / heads accepts no change. None for a model type not in FAMILIES."""
    fam = FAMILIES.get(cfg.get("model_type", ""))
    if fam is None:
        return None
    heads0 = cfg.get(fam.fields["heads"])
    kv0 = (cfg.get(fam.fields["kv"]) if "kv" in fam.fields else None) or heads0
    if fam.head_dim_field is None or fam.heads is None:
        why = (f"{cfg['model_type']} derives head_dim from {fam.fields['hidden']} / {fam.fields['heads']}, so "
               f"config.json cannot keep head_dim with fewer heads")
        return lambda kept, sizes: why
    hd = head_dim(cfg, fam)
    seen: dict[tuple[int, int], str | None] = {}

    def counts(kept: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[int, int] | None:
        if len(sizes) == 2 and sizes[0] == kv0 and sizes[0] * sizes[1] == heads0:
            return kept[0] * kept[1], kept[0]
        if len(sizes) == 1 and sizes[0] == heads0:  # one slot: every head has its KV head (MHA) or all share one (MQA)
            return kept[0], kept[0] if kv0 == heads0 else kv0
        return None

    def rule(kept: tuple[int, ...], sizes: tuple[int, ...]) -> str | None:
        n = counts(kept, sizes)
        if n is None:
            return f"a heads layout {sizes} that config.json ({heads0} heads, {kv0} KV heads) does not describe"
        if n not in seen:
            seen[n] = _refusal(dict(cfg) | {fam.fields["heads"]: n[0], fam.fields["kv"]: n[1],
                                             fam.head_dim_field: hd})
            seen[n] = seen[n] and f"transformers refuses {n[0]} heads / {n[1]} KV heads: {seen[n]}"
        return seen[n]

    return rule


def _refusal(cfg: dict) -> str | None:
    """transformers' config validation message for `cfg` (its last line), or None when the config class accepts it."""
    import transformers

    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older transformers validate with plain ValueErrors
        StrictDataclassError = ValueError  # noqa: N806
    try:
        transformers.AutoConfig.for_model(**cfg)
    except (ValueError, TypeError, StrictDataclassError) as e:
        return str(e.__cause__ or e).strip().splitlines()[-1].strip().rstrip(".")
    return None
