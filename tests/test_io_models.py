"""Each model loader, on real files written by torch / onnx, and each bad input."""

import pytest
import torch

from compressor.errors import InputError
from compressor.export import export_onnx
from compressor.io.models import load_model
from compressor.models import DigitsCNN, digits_cnn

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _same(a: torch.nn.Module, b: torch.nn.Module):
    with torch.no_grad():
        torch.testing.assert_close(a(X), b(X))


def test_state_dict_with_arch(cnn_state_file, trained_cnn):
    lm = load_model(cnn_state_file, arch="compressor.models:digits_cnn")
    assert lm.kind == "torch" and lm.format == "state_dict"
    _same(lm.module, trained_cnn)


def test_state_dict_without_arch_says_how(cnn_state_file):
    with pytest.raises(InputError, match="--arch"):
        load_model(cnn_state_file)


def test_state_dict_wrong_arch(cnn_state_file):
    with pytest.raises(InputError, match="do not fit"):
        load_model(cnn_state_file, arch="compressor.models:digits_mlp")


@pytest.mark.parametrize("arch", ["nocolon", "no.such.module:f", "compressor.models:nothing"])
def test_bad_arch(cnn_state_file, arch):
    with pytest.raises(InputError):
        load_model(cnn_state_file, arch=arch)


def test_safetensors(tmp_path, trained_cnn):
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file(trained_cnn.state_dict(), str(p))
    lm = load_model(p, arch="compressor.models:digits_cnn")
    assert lm.format == "safetensors"
    _same(lm.module, trained_cnn)


def test_pt2_program(tmp_path, trained_cnn):
    p = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(trained_cnn, (X,)), str(p))
    lm = load_model(p)
    assert lm.format == "pt2" and lm.example_inputs is not None
    _same(lm.module, trained_cnn)


def test_torchscript(tmp_path, trained_cnn):
    p = tmp_path / "m.ts"
    torch.jit.save(torch.jit.trace(trained_cnn, (X,)), str(p))
    lm = load_model(p)
    assert lm.format == "torchscript"
    _same(lm.module, trained_cnn)


def test_pickle_needs_trust(tmp_path, trained_cnn):
    p = tmp_path / "full.pt"
    torch.save(trained_cnn, p)
    with pytest.raises(InputError, match="--trust-pickle"):
        load_model(p)
    lm = load_model(p, trust_pickle=True)
    assert lm.format == "pickle" and isinstance(lm.module, DigitsCNN)
    _same(lm.module, trained_cnn)


def test_onnx(tmp_path, trained_cnn):
    p = tmp_path / "m.onnx"
    export_onnx(trained_cnn, (X,), p)
    lm = load_model(p)
    assert lm.kind == "onnx" and lm.onnx is not None


def test_corrupt_onnx(tmp_path):
    p = tmp_path / "broken.onnx"
    p.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 10)
    with pytest.raises(InputError, match="not a valid ONNX"):
        load_model(p)


def test_truncated_onnx(tmp_path, trained_cnn):
    p = tmp_path / "m.onnx"
    export_onnx(trained_cnn, (X,), p)
    t = tmp_path / "t.onnx"
    t.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(InputError):
        load_model(t)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "nope.onnx")


def test_unknown_format(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(InputError):
        load_model(p)


def test_folder_without_config(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        load_model(tmp_path)


def test_hf_folder(tiny_bert_folder):
    lm = load_model(tiny_bert_folder)
    assert lm.kind == "hf" and lm.tokenizer is not None
    enc = lm.tokenizer(["a short sentence"], return_tensors="pt")
    assert lm.module(**enc).last_hidden_state.shape[-1] == 32


def test_in_memory_module_untouched():
    m = digits_cnn()
    lm = load_model(m)
    assert lm.module is m and lm.kind == "torch"
