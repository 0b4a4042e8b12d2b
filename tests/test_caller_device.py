"""Functions that train keep the caller's device unless told otherwise (issue 13: on a machine with CUDA the
SaRA API moved the model to the GPU on its own while the caller's tensors stayed on the CPU).

Oracle: with torch.cuda.is_available patched True (a GPU machine as far as any "which device" logic can tell),
no module is moved to a CUDA device and every parameter and returned tensor stays on the CPU; the results
still compute (the caller's CPU tensors run through the trained model).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset


@pytest.fixture
def cuda_present_spy(monkeypatch):
    """torch says CUDA is there; every Module.to / .cuda call is recorded (and .cuda fails the test)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    moves: list = []
    real_to = nn.Module.to

    def spy_to(self, *args, **kwargs):
        moves.append((type(self).__name__, args, kwargs))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy_to)
    monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **kw: pytest.fail(f"{type(self).__name__}.cuda() called unasked"))
    return moves


def _cuda_moves(moves) -> list:
    out = []
    for name, args, kwargs in moves:
        for a in (*args, kwargs.get("device")):
            if isinstance(a, (str, torch.device)) and torch.device(a).type == "cuda":
                out.append((name, a))
    return out


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 4))


def _data(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    return TensorDataset(x, x[:, :4].argmax(1))


def test_sara_python_api_keeps_the_callers_device(cuda_present_spy):
    from compressor.sara import SaRAOptimizer
    from compressor.train import train

    m = _mlp()
    opt = SaRAOptimizer(m, fraction=0.1, lr=1e-2, rank_min_dim=16, penalize="update", progressive_step=3)
    train(m, _data(), steps=5, batch_size=32, optimizer=opt, progress=False)
    opt.adapter.merge()
    assert _cuda_moves(cuda_present_spy) == []
    assert all(p.device.type == "cpu" for p in m.parameters())
    x = torch.randn(3, 16)  # the caller's CPU tensor runs through the model (the addmm error)
    assert m(x).device.type == "cpu"


def test_sara_recipe_stage_trains_on_the_contexts_cpu_device(cuda_present_spy, tmp_path):
    from compressor.io.data import DataBundle
    from compressor.recipe import StageContext, parse_recipe, run_recipe

    d = _data(160)
    bundle = DataBundle("classification", TensorDataset(*d[:128]), TensorDataset(*d[128:]), num_classes=4)
    recipe = parse_recipe({"name": "t", "stages": [{"method": "sara", "fraction": 0.1, "steps": 4, "batch_size": 32,
                                                     "lr": 1e-2, "rank_min_dim": 16}]})
    ctx = StageContext(model=_mlp(), data=bundle, workdir=tmp_path, device=torch.device("cpu"))
    run_recipe(recipe, ctx)
    assert _cuda_moves(cuda_present_spy) == []
    assert all(p.device.type == "cpu" for p in ctx.model.parameters())


def test_quantized_distillation_and_gradual_keep_the_callers_device(cuda_present_spy):
    from compressor.methods.gradual import gradual_prune
    from compressor.quant import QuantConfig
    from compressor.quant.qat import quantized_distillation

    student, teacher = _mlp(1), _mlp(2)
    qt, info = quantized_distillation(student, _data(), teacher=teacher, cfg=QuantConfig(bits=4), steps=3, batch_size=32,
                                      progress=False)
    gradual_prune(student, _data(), 0.5, steps=4, frequency=2, batch_size=32, progress=False)
    assert _cuda_moves(cuda_present_spy) == []
    assert all(p.device.type == "cpu" for mod in (student, teacher) for p in mod.parameters())
    assert all(q.codes.device.type == "cpu" for q in qt.values())
