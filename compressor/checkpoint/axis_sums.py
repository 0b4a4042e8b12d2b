"""Per-channel magnitude sums of a checkpoint's tensors, computed ahead by a worker process.

L1/L2 importance (compressor.graph.importance) needs, for each scored weight and axis, Σ|w|^p over the other
axes. Those sums depend on the tensor alone, not on the graph, so they can be computed while the analysis
traces the model. The analysis is single-threaded Python; a thread beside it lost most of its time waiting for
the GIL (on two cores the pair took 3.5-4 s against 2.7 s + 1.5 s alone), so the sums run in a separate process
(compressor.checkpoint.sums_worker: numpy and file reads, no torch, about 0.2 s to start).

    sums = AxisSums(Checkpoint(folder), p=2.0, plan=likely_axes(...))   # the worker starts at once
    analysis = analyze(folder)                                          # meanwhile
    s = sums.get("model.layers.0.mlp.up_proj.weight", 0)
    sums.close()

The worker takes the tensors and axes of `plan` in file order (:func:`likely_axes`: a guess from the shapes; a
wrong one costs time, never a wrong value). Anything else, or anything left when the worker failed, is computed
here by the same function (sums_worker.tensor_sums), so the numbers do not depend on who computed them.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from compressor.checkpoint.shards import Checkpoint
from compressor.checkpoint.sums_worker import ITEMSIZE, peak_rss, tensor_sums

FLOAT_DTYPES = tuple(ITEMSIZE)


def likely_axes(ckpt: Checkpoint, cfg: dict, heads: bool) -> dict[str, tuple[int, ...]]:
    """{key: axes} a structured cut of this Hugging Face checkpoint will probably score: every axis of a matrix
    whose length is neither the hidden size (the residual stream, kept by default) nor the vocabulary; with
    `heads`, both axes of a hidden x hidden matrix too (a query or output projection: its heads)."""
    from compressor.checkpoint.hfconfig import FAMILIES

    fam = FAMILIES.get(cfg.get("model_type", ""))
    hidden = cfg.get(fam.fields["hidden"]) if fam is not None else cfg.get("hidden_size")
    vocab = cfg.get("vocab_size")
    out: dict[str, tuple[int, ...]] = {}
    for key in ckpt.keys():
        dtype, shape = ckpt.meta[key]
        if dtype not in FLOAT_DTYPES or len(shape) != 2:
            continue
        axes = tuple(ax for ax, n in enumerate(shape) if n not in (hidden, vocab))
        if not axes and heads and shape == (hidden, hidden):
            axes = (0, 1)
        if axes:
            out[key] = axes
    return out


class AxisSums:
    """Σ|w|^p along axes of a checkpoint's tensors: `plan` ({key: axes}) computed ahead by a worker process,
    anything else on request. `worker_peak_rss_bytes`: the worker's own peak, once it has finished."""

    def __init__(self, ckpt: Checkpoint, p: float = 2.0, plan: dict[str, tuple[int, ...]] | None = None):
        self.ckpt, self.p = ckpt, float(p)
        plan = plan if plan is not None else {k: tuple(range(len(ckpt.shape(k)))) for k in ckpt.keys()
                                              if ckpt.meta[k][0] in FLOAT_DTYPES}
        order = {k: i for i, k in enumerate(ckpt.keys())}
        self.planned = {(k, ax) for k, axes in plan.items() for ax in axes}
        self.done: dict[tuple[str, int], np.ndarray] = {}
        self.cond = threading.Condition()
        self.finished = False  # the worker said it is done, or died
        self.worker_peak_rss_bytes: int | None = None
        jobs = [(k, str(ckpt.folder / ckpt.shard_of[k]), ckpt.span[k][0], ckpt.meta[k][0], ckpt.meta[k][1], axes)
                for k, axes in sorted(plan.items(), key=lambda kv: order.get(kv[0], 0))]
        # the worker imports this very package, wherever it was imported from (an installed wheel or a checkout)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the compressor package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "compressor.checkpoint.sums_worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.reader = threading.Thread(target=self._read, name="axis-sums-reader", daemon=True)
        self.reader.start()
        try:
            pickle.dump({"p": self.p, "jobs": jobs}, self.proc.stdin)
            self.proc.stdin.close()
        except OSError:  # the worker is gone: the reader sees it, and everything is computed here
            pass

    def _read(self) -> None:
        """Move the worker's results into `done` as they come (also keeps its pipe from filling)."""
        try:
            while True:
                key, res = pickle.load(self.proc.stdout)
                with self.cond:
                    if key == "":
                        self.worker_peak_rss_bytes = res.get("peak_rss_bytes")
                        break
                    self.done.update({(key, ax): v for ax, v in res.items()})
                    self.cond.notify_all()
        except Exception:  # noqa: BLE001, S110 - EOF or a dead worker: what is missing is computed by get()
            pass
        finally:
            with self.cond:
                self.finished = True
                self.cond.notify_all()

    def get(self, key: str, axis: int) -> np.ndarray:
        """Σ|w|^p per position of `axis` of tensor `key`: the worker's result, or computed here."""
        with self.cond:
            while (key, axis) in self.planned and (key, axis) not in self.done and not self.finished:
                self.cond.wait()
            if (key, axis) in self.done:
                return self.done[(key, axis)]
        dtype, shape = self.ckpt.meta[key]
        res = tensor_sums(str(self.ckpt.folder / self.ckpt.shard_of[key]), self.ckpt.span[key][0], dtype, shape,
                          (axis,), self.p)
        with self.cond:
            self.done[(key, axis)] = res[axis]
        return res[axis]

    def computed(self) -> int:
        """How many (tensor, axis) sums are done."""
        with self.cond:
            return len(self.done)

    def close(self) -> None:
        """Stop the worker (its remaining tensors are not needed); results stay readable."""
        if self.proc.poll() is None:
            self.worker_peak_rss_bytes = peak_rss(self.proc.pid)
            self.proc.kill()
        self.proc.wait()
        self.reader.join()
        self.proc.stdout.close()

