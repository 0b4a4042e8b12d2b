"""Peak memory of the calibration passes, so a report can show that activations are streamed block by block
instead of holding every layer's hidden states."""

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

