"""Print `name==version` for the lower bounds pyproject.toml declares for the packages named on the command
line: `make test-min` installs exactly these, so the bounds it tests cannot drift from the ones declared.

Usage: python scripts/min_pins.py onnx onnxruntime transformers torch-pruning
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def lower_bounds(text: str) -> dict[str, str]:
    """{package: version} for every `"package>=version..."` requirement string (main and extra dependencies)."""
    return {name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)', text)}


def main(names: list[str]) -> int:
    bounds = lower_bounds(PYPROJECT.read_text(encoding="utf-8"))
    missing = [n for n in names if n.lower() not in bounds]
    if missing:
        print(f"no '>=' lower bound in pyproject.toml for: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(" ".join(f"{n}=={bounds[n.lower()]}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
