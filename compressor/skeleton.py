"""Weightless ONNX graphs of Hugging Face models: the structure of a checkpoint without its weights.

The model is built from its config on the meta device (no storage), traced by torch.export and translated by
the dynamo ONNX exporter; every tensor that has no data (parameters, buffers built on meta) becomes an
initializer with its name, dtype and dims and an external-data reference to nothing. The proto holds no
weight bytes, so a 70 B layout is a few MB of graph and protobuf's 2 GiB limit never applies. Graph
constants the exporter writes itself (reshape targets, shape arithmetic) keep their values.

Initializer names are the checkpoint's state-dict names (``model.layers.0.mlp.up_proj.weight``, no wrapper
prefix). A tied weight (``lm_head.weight`` = ``model.embed_tokens.weight``) is one initializer, under the
first name the module lists; ``aliases`` maps every other name to it.

Values, when a caller needs them (importance: L2 norms), come from the folder's safetensors shards one tensor
at a time (``CheckpointArrays``); a bare config.json has none (``NoWeights`` says so in one line).

    sk = skeleton_onnx(load_config(path))       # path: HF folder or config.json; sk.proto, sk.aliases
    read = CheckpointReader(folder, sk.aliases, sk.prefix)   # name -> float32 ndarray, one tensor per call

compressor.graph.weightless.analyze_hf(path) turns both into an Analysis.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.errors import InputError
from compressor.task import hf_task
from compressor.utils.phases import Phases

OPSET = 18  # the dynamo exporter's own opset (it would convert down otherwise)
NOWHERE = "weightless"  # the external-data location of every weight: no file of that name is ever written


def config_path(path: str | Path) -> Path:
    """The config.json of an HF folder, or the file itself."""
    p = Path(path)
    c = p / "config.json" if p.is_dir() else p
    if not c.is_file() or c.name != "config.json" and c.suffix != ".json":
        raise InputError(f"{path}: no config.json", "pass a Hugging Face folder or its config.json")
    return c


def is_config_only(path: str | Path) -> bool:
    """A config.json, or a folder with a config.json and no safetensors weights."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".json"
    return p.is_dir() and (p / "config.json").is_file() and not any(p.glob("*.safetensors"))


