"""Device-aware structured pruning: `round_to: auto` (8 on CUDA in fp16/bf16, 1 on CPU: CPU results unchanged)
and `target: latency` (prune until a latency measured on the device reaches the target).

Oracles: the kept widths read from the pruned model's own layers (not from the selection code); a second,
independent timing of the dense and pruned models (eager, interleaved medians) for the latency target.
CUDA is mocked for round_to (torch.cuda's queries only: nothing runs on a GPU).
"""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
from torch import nn

from compressor.methods.structured import StructuredParams, resolved_round_to, structured_torch


def cnn(widths=(24, 40, 64), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, c = [], 3
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)).eval()


def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.fixture
def fake_cuda_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def _prune(p: StructuredParams, device) -> list[int]:
    m = cnn()
    structured_torch(m, (torch.randn(2, 3, 8, 8),), p, device=device)
    return conv_widths(m)


def test_round_to_auto_on_cpu_leaves_results_unchanged():
    auto = _prune(StructuredParams(ratio=0.3, protect_output=False), "cpu")
    one = _prune(StructuredParams(ratio=0.3, round_to=1, protect_output=False), "cpu")
    assert auto == one
    assert any(w % 8 for w in auto)  # ratio 0.3 of these widths is not tensor-core aligned, so the test can fail
    assert resolved_round_to(StructuredParams(), "cpu") == 1


def test_round_to_auto_on_cuda_bf16_keeps_multiples_of_8(fake_cuda_bf16):
    cuda = torch.device("cuda", 0)
    widths = _prune(StructuredParams(ratio=0.3, protect_output=False), cuda)
    assert all(w % 8 == 0 for w in widths), widths
    assert widths != [24, 40, 64]  # still pruned
    assert resolved_round_to(StructuredParams(), cuda) == 8
    assert resolved_round_to(StructuredParams(dtype="fp32"), cuda) == 1  # fp32 on the GPU: no tensor-core rounding
    assert resolved_round_to(StructuredParams(), cuda, "onnx") == 1  # an ONNX graph keeps its (fp32) dtype
    # explicit values win
    assert _prune(StructuredParams(ratio=0.3, round_to=1, protect_output=False), cuda) == \
        _prune(StructuredParams(ratio=0.3, round_to=1, protect_output=False), "cpu")
    assert resolved_round_to(StructuredParams(round_to=16), "cpu") == 16


def test_latency_target_needs_a_target():
    with pytest.raises(ValueError, match="latency_target"):
        StructuredParams(target="latency")


def _relative_eager(pruned: nn.Module, dense: nn.Module, x: torch.Tensor, repeats: int = 40) -> float:
    """Median pruned / median dense latency, the two called alternately (drift hits both alike)."""
    tp, td = [], []
    with torch.inference_mode():
        pruned(x), dense(x)
        for _ in range(repeats):
            t = time.perf_counter()
            dense(x)
            td.append(time.perf_counter() - t)
            t = time.perf_counter()
            pruned(x)
            tp.append(time.perf_counter() - t)
    return statistics.median(tp) / statistics.median(td)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier timings on a shared machine
    yield
    torch.set_num_threads(n)


def test_latency_target_on_cpu_reaches_the_measured_target(one_thread):
    model = cnn(widths=(32, 64, 64))
    dense = copy.deepcopy(model)
    p = StructuredParams(target="latency", latency_target=0.6, latency_step=0.15, latency_batch=8, protect_output=False)
    rep = structured_torch(model, (torch.randn(2, 3, 8, 8),), p, device="cpu")
    ls = rep["latency_search"]
    tries = ls["tries"]
    assert ls["reached"] and ls["device"] == "cpu" and ls["timing"] == "eager"
    assert tries[-1]["relative"] <= 0.6 and all(t["relative"] > 0.6 for t in tries[:-1])
    assert rep["channel_ratio"] == pytest.approx(tries[-1]["ratio"])
    # second opinion, timed independently and interleaved (a shared CPU is noisy: some slack)
    assert _relative_eager(model, dense, torch.randn(8, 3, 8, 8)) <= 0.6 + 0.2
    assert rep["mac_reduction"] > 0.3
