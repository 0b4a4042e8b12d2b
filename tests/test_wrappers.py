"""The model wrappers against oracles that do not use them: closed-form parameter and MAC counts, the torch
module's own forward, onnxruntime vs torch on an exported graph, files reloaded by the loader."""

import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compressor import device as devices
from compressor.errors import InputError
from compressor.io.models import LoadedModel, load_model
from compressor.wrappers import HFModel, Model, OnnxModel, TorchModel, from_parts, wrap

CUDA = torch.cuda.is_available()


def conv_linear() -> nn.Module:
    """Conv2d(3→8, 3x3, pad 1) on 3x10x10, flatten, Linear(800→5): MACs = 8·10·10·(3·3·3) + 800·5 = 25 600."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(800, 5)).eval()


MACS = 8 * 10 * 10 * 27 + 800 * 5
PARAMS = 8 * 3 * 9 + 8 + 800 * 5 + 5


def to_onnx(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["out"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def test_wrap_picks_the_kind_and_never_copies_the_callers_module():
    m = conv_linear()
    w = wrap(m)
    assert isinstance(w, TorchModel) and w.module is m and w.kind == "torch" and not w.owned
    assert w.on("cpu") is w  # already there: no copy
    assert isinstance(wrap(to_onnx(m, torch.zeros(1, 3, 10, 10))), OnnxModel)
    assert wrap(w) is w
    with pytest.raises(InputError):
        wrap(42)
    # the loader's compatibility factory builds the same wrappers
    assert isinstance(LoadedModel("torch", "object", module=m), TorchModel)
    assert isinstance(from_parts("onnx", onnx=to_onnx(m, torch.zeros(1, 3, 10, 10))), OnnxModel)


def test_param_and_mac_counts_match_closed_form_for_torch_and_onnx():
    m = conv_linear()
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        m[3].weight[:, :100] = 0  # 500 zeros
    tw, ow = wrap(m), wrap(to_onnx(m, x))
    assert tw.param_counts() == (PARAMS, PARAMS - 500)
    assert ow.param_counts() == (PARAMS, PARAMS - 500)
    assert tw.macs((x,)) == MACS
    assert ow.macs(ow.make_example(None)) == MACS


def test_tied_parameters_count_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert wrap(nn.Sequential(emb, head)).param_counts()[0] == 40


def test_torch_outputs_equal_the_modules_forward_across_batches():
    m = conv_linear()
    x = torch.randn(37, 3, 10, 10)
    with torch.no_grad():
        ref = m(x)
    out = wrap(m).outputs(x, batch_size=8)
    assert out.device.type == "cpu" and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_onnx_outputs_match_torch():
    m = conv_linear()
    x = torch.randn(11, 3, 10, 10)
    w = wrap(to_onnx(m, x[:2]))
    with torch.no_grad():
        ref = m(x)
    torch.testing.assert_close(w.outputs(x, batch_size=4), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.outputs({"input": x.numpy()}), ref, atol=1e-4, rtol=1e-4)
    assert w.latency_runtime() == "onnxruntime"


def test_example_and_input_shape():
    m = conv_linear()
    w = wrap(m)
    ex = w.make_example(None, input_shape=(3, 10, 10), batch=5)
    assert ex[0].shape == (5, 3, 10, 10)
    assert w.input_shape(ex) == (3, 10, 10) and w.input_shape() is None
    with pytest.raises(InputError, match="input-shape"):
        w.make_example(None)
    ow = wrap(to_onnx(m, ex[0]))
    assert ow.input_shape() == (3, 10, 10)
    assert set(ow.make_example(None)) == {"input"}


def test_probe_maps_only_input_mismatches_to_input_errors():
    w = wrap(conv_linear())
    with pytest.raises(InputError, match="does not run on inputs of shape"):
        w.probe((torch.zeros(2, 1, 8, 8),))

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx")

    with pytest.raises(RuntimeError, match="CUBLAS"):  # a bug, not the user's inputs: the traceback stays
        wrap(Broken()).probe((torch.zeros(2, 3),))


def test_size_bytes_bakes_masks_and_save_reloads(tmp_path):
    from compressor.masks import apply_masks

    m = conv_linear()
    x = torch.randn(2, 3, 10, 10)
    plain_bytes = wrap(m).size_bytes()
    masked = conv_linear()
    apply_masks(masked, {"3.weight": torch.rand(5, 800) > 0.5})
    w = wrap(masked)
    assert w.size_bytes() == plain_bytes  # same names and shapes once the masks are baked in
    files = w.save(tmp_path, "m", (x,))
    assert set(files) >= {"state_dict", "program"}
    reloaded = load_model(files["program"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module(x), masked(x))
    assert reloaded.owned and reloaded.format == "pt2"


def test_onnx_save_and_export_write_a_verified_file(tmp_path):
    m = conv_linear()
    w = wrap(to_onnx(m, torch.zeros(1, 3, 10, 10)))
    files = w.save(tmp_path, "g", w.make_example(None))
    assert files["onnx"].endswith("g.onnx") and load_model(files["onnx"]).param_counts() == w.param_counts()


def test_torch_export_onnx_agrees_with_torch(tmp_path):
    m = conv_linear()
    x = torch.randn(3, 3, 10, 10)
    rep = wrap(m).export_onnx(tmp_path / "m.onnx", (x,))
    assert rep["max_abs_diff"] < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m.onnx").outputs(x), m(x), atol=1e-4, rtol=1e-4)


def test_quality_metric_follows_data_and_task(digits):
    w = wrap(conv_linear())
    assert w.task is None
    assert w.quality_metric(digits) == "accuracy"
    assert w.quality_metric(None) == "output_agreement"


def test_hf_task_decided_once(tiny_bert_folder):
    transformers = pytest.importorskip("transformers")
    enc = load_model(tiny_bert_folder)
    assert isinstance(enc, HFModel) and enc.task == "encoder" and enc.quality_metric(None) == "embedding_fidelity"
    cfg = transformers.GPT2Config(vocab_size=enc.tokenizer.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    lm = wrap(transformers.GPT2LMHeadModel(cfg).eval(), tokenizer=enc.tokenizer)
    assert isinstance(lm, HFModel) and lm.task == "causal-lm" and lm.quality_metric(None) == "perplexity"
    ex = enc.make_example(None, batch=3)
    assert set(ex) == {"input_ids", "attention_mask"} and ex["input_ids"].shape[0] == 3
    assert enc.input_shape(ex) is None


def test_hf_save_writes_a_folder_the_loader_reads(tmp_path, tiny_bert_folder):
    w = load_model(tiny_bert_folder)
    files = w.save(tmp_path, "out")
    again = load_model(files["hf_folder"])
    ex = w.make_example(None, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(again.module(**ex).last_hidden_state, w.module(**ex).last_hidden_state)


def test_with_state_keeps_metadata_and_kind(cnn_state_file):
    w = load_model(cnn_state_file, arch="compressor.models:digits_cnn")
    other = nn.Linear(2, 2)
    w2 = w.with_state(module=other)
    assert isinstance(w2, TorchModel) and w2.module is other and w2.path == w.path and w.module is not other
    c = w.copy()
    assert c.module is not w.module and c.owned
    for a, b in zip(c.module.parameters(), w.module.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_on_gpu_copies_the_callers_module_and_matches_cpu():
    m = conv_linear()
    x = torch.randn(300, 3, 10, 10)
    w = wrap(m)
    g = w.on("cuda")
    assert g is not w and g.device.type == "cuda" and devices.module_device(m).type == "cpu"
    out = g.outputs(x, batch_size=128)
    assert out.device.type == "cpu"
    with torch.no_grad():
        ref = m(x)
    tol = 3e-2 if devices.amp_dtype(g.device) is not None else 1e-5
    torch.testing.assert_close(out, ref, atol=tol * float(ref.abs().max()), rtol=tol)
    assert g.latency_runtime() == f"torch-{devices.label(g.device)}"
    assert g.macs((x[:4],)) == MACS


def test_model_base_is_abstract():
    with pytest.raises(NotImplementedError):
        Model().outputs(np.zeros(1))
