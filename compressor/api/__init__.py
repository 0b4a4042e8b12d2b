"""Public entry points: compress(), evaluate_model(), export() and bench_kernels(). The CLI is a thin layer
over these.

compress(): load → validate everything (recipe, data, output path) → measure before → run the recipe on a
copy (the input is never modified) → measure after → write the model and report.json atomically. Beside it:
preflight (refusals from a Hugging Face folder's headers, before loading), streaming (a checkpoint cut tensor by
tensor instead of loaded) and result (the returned Result, the report's JSON conversion).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

import compressor.methods  # noqa: F401  (registers every recipe method)
from compressor import device as devices
from compressor import eval as ev
from compressor.api.analysis import analyze  # noqa: F401  (public: compressor.api.analyze)
from compressor.api.preflight import (  # noqa: F401
    _check_before_loading,
    _check_output,
    check_sweep_memory,
    folder_footprint,
)
from compressor.api.result import Result, _jsonable
from compressor.api.streaming import _compress_streaming, _streams
from compressor.errors import InputError
from compressor.io.data import DataBundle, check_compatible, check_label_range, load_data
from compressor.io.models import load_model
from compressor.io.sources import from_torch, with_functions
from compressor.recipe import (
    Recipe,
    StageContext,
    check_data,
    check_kinds,
    check_memory,
    load_recipe,
    needs_teacher,
    run_recipe,
)
from compressor.train import barrier, is_writer
from compressor.utils.atomic import write_text_atomic
from compressor.utils.memory import available_bytes, footprint
from compressor.wrappers import Model

# --------------------------------------------------------------------------------------------- inputs


def example_inputs_for(loaded: Model, data: DataBundle | None, input_shape: tuple[int, ...] | None = None, batch: int = 8):
    """Inputs to trace, time and verify with: from the data, the model file, or the given shape (the wrapper's answer)."""
    return loaded.make_example(data, input_shape, batch)


def load_for_device(model, device: str | None = "auto", *, arch: str | None = None, trust_pickle: bool = False) -> Model:
    """A model loaded (or wrapped) and placed on `device`; a caller's in-memory module is copied, never moved."""
    dev = devices.resolve(device)
    return load_model(model, arch=arch, trust_pickle=trust_pickle).on(dev)


def probe(loaded: Model, example) -> None:
    """Run the model once on the example inputs: a data/model mismatch (shape, dtype, number of inputs) is a
    one-line InputError here, before anything is written; any other failure is a bug and keeps its traceback."""
    loaded.probe(example)


def _inputs(loaded: Model, data, input_shape, seed: int, forward_fn=None, loss_fn=None):
    """(data bundle, example inputs) for a loaded model, checked to fit it; forward_fn / loss_fn (see
    io.bundle.Batches) travel with the bundle's samples."""
    known = tuple(input_shape) if input_shape is not None else loaded.input_shape()
    if data is None or isinstance(data, (DataBundle, str)):
        bundle = data if not isinstance(data, str) else load_data(data, input_shape=known, seed=seed)
    else:  # a torch Dataset, DataLoader or iterable of batches
        bundle = from_torch(data, seed=seed, forward_fn=forward_fn, loss_fn=loss_fn)
    bundle = with_functions(bundle, forward_fn, loss_fn)
    example = loaded.make_example(bundle, input_shape)
    check_compatible(bundle, loaded.input_shape(example))
    loaded.probe(example)
    if bundle is not None and bundle.task == "classification" and isinstance(example, tuple) and len(example) == 1:
        check_label_range(bundle, loaded.outputs(example[0][:1]))
    return bundle, example


# --------------------------------------------------------------------------------------------- compress


def _save_final(result: Model, artifacts: dict, output: Path, example) -> dict:
    """The compressed model in its natural format, unless a stage already wrote it."""
    files = dict(artifacts)
    if result.saved_as not in files:
        files.update(result.save(output, "model", example))
    return files


# Above this many bytes of weights the original is not reloaded to be timed beside the result (see compress)
UNPAIRED_LATENCY_BYTES, LATENCY_BUDGET_S = 1 << 30, 60.0


def _latency_bytes(fp, result: Model) -> int:
    """Memory timing the compressed model against the reloaded original takes: the original's weights, and a
    masked model's deployable copy (masks baked in), each plus a quarter for the load's and the copy's buffers."""
    from compressor.masks import has_masks

    copies = 2 if result.module is not None and has_masks(result.module) else 1
    return copies * fp.param_bytes * 5 // 4


def compress(model, recipe, data: str | DataBundle | None = None, output: str | Path | None = None, *,
             arch: str | None = None, trust_pickle: bool = False, teacher=None, seed: int = 0, resume: bool = False,
             overwrite: bool = False, input_shape: tuple[int, ...] | None = None, device: str | None = None,
             sparse_kernels: bool = False, measure_latency: bool = True, on_stage=None, forward_fn=None, loss_fn=None) -> Result:
    """Compress `model` (path or nn.Module or onnx.ModelProto) with `recipe` (path, shipped name, dict or Recipe).

    data: a data spec ("digits", "npz:PATH", "imagefolder:DIR", "hf:PATH", ... see docs/data.md), a DataBundle, or
    a torch Dataset / DataLoader / iterable of batches (materialised in memory, 25 % held out).
    forward_fn(model, batch) -> output and loss_fn(model, batch) -> loss: for batches that are not (x, y), e.g. dicts
    for Hugging Face models or (x, mask, y); used by training stages, Taylor importance and the quality measure
    (contract: compressor.io.bundle.Batches, docs/data.md).
    output: a folder for the model files and report.json; None keeps everything in memory (stages that need
    to write, like checkpoints, use a temporary folder).
    device: auto | cpu | cuda | cuda:N (compressor.device): where stages train and where the model is measured
    and timed (labelled so in the report); the compressed model is returned on the input model's device.
    """
    t0 = time.time()
    torch.manual_seed(seed)
    rec: Recipe = load_recipe(recipe)  # validate the recipe first: cheapest failure
    dev = devices.resolve(device)
    if _streams(model, rec, output):
        return _compress_streaming(Path(model), rec, Path(output).expanduser(), seed=seed, overwrite=overwrite,
                                   resume=resume, device=dev, t0=t0, on_stage=on_stage)
    _check_before_loading(model, rec, dev, teacher)
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle, keep_dtype=True)  # bf16 stays bf16 (recipe.MethodSpec.fp32)
    check_kinds(rec, loaded.kind)
    out_dir = Path(output).expanduser() if output is not None else None
    if out_dir is not None:
        _check_output(out_dir, loaded.path, overwrite, resume)
    bundle, example = _inputs(loaded, data, input_shape, seed, forward_fn, loss_fn)
    check_data(rec, bundle)  # a training stage without labels is refused now, not after the stages before it ran
    teacher_model = None
    if teacher is not None:
        teacher_model = load_model(teacher, arch=arch, trust_pickle=trust_pickle).module
        if teacher_model is None:
            raise InputError("the teacher must be a torch model", "pass a torch checkpoint as --teacher")
    # Only the copies the recipe needs (docs/memory.md): a model this call loaded is worked on in place (the file
    # is the original); a caller's object is copied (it is never modified). A teacher copy only for a stage that
    # distils after another stage changed the model.
    keep_teacher = teacher_model is None and loaded.module is not None and needs_teacher(rec)
    fp = dataclasses.replace(footprint(loaded.module, loaded.onnx), kind=loaded.kind)
    held = fp.param_bytes if keep_teacher or not loaded.owned else 0
    memory = check_memory(rec, fp, dev, held)  # refused before anything runs
    caller_device = loaded.device  # the compressed model goes back where the input model was
    original = loaded.on(dev)  # measured where the compressed model will be measured
    reference = ev.make_reference(original, bundle, example)  # computed once, up front
    before = ev.measure(original, bundle, reference, example)
    if loaded.path is not None:
        before["file_bytes"] = ev.file_size(loaded.path)
    # an LLM-size original is timed now and the result after the stages (not alternately): reloading it beside
    # the result to pair them would put two models in memory, the copy the run otherwise never makes
    timed_early = measure_latency and loaded.owned and fp.param_bytes > UNPAIRED_LATENCY_BYTES
    if timed_early:
        before["latency_ms"] = ev.timed(original.runner(example), budget_s=LATENCY_BUDGET_S)
        before["latency_runtime"] = original.latency_runtime()
    if loaded.owned:  # ours: the recipe runs on it, and the original is the file (reloaded to time it, if asked)
        work, original = loaded.to(caller_device), None
    else:
        work = loaded.copy()  # the recipe runs on a copy: the input is never modified
    if work.module is not None:
        work.module.eval()
    if out_dir is None:
        import tempfile

        workdir = Path(tempfile.mkdtemp(prefix="compressor-"))
    else:
        workdir = out_dir
        workdir.mkdir(parents=True, exist_ok=True)
    if keep_teacher:
        teacher_model = copy.deepcopy(work.module)
    ctx = StageContext(
        model=work.module, onnx_model=work.onnx, model_kind=loaded.kind, data=bundle, example_inputs=example,
        tokenizer=loaded.tokenizer, teacher=teacher_model, workdir=workdir, seed=seed, device=dev, resume=resume,
        recipe_hash=rec.hash, original=original,
    )
    del work
    stages = run_recipe(rec, ctx, on_stage)
    ctx.teacher = teacher_model = None
    result = loaded.with_state(module=ctx.model, onnx=ctx.onnx_model, tokenizer=ctx.tokenizer).to(dev)
    if result.module is not None:
        result.module.eval()
    example_after = _example_after(ctx, example)
    after = ev.measure(result, bundle, reference, example_after)
    # under torchrun every rank runs compress(); only rank 0 writes (the others wait for it at the end)
    writes = out_dir is not None and is_writer()
    files = _save_final(result, ctx.artifacts, out_dir, ctx.example_inputs) if writes else dict(ctx.artifacts)
    warnings_ = {k: files.pop(k) for k in [k for k in files if k.endswith("_error")]}
    kernels_report = None
    if sparse_kernels and ctx.model is not None:
        # Swapped after saving: files hold plain dense-layout weights (portable); the swap is a runtime choice
        # for torch inference on this device, verified output-identical by swap_sparse_kernels.
        from compressor.kernels.swap import swap_sparse_kernels

        kernels_report = swap_sparse_kernels(ctx.model, example, device=dev).to_dict()
    if timed_early:
        after["latency_ms"] = ev.timed(result.runner(example_after), budget_s=LATENCY_BUDGET_S)
        after["latency_runtime"] = result.latency_runtime()
        warnings_["latency_unpaired"] = (f"latency: the original ({fp.param_bytes / 1e9:.1f} GB of weights) was timed before "
                                         "the stages and the compressed model after them, not alternately in one loop")
        measure_latency = False
    if measure_latency and original is None and _latency_bytes(fp, result) > available_bytes(dev):
        warnings_["latency_error"] = ("latency not measured: reloading the original beside the compressed model "
                                      "would not fit in the memory available")
        measure_latency = False
    if measure_latency:  # timed alternately in one loop, on the device: a ratio that machine noise cannot fake
        if original is None:  # released while the stages ran: the file is the original
            original = load_model(model, arch=arch, trust_pickle=trust_pickle, keep_dtype=True).on(dev)
        # the compressed model as deployed: masks baked into plain weights, without the parametrization's multiply
        before["latency_ms"], after["latency_ms"] = ev.paired_latency(original.runner(example), result.runner(example_after))
        before["latency_runtime"], after["latency_runtime"] = original.latency_runtime(), result.latency_runtime()
    original = None
    result.to(caller_device)  # the compressed model is returned where the caller's model was
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
        "memory": {"available_bytes": available_bytes(dev), "estimates": memory, "teacher_copy": keep_teacher},
        "before": before,
        "after": after,
        "sparse_kernels": kernels_report,
        "files": {k: str(v) for k, v in files.items()},
        "warnings": warnings_,
        "seconds": round(time.time() - t0, 2),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "device": devices.label(dev)},
    }
    report = _jsonable(report)
    if writes:
        write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2))
    barrier()
    return Result(ctx.model, ctx.onnx_model, report, out_dir, files)


