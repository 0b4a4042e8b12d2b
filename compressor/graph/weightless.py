"""Analysis of a Hugging Face checkpoint without loading it: the graph comes from its config.json
(compressor.skeleton: meta-device trace, no weight bytes), values are read from its safetensors shards one
tensor at a time, only when something asks for them (importance scores).

    a = analyze_hf("path/to/folder")   # or a bare config.json, or a folder with only config.json
    a.groups                           # members name the checkpoint's state-dict tensors
    group_scores(a)                    # reads each scored tensor from the shards, one at a time

Names: the state-dict names of the model class the config's task calls for (LlamaForCausalLM:
``model.layers.0.mlp.up_proj.weight``, ``lm_head.weight``). A tied weight is one initializer under the first
name (``model.embed_tokens.weight``); ``a.ir.initializers`` reads it whichever name the checkpoint stores.
A checkpoint saved from the base model (keys without ``model.``) is read as well.

For a folder, ``a.ir.initializers.external`` is the compressor.skeleton.CheckpointReader: ``.key(name)`` the
checkpoint key that holds a graph tensor, ``.where[key]`` its shard, ``.aliases`` the tied names; for a bare
config it is ``skeleton.no_weights`` (reading a value raises InputError).
"""

from __future__ import annotations

from pathlib import Path

from compressor.errors import InputError
from compressor.graph.analysis import Analysis


def analyze_hf(path: str | Path, *, validate: bool = True, strict: bool = False) -> Analysis:
    """Coupled channel groups of the HF model at `path` (folder or config.json), weights never loaded.
    A folder with safetensors shards must match the config (every weight present, same shape): InputError
    otherwise. Raises what the trace raises when the model cannot be traced on the meta device.

    ``a.export`` says how the graph was made and where the time went: {"exporter": "weightless", "seconds":
    {"imports", "config", "model", "export", "onnx", "repeat", "shapes", "graph", "groups", "validate"}}."""
    import time

    from compressor.utils.phases import Phases

    phases = Phases()
    with phases("imports"):  # the exporter's stack (torch.export, torch.onnx, onnxscript), first use only
        from compressor import skeleton as sk
        from compressor.graph import analyze

        sk.import_exporter()
    t0 = time.perf_counter()
    with phases("config"):
        config = sk.load_config(path)
    skel = sk.skeleton_onnx(config, phases=phases)
    with phases("shapes"):
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        if sk.is_config_only(path):
            read = sk.no_weights
        else:
            read = sk.CheckpointReader(folder, skel.aliases, skel.prefix)
            check_shapes(read, skel.weightless())
    a = analyze(skel.proto, validate=validate, strict=strict, external=read, phases=phases)
    a.export = {"exporter": "weightless", "seconds": phases.seconds | {"total": round(time.perf_counter() - t0, 3)}}
    return a


def check_shapes(read, wanted: dict[str, tuple[int, ...]]) -> None:
    """Every tensor of the graph is in the checkpoint with the graph's shape (read from the shard headers).
    Non-persistent buffers built from the config (rotary inv_freq) have values in the graph already."""
    from safetensors import safe_open

    by_shard: dict[Path, list[tuple[str, str]]] = {}
    for name in wanted:
        k = read.key(name)
        if k is None:
            raise InputError(f"{read.folder}: the checkpoint has no tensor {name!r}",
                             "check that the safetensors shards match config.json")
        by_shard.setdefault(read.where[k], []).append((name, k))
    for shard, pairs in by_shard.items():
        with safe_open(shard, framework="pt") as f:
            for name, k in pairs:
                got = tuple(f.get_slice(k).get_shape())
                if got != wanted[name]:
                    raise InputError(f"{shard.name}: {k} has shape {got}, config.json implies {wanted[name]}",
                                     "check that the safetensors shards match config.json")
