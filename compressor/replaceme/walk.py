"""The block walk: calibration batches carried through the blocks one at a time (only the current hidden
states are held), hooks on a block's output projection, and the angular distance that picks the cut."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from compressor.blocks import BlockAdapter
from compressor.device import to_device
from compressor.replaceme.calibration import Calibration
from compressor.replaceme.memory import PeakMemory
from compressor.utils import progress as bars


def _flat(h: torch.Tensor) -> torch.Tensor:
    """[B, S, d] view of a hidden state ([B, d] → [B, 1, d])."""
    return h.reshape(h.shape[0], -1, h.shape[-1])


def _token_mask(mask, h: torch.Tensor, include_padding: bool) -> torch.Tensor:
    f = _flat(h)
    if mask is None or include_padding or mask.shape != f.shape[:2]:
        return torch.ones(f.shape[:2], dtype=torch.bool, device=h.device)
    return mask.to(h.device)


def _pool(h: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One float32 vector per sequence: last non-padded token or masked mean."""
    f = _flat(h).float()
    if how == "last":
        idx = mask.long().cumsum(1).argmax(1)  # last True position
        return f[torch.arange(f.shape[0], device=f.device), idx]
    m = mask.unsqueeze(-1)
    return torch.where(m, f, torch.zeros((), device=f.device)).sum(1) / m.sum(1).clamp_min(1)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return torch.arccos(cos) / math.pi


def _batch(adapter: BlockAdapter, cal: Calibration, b: int, device, include_padding: bool):
    """Batch b at the entrance of block 0: (hidden states, the block inputs the model built, token mask)."""
    h, inputs = adapter.capture(to_device(cal.batches[b], device))
    return h, inputs, _token_mask(cal.masks[b], h, include_padding)


def _positions(cal: Calibration) -> list[int] | None:
    """Token positions per batch (padding included), when the batches are token ids; None for plain tensors."""
    if any(m is None for m in cal.masks):
        return None
    return [int(m.numel()) for m in cal.masks]


def plan_line(cal: Calibration, seconds: list[float], L: int) -> str:
    """What the calibration will cost, from the batches timed so far through every block: the rest is scaled by
    token positions from the last of them (the first batch also pays one-time warm-up, which made an estimate
    from it alone 2-3x high on short texts). Pass 1 runs every block, pass 2 the blocks up to the cut (at most as
    many). Said before the long part runs, so a user can lower calib_samples instead of waiting."""
    pos = _positions(cal) or [1] * len(cal.batches)
    k = len(seconds)
    total = sum(seconds) + seconds[-1] / max(pos[k - 1], 1) * sum(pos[k:])
    size = f"{sum(pos)} token positions" if _positions(cal) else f"{cal.n_sequences} inputs"
    return (f"ReplaceMe calibration: {cal.n_sequences} sequences ({size}, {L} blocks): pass 1 ~{_minutes(total)} on "
            f"this machine, pass 2 up to ~{_minutes(total)} more (calib_samples lowers both)")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


@torch.no_grad()
def block_distances(adapter: BlockAdapter, cal: Calibration, n_blocks: int, *, device, distance_tokens: str,
                    mem: PeakMemory | None = None) -> tuple[dict[int, float], dict]:
    """d(s) for s = 1 … L−n (pass 1: each batch through every block, keeping one pooled vector per sequence and
    block; only one batch's hidden states are alive at a time). Also returns the hidden size and the number of
    hidden-state positions (for the memory comparison)."""
    L = len(adapter)
    reps: list[list[torch.Tensor]] = [[] for _ in range(L)]
    shape = {"hidden_size": 0, "positions": 0}
    times: list[float] = []
    with bars.progress("ReplaceMe pass 1: block distances", total=len(cal.batches)) as bar:
        for b in range(len(cal.batches)):
            t0 = time.perf_counter()
            h, inputs, mask = _batch(adapter, cal, b, device, include_padding=False)
            f = _flat(h)
            shape["hidden_size"] = int(f.shape[-1])
            shape["positions"] += int(f.shape[0] * f.shape[1])
            for ell in range(L):
                h = adapter.run_block(ell, h, inputs)
                reps[ell].append(_pool(h, mask, distance_tokens))
            if mem is not None:
                mem.note(h, inputs, mask, reps)
            times.append(time.perf_counter() - t0)
            if b == min(1, len(cal.batches) - 2):  # after the second batch (the first when there are two)
                bars.note(plan_line(cal, times, L))
            bar.advance()
    pooled = [torch.cat(r) for r in reps]
    return {s: float(angular_distance(pooled[s - 1], pooled[s + n_blocks - 1]).mean()) for s in range(1, L - n_blocks + 1)}, shape


class _Capture:
    """Forward hooks on block i: out-projection output m, and the post-norm input z (post-norm blocks)."""

    def __init__(self, adapter: BlockAdapter, index: int, zero_m: bool = False, post_norm: nn.Module | None = None,
                 T: torch.Tensor | None = None):
        self.m = self.z = self.norm_out = None
        proj = adapter.out_proj(index)
        self.handles = [proj.register_forward_hook(self._on_proj)]
        self.zero_m, self.T = zero_m, T
        if post_norm is not None:
            self.handles.append(post_norm.register_forward_pre_hook(self._on_norm))
            self.handles.append(post_norm.register_forward_hook(self._on_norm_out))

    def _on_proj(self, _mod, _args, out):
        if self.T is not None:  # unfolded reference: out projection followed by an explicit T
            return (out.double() @ self.T.to(out.device)).to(out.dtype)
        self.m = out
        if self.zero_m:
            return torch.zeros_like(out)
        return None

    def _on_norm(self, _mod, args):
        self.z = args[0]

    def _on_norm_out(self, _mod, _args, out):
        self.norm_out = out

    def close(self):
        for h in self.handles:
            h.remove()

