"""`structured` stage: group-level structured channel pruning over the ONNX dependency graph (DepGraph / SPA,
docs/structured.md). ONNX input is pruned directly; torch / HF input is exported, analysed, and the same cut is applied
to the torch model (compressor.graph.torch_bridge) so later stages can fine-tune it.

Device-aware widths: `round_to: auto` rounds kept widths for the target device (the stage context's device):
multiples of 8 on CUDA when the model runs fp16/bf16, 1 on CPU (results there are unchanged). `target: latency`
raises the channel ratio step by step until the pruned model's latency, measured on that device
(compressor.kernels.timing: CUDA graphs on GPU, eager on CPU), is at most `latency_target` × the dense one."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressor.errors import RecipeError, VerificationError
from compressor.methods import _memory as mem
from compressor.recipe import StageContext, register_method


class StructuredParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of channels (or of MACs, target=macs) to remove")
    importance: Literal["l2", "l1", "bn", "taylor", "random"] = Field("l2", description="group importance (docs/structured.md)")
    scope: Literal["local", "global"] = Field("local", description="rank inside each group, or one global threshold")
    round_to: int | Literal["auto"] = Field("auto", description="kept width of every group is a multiple of this; "
                                            "auto: 8 on CUDA in fp16/bf16 (tensor cores), 1 on CPU")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="dtype the pruned model runs in on the target device (auto: bf16/fp16 for torch models on "
                            "CUDA, fp32 otherwise); decides round_to: auto and the latency measurement")
    max_layer_ratio: float = Field(1.0, gt=0.0, le=1.0, description="cap on the fraction removed from one group")
    target: Literal["channels", "macs", "latency"] = Field(
        "channels", description="what `ratio` measures; latency: prune until latency_target is measured (ratio unused)")
    latency_target: float | None = Field(None, gt=0.0, lt=1.0, description="target: latency — pruned / dense latency, e.g. 0.6")
    latency_step: float = Field(0.1, gt=0.0, lt=1.0, description="target: latency — channel-ratio increment per try")
    latency_max_ratio: float = Field(0.9, gt=0.0, lt=1.0, description="target: latency — highest channel ratio tried")
    latency_batch: int = Field(32, ge=1, description="target: latency — batch size the latency is measured at")
    protect_output: bool = Field(True, description="keep the input features of the output layer")
    protect_embeddings: bool = Field(True, description="keep the embedding width / residual stream of transformers")
    heads: bool = Field(False, description="also remove whole attention heads")
    head_dim: bool | None = Field(None, description="remove dims within heads (default: on for ONNX, off for torch)")
    taylor_batches: int = Field(4, ge=1, description="batches of calibration data for Taylor importance")
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        "auto", description="torch models: the exporter the analysis runs on (auto: torch's default exporter, the "
                            "TorchScript one if that fails, noted in the report)")

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.round_to, int) and self.round_to < 1:
            raise ValueError("round_to must be >= 1 or auto")
        if self.target == "latency" and self.latency_target is None:
            raise ValueError("target: latency needs latency_target (pruned / dense latency, e.g. 0.6)")
        return self


def run_dtype(p: StructuredParams, device, fixed_dtype: bool):
    """The torch dtype the pruned model runs in on `device` (None = fp32)."""
    import torch

    from compressor.device import amp_dtype

    named = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if p.dtype != "auto":
        return named[p.dtype]
    return None if fixed_dtype else amp_dtype(device)  # an ONNX graph's dtype is fixed in the file


def resolved_round_to(p: StructuredParams, device, fixed_dtype: bool = False) -> int:
    """`round_to` as an int: explicit values win; auto follows the target device and dtype."""
    import torch

    from compressor.graph.selection import auto_round_to

    if p.round_to != "auto":
        return int(p.round_to)
    return auto_round_to(torch.device(device).type, run_dtype(p, device, fixed_dtype) is not None)


def _batches(ctx: StageContext, n: int) -> list[tuple]:
    import torch

    ds = getattr(ctx.data, "train", None) if ctx.data is not None else None
    if ds is not None and hasattr(ds, "tensors"):
        loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False)
        return [ds.bound(b) if hasattr(ds, "bound") else tuple(b) for _, b in zip(range(n), loader, strict=False)]
    ex = ctx.example_inputs
    return [tuple(ex.values()) if isinstance(ex, dict) else tuple(ex)]


def _select(a, p: StructuredParams, head_dim: bool, grads=None, seed: int = 0, round_to: int = 1, ratio: float | None = None,
            scores: dict | None = None, head_rule=None):
    from compressor.graph import select

    return select(a, p.importance if scores is None else scores, p.ratio if ratio is None else ratio, scope=p.scope, round_to=round_to,
                  max_layer_ratio=p.max_layer_ratio, target="channels" if p.target == "latency" else p.target,
                  protect_output=p.protect_output, protect_embeddings=p.protect_embeddings,
                  heads=p.heads, head_dim=head_dim, grads=grads, seed=seed, head_rule=head_rule)


def hf_head_rule(model):
    """The head layouts a Hugging Face model's config.json can say (compressor.checkpoint.hfconfig.head_rule), for
    the outermost module that carries an HF config; None for other models."""
    from compressor.checkpoint.hfconfig import head_rule
    from compressor.graph.torch_bridge import hf_config

    cfg = hf_config(model)
    return head_rule(cfg.to_dict()) if cfg is not None else None


def _report(a, sel, before: int, after: int) -> dict:
    from compressor.graph.macs import count_macs

    macs0, macs1 = count_macs(a), count_macs(a, sel.atoms)
    return {"groups": len(a.groups), "prunable_groups": len(a.prunable_groups), "removed_channels": len(sel.atoms),
            "channel_ratio": sel.ratio, "params_before": before, "params_after": after,
            "macs_before": macs0, "macs_after": macs1, "mac_reduction": 1 - macs1 / max(macs0, 1)} | (
                {"heads": sel.heads} if sel.heads else {})


def structured_onnx(model, p: StructuredParams, seed: int = 0, device="cpu"):
    """(pruned ModelProto, report) for an ONNX model."""
    from compressor.graph import analyze, prune_onnx

    if p.target == "latency":
        raise RecipeError("target: latency measures a torch model on the target device",
                          "give the torch model, or use target: macs for an ONNX model")
    if p.importance == "taylor":
        raise RecipeError("taylor importance needs gradients, which an ONNX model cannot give",
                          "use importance: l2 (or give the torch model)")
    a = analyze(model)
    round_to = resolved_round_to(p, device, fixed_dtype=True)
    sel = _select(a, p, True if p.head_dim is None else p.head_dim, seed=seed, round_to=round_to)
    pruned = prune_onnx(model, a, sel)
    size = lambda m: sum(int(np.prod(i.dims)) for i in m.graph.initializer)  # noqa: E731
    return pruned, _report(a, sel, size(model), size(pruned)) | {"round_to": round_to}


def _batch_of(args: tuple, n: int) -> tuple:
    """The example inputs repeated along the batch axis to `n` rows (latency is measured at a real batch)."""
    import torch

    def grow(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        reps = -(-n // t.shape[0])
        return torch.cat([t] * reps)[:n]

    return tuple(grow(t) for t in args)


def _latency_search(model, example_inputs, a, p: StructuredParams, head_dim: bool, grads, seed: int, round_to: int,
                    device, dtype, head_rule=None) -> tuple[float, dict]:
    """Raise the channel ratio by `latency_step` until pruned/dense latency on `device` <= latency_target."""
    import copy

    import torch

    from compressor.device import label
    from compressor.export import _as_named
    from compressor.graph.torch_bridge import made_tensors, prune_torch
    from compressor.kernels.calibrate import time_interleaved
    from compressor.kernels.timing import runner

    device = torch.device(device)
    module, args, _ = _as_named(model, example_inputs, None)
    args = _batch_of(args, p.latency_batch)
    cl = device.type == "cuda"  # channels_last: the tensor-core conv layout on GPUs; CPU keeps torch's default
    dense = runner(module, args, device, dtype=dtype, channels_last=cl)
    history, ratio, reached = [], 0.0, False
    while ratio + p.latency_step <= p.latency_max_ratio + 1e-9 and not reached:
        ratio = round(ratio + p.latency_step, 6)
        sel = _select(a, p, head_dim, grads=grads, seed=seed, round_to=round_to, ratio=ratio, head_rule=head_rule)
        cand, _, _ = _as_named(copy.deepcopy(model), example_inputs, None)
        prune_torch(cand, a, sel, made_tensors(cand, a))
        t = time_interleaved({"dense": dense, "pruned": runner(cand, args, device, dtype=dtype, channels_last=cl)}, device,
                             repeats=20, warmup=3)
        rel = t["pruned"] / t["dense"]
        history.append({"ratio": ratio, "dense_ms": t["dense"], "pruned_ms": t["pruned"], "relative": rel})
        reached = rel <= p.latency_target
    return ratio, {"target": p.latency_target, "reached": reached, "device": label(device), "batch": p.latency_batch,
                   "dtype": str(dtype).replace("torch.", "") if dtype is not None else "float32",
                   "timing": "cuda graph" if device.type == "cuda" else "eager", "tries": history}


def structured_torch(model, example_inputs, p: StructuredParams, batches=None, seed: int = 0, device="cpu") -> dict:
    """Prune a torch model in place through its ONNX export; returns the report. `device`: where the pruned model
    will run (decides `round_to: auto` and where `target: latency` measures); the model itself is not moved."""
    import torch
    from torch.nn.utils import parametrize

    from compressor.analysis_export import export_for_analysis
    from compressor.export import _as_named
    from compressor.graph import analyze, prune_onnx
    from compressor.graph.selection import candidates
    from compressor.graph.torch_bridge import (
        distinct_copy,
        exact_values,
        made_tensors,
        prune_torch,
        taylor_grads,
        torch_freezes,
    )
    from compressor.onnx_utils import run

    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise RecipeError("the model carries pruning masks from an earlier stage",
                          "put the structured stage before magnitude/gradual stages")
    exported = export_for_analysis(distinct_copy(model), example_inputs, p.exporter)
    a = analyze(exported.model)
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
    round_to = resolved_round_to(p, device, fixed_dtype=False)
    rule = hf_head_rule(model) if p.heads else None
    latency = None
    if p.target == "latency":
        ratio, latency = _latency_search(model, example_inputs, a, p, head_dim, grads, seed, round_to, device,
                                         run_dtype(p, device, False), rule)
        p = p.model_copy(update={"ratio": ratio})
    sel = _select(a, p, head_dim, grads=grads, seed=seed, round_to=round_to, head_rule=rule)
    before = sum(t.numel() for t in model.parameters())
    pruned_onnx = prune_onnx(None, a, sel, values=exact_values(module, a))  # the torch weights, not the nudged
    prune_torch(module, a, sel, made_tensors(module, a))
    with torch.no_grad():  # the torch cut must compute what the ONNX cut computes
        ref = module(*args)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    got = run(pruned_onnx, {n: t.detach().cpu().numpy() for n, t in zip(names, args, strict=True)})[0]
    diff = float(np.max(np.abs(got - ref.detach().float().cpu().numpy())))
    if diff > 1e-3 + 1e-3 * float(np.max(np.abs(got))):
        raise VerificationError(f"torch model pruned through the bridge disagrees with the pruned ONNX (|diff| {diff:.3g})",
                                "report this as a bug; prune the ONNX export instead")
    rep = _report(a, sel, before, sum(t.numel() for t in model.parameters())) | exported.info()
    batch = _static_batch(a, args)
    if batch > 1:  # the dynamo analysis export has the example batch baked in: MACs per sample, as TorchScript's
        rep["macs_before"], rep["macs_after"] = rep["macs_before"] // batch, rep["macs_after"] // batch
    rep["torch_vs_onnx_max_diff"] = diff
    rep["torch_frozen"] = [{"group": g.name, "reason": frozen[g.id]} for g in a.groups if g.id in frozen]
    rep["round_to"] = round_to
    if latency is not None:
        rep["latency_search"] = latency
    return rep


def _static_batch(a, args) -> int:
    """The batch size baked into the analysed graph (1 when its batch axis is dynamic)."""
    first = a.ir.shape(a.ir.model.graph.input[0].name) if a.ir.model.graph.input else None
    lead = args[0].shape[0] if args and hasattr(args[0], "shape") and args[0].dim() else 1
    return lead if first and first[0] == lead else 1


STREAMED_IMPORTANCE = ("l2", "l1", "random")  # computed from the weights alone, tensor by tensor


def streams(p: StructuredParams) -> bool:
    """Whether this stage can run on a checkpoint folder without loading it (structured_checkpoint)."""
    return p.importance in STREAMED_IMPORTANCE and p.target == "channels"


def axis_sums_for(folder, p: StructuredParams):
    """The per-axis magnitude sums this stage's importance will need, started now in a worker process (to
    overlap the analysis), or None for an importance that does not use them."""
    import json
    from pathlib import Path

    from compressor.checkpoint.axis_sums import AxisSums, likely_axes
    from compressor.checkpoint.shards import Checkpoint
    from compressor.graph.importance import MAGNITUDE_EXPONENT

    exponent = MAGNITUDE_EXPONENT.get(p.importance)
    if exponent is None or not streams(p):
        return None
    ckpt = Checkpoint(folder)
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return AxisSums(ckpt, exponent, likely_axes(ckpt, cfg, p.heads))


def structured_checkpoint(folder, analysis, p: StructuredParams, out_dir, *, seed: int = 0, device="cpu",
                          overwrite: bool = False, phases=None, sums=None) -> dict:
    """The stage on a Hugging Face safetensors folder, tensor by tensor (compressor.checkpoint): importance
    from the shards, the same selection as the in-memory path, the cut written to `out_dir` and verified.
    phases (compressor.utils.phases.Phases): gets "importance", "selection" and prune_checkpoint's phases.
    sums: compressor.checkpoint.axis_sums.AxisSums of this folder, started before the analysis (see
    :func:`axis_sums_for`)."""
    import json
    from pathlib import Path

    from compressor.checkpoint import checkpoint_scores, prune_checkpoint
    from compressor.checkpoint.hfconfig import head_rule
    from compressor.graph.selection import candidates
    from compressor.utils.phases import Phases

    phases = Phases.optional(phases)
    if not streams(p):
        raise RecipeError(f"streaming pruning takes importance {'/'.join(STREAMED_IMPORTANCE)} and target channels",
                          "load the model in memory for taylor/bn importance or MAC/latency targets")
    head_dim = False if p.head_dim is None else p.head_dim
    # only the groups the selection may cut are scored, so only their tensors are read from the shards
    needed = {g.id for g in analysis.groups
              if g.prunable and candidates(g, p.protect_output, p.protect_embeddings, p.heads, head_dim)}
    with phases("importance"):
        scores = checkpoint_scores(folder, analysis, p.importance, seed=seed, groups=needed, sums=sums)
        if sums is not None:
            sums.close()  # the tensors no scored group needs are left: the cut needs the CPU and the disk
            worker = {"importance_worker_peak_rss_bytes": sums.worker_peak_rss_bytes}
        else:
            worker = {}
    with phases("selection"):
        round_to = resolved_round_to(p, device, fixed_dtype=False)
        rule = head_rule(json.loads((Path(folder) / "config.json").read_text())) if p.heads else None
        sel = _select(analysis, p, head_dim, seed=seed, round_to=round_to, scores=scores, head_rule=rule)
    rep = prune_checkpoint(folder, analysis, sel, out_dir, overwrite=overwrite, phases=phases)
    return rep | {"removed_channels": len(sel.atoms), "channel_ratio": sel.ratio, "round_to": round_to, "streaming": True} | (
        {"heads": sel.heads} if sel.heads else {}) | worker


def _memory(fp, p) -> int:
    """A torch model is exported to ONNX (analysed, cut, and checked against the module cut through the bridge
    on a copy); an ONNX model is cut in the graph (one more graph)."""
    return mem.onnx_export(fp) + mem.model_copy(fp)


@register_method("structured", StructuredParams, help="group structured channel pruning over the ONNX dependency graph",
                 memory_needed=_memory, fp32=True)  # cut through its fp32 ONNX export and checked against it
def run_structured(ctx: StageContext, p: StructuredParams) -> dict:
    if ctx.model is None:  # no torch module: the model is an ONNX graph
        ctx.onnx_model, rep = structured_onnx(ctx.onnx_model, p, seed=ctx.seed, device=ctx.device)
        return rep
    batches = _batches(ctx, p.taylor_batches) if p.importance == "taylor" else None
    return structured_torch(ctx.model, ctx.example_inputs, p, batches=batches, seed=ctx.seed, device=ctx.device)
