"""Plain feed-forward families: a VGG-style conv-bn-relu stack ending in flatten → FC, and an MLP with LayerNorm."""

from __future__ import annotations

import torch
from torch import nn

from graphs import ZooEntry, register


class PlainCNN(nn.Module):
    """conv-bn-relu ×3 (last one strided), flatten of an 8×8 map → fc1 → fc2 (classifier)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))  # channel c of conv3 ↦ features c*64 … c*64+63
        return self.fc2(x)


def _bn(name: str) -> list[tuple[str, str]]:
    return [(f"{name}.weight", "out"), (f"{name}.bias", "out")]


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics so exported graphs and zero-channel checks are not degenerate."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model


def build_cnn():
    return _randomise_bn(PlainCNN()), (torch.randn(2, 3, 16, 16),)


register(ZooEntry(
    name="cnn", family="basic", source="hand-written (VGG-style)",
    description="conv-bn-relu stack, strided conv, flatten → FC; tests conv/BN coupling and the Flatten "
                "channel→block index map (16 channels × 64 positions).",
    builder=build_cnn, input_names=("input",), output_names=("logits",), ignored=("fc2",),
    expected={
        "groups": [
            [("conv1.weight", "out"), *_bn("bn1"), ("conv2.weight", "in")],
            [("conv2.weight", "out"), *_bn("bn2"), ("conv3.weight", "in")],
            [("conv3.weight", "out"), *_bn("bn3"), ("fc1.weight", "in")],
            [("fc1.weight", "out"), ("fc1.bias", "out"), ("fc2.weight", "in")],
        ],
        "frozen": [("fc2.weight", "out"), ("fc2.bias", "out")],
        "flatten": {"producer": "conv3.weight", "consumer": "fc1.weight", "block": 64},
    },
))


class MLP(nn.Module):
    """fc1 → LayerNorm → GELU → fc2 → ReLU → fc3 (classifier)."""

    def __init__(self, d_in: int = 32, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = nn.functional.gelu(self.ln(self.fc1(x)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def build_mlp():
    model = MLP()
    nn.init.uniform_(model.ln.weight, 0.5, 1.5)
    nn.init.uniform_(model.ln.bias, -0.2, 0.2)
    return model, (torch.randn(4, 32),)


register(ZooEntry(
    name="mlp", family="basic", source="hand-written",
    description="three Linear layers (Gemm in ONNX) with a LayerNorm on the hidden features; LayerNorm is "
                "pass-through for coupling but its statistics span channels (zero-channel equivalence holds "
                "only approximately).",
    builder=build_mlp, input_names=("input",), output_names=("logits",), ignored=("fc3",),
    expected={
        "groups": [
            [("fc1.weight", "out"), ("fc1.bias", "out"), ("ln.weight", "out"), ("ln.bias", "out"),
             ("fc2.weight", "in")],
            [("fc2.weight", "out"), ("fc2.bias", "out"), ("fc3.weight", "in")],
        ],
        "frozen": [("fc3.weight", "out"), ("fc3.bias", "out")],
        "approximate": ["ln"],
    },
))
