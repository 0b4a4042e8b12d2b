"""Regression models for architecture patterns that once made structured pruning wrong or fail (issue 17).

Each is a small, seeded torch module reproducing one *pattern* of a real architecture (not the architecture):
the ShuffleNetV2 channel split and shuffle, a MaxViT-style window partition, 2-D rotary position embeddings in a
vision transformer, LayerScale parameters reshaped in forward, forward code holding channel counts as Python
ints, and a MaxViT-like block (MBConv with squeeze-excitation, relative position bias gathered by a buffer).
They are not part of the reference zoo (`graphs.ZOO`): they carry no hand-derived groups, only the
pattern. tests/test_graph_regressions.py runs each through the ONNX path (both exporters) and the torch path.

    from graphs.regressions import REGRESSIONS
    model, inputs = REGRESSIONS["shuffle_split"].build()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


@dataclasses.dataclass(frozen=True)
class Regression:
    name: str
    pattern: str  # what the model reproduces, and what went wrong with it
    builder: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]

    def build(self, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """Fresh model (eval mode, seeded, BN statistics randomised so zeroed channels matter) and inputs."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, inputs = self.builder()
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    nn.init.normal_(m.weight, 1, 0.1)
                    nn.init.normal_(m.bias, 0, 0.1)
        return model.eval(), inputs


REGRESSIONS: dict[str, Regression] = {}


def _register(name: str, pattern: str):
    def deco(fn):
        REGRESSIONS[name] = Regression(name, pattern, fn)
        return fn

    return deco


def _cbr(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class _Head(nn.Module):
    def __init__(self, c: int, n: int = 5):
        super().__init__()
        self.fc = nn.Linear(c, n)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


# ------------------------------------------------------------------------------------------ (a) equal Split
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel shuffle (sizes read from the tensor)."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 stride-1 unit: chunk into halves, transform one half, concat, shuffle."""

    def __init__(self, c: int):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(_cbr(h, h), nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                    _cbr(h, h))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)


class ShuffleSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.unit1, self.unit2 = ShuffleUnit(16), ShuffleUnit(16)
        self.conv = _cbr(16, 24)
        self.head = _Head(24)

    def forward(self, x):
        return self.head(self.conv(self.unit2(self.unit1(self.stem(x)))))


@_register("shuffle_split", "ShuffleNetV2 channel split (torch.chunk → an equal ONNX Split, `num_outputs` under the "
                            "dynamo exporter) and channel shuffle; the dynamo export was accepted by analysis and refused "
                            "by the rewriter ('an equal split would become unequal')")
def _shuffle_split():
    return ShuffleSplit(), (torch.randn(2, 3, 8, 8),)


