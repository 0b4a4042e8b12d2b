"""compress() as a pipeline would call it: the input is never modified, outputs are checked and atomic."""

import copy
import json

import pytest
import torch

from compressor.api import compress, evaluate_model
from compressor.errors import InputError, RecipeError

FT_EXPORT = {"name": "ft-export", "stages": [{"method": "finetune", "epochs": 0.5}, {"method": "export", "format": "both"}]}


def test_compress_module_in_memory(trained_cnn, digits):
    before = {k: v.clone() for k, v in trained_cnn.state_dict().items()}
    res = compress(trained_cnn, FT_EXPORT, digits)
    for k, v in trained_cnn.state_dict().items():
        assert torch.equal(v, before[k]), f"input model modified: {k}"
    assert res.output is None and res.model is not trained_cnn
    assert 0.9 < res.after["accuracy"] <= 1.0
    assert res.report["stages"][0]["method"] == "finetune"


def test_compress_file_writes_report_and_model(tmp_path, cnn_state_file):
    out = tmp_path / "out"
    res = compress(cnn_state_file, FT_EXPORT, "digits", out, arch="compressor.models:digits_cnn")
    rep = json.loads((out / "report.json").read_text())
    assert rep["before"]["params"] == rep["after"]["params"]
    assert (out / "model.onnx").exists() and (out / "model.safetensors").exists()
    assert res.files["onnx"].endswith("model.onnx")
    # the ONNX file gives the same accuracy as the torch model it came from
    ev = evaluate_model(out / "model.onnx", "digits")
    assert abs(ev["accuracy"] - rep["after"]["accuracy"]) < 1e-6


def test_refuses_existing_result(tmp_path, cnn_state_file):
    out = tmp_path / "out"
    compress(cnn_state_file, {"name": "e", "stages": [{"method": "export"}]}, "digits", out, arch="compressor.models:digits_cnn")
    stamp = (out / "report.json").read_text()
    with pytest.raises(InputError, match="already holds a result"):
        compress(cnn_state_file, {"name": "e", "stages": [{"method": "export"}]}, "digits", out, arch="compressor.models:digits_cnn")
    assert (out / "report.json").read_text() == stamp


def test_output_equal_to_input(tmp_path, trained_cnn):
    from compressor.export import export_onnx

    p = tmp_path / "m.onnx"
    export_onnx(trained_cnn, (torch.zeros(2, 1, 8, 8),), p)
    with pytest.raises(InputError, match="overwrite the input"):
        compress(p, {"name": "e", "stages": [{"method": "export"}]}, "digits", tmp_path)
    with pytest.raises(InputError, match="overwrite the input"):
        compress(p, {"name": "e", "stages": [{"method": "export"}]}, "digits", p)
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    with pytest.raises(InputError, match="is a file"):
        compress(p, {"name": "e", "stages": [{"method": "export"}]}, "digits", other)
    assert other.read_text() == "keep me"


def test_recipe_checked_before_anything_written(tmp_path, cnn_state_file):
    out = tmp_path / "out"
    with pytest.raises(RecipeError):
        compress(cnn_state_file, {"name": "x", "stages": [{"method": "nope"}]}, "digits", out, arch="compressor.models:digits_cnn")
    assert not out.exists()


def test_shape_incompatible_data(tmp_path, cnn_state_file):
    import numpy as np

    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((10, 3, 4, 4), np.float32), y=np.zeros(10, np.int64))
    with pytest.raises(InputError, match="does not run on inputs of shape"):
        compress(cnn_state_file, FT_EXPORT, f"npz:{p}", tmp_path / "o", arch="compressor.models:digits_cnn")
    assert not (tmp_path / "o").exists()


def test_onnx_model_without_labels_measures_agreement(tmp_path, trained_cnn):
    from compressor.export import export_onnx

    p = tmp_path / "m.onnx"
    export_onnx(trained_cnn, (torch.zeros(2, 1, 8, 8),), p)
    res = compress(p, {"name": "e", "stages": [{"method": "export"}]}, "random", tmp_path / "o")
    assert res.after["output_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_sparse_kernels_switch_writes_report(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    recipe = {"name": "s", "stages": [{"method": "magnitude", "sparsity": 0.95}]}
    original = copy.deepcopy(model).eval()
    res = compress(model, recipe, "random", tmp_path / "o", input_shape=(64,), sparse_kernels=True)
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    layers = rep["sparse_kernels"]["layers"]
    assert len(layers) == 3 and all(layer["format"] in ("dense", "csr", "bsr", "semi_structured_2_4") for layer in layers)
    # files hold the plain (dense-layout) weights and load back into the architecture
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert state["2.weight"].layout == torch.strided and float((state["2.weight"] == 0).float().mean()) > 0.9
    # the reported agreement, recomputed from the saved weights on the same held-out random inputs
    from compressor.io.data import random_inputs

    x = random_inputs((64,), seed=0).test.tensors[0][:256]
    pruned = copy.deepcopy(original)
    pruned.load_state_dict(state)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(pruned(x), original(x), dim=1).mean()
    assert res.after["output_cosine"] == pytest.approx(float(cos), abs=1e-5) and float(cos) < 0.5  # measured 0.0246
    assert res.before["output_cosine"] == pytest.approx(1.0, abs=1e-6)
