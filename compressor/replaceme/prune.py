"""ReplaceMe: training-free depth pruning with one linear map (Shopkhoev et al., 2025, arXiv 2505.02819;
spec/RECIPES.md §3).

n consecutive blocks s … s+n−1 are removed and replaced by a linear map T that is folded into the MLP output
projection of the last kept block i = s−1, so the pruned model is an ordinary, smaller checkpoint.

* Cut selection (§3.2): d(s) = mean over calibration sequences of arccos(cos(h_{s−1}, h_{s+n−1}))/π on one
  vector per sequence: the last non-padded token (decoders, the reference metric) or the mean over its tokens
  (encoders, whose sentence embedding is that mean) [CHOICE, `distance_tokens`]. s ∈ {1 … L−n}: block 0 is never
  removed. The states are the real block outputs (pre final norm), so cutting up to the last block is allowed.
* Estimation (§3.3), per non-padded token t: x = m_i (out-projection output of block i), a = z_i − m_i (block i's
  residual stream without m), target h = h_{s+n−1}.
  Pre-norm blocks (LLaMA, GPT-2): z_i = h_i and the kept block computes a + m T, so y = h − a.
  Post-norm blocks (BERT): block i outputs LN(a + m T), the LayerNorm sits *after* the residual add, so no T can
  act on the block output itself. T still goes into the out projection; the LS target is the LN pre-image of h
  at the scale of the original sum: z* = μ(z_i) + σ(z_i)·norm((h − β)/γ), y = z* − a, so LN(a + m T) ≈ LN(z*)
  = h exactly when (h − β)/γ is itself normalised (and approximately otherwise). `cosine_loss: output` optimises
  cos(LN(a + m T), h) directly, through the norm.
  LS: G = Σ xᵀx, B = Σ xᵀy in float64, T = (G + αI)⁻¹B. Cosine: Adam on 1 − cos(x T, y) (or the output form),
  mini-batches of 1024 tokens, 10 epochs, lr 1e-4, T initialised to the identity (§3.3 defaults).
* Folding (§3.4): out projection W ← TᵀW (nn.Linear; W ← W T for HF Conv1D), b ← b T, in float64. The folded
  block is checked against the unfolded one (out projection followed by an explicit T) on calibration data.
  Then the blocks are deleted, layer_idx renumbered and the config updated (see compressor.blocks).
* Calibration memory: activations go block by block: one block's hidden states for the calibration batches,
  the captured block inputs (masks, rotary tables), per-sequence pooled states for the distances and the float64
  statistics. Never all hidden states of all layers (`output_hidden_states`). The cosine estimator also keeps its
  tokens (x, y), as the reference does.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compressor.blocks import BlockAdapter, BlockInputs
from compressor.errors import InputError, RecipeError, VerificationError
from compressor.recipe import StageContext, register_method

Estimator = Literal["ls", "cosine", "none"]


# --------------------------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """Calibration batches ready for the model, and which positions count as tokens."""

    batches: list  # dict (HF kwargs) | tuple | tensor per batch
    masks: list  # [B, S] bool per batch, or None (every position of the hidden state is a token)
    n_sequences: int
    source: str = ""


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _token_batches(ids_list: list[list[int]], pad_id: int, batch_size: int, source: str) -> Calibration:
    """Pad sequences of token ids into batches (sorted by length to waste little on padding), right padding."""
    order = sorted(range(len(ids_list)), key=lambda k: (-len(ids_list[k]), k))
    batches, masks = [], []
    for i in range(0, len(order), batch_size):
        chunk = [ids_list[k] for k in order[i : i + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, c in enumerate(chunk):
            ids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[r, : len(c)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
        masks.append(mask.bool())
    return Calibration(batches, masks, len(ids_list), source)


def make_calibration(calib, *, tokenizer=None, calib_samples: int | None = None, max_length: int = 128,
                     batch_size: int = 16) -> Calibration:
    """Normalise calibration data: 'text:PATH', a DataBundle, a list of strings, token ids [N, S] (LongTensor),
    a dict {input_ids, attention_mask}, or (plain torch models) an input tensor [N, ...] / TensorDataset."""
    from compressor.io.data import DataBundle, load_data

    source = type(calib).__name__
    if isinstance(calib, str):
        if not calib.startswith("text:"):
            raise InputError(f"calibration data {calib!r} is not text:PATH", "give text:PATH, a list of sentences or token ids")
        source = calib
        calib = load_data(calib)
    if isinstance(calib, DataBundle):
        source = calib.source or "DataBundle"
        if calib.texts:
            calib = list(calib.texts)
        elif calib.train is not None:
            calib = calib.train.tensors[0]
        else:
            raise InputError(f"the data {source} has neither texts nor inputs to calibrate on", "give text:PATH or inputs")
    if isinstance(calib, torch.utils.data.TensorDataset):
        calib = calib.tensors[0]
    if isinstance(calib, list | tuple) and calib and all(isinstance(t, str) for t in calib):
        if tokenizer is None:
            raise InputError("calibration texts need a tokenizer", "pass tokenizer=... (the model's tokenizer)")
        texts = [t for t in calib if t.strip()][: calib_samples or None]
        ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
        ids = [list(x) for x in ids if len(x) > 0]
        return _token_batches(ids, _pad_id(tokenizer), batch_size, source)
    if isinstance(calib, dict) and "input_ids" in calib:
        ids = torch.as_tensor(calib["input_ids"])[: calib_samples or None, :max_length]
        am = torch.as_tensor(calib.get("attention_mask", torch.ones_like(ids)))[: ids.shape[0], : ids.shape[1]]
        seqs = [ids[r][am[r].bool()].tolist() for r in range(ids.shape[0])]
        return _token_batches([s for s in seqs if s], 0 if tokenizer is None else _pad_id(tokenizer), batch_size, source)
    if isinstance(calib, torch.Tensor) and calib.dtype == torch.long and calib.dim() == 2:
        calib = calib[: calib_samples or None, :max_length]
        return _token_batches([r.tolist() for r in calib], 0 if tokenizer is None else _pad_id(tokenizer), batch_size, source)
    if isinstance(calib, torch.Tensor):
        calib = calib[: calib_samples or None]
        batches = [calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size)]
        return Calibration(batches, [None] * len(batches), int(calib.shape[0]), source)
    if isinstance(calib, list | tuple) and not calib:
        raise InputError("the calibration data is empty", "give some calibration text or inputs")
    raise InputError(f"cannot calibrate on {type(calib).__name__}",
                     "give text:PATH, a DataBundle, a list of sentences, token ids [N, S] or an input tensor [N, ...]")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_to(v, device) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------- memory


def _nbytes(obj, seen: set | None = None) -> int:
    """Bytes of every distinct tensor storage reachable in obj (lists, tuples, dicts, BlockInputs)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = (st.data_ptr(), obj.device.type)
        if key in seen:
            return 0
        seen.add(key)
        return st.nbytes()
    if isinstance(obj, BlockInputs):
        return _nbytes(obj.args, seen) + _nbytes(obj.kwargs, seen)
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v, seen) for v in obj)
    return 0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a code region: CUDA max_memory_allocated delta, or sampled process RSS delta on CPU
    (every 2 ms), plus the exact bytes of the tensors the calibration itself holds (`note(obj)`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.held_peak = 0
        self.peak_delta = 0
        self._stop = threading.Event()

    def note(self, *objs) -> None:
        seen: set = set()
        self.held_peak = max(self.held_peak, sum(_nbytes(o, seen) for o in objs))

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._peak = self._base

            def sample():
                while not self._stop.wait(0.002):
                    self._peak = max(self._peak, _rss_bytes())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_delta = torch.cuda.max_memory_allocated(self.device) - self._base
            self.method = "torch.cuda.max_memory_allocated delta"
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_delta = self._peak - self._base
            self.method = "process RSS delta, sampled every 2 ms"
        return False


# --------------------------------------------------------------------------------------------- passes


def _flat(h: torch.Tensor) -> torch.Tensor:
    """[B, S, d] view of a hidden state ([B, d] → [B, 1, d])."""
    return h.reshape(h.shape[0], -1, h.shape[-1])


def _token_mask(mask, h: torch.Tensor, include_padding: bool) -> torch.Tensor:
    f = _flat(h)
    if mask is None or include_padding or mask.shape != f.shape[:2]:
        return torch.ones(f.shape[:2], dtype=torch.bool, device=h.device)
    return mask.to(h.device)


def _pool(h: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One float32 vector per sequence: last non-padded token or masked mean."""
    f = _flat(h).float()
    if how == "last":
        idx = mask.long().cumsum(1).argmax(1)  # last True position
        return f[torch.arange(f.shape[0], device=f.device), idx]
    m = mask.unsqueeze(-1)
    return torch.where(m, f, torch.zeros((), device=f.device)).sum(1) / m.sum(1).clamp_min(1)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return torch.arccos(cos) / math.pi


def _is_causal(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "model_type"):
        return False
    if getattr(cfg, "is_decoder", False):
        return True
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover
        return False
    return cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and cfg.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


@dataclass
class _State:
    hidden: list
    inputs: list
    masks: list  # token masks per batch, on device


def _start(adapter: BlockAdapter, cal: Calibration, device, include_padding: bool) -> _State:
    hidden, inputs, masks = [], [], []
    for batch, mask in zip(cal.batches, cal.masks, strict=True):
        h, inp = adapter.capture(_to(batch, device))
        hidden.append(h)
        inputs.append(inp)
        masks.append(_token_mask(mask, h, include_padding))
    return _State(hidden, inputs, masks)


def _advance(adapter: BlockAdapter, st: _State, index: int) -> None:
    for b in range(len(st.hidden)):
        st.hidden[b] = adapter.run_block(index, st.hidden[b], st.inputs[b])


@torch.no_grad()
def block_distances(adapter: BlockAdapter, cal: Calibration, n_blocks: int, *, device, distance_tokens: str,
                    mem: PeakMemory | None = None) -> tuple[dict[int, float], dict]:
    """d(s) for s = 1 … L−n (pass 1: every block once, keeping one pooled vector per sequence and block).
    Also returns the hidden size and the number of hidden-state positions (for the memory comparison)."""
    L = len(adapter)
    st = _start(adapter, cal, device, include_padding=False)
    shape = {"hidden_size": int(st.hidden[0].shape[-1]), "positions": sum(int(_flat(h).shape[0] * _flat(h).shape[1]) for h in st.hidden)}
    reps = []
    for ell in range(L):
        _advance(adapter, st, ell)
        reps.append(torch.cat([_pool(h, m, distance_tokens) for h, m in zip(st.hidden, st.masks, strict=True)]))
        if mem is not None:
            mem.note(st.hidden, st.inputs, st.masks, reps)
    return {s: float(angular_distance(reps[s - 1], reps[s + n_blocks - 1]).mean()) for s in range(1, L - n_blocks + 1)}, shape


class _Capture:
    """Forward hooks on block i: out-projection output m, and the post-norm input z (post-norm blocks)."""

    def __init__(self, adapter: BlockAdapter, index: int, zero_m: bool = False, post_norm: nn.Module | None = None,
                 T: torch.Tensor | None = None):
        self.m = self.z = self.norm_out = None
        proj = adapter.out_proj(index)
        self.handles = [proj.register_forward_hook(self._on_proj)]
        self.zero_m, self.T = zero_m, T
        if post_norm is not None:
            self.handles.append(post_norm.register_forward_pre_hook(self._on_norm))
            self.handles.append(post_norm.register_forward_hook(self._on_norm_out))

    def _on_proj(self, _mod, _args, out):
        if self.T is not None:  # unfolded reference: out projection followed by an explicit T
            return (out.double() @ self.T.to(out.device)).to(out.dtype)
        self.m = out
        if self.zero_m:
            return torch.zeros_like(out)
        return None

    def _on_norm(self, _mod, args):
        self.z = args[0]

    def _on_norm_out(self, _mod, _args, out):
        self.norm_out = out

    def close(self):
        for h in self.handles:
            h.remove()


def _norm_candidates(adapter: BlockAdapter, index: int) -> list[tuple[str, nn.Module]]:
    block = adapter.blocks()[index]
    names = [n for n, _ in block.named_modules()]
    after = names.index(adapter.out_proj_name) if adapter.out_proj_name in names else 0
    return [(n, m) for k, (n, m) in enumerate(block.named_modules()) if k > after and "norm" in type(m).__name__.lower()]


@torch.no_grad()
def check_structure(adapter: BlockAdapter, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> dict:
    """Verify block `index` computes z = a + m with m its out projection's output (z = output, or the input of
    the post-norm). Zeroing m must change z by exactly m. Finds the post-norm when the adapter does not name it."""

    def run(zero: bool, norm):
        cap = _Capture(adapter, index, zero_m=zero, post_norm=norm)
        try:
            out = adapter.run_block(index, hidden, inputs)
        finally:
            cap.close()
        return cap, out

    def err(norm) -> float:
        c1, o1 = run(False, norm)
        c0, o0 = run(True, norm)
        z1, z0 = (c1.z, c0.z) if norm is not None else (o1, o0)
        if z1 is None or c1.m is None or z1.shape != c1.m.shape:
            return float("inf")
        scale = float(z1.abs().max()) + 1e-12
        e = float((z1 - z0 - c1.m).abs().max()) / scale
        if norm is not None:  # a post-norm's output must be the block output itself
            if c1.norm_out is None or c1.norm_out.shape != o1.shape:
                return float("inf")
            e = max(e, float((c1.norm_out - o1).abs().max()) / (float(o1.abs().max()) + 1e-12))
        return e

    tol = 1e-4 if hidden.dtype == torch.float32 else (1e-6 if hidden.dtype == torch.float64 else 1e-2)
    if adapter.post_norm_name is not None:
        e = err(adapter.post_norm(index))
        if e <= tol:
            return {"structure": "post-norm", "post_norm": adapter.post_norm_name, "residual_check_rel_err": e}
    else:
        e = err(None)
        if e <= tol:
            return {"structure": "pre-norm", "residual_check_rel_err": e}
        for name, mod in _norm_candidates(adapter, index):
            e2 = err(mod)
            if e2 <= tol:
                adapter.post_norm_name = name
                return {"structure": "post-norm", "post_norm": name, "residual_check_rel_err": e2}
    block = adapter.blocks()[index]
    raise InputError(
        f"block {index} ({type(block).__name__}) is not residual + '{adapter.out_proj_name}' output "
        f"(zeroing that projection changed the residual stream by something else; rel. error {e:.2e})",
        "pass out_proj='...' naming the Linear whose output is added to the residual (and post_norm='...' if a "
        "norm follows the add), or a BlockAdapter subclass")


def _ln_params(norm: nn.Module):
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-5
    centered = isinstance(norm, nn.LayerNorm) or b is not None
    return w, b, float(eps), centered


def _z_stats(z: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Per-token [mean, scale] of the pre-norm sum z ([N, 2], float64): all the LS target needs of z."""
    _, _, eps, centered = _ln_params(norm)
    zd = z.double()
    if centered:
        return torch.cat([zd.mean(-1, keepdim=True), (zd.var(-1, unbiased=False, keepdim=True) + eps).sqrt()], -1)
    return torch.cat([torch.zeros_like(zd[:, :1]), (zd.pow(2).mean(-1, keepdim=True) + eps).sqrt()], -1)


def _post_norm_target(zs: torch.Tensor, h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """z* with norm(z*) ≈ h, at the per-token mean/scale `zs` of the original pre-norm sum z (float64)."""
    w, b, eps, centered = _ln_params(norm)
    u = h.double()
    if b is not None:
        u = u - b.double()
    if w is not None:
        wd = w.double()
        u = u / torch.where(wd.abs() < 1e-6, torch.full_like(wd, 1e-6).copysign(wd), wd)
    mu_z, sd_z = zs[:, :1], zs[:, 1:2]
    if centered:
        un = (u - u.mean(-1, keepdim=True)) / (u.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        return mu_z + sd_z * un
    return sd_z * u / (u.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _apply_norm(norm: nn.Module | None, z: torch.Tensor) -> torch.Tensor:
    if norm is None:
        return z
    w, b, eps, centered = _ln_params(norm)
    w = w.detach().float() if w is not None else None
    b = b.detach().float() if b is not None else None
    if centered:
        return torch.nn.functional.layer_norm(z, (z.shape[-1],), w, b, eps)
    out = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    return out * w if w is not None else out


@dataclass
class _Stats:
    G: torch.Tensor
    B: torch.Tensor
    yy: float = 0.0
    n_tokens: int = 0
    tokens: dict = field(default_factory=dict)  # cosine: x, y, a, h (float32)


@torch.no_grad()
def collect_statistics(adapter: BlockAdapter, cal: Calibration, start: int, n_blocks: int, *, device,
                       include_padding: bool, keep_tokens: bool, mem: PeakMemory | None = None):
    """Pass 2: G = Σxᵀx, B = Σxᵀy (float64) for the cut start … start+n−1; block by block."""
    i, end = start - 1, start + n_blocks - 1
    st = _start(adapter, cal, device, include_padding)
    for ell in range(i):
        _advance(adapter, st, ell)
        if mem is not None:
            mem.note(st.hidden, st.inputs)
    check = check_structure(adapter, i, st.hidden[0], st.inputs[0])
    norm = adapter.post_norm(i)
    probe = (st.hidden[0], st.inputs[0])  # block i's input on batch 0, for the fold check
    xs, as_, zs = [], [], []
    for b in range(len(st.hidden)):
        cap = _Capture(adapter, i, post_norm=norm)
        try:
            st.hidden[b] = adapter.run_block(i, st.hidden[b], st.inputs[b])
        finally:
            cap.close()
        z = cap.z if norm is not None else st.hidden[b]
        mask = st.masks[b]
        x = _flat(cap.m)[mask]
        xs.append(x)
        as_.append(_flat(z)[mask] - x)
        zs.append(_z_stats(_flat(z)[mask], norm) if norm is not None else None)
    d = xs[0].shape[-1]
    stats = _Stats(torch.zeros(d, d, dtype=torch.float64, device=device), torch.zeros(d, d, dtype=torch.float64, device=device))
    if mem is not None:
        mem.note(st.hidden, st.inputs, xs, as_, zs, probe, stats.G, stats.B)
    for ell in range(start, end + 1):
        _advance(adapter, st, ell)
        if mem is not None:
            mem.note(st.hidden, st.inputs, xs, as_, zs, probe, stats.G, stats.B)
    keep: dict = {"x": [], "y": [], "a": [], "h": []}
    for b in range(len(st.hidden)):
        h = _flat(st.hidden[b])[st.masks[b]]
        x64 = xs[b].double()
        target = _post_norm_target(zs[b], h, norm) if norm is not None else h.double()
        y64 = target - as_[b].double()
        stats.G += x64.T @ x64
        stats.B += x64.T @ y64
        stats.yy += float((y64 * y64).sum())
        stats.n_tokens += x64.shape[0]
        if keep_tokens:
            keep["x"].append(xs[b].float())
            keep["y"].append(y64.float())
            keep["a"].append(as_[b].float())
            keep["h"].append(h.float())
        xs[b] = as_[b] = zs[b] = None
        st.hidden[b] = None
    if keep_tokens:
        stats.tokens = {k: torch.cat(v) for k, v in keep.items()}
        if mem is not None:
            mem.note(stats.tokens, probe, stats.G, stats.B)
    return stats, check, probe


# --------------------------------------------------------------------------------------------- estimators


def solve_ls(stats: _Stats, ridge: float = 0.0) -> tuple[torch.Tensor, dict]:
    d = stats.G.shape[0]
    A = stats.G + ridge * torch.eye(d, dtype=torch.float64, device=stats.G.device)
    info: dict = {}
    try:
        L = torch.linalg.cholesky(A)
        T = torch.cholesky_solve(stats.B, L)
        info["solver"] = "cholesky"
    except RuntimeError:  # singular G (too few or degenerate tokens): minimum-norm solution
        T = torch.linalg.pinv(A, hermitian=True) @ stats.B
        info["solver"] = "pinv (G singular)"
    resid = float(torch.trace(T.T @ stats.G @ T) - 2 * torch.trace(T.T @ stats.B)) + stats.yy
    info["ls_rel_residual"] = resid / max(stats.yy, 1e-30)
    return T, info


def solve_cosine(stats: _Stats, *, loss: str, init: str, epochs: int, lr: float, batch: int, seed: int,
                 ridge: float, norm: nn.Module | None) -> tuple[torch.Tensor, dict]:
    tok = stats.tokens
    X, Y = tok["x"], tok["y"]
    d = X.shape[1]
    T0 = solve_ls(stats, ridge)[0].float() if init == "ls" else torch.eye(d, device=X.device)
    T = nn.Parameter(T0.clone())
    opt = torch.optim.Adam([T], lr=lr)
    g = torch.Generator(device="cpu").manual_seed(seed)
    cos = torch.nn.functional.cosine_similarity
    losses = []
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(X.shape[0], generator=g).to(X.device)
            total, count = 0.0, 0
            for idx in perm.split(batch):
                if loss == "residual":
                    val = 1 - cos(X[idx] @ T, Y[idx], dim=-1).mean()
                else:
                    val = 1 - cos(_apply_norm(norm, tok["a"][idx] + X[idx] @ T), tok["h"][idx], dim=-1).mean()
                opt.zero_grad(set_to_none=True)
                val.backward()
                opt.step()
                total += float(val.detach()) * len(idx)
                count += len(idx)
            losses.append(total / count)
    return T.detach().double(), {"cosine_loss_first_epoch": losses[0], "cosine_loss_last_epoch": losses[-1], "steps": epochs * math.ceil(X.shape[0] / batch)}


# --------------------------------------------------------------------------------------------- prune


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def prune(model: nn.Module, calib, n_blocks: int = 2, estimator: Estimator = "ls", *, tokenizer=None, ridge: float = 0.0,
          start: int | None = None, calib_samples: int | None = None, max_length: int = 128, batch_size: int = 16,
          distance_tokens: Literal["auto", "last", "mean"] = "auto", include_padding: bool = False,
          cosine_loss: Literal["residual", "output"] = "residual", cosine_init: Literal["identity", "ls"] = "identity",
          cosine_epochs: int = 10, cosine_lr: float = 1e-4, cosine_batch: int = 1024, adapter: BlockAdapter | None = None,
          blocks: str | None = None, out_proj: str | None = None, post_norm: str | None = None, device=None,
          seed: int = 0, inplace: bool = False, return_transform: bool = False) -> tuple[nn.Module, dict]:
    """Remove `n_blocks` consecutive blocks and fold a linear map T (estimator "ls" | "cosine") into the last kept
    block's MLP output projection. estimator="none" removes the blocks without T (the UIDL baseline).
    `start` forces the cut to start there (else: argmin of the angular distance). Returns (model, report).
    The model is copied first unless inplace=True; return_transform=True puts T (float64 tensor) in report["T"]."""
    t_start = time.perf_counter()
    if estimator not in ("ls", "cosine", "none"):
        raise InputError(f"unknown estimator {estimator!r}", "use ls, cosine or none")
    if not isinstance(model, nn.Module):
        raise InputError(f"ReplaceMe prunes a torch nn.Module, got {type(model).__name__}", "load the model with torch / transformers")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if adapter is None:
        adapter = BlockAdapter.for_model(model, blocks=blocks, out_proj=out_proj, post_norm=post_norm)
    elif not inplace:
        adapter = copy.copy(adapter)
        adapter.model = model
    L = len(adapter)
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise InputError(f"n_blocks must be a positive integer, got {n_blocks!r}", "e.g. n_blocks=2")
    if n_blocks >= L:
        raise InputError(f"cannot remove {n_blocks} of {L} blocks: the first block is always kept",
                         f"use n_blocks between 1 and {L - 1}")
    if start is not None:
        if start == 0:
            raise InputError("cannot cut the first block (block 0): T is folded into the block before the cut",
                             f"use start between 1 and {L - n_blocks}")
        if not 1 <= start <= L - n_blocks:
            raise InputError(f"a cut of {n_blocks} blocks starting at {start} does not fit in {L} blocks",
                             f"use start between 1 and {L - n_blocks}")
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)
    cal = make_calibration(calib, tokenizer=tokenizer, calib_samples=calib_samples, max_length=max_length, batch_size=batch_size)
    if cal.n_sequences == 0:
        raise InputError("the calibration data has no usable sequences", "give non-empty calibration text")
    how = distance_tokens if distance_tokens != "auto" else ("last" if _is_causal(model) else "mean")
    report: dict = {"method": "replaceme", "estimator": estimator, "n_blocks": n_blocks, "blocks_before": L,
                    "block_stack": adapter.blocks_path, "out_proj": adapter.out_proj_name,
                    "calibration": {"source": cal.source, "sequences": cal.n_sequences}, "distance_tokens": how}
    params_before = _count_params(model)
    t_cal = time.perf_counter()
    with PeakMemory(device) as mem:
        dist, shape = block_distances(adapter, cal, n_blocks, device=device, distance_tokens=how, mem=mem)
        s = start if start is not None else min(dist, key=lambda k: (dist[k], k))
        T = None
        if estimator != "none":
            stats, check, probe = collect_statistics(adapter, cal, s, n_blocks, device=device, include_padding=include_padding,
                                                     keep_tokens=estimator == "cosine", mem=mem)
            d = stats.G.shape[0]
            report["calibration"]["tokens"] = stats.n_tokens
            report["hidden_size"] = d
            if stats.n_tokens < d:
                raise InputError(
                    f"the calibration data gives {stats.n_tokens} tokens; estimating a {d}×{d} transform needs at least {d}",
                    "give more or longer calibration text (a few hundred sentences)")
            report.update(check)
    report["calibration"]["seconds"] = round(time.perf_counter() - t_cal, 3)
    report["calibration"]["peak_memory_mb"] = round(mem.peak_delta / 2**20, 2)
    report["calibration"]["peak_memory_method"] = mem.method
    report["calibration"]["held_tensors_peak_mb"] = round(mem.held_peak / 2**20, 2)
    # what keeping every layer's hidden states (output_hidden_states) for the calibration set would hold, float32
    report["calibration"]["all_hidden_states_mb"] = round((L + 1) * shape["positions"] * shape["hidden_size"] * 4 / 2**20, 2)
    report["distances"] = {str(k): round(v, 6) for k, v in dist.items()}
    report["start"] = s
    report["removed_blocks"] = list(range(s, s + n_blocks))
    report["selected_by"] = "given start" if start is not None else "min angular distance"
    if estimator != "none":
        norm = adapter.post_norm(s - 1)
        t_est = time.perf_counter()
        if estimator == "ls":
            T, info = solve_ls(stats, ridge)
        else:
            T, info = solve_cosine(stats, loss=cosine_loss, init=cosine_init, epochs=cosine_epochs, lr=cosine_lr,
                                   batch=cosine_batch, seed=seed, ridge=ridge, norm=norm)
        info["seconds"] = round(time.perf_counter() - t_est, 3)
        eye = torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
        info["T_rel_dist_from_identity"] = float((T - eye).norm() / eye.norm())
        report["estimate"] = info
        if return_transform:
            report["T"] = T.detach().cpu()
        del stats
        # folded == unfolded: block s-1 with an explicit T after its out projection vs the folded weights
        hidden0, inputs0 = probe
        cap = _Capture(adapter, s - 1, T=T.double())
        try:
            unfolded = adapter.run_block(s - 1, hidden0, inputs0)
        finally:
            cap.close()
        adapter.fold(s - 1, T)
        folded = adapter.run_block(s - 1, hidden0, inputs0)
        err = float((folded - unfolded).abs().max() / (unfolded.abs().max() + 1e-12))
        report["fold_check_rel_err"] = err
        tol = 1e-4 if folded.dtype == torch.float32 else (1e-9 if folded.dtype == torch.float64 else 2e-2)
        if not err <= tol:
            raise VerificationError(f"folding T into block {s - 1} changed its output by {err:.2e} (relative)",
                                    "report this as a bug; the model was not modified in place" if not inplace else "report this as a bug")
    report["config_changes"] = adapter.remove_blocks(range(s, s + n_blocks))
    report["blocks_after"] = len(adapter)
    report["params_before"] = params_before
    report["params_after"] = _count_params(model)
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    return model, report


def naive_drop(model: nn.Module, n_blocks: int, *, inplace: bool = False, adapter: BlockAdapter | None = None) -> tuple[nn.Module, dict]:
    """Baseline: drop the last n blocks (no calibration, no T)."""
    model = model if inplace else copy.deepcopy(model)
    adapter = adapter or BlockAdapter.for_model(model)
    L = len(adapter)
    if not 1 <= n_blocks < L:
        raise InputError(f"cannot remove {n_blocks} of {L} blocks", f"use n_blocks between 1 and {L - 1}")
    changes = adapter.remove_blocks(range(L - n_blocks, L))
    return model, {"method": "naive-drop-last", "removed_blocks": list(range(L - n_blocks, L)), "config_changes": changes}


# --------------------------------------------------------------------------------------------- quality


@torch.no_grad()
def quality(model: nn.Module, dense: nn.Module, *, tokenizer=None, texts: list[str] | None = None,
            inputs: torch.Tensor | None = None, reference=None) -> dict:
    """How close a pruned model stays to the dense one on held-out data: embedding cosine fidelity (encoders),
    perplexity (causal LMs), or mean output cosine (plain torch models)."""
    from compressor import evaluate as ev

    if texts is not None and tokenizer is not None:
        if hasattr(model, "generate") and hasattr(model, "lm_head"):
            return {"perplexity": ev.perplexity(model, tokenizer, texts)}
        from compressor.hf import embed

        ref = reference if reference is not None else embed(dense, tokenizer, texts)
        return {"embedding_fidelity": float((embed(model, tokenizer, texts) * ref).sum(1).mean())}
    if inputs is not None:
        def out(m):
            o = m(inputs.to(_model_device(m)))
            o = o if isinstance(o, torch.Tensor) else o[0]
            return o.float().reshape(o.shape[0], -1).cpu()

        ref = reference if reference is not None else out(dense)
        return {"output_cosine": float(torch.nn.functional.cosine_similarity(out(model), ref, dim=-1).mean())}
    return {}


# --------------------------------------------------------------------------------------------- recipe stage


class ReplaceMeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_blocks: int = Field(2, ge=1, description="consecutive blocks to remove")
    estimator: Estimator = Field("ls", description="ls (least squares, float64) | cosine (Adam) | none (no T: UIDL)")
    ridge: float = Field(0.0, ge=0.0, description="ridge α in T = (XᵀX + αI)⁻¹XᵀY")
    start: int | None = Field(None, ge=1, description="force the cut to start at this block (default: min angular distance)")
    calib_samples: int | None = Field(1024, ge=1, description="calibration sequences (texts) to use")
    max_length: int = Field(128, ge=2, description="tokens per calibration sequence (truncation)")
    batch_size: int = Field(16, ge=1)
    distance_tokens: Literal["auto", "last", "mean"] = Field("auto", description="auto: last token (decoders), mean (encoders)")
    include_padding: bool = Field(False, description="count padding positions as calibration tokens (reference behaviour)")
    cosine_loss: Literal["residual", "output"] = Field("residual", description="cos(xT, y) or cos(norm(a + xT), h)")
    cosine_init: Literal["identity", "ls"] = "identity"
    cosine_epochs: int = Field(10, ge=1)
    cosine_lr: float = Field(1e-4, gt=0)
    cosine_batch: int = Field(1024, ge=1)
    baselines: bool = Field(True, description="also measure naive drop (last n blocks) and the same cut without T")
    eval_samples: int = Field(256, ge=1, description="held-out texts / inputs for the baseline comparison")


@register_method("replaceme", ReplaceMeParams, help="ReplaceMe: remove n transformer blocks, fold a linear map into the block before",
                 kinds=("torch", "hf"))
def run_replaceme(ctx: StageContext, p: ReplaceMeParams) -> dict:
    from compressor.hf import corpus_sentences

    data = ctx.data
    texts_eval = inputs_eval = None
    if ctx.model_kind == "hf":
        if ctx.tokenizer is None:
            raise RecipeError("replaceme on a Hugging Face model needs its tokenizer", "save the tokenizer into the model folder")
        if data is not None and data.texts:
            calib, texts_eval = list(data.texts), list(data.test_texts or [])
        elif data is None:
            corpus = corpus_sentences()
            calib, texts_eval = corpus[0::2], corpus[1::2]
        else:
            raise RecipeError(f"replaceme calibrates a text model on text, got data {data.source}", "use --data text:FILE (or no --data: the shipped corpus)")
    else:
        if data is None or (data.train is None and data.test is None):
            raise RecipeError("replaceme on a torch model needs calibration inputs", "pass --data (e.g. npz:FILE or random)")
        calib = (data.train or data.test).tensors[0]
        inputs_eval = data.test.tensors[0][: p.eval_samples] if data.test is not None else None
    texts_eval = texts_eval[: p.eval_samples] if texts_eval else None
    kw = p.model_dump(exclude={"baselines", "eval_samples"})
    dense = ctx.model
    dev = ctx.device if ctx.device is not None else None
    pruned, report = prune(dense, calib, tokenizer=ctx.tokenizer, device=dev, seed=ctx.seed, inplace=False, **kw)
    report["calibration"]["source"] = data.source if data is not None else "shipped corpus (even sentences)"
    if p.baselines and (texts_eval or inputs_eval is not None):
        qkw = {"tokenizer": ctx.tokenizer, "texts": texts_eval} if texts_eval else {"inputs": inputs_eval}
        from compressor.hf import embed

        ref = None
        if texts_eval and not (hasattr(dense, "generate") and hasattr(dense, "lm_head")):
            ref = embed(dense, ctx.tokenizer, texts_eval)
        table = {"dense": quality(dense, dense, reference=ref, **qkw)}
        table[f"replaceme-{p.estimator}"] = quality(pruned, dense, reference=ref, **qkw)
        uidl, _ = prune(dense, calib, tokenizer=ctx.tokenizer, device=dev, inplace=False,
                        **{**kw, "estimator": "none", "start": report["start"]})
        table["same-cut-no-T"] = quality(uidl, dense, reference=ref, **qkw)
        del uidl
        naive, _ = naive_drop(dense, p.n_blocks)
        table["naive-drop-last"] = quality(naive, dense, reference=ref, **qkw)
        del naive
        report["comparison"] = table
        report["comparison_data"] = "held-out texts" if texts_eval else "held-out inputs"
    ctx.model = pruned
    return report
