"""The block walk: calibration batches carried through the blocks one at a time (only the current hidden
states are held), hooks on a block's output projection, and the angular distance that picks the cut."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compressor.blocks import BlockAdapter
from compressor.device import to_device
from compressor.replaceme.calibration import Calibration
from compressor.replaceme.memory import PeakMemory


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


@dataclass
class _State:
    hidden: list
    inputs: list
    masks: list  # token masks per batch, on device


def _start(adapter: BlockAdapter, cal: Calibration, device, include_padding: bool) -> _State:
    hidden, inputs, masks = [], [], []
    for batch, mask in zip(cal.batches, cal.masks, strict=True):
        h, inp = adapter.capture(to_device(batch, device))
        hidden.append(h)
        inputs.append(inp)
        masks.append(_token_mask(mask, h, include_padding))
    return _State(hidden, inputs, masks)


def _advance(adapter: BlockAdapter, st: _State, index: int) -> None:
    for b in range(len(st.hidden)):
        st.hidden[b] = adapter.run_block(index, st.hidden[b], st.inputs[b])


@torch.no_grad()
def block_distances(adapter: BlockAdapter, cal: Calibration, n_blocks: int, *, device, distance_tokens: str,
                    mem: PeakMemory | None = None) -> tuple[dict[int, float], dict]:
    """d(s) for s = 1 … L−n (pass 1: every block once, keeping one pooled vector per sequence and block).
    Also returns the hidden size and the number of hidden-state positions (for the memory comparison)."""
    L = len(adapter)
    st = _start(adapter, cal, device, include_padding=False)
    shape = {"hidden_size": int(st.hidden[0].shape[-1]), "positions": sum(int(_flat(h).shape[0] * _flat(h).shape[1]) for h in st.hidden)}
    reps = []
    for ell in range(L):
        _advance(adapter, st, ell)
        reps.append(torch.cat([_pool(h, m, distance_tokens) for h, m in zip(st.hidden, st.masks, strict=True)]))
        if mem is not None:
            mem.note(st.hidden, st.inputs, st.masks, reps)
    return {s: float(angular_distance(reps[s - 1], reps[s + n_blocks - 1]).mean()) for s in range(1, L - n_blocks + 1)}, shape


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

