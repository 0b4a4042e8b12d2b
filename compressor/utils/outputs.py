"""The first tensor of a model output: what every quality measure and the data batches compare."""

from __future__ import annotations

from torch import Tensor


def first_tensor(out) -> Tensor:
    """The first tensor of a model output (a tensor, a tuple, or a Hugging Face ModelOutput)."""
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    return out[0]
