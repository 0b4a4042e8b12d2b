"""SaRA: sparse low-rank fine-tuning of the smallest-magnitude weights (Hu et al., ICLR 2025; docs/sara.md).

    from compressor.sara import SaRAOptimizer, save_adaptation, load_adaptation
    opt = SaRAOptimizer(model, fraction=0.1, lambda_rank=5e-4, progressive_step=500)
    compressor.train.train(model, data.train, steps=1000, optimizer=opt, cosine=True)
    save_adaptation(opt.adapter, "sara.safetensors")   # threshold + values + base fingerprints
    opt.adapter.merge()                                 # ordinary weights again, ready for export
"""

from compressor.sara.checkpoint import load_adaptation, read_adaptation, save_adaptation
from compressor.sara.core import (
    SaRAAdapter,
    SaRAOptimizer,
    Selection,
    SparseDelta,
    default_lr,
    fingerprint,
    select,
    state_bytes,
    threshold_for_fraction,
)

__all__ = [
    "SaRAAdapter",
    "SaRAOptimizer",
    "Selection",
    "SparseDelta",
    "default_lr",
    "fingerprint",
    "load_adaptation",
    "read_adaptation",
    "save_adaptation",
    "select",
    "state_bytes",
    "threshold_for_fraction",
]
