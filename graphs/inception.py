"""Multi-branch families: inception-like concat of branches, and a channel split (chunk) whose halves take
different paths and are concatenated again (ShuffleNet-v2 style, without the shuffle)."""

from __future__ import annotations

import torch
from torch import nn

from graphs import ZooEntry, register
from graphs.basic import _bn, _randomise_bn


class TinyInception(nn.Module):
    """stem → [1×1 | 1×1→3×3 | maxpool→1×1] → concat (4+6+2 = 12 ch) → BN → 1×1 merge → GAP → fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2a = nn.Conv2d(8, 4, 1)
        self.b2b = nn.Conv2d(4, 6, 3, padding=1)
        self.b3 = nn.Conv2d(8, 2, 1)
        self.bn = nn.BatchNorm2d(12)
        self.merge = nn.Conv2d(12, 16, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y1 = torch.relu(self.b1(x))
        y2 = torch.relu(self.b2b(torch.relu(self.b2a(x))))
        y3 = torch.relu(self.b3(nn.functional.max_pool2d(x, 3, 1, 1)))
        y = torch.relu(self.bn(torch.cat([y1, y2, y3], dim=1)))
        y = torch.relu(self.merge(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _conv(name: str) -> list[tuple[str, str]]:
    return [(f"{name}.weight", "out"), (f"{name}.bias", "out")]


def build_concat():
    return _randomise_bn(TinyInception()), (torch.randn(2, 3, 12, 12),)


register(ZooEntry(
    name="concat", family="inception", source="hand-written (GoogLeNet inception-module pattern)",
    description="three branches (one through a max-pool) concatenated on channels, then a BN over the "
                "concatenation; tests Concat offset maps (branch i's channel c ↦ c + offset_i) and that "
                "branches stay separate groups while the stem feeds all three.",
    builder=build_concat, input_names=("input",), output_names=("logits",), ignored=("fc",),
    expected={
        "groups": [
            [*_conv("stem"), ("b1.weight", "in"), ("b2a.weight", "in"), ("b3.weight", "in")],
            [*_conv("b1"), *_bn("bn"), ("merge.weight", "in")],
            [*_conv("b2a"), ("b2b.weight", "in")],
            [*_conv("b2b"), *_bn("bn"), ("merge.weight", "in")],
            [*_conv("b3"), *_bn("bn"), ("merge.weight", "in")],
            [*_conv("merge"), ("fc.weight", "in")],
        ],
        "concat_offsets": {"b1.weight": 0, "b2b.weight": 4, "b3.weight": 10, "width": 12},
        "frozen": [("fc.weight", "out"), ("fc.bias", "out")],
    },
))


class TinySplit(nn.Module):
    """stem (16 ch) → chunk into halves: a = ch 0-7 passes through, b = ch 8-15 → conv-bn-relu ×2;
    concat(a, b') → conv-bn-relu → GAP → fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv_b1 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_b1 = nn.BatchNorm2d(8)
        self.conv_b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_b2 = nn.BatchNorm2d(8)
        self.conv_out = nn.Conv2d(16, 16, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        a, b = torch.chunk(x, 2, dim=1)
        b = torch.relu(self.bn_b1(self.conv_b1(b)))
        b = torch.relu(self.bn_b2(self.conv_b2(b)))
        y = torch.relu(self.bn_out(self.conv_out(torch.cat([a, b], dim=1))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def build_split():
    return _randomise_bn(TinySplit()), (torch.randn(2, 3, 12, 12),)


register(ZooEntry(
    name="split", family="inception", source="hand-written (ShuffleNet-v2 channel split, no shuffle)",
    description="torch.chunk of the stem output (ONNX Split) into a pass-through half and a conv half, "
                "re-joined by Concat; stem channels 0-7 map to conv_out inputs 0-7 and stem channels 8-15 "
                "to conv_b1 inputs 0-7, all in one group.",
    builder=build_split, input_names=("input",), output_names=("logits",), ignored=("fc",),
    expected={
        "groups": [
            [("stem.weight", "out"), *_bn("bn0"), ("conv_b1.weight", "in"), ("conv_out.weight", "in")],
            [("conv_b1.weight", "out"), *_bn("bn_b1"), ("conv_b2.weight", "in")],
            [("conv_b2.weight", "out"), *_bn("bn_b2"), ("conv_out.weight", "in")],
            [("conv_out.weight", "out"), *_bn("bn_out"), ("fc.weight", "in")],
        ],
        "tp": {"num_groups": 3, "bug": True, "why": "torch-pruning 1.6 infers the Split offsets of torch.chunk as "
               "[0, 16, 24] instead of [0, 8, 16] when a chunk output feeds torch.cat directly, so it ties conv_b2's "
               "outputs to stem channels 0-7 and loses conv_b1's input; the expected groups above are right "
               "(checked by zero-channel equivalence in tests/test_graph_zoo.py)"},
        "split_map": {"stem.weight[0:8]": "conv_out.weight in [0:8]", "stem.weight[8:16]": "conv_b1.weight in [0:8]"},
        "frozen": [("fc.weight", "out"), ("fc.bias", "out")],
    },
))
