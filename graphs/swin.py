"""A Swin-like vision transformer in plain torch (no torchvision/timm), for the torch bridge's tests.

It follows torchvision's Swin Transformer (Liu et al. 2021, `torchvision.models.swin_transformer`) in the parts
that decide what an exporter and the analyser see: a strided-conv patch embedding with a channels-last
LayerNorm, blocks of windowed multi-head self-attention whose every other block shifts the windows by half a
window (torch.roll, with the attention mask built in forward from the padded size), a relative position bias
table gathered by an index buffer, qkv as one Linear reshaped to (3, heads, C // heads) with C read from the
input's shape, an MLP, patch merging (four strided slices concatenated, LayerNorm, Linear 4C → 2C without
bias), and a LayerNorm → average pool → Linear head. Sizes are small so that tests run in seconds.

    from graphs.swin import swin_like
    model, inputs = swin_like()
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def window_attention(x: torch.Tensor, qkv: nn.Linear, proj: nn.Linear, bias: torch.Tensor, heads: int,
                     window: int, shift: int) -> torch.Tensor:
    """torchvision's shifted_window_attention for a square window: x is (B, H, W, C)."""
    b, h, w, c = x.shape
    pad_r, pad_b = (window - w % window) % window, (window - h % window) % window
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, _ = x.shape
    shift = 0 if window >= ph else shift  # one window covers the map: nothing to shift
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    n_win = (ph // window) * (pw // window)
    x = x.view(b, ph // window, window, pw // window, window, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b * n_win, window * window, c)
    t = qkv(x).reshape(x.size(0), x.size(1), 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = t[0], t[1], t[2]
    attn = (q * (c // heads) ** -0.5).matmul(k.transpose(-2, -1)) + bias
    if shift > 0:  # tokens rolled in from the other side of the map must not attend to each other
        mask = x.new_zeros((ph, pw))
        spans = ((0, -window), (-window, -shift), (-shift, None))
        count = 0
        for hs in spans:
            for ws in spans:
                mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        mask = mask.view(ph // window, window, pw // window, window).permute(0, 2, 1, 3).reshape(n_win, window * window)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // n_win, n_win, heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, x.size(1), x.size(1))
    x = F.softmax(attn, dim=-1).matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
    x = proj(x)
    x = x.view(b, ph // window, pw // window, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class ShiftedWindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.2)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", (rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]).flatten())

    def forward(self, x):
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        bias = bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        return window_attention(x, self.qkv, self.proj, bias, self.heads, self.window, self.shift)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, heads, window, shift)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        h, w = x.shape[-3:-1]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class SwinLike(nn.Module):
    """Two stages (depth 2 each: plain then shifted windows) with patch merging between them."""

    def __init__(self, dim: int = 16, heads: tuple[int, int] = (2, 4), window: int = 4, patch: int = 2,
                 classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.embed_norm = nn.LayerNorm(dim)
        self.stage1 = nn.Sequential(SwinBlock(dim, heads[0], window, 0), SwinBlock(dim, heads[0], window, window // 2))
        self.merge = PatchMerging(dim)
        self.stage2 = nn.Sequential(SwinBlock(2 * dim, heads[1], window, 0),
                                    SwinBlock(2 * dim, heads[1], window, window // 2))
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.embed_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        x = self.norm(self.stage2(self.merge(self.stage1(x))))
        return self.head(x.permute(0, 3, 1, 2).mean((2, 3)))


def swin_like(seed: int = 0, batch: int = 2, size: int = 16) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A seeded eval-mode SwinLike and one input batch (16x16 images: 8x8 tokens, 2x2 windows of 4x4)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SwinLike().eval()
        x = torch.randn(batch, 3, size, size)
    return model, (x,)
