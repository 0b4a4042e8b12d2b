"""The DataBundle every data source returns, and the one split rule they share (io.data and io.sources)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import TensorDataset

from compressor.errors import InputError


@dataclass
class DataBundle:
    """What a recipe and the evaluator need to know about the data.

    task: "classification" (train/test TensorDatasets of (x, y)), "embedding" / "lm" (texts),
    "calibration" (inputs only, no labels: quality is measured against the original model's outputs).
    """

    task: str
    train: TensorDataset | None = None
    test: TensorDataset | None = None
    texts: list[str] | None = None
    test_texts: list[str] | None = None
    num_classes: int | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def input_shape(self) -> tuple[int, ...] | None:
        ds = self.train or self.test
        return tuple(ds.tensors[0].shape[1:]) if ds is not None else None


def _held_out(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows): the split rule of every labelled source — a permutation seeded with
    `seed` holds out round(n * test_fraction) rows, at least one."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def _split(x: torch.Tensor, y: torch.Tensor | None, test_fraction: float, seed: int):
    tr, te = _held_out(x.shape[0], test_fraction, seed)
    if y is None:
        return TensorDataset(x[tr]), TensorDataset(x[te])
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


LABEL_KEYS = ("labels", "label")


class Batches(TensorDataset):
    """Samples whose batches are not (x, y): a dict of tensors (e.g. input_ids, attention_mask, labels) or a tuple
    such as (x, mask, y). Stored as flat tensors ("leaves", one per key or position) so every stage indexes and
    splits them like any TensorDataset; a batch goes back to the caller's structure for their functions.

    The contract (docs/data.md): `forward_fn(model, batch)` returns the model's output for one batch (default:
    `model(**inputs)` for a dict, `model(*inputs)` for a tuple, inputs being the batch without its labels);
    `loss_fn(model, batch)` returns the scalar training loss (default: cross-entropy of that output against the
    labels). Labels are `batch["labels"]` / `batch["label"]`, or a tuple's last element when it is a 1-D integer
    tensor. Example inputs (tracing, MACs, latency, export) are the inputs of the first samples.
    """

    def __init__(self, *leaves: torch.Tensor, keys: tuple[str, ...] | None, label: int | None, forward_fn=None, loss_fn=None):
        super().__init__(*leaves)
        self.keys, self.label, self.forward_fn, self.loss_fn = keys, label, forward_fn, loss_fn

    def subset(self, idx) -> Batches:
        return Batches(*(t[idx] for t in self.tensors), keys=self.keys, label=self.label, forward_fn=self.forward_fn, loss_fn=self.loss_fn)

    def rebuild(self, leaves):
        """Flat leaves (one indexed batch) → the caller's structure: a dict or a tuple."""
        return dict(zip(self.keys, leaves, strict=True)) if self.keys is not None else tuple(leaves)

    def inputs(self, leaves):
        """The batch without its labels, as the model is called with it."""
        kept = [t for i, t in enumerate(leaves) if i != self.label]
        if self.keys is None:
            return tuple(kept)
        return dict(zip([k for i, k in enumerate(self.keys) if i != self.label], kept, strict=True))

    def labels(self) -> torch.Tensor | None:
        return self.tensors[self.label] if self.label is not None else None

    def bound(self, leaves) -> BoundBatch:
        return BoundBatch(leaves, self)

    def example(self, n: int = 8, model=None):
        """Inputs to trace, time and verify with: what forward_fn passes to `model` for the first n samples (caught
        by a pre-hook before the model runs), else the batch without its labels."""
        leaves = [t[:n].clone() for t in self.tensors]
        if self.forward_fn is None or model is None:
            return self.inputs(leaves)
        seen = {}

        def grab(module, args, kwargs):
            seen["call"] = (args, kwargs)
            raise _Caught

        handle = model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                self.forward_fn(model, self.rebuild(leaves))
        except _Caught:
            pass
        finally:
            handle.remove()
        if "call" not in seen:  # forward_fn never called the model itself
            return self.inputs(leaves)
        args, kwargs = seen["call"]
        if not kwargs:
            return tuple(args)
        import inspect

        return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)

    def forward(self, model, leaves) -> torch.Tensor:
        from compressor import device as devices
        from compressor.utils.outputs import first_tensor

        if self.forward_fn is not None:
            return first_tensor(self.forward_fn(model, self.rebuild(leaves)))
        inputs = devices.to_device(self.inputs(leaves), devices.module_device(model))
        return first_tensor(model(**inputs) if isinstance(inputs, dict) else model(*inputs))

    def loss(self, model, leaves) -> torch.Tensor:
        """The training loss of one batch of leaves (the signature compressor.train.train calls)."""
        if self.loss_fn is not None:
            return self.loss_fn(model, self.rebuild(leaves))
        if self.label is None:
            raise InputError("the data's batches carry no labels and no loss_fn was given",
                             "pass loss_fn=(model, batch) -> loss, or put the labels under batch['labels']")
        return torch.nn.functional.cross_entropy(self.forward(model, leaves), leaves[self.label])

    @torch.no_grad()
    def outputs(self, model, batch_size: int = 64) -> torch.Tensor:
        """The model's outputs over every sample, fp32 on the CPU (the model runs where it is, in eval mode)."""
        from compressor import device as devices

        dev, was = devices.module_device(model), model.training
        model.eval()
        try:
            outs = [self.forward(model, devices.to_device([t[i : i + batch_size] for t in self.tensors], dev)).float().cpu()
                    for i in range(0, len(self), batch_size)]
        finally:
            model.train(was)
        return torch.cat(outs)


class _Caught(Exception):
    """Stops the model once the call forward_fn makes is seen (Batches.example)."""


class BoundBatch(tuple):
    """One batch of leaves that knows its loss: `loss(model)` (Taylor importance calls it)."""

    def __new__(cls, leaves, data: Batches):
        obj = super().__new__(cls, leaves)
        obj.data = data
        return obj

    def loss(self, model) -> torch.Tensor:
        from compressor import device as devices

        return self.data.loss(model, devices.to_device(tuple(self), devices.module_device(model)))


def split_batches(data: Batches, test_fraction: float, seed: int) -> tuple[Batches, Batches]:
    """The shared split rule (_held_out) for Batches."""
    tr, te = _held_out(len(data), test_fraction, seed)
    return data.subset(tr), data.subset(te)
