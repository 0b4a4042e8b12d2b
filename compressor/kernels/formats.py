"""Weight storage formats for sparse inference and what each one needs.

Formats (the name is what reports and the break-even table use):

* ``dense``  — the plain strided weight; ``F.linear``. Always available, the reference.
* ``csr``    — ``torch.sparse_csr`` (any device). ``y = (W_csr @ x.T).T + b`` via ``torch.addmm``; on CPU
  this is MKL's sparse×dense. Pays only at high unstructured sparsity (see ``calibrate.DEFAULT_TABLE``).
* ``bsr``    — ``torch.sparse_bsr`` with square blocks. Pays only when whole blocks are zero (block
  pruning); with unstructured zeros almost no block is empty and it is slower than dense.
* ``semi24`` — 2:4 semi-structured (``torch.sparse.to_sparse_semi_structured``), CUDA only, fp16/bf16,
  compute capability >= 8.0, shapes a multiple of the backend's minimum tile (see :func:`semi24_support`).

Layouts are for ``nn.Linear`` weights ``[out_features, in_features]``; N:M groups run along ``in_features``
(the contracted axis), which is what the 2:4 hardware needs and what ``compressor.masks.nm_masks`` makes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

FORMATS = ("dense", "csr", "bsr", "semi24")
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class WeightStats:
    shape: tuple[int, ...]
    sparsity: float  # fraction of exact zeros
    is_24: bool  # every group of 4 consecutive inputs has <= 2 non-zeros
    block_size: int
    block_sparsity: float  # fraction of all-zero (block_size x block_size) blocks (0 when shape does not tile)


def sparsity(w: Tensor) -> float:
    return 1.0 - float(torch.count_nonzero(w)) / max(w.numel(), 1)


def is_semi_structured_24(w: Tensor) -> bool:
    """True when every group of 4 consecutive entries along the last axis holds at most 2 non-zeros."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    nz = (w.detach() != 0).reshape(w.shape[0], -1, 4).sum(-1)
    return bool((nz <= 2).all())


def block_sparsity(w: Tensor, block: int) -> float:
    """Fraction of (block x block) tiles that are entirely zero; 0.0 when the shape does not tile."""
    if w.dim() != 2 or w.shape[0] % block or w.shape[1] % block:
        return 0.0
    o, i = w.shape
    tiles = (w.detach() != 0).reshape(o // block, block, i // block, block).any(3).any(1)
    return 1.0 - float(tiles.sum()) / tiles.numel()


def weight_stats(w: Tensor, block: int = 16) -> WeightStats:
    return WeightStats(tuple(w.shape), sparsity(w), is_semi_structured_24(w), block, block_sparsity(w, block))


# ----------------------------------------------------------------------------------------------------------
# 2:4 semi-structured: every requirement checked, each with a reason


def _semi24_backend() -> tuple[str, dict]:
    """(backend name, {dtype: (min_rows, min_cols)}) the installed torch uses for to_sparse_semi_structured."""
    from torch.sparse import semi_structured as ss

    cusparselt = bool(getattr(torch._C, "_has_cusparselt", False))
    if cusparselt and not ss.SparseSemiStructuredTensor._FORCE_CUTLASS:
        cls, name = ss.SparseSemiStructuredTensorCUSPARSELT, "cusparselt"
    else:
        cls, name = ss.SparseSemiStructuredTensorCUTLASS, "cutlass"
    table = {}
    for dt, c in getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}).items():
        table[dt] = (c.sparse_min_rows, c.sparse_min_cols)
    if not table:  # very old layout of the module: the documented conservative minimum
        table = {torch.float16: (32, 64), torch.bfloat16: (32, 64)}
    return name, table


