"""Estimating T: the statistics pass over the cut (G = Σxᵀx, B = Σxᵀy in float64, block by block) and the
two estimators, least squares and cosine (Adam)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.blocks import BlockAdapter
from compressor.replaceme.calibration import Calibration
from compressor.replaceme.memory import PeakMemory
from compressor.replaceme.structure import _apply_norm, _post_norm_target, _z_stats, check_structure
from compressor.replaceme.walk import _batch, _Capture, _flat
from compressor.utils import progress as bars


@dataclass
class _Stats:
    G: torch.Tensor
    B: torch.Tensor
    yy: float = 0.0
    n_tokens: int = 0
    tokens: dict = field(default_factory=dict)  # cosine: x, y, a, h (float32)


@torch.no_grad()
def collect_statistics(adapter: BlockAdapter, cal: Calibration, start: int, n_blocks: int, *, device,
                       include_padding: bool, keep_tokens: bool, mem: PeakMemory | None = None):
    """Pass 2: G = Σxᵀx, B = Σxᵀy (float64) for the cut start … start+n−1, each batch carried through the blocks up
    to the cut and folded into G and B at once: one batch's activations are alive at a time, never all tokens'."""
    i, end = start - 1, start + n_blocks - 1
    norm = adapter.post_norm(i)
    stats = check = probe = None
    keep: dict = {"x": [], "y": [], "a": [], "h": []}
    with bars.progress("ReplaceMe pass 2: statistics of T", total=len(cal.batches)) as bar:
        for b in range(len(cal.batches)):
            h, inputs, mask = _batch(adapter, cal, b, device, include_padding)
            for ell in range(i):
                h = adapter.run_block(ell, h, inputs)
            if b == 0:
                check = check_structure(adapter, i, h, inputs)
                probe = (h, inputs)  # block i's input on batch 0, for the fold check
            cap = _Capture(adapter, i, post_norm=norm)
            try:
                h = adapter.run_block(i, h, inputs)
            finally:
                cap.close()
            z = cap.z if norm is not None else h
            x = _flat(cap.m)[mask]
            a = _flat(z)[mask] - x
            zs = _z_stats(_flat(z)[mask], norm) if norm is not None else None
            cap = z = None
            for ell in range(start, end + 1):
                h = adapter.run_block(ell, h, inputs)
            target_h = _flat(h)[mask]
            x64 = x.double()
            y64 = (_post_norm_target(zs, target_h, norm) if norm is not None else target_h.double()) - a.double()
            if stats is None:
                d = x.shape[-1]
                stats = _Stats(torch.zeros(d, d, dtype=torch.float64, device=device), torch.zeros(d, d, dtype=torch.float64, device=device))
            stats.G += x64.T @ x64
            stats.B += x64.T @ y64
            stats.yy += float((y64 * y64).sum())
            stats.n_tokens += x64.shape[0]
            if keep_tokens:
                keep["x"].append(x.float())
                keep["y"].append(y64.float())
                keep["a"].append(a.float())
                keep["h"].append(target_h.float())
            if mem is not None:
                mem.note(h, inputs, x64, y64, a, zs, probe, stats.G, stats.B, keep)
            del x64, y64
            bar.advance()
    if keep_tokens:
        stats.tokens = {k: torch.cat(v) for k, v in keep.items()}
        if mem is not None:
            mem.note(stats.tokens, probe, stats.G, stats.B)
    return stats, check, probe


def solve_ls(stats: _Stats, ridge: float = 0.0) -> tuple[torch.Tensor, dict]:
    d = stats.G.shape[0]
    A = stats.G + ridge * torch.eye(d, dtype=torch.float64, device=stats.G.device)
    info: dict = {}
    try:
        L = torch.linalg.cholesky(A)
        T = torch.cholesky_solve(stats.B, L)
        info["solver"] = "cholesky"
    except RuntimeError:  # singular G (too few or degenerate tokens): minimum-norm solution
        T = torch.linalg.pinv(A, hermitian=True) @ stats.B
        info["solver"] = "pinv (G singular)"
    resid = float(torch.trace(T.T @ stats.G @ T) - 2 * torch.trace(T.T @ stats.B)) + stats.yy
    info["ls_rel_residual"] = resid / max(stats.yy, 1e-30)
    return T, info


def solve_cosine(stats: _Stats, *, loss: str, init: str, epochs: int, lr: float, batch: int, seed: int,
                 ridge: float, norm: nn.Module | None) -> tuple[torch.Tensor, dict]:
    tok = stats.tokens
    X, Y = tok["x"], tok["y"]
    d = X.shape[1]
    T0 = solve_ls(stats, ridge)[0].float() if init == "ls" else torch.eye(d, device=X.device)
    T = nn.Parameter(T0.clone())
    opt = torch.optim.Adam([T], lr=lr)
    g = torch.Generator(device="cpu").manual_seed(seed)
    cos = torch.nn.functional.cosine_similarity
    losses = []
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(X.shape[0], generator=g).to(X.device)
            total, count = 0.0, 0
            for idx in perm.split(batch):
                if loss == "residual":
                    val = 1 - cos(X[idx] @ T, Y[idx], dim=-1).mean()
                else:
                    val = 1 - cos(_apply_norm(norm, tok["a"][idx] + X[idx] @ T), tok["h"][idx], dim=-1).mean()
                opt.zero_grad(set_to_none=True)
                val.backward()
                opt.step()
                total += float(val.detach()) * len(idx)
                count += len(idx)
            losses.append(total / count)
    return T.detach().double(), {"cosine_loss_first_epoch": losses[0], "cosine_loss_last_epoch": losses[-1], "steps": epochs * math.ceil(X.shape[0] / batch)}

