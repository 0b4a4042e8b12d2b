"""Recipe methods, one module per algorithm. Importing this package imports every module in it, and each
module registers its methods with compressor.recipe.register_method.

A method module that fails to import is a bug and raises with its traceback, with one exception: a missing
optional third-party package (ModuleNotFoundError for a module outside compressor). Then that module's methods
are unavailable, the other methods still load, and the reason is kept in IMPORT_ERRORS so a recipe asking
for one of its methods is told which package to install rather than "unknown method".
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Iterable

from compressor import recipe as _recipe


def import_method_modules(package: str, path: Iterable[str]) -> dict[str, str]:
    """Import every module of `package` (at `path`) whose name does not start with "_"; returns
    {module: reason} for those skipped because an optional third-party package is missing."""
    skipped: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{package}.{info.name}")
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if not missing or missing == "compressor" or missing.startswith(("compressor.", f"{package}.")):
                raise  # a module of this project is missing: a bug, not an optional dependency
            skipped[info.name] = f"{type(e).__name__}: {e} (install the '{missing.split('.')[0]}' package)"
            warnings.warn(f"compressor method module {info.name!r} skipped: {e}", stacklevel=2)
    return skipped


IMPORT_ERRORS: dict[str, str] = import_method_modules(__name__, __path__)
_recipe.IMPORT_ERRORS.update(IMPORT_ERRORS)
