"""The base of the model wrappers: what every kind of model (torch module, Hugging Face model + tokenizer,
ONNX graph) answers the same way, so the evaluation package and the API never ask "which kind is this?".

A wrapper owns: where the model runs (:meth:`Model.to` / :meth:`Model.on`, through ``compressor.device``),
the example inputs it is traced and timed with, its batched forward (:meth:`Model.outputs`, fp32 on CPU),
its task (decided once, at construction), its parameter / MAC counts and size, and how it is saved.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from compressor.errors import InputError

# What quality a model is judged by (the evaluation package measures it; the wrapper decides which).
ACCURACY, PERPLEXITY, EMBEDDING, AGREEMENT = "accuracy", "perplexity", "embedding_fidelity", "output_agreement"


class Model:
    """One model of any kind. Subclasses: TorchModel, HFModel, OnnxModel (see compressor.wrappers)."""

    kind: str = ""  # "torch" | "hf" | "onnx": the name recipes' `kinds` lists and reports use
    saved_as: str = ""  # the key of the file save() writes ("state_dict" | "hf_folder" | "onnx")
    module: torch.nn.Module | None = None
    onnx: object | None = None  # onnx.ModelProto
    tokenizer: object | None = None
    # What the methods ask instead of "which kind is this?":
    text_input = False  # takes token ids from a tokenizer (a Hugging Face text model)
    trains_on_tensors = False  # a plain torch module the training loop feeds tensor batches (x, y)
    fixed_dtype = False  # its dtype is fixed in the file (ONNX): no AMP, no dtype choice

    def __init__(self, *, format: str = "object", path: str | Path | None = None, example_inputs: tuple | None = None,
                 meta: dict | None = None, owned: bool = False):
        self.format = format  # onnx | pt2 | torchscript | pickle | state_dict | safetensors | hf | object
        self.path = Path(path) if path is not None else None
        self.example_inputs = tuple(example_inputs) if example_inputs is not None else None  # stored with the file
        self.meta = dict(meta or {})
        # True when this process made the model (loaded it from a file, copied it): it may be moved in place.
        # A caller's own object is never moved; measuring it on another device uses a copy (see `on`).
        self.owned = owned

    @classmethod
    def build(cls, *, module=None, onnx=None, tokenizer=None, **fields) -> Model:
        """A wrapper of this kind from its parts (what each kind needs of module / onnx / tokenizer)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- identity

    @property
    def name(self) -> str:
        return self.path.name if self.path else type(self.module if self.module is not None else self.onnx).__name__

    @property
    def task(self) -> str | None:
        """``causal-lm`` / ``classifier`` / ``encoder`` when the model says so (Hugging Face); None when only
        the data can tell (a plain torch module or ONNX graph)."""
        return None

    def quality_metric(self, data) -> str:
        """Which quality the model is judged by on `data`: labelled data → accuracy; a text model → perplexity
        (causal LM) or embedding fidelity; anything else → agreement with the original model's outputs."""
        if data is not None and getattr(data, "task", None) == "classification" and data.test is not None:
            return ACCURACY
        if self.tokenizer is not None and self.task == "causal-lm":
            return PERPLEXITY
        if self.tokenizer is not None and self.task in ("encoder", "classifier"):
            return EMBEDDING
        return AGREEMENT

    # ------------------------------------------------------------------------------------------- placement

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def to(self, device) -> Model:
        """Move the model to `device` (in place) and return self."""
        raise NotImplementedError

    def copy(self) -> Model:
        """An independent copy (deep copies of the module / graph; the tokenizer is shared); the copy is owned."""
        return self._clone(module=copy.deepcopy(self.module), onnx=copy.deepcopy(self.onnx))

    def on(self, device) -> Model:
        """This model on `device`: itself when it is there (or is ours to move), else a copy moved there, so a
        caller's module is never moved behind their back."""
        device = torch.device(device)
        if _same_device(self.device, device):
            return self
        return (self if self.owned else self.copy()).to(device)

    def with_state(self, *, module=None, onnx=None, tokenizer=None) -> Model:
        """A wrapper of the same kind around a changed model (e.g. a recipe's result), same file metadata."""
        return self._clone(module=module if module is not None else self.module, onnx=onnx if onnx is not None else self.onnx,
                           tokenizer=tokenizer if tokenizer is not None else self.tokenizer)

    def _clone(self, **parts) -> Model:
        clone = copy.copy(self)
        clone.meta = dict(self.meta)
        clone.owned = True
        for name, value in parts.items():
            setattr(clone, name, value)
        return clone

    # ------------------------------------------------------------------------------------------- inputs

    def make_example(self, data, input_shape: tuple[int, ...] | None = None, batch: int = 8):
        """Inputs to trace, time and verify with: from the data, the model file, or the given shape."""
        raise NotImplementedError

    def input_shape(self, example=None) -> tuple[int, ...] | None:
        """The shape of one sample (no batch dimension) this model takes, when it is known."""
        return None

    def probe(self, example) -> None:
        """Run the model once on `example`: a data/model mismatch fails here, before anything is written."""

    # ------------------------------------------------------------------------------------------- running

    def outputs(self, x, batch_size: int = 256) -> torch.Tensor:
        """The model's (first) output over `x` in batches, fp32 on the CPU."""
        raise NotImplementedError

    def runner(self, example):
        """A zero-argument callable running one forward on `example` as deployed (masks baked in)."""
        raise NotImplementedError

    def latency_runtime(self) -> str:
        """How a latency report names the runtime and the device it timed on."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- costs

    def param_counts(self) -> tuple[int, int]:
        """(parameters, non-zero parameters); tied parameters and normalisation statistics count as torch does."""
        raise NotImplementedError

    def macs(self, example) -> int:
        """Multiply-accumulates per sample of the Conv / Linear / MatMul layers."""
        raise NotImplementedError

    def size_bytes(self) -> int:
        """Bytes of the weights as saved (masks baked in, shared tensors once)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- saving

    def save(self, folder: Path, stem: str = "model", example=None) -> dict:
        """Write the model in its natural format into `folder`; returns {file kind: path}."""
        raise NotImplementedError

    def export_onnx(self, path: Path, example, *, atol: float = 1e-4, rtol: float = 1e-3) -> dict:
        """Write a verified ONNX file of the model; returns the export report."""
        raise NotImplementedError


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.type != "cuda" or (a.index or 0) == (b.index or 0)


