"""Build compressor/data/sentences.txt from CPython stdlib docstrings (PSF licence).
English prose, deterministic, a few thousand sentences: calibration and held-out text."""
import importlib, pkgutil, re, sys, inspect
mods = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.endswith("python3.11") and not m.name.startswith("_"))
sents = []
seen = set()
for name in mods:
    if name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "venv", "pydoc", "test"}: continue
    try:
        mod = importlib.import_module(name)
    except Exception:
        continue
    docs = [inspect.getdoc(mod) or ""]
    for _, obj in sorted(vars(mod).items()):
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
            docs.append(inspect.getdoc(obj) or "")
    for d in docs:
        text = " ".join(d.split())
        for s in re.split(r"(?<=[.!?])\s+", text):
            if 40 <= len(s) <= 220 and s[0].isupper() and s.endswith(".") and not re.search(r"[>{}\[\]=_/\\|`]|\.\.\.|::", s) and sum(c.isalpha() for c in s) > 0.8 * len(s.replace(" ", "")):
                if s not in seen:
                    seen.add(s); sents.append(s)
print(len(sents), file=sys.stderr)
open("compressor/data/sentences.txt", "w").write("\n".join(sents) + "\n")
