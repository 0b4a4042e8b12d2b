"""Batches that are not (x, y) — dicts as Hugging Face pipelines have, or (x, mask, y) — through the Python API
with forward_fn / loss_fn: evaluation, training (finetune) and Taylor importance (prune).

Oracles: the pretrained digits CNN's accuracy (above 90 % only when inputs, scales and labels are paired as
written), counts of the caller's own function calls, and parameter counts before / after pruning.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import compressor
from compressor.api import prune
from compressor.errors import InputError
from compressor.io.sources import from_torch


@pytest.fixture(scope="module")
def digits60():
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.concatenate([np.where(d.target == c)[0][:12] for c in range(10)])
    x = torch.tensor(d.images[keep], dtype=torch.float32).unsqueeze(1) / 16
    return x, torch.tensor(d.target[keep])


class KeywordCNN(nn.Module):
    """Called with keywords like a Hugging Face model, with [batch, 64] inputs like token sequences: each image
    arrives flattened and multiplied by k, with 1 / k beside every pixel."""

    def __init__(self, cnn):
        super().__init__()
        self.cnn = cnn

    def forward(self, pixels, scale):
        return self.cnn((pixels * scale).view(-1, 1, 8, 8))


class DictDigits(Dataset):
    def __init__(self, x, y):
        k = torch.linspace(0.25, 4.0, len(y))[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
        self.pixels, self.scale, self.y = x.flatten(1) * k.view(-1, 1), (1 / k).view(-1, 1).expand(-1, 64), y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixels": self.pixels[i], "scale": self.scale[i], "labels": self.y[i]}


class MaskedCNN(nn.Module):
    def __init__(self, cnn):
        super().__init__()
        self.cnn = cnn

    def forward(self, x, mask):
        return self.cnn(x * mask)


def test_dict_batches_evaluate_with_and_without_forward_fn(digits60, trained_cnn):
    x, y = digits60
    model, ds = KeywordCNN(trained_cnn), DictDigits(x, y)
    plain = compressor.evaluate_model(model, data=DataLoader(ds, batch_size=7), latency=False)  # model(**inputs)
    assert plain["accuracy"] > 0.9
    calls = []

    def forward_fn(m, batch):
        calls.append(sorted(batch))
        return m(batch["pixels"], batch["scale"])

    m = compressor.evaluate_model(model, data=ds, forward_fn=forward_fn, latency=False)
    assert m["accuracy"] == plain["accuracy"] and calls and calls[0] == ["labels", "pixels", "scale"]
    swapped = compressor.evaluate_model(model, data=ds, forward_fn=lambda m, b: m(b["pixels"], b["scale"].flip(0)), latency=False)
    assert swapped["accuracy"] < m["accuracy"]  # the pairing matters: the oracle can tell a mix-up


def test_dict_batches_train_through_the_caller_loss(digits60, trained_cnn, tmp_path):
    x, y = digits60
    model, loader = KeywordCNN(trained_cnn), DataLoader(DictDigits(x, y), batch_size=8)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        assert set(batch) == {"pixels", "scale", "labels"}
        return nn.functional.cross_entropy(m(batch["pixels"], batch["scale"]), batch["labels"])

    res = compressor.compress(model, {"name": "ft", "stages": [{"method": "finetune", "epochs": 1, "lr": 0.01}]},
                              data=loader, output=tmp_path / "ft", loss_fn=loss_fn, measure_latency=False)
    assert calls["n"] == res.report["stages"][0]["result"]["steps"] > 0  # every training step ran the caller's loss
    assert res.report["data"] == "torch:DataLoader" and res.after["accuracy"] > 0.85


def test_tuple_batches_taylor_through_the_caller_loss(digits60, trained_cnn):
    """(x, mask, y) batches: Taylor importance takes its gradients from the caller's loss. (Dict-input models are
    exported with a dynamic sequence axis, as token models are, so they are pruned through tuple batches here.)"""
    x, y = digits60
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) > 0.5).float() + 1
    loader = DataLoader(list(zip(x / mask, mask, y, strict=True)), batch_size=8)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        xb, mb, yb = batch
        return nn.functional.cross_entropy(m(xb, mb), yb)

    pruned = prune(MaskedCNN(trained_cnn), 0.25, data=loader, importance="taylor", loss_fn=loss_fn, measure_latency=False)
    assert calls["n"] >= 1  # Taylor importance ran the caller's loss
    assert pruned.after["params"] < pruned.before["params"] and pruned.before["accuracy"] > 0.9


def test_tuple_batches_with_a_mask(digits60, trained_cnn):
    x, y = digits60
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) > 0.5).float() + 1  # 1 or 2
    triples = [(x[i : i + 10] / mask[i : i + 10], mask[i : i + 10], y[i : i + 10]) for i in range(0, 120, 10)]
    b = from_torch(triples)
    assert b.meta["label"] == 2 and b.num_classes == 10 and len(b.train) + len(b.test) == 120
    m = compressor.evaluate_model(MaskedCNN(trained_cnn), data=triples, latency=False)
    assert m["accuracy"] > 0.9


def test_bad_batches_one_line(digits60):
    x, y = digits60
    with pytest.raises(InputError, match="'name' of data item 0 is a list, not a tensor"):
        from_torch([{"pixels": x[:4], "name": ["a", "b", "c", "d"]}])
    with pytest.raises(InputError, match="item 1 of the data is a dict with keys pixels, unlike the first"):
        from_torch([{"pixels": x[:4], "labels": y[:4]}, {"pixels": x[4:8]}])
    with pytest.raises(InputError, match="'pixels' differs in shape"):
        from_torch([{"pixels": x[:4]}, {"pixels": x[4:8, :, :4]}])
    unlabelled = from_torch([{"pixels": x[:8]}, {"pixels": x[8:16]}])
    with pytest.raises(InputError, match="no labels and no loss_fn"):
        unlabelled.train.loss(nn.Identity(), unlabelled.train.tensors)
