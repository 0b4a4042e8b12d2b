"""Every stage on CUDA (`pytest -m gpu`, `make test-gpu`): skipped cleanly, with the reason, without a GPU.

Each recipe method runs on a tiny model through the pipeline with device cuda; the oracles are the same as on
CPU and independent of the device code: the method's own invariants (sparsity reached, masks respected, shapes
cut, files verified by onnxruntime on export), results back on the caller's device, and the evaluation paths
agreeing with a CPU evaluation of the same model. DDP: a 1-GPU nccl world of size 1 and (with >= 2 GPUs) a
2-rank nccl run whose ranks end identical, each on its own GPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

CUDA = torch.cuda.is_available()
N_GPUS = torch.cuda.device_count() if CUDA else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="torch.cuda.is_available() is False: no CUDA device on this machine"),
]
two_gpus = pytest.mark.skipif(N_GPUS < 2, reason=f"needs 2 CUDA devices, this machine has {N_GPUS}")


def _cnn():
    from compressor.models import digits_cnn

    torch.manual_seed(0)
    return digits_cnn()


def _run_stage(stage: dict, model: nn.Module, data, tmp_path: Path, kind: str = "torch", example=None, tokenizer=None):
    """One stage through run_recipe on cuda:0, the model handed over on the CPU (as the API does)."""
    from compressor.recipe import StageContext, parse_recipe, run_recipe

    if example is None:
        example = (data.train.tensors[0][:2],)
    model.eval()  # as the API hands it over
    ctx = StageContext(model=model, data=data, workdir=tmp_path, device=torch.device("cuda", 0), model_kind=kind,
                       example_inputs=example, teacher=copy.deepcopy(model), tokenizer=tokenizer)
    (rep,) = run_recipe(parse_recipe({"name": "gpu", "stages": [stage]}), ctx)
    return ctx, rep["result"] if "result" in rep else rep


@pytest.fixture(scope="module")
def digits():
    from compressor.io.data import load_data

    return load_data("digits")


def _sparsity(model: nn.Module) -> float:
    from compressor import masks as M

    return M.sparsity_report(model)["sparsity_masked"]


def test_device_policy_on_this_gpu():
    from compressor import device as D

    assert D.resolve("auto") == torch.device("cuda", 0)
    assert D.amp_dtype("cuda") in (torch.bfloat16, torch.float16)
    assert D.label("cuda:0").startswith("cuda:0 (")
    assert D.process_group_backend("cuda:0") == "nccl" and D.process_group_backend("cpu") == "gloo"


def test_finetune_on_cuda_returns_on_the_callers_device(digits, tmp_path):
    ctx, res = _run_stage({"method": "finetune", "epochs": 0.2}, _cnn(), digits, tmp_path)
    assert res["steps"] > 0 and res["accuracy_after"] is not None
    assert all(p.device.type == "cpu" for p in ctx.model.parameters())


def test_train_api_with_explicit_cuda_comes_back(digits):
    from compressor.train import train

    m = _cnn()
    info = train(m, digits.train, steps=5, batch_size=32, device="cuda", progress=False)
    assert info["steps"] == 5 and all(p.device.type == "cpu" for p in m.parameters())
    m = _cnn().cuda()
    train(m, digits.train, steps=3, batch_size=32, progress=False)  # no device: stays on the model's GPU
    assert all(p.device == torch.device("cuda", 0) for p in m.parameters())


@pytest.mark.parametrize("stage, expect", [
    ({"method": "magnitude", "sparsity": 0.5, "scope": "global"}, 0.5),
    ({"method": "magnitude", "pattern": "2:4", "on_indivisible": "skip"}, None),
    ({"method": "gradual", "final_sparsity": 0.7, "epochs": 0.5, "frequency": 2}, 0.7),
])
def test_unstructured_methods_on_cuda(digits, tmp_path, stage, expect):
    ctx, res = _run_stage(stage, _cnn(), digits, tmp_path)
    s = _sparsity(ctx.model)
    if expect is not None:
        assert s == pytest.approx(expect, abs=0.02)
    else:
        assert s > 0.3
    assert all(p.device.type == "cpu" for p in ctx.model.parameters())


def test_imp_rewind_on_cuda(digits, tmp_path):
    ctx, res = _run_stage({"method": "imp_rewind", "levels": 2, "fraction": 0.3, "rewind_steps": 2, "epochs": 0.2,
                           "batch_size": 64}, _cnn(), digits, tmp_path)
    assert len(res["levels"]) == 3 and res["final_sparsity"] == pytest.approx(1 - 0.7 ** 2, abs=0.02)
    assert any((tmp_path / "checkpoints").rglob("level_002.pt"))


def test_structured_on_cuda_rounds_widths_for_tensor_cores(digits, tmp_path):
    ctx, res = _run_stage({"method": "structured", "ratio": 0.3, "protect_output": False}, _cnn(), digits, tmp_path)
    assert res["round_to"] == 8
    widths = [m.out_channels for m in ctx.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths


def test_structured_latency_target_on_cuda(tmp_path):
    from compressor.methods.structured import StructuredParams, structured_torch

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))
    p = StructuredParams(target="latency", latency_target=0.7, latency_batch=64, protect_output=False)
    rep = structured_torch(m, (torch.randn(2, 3, 56, 56),), p, device=torch.device("cuda", 0))
    ls = rep["latency_search"]
    assert ls["timing"] == "cuda graph" and ls["device"].startswith("cuda:0")
    assert ls["reached"] and ls["tries"][-1]["relative"] <= 0.7


def test_essential_sparsity_on_cuda(digits, tmp_path):
    ctx, res = _run_stage({"method": "essential_sparsity", "grid": "0:0.9:0.3", "apply": "knee"}, _cnn(), digits, tmp_path)
    assert res is not None and all(p.device.type == "cpu" for p in ctx.model.parameters())


def test_sara_on_cuda(digits, tmp_path):
    ctx, res = _run_stage({"method": "sara", "fraction": 0.1, "steps": 10, "batch_size": 32, "rank_min_dim": 16,
                           "progressive": 0.5}, _cnn(), digits, tmp_path)
    assert res["steps"] == 10 and res["reselected"]
    assert not any("parametrizations" in n for n, _ in ctx.model.named_parameters())


def test_sara_python_api_on_a_cuda_model(digits):
    """The caller's model and tensors on the GPU: everything stays there (the inverse of the CPU case)."""
    from compressor.sara import SaRAOptimizer
    from compressor.train import train

    m = _cnn().cuda()
    opt = SaRAOptimizer(m, fraction=0.1, penalize="update", rank_min_dim=16, progressive_step=3)
    train(m, digits.train, steps=6, batch_size=32, optimizer=opt, progress=False)
    opt.adapter.merge()
    x = digits.test.tensors[0][:4].cuda()
    assert m(x).device == x.device


