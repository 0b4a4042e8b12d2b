"""Recipe methods, one module per algorithm. Importing this package imports every module in it, and each
module registers its methods with compressor.recipe.register_method. A module that fails to import is
recorded (and reported when a recipe asks for one of its methods) instead of breaking every other method.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings

IMPORT_ERRORS: dict[str, str] = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_"):
        continue
    try:
        importlib.import_module(f"{__name__}.{_info.name}")
    except Exception as _e:  # noqa: BLE001 - reported, see docstring
        IMPORT_ERRORS[_info.name] = f"{type(_e).__name__}: {_e}"
        warnings.warn(f"compressor method module {_info.name!r} failed to import: {_e}", stacklevel=1)
