"""Sparse kernels and their dispatch: formats, break-even calibration, SparseLinear, the in-place swap,
compact sparse ONNX storage and GPU-ready evaluation helpers. See docs/kernels.md.

(The measuring function is ``compressor.kernels.calibrate.calibrate``; it is not re-exported here so that
``compressor.kernels.calibrate`` stays the module.)"""

from compressor.kernels.calibrate import DEFAULT_TABLE, Decision, DecisionCache, choose_format
from compressor.kernels.sparse_linear import SparseConv2d, SparseLinear
from compressor.kernels.swap import SwapReport, swap_sparse_kernels, unswap_sparse_kernels

__all__ = [
    "DEFAULT_TABLE", "Decision", "DecisionCache", "SparseConv2d", "SparseLinear", "SwapReport",
    "choose_format", "swap_sparse_kernels", "unswap_sparse_kernels",
]
