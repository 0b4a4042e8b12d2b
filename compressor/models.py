"""Small reference torch models used by the demo, tests and benchmarks (digits: [N, 1, 8, 8], 10 classes).

They are ordinary modules with stable parameter names, so checkpoints load with
`--arch compressor.models:digits_cnn`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv-bn-relu ×3 (one residual add), global pool, two linear layers; ~26k parameters."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 16, 64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))  # residual: couples conv1 and conv2 outputs
        x = torch.relu(self.bn3(self.conv3(x)))  # [N, 2w, 4, 4]
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc(x)


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 256, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden // 2)
        self.fc = nn.Linear(hidden // 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def digits_cnn(width: int = 32) -> DigitsCNN:
    return DigitsCNN(width)


def digits_mlp(hidden: int = 256) -> DigitsMLP:
    return DigitsMLP(hidden)


def digits_example_inputs(batch: int = 8) -> tuple[torch.Tensor]:
    return (torch.zeros(batch, 1, 8, 8),)


@functools.lru_cache(maxsize=4)
def _pretrained_state(kind: str, seed: int, epochs: int) -> dict:
    from compressor.io.data import load_data
    from compressor.train import train

    torch.manual_seed(seed)
    model = digits_cnn() if kind == "cnn" else digits_mlp()
    data = load_data("digits")
    train(model, data.train, epochs=epochs, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.9,
          weight_decay=1e-4, seed=seed, progress=False, cosine=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def pretrained_digits_cnn(seed: int = 0, epochs: int = 8) -> DigitsCNN:
    """A DigitsCNN trained on the digits train split (a few seconds on CPU; cached per process)."""
    model = digits_cnn()
    model.load_state_dict(_pretrained_state("cnn", seed, epochs))
    return model.eval()


def pretrained_digits_mlp(seed: int = 0, epochs: int = 15) -> DigitsMLP:
    model = digits_mlp()
    model.load_state_dict(_pretrained_state("mlp", seed, epochs))
    return model.eval()
