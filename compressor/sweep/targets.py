"""Which tensors a sweep prunes: the Linear weights of the transformer blocks (Hugging Face models), or every
Linear/Conv weight except the output layer, found by running the model once (never guessed)."""

from __future__ import annotations

import torch
from torch import nn

from compressor.device import module_device, to_device
from compressor.errors import InputError


def _block_list(model: nn.Module) -> str | None:
    """Name of the ModuleList holding the transformer blocks (most parameters, all children the same class)."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 1 and len({type(c) for c in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = name, n
    return best


def _output_layer(model: nn.Module, candidates: list[str], example) -> tuple[str | None, str]:
    """(weight name of the prunable layer that runs last in a forward on `example`, "") — the output layer — or
    (None, why it could not be seen). Never a guess from registration order: a head registered before the body
    would be taken for a hidden layer and pruned."""
    if example is None:
        return None, "no example inputs to run it on"
    mods = dict(model.named_modules())
    order: list[str] = []
    handles = []
    for name in candidates:
        mod = mods.get(name.rsplit(".", 1)[0] if "." in name else "")
        if mod is not None:
            handles.append(mod.register_forward_hook(lambda _m, _i, _o, n=name: order.append(n)))
    example = to_device(example, module_device(model))
    try:
        with torch.no_grad():
            if isinstance(example, dict):
                model(**example)
            else:
                model(*(example if isinstance(example, tuple | list) else (example,)))
    except Exception as e:  # noqa: BLE001 - any failure means the order was not seen; reported to the user
        first = (str(e).strip().splitlines() or [""])[0]
        return None, f"its forward on the example inputs failed ({type(e).__name__}: {first})"
    finally:
        for h in handles:
            h.remove()
    if not order:
        return None, "none of its Linear/Conv layers ran in a forward on the example inputs"
    return order[-1], ""


def default_targets(model: nn.Module, text_model: bool = False, include: list[str] | None = None,
                    exclude: list[str] | None = None, example=None) -> tuple[dict[str, torch.Tensor], str]:
    """({weight name: parameter}, rule) of the tensors a sweep prunes.

    Hugging Face models: the Linear (and GPT-2 Conv1D) weights inside the transformer blocks — for BERT the
    Q, K, V, attention-output, intermediate and output dense of every layer; never embeddings, pooler,
    LayerNorms, biases or the task head: the blocks hold the weights whose sparsity matters, the rest is small or
    task-specific. Other models: every Linear/Conv weight except the output layer, the one that runs last in a
    forward on `example`; when that cannot be seen, `exclude` must name what stays dense (else InputError).
    `include` replaces the rule; `exclude` removes from it (glob patterns).
    """
    from compressor.masks import prunable_weights

    if include:
        return prunable_weights(model, include=include, exclude=exclude), f"include={include} exclude={exclude or []}"
    if text_model:
        blocks = _block_list(model)
        if blocks:
            w = prunable_weights(model, include=[f"{blocks}.*"], exclude=exclude)
            return w, f"Linear weights inside the transformer blocks ({blocks}.*); embeddings, pooler, head, LayerNorms, biases stay dense"
    allw = prunable_weights(model)
    if len(allw) <= 1:  # a single layer is the output layer and the only thing to prune: no forward needed
        out_name = next(iter(allw), None)
        w = prunable_weights(model, exclude=exclude)
        return w, f"all Linear/Conv weights except the output layer ({out_name})" + (f", exclude={exclude}" if exclude else "")
    out_name, why = _output_layer(model, list(allw), example)
    if out_name is None:
        if not exclude:
            raise InputError(f"cannot find the output layer of {type(model).__name__} to keep it dense: {why}",
                             "name the layers to keep dense with exclude (--exclude 'head*'), or the weights to prune with include")
        w = prunable_weights(model, exclude=exclude)
        return w, f"all Linear/Conv weights except exclude={exclude} (output layer not found: {why})"
    w = prunable_weights(model, exclude=list(exclude or []) + [out_name])
    return w, f"all Linear/Conv weights except the output layer ({out_name})" + (f", exclude={exclude}" if exclude else "")

