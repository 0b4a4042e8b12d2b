"""Regenerate compressor/data/sentences.txt: English sentences from CPython 3.11 stdlib docstrings (PSF licence).

Deterministic for a given Python version. The shipped file is what tests and benchmarks use (calibration and
held-out text); run this only to rebuild it:  .venv/bin/python scripts/make_corpus.py
"""

import importlib
import inspect
import pkgutil
import re
import sys

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "venv", "pydoc", "test"}
CODE_LIKE = re.compile(r"[>{}\[\]=_/\\|`]|\.\.\.|::")


def keep(s: str) -> bool:
    """A prose sentence: 40–220 chars, capitalised, ends with '.', no code-like characters, mostly letters."""
    letters = sum(c.isalpha() for c in s)
    return (40 <= len(s) <= 220 and s[0].isupper() and s.endswith(".") and not CODE_LIKE.search(s)
            and letters > 0.8 * len(s.replace(" ", "")))


def main() -> None:
    stdlib = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.endswith("python3.11") and not m.name.startswith("_"))
    sents, seen = [], set()
    for name in stdlib:
        if name in SKIP:
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - some stdlib modules do not import on every platform
            continue
        docs = [inspect.getdoc(mod) or ""]
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
                docs.append(inspect.getdoc(obj) or "")
        for d in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split())):
                if keep(s) and s not in seen:
                    seen.add(s)
                    sents.append(s)
    print(len(sents), file=sys.stderr)
    with open("compressor/data/sentences.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(sents) + "\n")


if __name__ == "__main__":
    main()
