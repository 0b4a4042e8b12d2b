"""Distributed training (compressor.train): device and backend per rank, rank-0 writes, resume across ranks.

The 2-process test (this file run as a script by torch.distributed.run, gloo on CPU) trains a masked MLP,
prunes it gradually, then runs IMP with rewinding into a shared folder, is "killed" after level 0 and resumes.
It runs with torch.cuda.is_available patched True in the workers, as on a GPU machine where the model trains
on CPU: the backend must follow the training device (gloo), not the machine (nccl would fail).
Oracles: both ranks end with identical weights and masks; pruned weights are exactly zero; the DDP run
(2 × 16 per step) matches a single-process run with batch 32 (the loop shards one permutation by rank); the
resumed IMP run equals an uninterrupted one, and only rank 0 wrote checkpoints.

The unit tests mock CUDA: which backend and which GPU each rank picks, without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

STEPS, PER_RANK_BATCH = 6, 16
IMP = dict(levels=1, fraction=0.3, rewind_steps=2, epochs=0.15, batch_size=PER_RANK_BATCH, lr=0.05, progress=False,
           device="cpu", seed=1)


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


class _Killed(Exception):
    pass


def _imp_resume(out_dir: Path) -> dict:
    """IMP killed after level 0 then resumed from rank 0's checkpoints, and an uninterrupted run."""
    from compressor import masks as M
    from compressor.io.data import load_data
    from compressor.methods.lottery import imp_rewind
    from compressor.models import digits_mlp

    data = load_data("digits")

    def kill(level, report):
        if level == 0:
            raise _Killed

    def fresh():
        torch.manual_seed(5)  # the same given model each time (resume checks the model's digest)
        return digits_mlp(hidden=32)

    try:
        imp_rewind(fresh(), data, workdir=out_dir / "killed", on_level=kill, **IMP)
    except _Killed:
        pass
    resumed = fresh()
    res = imp_rewind(resumed, data, workdir=out_dir / "killed", resume=True, **IMP)
    full = fresh()
    ref = imp_rewind(full, data, workdir=out_dir / "full", **IMP)
    return {"resumed_levels": res["resumed_levels"], "same_levels": res["levels"] == ref["levels"],
            "state": M.plain_state_dict(resumed), "ref_state": M.plain_state_dict(full)}


def _worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    if os.environ.get("COMPRESSOR_TEST_FAKE_CUDA") == "1":
        torch.cuda.is_available = lambda: True  # a GPU machine whose model trains on CPU
    import torch.distributed as dist

    from compressor.train import ddp_context

    rank, world = ddp_context("cpu")
    assert world == 2, world
    assert dist.get_backend() == "gloo", dist.get_backend()
    state, masks = _job(PER_RANK_BATCH)
    imp = _imp_resume(Path(out_dir))
    torch.save({"state": state, "masks": masks, "imp": imp}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


# ~15 s on an idle 2-core machine (two processes + a single-process reference); ~45 s when the cores are shared
def test_ddp_two_ranks_cpu_with_cuda_present(tmp_path):
    env = _clean_env()
    env["COMPRESSOR_TEST_FAKE_CUDA"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
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
    # checkpoint/resume across ranks: both ranks resumed level 0 from rank 0's files and match the full run
    for r in (r0, r1):
        imp = r["imp"]
        assert imp["resumed_levels"] == 1 and imp["same_levels"]
        for k in imp["state"]:
            assert torch.equal(imp["state"][k], imp["ref_state"][k]), k
    for k in r0["imp"]["state"]:
        assert torch.equal(r0["imp"]["state"][k], r1["imp"]["state"][k]), k
    ck = tmp_path / "killed" / "checkpoints" / "imp_rewind"
    assert sorted(p.name for p in ck.iterdir()) == ["level_000.pt", "level_001.pt", "levels.json", "meta.json", "theta_k.pt"]
    # single process with the global batch (2 × 16) follows the same trajectory
    state, masks = _job(2 * PER_RANK_BATCH)
    for k in masks:
        assert torch.equal(masks[k], r0["masks"][k]), k
    for k in state:
        torch.testing.assert_close(state[k], r0["state"][k], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- per-rank device and backend


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with two GPUs as far as torch.cuda's queries go (nothing is ever allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    pinned = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pinned.append(torch.device(d)))
    return pinned


@pytest.fixture
def fake_group(monkeypatch):
    """torchrun's environment for rank 1 of 2, and a process group that records its backend."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(made))
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **kw: made.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    return made


def test_cpu_training_uses_gloo_even_when_cuda_is_present(fake_cuda, fake_group):
    from compressor.train import ddp_context, training_device

    dev = training_device(nn.Linear(2, 2), "cpu")
    assert dev == torch.device("cpu")
    assert ddp_context(dev) == (1, 2)
    assert fake_group == ["gloo"] and fake_cuda == []


def test_gpu_rank_pins_cuda_local_rank_and_uses_nccl(fake_cuda, fake_group):
    from compressor import device as D
    from compressor.train import ddp_context, training_device

    assert D.resolve("auto") == D.resolve("cuda") == torch.device("cuda", 1)  # LOCAL_RANK=1 → cuda:1
    dev = training_device(nn.Linear(2, 2), "cuda")
    assert dev == torch.device("cuda", 1)
    ddp_context(dev)
    assert fake_group == ["nccl"] and fake_cuda == [torch.device("cuda", 1)]


def test_explicit_gpu_of_another_rank_is_refused(fake_cuda, fake_group):
    from compressor.errors import InputError
    from compressor.train import training_device

    with pytest.raises(InputError, match="not its own GPU"):
        training_device(nn.Linear(2, 2), "cuda:0")


def test_train_stays_on_the_models_device_when_cuda_is_present(monkeypatch):
    """No device given: the model trains where it is, even on a machine with a GPU (the SaRA failure)."""
    from torch.utils.data import TensorDataset

    from compressor.train import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    moves = []
    real_to = nn.Module.to
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **kw: moves.append((a, kw)) or real_to(self, *a, **kw))
    monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **kw: pytest.fail("model.cuda() called unasked"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    train(model, data, steps=2, batch_size=8, progress=False)
    assert all(torch.device(a[0]).type == "cpu" for a, _ in moves if a), moves
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_rank0_writes_and_barrier_are_noops_without_a_group():
    from compressor.train import barrier, is_writer

    assert is_writer()
    barrier()


if __name__ == "__main__":
    _worker(sys.argv[1])
