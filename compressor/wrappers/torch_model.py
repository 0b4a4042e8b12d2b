"""A plain torch module: placed with ``compressor.device``, run batched (fp32 on CPU, AMP on CUDA), counted
with forward hooks, saved as a ``.pt2`` torch.export program plus a ``.safetensors`` state dict."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from compressor import device as devices
from compressor.checkpoint.shards import DTYPES
from compressor.errors import InputError
from compressor.masks import plain_copy
from compressor.wrappers.base import Model, is_input_mismatch, shape_mismatch


def deployable(module: nn.Module) -> nn.Module:
    """The module as deployed: itself, or a plain copy when it carries parametrizations (masks)."""
    from torch.nn.utils import parametrize

    return plain_copy(module) if any(parametrize.is_parametrized(m) for m in module.modules()) else module


def dedupe_shared(state: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embeddings): keep the first name only."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        key = v.data_ptr()
        if key in seen and v.numel() > 0:
            continue
        seen[key] = k
        out[k] = v
    return out


def cpu_state(module: nn.Module) -> dict:
    """The module's state dict as contiguous CPU tensors, shared tensors once (what safetensors writes)."""
    return dedupe_shared({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})


_ST_DTYPES = {dtype: name for name, dtype in DTYPES.items()}  # torch dtype -> safetensors' name for it


_ST_ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


def safetensors_size(module: nn.Module) -> int:
    """Bytes of the module's safetensors file (masks baked in, shared tensors once), counted without writing or
    copying a tensor (serialising a 4 GB model in memory to measure it took two more copies): the data, plus
    the JSON header safetensors writes (names, dtypes, shapes, offsets; padded to 8 bytes), its tensors laid
    out as safetensors lays them: by dtype (its enum order, largest first), then by name."""
    import json

    from compressor.masks import baked_state_dict

    state = baked_state_dict(module)
    if state is None:  # another parametrization: its baked values can have other shapes only in a copy
        state = plain_copy(module).state_dict()
    state = dedupe_shared(dict(state))
    header, offset = {}, 0
    for name in sorted(state, key=lambda k: (-_ST_ORDER.index(_ST_DTYPES.get(state[k].dtype, "F32")), k)):
        t = state[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES.get(t.dtype, "F32"), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")) if header else "{}"
    return 8 + len(text) + (-len(text)) % 8 + offset


def save_torch(module: nn.Module, path: Path, example_inputs: tuple | None = None) -> dict:
    """Save a torch model: a `.pt2` torch.export program (loads without the source code) when it exports,
    and always a `.safetensors` state dict next to it. Written atomically."""
    from safetensors.torch import save_file

    from compressor.utils.atomic import atomic_path

    path = Path(path)
    written = {}
    st_path = path.with_suffix(".safetensors")
    with atomic_path(st_path) as tmp:
        save_file(cpu_state(module), str(tmp))
    written["state_dict"] = str(st_path)
    if example_inputs is not None:
        try:
            args = devices.to_device(tuple(example_inputs), devices.module_device(module))
            ep = torch.export.export(module.eval(), args)
            buf = io.BytesIO()
            torch.export.save(ep, buf)
            with atomic_path(path.with_suffix(".pt2")) as tmp:
                tmp.write_bytes(buf.getvalue())
            written["program"] = str(path.with_suffix(".pt2"))
        except Exception as e:  # export is best effort; the state dict is always there
            written["program_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return written


class TorchModel(Model):
    kind = "torch"
    trains_on_tensors = True
    saved_as = "state_dict"  # the file kind save() writes

    @classmethod
    def build(cls, *, module=None, onnx=None, tokenizer=None, **fields) -> TorchModel:
        return cls(module, **fields)

    def __init__(self, module: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.module = module

    # placement -------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return devices.module_device(self.module)

    def to(self, device) -> TorchModel:
        self.module.to(devices.resolve(device))
        return self

    # inputs ------------------------------------------------------------------------------------------

    def make_example(self, data, input_shape=None, batch: int = 8):
        if data is not None and hasattr(data.test, "example"):  # batches of another structure (io.bundle.Batches)
            return data.test.example(batch, self.module)
        if data is not None and data.test is not None:
            return (data.test.tensors[0][:batch].clone(),)
        if self.example_inputs is not None:
            return tuple(self.example_inputs)
        if input_shape is not None:
            return (torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0)),)
        raise InputError("cannot tell what input this model takes", "pass --data (e.g. digits) or --input-shape C,H,W")

    def input_shape(self, example=None):
        for ex in (example, self.example_inputs):
            if isinstance(ex, tuple) and len(ex) == 1:
                return tuple(ex[0].shape[1:])
        return None

    def probe(self, example) -> None:
        from compressor.eval.runtime import forward

        try:
            with torch.no_grad():
                forward(self.module.eval(), example)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            if is_input_mismatch(e):
                raise shape_mismatch(example, e) from e
            raise

    def reference_inputs(self, data, example):
        """Inputs whose outputs the compressed model must agree with: held-out calibration samples, else the
        example batch."""
        if data is not None and data.task == "calibration" and data.test is not None:
            return data.test.tensors[0][:256]
        if isinstance(example, tuple):
            return example[0]
        return None

    # running -------------------------------------------------------------------------------------------

    def outputs(self, x, batch_size: int = 256) -> torch.Tensor:
        from compressor.eval.runtime import first_tensor, forward, run_batched

        if isinstance(x, dict):
            with torch.no_grad():
                return first_tensor(forward(self.module.eval(), x)[0]).float().cpu()
        return run_batched(self.module, x, batch_size, device=self.device)

    def runner(self, example):
        from compressor.eval.latency import torch_runner

        return torch_runner(deployable(self.module), example)

    def latency_runtime(self) -> str:
        return f"torch-{devices.label(self.device)}"

    # costs -----------------------------------------------------------------------------------------------

    def param_counts(self) -> tuple[int, int]:
        from compressor.eval.metrics import count_nonzero_params, count_params

        return count_params(self.module), count_nonzero_params(self.module)

    def macs(self, example) -> int:
        from compressor.eval.metrics import count_macs

        return count_macs(self.module, example)

    def size_bytes(self) -> int:
        return safetensors_size(self.module)

    # saving ------------------------------------------------------------------------------------------------

    def save(self, folder: Path, stem: str = "model", example=None) -> dict:
        args = tuple(example.values()) if isinstance(example, dict) else example if isinstance(example, tuple) else None
        return save_torch(plain_copy(self.module), Path(folder) / f"{stem}.pt2", args)

    def export_onnx(self, path: Path, example, *, atol: float = 1e-4, rtol: float = 1e-3) -> dict:
        # Traced and verified on the CPU in fp32: an ONNX file holds no device, and fp32 CPU is the reference.
        from compressor.export import export_onnx

        return export_onnx(plain_copy(self.module).cpu(), devices.to_device(example, "cpu"), path, atol=atol, rtol=rtol)