def load_config(path: str | Path):
    from compressor.hf import _require_transformers

    transformers = _require_transformers()
    c = config_path(path)
    try:
        return transformers.AutoConfig.from_pretrained(c.parent if c.name == "config.json" else c,
                                                       local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise InputError(f"{c}: not a usable transformers config ({str(e).splitlines()[0][:120]})",
                         "check model_type and the fields of config.json") from e


def meta_model(config) -> nn.Module:
    """The transformers model of `config` (the head its task calls for, eager attention, float32, eval) with
    every parameter and buffer on the meta device: no memory for weights."""
    from compressor.hf import _require_transformers

    transformers = _require_transformers()
    cls = {"causal-lm": transformers.AutoModelForCausalLM, "classifier": transformers.AutoModelForSequenceClassification,
           "encoder": transformers.AutoModel}[hf_task(config)]
    was = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # checkpoints are analysed (and scored) as float32, as load_hf_folder does
    try:
        with torch.device("meta"):
            try:
                model = cls.from_config(config, attn_implementation="eager", dtype=torch.float32)
            except (ValueError, TypeError):
                model = cls.from_config(config, dtype=torch.float32)
    finally:
        torch.set_default_dtype(was)
    _real_buffers(model)
    return model.eval()


def _real_buffers(model: nn.Module) -> None:
    """Give the non-persistent buffers (rotary inv_freq, position ids: small, computed from the config, not in
    the checkpoint) their real values on the CPU, as transformers' loader does: the trace then keeps them as
    constants with values. Parameter initialisation on meta costs nothing."""
    named = getattr(model, "named_non_persistent_buffers", None)
    if named is None:
        return
    for key, buf in list(named()):
        mod, _, attr = key.rpartition(".")
        owner = model.get_submodule(mod) if mod else model
        owner._buffers[attr] = torch.empty_like(buf, device="cpu")
    with torch.no_grad():
        model.initialize_weights()


class _Tokens(nn.Module):
    """Token ids and mask in, the first output out (last_hidden_state / logits), as compressor.export feeds HF
    models; `net` is stripped from the initializer names afterwards."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, input_ids, attention_mask):
        out = self.net(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        for key in ("last_hidden_state", "logits"):
            v = getattr(out, key, None)
            if v is not None:
                return v
        return out[0]


def aliases_of(model: nn.Module) -> dict[str, str]:
    """{other name: the name the graph uses} for tied tensors (one storage under several names)."""
    out: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        k = id(t)
        if k in first:
            out[name] = first[k]
        else:
            first[k] = name
    return out


@dataclasses.dataclass
class Skeleton:
    proto: object  # onnx.ModelProto: inputs input_ids, attention_mask (batch 2, sequence 8); no weight bytes
    aliases: dict[str, str]  # tied names -> the initializer name (lm_head.weight -> model.embed_tokens.weight)
    prefix: str  # the base model's attribute in the head class ("model", "transformer", "bert"; "" if none)

    def weightless(self) -> dict[str, tuple[int, ...]]:
        """{initializer: dims} of every tensor without data (what a checkpoint must provide)."""
        return {i.name: tuple(i.dims) for i in self.proto.graph.initializer if i.data_location == 1}


def skeleton_onnx(config, *, repeat: bool = True, phases: Phases | None = None) -> Skeleton:
    """The weightless ONNX graph of the model `config` describes. Raises whatever the trace raises (callers
    fall back to a full export).

    repeat: when the layers are one module repeated (same class, same tensor shapes, no per-layer types), trace
    two of them and copy the second for the others (compressor's graph of a deep model in the time of a
    two-layer one); anything that does not line up falls back to tracing every layer.
    phases: gets the seconds of "model" (meta-device build), "export" (torch.export), "onnx" (the exporter's
    decomposition and translation), "repeat" (layer copies)."""
    phases = Phases.optional(phases)
    with phases("model"):
        model = meta_model(config)
        aliases = aliases_of(model)
        prefix = getattr(model, "base_model_prefix", "") or ""
        prefix = prefix if prefix and hasattr(model, prefix) else ""
        path = _layer_stack(model, config) if repeat else None
        small = meta_model(_with_layers(config, 2)) if path is not None else None
    proto = None
    if path is not None:
        traced = _trace(small, aliases_of(small), phases=phases)
        with phases("repeat"):
            proto = repeat_layers(traced, path, len(model.get_submodule(path)))
    if proto is None:
        proto = _trace(model, aliases, phases=phases)
    with phases("repeat"):
        _drop_metadata(proto)
    return Skeleton(proto, aliases, prefix)


def import_exporter() -> None:
    """Import what the trace imports on first use (torch.export, the dynamo exporter, onnxscript, onnx_ir:
    seconds of module loading), so a caller can time it apart from the trace."""
    import importlib

    for name in ("onnx_ir", "onnxscript", "torch.export", "torch.onnx._internal.exporter._core"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


LIFTED_MAX = 1024  # elements: forward-created tensors up to this size are literals in the skeleton


def _trace(model: nn.Module, aliases: dict[str, str], batch: int = 2, sequence: int = 8, dynamic: bool = False,
           phases: Phases | None = None):
    """ONNX proto of `model` (meta tensors) through torch.export and the dynamo exporter; weights become
    external references to nothing, named by their state-dict names; node metadata kept (name scopes).

    dynamic: trace with a symbolic batch and sequence. Off by default: the groups do not depend on it (the
    tests compare the static skeleton with a dynamic full-weight export) and the symbolic shape arithmetic made
    the trace and the exporter's decomposition about 3x slower (TinyLlama layout: 5.5 s -> 2.0 s)."""
    import onnx_ir

    phases = Phases.optional(phases)
    ids = torch.zeros(batch, sequence, dtype=torch.long, device="meta")
    mask = torch.ones(batch, sequence, dtype=torch.long, device="meta")
    b = s = torch.export.Dim.DYNAMIC  # ranges (a maximum sequence from the position table) are inferred
    shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}} if dynamic else None
    with _quiet():
        with phases("export"):
            ep = torch.export.export(_Tokens(model), (ids, mask), strict=False, dynamic_shapes=shapes)
        with phases("onnx"):
            program = torch.onnx.export(ep, dynamo=True, optimize=False, opset_version=OPSET,
                                        input_names=["input_ids", "attention_mask"], verbose=False)
    graph = program.model.graph
    stored = set(model.state_dict(keep_vars=True))
    for value in list(graph.initializers.values()):
        t = value.const_value
        name = value.name[len("net."):] if value.name.startswith("net.") else value.name
        name = aliases.get(name, name)  # a tied weight goes by its first name, the one checkpoints store
        if t is not None and getattr(t, "raw", None) is not None and getattr(t.raw, "is_meta", False):
            if name not in stored and t.size <= LIFTED_MAX:
                # a small tensor the forward creates on the inputs' (meta) device, e.g. a mask's fill value
                # (transformers 5.9's `lifted_tensor_0`): no checkpoint holds it and its value never couples
                # channels, so it becomes a zero literal of its dtype and shape rather than a weight to look up
                value.const_value = onnx_ir.Tensor(np.zeros(tuple(t.shape), dtype=t.dtype.numpy()), name=name)
            else:
                value.const_value = onnx_ir.ExternalTensor(NOWHERE, offset=0, length=t.nbytes, dtype=t.dtype,
                                                           shape=t.shape, name=name)
        if name != value.name:
            graph.initializers.pop(value.name)
            value.name = name
            graph.initializers[name] = value
    with phases("onnx"):
        return onnx_ir.serde.serialize_model(program.model)


