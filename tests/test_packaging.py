"""The package as a user gets it: build the wheel, install it into a clean virtual environment (no access to
this checkout, no --system-site-packages) and run the CLI from an unrelated directory.

This catches what the editable install used by the rest of the suite cannot: package data that is not
shipped (recipes, corpus), code that reads files relative to the repository, undeclared dependencies.
torch is installed first, pinned to the CPU build the Makefile uses, so pip never pulls a CUDA build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _clean_env(home: Path) -> dict:
    """The caller's environment without anything that would let the checkout leak into the venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["HOME"] = str(home)  # no user site-packages of the caller
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_from_elsewhere(tmp_path):
    t0 = time.perf_counter()
    # Build from a copy holding only what the build reads, so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "compressor", src / "compressor", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = _clean_env(tmp_path / "home")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, src], cwd=tmp_path, env=env)
    wheels = list(dist.glob("compressor-*.whl"))
    assert len(wheels) == 1, wheels

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=env)
    py, compress = venv / "bin" / "python", venv / "bin" / "compress"
    _run([py, "-m", "pip", "install", "-q", TORCH], cwd=tmp_path, env=env)
    _run([py, "-m", "pip", "install", "-q", wheels[0]], cwd=tmp_path, env=env)
    t_install = time.perf_counter() - t0

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    located = _run([py, "-c", "import compressor; print(compressor.__file__)"], cwd=elsewhere, env=env).stdout
    assert str(venv) in located and str(ROOT) not in located, located  # the installed copy, not this checkout

    listed = _run([compress, "recipes", "list"], cwd=elsewhere, env={**env, "COLUMNS": "200"}).stdout
    shipped = sorted(p.stem for p in (ROOT / "compressor" / "recipes").glob("*.yaml"))
    assert shipped and [n for n in shipped if n not in listed] == []
    assert "invalid" not in listed

    demo = _run([compress, "demo", "-o", elsewhere / "demo"], cwd=elsewhere, env={**env, "COLUMNS": "200"})
    assert "demo: DigitsCNN" in demo.stdout and "accuracy" in demo.stdout, demo.stdout
    assert (elsewhere / "demo" / "report.json").is_file()
    print(f"\nwheel build + venv + install: {t_install:.0f} s; total {time.perf_counter() - t0:.0f} s")
