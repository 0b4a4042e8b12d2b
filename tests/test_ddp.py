"""Masked training under DDP: 2 CPU processes (gloo) launched with torch.distributed.run.

The worker (this file run as a script) trains a masked MLP for a few steps through compressor.train.train,
then prunes it gradually (masks recomputed on every rank) and saves weights + masks per rank.
Oracles: both ranks end with identical weights and masks; pruned weights are exactly zero; and the DDP run
(2 × 16 per step) matches a single-process run with batch 32 (the loop shards one permutation by rank).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS, PER_RANK_BATCH = 6, 16


def _job(batch_size: int):
    from compressor import masks as M
    from compressor.io.data import load_data
    from compressor.methods.gradual import gradual_prune
    from compressor.models import digits_mlp
    from compressor.train import train

    torch.manual_seed(0)
    model = digits_mlp(hidden=64)  # no BatchNorm, so DDP and single-process compute the same function
    M.apply_masks(model, M.magnitude_masks(M.prunable_weights(model), 0.5))
    data = load_data("digits")
    train(model, data.train, steps=STEPS, batch_size=batch_size, lr=0.05, momentum=0.9, progress=False, device="cpu")
    gradual_prune(model, data.train, 0.8, steps=STEPS, begin_fraction=0.0, end_fraction=1.0, frequency=2,
                  batch_size=batch_size, lr=0.05, progress=False, device="cpu")
    return M.plain_state_dict(model), M.current_masks(model)


def _worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from compressor.train import ddp_context

    rank, world = ddp_context()
    assert world == 2, world
    state, masks = _job(PER_RANK_BATCH)
    torch.save({"state": state, "masks": masks}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ~8 s on an idle 2-core machine (two processes + a single-process reference); ~30 s when the cores are shared
def test_ddp_two_ranks_identical_masked_weights(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(r0["state"]) == set(r1["state"]) and set(r0["masks"]) == set(r1["masks"])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]), k
        assert (r0["state"][k][~r0["masks"][k]] == 0).all(), k
        assert 1 - r0["masks"][k].float().mean() == pytest.approx(0.8, abs=2e-3)
    # single process with the global batch (2 × 16) follows the same trajectory
    state, masks = _job(2 * PER_RANK_BATCH)
    for k in masks:
        assert torch.equal(masks[k], r0["masks"][k]), k
    for k in state:
        torch.testing.assert_close(state[k], r0["state"][k], atol=1e-5, rtol=1e-4)


if __name__ == "__main__":
    _worker(sys.argv[1])
