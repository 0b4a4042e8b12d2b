"""Peak memory of the calibration passes, so a report can show that activations are streamed batch by batch
instead of holding every layer's hidden states; and the stage's up-front estimate (:func:`stage_bytes`)."""

from __future__ import annotations

import threading

import torch

from compressor.blocks import BlockInputs


def _nbytes(obj, seen: set | None = None) -> int:
    """Bytes of every distinct tensor storage reachable in obj (lists, tuples, dicts, BlockInputs)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = (st.data_ptr(), obj.device.type)
        if key in seen:
            return 0
        seen.add(key)
        return st.nbytes()
    if isinstance(obj, BlockInputs):
        return _nbytes(obj.args, seen) + _nbytes(obj.kwargs, seen)
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v, seen) for v in obj)
    return 0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a code region: CUDA max_memory_allocated delta, or sampled process RSS delta on CPU
    (every 2 ms), plus the exact bytes of the tensors the calibration itself holds (`note(obj)`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.held_peak = 0
        self.peak_delta = 0
        self._stop = threading.Event()

    def note(self, *objs) -> None:
        seen: set = set()
        self.held_peak = max(self.held_peak, sum(_nbytes(o, seen) for o in objs))

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._peak = self._base

            def sample():
                while not self._stop.wait(0.002):
                    self._peak = max(self._peak, _rss_bytes())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_delta = torch.cuda.max_memory_allocated(self.device) - self._base
            self.method = "torch.cuda.max_memory_allocated delta"
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_delta = self._peak - self._base
            self.method = "process RSS delta, sampled every 2 ms"
        return False



# Bytes per token position of one batch inside a block, in units of hidden-size fp32 vectors: the hidden state in
# and out, q/k/v/o and the rotary copies (~8), the MLP's gate, up and product at FFN ≈ 2.75-4 × hidden (~12), the
# out-projection output and residual captured in pass 2 (x, a, their float64 casts: ~6). Upper bound.
BATCH_VECTORS = 28


def stage_bytes(fp, *, calib_samples: int, max_length: int, batch_size: int, n_blocks: int, keep_tokens: bool,
                baselines: bool) -> int:
    """Estimated peak of the replaceme stage on top of the model (fp: compressor.utils.memory.Footprint), the
    largest of its phases:

    * calibration: one batch through a block (BATCH_VECTORS hidden vectors per position) and the pooled state of
      every sequence after every block (L × N × d fp32), G and B (2 d² float64); the cosine estimator also keeps
      x, y, a, h of every token (4 × tokens × d fp32);
    * solve and fold: G, B, the Cholesky factor and T (4 d² float64), the out projection in float64 and its
      product with T (FFN ≈ 4 d: 2 × 4 d² float64);
    * evaluation (baselines and compress()'s own quality measure): logits and log-softmax of a perplexity batch
      (8 × max_length × vocab fp32, twice; vocab from the largest tensor, the embedding).
    """
    d = fp.hidden or int((fp.largest_bytes / 4) ** 0.5) or 1
    L = max(fp.n_layers, n_blocks + 1)
    tokens = calib_samples * max_length
    pooled = L * calib_samples * d * 4
    calibration = batch_size * max_length * d * 4 * BATCH_VECTORS + pooled + 2 * d * d * 8
    if keep_tokens:
        calibration += 4 * tokens * d * 4
    fold = 4 * d * d * 8 + 2 * 4 * d * d * 8 + pooled
    vocab = fp.largest_bytes // (4 * d) if fp.hidden else 0
    evaluation = 2 * 8 * max_length * vocab * 4
    return int(max(calibration, fold, evaluation))
