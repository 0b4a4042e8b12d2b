"""Inference modules that hold a pruned weight in a sparse format and pick that format per device.

``SparseLinear.from_dense(linear, device=..., mode="auto")`` turns an ``nn.Linear`` whose weight has exact
zeros (magnitude or N:M pruning, masks baked or still parametrized) into a module computing the same
``x @ W.T + b`` with a CSR / BSR / 2:4 / dense weight, chosen by :func:`compressor.kernels.calibrate.choose_format`.
``to_linear()`` gives the plain ``nn.Linear`` back (for export or training). Inference only: no gradients.

``SparseConv2d`` does a groups=1 convolution as im2col (``F.unfold``) followed by a CSR matmul. The unfold
copies the input k*k times, so it pays only for large kernels at very high sparsity; it is never chosen by
the default table, only when calibration measures a win (see docs/kernels.md for the figures).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from compressor.kernels import calibrate as KC
from compressor.kernels import formats as KF


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as ``fmt`` (dense | csr | bsr | semi24)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, fmt: str, *, device=None, dtype: torch.dtype | None = None,
                 block: int = 16, decision: KC.Decision | None = None):
        super().__init__()
        KF.check_format(fmt)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.fmt = fmt
        self.block = block
        self.decision = decision
        self.compute_dtype = dtype or weight.dtype
        self.alg_id = int((decision.options if decision is not None else {}).get("alg_id") or 0)
        packed = KF.pack(weight, fmt, device=device, dtype=self.compute_dtype, block=block, alg_id=self.alg_id)
        if fmt == "semi24":  # tensor subclass: kept as a frozen parameter, the layout torch's docs use
            self.weight = nn.Parameter(packed, requires_grad=False)
        else:
            self.register_buffer("weight", packed)
        b = bias.detach().to(device=packed.device, dtype=self.compute_dtype) if bias is not None else None
        self.register_buffer("bias", b)
        self.sparsity = KF.sparsity(weight)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, linear: nn.Linear, *, device=None, mode: str = "auto", rows: int = 128,
                   half: torch.dtype | None = torch.bfloat16, block: int = 16,
                   cache: KC.DecisionCache | None = None) -> SparseLinear:
        """Build from a (pruned) ``nn.Linear``; ``mode``: auto | calibrate | default | a format name."""
        w = linear.weight.detach()  # the masked value when the weight is parametrized
        device = torch.device(device) if device is not None else w.device
        w = w.to(device)
        d = KC.choose_format(w, device, rows=rows, mode=mode, half=half, block=block, cache=cache)
        dt = KC.compute_dtype(device, d.format, w.dtype, half)
        return cls(w, linear.bias, d.format, device=device, dtype=dt, block=block, decision=d)

    def dense_weight(self) -> Tensor:
        return KF.dense_of(self.weight, self.fmt)

    # state_dict holds the plain dense weight/bias under nn.Linear's names: a swapped model saves and loads
    # exactly like the original architecture (and tools that call .contiguous() on state tensors keep working)
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight().detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        w = state_dict[key]
        if tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: {tuple(w.shape)} vs {(self.out_features, self.in_features)}")
            return
        dev = self.dense_weight().device
        packed = KF.pack(w, self.fmt, device=dev, dtype=self.compute_dtype, block=self.block, alg_id=self.alg_id)
        if self.fmt == "semi24":
            self.weight = nn.Parameter(packed, requires_grad=False)
        else:
            self._buffers["weight"] = packed
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias.copy_(state_dict[prefix + "bias"].to(self.bias.dtype))
            elif strict:
                missing_keys.append(prefix + "bias")
        self.sparsity = KF.sparsity(w)

    def __deepcopy__(self, memo):
        # sparse CSR/BSR and 2:4 tensors have no storage to deep-copy: rebuild from the dense weight
        with torch.no_grad():
            new = SparseLinear(self.dense_weight().clone(), self.bias.clone() if self.bias is not None else None, self.fmt,
                               dtype=self.compute_dtype, block=self.block, decision=self.decision)
        new.train(self.training)
        memo[id(self)] = new
        return new

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        w = self.dense_weight()
        dtype = dtype or w.dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=dtype)
        lin.weight.copy_(w.to(dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias.to(dtype))
        return lin

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        in_dtype = x2.dtype
        if in_dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        if self.fmt == "semi24" and x2.shape[0] == 0:
            y = x2.new_zeros(0, self.out_features)
        else:
            y = KF.linear(x2, self.weight, self.fmt, self.bias)
        if y.dtype != in_dtype:
            y = y.to(in_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"sparsity={self.sparsity:.3f}, dtype={str(self.compute_dtype).replace('torch.', '')}")


class SparseConv2d(nn.Module):
    """groups=1 ``nn.Conv2d`` as ``unfold`` + CSR matmul (``fmt`` "csr") or plain conv (``fmt`` "dense")."""

    def __init__(self, conv: nn.Conv2d, fmt: str = "csr"):
        super().__init__()
        if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("SparseConv2d supports groups=1 with numeric zero padding only")
        if fmt not in ("dense", "csr"):
            raise ValueError("SparseConv2d formats: dense, csr")
        w = conv.weight.detach()
        self.fmt = fmt
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.sparsity = KF.sparsity(w)
        self.register_buffer("weight", w.reshape(w.shape[0], -1).to_sparse_csr() if fmt == "csr" else w.clone())
        self.register_buffer("bias", conv.bias.detach().clone() if conv.bias is not None else None)
        self._wshape = tuple(w.shape)

    def __deepcopy__(self, memo):
        new = SparseConv2d(self.to_conv(), self.fmt)
        memo[id(self)] = new
        return new

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        o, i, kh, kw = self._wshape
        conv = nn.Conv2d(i, o, (kh, kw), self.stride, self.padding, self.dilation, bias=self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)
        conv.weight.copy_(KF.dense_of(self.weight, self.fmt).reshape(self._wshape))
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: Tensor) -> Tensor:
        if self.fmt == "dense":
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [N, C*k*k, L]
        cols = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)  # [C*k*k, N*L]
        y = torch.sparse.mm(self.weight, cols) if self.bias is None else torch.addmm(self.bias.unsqueeze(1), self.weight, cols)
        return y.reshape(self.out_channels, n, oh, ow).permute(1, 0, 2, 3).contiguous()

    def extra_repr(self) -> str:
        return f"{self._wshape}, fmt={self.fmt}, sparsity={self.sparsity:.3f}, stride={self.stride}, padding={self.padding}"
