"""Public entry points: compress() and evaluate_model(). The CLI is a thin layer over these.

compress(): load → validate everything (recipe, data, output path) → measure before → run the recipe on a
copy (the input is never modified) → measure after → write the model and report.json atomically.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compressor import evaluate as ev
from compressor.errors import InputError
from compressor.io.data import DataBundle, check_compatible, load_data
from compressor.io.inputs import example_inputs_for
from compressor.io.models import LoadedModel, load_model, save_torch
from compressor.recipe import Recipe, StageContext, check_kinds, load_recipe, run_recipe
from compressor.utils.atomic import write_text_atomic


@dataclass
class Result:
    """What compress() returns: the compressed model, the report (also written as report.json), files."""

    model: torch.nn.Module | None
    onnx_model: object | None
    report: dict
    output: Path | None
    files: dict = field(default_factory=dict)

    @property
    def before(self) -> dict:
        return self.report["before"]

    @property
    def after(self) -> dict:
        return self.report["after"]


# --------------------------------------------------------------------------------------------- inputs


def _model_input_shape(loaded: LoadedModel, example) -> tuple[int, ...] | None:
    if loaded.kind == "onnx":
        from compressor.onnx_utils import input_shape

        return input_shape(loaded.onnx)
    if isinstance(example, tuple) and len(example) == 1:
        return tuple(example[0].shape[1:])
    return None


def probe(loaded: LoadedModel, example) -> None:
    """Run the model once on the example inputs: a data/model mismatch fails here, before anything is written."""
    if loaded.module is None:
        return
    try:
        with torch.no_grad():
            ev._call(loaded.module.eval(), example)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        shapes = [list(v.shape) for v in (example.values() if isinstance(example, dict) else example)]
        raise InputError(f"the model does not run on inputs of shape {shapes}: {str(e).splitlines()[0][:160]}",
                         "give data shaped like the model input (or --input-shape)") from e


def _known_input_shape(loaded: LoadedModel, input_shape):
    if input_shape is not None:
        return tuple(input_shape)
    if loaded.kind == "onnx":
        from compressor.onnx_utils import input_shape as onnx_input_shape

        return onnx_input_shape(loaded.onnx)
    if loaded.example_inputs is not None and len(loaded.example_inputs) == 1:
        return tuple(loaded.example_inputs[0].shape[1:])
    return None


def _check_output(output: Path, loaded: LoadedModel, overwrite: bool, resume: bool) -> None:
    if loaded.path is not None:
        src = loaded.path.resolve()
        out = output.resolve()
        if out == src or src.is_relative_to(out) and out != Path("/"):
            raise InputError(f"output {output} would overwrite the input model", "choose another -o/--output folder")
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} exists and is a file", "give a folder path for -o/--output")
    if output.is_dir() and (output / "report.json").exists() and not (overwrite or resume):
        raise InputError(f"output folder {output} already holds a result (report.json)", "choose another -o, or pass --overwrite (or --resume)")


# --------------------------------------------------------------------------------------------- measuring


def _onnx_param_count(model) -> tuple[int, int]:
    from onnx import numpy_helper

    # BatchNormalization running mean / variance are buffers, not parameters (as in torch's count)
    stats = {n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (3, 4) if len(n.input) > i}
    total = nz = 0
    for init in model.graph.initializer:
        if init.name in stats:
            continue
        a = numpy_helper.to_array(init)
        if a.dtype.kind == "f":
            total += a.size
            nz += int(np.count_nonzero(a))
    return total, nz


def _state_bytes(model: torch.nn.Module) -> int:
    from safetensors.torch import save

    from compressor.io.models import _dedupe_shared
    from compressor.masks import plain_copy

    state = {k: v.detach().contiguous() for k, v in plain_copy(model).state_dict().items()}
    return len(save(_dedupe_shared(state)))


def measure(kind: str, module, onnx_model, data: DataBundle | None, example, reference: dict, tokenizer=None,
            latency: bool = True) -> dict:
    """Size, cost and quality of one model. `reference` holds the original model's outputs for fidelity."""
    m: dict = {}
    if kind == "onnx":
        m["params"], m["nonzero_params"] = _onnx_param_count(onnx_model)
        m["macs"] = ev.onnx_macs(onnx_model)
        blob = onnx_model.SerializeToString()
        m["size_bytes"] = len(blob)
        if latency:
            m["latency_ms"] = ev.latency_onnx(blob, example, runs=20, warmup=3)
            m["latency_runtime"] = "onnxruntime"
        if data is not None and data.task == "classification":
            m["accuracy"] = ev.accuracy_onnx(blob, data.test)
        elif "onnx_outputs" in reference:
            from compressor.onnx_utils import run

            out = torch.from_numpy(run(blob, reference["feeds"])[0])
            m.update(ev.output_agreement(out, reference["onnx_outputs"]))
        return m
    m["params"] = ev.count_params(module)
    m["nonzero_params"] = ev.count_nonzero_params(module)
    m["macs"] = ev.count_macs(module, example)
    m["size_bytes"] = _state_bytes(module)
    if latency:
        m["latency_ms"] = ev.latency_torch(module, example, runs=20, warmup=3)
        m["latency_runtime"] = f"torch-{ev.device_name()}"
    if data is not None and data.task == "classification" and data.test is not None:
        m["accuracy"] = ev.accuracy(module, data.test)
    elif kind == "hf" and tokenizer is not None and "embeddings" in reference:
        from compressor.hf import embed

        if hasattr(module, "generate") and hasattr(module, "lm_head"):
            m["perplexity"] = ev.perplexity(module, tokenizer, reference["texts"])
        else:
            e = embed(module, tokenizer, reference["texts"])
            m["embedding_fidelity"] = float((e * reference["embeddings"]).sum(1).mean())
    elif "outputs" in reference:
        out = ev.predict(module, reference["inputs"])
        m.update(ev.output_agreement(out, reference["outputs"]))
    return m


