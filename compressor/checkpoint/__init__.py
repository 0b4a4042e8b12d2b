"""Hugging Face checkpoint folders handled tensor by tensor, without loading the model (docs/structured.md,
"Large checkpoints"): streaming importance, structured cuts into new shards, and verification.

The names below are imported on first use, so the numpy-only worker (compressor.checkpoint.sums_worker) starts
without torch."""

__all__ = ["checkpoint_scores", "prune_checkpoint", "streamable"]


def __getattr__(name: str):
    if name in __all__:
        from compressor.checkpoint import prune

        return getattr(prune, name)
    raise AttributeError(f"module 'compressor.checkpoint' has no attribute {name!r}")
