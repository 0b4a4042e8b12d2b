"""A ViT-like vision transformer in plain torch (no torchvision/timm), for the torch bridge's tests.

It follows torchvision's VisionTransformer (Dosovitskiy et al. 2021, `torchvision.models.vision_transformer`)
where it matters to an exporter and the analyser: a strided-conv patch embedding flattened to tokens, a class
token parameter expanded over the batch and concatenated in front, a learned position embedding added,
pre-norm encoder blocks with `nn.MultiheadAttention` (one packed in_proj_weight for q, k and v) and an MLP,
a final LayerNorm, and a Linear head on the class token. Sizes are small so that tests run in seconds.

    from graphs.vit import vit_like
    model, inputs = vit_like()
"""

from __future__ import annotations

import torch
from torch import nn


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViTLike(nn.Module):
    def __init__(self, size: int = 16, patch: int = 4, dim: int = 32, heads: int = 4, depth: int = 3,
                 mlp: int = 64, classes: int = 10):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderBlock(dim, heads, mlp) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


def vit_like(seed: int = 0, batch: int = 2, size: int = 16) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A seeded eval-mode ViTLike and one input batch (16x16 images, 4x4 patches: 17 tokens)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTLike(size=size).eval()
        x = torch.randn(batch, 3, size, size)
    return model, (x,)