def _reference(kind, module, onnx_model, data, example, tokenizer) -> dict:
    ref: dict = {}
    if kind == "onnx":
        from compressor.onnx_utils import run

        ref["feeds"] = example
        ref["onnx_outputs"] = torch.from_numpy(run(onnx_model, example)[0])
    elif kind == "hf" and tokenizer is not None:
        from compressor.hf import corpus_sentences, embed

        texts = (data.test_texts if data is not None and data.test_texts else corpus_sentences()[1::2])[:128]
        ref["texts"] = texts
        if not (hasattr(module, "generate") and hasattr(module, "lm_head")):
            ref["embeddings"] = embed(module, tokenizer, texts)
        else:
            ref["embeddings"] = None
    elif data is not None and data.task == "calibration" and data.test is not None:
        ref["inputs"] = data.test.tensors[0][:256]
        ref["outputs"] = ev.predict(module, ref["inputs"])
    elif isinstance(example, tuple):
        ref["inputs"] = example[0]
        ref["outputs"] = ev.predict(module, example[0])
    return ref


# --------------------------------------------------------------------------------------------- compress


def _save_final(ctx: StageContext, output: Path) -> dict:
    """The compressed model in its natural format, unless a stage already wrote it."""
    from compressor.masks import plain_copy
    from compressor.onnx_utils import save_onnx_verified

    files = dict(ctx.artifacts)
    if ctx.model_kind == "onnx":
        if "onnx" not in files:
            files["onnx"] = save_onnx_verified(ctx.onnx_model, output / "model.onnx", ctx.example_inputs)["path"]
    elif ctx.model_kind == "hf":
        if "hf_folder" not in files:
            folder = output / "model"
            plain_copy(ctx.model).save_pretrained(folder)
            if ctx.tokenizer is not None:
                ctx.tokenizer.save_pretrained(folder)
            files["hf_folder"] = str(folder)
    elif "state_dict" not in files:
        args = ctx.example_inputs if isinstance(ctx.example_inputs, tuple) else None
        saved = save_torch(plain_copy(ctx.model), output / "model.pt2", args)
        files.update(saved)
    return files


