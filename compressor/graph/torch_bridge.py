"""Apply an ONNX analysis to the torch model it was exported from, so the pruned model can be fine-tuned.

The analysis export (compressor.analysis_export) keeps parameter and buffer names as initializer names, so
every group member (initializer, axis, positions) names a torch parameter or buffer, or a tensor the forward creates
(torch.export's `lifted_tensor_N`): a group that slices one is probed (cut from a copy, compared with the ONNX cut)
and frozen for the torch path unless the forward makes it at the new width. Standard layers are cut with torch-pruning's per-layer prune
functions (they also fix in/out_channels, groups, running stats); anything else (free parameters, HF Conv1D,
rotary buffers) is sliced directly. Hugging Face attention modules get their head counts updated.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.graph.analysis import Analysis
from compressor.utils.names import owner


def cut_plan(analysis: Analysis, selection) -> dict[str, dict[int, list[int]]]:
    """{initializer: {axis: removed positions}} for a selection of atoms: every position holding one of them.
    Vectorised over each axis's flat atom array (per-position tuples of a 1.1 B model took 1.4 s to build)."""
    removed = np.fromiter({int(a) for a in (selection.atoms if hasattr(selection, "atoms") else selection)}, dtype=np.int64)
    ia = analysis.init_atoms
    plan: dict[str, dict[int, list[int]]] = {}
    if not len(removed) or not len(ia.flat):
        return plan
    chosen = np.zeros(max(int(ia.flat.max()), int(removed.max())) + 1, dtype=bool)
    chosen[removed] = True
    for name, ks in ia.index.items():
        for ax, k in enumerate(ks):
            hit = chosen[ia.atoms(k)]
            if hit.any():
                counts = ia.counts[ia.pos[k]:ia.pos[k + 1]]
                plan.setdefault(name, {})[ax] = np.unique(np.repeat(np.arange(len(counts)), counts)[hit]).tolist()
    return plan


def _slice_tensor(t: torch.Tensor, cuts: dict[int, list[int]]) -> torch.Tensor:
    for ax, idx in cuts.items():
        keep = torch.tensor(sorted(set(range(t.shape[ax])) - set(idx)), dtype=torch.long, device=t.device)
        t = t.index_select(ax, keep)
    return t


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """utils.names.owner by attribute walk: a TorchScript module has no get_submodule."""
    if not isinstance(model, torch.jit.ScriptModule):
        return owner(model, name)
    *path, attr = name.split(".")
    for part in path:
        model = getattr(model, part)
    return model, attr