@pytest.mark.parametrize("variant", ["quantized_distillation", "differentiable_quantization"])
def test_qdistill_on_cuda_exports_verified_onnx(digits, tmp_path, variant):
    ctx, res = _run_stage({"method": "qdistill", "bits": 4, "epochs": 0.2, "variant": variant, "export": ["qdq"]},
                          _cnn(), digits, tmp_path)
    assert (tmp_path / "model.qdq.onnx").is_file() and res["exports"]["qdq"]


def test_export_after_cuda_training(digits, tmp_path):
    from compressor.api import compress

    res = compress(_cnn(), {"name": "ft-export", "stages": [{"method": "finetune", "epochs": 0.2}, {"method": "export"}]},
                   digits, tmp_path / "out", device="cuda")
    assert (tmp_path / "out" / "report.json").is_file() and res.files.get("onnx")


def test_replaceme_on_cuda():
    transformers = pytest.importorskip("transformers")
    from compressor.methods.replaceme import prune

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(1))
    pruned, rep = prune(model, ids, n_blocks=1, device="cuda")
    assert pruned.config.num_hidden_layers == 3
    dev = next(pruned.parameters()).device
    with torch.no_grad():
        assert torch.isfinite(pruned(ids[:2].to(dev)).logits).all()


def test_evaluation_paths_agree_with_cpu(digits):
    from compressor.eval import accuracy, run_batched

    m = _cnn().eval()
    acc_cpu = accuracy(copy.deepcopy(m), digits.test)
    acc_gpu = accuracy(copy.deepcopy(m).cuda(), digits.test)
    assert acc_gpu == pytest.approx(acc_cpu, abs=0.02)  # bf16 autocast may flip a few near-ties
    logits = run_batched(copy.deepcopy(m), digits.test.tensors[0], batch_size=64, device="cuda")
    ref = m(digits.test.tensors[0]).detach()
    assert (logits.float().cpu().argmax(1) == ref.argmax(1)).float().mean() > 0.97


def test_sparse_kernels_on_cuda_decide_by_measurement():
    from compressor.kernels import calibrate as KC

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=g) * torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(1024)
    d = KC.choose_format(w, "cuda", rows=4096, mode="auto", cache=KC.DecisionCache())
    assert d.source == "measured" and "dense" in d.timings_ms
    if d.format == "dense":
        assert "kept dense" in d.reason and "x (" in d.reason
    else:  # kept only where it measured faster
        assert d.speedup is None or d.speedup >= 1.0


# ------------------------------------------------------------------------------------------------ DDP on GPUs


def _torchrun(n: int, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--standalone", __file__, str(tmp_path)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _ddp_worker(out_dir: str) -> None:
    import torch.distributed as dist

    from compressor.device import process_group_backend
    from compressor.io.data import load_data
    from compressor.train import ddp_context, train, training_device

    m = _cnn()
    dev = training_device(m, "cuda")
    if os.environ.get("WORLD_SIZE") == "1":  # torchrun does not make a group for one rank: start one (nccl, world 1)
        torch.cuda.set_device(dev)
        dist.init_process_group(process_group_backend(dev))
    rank, world = ddp_context(dev)
    assert dist.get_backend() == "nccl" and dev == torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    train(m, load_data("digits").train, steps=6, batch_size=16, device="cuda", progress=False)
    # parameters only: BatchNorm running stats are per rank (DDP broadcasts rank 0's before each forward)
    torch.save({"state": {k: v.detach().cpu() for k, v in m.named_parameters()}, "device": str(dev)}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_nccl_world_of_one(tmp_path):
    proc = _torchrun(1, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / "rank0.pt", weights_only=True)["device"] == "cuda:0"


@two_gpus
def test_ddp_nccl_two_ranks_each_on_its_gpu(tmp_path):
    proc = _torchrun(2, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (r0["device"], r1["device"]) == ("cuda:0", "cuda:1")
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k], rtol=0, atol=0)


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