def prune(model, ratio: float, data: str | DataBundle | None = None, output: str | Path | None = None, *,
          importance: str = "l2", scope: str = "local", round_to: int | str = "auto", heads: bool = False,
          target: str = "channels", exporter: str = "auto", arch: str | None = None, trust_pickle: bool = False, seed: int = 0,
          overwrite: bool = False, input_shape: tuple[int, ...] | None = None, device: str | None = "auto",
          measure_latency: bool = True, on_stage=None, forward_fn=None, loss_fn=None) -> Result:
    """Structured group pruning of any model kind in one call: a one-stage `structured` recipe run by
    :func:`compress` (so it is verified, measured and saved like every recipe). ONNX input is cut in the graph;
    torch / Hugging Face input is cut in the module (and checked against the cut ONNX export); `exporter` picks
    the export the torch input is analysed on (auto: torch's default exporter, TorchScript as fallback). A Hugging
    Face safetensors folder with an output folder is cut tensor by tensor from its shards (docs/structured.md,
    "Large checkpoints")."""
    stage = {"method": "structured", "ratio": ratio, "importance": importance, "scope": scope, "round_to": round_to,
             "heads": heads, "target": target, "exporter": exporter}
    recipe = {"name": f"prune-{ratio:g}", "description": f"structured group pruning of {ratio:.0%} of the channels",
              "stages": [stage]}
    return compress(model, recipe, data, output, arch=arch, trust_pickle=trust_pickle, seed=seed, overwrite=overwrite,
                    input_shape=input_shape, device=device, measure_latency=measure_latency, on_stage=on_stage,
                    forward_fn=forward_fn, loss_fn=loss_fn)


