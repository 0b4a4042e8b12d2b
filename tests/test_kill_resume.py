"""A compress run killed with SIGKILL in the middle of an IMP round, then rerun with --resume, ends with the same
weights (bit for bit) as a run that was never interrupted; the killed run's folder never looks finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

RECIPE = """name: imp-small
stages:
  - method: imp_rewind
    levels: 4
    fraction: 0.5
    rewind_steps: 2
    epochs: 3
    lr: 0.05
"""


def _cmd(state: Path, recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "compressor.cli", "run", str(state), "--arch", "compressor.models:digits_cnn",
            "-r", str(recipe), "-d", "digits", "-o", str(out), "--seed", "3", "--device", "cpu", *extra]


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    assert files, f"no weights in {sorted(p.name for p in out.iterdir())}"
    return load_file(str(files[0]))


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_equals_uninterrupted(tmp_path, cnn_state_file):
    recipe = tmp_path / "imp.yaml"
    recipe.write_text(RECIPE)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(cnn_state_file, recipe, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    ck = killed / "checkpoints" / "imp_rewind-stage1"
    deadline = time.time() + 600
    while not (ck / "level_001.pt").exists():  # level 1 done: level 2 is training now
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no level checkpoint within 10 minutes"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ck / "level_004.pt").exists(), "the run finished before the kill: make the recipe longer"
    assert not (killed / "report.json").exists(), "a killed run left a folder that looks finished"

    # a plain rerun (no --resume) is not refused as if the folder held a result, but the test resumes instead
    resumed = subprocess.run(_cmd(cnn_state_file, recipe, killed, "--resume", "--json"), env=_env(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert '"resumed_levels"' in resumed.stdout and '"resumed_levels": 0' not in resumed.stdout

    clean = tmp_path / "clean"
    full = subprocess.run(_cmd(cnn_state_file, recipe, clean), env=_env(), capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-2000:]
    a, b = _weights(killed), _weights(clean)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (max |diff| {float((a[k] - b[k]).abs().max())})"


def test_folder_without_report_is_not_a_result(tmp_path, cnn_state_file):
    """A killed run's folder (checkpoints, no report.json) is neither refused as an existing result nor
    mistaken for one: a new run writes into it; a folder with report.json is refused without --overwrite."""
    from compressor.api import _check_output
    from compressor.errors import InputError
    from compressor.io.models import load_model

    loaded = load_model(cnn_state_file, arch="compressor.models:digits_cnn")
    out = tmp_path / "o"
    (out / "checkpoints" / "imp_rewind-stage1").mkdir(parents=True)
    (out / "checkpoints" / "imp_rewind-stage1" / "level_000.pt").write_bytes(b"partial")
    _check_output(out, loaded.path, overwrite=False, resume=False)  # not a result: allowed
    (out / "report.json").write_text("{}")
    with pytest.raises(InputError, match="already holds a result"):
        _check_output(out, loaded.path, overwrite=False, resume=False)
