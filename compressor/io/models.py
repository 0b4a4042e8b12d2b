"""Model loading: ONNX, torch.export `.pt2`, TorchScript, state dict / safetensors + `--arch`, Hugging Face
folders, and full pickled modules only with `trust_pickle=True` (pickle runs arbitrary code).

Every failure a user can cause is an InputError with the fix; inputs are only read, never modified.
"""

from __future__ import annotations

import importlib
import inspect
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from compressor.errors import InputError
from compressor.wrappers import Model, from_parts, wrap

MODEL_FORMATS = "ONNX (.onnx), torch.export (.pt2), TorchScript, state dict / safetensors with --arch, a Hugging Face folder"


def LoadedModel(kind: str, format: str = "object", *, module: nn.Module | None = None, onnx=None, path: Path | None = None,
                example_inputs: tuple | None = None, tokenizer=None, meta: dict | None = None, owned: bool = False) -> Model:
    """A model wrapper (compressor.wrappers) of the named kind, for callers that build one by hand
    (new code calls compressor.wrappers.wrap or load_model)."""
    return from_parts(kind, module=module, onnx=onnx, tokenizer=tokenizer, format=format, path=path,
                      example_inputs=example_inputs, meta=meta, owned=owned)


def _loaded(kind: str, format: str, **parts) -> Model:
    """A wrapper around a model this process loaded from a file (ours to move between devices)."""
    return LoadedModel(kind, format, owned=True, **parts)


def _import_factory(arch: str):
    mod_name, sep, attr = arch.partition(":")
    if not sep or not mod_name or not attr:
        raise InputError(f"--arch {arch!r} is not 'package.module:factory'", "e.g. --arch compressor.models:digits_cnn")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"cannot import module {mod_name!r} for --arch ({e})", "check the module is installed / on PYTHONPATH") from e
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise InputError(f"{mod_name} has no callable {attr!r}", "point --arch at a function or class that builds the model")
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: let the call speak for itself
        params = []
    required = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise InputError(f"--arch {arch} needs arguments ({', '.join(required)}); it is called with none",
                         "point --arch at a function that builds the model without arguments (write one in your module)")
    return factory


def _load_state_into(arch: str | None, state: dict, path: Path) -> nn.Module:
    if arch is None:
        raise InputError(f"{path.name} holds only weights (a state dict)", "also pass --arch package.module:factory that builds the model")
    model = _import_factory(arch)()
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {arch} returned {type(model).__name__}, not a torch nn.Module", "the factory must build an nn.Module")
    # Accept {"state_dict": ...} / {"model": ...} wrappers that training scripts commonly write.
    for key in ("state_dict", "model_state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_errors = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shape_errors:
        detail = "; ".join(([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {unexpected[:3]}"] if unexpected else [])
                           + shape_errors[:3])
        raise InputError(f"weights in {path.name} do not fit --arch {arch}: {detail}", "pass the factory the checkpoint was trained with")
    model.load_state_dict(state)
    return model.eval()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any("/code/" in n or n.startswith("code/") for n in names) and not any(n.endswith("/models/model.json") for n in names)


def _load_onnx(path: Path) -> Model:
    import onnx

    try:
        onnx.checker.check_model(str(path))  # from the path: any size (the in-memory checker serialises)
        model = onnx.load(str(path))  # with its external data
    except Exception as e:  # onnx raises DecodeError / ValidationError / others
        raise InputError(f"{path.name} is not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                         "re-export the model, or check the file is not truncated") from e
    return _loaded("onnx", "onnx", onnx=model, path=path)


def _load_torch_file(path: Path, arch: str | None, trust_pickle: bool) -> Model:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise InputError(f"{path.name} is not a valid safetensors file ({type(e).__name__})", "check the file is complete") from e
        return _loaded("torch", "safetensors", module=_load_state_into(arch, state, path), path=path)
    if suffix == ".pt2":
        try:
            ep = torch.export.load(str(path))
        except Exception as e:
            raise InputError(f"{path.name} is not a torch.export program ({type(e).__name__})", "save it with torch.export.save") from e
        example = getattr(ep, "example_inputs", None)
        args = example[0] if isinstance(example, tuple) and len(example) == 2 else None
        module = ep.module()
        for name in ("train", "eval"):  # ep.module() makes both raise; its graph's mode is fixed at export, so
            module.__dict__.pop(name, None)  # nn.Module's own (they set flags) are what every caller needs
        return _loaded("torch", "pt2", module=module, path=path, example_inputs=tuple(args) if args else None)
    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise InputError(f"{path.name} looks like TorchScript but does not load ({type(e).__name__})", "re-save it with torch.jit.save") from e
        return _loaded("torch", "torchscript", module=module.eval(), path=path)
    # A torch.save file: a state dict (safe to load) or a pickled module (only when trusted).
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        if not trust_pickle:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise InputError(f"{path.name} is a pickled Python object, which can run arbitrary code when loaded",
                                 "pass --trust-pickle if you trust its source, or save a state dict / torch.export program instead") from e
            raise InputError(f"{path.name} is not a model file this tool reads ({type(e).__name__})", f"supported: {MODEL_FORMATS}") from e
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e2:
            raise InputError(f"{path.name} does not load as a torch checkpoint ({type(e2).__name__})", f"supported: {MODEL_FORMATS}") from e2
    if isinstance(obj, nn.Module):
        return _loaded("torch", "pickle", module=obj.eval(), path=path)
    if isinstance(obj, dict):
        return _loaded("torch", "state_dict", module=_load_state_into(arch, obj, path), path=path)
    raise InputError(f"{path.name} holds a {type(obj).__name__}, not a model or state dict", f"supported: {MODEL_FORMATS}")


def load_model(model, *, arch: str | None = None, trust_pickle: bool = False, keep_dtype: bool = False) -> Model:
    """Load a model from a path (any supported format) into its wrapper, or wrap an in-memory nn.Module /
    ModelProto (a wrapper is returned as is). keep_dtype: a Hugging Face folder keeps its checkpoint dtype
    (default: float32)."""
    if not isinstance(model, str | os.PathLike):
        try:
            return wrap(model)  # a wrapper, nn.Module or onnx.ModelProto (never moved or modified)
        except InputError:
            raise InputError(f"cannot use a {type(model).__name__} as a model", f"pass a path ({MODEL_FORMATS}) or a torch nn.Module") from None
    path = Path(model).expanduser()
    if not path.exists():
        raise InputError(f"model not found: {path}", "check the path")
    if path.is_dir():
        from compressor.hf import is_hf_folder, load_hf_folder

        if not is_hf_folder(path):
            raise InputError(f"{path} is a folder without config.json", "pass a model file or a Hugging Face model folder")
        try:
            module, tok = load_hf_folder(path, keep_dtype=keep_dtype)
        except InputError:
            raise
        except Exception as e:  # transformers/safetensors/json raise many types for a damaged folder (as ONNX does)
            raise InputError(f"{path.name}: the Hugging Face folder does not load ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''})",
                             "check config.json and the weights are complete (re-save with save_pretrained)") from e
        return _loaded("hf", "hf", module=module, path=path, tokenizer=tok)
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] != b"PK" and path.suffix.lower() not in (".safetensors",) and head[:1] != b"\x80":
        # Not a zip (torch.save / TorchScript / .pt2) nor a legacy pickle: maybe ONNX without the suffix.
        try:
            return _load_onnx(path)
        except InputError:
            raise InputError(f"{path.name} is not a model file this tool reads", f"supported: {MODEL_FORMATS}") from None
    return _load_torch_file(path, arch, trust_pickle)