# ------------------------------------------------------------------------------------------ (b) window partition
class WindowAttention(nn.Module):
    """Multi-head self-attention over the tokens of a window (qkv in one Linear, SDPA, output projection)."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class WindowHybrid(nn.Module):
    """Conv stem, then MaxViT/Swin-style window partition `x.view(B, C, H//p, p, W//p, p)` (channel and spatial
    sizes in one shape literal), window attention, window reverse, conv head."""

    def __init__(self, c: int = 16, p: int = 4):
        super().__init__()
        self.p = p
        self.stem = _cbr(3, c, 3)
        self.attn = WindowAttention(c, 2)
        self.conv = _cbr(c, 24)
        self.head = _Head(24)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        p = self.p
        t = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(-1, p * p, c)
        t = self.attn(t)
        t = t.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return self.head(self.conv(x + t))


@_register("window_hybrid", "conv/attention hybrid with a MaxViT-style window partition whose view mixes the channel "
                            "and spatial sizes and a fused qkv unbound into q, k, v (Split + Squeeze); the q/k/v "
                            "selector passed the analysis-time dry run and the final onnxruntime check refused it")
def _window_hybrid():
    return WindowHybrid(), (torch.randn(2, 3, 8, 8),)


# ------------------------------------------------------------------------------------------ (f) MaxViT-like
class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    """MaxViT's MBConv: pre-BN, 1x1 expand, strided depthwise 3x3, squeeze-excitation, 1x1 project; the
    shortcut is average-pool + 1x1 conv."""

    def __init__(self, cin: int, cout: int, expand: int = 2, stride: int = 2):
        super().__init__()
        mid = cin * expand
        self.proj = nn.Sequential(nn.AvgPool2d(3, stride, 1), nn.Conv2d(cin, cout, 1))
        self.layers = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid),
                                    nn.GELU(), nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
                                    nn.BatchNorm2d(mid), nn.GELU(), SqueezeExcite(mid, cin // 2),
                                    nn.Conv2d(mid, cout, 1))

    def forward(self, x):
        return self.proj(x) + self.layers(x)


class RelPosAttention(nn.Module):
    """torchvision MaxViT's RelativePositionalMultiHeadAttention: qkv chunked in three, heads from stored ints,
    einsum products, a relative position bias table gathered by an index buffer."""

    def __init__(self, c: int, head_dim: int, p: int):
        super().__init__()
        self.n_heads, self.head_dim, self.p = c // head_dim, head_dim, p
        self.to_qkv = nn.Linear(c, 3 * c)
        self.merge = nn.Linear(c, c)
        self.table = nn.Parameter(torch.randn((2 * p - 1) ** 2, self.n_heads) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (p - 1)
        self.register_buffer("index", (rel[:, :, 0] * (2 * p - 1) + rel[:, :, 1]).flatten())

    def forward(self, x):
        b, g, n, d = x.shape
        h, dh = self.n_heads, self.head_dim
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(b, g, n, h, dh).permute(0, 1, 3, 2, 4)
        k = k.reshape(b, g, n, h, dh).permute(0, 1, 3, 2, 4)
        v = v.reshape(b, g, n, h, dh).permute(0, 1, 3, 2, 4)
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        att = F.softmax(torch.einsum("BGHID,BGHJD->BGHIJ", q * dh ** -0.5, k) + bias, dim=-1)
        out = torch.einsum("BGHIJ,BGHJD->BGHID", att, v).permute(0, 1, 3, 2, 4).reshape(b, g, n, d)
        return self.merge(out)


class PartitionAttention(nn.Module):
    """Window ("window") or grid ("grid") partition, channels-last LayerNorm, attention, MLP, departition."""

    def __init__(self, c: int, p: int, kind: str):
        super().__init__()
        self.p, self.kind = p, kind
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = RelPosAttention(c, 8, p)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        b, c, hh, ww = x.shape
        p = self.p
        if self.kind == "window":  # torchvision WindowPartition
            t = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1)
        else:  # grid: the windows are strided across the image
            t = x.reshape(b, c, p, hh // p, p, ww // p).permute(0, 3, 5, 2, 4, 1)
        t = t.reshape(b, (hh // p) * (ww // p), p * p, c)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        t = t.reshape(b, hh // p, ww // p, p, p, c)
        t = t.permute(0, 5, 1, 3, 2, 4) if self.kind == "window" else t.permute(0, 5, 3, 1, 4, 2)
        return t.reshape(b, c, hh, ww)


class MaxViTLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.mbconv = MBConv(16, 32)
        self.window = PartitionAttention(32, 2, "window")
        self.grid = PartitionAttention(32, 2, "grid")
        self.head = _Head(32)

    def forward(self, x):
        return self.head(self.grid(self.window(self.mbconv(self.stem(x)))))


@_register("maxvit_like", "MaxViT-like stage: MBConv (strided depthwise, squeeze-excitation, pooled shortcut), window "
                          "and grid partition attention with a relative position bias table gathered by a buffer; "
                          "the torch model pruned through the bridge disagreed with the pruned ONNX")
def _maxvit_like():
    return MaxViTLike(), (torch.randn(2, 3, 8, 8),)


# ------------------------------------------------------------------------------------------ (c) 2-D RoPE ViT
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """timm's interleaved rotation: dims (2i, 2i + 1) -> (-x[2i + 1], x[2i])."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


