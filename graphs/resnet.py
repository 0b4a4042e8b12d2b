"""Residual families: ResNet basic blocks (identity and 1×1 projection shortcuts) and a ResNeXt-style
bottleneck with a grouped 3×3 conv. Written after torchvision's BasicBlock / Bottleneck layout (same module
names: convN, bnN, downsample.0/1), since torchvision itself does not install with this torch."""

from __future__ import annotations

import torch
from torch import nn

from graphs import ZooEntry, register
from graphs.basic import _bn, _randomise_bn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + idt)


class TinyResNet(nn.Module):
    """stem → layer1 (1 identity block, 16 ch) → layer2 (projection block 16→32 stride 2, identity block) → GAP → fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_residual():
    return _randomise_bn(TinyResNet()), (torch.randn(2, 3, 16, 16),)


def _inner(block: str) -> list[tuple[str, str]]:
    return [(f"{block}.conv1.weight", "out"), *_bn(f"{block}.bn1"), (f"{block}.conv2.weight", "in")]


register(ZooEntry(
    name="residual", family="resnet", source="hand-written after torchvision.models.resnet.BasicBlock",
    description="ResNet basic blocks: identity shortcut (stage 1) and 1×1-conv+BN projection shortcut "
                "(stage 2); the residual adds tie every block output of a stage into one group, and the "
                "projection cuts the stem stream from the stage-2 stream.",
    builder=build_residual, input_names=("input",), output_names=("logits",), ignored=("fc",),
    expected={
        "groups": [
            # stage-1 stream: stem + layer1.0's output, consumed by both convs of the projection block
            [("conv1.weight", "out"), *_bn("bn1"), ("layer1.0.conv1.weight", "in"),
             ("layer1.0.conv2.weight", "out"), *_bn("layer1.0.bn2"),
             ("layer2.0.conv1.weight", "in"), ("layer2.0.downsample.0.weight", "in")],
            _inner("layer1.0"),
            _inner("layer2.0"),
            # stage-2 stream: projection shortcut + both block outputs + classifier input
            [("layer2.0.conv2.weight", "out"), *_bn("layer2.0.bn2"),
             ("layer2.0.downsample.0.weight", "out"), *_bn("layer2.0.downsample.1"),
             ("layer2.1.conv1.weight", "in"), ("layer2.1.conv2.weight", "out"), *_bn("layer2.1.bn2"),
             ("fc.weight", "in")],
            _inner("layer2.1"),
        ],
        "tied": [[("conv1.weight", "out"), ("layer1.0.conv2.weight", "out")],
                 [("layer2.0.downsample.0.weight", "out"), ("layer2.0.conv2.weight", "out"),
                  ("layer2.1.conv2.weight", "out")]],
        "separate": [[("conv1.weight", "out"), ("layer2.0.conv2.weight", "out")]],
        "frozen": [("fc.weight", "out"), ("fc.bias", "out")],
    },
))


class ResNeXtBlock(nn.Module):
    """1×1 reduce → 3×3 grouped conv (cardinality g) → 1×1 expand, + identity."""

    def __init__(self, c: int = 16, width: int = 32, groups: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + x)


class TinyResNeXt(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.block = ResNeXtBlock()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.block(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def build_grouped():
    return _randomise_bn(TinyResNeXt()), (torch.randn(2, 3, 12, 12),)


register(ZooEntry(
    name="grouped", family="resnet", source="hand-written after torchvision.models.resnet.Bottleneck (ResNeXt)",
    description="ResNeXt bottleneck with a 4-group 3×3 conv (8 in / 8 out channels per group) inside a "
                "residual; tests grouped-conv rules (per-group uniform pruning) and a mean-over-space pool.",
    builder=build_grouped, input_names=("input",), output_names=("logits",), ignored=("fc",),
    expected={
        "groups": [
            [("conv1.weight", "out"), *_bn("bn1"), ("block.conv1.weight", "in"),
             ("block.conv3.weight", "out"), *_bn("block.bn3"), ("fc.weight", "in")],
            [("block.conv1.weight", "out"), *_bn("block.bn1"), ("block.conv2.weight", "in")],
            [("block.conv2.weight", "out"), *_bn("block.bn2"), ("block.conv3.weight", "in")],
        ],
        "grouped_conv": {"param": "block.conv2.weight", "groups": 4, "in_per_group": 8, "out_per_group": 8},
        "frozen": [("fc.weight", "out"), ("fc.bias", "out")],
        "onnx_may_merge": [[("block.conv1.weight", "out"), ("block.conv2.weight", "out")]],
        "tp": {"num_groups": 3, "note": "torch-pruning treats a grouped (non-depthwise) conv like a plain conv: "
               "its in- and out-channels are separate groups and pruning is replicated per conv group "
               "(ch_groups). An ONNX analyser that couples a grouped conv's input and output per group (DESIGN) "
               "merges the two inner groups; both are safe, the merged one is coarser."},
    },
))