def _example_after(ctx: StageContext, example):
    """A stage may change the model's inputs (e.g. ONNX pruning keeps them; HF stays token ids): reuse."""
    return ctx.example_inputs if ctx.example_inputs is not None else example


def evaluate_model(model, data: str | DataBundle | None = None, *, arch: str | None = None, trust_pickle: bool = False,
                   input_shape: tuple[int, ...] | None = None, seed: int = 0, latency: bool = True, device: str | None = None,
                   forward_fn=None) -> dict:
    """Size, cost and quality of one model (quality needs labelled data, text for HF models), measured on
    `device` (auto | cpu | cuda | cuda:N; a caller's module is copied there, never moved). forward_fn(model,
    batch): how to run the model on batches that are not (x, y) (see :func:`compress`)."""
    dev = devices.resolve(device)
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
    bundle, example = _inputs(loaded, data, input_shape, seed, forward_fn)
    m = ev.measure(loaded.on(dev), bundle, None, example, latency=latency)
    if loaded.path is not None:
        m["file_bytes"] = ev.file_size(loaded.path)
    return _jsonable(m)


def export(model, output: str | Path, *, data: str | DataBundle | None = None, input_shape: tuple[int, ...] | None = None,
           arch: str | None = None, trust_pickle: bool = False, atol: float = 1e-4, rtol: float = 1e-3,
           overwrite: bool = False, seed: int = 0) -> dict:
    """Export a torch model or HF folder to one ONNX file, verified against the source in onnxruntime
    (refuses on disagreement). The trace and the check run on the CPU in fp32: an ONNX file holds no device,
    and fp32 on the CPU is the reference every device is compared with. Returns the export report."""
    output = Path(output).expanduser()
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
    if loaded.module is None:
        raise InputError(f"{loaded.name} is already ONNX", "export takes a torch model or HF folder")
    if output.exists() and not overwrite:
        raise InputError(f"{output} exists", "choose another --output or pass --overwrite")
    if loaded.path is not None and output.resolve() == loaded.path.resolve():
        raise InputError("output path equals the input path", "choose another --output")
    _, example = _inputs(loaded, data, input_shape, seed)
    return loaded.export_onnx(output, example, atol=atol, rtol=rtol)