def semi24_support(w: Tensor, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> tuple[bool, str]:
    """Can this weight run as 2:4 semi-structured on ``device`` in ``dtype``? (ok, reason when not)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, "2:4 semi-structured kernels are CUDA only"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    if dtype not in HALF_DTYPES:
        return False, f"2:4 needs fp16/bf16, not {dtype}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return False, f"compute capability {major}.{minor} < 8.0 (Ampere) has no sparse tensor cores"
    try:
        backend, table = _semi24_backend()
    except Exception as e:  # noqa: BLE001 - torch without the semi-structured module
        return False, f"torch.sparse.semi_structured unavailable: {e}"
    if backend == "cutlass" and major != 8:
        # torch's CUTLASS 2:4 kernels are compiled for sm8x only; sm90+ needs cuSPARSELt
        return False, f"cuSPARSELt is not in this torch build and the CUTLASS kernels are sm8x only (device is sm{major}{minor})"
    if w.dim() != 2:
        return False, "only 2-D weights"
    rows, cols = table.get(dtype, (32, 64))
    o, i = w.shape
    if o < rows or o % rows or i < cols or i % cols:
        return False, f"shape {tuple(w.shape)} is not a multiple of ({rows}, {cols}) for {backend}/{dtype}"
    if not is_semi_structured_24(w):
        return False, "weight is not 2:4 sparse along in_features (prune with pattern '2:4' first)"
    return True, backend


# ----------------------------------------------------------------------------------------------------------
# packing and the matmul each format uses


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        from compressor.errors import InputError

        raise InputError(f"unknown sparse format {fmt!r}", fix=f"use one of {', '.join(FORMATS)}")
    return fmt


def pack(w: Tensor, fmt: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
         block: int = 16, alg_id: int = 0) -> Tensor:
    """Convert a dense 2-D weight to ``fmt`` on ``device`` (default: its own) in ``dtype`` (default: its own).
    ``alg_id``: cuSPARSELt's matmul algorithm for a 2:4 weight (from :func:`cslt_search`; 0 = its default)."""
    check_format(fmt)
    w = w.detach().to(device=device or w.device, dtype=dtype or w.dtype).contiguous()
    if fmt == "dense":
        return w
    if fmt in ("csr", "bsr"):
        if fmt == "bsr" and (w.shape[0] % block or w.shape[1] % block):
            raise ValueError(f"shape {tuple(w.shape)} does not tile into {block}x{block} blocks")
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and tested here
            warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR) tensor support is in beta.*")
            return w.to_sparse_csr() if fmt == "csr" else w.to_sparse_bsr((block, block))
    ok, why = semi24_support(w, w.device, w.dtype)
    if not ok:
        raise ValueError(f"cannot use 2:4 semi-structured: {why}")
    from torch.sparse import to_sparse_semi_structured
    from torch.sparse.semi_structured import SparseSemiStructuredTensor

    if why == "cutlass":
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
    packed = to_sparse_semi_structured(w)
    if alg_id and hasattr(packed, "alg_id_cusparselt"):
        packed.alg_id_cusparselt = int(alg_id)
    return packed


def cslt_search(packed: Tensor, x2d: Tensor) -> tuple[int | None, str]:
    """cuSPARSELt's algorithm search for ``x2d @ W.T`` with the packed 2:4 ``W``: (alg_id, "") or (None, why not).

    torch runs cuSPARSELt's default algorithm (0) unless told otherwise; the search times its candidates on the
    real shapes (issue 13: 4096x11008 went from 0.7x to 1.0x of dense on an H200 only after it)."""
    search = getattr(torch, "_cslt_sparse_mm_search", None)
    if search is None:
        return None, "this torch build has no torch._cslt_sparse_mm_search"
    if getattr(packed, "packed", None) is None or not hasattr(packed, "alg_id_cusparselt"):
        return None, "the 2:4 weight does not use cuSPARSELt (CUTLASS backend)"
    try:
        return int(search(packed.packed, x2d.t())), ""
    except (RuntimeError, TypeError) as e:  # the op exists but this build/device refuses it
        return None, f"cuSPARSELt search failed: {str(e).splitlines()[0][:120]}"


def optional_24_paths() -> dict[str, str]:
    """Faster 2:4 paths this environment lacks, each with the reason it is not tried (empty when none)."""
    import importlib.util

    out = {}
    if importlib.util.find_spec("torchao") is None:
        out["torchao_24"] = "torchao is not installed (pip install torchao to try its 2:4 kernels)"
        out["fp8_24"] = "fp8 2:4 needs torchao (torch's own 2:4 tensors refuse fp8 matmul)"
    else:
        out["torchao_24"] = "torchao is installed but its 2:4 kernels are not wired into calibration yet"
        out["fp8_24"] = "torchao fp8 2:4 is not wired into calibration yet"
    return out


def linear(x2d: Tensor, packed: Tensor, fmt: str, bias: Tensor | None) -> Tensor:
    """``x2d @ W.T + bias`` for a 2-D input with the weight in ``fmt`` (output is [N, out])."""
    if fmt in ("dense", "semi24"):
        return F.linear(x2d, packed, bias)
    # sparse (CSR/BSR) x dense: compute (W @ x.T).T; MKL on CPU, cuSPARSE on CUDA
    xt = x2d.t().contiguous()
    if bias is None:
        return torch.sparse.mm(packed, xt).t()
    return torch.addmm(bias.unsqueeze(1), packed, xt).t()


def dense_of(packed: Tensor, fmt: str) -> Tensor:
    """The dense weight back from any format (for restoring nn.Linear / exporting)."""
    if fmt == "dense":
        return packed
    return packed.to_dense()
