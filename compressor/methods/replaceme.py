"""The ``replaceme`` recipe stage: depth pruning with one linear map (the algorithm is :mod:`compressor.replaceme`).

The stage picks calibration and held-out data from the run's data (the shipped corpus for text models
without ``--data``), prunes, and with ``baselines`` measures the pruned model next to the same cut without T
and a naive drop of the last blocks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compressor.errors import RecipeError
from compressor.methods import _memory as mem
from compressor.recipe import StageContext, register_method
from compressor.replaceme import Estimator, dense_reference, naive_drop, prune, quality


class ReplaceMeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_blocks: int = Field(2, ge=1, description="consecutive blocks to remove")
    estimator: Estimator = Field("ls", description="ls (least squares, float64) | cosine (Adam) | none (no T: UIDL)")
    ridge: float = Field(0.0, ge=0.0, description="ridge α in T = (XᵀX + αI)⁻¹XᵀY")
    start: int | None = Field(None, ge=1, description="force the cut to start at this block (default: min angular distance)")
    calib_samples: int | None = Field(1024, ge=1, description="calibration sequences (texts) to use")
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
    eval_samples: int = Field(256, ge=1, description="held-out texts / inputs for the baseline comparison")


def _memory(fp, p: ReplaceMeParams) -> int:
    """The pruned copy (and the same cut without T beside it for the baselines); the calibration walk holds one
    block's input and output hidden states (fp32) of every calibration sequence; G = ΣxᵀX and B = ΣxᵀY are d×d
    float64, accumulated batch by batch."""
    d = fp.hidden or int(fp.largest_bytes ** 0.5 // 2) or 1
    tokens = (p.calib_samples or 1024) * p.max_length
    return (2 if p.baselines else 1) * mem.model_copy(fp) + 2 * tokens * d * 4 + 2 * d * d * 8


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
    dense = ctx.model
    dev = ctx.device if ctx.device is not None else None
    pruned, report = prune(dense, calib, tokenizer=ctx.tokenizer, device=dev, seed=ctx.seed, inplace=False, **kw)
    report["calibration"]["source"] = data.source if data is not None else "shipped corpus (even sentences)"
    if p.baselines and (texts_eval or inputs_eval is not None):
        qkw = {"tokenizer": ctx.tokenizer, "texts": texts_eval} if texts_eval else {"inputs": inputs_eval}
        ref = dense_reference(dense, **qkw)
        table = {"dense": quality(dense, dense, reference=ref, **qkw)}
        table[f"replaceme-{p.estimator}"] = quality(pruned, dense, reference=ref, **qkw)
        uidl, _ = prune(dense, calib, tokenizer=ctx.tokenizer, device=dev, inplace=False,
                        **{**kw, "estimator": "none", "start": report["start"]})
        table["same-cut-no-T"] = quality(uidl, dense, reference=ref, **qkw)
        del uidl
        naive, _ = naive_drop(dense, p.n_blocks)
        table["naive-drop-last"] = quality(naive, dense, reference=ref, **qkw)
        del naive
        report["comparison"] = table
        report["comparison_data"] = "held-out texts" if texts_eval else "held-out inputs"
    ctx.model = pruned
    return report

