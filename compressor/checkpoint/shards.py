"""Safetensors checkpoint folders read and written one tensor at a time.

Reading: every shard's header is parsed once (names, dtypes, shapes, data offsets; no tensor data); a tensor
is read with one read() of its bytes into fresh memory, in a handle opened for that read alone: nothing of the
file stays mapped (a mapping kept open for a whole shard would leave every page it touched resident). Writing: the header of an output shard is computed from the shapes before any data exists, then
each tensor's bytes are appended as it is produced, so a shard is never held in memory
(``safetensors.torch.save_file`` serialises a whole dict of tensors into one buffer first).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from compressor.errors import InputError

INDEX = "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
ITEMSIZE = {k: torch.empty(0, dtype=v).element_size() for k, v in DTYPES.items()}


def read_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of one safetensors file (metadata dropped)."""
    return _header(path)[0]


def _header(path: Path) -> tuple[dict[str, dict], int]:
    """(read_header's dict, the file offset its data_offsets count from)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class Checkpoint:
    """The tensors of a Hugging Face folder's safetensors shards (model.safetensors.index.json or every
    *.safetensors file), by checkpoint key."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise InputError(f"{self.folder} holds no .safetensors weights",
                             "save the model with save_pretrained(..., safe_serialization=True)")
        self.files = files
        self.shard_of: dict[str, str] = {}
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.span: dict[str, tuple[int, int]] = {}  # key -> (file offset, bytes) of its data
        for name in files:
            header, start = _header(self.folder / name)
            for key, info in header.items():
                self.shard_of[key] = name
                self.meta[key] = (info["dtype"], tuple(info["shape"]))
                a, b = info["data_offsets"]
                self.span[key] = (start + a, b - a)

    def keys(self) -> list[str]:
        return list(self.meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.meta[key][1]

    def nbytes(self, key: str | None = None) -> int:
        """Bytes of one tensor, or of all of them."""
        keys = [key] if key is not None else self.meta
        return sum(ITEMSIZE[self.meta[k][0]] * int(np.prod(self.meta[k][1], dtype=np.int64)) for k in keys)

    def shard_bytes(self) -> int:
        """Size of the largest shard file."""
        return max((self.folder / f).stat().st_size for f in self.files)

    def prefetch(self) -> None:
        """Ask the kernel to start reading every shard into the page cache (posix_fadvise WILLNEED) from a
        background thread, so the reads of a later pass find them there; the page cache is not this process's
        memory. Nothing happens where the call does not exist."""
        import threading

        def advise():
            for name in self.files:
                try:
                    fd = os.open(self.folder / name, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                    finally:
                        os.close(fd)
                except (OSError, AttributeError):
                    return

        threading.Thread(target=advise, name="checkpoint-prefetch", daemon=True).start()

    def read(self, key: str) -> torch.Tensor:
        """The tensor, copied from its shard with one read() into fresh memory (no mapping of the file: a
        mapped tensor's pages are faulted in 4 KB at a time, which made a pass over a 4.4 GB checkpoint about
        3x slower than plain reads)."""
        dtype, shape = self.meta[key]
        offset, n = self.span[key]
        if n != ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64)):
            raise InputError(f"{self.shard_of[key]}: {key} holds {n} bytes, its dtype and shape say otherwise",
                             "the safetensors file is damaged: save the checkpoint again")
        buf = np.empty(n, dtype=np.uint8)
        with open(self.folder / self.shard_of[key], "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(buf))
        if got != n:
            raise InputError(f"{self.shard_of[key]} ends inside {key}", "the safetensors file is truncated")
        if n == 0:
            return torch.empty(shape, dtype=DTYPES[dtype])
        return torch.frombuffer(buf, dtype=DTYPES[dtype]).reshape(shape)


class FloatView(Mapping):
    """Lazily read float32 numpy values by name, through `names` ({name: checkpoint key}): the `weights`
    argument of compressor.graph.importance.group_scores, one tensor in memory at a time."""

    def __init__(self, ckpt: Checkpoint, names: dict[str, str]):
        self.ckpt, self.names = ckpt, names

    def __getitem__(self, name: str) -> np.ndarray:
        return self.ckpt.read(self.names[name]).float().numpy()

    def __contains__(self, name) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def plan_shards(entries: list[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple]]:
    """Split (key, dtype, shape) entries, in order, into shards of at most `max_bytes` (a larger tensor
    gets a shard of its own)."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for e in entries:
        n = ITEMSIZE[e[1]] * int(np.prod(e[2], dtype=np.int64))
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return [s for s in shards if s]


def write_shard(path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                produce: Callable[[str], torch.Tensor]) -> int:
    """Write one safetensors file whose tensors come from `produce(key)`, one at a time; returns its bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in entries:
        n = ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, dtype, shape in entries:
            t = produce(key)
            if tuple(t.shape) != tuple(shape) or t.dtype != DTYPES[dtype]:
                raise AssertionError(f"{key}: produced {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
    return len(raw) + 8 + offset