def bench_kernels(*, device: str | None = "auto", threads: str = "1", shapes: str = "768x768,4096x4096",
                  sparsities: str = "0.5,0.9,0.95", rows: str = "128,1", repeats: int = 5, conv: bool = False,
                  output: str | Path = Path("benchmarks/results/kernels.json")) -> dict:
    """Dense vs sparse Linear kernels timed side by side on `device` (CSR/BSR on CPU, 2:4 on CUDA); results
    merged per device into the JSON file `output`, which is returned as a dict."""
    from compressor.kernels.bench import run_bench

    dev = devices.resolve(device)
    return run_bench(device=dev, threads=_ints(threads, "--threads"), shapes=_shapes(shapes), sparsities=_floats(sparsities),
                     rows=_ints(rows, "--rows"), repeats=repeats, conv=conv, out=Path(output))


def _ints(spec: str, what: str) -> list[int]:
    try:
        return [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} {spec!r} is not a list of integers", f"e.g. {what} 1,2") from None


def _floats(spec: str) -> list[float]:
    try:
        values = [float(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--sparsities {spec!r} is not a list of numbers", "e.g. --sparsities 0.5,0.9") from None
    if not all(0.0 <= v < 1.0 for v in values):
        raise InputError(f"--sparsities {spec!r}: each must be in [0, 1)", "e.g. --sparsities 0.5,0.9")
    return values


def _shapes(spec: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) <= 0 for s in shapes):
        raise InputError(f"--shapes {spec!r} is not a list of OUTxIN weight shapes", "e.g. --shapes 768x768,4096x4096")
    return shapes
