"""Include/exclude name globs: the one meaning of a recipe's ``include:`` / ``exclude:`` in every method.

A pattern (fnmatch, case-sensitive: ``*`` ``?`` ``[seq]``) selects a parameter when it matches the parameter's
full name (``encoder.layer.0.output.dense.weight``) OR the name of the module that holds it
(``encoder.layer.0.output.dense``). So ``exclude: [fc]`` keeps the layer ``fc`` (its weight and bias) dense in
magnitude pruning, SaRA and the sparse-kernel swap alike, and ``include: ["*.weight"]`` selects weights only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from compressor.utils.names import module_name_of

PATTERN_HELP = ("glob patterns (fnmatch) matched against a parameter's full name ('fc1.weight') or its module's "
                "name ('fc1')")


def matches(name: str, patterns: Iterable[str] | None) -> bool:
    """True when a pattern matches the parameter `name` or the module that holds it (see the module docstring).
    No patterns match nothing."""
    if not patterns:
        return False
    module = module_name_of(name)
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module, p) for p in patterns)


def selected(name: str, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> bool:
    """Whether the parameter `name` is selected: it matches `include` (None or empty: every name) and does not
    match `exclude`."""
    return (not include or matches(name, include)) and not matches(name, exclude)