def _layer_stack(model: nn.Module, config) -> str | None:
    """Path of the ModuleList of the model's layers ("model.layers") when its layers are interchangeable:
    more than two, one class, the same tensor names and shapes, and no per-layer types in the config."""
    n = getattr(config, "num_hidden_layers", None)
    types = getattr(config, "layer_types", None)
    if not isinstance(n, int) or n <= 2 or (types and len(set(types)) > 1):
        return None
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            shapes = [[(k, tuple(t.shape)) for k, t in layer.state_dict(keep_vars=True).items()] for layer in mod]
            if len({type(layer) for layer in mod}) == 1 and all(x == shapes[0] for x in shapes):
                return path
            return None
    return None


def _with_layers(config, n: int):
    c = copy.deepcopy(config)
    c.num_hidden_layers = n
    if getattr(c, "layer_types", None):
        c.layer_types = c.layer_types[:n]
    return c


def _layer_of(node, scope: str) -> int | None:
    """The layer index of a traced node (from the exporter's name scopes: "net.model.layers.1"), else None."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            for sc in ast.literal_eval(p.value):
                if sc.startswith(scope):
                    head = sc[len(scope):].split(".", 1)[0]
                    if head.isdigit():
                        return int(head)
            return None
    return None


def repeat_layers(proto, path: str, n: int):
    """The two-layer proto with layer 1 copied as layers 2..n-1 (weights renamed ``{path}.1.`` ->
    ``{path}.{k}.``, values suffixed), wired in sequence: a copy reads from the previous layer what layer 1 read
    from layer 0, and what followed layer 1 reads the last copy. None when the layers do not line up."""
    g = proto.graph
    scope = f"net.{path}."
    layer = [_layer_of(node, scope) for node in g.node]
    l1 = [node for node, k in zip(g.node, layer, strict=True) if k == 1]
    # the exporter writes a literal once, where it is first used, and later layers reuse it: constants are not
    # part of the correspondence (layer 1's own are copied with it, layer 0's stay shared)
    a0 = [node for node, k in zip(g.node, layer, strict=True) if k == 0 and node.op_type != "Constant"]
    a1 = [node for node in l1 if node.op_type != "Constant"]
    if not a0 or [x.op_type for x in a0] != [x.op_type for x in a1] or any(
            len(a.output) != len(b.output) for a, b in zip(a0, a1, strict=True)):
        return None
    out1 = {o for node in l1 for o in node.output}
    twin = {o0: o1 for a, b in zip(a0, a1, strict=True) for o0, o1 in zip(a.output, b.output, strict=True)}
    w1 = f"{path}.1."
    inits = [t for t in g.initializer if t.name.startswith(w1)]

    def name_in(k: int, v: str) -> str:
        return v if k == 1 else f"{v}__layer{k}"

    copies = []
    for k in range(2, n):
        for node in l1:
            c = type(node)()
            c.CopyFrom(node)
            c.name = f"{node.name}__layer{k}"
            del c.metadata_props[:]
            for i, v in enumerate(node.input):
                if v in out1:
                    c.input[i] = name_in(k, v)
                elif v in twin:
                    c.input[i] = name_in(k - 1, twin[v])
                elif v.startswith(w1):
                    c.input[i] = f"{path}.{k}.{v[len(w1):]}"
            for i, v in enumerate(node.output):
                c.output[i] = name_in(k, v)
            copies.append(c)
        for t in inits:
            c = g.initializer.add()
            c.CopyFrom(t)
            c.name = f"{path}.{k}.{t.name[len(w1):]}"
    last = n - 1
    for node, k in zip(g.node, layer, strict=True):
        if k is None:  # after the layers: read the last copy
            for i, v in enumerate(node.input):
                if v in out1:
                    node.input[i] = name_in(last, v)
    for o in g.output:
        if o.name in out1:
            o.name = name_in(last, o.name)
    at = max(i for i, k in enumerate(layer) if k == 1) + 1  # copies right after layer 1: the graph stays sorted
    nodes = [*g.node[:at], *copies, *g.node[at:]]
    del g.node[:]
    g.node.extend(nodes)
    return proto


def _drop_metadata(proto) -> None:
    """The exporter records a stack trace and fx node text on every node: most of the proto's bytes."""
    for n in proto.graph.node:
        del n.metadata_props[:]
    for vi in (*proto.graph.value_info, *proto.graph.input, *proto.graph.output):
        del vi.metadata_props[:]
    for t in proto.graph.initializer:
        del t.metadata_props[:]


