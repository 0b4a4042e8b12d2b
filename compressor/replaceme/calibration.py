"""Calibration data for ReplaceMe: batches ready for the model, and which positions of each batch are real
tokens (padding never counts as calibration data unless asked)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import InputError


@dataclass
class Calibration:
    """Calibration batches ready for the model, and which positions count as tokens."""

    batches: list  # dict (HF kwargs) | tuple | tensor per batch
    masks: list  # [B, S] bool per batch, or None (every position of the hidden state is a token)
    n_sequences: int
    source: str = ""


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _token_batches(ids_list: list[list[int]], pad_id: int, batch_size: int, source: str) -> Calibration:
    """Pad sequences of token ids into batches (sorted by length to waste little on padding), right padding."""
    order = sorted(range(len(ids_list)), key=lambda k: (-len(ids_list[k]), k))
    batches, masks = [], []
    for i in range(0, len(order), batch_size):
        chunk = [ids_list[k] for k in order[i : i + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, c in enumerate(chunk):
            ids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[r, : len(c)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
        masks.append(mask.bool())
    return Calibration(batches, masks, len(ids_list), source)


def make_calibration(calib, *, tokenizer=None, calib_samples: int | None = None, max_length: int = 128,
                     batch_size: int = 16) -> Calibration:
    """Normalise calibration data: 'text:PATH', a DataBundle, a list of strings, token ids [N, S] (LongTensor),
    a dict {input_ids, attention_mask}, or (plain torch models) an input tensor [N, ...] / TensorDataset."""
    from compressor.io.data import DataBundle, load_data

    source = type(calib).__name__
    if isinstance(calib, str):
        if not calib.startswith("text:"):
            raise InputError(f"calibration data {calib!r} is not text:PATH", "give text:PATH, a list of sentences or token ids")
        source = calib
        calib = load_data(calib)
    if isinstance(calib, DataBundle):
        source = calib.source or "DataBundle"
        if calib.texts:
            calib = list(calib.texts)
        elif calib.train is not None:
            calib = calib.train.tensors[0]
        else:
            raise InputError(f"the data {source} has neither texts nor inputs to calibrate on", "give text:PATH or inputs")
    if isinstance(calib, torch.utils.data.TensorDataset):
        calib = calib.tensors[0]
    if isinstance(calib, list | tuple) and calib and all(isinstance(t, str) for t in calib):
        if tokenizer is None:
            raise InputError("calibration texts need a tokenizer", "pass tokenizer=... (the model's tokenizer)")
        texts = [t for t in calib if t.strip()][: calib_samples or None]
        ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
        ids = [list(x) for x in ids if len(x) > 0]
        return _token_batches(ids, _pad_id(tokenizer), batch_size, source)
    if isinstance(calib, dict) and "input_ids" in calib:
        ids = torch.as_tensor(calib["input_ids"])[: calib_samples or None, :max_length]
        am = torch.as_tensor(calib.get("attention_mask", torch.ones_like(ids)))[: ids.shape[0], : ids.shape[1]]
        seqs = [ids[r][am[r].bool()].tolist() for r in range(ids.shape[0])]
        return _token_batches([s for s in seqs if s], 0 if tokenizer is None else _pad_id(tokenizer), batch_size, source)
    if isinstance(calib, torch.Tensor) and calib.dtype == torch.long and calib.dim() == 2:
        calib = calib[: calib_samples or None, :max_length]
        return _token_batches([r.tolist() for r in calib], 0 if tokenizer is None else _pad_id(tokenizer), batch_size, source)
    if isinstance(calib, torch.Tensor):
        calib = calib[: calib_samples or None]
        batches = [calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size)]
        return Calibration(batches, [None] * len(batches), int(calib.shape[0]), source)
    if isinstance(calib, list | tuple) and not calib:
        raise InputError("the calibration data is empty", "give some calibration text or inputs")
    raise InputError(f"cannot calibrate on {type(calib).__name__}",
                     "give text:PATH, a DataBundle, a list of sentences, token ids [N, S] or an input tensor [N, ...]")