def compress(model, recipe, data: str | DataBundle | None = None, output: str | Path | None = None, *,
             arch: str | None = None, trust_pickle: bool = False, teacher=None, seed: int = 0, resume: bool = False,
             overwrite: bool = False, input_shape: tuple[int, ...] | None = None, device: str | None = None,
             sparse_kernels: bool = False, measure_latency: bool = True, on_stage=None) -> Result:
    """Compress `model` (path or nn.Module or onnx.ModelProto) with `recipe` (path, shipped name, dict or Recipe).

    data: a data spec ("digits", "npz:PATH", "text:PATH", "random") or a DataBundle.
    output: a folder for the model files and report.json; None keeps everything in memory (stages that need
    to write, like checkpoints, use a temporary folder).
    """
    t0 = time.time()
    torch.manual_seed(seed)
    rec: Recipe = load_recipe(recipe)  # validate the recipe first: cheapest failure
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
    check_kinds(rec, loaded.kind)
    out_dir = Path(output).expanduser() if output is not None else None
    if out_dir is not None:
        _check_output(out_dir, loaded, overwrite, resume)
    bundle = data if isinstance(data, DataBundle) or data is None else load_data(data, input_shape=_known_input_shape(loaded, input_shape), seed=seed)
    example = example_inputs_for(loaded, bundle, input_shape)
    check_compatible(bundle, _model_input_shape(loaded, example))
    probe(loaded, example)
    teacher_model = None
    if teacher is not None:
        teacher_model = load_model(teacher, arch=arch, trust_pickle=trust_pickle).module
        if teacher_model is None:
            raise InputError("the teacher must be a torch model", "pass a torch checkpoint as --teacher")
    module = copy.deepcopy(loaded.module) if loaded.module is not None else None
    onnx_model = copy.deepcopy(loaded.onnx) if loaded.onnx is not None else None
    if module is not None:
        module.eval()
    if out_dir is None:
        import tempfile

        workdir = Path(tempfile.mkdtemp(prefix="compressor-"))
    else:
        workdir = out_dir
        workdir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device) if device else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    ctx = StageContext(
        model=module, onnx_model=onnx_model, model_kind=loaded.kind, data=bundle, example_inputs=example,
        tokenizer=loaded.tokenizer, teacher=teacher_model if teacher_model is not None else (copy.deepcopy(loaded.module) if loaded.module is not None else None),
        workdir=workdir, seed=seed, device=dev, resume=resume, recipe_hash=rec.hash, original=loaded,
    )
    reference = _reference(loaded.kind, loaded.module, loaded.onnx, bundle, example, loaded.tokenizer)
    before = measure(loaded.kind, loaded.module, loaded.onnx, bundle, example, reference, loaded.tokenizer, latency=False)
    if loaded.path is not None:
        before["file_bytes"] = ev.file_size(loaded.path)
    stages = run_recipe(rec, ctx, on_stage)
    if ctx.model is not None:
        ctx.model.cpu().eval()
    after = measure(ctx.model_kind, ctx.model, ctx.onnx_model, bundle, _example_after(ctx, example), reference, ctx.tokenizer, latency=False)
    files = _save_final(ctx, out_dir) if out_dir is not None else dict(ctx.artifacts)
    warnings_ = {k: files.pop(k) for k in [k for k in files if k.endswith("_error")]}
    kernels_report = None
    if sparse_kernels and ctx.model is not None:
        # Swapped after saving: files hold plain dense-layout weights (portable); the swap is a runtime choice
        # for torch inference on this device, verified output-identical by swap_sparse_kernels.
        from compressor.kernels.swap import swap_sparse_kernels

        kernels_report = swap_sparse_kernels(ctx.model, example).to_dict()
    if measure_latency:  # timed alternately in one loop: a ratio that machine noise cannot fake
        from compressor.masks import plain_copy

        run_before = ev.runner(loaded.kind, loaded.onnx.SerializeToString() if loaded.kind == "onnx" else loaded.module, example)
        # masks baked into plain weights: the model as deployed, without the parametrization's multiply
        run_after = ev.runner(ctx.model_kind, ctx.onnx_model.SerializeToString() if ctx.model_kind == "onnx" else plain_copy(ctx.model),
                              _example_after(ctx, example))
        before["latency_ms"], after["latency_ms"] = ev.paired_latency(run_before, run_after)
        before["latency_runtime"] = after["latency_runtime"] = "onnxruntime" if loaded.kind == "onnx" else f"torch-{ev.device_name()}"
    main_file = files.get("onnx") or files.get("program") or files.get("state_dict") or files.get("hf_folder")
    if main_file:
        after["file_bytes"] = ev.file_size(main_file)
    report = {
        "model": str(loaded.path) if loaded.path else type(loaded.module or loaded.onnx).__name__,
        "model_kind": loaded.kind,
        "model_format": loaded.format,
        "recipe": rec.to_dict(),
        "recipe_hash": rec.hash,
        "data": bundle.source if bundle is not None else None,
        "seed": seed,
        "stages": stages,
        "before": before,
        "after": after,
        "sparse_kernels": kernels_report,
        "files": {k: str(v) for k, v in files.items()},
        "warnings": warnings_,
        "seconds": round(time.time() - t0, 2),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "device": ev.device_name()},
    }
    report = _jsonable(report)
    if out_dir is not None:
        write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2))
    return Result(ctx.model, ctx.onnx_model, report, out_dir, files)


def _example_after(ctx: StageContext, example):
    """A stage may change the model's inputs (e.g. ONNX pruning keeps them; HF stays token ids): reuse."""
    return ctx.example_inputs if ctx.example_inputs is not None else example


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 64 else f"<tensor {list(obj.shape)}>"
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def evaluate_model(model, data: str | DataBundle | None = None, *, arch: str | None = None, trust_pickle: bool = False,
                   input_shape: tuple[int, ...] | None = None, seed: int = 0, latency: bool = True) -> dict:
    """Size, cost and quality of one model (quality needs labelled data, text for HF models)."""
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
    bundle = data if isinstance(data, DataBundle) or data is None else load_data(data, input_shape=_known_input_shape(loaded, input_shape), seed=seed)
    example = example_inputs_for(loaded, bundle, input_shape)
    check_compatible(bundle, _model_input_shape(loaded, example))
    probe(loaded, example)
    ref = {}
    if loaded.kind == "hf" and loaded.tokenizer is not None and hasattr(loaded.module, "generate") and hasattr(loaded.module, "lm_head"):
        from compressor.hf import corpus_sentences

        ref = {"texts": (bundle.test_texts if bundle is not None and bundle.test_texts else corpus_sentences()[1::2])[:128], "embeddings": None}
    m = measure(loaded.kind, loaded.module, loaded.onnx, bundle, example, ref, loaded.tokenizer, latency)
    if loaded.path is not None:
        m["file_bytes"] = ev.file_size(loaded.path)
    return _jsonable(m)
