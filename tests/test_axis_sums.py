"""Per-channel magnitude sums computed ahead of the analysis (compressor.checkpoint.axis_sums, sums_worker) and the
direct-I/O shard files (compressor.checkpoint.shards._ShardFile).

Oracles: torch's own float64 reductions of the tensors as loaded by safetensors (no code shared with the numpy
worker), and files written the plain way."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import compressor.checkpoint.axis_sums as axs
import compressor.checkpoint.shards as shards
import compressor.checkpoint.sums_worker as worker
from compressor.checkpoint.shards import Checkpoint


def oracle(t: torch.Tensor, axis: int, p: float) -> np.ndarray:
    other = [d for d in range(t.dim()) if d != axis]
    return t.double().abs().pow(p).sum(dim=other).numpy() if other else t.double().abs().pow(p).numpy()


@pytest.fixture
def folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(40, 24, generator=g), "b.weight": torch.randn(24, 40, generator=g).half(),
               "c.weight": torch.randn(33, 7, generator=g).bfloat16(), "d.weight": torch.randn(5, 6, generator=g).double(),
               "norm.weight": torch.randn(24, generator=g), "steps": torch.arange(4)}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 24, "vocab_size": 33}')
    return tmp_path


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_worker_sums_match_torch_for_every_float_dtype_and_axis(folder, p, monkeypatch):
    ckpt = Checkpoint(folder)
    ref = load_file(folder / "model.safetensors")
    for chunk in (worker.CHUNK_BYTES, 4 * 24 * 3):  # whole tensors, then blocks of 3 rows
        monkeypatch.setattr(worker, "CHUNK_BYTES", chunk)
        for key in ("a.weight", "b.weight", "c.weight", "d.weight", "norm.weight"):
            axes = tuple(range(ref[key].dim()))
            got = worker.tensor_sums(str(folder / "model.safetensors"), ckpt.span[key][0], *ckpt.meta[key], axes, p)
            for ax in axes:
                np.testing.assert_allclose(got[ax], oracle(ref[key].float(), ax, p), rtol=1e-12)


def test_axis_sums_worker_planned_and_asked_for(folder):
    ckpt = Checkpoint(folder)
    ref = load_file(folder / "model.safetensors")
    plan = {"a.weight": (0,), "b.weight": (1,)}
    sums = axs.AxisSums(ckpt, 2.0, plan)
    sums.reader.join(30)  # the worker finishes the plan on its own
    assert {("a.weight", 0), ("b.weight", 1)} <= set(sums.done) and sums.worker_peak_rss_bytes
    real = axs.tensor_sums
    axs.tensor_sums = lambda *a: (_ for _ in ()).throw(AssertionError("planned: the worker's result is used"))
    try:
        np.testing.assert_allclose(sums.get("b.weight", 1), oracle(ref["b.weight"].float(), 1, 2.0), rtol=1e-12)
    finally:
        axs.tensor_sums = real
    np.testing.assert_allclose(sums.get("a.weight", 0), oracle(ref["a.weight"], 0, 2.0), rtol=1e-12)
    # not planned: computed in this process, the same way
    np.testing.assert_allclose(sums.get("a.weight", 1), oracle(ref["a.weight"], 1, 2.0), rtol=1e-12)
    np.testing.assert_allclose(sums.get("c.weight", 0), oracle(ref["c.weight"].float(), 0, 2.0), rtol=1e-12)
    sums.close()


def test_axis_sums_survive_a_dead_worker(folder, monkeypatch):
    """A worker that dies (here: killed at once) leaves get() to compute everything itself."""
    ckpt = Checkpoint(folder)
    ref = load_file(folder / "model.safetensors")
    monkeypatch.setattr(axs.sys, "executable", "/bin/false")  # exits at once: no result ever comes
    sums = axs.AxisSums(ckpt, 2.0, {"a.weight": (0, 1)})
    np.testing.assert_allclose(sums.get("a.weight", 1), oracle(ref["a.weight"], 1, 2.0), rtol=1e-12)
    sums.close()


def test_likely_axes_skip_the_hidden_and_vocabulary_axes(folder):
    ckpt = Checkpoint(folder)
    cfg = {"model_type": "llama", "hidden_size": 24, "vocab_size": 33}
    # a: 40 x 24 -> axis 0; b: 24 x 40 -> axis 1; c: 33 (vocab) x 7 -> axis 1; d: 5 x 6 -> both; 1-D and ints: none
    assert axs.likely_axes(ckpt, cfg, heads=False) == {"a.weight": (0,), "b.weight": (1,), "c.weight": (1,),
                                                       "d.weight": (0, 1)}


def test_streamed_importance_with_and_without_the_worker_is_identical(folder):
    """checkpoint_scores through AxisSums gives the very numbers of the tensor-by-tensor reads (same function)."""
    import json

    pytest.importorskip("transformers")
    from compressor.checkpoint import checkpoint_scores
    from tests.test_checkpoint_stream import export_analysis, llama, save

    model = llama()
    src = save(model, folder / "llama")
    a = export_analysis(model)
    ckpt = Checkpoint(src)
    sums = axs.AxisSums(ckpt, 2.0, axs.likely_axes(ckpt, json.loads((src / "config.json").read_text()), True))
    with_sums = checkpoint_scores(src, a, "l2", sums=sums)
    sums.close()
    plain = checkpoint_scores(src, a, "l2")
    assert with_sums.keys() == plain.keys()
    for g in plain:
        np.testing.assert_array_equal(with_sums[g], plain[g])
    l1 = axs.AxisSums(ckpt, 2.0, {})  # an exponent that does not fit l1: not used
    np.testing.assert_array_equal(checkpoint_scores(src, a, "l1", sums=l1)[0], checkpoint_scores(src, a, "l1")[0])
    l1.close()


@pytest.mark.parametrize("direct", [True, False])
def test_shard_file_writes_the_same_bytes_direct_or_buffered(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(shards, "STAGE_BYTES", 8192)  # many staging flushes and a padded, truncated tail
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in (5, 8192, 3000, 12289, 1)]
    f = shards._ShardFile(tmp_path / "x.bin", direct=direct)
    for part in parts:
        f.write(part)
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == b"".join(p.tobytes() for p in parts)


def test_shard_file_falls_back_when_direct_writes_are_refused(tmp_path, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the write (EINVAL) gets the rest through the page cache."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this system")
    monkeypatch.setattr(shards, "STAGE_BYTES", 8192)
    real, refused = os.write, []

    def write(fd, data):
        if not refused:  # the first direct write
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    monkeypatch.setattr(shards.os, "write", write)
    data = np.arange(20000, dtype=np.uint32).view(np.uint8)
    f = shards._ShardFile(tmp_path / "y.bin")
    f.write(data)
    f.close()
    assert refused and (tmp_path / "y.bin").read_bytes() == data.tobytes()
