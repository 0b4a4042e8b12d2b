"""One exception family for everything a user can get wrong.

The CLI prints ``str(err)`` in red and exits 2; no traceback is shown for these.
Anything that is *not* a CompressorError is a bug in compressor and keeps its traceback.
"""

from __future__ import annotations


class CompressorError(Exception):
    """A user-facing error: a one-line cause and, when we know it, the fix."""

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if not fix else f"{message} — {fix}")


class InputError(CompressorError):
    """Bad model / data / path given by the user."""


class RecipeError(CompressorError):
    """A recipe that does not validate or cannot run on this model."""


class VerificationError(CompressorError):
    """An exported or transformed model does not match the model it came from."""
