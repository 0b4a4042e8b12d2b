"""Uniform bucketed quantizer (Polino et al. 2018) and its exact integer form.

`quantize_tensor(v, bits, bucket_size)` returns a `QuantizedTensor`: integer codes per bucket plus the
per-bucket scale (and offset), i.e. exactly what an export writes. `quantize(...)` is the fake-quant value
(codes de-scaled back to float), the tensor a quantized model computes with.

Scalings:
* ``linear`` (the paper's default): per bucket β = min, α = max − min (α < 1e-10 → 1), s = 2^b levels
  on the grid β + α·{0, 1/(s−1), …, 1}. Stored as codes ∈ [0, s−1], scale = α/(s−1), offset = β, and the
  value is ``codes * scale + offset``.
* ``absmax`` (sign-magnitude, implemented cleanly — the reference has a bug here): per bucket m = max|v|,
  L = 2^(b−1) − 1 magnitude levels, codes ∈ [−L, L], value ``codes * m/L`` (2^b − 1 levels, zero exact,
  no offset: this is the layout ONNX DequantizeLinear takes directly with a zero point of 0).

* ``affine`` (deployment form, not in the paper): the min-max range widened to include 0, scale =
  range/(s−1) and an *integer* zero point zp ∈ [0, s−1]; value ``(codes − zp) * scale``. This is what ONNX
  DequantizeLinear and onnxruntime's fast MatMulNBits kernels (uint8 zero points) compute natively. The
  price: the integer zero point shifts the grid by up to half a step, so the error bound is one step
  (scale), not half.

Bucket layouts:
* ``flat`` (paper): flatten the tensor, cut it into runs of `bucket_size` (the tail padded with copies of
  the last element; a tensor smaller than a bucket is one short bucket).
* ``row``: buckets never cross an output channel: each row of ``v.reshape(v.shape[0], -1)`` is cut into
  runs of `bucket_size` (each row's tail padded with copies of its last element). This is the block layout
  of ONNX blocked quantization and of onnxruntime's MatMulNBits, so a `row` model exports exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from compressor.errors import InputError

SUPPORTED_BITS = range(2, 9)
Scaling = Literal["linear", "absmax", "affine"]
Layout = Literal["flat", "row"]


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise InputError(f"unsupported bit width {bits!r}", "use an integer number of bits from 2 to 8")


def num_levels(bits: int, scaling: str = "linear") -> int:
    """Number of distinct values per bucket: 2^b (linear, affine) or 2^b − 1 (absmax, symmetric)."""
    check_bits(bits)
    return 2**bits - 1 if scaling == "absmax" else 2**bits


def compression_ratio(bits: float, bucket_size: int | None, numel: int | None = None) -> float:
    """fp32 bits / stored bits: k·32 / (k·b + 64) (two fp32 scalars per bucket), the paper's formula."""
    if bucket_size is None:
        if numel is None:
            return 32.0 / bits
        return numel * 32 / (numel * bits + 64)
    return bucket_size * 32 / (bucket_size * bits + 64)


