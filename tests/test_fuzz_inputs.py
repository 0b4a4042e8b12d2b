"""Damaged input files through the CLI: truncated or bit-flipped ONNX, safetensors, npz, YAML recipes and HF
config.json. A damaged file that still loads may run (exit 0); one that does not must give exit code 2, exactly
one line of output (no traceback) and no output folder. Anything else (exit 1: an uncaught exception) is a bug
this test exists to surface. Examples per format: FUZZ_EXAMPLES (default 12; CI may raise it)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compressor.cli import app

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ARCH = ["--arch", "compressor.models:digits_cnn", "--input-shape", "1,8,8"]
EXPORT = "name: e\nstages:\n  - method: export\n    format: onnx\n"


@st.composite
def damage(draw, size: int):
    """('truncate', n) or ('flip', [(byte, bit), ...]) for a file of `size` bytes."""
    if draw(st.booleans()):
        return "truncate", draw(st.integers(0, size - 1))
    flips = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 7)), min_size=1, max_size=4))
    return "flip", flips


def damaged(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return data[:arg]
    b = bytearray(data)
    for pos, bit in arg:
        b[pos] ^= 1 << bit
    return bytes(b)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, trained_cnn):
    """One valid file of every format."""
    from safetensors.torch import save_file

    from compressor.export import export_onnx

    root = tmp_path_factory.mktemp("clean")
    export_onnx(trained_cnn, (torch.zeros(2, 1, 8, 8),), root / "m.onnx")
    save_file({k: v.contiguous() for k, v in trained_cnn.state_dict().items()}, root / "m.safetensors")
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", x=rng.random((16, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 16))
    (root / "r.yaml").write_text("name: ft\nstages:\n  - method: finetune\n    epochs: 0.1\n  - method: export\n")
    (root / "export.yaml").write_text(EXPORT)
    return root


def run_cli(tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / f"out-{uuid.uuid4().hex[:8]}"
    r = CliRunner().invoke(app, [*args, "-o", str(out)])
    if r.exit_code == 0:
        return
    assert r.exit_code == 2, f"exit {r.exit_code} (an uncaught {type(r.exception).__name__}: a bug):\n{r.output[-2000:]}"
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert not out.exists(), f"an error left {sorted(p.name for p in out.iterdir())}"


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / f"{uuid.uuid4().hex[:8]}-{name}"
    p.write_bytes(data)
    return p


@FUZZ
@given(data=st.data())
def test_damaged_onnx(tmp_path, clean, data):
    src = (clean / "m.onnx").read_bytes()
    p = write(tmp_path, "m.onnx", damaged(src, data.draw(damage(len(src)))))
    run_cli(tmp_path, ["run", str(p), "-r", str(clean / "export.yaml"), "-d", "random"])


@FUZZ
@given(data=st.data())
def test_damaged_safetensors(tmp_path, clean, data):
    src = (clean / "m.safetensors").read_bytes()
    p = write(tmp_path, "m.safetensors", damaged(src, data.draw(damage(len(src)))))
    run_cli(tmp_path, ["run", str(p), *ARCH, "-r", str(clean / "export.yaml"), "-d", "random"])


@FUZZ
@given(data=st.data())
def test_damaged_npz(tmp_path, clean, data):
    src = (clean / "d.npz").read_bytes()
    p = write(tmp_path, "d.npz", damaged(src, data.draw(damage(len(src)))))
    run_cli(tmp_path, ["run", str(clean / "m.safetensors"), *ARCH, "-r", str(clean / "export.yaml"),
                       "-d", f"npz:{p}"])


@FUZZ
@given(data=st.data())
def test_damaged_recipe(tmp_path, clean, data):
    src = (clean / "r.yaml").read_bytes()
    p = write(tmp_path, "r.yaml", damaged(src, data.draw(damage(len(src)))))
    run_cli(tmp_path, ["run", str(clean / "m.safetensors"), *ARCH, "-r", str(p), "-d", f"npz:{clean / 'd.npz'}"])


@FUZZ
@given(data=st.data())
def test_damaged_hf_config(tmp_path, tiny_bert_folder, clean, data):
    folder = tmp_path / f"hf-{uuid.uuid4().hex[:8]}"
    shutil.copytree(tiny_bert_folder, folder)
    src = (folder / "config.json").read_bytes()
    (folder / "config.json").write_bytes(damaged(src, data.draw(damage(len(src)))))
    run_cli(tmp_path, ["run", str(folder), "-r", str(clean / "export.yaml")])


def test_damaged_hf_weights(tmp_path, tiny_bert_folder, clean):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_bert_folder, folder)
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", str(folder), "-r", str(clean / "export.yaml"), "-o", str(out)])
    assert r.exit_code == 2 and "does not load" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_undamaged_files_run(tmp_path, tiny_bert_folder, clean):
    """The fuzz above starts from files that work: each command line runs on the clean file."""
    st_args = ["run", str(clean / "m.safetensors"), *ARCH, "-r", str(clean / "export.yaml")]
    for args in (["run", str(clean / "m.onnx"), "-r", str(clean / "export.yaml"), "-d", "random"],
                 [*st_args, "-d", "random"], [*st_args, "-d", f"npz:{clean / 'd.npz'}"],
                 ["run", str(clean / "m.safetensors"), *ARCH, "-r", str(clean / "r.yaml"), "-d", f"npz:{clean / 'd.npz'}"],
                 ["run", str(tiny_bert_folder), "-r", str(clean / "export.yaml")]):
        out = tmp_path / f"out-{uuid.uuid4().hex[:8]}"
        r = CliRunner().invoke(app, [*args, "-o", str(out)])
        assert r.exit_code == 0, (args, r.output[-1500:])
        assert (out / "report.json").exists()


def _npz(root: Path, name: str, **arrays) -> str:
    p = root / name
    np.savez(p, **arrays)
    return f"npz:{p}"


@pytest.mark.parametrize("case,needle", [
    ("recipe-not-utf8", "not a UTF-8 text file"),
    ("method-list", "'method' must be a name"),
    ("x-object", "cannot read"),
    ("x-strings", "inputs must be numbers"),
    ("y-empty", "x has 16 rows but y has shape [0]"),
    ("y-fractional", "non-integer values"),
    ("arch-needs-arguments", "needs arguments (in_features, out_features)"),
])
def test_named_bad_inputs(tmp_path, clean, case, needle):
    """The issue's list, through the CLI: exit 2, one line naming the problem, nothing written."""
    recipe, data, arch = str(clean / "r.yaml"), f"npz:{clean / 'd.npz'}", ARCH
    x = np.zeros((16, 1, 8, 8), np.float32)
    if case == "recipe-not-utf8":
        recipe = str(write(tmp_path, "r.yaml", b"name: \xff\xfe\nstages: []\n"))
    elif case == "method-list":
        recipe = str(write(tmp_path, "r.yaml", b"name: x\nstages:\n  - method: [a]\n"))
    elif case == "x-object":
        data = _npz(tmp_path, "o.npz", x=np.array([object()] * 16, dtype=object), y=np.zeros(16, np.int64))
    elif case == "x-strings":
        data = _npz(tmp_path, "s.npz", x=np.array(["a"] * 16), y=np.zeros(16, np.int64))
    elif case == "y-empty":
        data = _npz(tmp_path, "e.npz", x=x, y=np.zeros(0, np.int64))
    elif case == "y-fractional":
        data = _npz(tmp_path, "f.npz", x=x, y=np.linspace(0, 3, 16))
    elif case == "arch-needs-arguments":
        arch = ["--arch", "torch.nn:Linear", "--input-shape", "1,8,8"]
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", str(clean / "m.safetensors"), *arch, "-r", recipe, "-d", data, "-o", str(out)])
    assert r.exit_code == 2, r.output[-2000:]
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.output
    assert not out.exists()


def test_bad_sara_adaptation_files(tmp_path):
    """Bad JSON or missing keys in a SaRA adaptation's metadata: InputError naming the file, not KeyError."""
    import json

    from safetensors.torch import save_file

    from compressor.errors import InputError
    from compressor.sara.checkpoint import FORMAT, read_adaptation

    good = {"format": FORMAT, "threshold": "0.01", "base": {"w": {"shape": [2], "sha256": "ab"}},
            "counts": {"w": 1}, "full": []}
    cases = {"bad-json": "{not json", "no-counts": json.dumps({k: v for k, v in good.items() if k != "counts"}),
             "count-without-tensor": json.dumps(dict(good, counts={"w": 1, "v": 2})),
             "list": json.dumps([1, 2])}
    for name, meta in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_file({"values/w": torch.zeros(1)}, str(p), metadata={"sara": meta})
        with pytest.raises(InputError, match="SaRA") as e:
            read_adaptation(p)
        assert str(p) in str(e.value)
    p = tmp_path / "good.safetensors"
    save_file({"values/w": torch.zeros(1)}, str(p), metadata={"sara": json.dumps(good)})
    assert read_adaptation(p)[0]["counts"] == {"w": 1}
