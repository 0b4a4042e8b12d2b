"""The per-channel magnitude sums of safetensors tensors, with numpy and file reads alone: run as
``python -m compressor.checkpoint.sums_worker`` by compressor.checkpoint.axis_sums (so it starts in a fraction of a
second and never imports torch), and called in-process for a tensor the worker was not given.

Protocol: one pickled job on stdin, {"p": float, "jobs": [(key, path, offset, dtype, shape, axes), ...]}; on stdout
one pickled (key, {axis: sums}) per tensor as it is done, then ("", {"peak_rss_bytes": n}).
"""

from __future__ import annotations

import pickle
import sys

import numpy as np

from compressor.utils.channel_sums import position_scores

CHUNK_BYTES = 256 << 20  # float32 bytes of rows read and reduced at once: memory stays about this, whatever the tensor
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of little-endian raw bytes, as torch's .float() gives them (bf16: the top 16 bits)."""
    if dtype == "F32":
        return raw.view("<f4")
    if dtype == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return raw.view({"F16": "<f2", "F64": "<f8"}[dtype]).astype(np.float32)


def tensor_sums(path: str, offset: int, dtype: str, shape: tuple[int, ...], axes: tuple[int, ...],
                p: float) -> dict[int, np.ndarray]:
    """{axis: Σ|w|^p per position of that axis} of the tensor stored at `offset` of `path`, read a block of rows
    at a time (a tensor up to CHUNK_BYTES in float32 is one block: the same numbers as position_scores on it)."""
    shape = tuple(shape)
    if not shape:
        return {}
    row = int(np.prod(shape[1:], dtype=np.int64))
    rows = max(1, CHUNK_BYTES // max(1, 4 * row))
    size = ITEMSIZE[dtype]
    parts: dict[int, list[np.ndarray]] = {ax: [] for ax in axes}
    buf = np.empty(min(rows, shape[0]) * row * size, dtype=np.uint8)
    with open(path, "rb") as f:
        for start in range(0, shape[0], rows):
            n = min(rows, shape[0] - start)
            view = memoryview(buf)[: n * row * size]
            f.seek(offset + start * row * size)
            if f.readinto(view) != len(view):
                raise EOFError(f"{path} ends inside a tensor")
            w = _float32(buf[: len(view)], dtype).reshape((n, *shape[1:]))
            for ax in axes:
                parts[ax].append(position_scores(w, ax, p))
    return {ax: (ps[0] if len(ps) == 1 else np.concatenate(ps) if ax == 0 else np.sum(ps, axis=0))
            for ax, ps in parts.items()}


def peak_rss(pid: int | str = "self") -> int | None:
    """A process's peak RSS (VmHWM, which starts again at exec; ru_maxrss would carry the forking parent's)
    from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def main() -> None:
    job = pickle.load(sys.stdin.buffer)
    out = sys.stdout.buffer
    for key, path, offset, dtype, shape, axes in job["jobs"]:
        pickle.dump((key, tensor_sums(path, offset, dtype, shape, axes, job["p"])), out)
        out.flush()
    pickle.dump(("", {"peak_rss_bytes": peak_rss()}), out)
    out.flush()


if __name__ == "__main__":
    main()