@dataclass
class QuantizedTensor:
    """Integer form of one quantized tensor. Value = codes·scale + offset (uniform) or
    codebook[codes]·scale + offset (non-uniform, differentiable quantization), per bucket row.

    codes: int16 [n_buckets, k] (padding included); scale, offset: float32 [n_buckets] (offset None for
    absmax); shape: the original tensor shape; layout/bucket: how buckets map to the tensor.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    shape: tuple[int, ...]
    bits: int
    layout: str
    bucket: int  # effective bucket length k (columns of `codes`)
    scaling: str = "linear"
    codebook: torch.Tensor | None = None  # [s] points in [0, 1] (non-uniform variant)
    zero_point: torch.Tensor | None = None  # integer zero point per bucket (affine scaling)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def dequantize(self) -> torch.Tensor:
        if self.zero_point is not None:
            vals = (self.codes - self.zero_point[:, None]).float() * self.scale[:, None]
        elif self.codebook is not None:
            vals = self.codebook[self.codes.long()] * self.scale[:, None]
        else:
            vals = self.codes.float() * self.scale[:, None]
        if self.offset is not None:
            vals = vals + self.offset[:, None]
        return unbucket(vals, self.shape, self.layout, self.bucket)

    def storage_bits(self) -> int:
        """Bits to store: b per weight + fp32 scale (+ fp32 offset) per bucket (+ the codebook)."""
        per_bucket = 32 * (1 if self.offset is None else 2) + (self.bits if self.zero_point is not None else 0)
        extra = 32 * self.codebook.numel() if self.codebook is not None else 0
        return self.numel * self.bits + self.scale.numel() * per_bucket + extra


def bucketize(v: torch.Tensor, bucket_size: int | None, layout: str = "flat") -> tuple[torch.Tensor, int]:
    """View `v` as rows of k values (padded with copies of the last element); returns (rows, k)."""
    if layout not in ("flat", "row"):
        raise InputError(f"unknown bucket layout {layout!r}", "use 'flat' (paper) or 'row' (ONNX block layout)")
    if bucket_size is not None and (not isinstance(bucket_size, int) or bucket_size < 1):
        raise InputError(f"bucket size must be a positive integer or None, got {bucket_size!r}", "e.g. bucket_size: 256")
    if v.numel() == 0:
        raise InputError("cannot quantize an empty tensor", "remove it from the quantized set")
    rows = v.reshape(1, -1) if (layout == "flat" or v.dim() < 2) else v.reshape(v.shape[0], -1)
    n = rows.shape[1]
    k = n if bucket_size is None else min(bucket_size, n)
    pad = (-n) % k
    if pad:
        rows = torch.cat([rows, rows[:, -1:].expand(rows.shape[0], pad)], dim=1)
    return rows.reshape(-1, k), k


def unbucket(b: torch.Tensor, shape: tuple[int, ...], layout: str, k: int) -> torch.Tensor:
    n_total = 1
    for d in shape:
        n_total *= d
    if layout == "flat" or len(shape) < 2:
        return b.reshape(-1)[:n_total].reshape(shape)
    rows = shape[0]
    return b.reshape(rows, -1)[:, : n_total // rows].reshape(shape)


def _round(x: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    if not stochastic:
        return torch.round(x)  # half to even; exact .5 only arises on ties, never biases the grid
    low = torch.floor(x)
    frac = x - low
    r = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) if generator is not None else torch.rand_like(x)
    return low + (r < frac).to(x.dtype)


@torch.no_grad()
def quantize_tensor(v: torch.Tensor, bits: int, bucket_size: int | None = 256, *, scaling: str = "linear",
                    layout: str = "flat", stochastic: bool = False, generator: torch.Generator | None = None) -> QuantizedTensor:
    """Quantize `v` to `bits` bits per value, one scale (and offset) per bucket."""
    check_bits(bits)
    if scaling not in ("linear", "absmax", "affine"):
        raise InputError(f"unknown scaling {scaling!r}", "use 'linear' (paper, min-max), 'absmax' (symmetric) or 'affine' (integer zero point)")
    shape = tuple(v.shape)
    b, k = bucketize(v.detach().float(), bucket_size, layout)
    if scaling == "linear":
        s = 2**bits
        lo = b.min(dim=1).values
        alpha = b.max(dim=1).values - lo
        alpha = torch.where(alpha < 1e-10, torch.ones_like(alpha), alpha)
        u = (b - lo[:, None]) / alpha[:, None]
        codes = _round(u * (s - 1), stochastic, generator).clamp_(0, s - 1)
        scale, offset = alpha / (s - 1), lo
    elif scaling == "affine":
        s = 2**bits
        lo = b.min(dim=1).values.clamp(max=0)
        hi = b.max(dim=1).values.clamp(min=0)
        scale = (hi - lo) / (s - 1)
        scale = torch.where(scale < 1e-10, torch.ones_like(scale), scale)
        zp = torch.round(-lo / scale).clamp_(0, s - 1)
        codes = (_round(b / scale[:, None], stochastic, generator) + zp[:, None]).clamp_(0, s - 1)
        return QuantizedTensor(codes.to(torch.int16), scale.float(), None, shape, bits, layout, k, scaling, zero_point=zp.to(torch.int16))
    else:
        levels = 2 ** (bits - 1) - 1
        m = b.abs().max(dim=1).values
        m = torch.where(m < 1e-10, torch.ones_like(m), m)
        codes = _round(b / m[:, None] * levels, stochastic, generator).clamp_(-levels, levels)
        scale, offset = m / levels, None
    return QuantizedTensor(codes.to(torch.int16), scale.float(), None if offset is None else offset.float(), shape, bits,
                           layout, k, scaling)


def quantize(v: torch.Tensor, bits: int, bucket_size: int | None = 256, *, scaling: str = "linear", layout: str = "flat",
             stochastic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fake-quant value of `v` (same shape and dtype): what the quantized model computes with."""
    q = quantize_tensor(v, bits, bucket_size, scaling=scaling, layout=layout, stochastic=stochastic, generator=generator)
    return q.dequantize().to(v.dtype)