def _set(model: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    mod, attr = _owner(model, name)
    if is_param:
        setattr(mod, attr, nn.Parameter(value.contiguous(), requires_grad=getattr(mod, attr).requires_grad))
    else:
        mod._buffers[attr] = value.contiguous()


def made_tensors(model: nn.Module, analysis: Analysis, prefix: str = "") -> set[str]:
    """Initializers of the analysed export that are no parameter or buffer of `model`: tensors its forward
    creates (torch.export lifts them as `<module>.lifted_tensor_N`; folded constants `val_N`)."""
    tensors = {prefix + n for n, _ in model.named_parameters(remove_duplicate=False)} | {
        prefix + n for n, _ in model.named_buffers(remove_duplicate=False)}
    return set(analysis.ir.initializers) - tensors


def prune_torch(model: nn.Module, analysis: Analysis, selection, made: set[str] = frozenset()) -> dict:
    """Remove the selected atoms from `model` in place; returns {"tensors": n}. `made`: initializers the forward
    creates (made_tensors), skipped: the forward makes them at the new width or the caller's check fails."""
    import torch_pruning as tp

    plan = {n: v for n, v in cut_plan(analysis, selection).items() if n not in made}
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    known = params.keys() | buffers.keys()
    if plan and not set(plan) & known and all(n.startswith("model.") for n in plan):
        plan = {n[len("model."):]: v for n, v in plan.items()}  # exported through a keyword-input wrapper
        analysis_names = {n[len("model."):]: n for n in cut_plan(analysis, selection)}
    else:
        analysis_names = {n: n for n in plan}
    missing = [n for n in plan if n not in params and n not in buffers]
    if missing:
        raise CompressorError(f"{len(missing)} pruned tensors have no torch counterpart (e.g. {missing[0]!r})",
                              "analyse an export made by compressor.analysis_export (it keeps parameter names)")
    for n in plan:
        t = params.get(n, buffers.get(n))
        if tuple(t.shape) != tuple(analysis.ir.initializers[analysis_names[n]].shape):
            raise CompressorError(f"{n}: torch shape {tuple(t.shape)} differs from the ONNX initializer",
                                  "analyse an export of this very model")
    widths = _config_widths(model)
    aliases: dict[int, list[str]] = {}  # tied weights (GPT-2 lm_head = wte) must stay one tensor
    for n, prm in params.items():
        aliases.setdefault(id(prm), []).append(n)
    done: set[str] = set()
    with torch.no_grad():
        for mname, mod in model.named_modules():
            w = f"{mname}.weight" if mname else "weight"
            if w not in plan or w in done:
                continue
            cuts = plan[w]
            if isinstance(mod, nn.modules.conv._ConvNd):
                out_ax, in_ax = (1, 0) if mod.transposed else (0, 1)
                depthwise = mod.groups > 1 and mod.groups == mod.in_channels and mod.weight.shape[in_ax] == 1 \
                    and not mod.transposed
                if depthwise:
                    tp.prune_depthwise_conv_out_channels(mod, cuts.get(0, []))
                else:
                    if out_ax in cuts:
                        tp.prune_conv_out_channels(mod, cuts[out_ax])
                    if in_ax in cuts:  # grouped: positions within a group, repeated in every group
                        per = mod.weight.shape[in_ax]
                        idx = [j + r * per for r in range(mod.groups) for j in cuts[in_ax]] if mod.groups > 1 else cuts[in_ax]
                        tp.prune_conv_in_channels(mod, idx)
                done |= {w, f"{mname}.bias"}
            elif isinstance(mod, nn.Linear):
                if 0 in cuts:  # (a tied copy of an already cut weight is re-tied below)
                    tp.prune_linear_out_channels(mod, cuts[0])
                if 1 in cuts:
                    tp.prune_linear_in_channels(mod, cuts[1])
                done |= {w, f"{mname}.bias"}
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                tp.prune_batchnorm_out_channels(mod, cuts[0])
                done |= {w, f"{mname}.bias", f"{mname}.running_mean", f"{mname}.running_var"}
            elif isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
                tp.prune_layernorm_out_channels(mod, cuts[0])
                done |= {w, f"{mname}.bias"}
            elif isinstance(mod, nn.Embedding) and 0 not in cuts:
                tp.prune_embedding_out_channels(mod, cuts[1])
                done |= {w}
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        for n, cuts in plan.items():  # everything else: slice the tensor itself
            if n in done:
                continue
            if n in params:
                _set(model, n, _slice_tensor(params[n].data, cuts), True)
            else:
                _set(model, n, _slice_tensor(buffers[n], cuts), False)
        now = dict(model.named_parameters(remove_duplicate=False))
        for names in aliases.values():
            changed = [n for n in names if n in plan]
            if len(names) > 1 and changed:
                for n in names:
                    if n not in changed:
                        mod, attr = _owner(model, n)
                        setattr(mod, attr, now[changed[0]])
        for mod in model.modules():
            for child in mod.children():  # HF GPT-2 Conv1D keeps its width in `nf`
                if hasattr(child, "nf") and hasattr(child, "weight"):
                    child.nf = child.weight.shape[1]
        _update_config(widths)
        _update_head_config(model, _update_attention(model))
    return {"tensors": len(plan)}


_FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim")


def _config_widths(model: nn.Module) -> list[tuple[object, str, list[nn.Linear]]]:
    """(HF config, key, the Linear layers whose output width is that key's value) before a cut, so that the
    config written with the pruned weights (save_pretrained) describes their widths and the folder reloads."""
    out = []
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is None or not hasattr(cfg, "to_dict"):
            continue
        for key in _FFN_KEYS:
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                layers = [m for m in mod.modules() if isinstance(m, nn.Linear) and m.out_features == v]
                if layers:
                    out.append((cfg, key, layers))
        break  # the outermost model's config (a wrapper holds the HF model)
    return out


def _update_config(widths) -> None:
    """Set each FFN width key to the layers' pruned width when they all share it (a Hugging Face config holds
    one width for every layer; uneven widths are left for the caller's reload check to refuse)."""
    for cfg, key, layers in widths:
        now = {m.weight.shape[0] for m in layers}
        if len(now) == 1:
            setattr(cfg, key, now.pop())


def exact_values(model: nn.Module, analysis: Analysis, prefix: str = "") -> dict[str, np.ndarray]:
    """The torch model's own parameter and buffer values by initializer name (prune_onnx's `values`): the
    analysis runs on an export of distinct_copy(model), whose equal tensors were nudged apart, so an ONNX cut
    compared with the torch cut must carry the torch weights, not the nudged ones."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    return {prefix + n: t.detach().cpu().numpy() for n, t in tensors.items()
            if prefix + n in analysis.ir.initializers and t.is_floating_point()}


def torch_freezes(model: nn.Module, args: tuple, names: list[str], analysis: Analysis, groups, *,
                  prefix: str = "", atol: float = 1e-4) -> dict[int, str]:
    """{group id: reason} for the groups the torch module cannot be cut along (the torch path freezes them).

    A cut that rewrites literal size constants in the graph (reshape targets, split sizes, gather index
    lists) changes what the torch module's forward holds as Python values (`torch.split(x, self.width, 1)`,
    stored part sizes); the bridge updates only Hugging Face attention head counts. Each such group is
    probed: one of its channels cut from a copy of the module, run, and compared with the same ONNX cut; a
    failure or a disagreement freezes the group, naming the nodes whose constants the cut rewrites. Probes:
    its first, middle and last channel in turn (a stored split size can agree with a cut of the last part)."""
    from compressor.graph.prune import literal_rewrites

    values = exact_values(model, analysis, prefix)
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, args, strict=True)}
    made = made_tensors(model, analysis, prefix)
    out: dict[int, str] = {}
    for g in groups:
        free = [x for x in g.atoms if x not in g.frozen]
        for probe in dict.fromkeys(free[k] for k in (0, len(free) // 2, -1)) if free else ():
            where = literal_rewrites(analysis, {probe})
            sliced = sorted({m.name for m in g.members} & made)  # must come out of the forward at the new width
            failure = (where or sliced) and _probe_failure(model, args, feeds, analysis, probe, values, atol, made)
            if failure and where:
                out[g.id] = (f"torch path: the cut rewrites the size constants of {', '.join(where[:3])}, which "
                             f"the torch module's forward holds as Python values ({failure})")
            elif failure:
                out[g.id] = (f"torch path: the cut slices {', '.join(sliced[:3])}, a tensor the forward creates "
                             f"rather than a parameter or buffer ({failure})")
            if failure:
                break
    return out


def _probe_failure(model, args, feeds, analysis, atom: int, values, atol: float, made=frozenset()) -> str | None:
    """Why cutting one atom from a copy of the torch model does not compute the same ONNX cut, or None."""
    import copy

    from compressor.graph.prune import prune_onnx
    from compressor.onnx_utils import run

    try:
        ref = run(prune_onnx(None, analysis, {atom}, check=False, values=values), feeds)[0]
        cut = copy.deepcopy(model)
        prune_torch(cut, analysis, {atom}, made)
        with torch.no_grad():
            got = cut(*args)
        got = (got if isinstance(got, torch.Tensor) else got[0]).detach().float().cpu().numpy()
    except Exception as e:  # the module's forward refuses the cut: exactly what is being probed
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    diff = float(np.max(np.abs(got - ref))) if got.shape == ref.shape else float("inf")
    return None if diff <= atol + atol * float(np.max(np.abs(ref))) else f"output differs by {diff:.3g}"


def _out(mod: nn.Module | None) -> int | None:
    if mod is None or not hasattr(mod, "weight"):
        return None
    return mod.weight.shape[1] if hasattr(mod, "nf") else mod.weight.shape[0]


def hf_config(model: nn.Module):
    """The Hugging Face config of the outermost module that carries one (its `config` has to_dict), or None."""
    return next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")), None)


def _update_head_config(model: nn.Module, counts: set[tuple[int, int | None, int]]) -> None:
    """num_attention_heads / num_key_value_heads of the outermost Hugging Face config after heads were cut, so
    save_pretrained writes a config.json the pruned weights reload with; head_dim is then written explicitly
    (Llama, Mistral, Qwen2 read it from the config, else derive hidden / heads). Only when every attention module
    kept the same counts; a model type that always derives head_dim (GPT-2, BERT) keeps its heads in the
    structured stage (compressor.checkpoint.hfconfig.head_rule)."""
    cfg = hf_config(model)
    if cfg is None or len(counts) != 1 or not isinstance(getattr(cfg, "num_attention_heads", None), int):
        return
    heads, kv, head_dim = counts.pop()
    if (heads, kv) == (cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) if kv else None):
        return
    cfg.num_attention_heads = heads
    if kv and isinstance(getattr(cfg, "num_key_value_heads", None), int):
        cfg.num_key_value_heads = kv
    cfg.head_dim = head_dim


def _update_attention(model: nn.Module) -> set[tuple[int, int | None, int]]:
    """Head counts of Hugging Face attention modules after heads were removed (head_dim is kept: HF uses one
    head_dim for Q, K and V, so the torch side does not prune within heads); returns the (heads, KV heads,
    head_dim) seen."""
    counts = set()
    for mod in model.modules():
        head_dim = getattr(mod, "head_dim", None) or getattr(mod, "attention_head_size", None)
        if not head_dim:
            continue
        q = _out(getattr(mod, "q_proj", None) or getattr(mod, "query", None))
        if q is None and hasattr(mod, "c_attn"):
            q = _out(mod.c_attn) // 3
        if q is None or q % head_dim:
            continue
        heads = q // head_dim
        for attr in ("num_heads", "num_attention_heads", "n_head"):
            if hasattr(mod, attr) and isinstance(getattr(mod, attr), int):
                setattr(mod, attr, heads)
        for attr in ("all_head_size", "split_size", "embed_dim_q"):
            if hasattr(mod, attr):
                setattr(mod, attr, q)
        k = _out(getattr(mod, "k_proj", None) or getattr(mod, "key", None))
        if k and hasattr(mod, "num_key_value_groups") and k % head_dim == 0:
            mod.num_key_value_groups = heads // (k // head_dim)
        if hasattr(mod, "num_key_value_heads") and k:
            mod.num_key_value_heads = k // head_dim
        counts.add((heads, k // head_dim if k and k % head_dim == 0 else None, head_dim))
    return counts


def taylor_grads(model: nn.Module, batches, loss_fn=None) -> dict[str, np.ndarray]:
    """Accumulated ∂L/∂w per parameter name over `batches` (tuples of inputs[, target]); default loss:
    cross-entropy when a target is given, else the mean square of the output (a data-only proxy)."""
    was = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for batch in batches:
        if callable(getattr(batch, "loss", None)):  # a batch that knows its loss (methods.structured: io.bundle.Batches)
            batch.loss(model).backward()
            continue
        inputs, target = (batch[:-1], batch[-1]) if len(batch) > 1 else (batch, None)
        out = model(*inputs)
        out = out if isinstance(out, torch.Tensor) else out[0]
        if loss_fn is not None:
            loss = loss_fn(out, target)
        elif target is not None and target.dtype == torch.long:
            loss = nn.functional.cross_entropy(out, target)
        else:
            loss = out.float().pow(2).mean()
        loss.backward()
    grads = {n: p.grad.detach().cpu().numpy() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.train(was)
    return grads


def distinct_copy(model: nn.Module) -> nn.Module:
    """A copy whose equal-valued tensors are made distinct (by a few ulps), for analysis exports.

    The TorchScript exporter merges initializers with identical values (a fresh model's BatchNorms all have
    weight=1, bias=0, running_mean=0, running_var=1), which would make one initializer stand for several
    layers and hide the others' names. The nudge is far below the export's verification tolerance."""
    import copy

    m = copy.deepcopy(model)
    seen: dict[tuple, list[torch.Tensor]] = {}
    with torch.no_grad():
        for k, (_, t) in enumerate(list(m.named_parameters()) + list(m.named_buffers())):
            if not t.is_floating_point() or t.numel() == 0:
                continue
            key = (tuple(t.shape), t.dtype)
            if any(torch.equal(t, o) for o in seen.get(key, [])):
                t.add_(1e-7 * (k + 1) * torch.linspace(1, 2, t.numel(), dtype=t.dtype).reshape(t.shape))
            seen.setdefault(key, []).append(t.clone())
    return m
