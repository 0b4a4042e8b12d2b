"""The pieces the stages' memory estimates are made of (each method's ``memory_needed`` hook, checked by
compressor.recipe.check_memory before anything runs). Bytes on top of the model already in memory; deliberately
simple upper-bound arithmetic on the model's footprint, not measurements: the check is there to refuse a run that
cannot fit (a 7 B model on a 24 GB machine), not to predict peaks to the megabyte.

Not a method module (the leading underscore keeps compressor.methods from loading it as one).
"""

from __future__ import annotations

from compressor.masks import RANK_BYTES_PER_WEIGHT
from compressor.utils.memory import Footprint


def training(fp: Footprint, optimizer: str = "sgd", momentum: float = 0.9) -> int:
    """Training in fp32: gradients, the optimizer's state (SGD momentum: one buffer; Adam: two), and an fp32
    cast of a half-precision model."""
    state = 2 if optimizer in ("adam", "adamw") else (1 if momentum else 0)
    upcast = max(0, fp.fp32_bytes - fp.param_bytes)
    return fp.fp32_bytes * (1 + state) + upcast


def masks(fp: Footprint) -> int:
    """Boolean masks over every weight."""
    return fp.n_params




def ranking(fp: Footprint, scope: str = "global") -> int:
    """Magnitude selection, global or layer-wise: one tensor's scratch, plus the boolean masks of all, twice (the
    new masks, and the copies compressor.masks.apply_masks keeps on the model as parametrizations)."""
    return RANK_BYTES_PER_WEIGHT * (fp.largest_bytes // 4) + 2 * masks(fp)


def onnx_export(fp: Footprint) -> int:
    """A verified ONNX export: a plain fp32 copy of the module, the ONNX graph with its initializers, and the
    onnxruntime session that checks it, plus half a copy of the exporter's and the session's working memory.
    Measured: essential-sparsity's `export: both` on a 4.4 GB fp32 1.1 B model (masked: 1 byte a weight more)
    peaked at 19.6 GB, 14.2 GB above the model and its masks (3.2x); 3x had been the estimate."""
    return 7 * fp.fp32_bytes // 2


def quantized_export(fp: Footprint, formats: int) -> int:
    """Each quantized ONNX file on top of the fp32 export: the quantized graph (its fp32 master weights are still
    held while it is written) and the onnxruntime session that verifies it. Measured: the int8-export recipe on a
    4.4 GB fp32 model passed 23 GB RSS and was killed (benchmarks/llm_scale.py, step int8) under the older
    estimate that counted the fp32 export only."""
    return 2 * fp.fp32_bytes * formats


def model_copy(fp: Footprint) -> int:
    return fp.param_bytes
