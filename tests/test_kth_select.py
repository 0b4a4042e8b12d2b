"""Bounded-memory global magnitude selection (compressor.utils.kth, masks.magnitude_masks): the exact k-th
smallest |w| from a two-pass radix select over one tensor at a time, checked against torch.kthvalue / a stable
sort of every weight at once (the oracle: all values concatenated, which the bounded path never builds)."""

from __future__ import annotations

import pytest
import torch

from compressor import masks as M
from compressor.utils.kth import kth_smallest


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (17, 9), "b.weight": (64, 33), "c.weight": (5, 3, 3, 3), "d.weight": (1, 200)}
    out = {k: torch.randn(s, generator=g) * (0.1 + i) for i, (k, s) in enumerate(shapes.items())}
    out["a.weight"][0, :5] = 0.0  # exact zeros and repeated values: ties across tensors
    out["b.weight"][3, :7] = 0.25
    out["d.weight"][0, :4] = -0.25
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kth_smallest_equals_torch_kthvalue(seed):
    ws = _tensors(seed)
    flat = torch.cat([w.abs().reshape(-1) for w in ws.values()])
    for k in (1, 2, 7, flat.numel() // 3, flat.numel() // 2, flat.numel() - 1, flat.numel()):
        value, below = kth_smallest(lambda: (w.abs() for w in ws.values()), k)
        want = float(torch.kthvalue(flat, k).values)
        assert value == want
        assert below == int((flat < want).sum())
    with pytest.raises(ValueError):
        kth_smallest(lambda: (w.abs() for w in ws.values()), flat.numel() + 1)


def _sorted_keep(ws, n_prune, alive=None, convention="exact_k"):
    """The oracle: every alive |w| concatenated and stably sorted (ties by flat index, lower pruned first)."""
    scores = torch.cat([w.abs().reshape(-1) for w in ws.values()])
    live = torch.ones_like(scores, dtype=torch.bool) if alive is None else torch.cat([alive[k].reshape(-1) for k in ws])
    keep = live.clone()
    idx = torch.nonzero(live, as_tuple=True)[0]
    order = torch.sort(scores[idx], stable=True).indices
    if convention == "exact_k":
        keep[idx[order[:n_prune]]] = False
    else:
        tau = scores[idx][order[min(n_prune, idx.numel() - 1)]]
        keep[live & (scores <= tau)] = False
    out, off = {}, 0
    for k, w in ws.items():
        out[k] = keep[off : off + w.numel()].reshape(w.shape)
        off += w.numel()
    return out


@pytest.mark.parametrize("convention", ["exact_k", "strict_above"])
@pytest.mark.parametrize("s", [0.1, 0.5, 0.93])
def test_global_magnitude_equals_sorted_oracle(s, convention):
    ws = _tensors(3)
    n = sum(w.numel() for w in ws.values())
    got = M.magnitude_masks(ws, s, scope="global", convention=convention)
    want = _sorted_keep(ws, round(s * n), convention=convention)
    for k in ws:
        assert torch.equal(got[k], want[k]), k
    if convention == "exact_k":
        assert sum(int((~m).sum()) for m in got.values()) == round(s * n)


def test_global_magnitude_with_current_masks_ranks_alive_only():
    ws = _tensors(4)
    g = torch.Generator().manual_seed(9)
    current = {k: torch.rand(w.shape, generator=g) > 0.3 for k, w in ws.items()}
    n = sum(w.numel() for w in ws.values())
    dead = sum(int((~m).sum()) for m in current.values())
    got = M.magnitude_masks(ws, 0.6, scope="global", current=current)
    want = _sorted_keep(ws, round(0.6 * n) - dead, alive=current)
    for k in ws:
        assert torch.equal(got[k], want[k]), k
        assert not (got[k] & ~current[k]).any()  # pruned stays pruned


def test_ties_at_the_threshold_go_in_flat_order_across_tensors():
    ws = {"a.weight": torch.full((2, 2), 0.5), "b.weight": torch.full((2, 5), -0.5), "c.weight": torch.ones(3)}
    ws["b.weight"][1, 4] = 0.1  # the smallest: pruned first
    got = M.magnitude_masks(ws, 8 / 17, scope="global")  # 8 pruned: 0.1, then the first seven 0.5s
    want = _sorted_keep(ws, 8)
    for k in ws:
        assert torch.equal(got[k], want[k]), k
    assert got["a.weight"].sum() == 0 and got["b.weight"].reshape(-1).tolist() == [False] * 3 + [True] * 6 + [False]