class CheckpointReader:
    """name -> float32 ndarray of one tensor of a folder's safetensors shards, read on each call (the file is
    opened, the tensor copied out and the file closed again, so nothing of the checkpoint stays mapped).

    Graph names are the model class's state-dict names; a checkpoint saved from the base model lacks the head
    class's prefix (``layers.0...`` for ``model.layers.0...``) or has one the base model lacks
    (``bert.encoder...``): both are tried, and a tied name reads the tensor it is tied to."""

    def __init__(self, folder: str | Path, aliases: dict[str, str] | None = None, prefix: str = ""):
        self.folder = Path(folder)
        self.aliases = dict(aliases or {})
        self.prefix = f"{prefix}." if prefix else ""
        self.where: dict[str, Path] = {}  # checkpoint key -> shard
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            self.where = {k: self.folder / v for k, v in weight_map.items()}
        else:
            from safetensors import safe_open

            for shard in sorted(self.folder.glob("*.safetensors")):
                with safe_open(shard, framework="pt") as f:
                    self.where.update(dict.fromkeys(f.keys(), shard))

    def key(self, name: str) -> str | None:
        """The checkpoint key that holds graph tensor `name`, or None."""
        for n in (name, self.aliases.get(name)):
            if n is None:
                continue
            cands = [n]
            if self.prefix:
                cands += [n[len(self.prefix):]] if n.startswith(self.prefix) else [self.prefix + n]
            for c in cands:
                if c in self.where:
                    return c
        return None

    def __contains__(self, name: str) -> bool:
        return self.key(name) is not None

    def __call__(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        k = self.key(name)
        if k is None:
            raise InputError(f"{self.folder}: the checkpoint has no tensor {name!r}",
                             "check that the shards match config.json (model_type, layer count)")
        with safe_open(self.where[k], framework="pt") as f:
            t = f.get_tensor(k)
        return t.float().numpy() if t.is_floating_point() else t.numpy()


def no_weights(name: str) -> np.ndarray:
    """The value reader of a graph built from config.json alone: there is nothing to read."""
    raise InputError(f"no weights: {name!r} was analysed from config.json alone",
                     "pass the folder with its safetensors shards to rank channels by weight")


@contextlib.contextmanager
def _quiet():
    """The exporter logs and warns per op (torchvision missing, deprecations): none of it is the user's."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)