class RopeAttention(nn.Module):
    """Attention with 2-D rotary position embeddings (EVA / RoPE-ViT style): the first half of every head's dims
    rotates with the row position, the second half with the column position (rotate-half on q and k); cos/sin
    tables are buffers."""

    def __init__(self, c: int, heads: int, grid: int, rotate=rotate_half):
        super().__init__()
        self.heads, self.head_dim, self.rotate = heads, c // heads, rotate
        self.causal = False
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        quarter = self.head_dim // 4
        freqs = 1.0 / (100 ** (torch.arange(quarter) / quarter))
        pos = torch.arange(grid, dtype=torch.float32)
        rows, cols = pos.repeat_interleave(grid), pos.repeat(grid)  # token t = (t // grid, t % grid)
        ang = torch.cat([torch.outer(rows, freqs).repeat(1, 2), torch.outer(cols, freqs).repeat(1, 2)], dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def rope(self, t: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2  # rows: dims [0, half), columns: [half, head_dim)
        cos, sin = self.cos, self.sin
        a, b = t[..., :half], t[..., half:]
        a = a * cos[:, :half] + self.rotate(a) * sin[:, :half]
        b = b * cos[:, half:] + self.rotate(b) * sin[:, half:]
        return torch.cat((a, b), dim=-1)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        causal = self.causal or q.shape[-2] == 1  # a flag computed from sizes: a Tensor under the TorchScript tracer
        x = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=causal)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class RopeViT(nn.Module):
    def __init__(self, c: int = 32, grid: int = 4, rotate=rotate_half):
        super().__init__()
        self.patch = nn.Conv2d(3, c, 4, 4)
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = RopeAttention(c, 2, grid, rotate)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.fc(x.mean(1))


@_register("rope_vit", "vision transformer with 2-D rotary position embeddings (rotate-half on q and k, per axis); "
                       "its dynamo export made analysis die with 'RecursionError: cyclic composite channel id' and its "
                       "torch path with 'scaled_dot_product_attention(): argument is_causal must be bool'")
def _rope_vit():
    return RopeViT(), (torch.randn(2, 3, 16, 16),)


@_register("rope_vit_pairs", "the same with timm's interleaved rotation (`stack([-x[..., 1::2], x[..., ::2]], -1)"
                             ".reshape(x.shape)`): pairs of adjacent dims rotate together")
def _rope_vit_pairs():
    return RopeViT(rotate=rotate_pairs), (torch.randn(2, 3, 16, 16),)


# ------------------------------------------------------------------------------------------ (d) LayerScale
class LayerScaleBlock(nn.Module):
    """ConvNeXt/CaiT-style LayerScale: 1-D free parameters reshaped (or unsqueezed) in forward."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = _cbr(c, c, 3), nn.Conv2d(c, c, 1)
        self.scale = nn.Parameter(torch.rand(c) + 0.5)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        x = x + self.scale.reshape(-1, 1, 1) * self.conv1(x)
        return x + self.gamma.unsqueeze(-1).unsqueeze(-1) * self.conv2(x)


class StoredDimScale(nn.Module):
    """LayerScale reshaped by its stored width (`self.beta.view(self.dim, 1, 1)`): a size literal in the graph,
    a Python int in the torch module."""

    def __init__(self, c: int):
        super().__init__()
        self.dim = c
        self.conv = _cbr(c, c, 3)
        self.beta = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x + self.beta.view(self.dim, 1, 1) * self.conv(x)


class LayerScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.block = LayerScaleBlock(16)
        self.conv = _cbr(16, 24)
        self.block2 = StoredDimScale(24)
        self.head = _Head(24)

    def forward(self, x):
        return self.head(self.block2(self.conv(self.block(self.stem(x)))))


@_register("layer_scale", "LayerScale: `self.scale.reshape(-1, 1, 1) * x`, `self.gamma.unsqueeze(-1).unsqueeze(-1) "
                          "* x` and `self.beta.view(self.dim, 1, 1) * x`; the torch path's pruned module failed in "
                          "forward ('shape [64, 1, 1] is invalid for input of size ...')")
def _layer_scale():
    return LayerScaleNet(), (torch.randn(2, 3, 8, 8),)


# ------------------------------------------------------------------------------------------ (e) stored widths
class Res2Block(nn.Module):
    """Res2Net/CSP-style: forward splits by channel counts held as Python ints (`torch.split(x, self.width, 1)`,
    `x.split((self.c1, self.c2), 1)`), so a cut that changes those sizes must also change the ints."""

    def __init__(self, c: int = 24, scale: int = 3):
        super().__init__()
        self.width, self.scale = c // scale, scale
        self.c1, self.c2 = 8, c - 8
        self.convs = nn.ModuleList(_cbr(self.width, self.width, 3) for _ in range(scale - 1))
        self.fuse = _cbr(c, c)
        self.part = _cbr(self.c2, self.c2)
        self.out = _cbr(c, c)

    def forward(self, x):
        spx = torch.split(x, self.width, 1)
        outs, sp = [], spx[0]
        for i, conv in enumerate(self.convs):
            sp = conv(sp if i == 0 else sp + spx[i])
            outs.append(sp)
        y = self.fuse(torch.cat([*outs, spx[-1]], 1))
        a, b = y.split((self.c1, self.c2), 1)  # CSP: one part passes through, the other is transformed
        return self.out(torch.cat((a, self.part(b)), 1))


class StoredWidths(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 24, 3)
        self.block = Res2Block()
        self.head = _Head(24)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


@_register("stored_widths", "forward code holding channel counts as Python ints (Res2Net `torch.split(x, self.width, "
                            "1)`, a CSP split into parts of stored sizes): the ONNX cut rewrites the size literals, the "
                            "torch module kept its old ints and failed or disagreed")
def _stored_widths():
    return StoredWidths(), (torch.randn(2, 3, 8, 8),)
