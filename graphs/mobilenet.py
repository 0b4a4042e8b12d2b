"""MobileNet family: depthwise-separable convs (MobileNet v1) and an inverted residual (MobileNet v2), written
after torchvision's mobilenetv2 layout (torchvision does not install with this torch)."""

from __future__ import annotations

import torch
from torch import nn

from graphs import ZooEntry, register
from graphs.basic import _bn, _randomise_bn


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int):
        super().__init__()
        h = c * expand
        self.expand = conv_bn(c, h)
        self.dw = conv_bn(h, h, 3, groups=h)
        self.project = conv_bn(h, c, act=False)

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class TinyMobileNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.dw1 = conv_bn(8, 8, 3, groups=8)  # depthwise-separable block (v1)
        self.pw1 = conv_bn(8, 16)
        self.ir = InvertedResidual(16, 2)  # v2 block with residual
        self.head = conv_bn(16, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.head(self.ir(self.pw1(self.dw1(self.stem(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_depthwise():
    return _randomise_bn(TinyMobileNet()), (torch.randn(2, 3, 16, 16),)


def _cb(name: str, io: str) -> list[tuple[str, str]]:
    return [(f"{name}.0.weight", io)] + (_bn(f"{name}.1") if io == "out" else [])


register(ZooEntry(
    name="depthwise", family="mobilenet", source="hand-written after torchvision.models.mobilenetv2",
    description="depthwise-separable block (depthwise 3×3 + pointwise 1×1) and an inverted residual "
                "(expand, depthwise, linear project, + identity); depthwise convs pass their channels through "
                "(in ≡ out), so they join the group of their producer.",
    builder=build_depthwise, input_names=("input",), output_names=("logits",), ignored=("fc",),
    expected={
        "groups": [
            [*_cb("stem", "out"), *_cb("dw1", "out"), *_cb("pw1", "in")],
            [*_cb("pw1", "out"), *_cb("ir.expand", "in"), *_cb("ir.project", "out"), *_cb("head", "in")],
            [*_cb("ir.expand", "out"), *_cb("ir.dw", "out"), *_cb("ir.project", "in")],
            [*_cb("head", "out"), ("fc.weight", "in")],
        ],
        "depthwise": ["dw1.0.weight", "ir.dw.0.weight"],
        "frozen": [("fc.weight", "out"), ("fc.bias", "out")],
    },
))
