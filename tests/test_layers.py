"""The layer order of the package, read from the source (module-level and function-level imports alike).

A module may import modules of its own layer or of lower layers only; a module that no entry of LAYERS covers
fails the test, so every new module is placed on purpose. Between different packages of the same layer there
must be no import cycle either.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "compressor"

# lowest first; an entry covers the module of that name and everything under it
LAYERS: list[list[str]] = [
    ["compressor.errors", "compressor.utils", "compressor.device", "compressor.task"],
    ["compressor.io", "compressor.onnx_utils", "compressor.onnx_files", "compressor.hf", "compressor.models",
     "compressor.blocks", "compressor.export", "compressor.analysis_export", "compressor.train",
     "compressor.skeleton"],
    ["compressor.graph", "compressor.masks", "compressor.quant", "compressor.kernels", "compressor.sara",
     "compressor.checkpoint"],
    # io.models loads files into wrappers, so it sits beside them (io.data stays in layer 1)
    ["compressor.wrappers", "compressor.io.models", "compressor.eval", "compressor.recipe"],
    ["compressor.methods", "compressor.sweep", "compressor.replaceme"],
    ["compressor.api"],
    ["compressor.cli", "compressor"],  # the package itself (its __init__ only) is the public facade over the API
]
FACADE = "compressor"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str | None:
    """The LAYERS entry that covers `module` (the longest one), or None. The facade covers only itself."""
    best = None
    for entries in LAYERS:
        for entry in entries:
            covers = module == entry or (entry != FACADE and module.startswith(entry + "."))
            if covers and (best is None or len(entry) > len(best)):
                best = entry
    return best


LAYER_OF = {entry: i for i, entries in enumerate(LAYERS) for entry in entries}


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(package.rglob("*.py"))}


@functools.cache
def imported_modules(path: Path, module: str, known: frozenset[str]) -> list[tuple[int, str]]:
    """(line, compressor module) for every import in the file, wherever it stands (functions included).
    ``from compressor import masks`` counts as importing compressor.masks."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in known else base))
    return [(line, m) for line, m in out if m == "compressor" or m.startswith("compressor.")]


def source_file(module: str, path: Path) -> str:
    """Where `module` lives in the repository, e.g. compressor/graph/__init__.py (whatever `path` it was read from)."""
    return module.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")


def violations(modules: dict[str, Path]) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """(unplaced modules, climbing imports 'file:line: a (layer i) imports b (layer j)', same-layer edges)."""
    known = frozenset(modules)
    unplaced = [m for m in modules if unit_of(m) is None]
    climbing = []
    same_layer: dict[tuple[str, str], str] = {}
    for mod, path in modules.items():
        src = unit_of(mod)
        if src is None:
            continue
        for line, target in imported_modules(path, mod, known):
            dst = unit_of(target)
            if dst is None:
                unplaced.append(f"{target} (imported at {source_file(mod, path)}:{line})")
                continue
            where = f"{source_file(mod, path)}:{line}"
            if LAYER_OF[dst] > LAYER_OF[src]:
                climbing.append(f"{where}: {mod} (layer {LAYER_OF[src]}) imports {target} (layer {LAYER_OF[dst]})")
            elif LAYER_OF[dst] == LAYER_OF[src] and dst != src:
                same_layer.setdefault((src, dst), where)
    return sorted(set(unplaced)), climbing, same_layer


def cycles(edges: dict[tuple[str, str], str]) -> list[list[str]]:
    """Every strongly connected set (of more than one package) in the same-layer import graph."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def module_edges(modules: dict[str, Path]) -> dict[tuple[str, str], str]:
    """{(importer, imported): 'file:line'} between modules of the package (function-level imports included)."""
    known = frozenset(modules)
    edges: dict[tuple[str, str], str] = {}
    for mod, path in modules.items():
        for line, target in imported_modules(path, mod, known):
            if target != mod and target in known:
                edges.setdefault((mod, target), f"{source_file(mod, path)}:{line}")
    return edges


def test_every_module_has_a_layer():
    unplaced, _, _ = violations(package_modules())
    assert not unplaced, "modules without a layer (add them to LAYERS in tests/test_layers.py):\n" + "\n".join(unplaced)


def test_imports_only_look_down():
    _, climbing, _ = violations(package_modules())
    assert not climbing, "imports that climb the layer order:\n" + "\n".join(climbing)


def test_no_import_cycle_between_packages_of_one_layer():
    _, _, edges = violations(package_modules())
    found = cycles(edges)
    detail = ["  " + " <-> ".join(c) + ": " + ", ".join(f"{a}->{b} at {edges[(a, b)]}" for (a, b) in edges
                                                          if a in c and b in c) for c in found]
    assert not found, "import cycles inside one layer:\n" + "\n".join(detail)


def test_no_import_cycle_between_modules():
    """Not even through a function-level import (sara.core and sara.checkpoint used to import each other)."""
    edges = module_edges(package_modules())
    found = cycles(edges)
    assert not found, "module import cycles: " + "; ".join(
        ", ".join(f"{a}->{b} at {edges[(a, b)]}" for (a, b) in edges if a in c and b in c) for c in found)


def test_the_cycle_check_catches_a_planted_cycle(tmp_path):
    modules = package_modules()
    planted = tmp_path / "core.py"
    planted.write_text(modules["compressor.sara.core"].read_text(encoding="utf-8")
                       + "\n\ndef _f():\n    from compressor.sara.checkpoint import save_adaptation\n", encoding="utf-8")
    assert cycles(module_edges({**modules, "compressor.sara.core": planted})) == [["compressor.sara.checkpoint",
                                                                                   "compressor.sara.core"]]


@pytest.mark.parametrize("line,expect", [
    ("from compressor.api import compress\n", "imports compressor.api"),  # module level
    ("def f():\n    from compressor import cli\n", "imports compressor.cli"),  # function level, package form
    ("def f():\n    from . import api\n", "imports compressor.api"),  # relative
])
def test_the_check_catches_a_planted_climbing_import(tmp_path, line, expect):
    """masks.py (layer 2) with one climbing import planted fails the check."""
    modules = package_modules()
    planted = tmp_path / "masks.py"
    planted.write_text(modules["compressor.masks"].read_text(encoding="utf-8") + "\n" + line, encoding="utf-8")
    before = set(violations(modules)[1])
    _, climbing, _ = violations({**modules, "compressor.masks": planted})
    new = [c for c in climbing if c not in before]
    assert len(new) == 1 and "compressor.masks (layer 2) " + expect in new[0]


def test_an_unplaced_module_fails(tmp_path):
    modules = package_modules()
    modules["compressor.brand_new"] = PACKAGE / "errors.py"  # any file: the name has no layer
    assert "compressor.brand_new" in violations(modules)[0]
