"""`structured` stage: group-level structured channel pruning over the ONNX dependency graph (DepGraph / SPA,
docs/structured.md). ONNX input is pruned directly; torch / HF input is exported, analysed, and the same cut is applied
to the torch model (compressor.graph.torch_bridge) so later stages can fine-tune it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from compressor.errors import RecipeError, VerificationError
from compressor.recipe import StageContext, register_method


class StructuredParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of channels (or of MACs, target=macs) to remove")
    importance: Literal["l2", "l1", "bn", "taylor", "random"] = Field("l2", description="group importance (docs/structured.md)")
    scope: Literal["local", "global"] = Field("local", description="rank inside each group, or one global threshold")
    round_to: int = Field(1, ge=1, description="kept width of every group is a multiple of this")
    max_layer_ratio: float = Field(1.0, gt=0.0, le=1.0, description="cap on the fraction removed from one group")
    target: Literal["channels", "macs"] = Field("channels", description="what `ratio` measures")
    protect_output: bool = Field(True, description="keep the input features of the output layer")
    protect_embeddings: bool = Field(True, description="keep the embedding width / residual stream of transformers")
    heads: bool = Field(False, description="also remove whole attention heads")
    head_dim: bool | None = Field(None, description="remove dims within heads (default: on for ONNX, off for torch)")
    taylor_batches: int = Field(4, ge=1, description="batches of calibration data for Taylor importance")


def _batches(ctx: StageContext, n: int) -> list[tuple]:
    import torch

    ds = getattr(ctx.data, "train", None) if ctx.data is not None else None
    if ds is not None and hasattr(ds, "tensors"):
        loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False)
        return [tuple(b) for _, b in zip(range(n), loader, strict=False)]
    ex = ctx.example_inputs
    return [tuple(ex.values()) if isinstance(ex, dict) else tuple(ex)]


def _select(a, p: StructuredParams, head_dim: bool, grads=None, seed: int = 0):
    from compressor.graph import select

    return select(a, p.importance, p.ratio, scope=p.scope, round_to=p.round_to, max_layer_ratio=p.max_layer_ratio,
                  target=p.target, protect_output=p.protect_output, protect_embeddings=p.protect_embeddings,
                  heads=p.heads, head_dim=head_dim, grads=grads, seed=seed)


def _report(a, sel, before: int, after: int) -> dict:
    from compressor.graph.macs import count_macs

    macs0, macs1 = count_macs(a), count_macs(a, sel.atoms)
    return {"groups": len(a.groups), "prunable_groups": len(a.prunable_groups), "removed_channels": len(sel.atoms),
            "channel_ratio": sel.ratio, "params_before": before, "params_after": after,
            "macs_before": macs0, "macs_after": macs1, "mac_reduction": 1 - macs1 / max(macs0, 1)}


def structured_onnx(model, p: StructuredParams, seed: int = 0):
    """(pruned ModelProto, report) for an ONNX model."""
    from compressor.graph import analyze, prune_onnx

    if p.importance == "taylor":
        raise RecipeError("taylor importance needs gradients, which an ONNX model cannot give",
                          "use importance: l2 (or give the torch model)")
    a = analyze(model)
    sel = _select(a, p, True if p.head_dim is None else p.head_dim, seed=seed)
    pruned = prune_onnx(model, a, sel)
    size = lambda m: sum(int(np.prod(i.dims)) for i in m.graph.initializer)  # noqa: E731
    return pruned, _report(a, sel, size(model), size(pruned))


def structured_torch(model, example_inputs, p: StructuredParams, batches=None, seed: int = 0) -> dict:
    """Prune a torch model in place through its ONNX export; returns the report."""
    import torch
    from torch.nn.utils import parametrize

    from compressor.export import _as_named, export_onnx
    from compressor.graph import analyze, prune_onnx
    from compressor.graph.selection import candidates
    from compressor.graph.torch_bridge import (
        distinct_copy,
        exact_values,
        prune_torch,
        taylor_grads,
        torch_freezes,
    )
    from compressor.onnx_utils import run

    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise RecipeError("the model carries pruning masks from an earlier stage",
                          "put the structured stage before magnitude/gradual stages")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "analysis.onnx"
        export_onnx(distinct_copy(model), example_inputs, path)
        a = analyze(path)
    prefix = "model." if isinstance(example_inputs, dict) else ""  # export wraps keyword models in `.model`
    grads = None
    if p.importance == "taylor":
        g = taylor_grads(model, batches or [tuple(example_inputs.values()) if isinstance(example_inputs, dict)
                                            else tuple(example_inputs)])
        grads = {prefix + k: v for k, v in g.items()}
    head_dim = False if p.head_dim is None else p.head_dim
    module, args, names = _as_named(model, example_inputs, None)
    wanted = [g for g in a.prunable_groups if candidates(g, p.protect_output, p.protect_embeddings, p.heads, head_dim)]
    frozen = torch_freezes(module, args, names, a, wanted)  # groups the torch module cannot follow
    for g in a.groups:
        if g.id in frozen:
            for x in g.atoms:
                g.frozen.setdefault(x, []).append(frozen[g.id])
    sel = _select(a, p, head_dim, grads=grads, seed=seed)
    before = sum(t.numel() for t in model.parameters())
    pruned_onnx = prune_onnx(None, a, sel, values=exact_values(module, a))  # the torch weights, not the nudged
    prune_torch(module, a, sel)
    with torch.no_grad():  # the torch cut must compute what the ONNX cut computes
        ref = module(*args)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    got = run(pruned_onnx, {n: t.detach().cpu().numpy() for n, t in zip(names, args, strict=True)})[0]
    diff = float(np.max(np.abs(got - ref.detach().float().cpu().numpy())))
    if diff > 1e-3 + 1e-3 * float(np.max(np.abs(got))):
        raise VerificationError(f"torch model pruned through the bridge disagrees with the pruned ONNX (|diff| {diff:.3g})",
                                "report this as a bug; prune the ONNX export instead")
    rep = _report(a, sel, before, sum(t.numel() for t in model.parameters()))
    rep["torch_vs_onnx_max_diff"] = diff
    rep["torch_frozen"] = [{"group": g.name, "reason": frozen[g.id]} for g in a.groups if g.id in frozen]
    return rep


@register_method("structured", StructuredParams, help="group structured channel pruning over the ONNX dependency graph")
def run_structured(ctx: StageContext, p: StructuredParams) -> dict:
    if ctx.model is None:  # no torch module: the model is an ONNX graph
        ctx.onnx_model, rep = structured_onnx(ctx.onnx_model, p, seed=ctx.seed)
        return rep
    batches = _batches(ctx, p.taylor_batches) if p.importance == "taylor" else None
    return structured_torch(ctx.model, ctx.example_inputs, p, batches=batches, seed=ctx.seed)
