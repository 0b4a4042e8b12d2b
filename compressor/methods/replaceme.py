"""The ``replaceme`` recipe stage: depth pruning with one linear map (the algorithm is :mod:`compressor.replaceme`).

The stage picks calibration and held-out data from the run's data (the shipped corpus for text models
without ``--data``), prunes, and with ``baselines`` measures the pruned model next to the same cut without T
and a naive drop of the last blocks.
"""

from __future__ import annotations

import time
from typing import Literal

import torch

from pydantic import BaseModel, ConfigDict, Field

from compressor.errors import RecipeError
from compressor.recipe import StageContext, register_method
from compressor.device import module_device
from compressor.replaceme import Estimator, PeakMemory, dense_reference, prune, quality
from compressor.utils.memory import footprint


class ReplaceMeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_blocks: int = Field(2, ge=1, description="consecutive blocks to remove")
    estimator: Estimator = Field("ls", description="ls (least squares, float64) | cosine (Adam) | none (no T: UIDL)")
    ridge: float = Field(0.0, ge=0.0, description="ridge α in T = (XᵀX + αI)⁻¹XᵀY")
    start: int | None = Field(None, ge=1, description="force the cut to start at this block (default: min angular distance)")
    calib_samples: int | None = Field(256, ge=1, description="calibration sequences (texts) to use (docs/replaceme.md: cost)")
    max_length: int = Field(128, ge=2, description="tokens per calibration sequence (truncation)")
    batch_size: int = Field(16, ge=1)
    distance_tokens: Literal["auto", "last", "mean"] = Field("auto", description="auto: last token (decoders), mean (encoders)")
    include_padding: bool = Field(False, description="count padding positions as calibration tokens (reference behaviour)")
    cosine_loss: Literal["residual", "output"] = Field("residual", description="cos(xT, y) or cos(norm(a + xT), h)")
    cosine_init: Literal["identity", "ls"] = "identity"
    cosine_epochs: int = Field(10, ge=1)
    cosine_lr: float = Field(1e-4, gt=0)
    cosine_batch: int = Field(1024, ge=1)
    baselines: bool = Field(True, description="also measure naive drop (last n blocks) and the same cut without T")
    eval_samples: int = Field(64, ge=1, description="held-out texts / inputs for the baseline comparison")


def _memory(fp, p: ReplaceMeParams) -> int:
    """On top of the one model (pruned in place; the baselines run it with blocks left out, never a copy):
    compressor.replaceme.memory.stage_bytes, the larger of the calibration, the solve and fold of T, and the
    perplexity of one evaluation batch."""
    from compressor.replaceme.memory import stage_bytes

    return stage_bytes(fp, calib_samples=p.calib_samples or 1024, max_length=p.max_length, batch_size=p.batch_size,
                       n_blocks=p.n_blocks, keep_tokens=p.estimator == "cosine", baselines=p.baselines)


@register_method("replaceme", ReplaceMeParams, help="ReplaceMe: remove n transformer blocks, fold a linear map into the block before",
                 kinds=("torch", "hf"), memory_needed=_memory)
def run_replaceme(ctx: StageContext, p: ReplaceMeParams) -> dict:
    from compressor.hf import corpus_sentences

    data = ctx.data
    texts_eval = inputs_eval = None
    if ctx.current_model().text_input:
        if ctx.tokenizer is None:
            raise RecipeError("replaceme on a Hugging Face model needs its tokenizer", "save the tokenizer into the model folder")
        if data is not None and data.texts:
            calib, texts_eval = list(data.texts), list(data.test_texts or [])
        elif data is None:
            corpus = corpus_sentences()
            calib, texts_eval = corpus[0::2], corpus[1::2]
        else:
            raise RecipeError(f"replaceme calibrates a text model on text, got data {data.source}", "use --data text:FILE (or no --data: the shipped corpus)")
    else:
        if data is None or (data.train is None and data.test is None):
            raise RecipeError("replaceme on a torch model needs calibration inputs", "pass --data (e.g. npz:FILE or random)")
        calib = (data.train or data.test).tensors[0]
        inputs_eval = data.test.tensors[0][: p.eval_samples] if data.test is not None else None
    texts_eval = texts_eval[: p.eval_samples] if texts_eval else None
    kw = p.model_dump(exclude={"baselines", "eval_samples"})
    table: dict = {}
    on_cut = None
    if p.baselines and (texts_eval or inputs_eval is not None):
        qkw = {"tokenizer": ctx.tokenizer, "texts": texts_eval} if texts_eval else {"inputs": inputs_eval}

        def on_cut(model, adapter, start):
            """The cut is chosen and the model not yet changed: measure it dense, without its last n blocks and
            without the cut's blocks (no T), each by running the one model with those blocks left out."""
            t0 = time.perf_counter()
            ref = dense_reference(model, **qkw)
            table["dense"] = quality(model, model, reference=ref, **qkw)
            with adapter.without_blocks(range(start, start + p.n_blocks)):
                table["same-cut-no-T"] = quality(model, model, reference=ref, **qkw)
            L = len(adapter)
            with adapter.without_blocks(range(L - p.n_blocks, L)):
                table["naive-drop-last"] = quality(model, model, reference=ref, **qkw)
            table["_reference"] = ref
            table["_seconds"] = time.perf_counter() - t0

    dev = ctx.device if ctx.device is not None else None
    # in place: ctx.model is this run's working model (compress() copies a caller's object), so no copy is made
    with PeakMemory(torch.device(dev) if dev is not None else module_device(ctx.model)) as peak:
        pruned, report = prune(ctx.model, calib, tokenizer=ctx.tokenizer, device=dev, seed=ctx.seed, inplace=True,
                               on_cut=on_cut, **kw)
        if table:
            ref, seconds, t0 = table.pop("_reference"), table.pop("_seconds"), time.perf_counter()
            pruned_row = quality(pruned, pruned, reference=ref, **qkw)
            report["comparison_seconds"] = round(seconds + time.perf_counter() - t0, 3)
            report["comparison"] = {"dense": table["dense"], f"replaceme-{p.estimator}": pruned_row,
                                    "same-cut-no-T": table["same-cut-no-T"], "naive-drop-last": table["naive-drop-last"]}
            report["comparison_data"] = "held-out texts" if texts_eval else "held-out inputs"
    report["calibration"]["source"] = data.source if data is not None else "shipped corpus (even sentences)"
    # the stage's own peak above the model it started with, next to the up-front estimate it was admitted with
    report["stage_peak_memory_mb"] = round(peak.peak_delta / 2**20, 1)
    report["stage_memory_estimate_mb"] = round(_memory(footprint(pruned), p) / 2**20, 1)
    ctx.model = pruned
    return report
