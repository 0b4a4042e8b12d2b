"""BlockAdapter: a model seen as a stack of residual blocks, what depth pruning (ReplaceMe) needs.

The adapter answers four questions and does one edit:

* ``blocks()``: the ``nn.ModuleList`` of residual blocks, in execution order;
* ``capture(batch)`` + ``run_block(i, hidden, inputs)``: run one block on hidden states with exactly the extra
  inputs the model itself gives it (attention masks, rotary position embeddings, position ids...). The inputs are
  captured by a forward pre-hook on block 0 during a normal forward of the model, so whatever the model's own
  code builds (``create_causal_mask`` / ``create_bidirectional_mask`` and the rotary embedding in transformers 5.x,
  or anything a custom model does) is reused as-is, never re-implemented;
* ``out_proj(block)``: the MLP output projection, whose output m is added to the residual stream;
  ``post_norm(block)``: the norm applied *after* that residual add in post-norm blocks (BERT), else ``None``;
* ``remove_blocks(indices)``: delete blocks and keep the model consistent: ModuleList rebuilt, every ``layer_idx``
  renumbered (KV caches index layers by it), ``config.num_hidden_layers`` and per-layer config lists
  (``layer_types``...) updated, so ``save_pretrained`` / ``from_pretrained`` / ``generate`` keep working.

Hugging Face models (BERT-family, GPT-2, LLaMA-family...) and any torch model holding an ``nn.ModuleList`` of
identical blocks are recognised automatically (:meth:`BlockAdapter.for_model`); paths can be given explicitly,
and a subclass can override any method for an unusual model. ``check_structure`` verifies on real activations
that the block really computes ``z = a + m`` (then ``h = z`` or ``h = post_norm(z)``) before anything is changed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from compressor.errors import InputError
from compressor.utils.names import find_module, set_module

# MLP output projections (relative to a block), most specific first.
OUT_PROJ_NAMES = (
    "mlp.down_proj", "mlp.c_proj", "output.dense", "ffn.lin2", "mlp.fc2", "mlp.dense_4h_to_h", "feed_forward.w2",
    "feed_forward.down_proj", "mlp.w2", "ffn.down_proj", "mlp.proj", "fc2", "mlp.2", "ffn.2",
)
# norms applied after the residual add (post-norm blocks)
POST_NORM_NAMES = ("output.LayerNorm", "output_layer_norm")
# config lists with one entry per block
PER_LAYER_CONFIG_KEYS = ("layer_types", "mlp_layer_types", "kv_sharing_modes", "no_rope_layers")


class _Stop(Exception):
    """Raised by the capture hook to end the forward once block 0's inputs are known."""


@dataclass
class BlockInputs:
    """What block 0 received for one batch, minus the hidden states: reused for every block."""

    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool = False


def _is_proj(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def _find_block_list(model: nn.Module) -> str | None:
    """Dotted path of the largest ModuleList of ≥ 2 same-type, parameterised modules (ties: the shallowest)."""
    best, best_key = None, None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) != 1 or not all(any(True for _ in m.parameters()) for m in mod):
            continue
        if not any(_is_proj(s) for s in mod[0].modules()):
            continue
        n = sum(p.numel() for p in mod.parameters())
        key = (n, -name.count("."))
        if best_key is None or key > best_key:
            best, best_key = name, key
    return best


