"""The CLI through typer's CliRunner and as a real subprocess; user errors: one red line, exit code 2."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from compressor.cli import app, main

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_recipes_list_and_show():
    r = invoke("recipes", "list")
    assert r.exit_code == 0 and "demo" in r.output
    r = invoke("recipes", "show", "demo")
    assert r.exit_code == 0 and "stage 1" in r.output


def test_methods():
    r = invoke("methods")
    assert r.exit_code == 0 and "finetune" in r.output and "export" in r.output


def test_run_and_eval(tmp_path, cnn_state_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: ft\nstages:\n  - method: finetune\n    epochs: 0.3\n  - method: export\n")
    out = tmp_path / "out"
    r = invoke("run", str(cnn_state_file), "--arch", "compressor.models:digits_cnn", "-r", str(recipe), "-d", "digits", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and (out / "report.json").exists()
    r = invoke("eval", str(out / "model.onnx"), "-d", "digits", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["accuracy"] > 0.9


def test_export_command(tmp_path, cnn_state_file):
    out = tmp_path / "m.onnx"
    r = invoke("export", str(cnn_state_file), "--arch", "compressor.models:digits_cnn", "-o", str(out), "--input-shape", "1,8,8")
    assert r.exit_code == 0, r.output
    assert out.exists()
    r = invoke("export", str(cnn_state_file), "--arch", "compressor.models:digits_cnn", "-o", str(out), "--input-shape", "1,8,8")
    assert r.exit_code == 2 and "exists" in r.output


@pytest.mark.parametrize("args,needle", [
    (["run", "/no/such/model.onnx", "-r", "demo"], "model not found"),
    (["run", "MODEL", "-r", "no-such-recipe"], "no recipe named"),
    (["run", "MODEL", "-r", "demo", "-d", "imagenet"], "unknown data source"),
    (["eval", "/no/such.onnx"], "model not found"),
    (["recipes", "show", "nope"], "no recipe named"),
    (["eval", "MODEL", "--arch", "compressor.models:digits_cnn", "-d", "digits", "--device", "tpu"], "device 'tpu'"),
    (["export", "ONNX", "-o", "OUT"], "already ONNX"),
    (["bench-kernels", "--device", "cpu", "--shapes", "8by8"], "--shapes"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, cnn_state_file, args, needle):
    onnx_file = tmp_path / "m.onnx"
    if "ONNX" in args:
        from compressor.models import digits_cnn
        from compressor.wrappers import wrap

        wrap(digits_cnn().eval()).export_onnx(onnx_file, (__import__("torch").zeros(2, 1, 8, 8),))
    subst = {"MODEL": str(cnn_state_file), "ONNX": str(onnx_file), "OUT": str(tmp_path / "out.onnx")}
    args = [subst.get(a, a) for a in args]
    if args[0] == "run" and "--arch" not in args:
        args += ["--arch", "compressor.models:digits_cnn"]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_corrupt_onnx_cli(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"not an onnx file at all" * 20)
    r = invoke("eval", str(p))
    assert r.exit_code == 2 and "not a valid ONNX" in r.output


def test_recipe_typo_cli(tmp_path, cnn_state_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nstages:\n  - method: finetune\n    epoch: 3\n")
    r = invoke("run", str(cnn_state_file), "--arch", "compressor.models:digits_cnn", "-r", str(recipe), "-d", "digits", "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "field 'epoch': unknown field" in r.output
    assert not (tmp_path / "o").exists()


def test_main_shorthand_routes_to_run(tmp_path, cnn_state_file, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(cnn_state_file), "-r", "no-such-recipe"])
    assert e.value.code == 2
    assert "no recipe named" in capsys.readouterr().err  # routed to run (not click's "No such command")


def test_bench_kernels_command_writes_json(tmp_path):
    out = tmp_path / "k.json"
    r = invoke("bench-kernels", "--device", "cpu", "--shapes", "16x16", "--sparsities", "0.5", "--rows", "1",
               "--repeats", "1", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["runs"]["cpu-threads1-custom"]["device"] == "cpu"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_refused_without_cuda(cnn_state_file):
    r = invoke("eval", str(cnn_state_file), "--arch", "compressor.models:digits_cnn", "-d", "digits", "--device", "cuda")
    assert r.exit_code == 2 and "no CUDA device" in r.output and "Traceback" not in r.output


def test_subprocess(tmp_path, cnn_state_file):
    exe = [sys.executable, "-m", "compressor.cli"]
    r = subprocess.run(exe + ["--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout
    r = subprocess.run(exe + [str(cnn_state_file), "-r", "demo", "-d", "digits", "-o", str(cnn_state_file)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "error:" in r.stderr


@pytest.mark.parametrize("argv", [["recipes", "show"], ["--no-such-option"]])
def test_console_script_usage_mistake_exits_2_without_traceback(argv, capsys):
    """Through main() (the `compress` entry point), not the test runner: typer >= 0.2x raises its own copy of
    click's exceptions, which a handler for click's classes lets through as a traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("stages,data,needs", [
    ("  - method: magnitude\n    sparsity: 0.5\n  - method: finetune\n    epochs: 1\n", "random", "labelled data,"),
    ("  - method: qdistill\n    bits: 4\n    epochs: 1\n", "random", "labelled data,"),
    ("  - method: imp_rewind\n", "random", "labelled data with a test split"),
])
def test_training_stage_without_labels_is_refused_before_anything_runs(tmp_path, cnn_state_file, stages, data, needs):
    """One line, exit 2, no output folder: the refusal comes before stage 1 runs (not after a 'stage 1/2' line)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: needs-labels\nstages:\n" + stages)
    out = tmp_path / "out"
    r = invoke("run", str(cnn_state_file), "--arch", "compressor.models:digits_cnn", "-r", str(recipe), "-d", data,
               "--input-shape", "1,8,8", "-o", str(out))
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needs in lines[0] and "Traceback" not in r.output, r.output
    assert not out.exists()


def test_qdistill_post_training_needs_no_labels():
    from compressor.recipe import check_data, parse_recipe

    check_data(parse_recipe({"name": "ptq", "stages": [{"method": "qdistill", "bits": 4, "epochs": 0}]}), None)


def _onnx_params(path) -> int:
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).size for t in onnx.load(str(path)).graph.initializer)


def test_prune_command_on_onnx_cuts_the_graph(tmp_path, net_onnx):
    """compress prune on an ONNX file: a physically smaller, verified model.onnx; the count is read back from the
    written file with onnx itself, not from the report."""
    _, src = net_onnx
    out = tmp_path / "p"
    r = invoke("prune", str(src), "--ratio", "0.5", "--input-shape", "3,8,8", "-o", str(out))
    assert r.exit_code == 0, r.output
    written = out / "model.onnx"
    assert written.exists() and json.loads((out / "report.json").read_text())["stages"][0]["method"] == "structured"
    before, after = _onnx_params(src), _onnx_params(written)
    # c1's 8 channels halve; c2 feeds the output layer's inputs, which are protected: measured 2,693 → 1,997
    assert after < 0.8 * before, (before, after)
    import onnx

    convs = [n for n in onnx.load(str(written)).graph.node if n.op_type == "Conv"]
    inits = {t.name: t for t in onnx.load(str(written)).graph.initializer}
    assert inits[convs[0].input[1]].dims[0] == 4  # 8 → 4 output channels in the file itself


def test_prune_command_on_a_torch_checkpoint(tmp_path, cnn_state_file):
    out = tmp_path / "p"
    r = invoke("prune", str(cnn_state_file), "--arch", "compressor.models:digits_cnn", "--ratio", "0.5", "-d", "digits",
               "--round-to", "4", "-o", str(out))
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["after"]["params"] < 0.6 * rep["before"]["params"] and "accuracy" in rep["after"]
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    kept = [v.shape[0] for k, v in state.items() if k.endswith("weight") and v.dim() == 4]
    assert kept and all(k % 4 == 0 for k in kept), kept  # --round-to 4 reached the cut


def test_prune_command_refuses_bad_options_in_one_line(tmp_path, net_onnx):
    _, src = net_onnx
    r = invoke("prune", str(src), "--ratio", "0.5", "--importance", "l3", "-o", str(tmp_path / "p"))
    assert r.exit_code == 2 and "importance" in r.output and "Traceback" not in r.output
    r = invoke("prune", str(src), "--ratio", "0.5", "--round-to", "x", "-o", str(tmp_path / "p"))
    assert r.exit_code == 2 and "--round-to" in r.output
    assert not (tmp_path / "p").exists()


def test_training_recipe_on_onnx_names_the_prune_command(tmp_path, net_onnx):
    _, src = net_onnx
    r = invoke("run", str(src), "-r", "channel-prune-50", "-d", "digits", "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "does not work on onnx models" in r.output and "compress prune" in r.output
