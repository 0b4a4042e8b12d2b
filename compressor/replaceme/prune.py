"""The ReplaceMe entry point: choose the cut, estimate T, fold it, remove the blocks; and the naive baseline.

:func:`prune` reads as the method's steps; each step lives in its own module (calibration, walk, structure,
estimators). Its options are one frozen :class:`ReplaceMeOptions`, which callers may pass whole
(``options=``) or field by field as keywords, as before.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compressor.blocks import BlockAdapter
from compressor.device import module_device
from compressor.errors import InputError, VerificationError
from compressor.replaceme.calibration import Calibration, make_calibration
from compressor.replaceme.estimators import _Stats, collect_statistics, solve_cosine, solve_ls
from compressor.replaceme.memory import PeakMemory
from compressor.replaceme.quality import count_params
from compressor.replaceme.walk import _Capture, block_distances
from compressor.task import is_causal_lm
from compressor.utils import progress as bars

Estimator = Literal["ls", "cosine", "none"]


@dataclass(frozen=True)
class ReplaceMeOptions:
    """How :func:`prune` runs, apart from what it prunes (model, calibration data, n_blocks, estimator)."""

    # calibration data
    tokenizer: object = None
    calib_samples: int | None = None
    max_length: int = 128
    batch_size: int = 16
    include_padding: bool = False  # count padding positions as calibration tokens (the reference code does)
    # the cut
    start: int | None = None  # force the cut to start here (default: min angular distance)
    distance_tokens: Literal["auto", "last", "mean"] = "auto"  # auto: last token (causal LMs), mean (encoders)
    # the estimate of T
    ridge: float = 0.0
    cosine_loss: Literal["residual", "output"] = "residual"
    cosine_init: Literal["identity", "ls"] = "identity"
    cosine_epochs: int = 10
    cosine_lr: float = 1e-4
    cosine_batch: int = 1024
    seed: int = 0
    # which modules are the blocks (default: found by BlockAdapter.for_model)
    adapter: BlockAdapter | None = None
    blocks: str | None = None
    out_proj: str | None = None
    post_norm: str | None = None
    # where and what comes back
    device: object = None  # default: where the model is
    inplace: bool = False
    return_transform: bool = False  # put T (float64) in report["T"]
    # called as on_cut(model, adapter, start) once the cut is chosen, before the model is changed: the baselines
    # measure the same cut without T there (adapter.without_blocks), on the one model in memory
    on_cut: object = None


def prune(model: nn.Module, calib, n_blocks: int = 2, estimator: Estimator = "ls", *,
          options: ReplaceMeOptions | None = None, **kw) -> tuple[nn.Module, dict]:
    """Remove `n_blocks` consecutive blocks and fold a linear map T (estimator "ls" | "cosine") into the last kept
    block's MLP output projection. estimator="none" removes the blocks without T (the UIDL baseline).
    Options (:class:`ReplaceMeOptions`) come as `options`, as keywords, or both (keywords win). `start` forces the
    cut to start there (else: argmin of the angular distance). Returns (model, report). The model is copied
    first unless inplace=True; return_transform=True puts T (float64 tensor) in report["T"]."""
    o = dataclasses.replace(options or ReplaceMeOptions(), **kw)
    t_start = time.perf_counter()
    caller_device = module_device(model) if isinstance(model, nn.Module) else None
    model, adapter = _prepare(model, estimator, o)
    L = len(adapter)
    _check_cut(n_blocks, o.start, L)
    device = torch.device(o.device) if o.device is not None else module_device(model)
    model.to(device)
    cal = make_calibration(calib, tokenizer=o.tokenizer, calib_samples=o.calib_samples, max_length=o.max_length,
                           batch_size=o.batch_size)
    if cal.n_sequences == 0:
        raise InputError("the calibration data has no usable sequences", "give non-empty calibration text")
    how = o.distance_tokens if o.distance_tokens != "auto" else ("last" if is_causal_lm(model) else "mean")
    report: dict = {"method": "replaceme", "estimator": estimator, "n_blocks": n_blocks, "blocks_before": L,
                    "block_stack": adapter.blocks_path, "out_proj": adapter.out_proj_name,
                    "calibration": {"source": cal.source, "sequences": cal.n_sequences}, "distance_tokens": how}
    params_before = count_params(model)
    s, stats, probe = _calibrate(adapter, cal, n_blocks, estimator, o, device, how, report)
    if o.on_cut is not None:
        o.on_cut(model, adapter, s)
    if estimator != "none":
        T = _estimate(adapter, stats, s, estimator, o, report)
        del stats
        _fold_checked(adapter, s - 1, T, probe, o.inplace, report)
    report["config_changes"] = adapter.remove_blocks(range(s, s + n_blocks))
    report["blocks_after"] = len(adapter)
    report["params_before"] = params_before
    report["params_after"] = count_params(model)
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    model.to(caller_device)  # calibrated on `device`, returned where the caller's model was
    return model, report


def _prepare(model: nn.Module, estimator: str, o: ReplaceMeOptions) -> tuple[nn.Module, BlockAdapter]:
    """The model to work on (a copy unless inplace) and its block adapter."""
    if estimator not in ("ls", "cosine", "none"):
        raise InputError(f"unknown estimator {estimator!r}", "use ls, cosine or none")
    if not isinstance(model, nn.Module):
        raise InputError(f"ReplaceMe prunes a torch nn.Module, got {type(model).__name__}", "load the model with torch / transformers")
    if not o.inplace:
        model = copy.deepcopy(model)
    model.eval()
    adapter = o.adapter
    if adapter is None:
        adapter = BlockAdapter.for_model(model, blocks=o.blocks, out_proj=o.out_proj, post_norm=o.post_norm)
    elif not o.inplace:
        adapter = copy.copy(adapter)
        adapter.model = model
    return model, adapter


def _check_cut(n_blocks: int, start: int | None, L: int) -> None:
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise InputError(f"n_blocks must be a positive integer, got {n_blocks!r}", "e.g. n_blocks=2")
    if n_blocks >= L:
        raise InputError(f"cannot remove {n_blocks} of {L} blocks: the first block is always kept",
                         f"use n_blocks between 1 and {L - 1}")
    if start is not None:
        if start == 0:
            raise InputError("cannot cut the first block (block 0): T is folded into the block before the cut",
                             f"use start between 1 and {L - n_blocks}")
        if not 1 <= start <= L - n_blocks:
            raise InputError(f"a cut of {n_blocks} blocks starting at {start} does not fit in {L} blocks",
                             f"use start between 1 and {L - n_blocks}")


@bars.step("ReplaceMe calibration")
def _calibrate(adapter: BlockAdapter, cal: Calibration, n_blocks: int, estimator: str, o: ReplaceMeOptions, device,
               how: str, report: dict) -> tuple[int, _Stats | None, tuple | None]:
    """Pass 1 (distances → the cut start s) and, with an estimator, pass 2 (the statistics of T), under one
    memory measurement. Returns (s, statistics, probe: block s−1's input on batch 0)."""
    L = len(adapter)
    t_cal = time.perf_counter()
    stats = probe = None
    with PeakMemory(device) as mem:
        dist, shape = block_distances(adapter, cal, n_blocks, device=device, distance_tokens=how, mem=mem)
        s = o.start if o.start is not None else min(dist, key=lambda k: (dist[k], k))
        if estimator != "none":
            stats, check, probe = collect_statistics(adapter, cal, s, n_blocks, device=device, include_padding=o.include_padding,
                                                     keep_tokens=estimator == "cosine", mem=mem)
            d = stats.G.shape[0]
            report["calibration"]["tokens"] = stats.n_tokens
            report["hidden_size"] = d
            if stats.n_tokens < d:
                raise InputError(
                    f"the calibration data gives {stats.n_tokens} tokens; estimating a {d}×{d} transform needs at least {d}",
                    "give more or longer calibration text (a few hundred sentences)")
            report.update(check)
    c = report["calibration"]
    c["seconds"] = round(time.perf_counter() - t_cal, 3)
    c["peak_memory_mb"] = round(mem.peak_delta / 2**20, 2)
    c["peak_memory_method"] = mem.method
    c["held_tensors_peak_mb"] = round(mem.held_peak / 2**20, 2)
    # what keeping every layer's hidden states (output_hidden_states) for the calibration set would hold, float32
    c["all_hidden_states_mb"] = round((L + 1) * shape["positions"] * shape["hidden_size"] * 4 / 2**20, 2)
    report["distances"] = {str(k): round(v, 6) for k, v in dist.items()}
    report["start"] = s
    report["removed_blocks"] = list(range(s, s + n_blocks))
    report["selected_by"] = "given start" if o.start is not None else "min angular distance"
    return s, stats, probe


def _estimate(adapter: BlockAdapter, stats: _Stats, s: int, estimator: str, o: ReplaceMeOptions, report: dict) -> torch.Tensor:
    """T from the statistics (float64), with how it was found in report["estimate"]."""
    t_est = time.perf_counter()
    if estimator == "ls":
        T, info = solve_ls(stats, o.ridge)
    else:
        T, info = solve_cosine(stats, loss=o.cosine_loss, init=o.cosine_init, epochs=o.cosine_epochs, lr=o.cosine_lr,
                               batch=o.cosine_batch, seed=o.seed, ridge=o.ridge, norm=adapter.post_norm(s - 1))
    info["seconds"] = round(time.perf_counter() - t_est, 3)
    eye = torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
    info["T_rel_dist_from_identity"] = float((T - eye).norm() / eye.norm())
    report["estimate"] = info
    if o.return_transform:
        report["T"] = T.detach().cpu()
    return T


def _fold_checked(adapter: BlockAdapter, index: int, T: torch.Tensor, probe: tuple, inplace: bool, report: dict) -> None:
    """Fold T into block `index`, then check the folded block computes what the block with an explicit T after
    its out projection computed (on the probe batch)."""
    hidden0, inputs0 = probe
    cap = _Capture(adapter, index, T=T.double())
    try:
        unfolded = adapter.run_block(index, hidden0, inputs0)
    finally:
        cap.close()
    adapter.fold(index, T)
    folded = adapter.run_block(index, hidden0, inputs0)
    err = float((folded - unfolded).abs().max() / (unfolded.abs().max() + 1e-12))
    report["fold_check_rel_err"] = err
    tol = 1e-4 if folded.dtype == torch.float32 else (1e-9 if folded.dtype == torch.float64 else 2e-2)
    if not err <= tol:
        raise VerificationError(f"folding T into block {index} changed its output by {err:.2e} (relative)",
                                "report this as a bug; the model was not modified in place" if not inplace else "report this as a bug")


def naive_drop(model: nn.Module, n_blocks: int, *, inplace: bool = False, adapter: BlockAdapter | None = None) -> tuple[nn.Module, dict]:
    """Baseline: drop the last n blocks (no calibration, no T)."""
    model = model if inplace else copy.deepcopy(model)
    adapter = adapter or BlockAdapter.for_model(model)
    L = len(adapter)
    if not 1 <= n_blocks < L:
        raise InputError(f"cannot remove {n_blocks} of {L} blocks", f"use n_blocks between 1 and {L - 1}")
    changes = adapter.remove_blocks(range(L - n_blocks, L))
    return model, {"method": "naive-drop-last", "removed_blocks": list(range(L - n_blocks, L)), "config_changes": changes}