class BlockAdapter:
    """A model as a stack of residual blocks. See the module docstring."""

    def __init__(self, model: nn.Module, blocks_path: str, out_proj_name: str, post_norm_name: str | None = None):
        self.model = model
        self.blocks_path = blocks_path
        self.out_proj_name = out_proj_name
        self.post_norm_name = post_norm_name

    # ------------------------------------------------------------------ discovery
    @classmethod
    def for_model(cls, model: nn.Module, *, blocks: str | None = None, out_proj: str | None = None,
                  post_norm: str | None = None) -> BlockAdapter:
        """Recognise the block stack of an HF or plain torch model (or use the given dotted paths)."""
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise InputError(f"{type(model).__name__} is an encoder-decoder model: it has two block stacks",
                             "ReplaceMe prunes one stack; pass blocks='encoder.layers' (or a BlockAdapter) to choose it")
        path = blocks if blocks is not None else _find_block_list(model)
        stack = find_module(model, path) if path is not None else None
        if path is None or not isinstance(stack, nn.ModuleList) or len(stack) < 2:
            raise InputError(
                f"{type(model).__name__} has no recognisable stack of residual blocks"
                + (f" at '{blocks}'" if blocks else " (no nn.ModuleList of ≥ 2 identical blocks with linear layers)"),
                "ReplaceMe needs a transformer-like stack; pass blocks='path.to.ModuleList' or a BlockAdapter subclass")
        block = stack[0]
        if out_proj is None:
            out_proj = next((n for n in OUT_PROJ_NAMES if _is_proj(find_module(block, n) or nn.Identity())), None)
        if out_proj is None:  # fallback: the last linear layer registered in the block
            names = [n for n, m in block.named_modules() if n and _is_proj(m)]
            out_proj = names[-1] if names else None
        if out_proj is None or not _is_proj(find_module(block, out_proj) or nn.Identity()):
            raise InputError(f"cannot find the MLP output projection of {type(block).__name__} blocks"
                             + (f" ('{out_proj}' is not a Linear)" if out_proj else ""),
                             "pass out_proj='name.inside.block' (an nn.Linear whose output is added to the residual)")
        if post_norm is None:
            post_norm = next((n for n in POST_NORM_NAMES if find_module(block, n) is not None), None)
        return cls(model, path, out_proj, post_norm)

    # ------------------------------------------------------------------ access
    def blocks(self) -> nn.ModuleList:
        return find_module(self.model, self.blocks_path)

    def __len__(self) -> int:
        return len(self.blocks())

    def out_proj(self, block: nn.Module | int) -> nn.Module:
        block = self.blocks()[block] if isinstance(block, int) else block
        return find_module(block, self.out_proj_name)

    def post_norm(self, block: nn.Module | int) -> nn.Module | None:
        if self.post_norm_name is None:
            return None
        block = self.blocks()[block] if isinstance(block, int) else block
        return find_module(block, self.post_norm_name)

    def is_hf(self) -> bool:
        cfg = getattr(self.model, "config", None)
        return cfg is not None and hasattr(cfg, "model_type")

    # ------------------------------------------------------------------ running
    def call_model(self, batch) -> None:
        """One forward of the whole model on a calibration batch (dict, tuple or tensor)."""
        if isinstance(batch, dict):
            kw = dict(batch)
            if self.is_hf():
                kw.setdefault("use_cache", False)
            self.model(**kw)
        elif isinstance(batch, tuple | list):
            self.model(*batch)
        else:
            self.model(batch)

    @torch.no_grad()
    def capture(self, batch) -> tuple[torch.Tensor, BlockInputs]:
        """(hidden states entering block 0, the other inputs block 0 receives) for one batch."""
        got: dict = {}

        def hook(_mod, args, kwargs):
            got["args"], got["kwargs"] = args, kwargs
            raise _Stop

        handle = self.blocks()[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.call_model(batch)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "args" not in got:
            raise InputError(f"block 0 of {type(self.model).__name__} ('{self.blocks_path}.0') never ran in a forward",
                             "the block list given is not used by the model's forward; pass blocks=... of the real stack")
        args, kwargs = got["args"], dict(got["kwargs"])
        if args:
            hidden, rest, in_kw = args[0], tuple(args[1:]), False
        elif "hidden_states" in kwargs:
            hidden, rest, in_kw = kwargs.pop("hidden_states"), (), True
        else:
            raise InputError("cannot tell which input of block 0 is the hidden state", "pass a BlockAdapter subclass")
        for k in ("past_key_values", "past_key_value", "layer_past"):
            if k in kwargs:
                kwargs[k] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        return hidden, BlockInputs(rest, kwargs, in_kw)

    @torch.no_grad()
    def run_block(self, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        block = self.blocks()[index]
        if inputs.hidden_in_kwargs:
            out = block(*inputs.args, hidden_states=hidden, **inputs.kwargs)
        else:
            out = block(hidden, *inputs.args, **inputs.kwargs)
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, tuple | list):
            return out[0]
        if hasattr(out, "last_hidden_state"):
            return out.last_hidden_state
        return out[0]

    # ------------------------------------------------------------------ editing
    def fold(self, index: int, T: torch.Tensor) -> None:
        """m ← m T inside block `index`: W ← Tᵀ W (nn.Linear) or W ← W T (HF Conv1D), b ← b T; float64 math."""
        proj = self.out_proj(index)
        T64 = T.to(torch.float64)
        with torch.no_grad():
            W = proj.weight.data
            if isinstance(proj, nn.Linear):
                new_w = T64.to(W.device).T @ W.to(torch.float64)
            else:  # transformers Conv1D: y = x W + b, W is [in, out]
                new_w = W.to(torch.float64) @ T64.to(W.device)
            proj.weight.data = new_w.to(W.dtype).contiguous()
            if getattr(proj, "bias", None) is not None:
                b = proj.bias.data
                proj.bias.data = (b.to(torch.float64) @ T64.to(b.device)).to(b.dtype)

    def remove_blocks(self, indices) -> dict:
        """Delete blocks, renumber layer_idx, update the config. Returns what changed."""
        stack = self.blocks()
        old_n = len(stack)
        drop = sorted(set(int(i) for i in indices))
        keep = [i for i in range(old_n) if i not in drop]
        new = nn.ModuleList([stack[i] for i in keep])
        set_module(self.model, self.blocks_path, new)
        renumbered = 0
        for j, block in enumerate(new):
            for mod in block.modules():
                if isinstance(getattr(mod, "layer_idx", None), int):
                    mod.layer_idx = j
                    renumbered += 1
        changes: dict = {"blocks_before": old_n, "blocks_after": len(new), "removed": drop, "layer_idx_renumbered": renumbered}
        for c in self._configs():
            if getattr(c, "is_heterogeneous", False):
                raise InputError("this model has a per-layer (heterogeneous) config",
                                 "depth pruning of heterogeneous configs is not supported")
            if getattr(c, "num_hidden_layers", None) == old_n:
                c.num_hidden_layers = len(new)
                changes["num_hidden_layers"] = len(new)
            for key in PER_LAYER_CONFIG_KEYS:
                val = getattr(c, key, None)
                if isinstance(val, list | tuple) and len(val) == old_n:
                    setattr(c, key, [v for i, v in enumerate(val) if i in keep])
                    changes[key] = list(getattr(c, key))
        return changes

    def _configs(self) -> list:
        """The model's config and its decoder text config (multimodal models), the ones that count blocks."""
        cfg = getattr(self.model, "config", None)
        if cfg is None:
            return []
        configs = [cfg]
        if hasattr(cfg, "get_text_config"):
            text_cfg = cfg.get_text_config(decoder=True)
            if text_cfg is not cfg:
                configs.append(text_cfg)
        return configs

    @contextmanager
    def without_blocks(self, indices):
        """The model runs without blocks `indices` inside the `with` (removed as :meth:`remove_blocks` does, nothing
        copied) and is exactly as before afterwards: the same ModuleList, layer_idx values and config. Baselines
        (naive drop, the cut without T) are measured this way on the one model in memory."""
        stack = self.blocks()
        numbered = [(m, m.layer_idx) for m in stack.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        keys = ("num_hidden_layers", *PER_LAYER_CONFIG_KEYS)
        saved = [(c, {k: getattr(c, k) for k in keys if hasattr(c, k)}) for c in self._configs()]
        try:
            self.remove_blocks(indices)
            yield self.model
        finally:
            set_module(self.model, self.blocks_path, stack)
            for m, idx in numbered:
                m.layer_idx = idx
            for c, values in saved:
                for k, v in values.items():
                    setattr(c, k, v)
