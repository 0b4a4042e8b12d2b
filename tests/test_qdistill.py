"""Quantized distillation: straight-through gradients to the shadow weights, the distillation loss,
differentiable quantization's point gradients, the `qdistill` recipe method and its bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compressor.errors import CompressorError, InputError, RecipeError
from compressor.models import digits_cnn, digits_mlp
from compressor.quant import QuantConfig, ShadowQuantizer, distillation_loss, quantize_tensor
from compressor.quant.diffq import DiffQuantModel


def test_straight_through_gradient_reaches_shadow_weights(digits):
    torch.manual_seed(0)
    model = digits_mlp(32)
    x, y = digits.train.tensors[0][:32], digits.train.tensors[1][:32]
    sq = ShadowQuantizer(model, QuantConfig(bits=2, bucket_size=64))
    w0 = {n: p.detach().clone() for n, p in sq.plan.params.items()}
    # oracle: the gradient of the loss at Q(w), computed on a separate copy that holds Q(w)
    ref = copy.deepcopy(model)
    for n, p in ref.named_parameters():
        if n in w0:
            p.data = quantize_tensor(w0[n], 2, 64, layout="row").dequantize()
    F.cross_entropy(ref(x), y).backward()
    sq.quantize_()
    F.cross_entropy(model(x), y).backward()
    sq.restore_()
    for n, p in model.named_parameters():
        if n in w0:
            assert torch.equal(p.data, w0[n])  # shadow weights restored, full precision
        assert torch.allclose(p.grad, dict(ref.named_parameters())[n].grad, atol=1e-6)  # gradient taken at Q(w)
        assert p.grad.abs().sum() > 0
    # the optimizer then moves the shadow weights by that gradient
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for n, p in sq.plan.params.items():
        assert not torch.equal(p.data, w0[n])


def test_distillation_loss_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    T, a = 3.0, 0.6
    pt = F.softmax(t / T, 1)
    kl = (pt * (pt.log() - F.log_softmax(s / T, 1))).sum(1).mean()
    want = a * T * T * kl + (1 - a) * F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, T, a), want, atol=1e-5)
    # the reference's elementwise mean divides the KL term by the number of classes
    em = distillation_loss(s, t, y, T, a, "elementwise_mean")
    assert torch.allclose(em, a * T * T * kl / 10 + (1 - a) * F.cross_entropy(s, y), atol=1e-5)
    assert torch.allclose(distillation_loss(s, s, None, T, a), torch.tensor(0.0), atol=1e-6)
    with pytest.raises(InputError, match="output shape"):
        distillation_loss(s, t[:, :5], y)


def test_diffq_point_gradient_is_alpha_weighted_sum(digits):
    torch.manual_seed(0)
    model = digits_mlp(16)
    dq = DiffQuantModel(model, QuantConfig(bits=2, bucket_size=32, layout="row"))
    x, y = digits.train.tensors[0][:16], digits.train.tensors[1][:16]
    qw = dq.quantized_weights()
    # oracle: dL/dQ(w) with Q(w) as leaf tensors, then Σ_{i→j} α_b(i)·dL/dQ_i by hand
    leaves = {n: w.detach().clone().requires_grad_(True) for n, w in qw.items()}
    F.cross_entropy(torch.func.functional_call(model, leaves, (x,)), y).backward()
    F.cross_entropy(dq(x), y).backward()
    from compressor.quant.quantizer import bucketize

    for i, n in enumerate(dq.names):
        gq, _ = bucketize(leaves[n].grad, 32, "row")
        # padding copies of a row's last element also carry that element's gradient in the oracle only once
        k = dq._k[i]
        rows = model.get_parameter(n).shape[0]
        real = torch.zeros(rows, gq.numel() // rows)
        real[:, : model.get_parameter(n).numel() // rows] = 1
        real = real.reshape(-1, k)
        idx = dq.assign(dq._u[i], dq.points[i].detach())
        want = torch.zeros(4).index_add_(0, idx.flatten(), (gq * real * dq._alpha[i][:, None]).flatten())
        assert torch.allclose(dq.points[i].grad, want, atol=1e-6)
    # ties go to the upper point
    assert DiffQuantModel.assign(torch.tensor([0.25]), torch.tensor([0.0, 0.5, 1.0])).item() == 1


def test_diffq_trains_points_and_keeps_weights(digits):
    from compressor.quant.diffq import differentiable_quantization

    torch.manual_seed(0)
    model = digits_mlp(32)
    w0 = model.fc1.weight.detach().clone()
    qt, info = differentiable_quantization(model, digits.train, cfg=QuantConfig(bits=2, bucket_size=64), epochs=1, lr=1e-3,
                                           progress=False)
    q = qt["fc1.weight"]
    assert q.codebook is not None and torch.all(q.codebook[1:] >= q.codebook[:-1])
    assert torch.allclose(model.fc1.weight, q.dequantize())
    per_bucket = [len(torch.unique(r)) for r in q.codes]
    assert max(per_bucket) <= 4
    # the weight moved only onto the codebook: within one bucket's range of the original
    assert float((model.fc1.weight.detach() - w0).abs().max()) <= float(q.scale.max()) + 1e-6


def test_recipe_qdistill_end_to_end(tmp_path, trained_cnn):
    from compressor.api import compress

    rec = {"name": "t", "stages": [{"method": "qdistill", "bits": 4, "epochs": 1, "lr": 0.01, "export": ["qdq", "nbits"]}]}
    res = compress(trained_cnn, rec, data="digits", output=tmp_path / "out", measure_latency=False)
    st = res.report["stages"][0]["result"]
    assert st["accuracy_quantized"] > 0.9
    assert {d["layer"] for d in st["plan"]["kept_float"]} == {"bn1", "bn2", "bn3"}
    for fmt in ("qdq", "nbits"):
        e = st["exports"][fmt]
        assert (tmp_path / "out" / f"model.{fmt}.onnx").is_file()
        assert e["max_abs_diff_unoptimized"] < 1e-4
        assert e["bytes"] < e["fp32_bytes"] / 4
    assert st["exports"]["nbits"]["layers"]["fc1.weight"].startswith("MatMulNBits")
    # the returned model computes with the quantized weights: at most 16 values per row bucket
    w = res.model.fc1.weight.detach().reshape(64, 4, 256)
    assert max(len(torch.unique(b)) for b in w.reshape(-1, 256)) <= 16


def test_recipe_rejects_bad_bits():
    from compressor.recipe import parse_recipe

    with pytest.raises(RecipeError, match="bits"):
        parse_recipe({"name": "t", "stages": [{"method": "qdistill", "bits": 1}]})
    with pytest.raises(RecipeError, match="bits"):
        parse_recipe({"name": "t", "stages": [{"method": "qdistill", "bits": 16}]})


class FiveWay(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


def five_way():
    return FiveWay()


def test_teacher_student_mismatch_is_a_clear_error(trained_cnn):
    from compressor.api import compress

    rec = {"name": "t", "stages": [{"method": "qdistill", "epochs": 1, "student": "tests.test_qdistill:five_way", "export": []}]}
    with pytest.raises(CompressorError, match=r"teacher output shape \[2, 10\] differs from the student's \[2, 5\]"):
        compress(trained_cnn, rec, data="digits", measure_latency=False)


def test_smaller_student_via_factory(trained_cnn):
    from compressor.api import compress

    rec = {"name": "t", "stages": [{"method": "qdistill", "bits": 4, "epochs": 2, "lr": 0.05,
                                    "student": "compressor.models:digits_mlp", "export": []}]}
    res = compress(trained_cnn, rec, data="digits", measure_latency=False)
    assert isinstance(res.model, type(digits_mlp()))
    assert res.report["stages"][0]["result"]["accuracy_quantized"] > 0.6


def test_no_quantizable_layer_is_reported():
    from compressor.quant import plan_quantization

    with pytest.raises(InputError, match="no Conv or Linear"):
        plan_quantization(nn.Sequential(nn.BatchNorm1d(4)))
    plan = plan_quantization(digits_cnn(), quantize_first_last=False)
    assert "conv1.weight" not in plan.params and "fc.weight" not in plan.params and "fc1.weight" in plan.params


@pytest.mark.parametrize("name", ["qdistill-4bit", "qdistill-2bit", "int8-export"])
def test_shipped_recipes_validate(name):
    from compressor.recipe import load_recipe

    rec = load_recipe(name)
    st = rec.stages[0]
    assert st.method == "qdistill"
    assert st.params.bits == {"qdistill-4bit": 4, "qdistill-2bit": 2, "int8-export": 8}[name]
