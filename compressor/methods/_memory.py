"""The pieces the stages' memory estimates are made of (each method's ``memory_needed`` hook, checked by
compressor.recipe.check_memory before anything runs). Bytes on top of the model already in memory; deliberately
simple upper-bound arithmetic on the model's footprint, not measurements: the check is there to refuse a run that
cannot fit (a 7 B model on a 24 GB machine), not to predict peaks to the megabyte.

Not a method module (the leading underscore keeps compressor.methods from loading it as one).
"""

from __future__ import annotations

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


def global_scores(fp: Footprint) -> int:
    """Global magnitude selection: |w| of every weight concatenated (fp32), plus the masks."""
    return fp.fp32_bytes + masks(fp) + fp.largest_bytes


def onnx_export(fp: Footprint) -> int:
    """A verified ONNX export: a plain fp32 copy of the module, the ONNX graph with its initializers, and the
    onnxruntime session that checks it."""
    return 3 * fp.fp32_bytes


def model_copy(fp: Footprint) -> int:
    return fp.param_bytes
