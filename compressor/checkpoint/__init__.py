"""Hugging Face checkpoint folders handled tensor by tensor, without loading the model (docs/structured.md,
"Large checkpoints"): streaming importance, structured cuts into new shards, and verification."""

from compressor.checkpoint.prune import checkpoint_scores, prune_checkpoint, streamable

__all__ = ["checkpoint_scores", "prune_checkpoint", "streamable"]