def shape_mismatch(example, error: Exception) -> InputError:
    """The one-line input error for a model that does not run on the given inputs."""
    values = example.values() if isinstance(example, dict) else example if isinstance(example, tuple | list) else (example,)
    shapes = [list(v.shape) for v in values if hasattr(v, "shape")]
    return InputError(f"the model does not run on inputs of shape {shapes}: {str(error).splitlines()[0][:160] if str(error) else type(error).__name__}",
                      "give data shaped like the model input (or --input-shape)")


# Phrases of torch / Python errors that say the inputs do not fit the model (shape, dtype, count of inputs):
# only those are a user's mistake. Any other failure in the probe is a bug and keeps its traceback.
_MISMATCH_PHRASES = (
    "shape", "size", "dimension", "channels", "mat1 and mat2", "scalar type", "dtype", "weight type",
    "positional argument", "keyword argument", "index out of range", "must match", "expected input", "to unpack",
    "expected 2d", "expected 3d", "expected 4d", "expected 5d", "batched",
)


def is_input_mismatch(error: Exception) -> bool:
    """True when `error` (raised by running a model on given inputs) is a shape / dtype / arity mismatch."""
    if not isinstance(error, RuntimeError | ValueError | IndexError | TypeError):
        return False
    text = str(error).lower()
    return any(p in text for p in _MISMATCH_PHRASES)
