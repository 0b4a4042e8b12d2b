"""Break-even points: when does a sparse format beat dense for a given layer?

Two sources, in this order:

1. **Measured** — :func:`calibrate` times dense and every eligible sparse format on the real weight
   (interleaved repetitions, median), picks the fastest (a sparse format must beat dense by ``margin``)
   and caches the decision per ``(device, shape, sparsity bucket, pattern, rows bucket)`` in memory and,
   when asked, in a JSON file under the user cache dir (``$XDG_CACHE_HOME/compressor/kernels.json``).
2. **Default table** — :data:`DEFAULT_TABLE`, conservative rules taken from ``benchmarks/kernels.py``
   runs (see docs/kernels.md): with no measurement we only leave dense where it clearly pays.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from compressor.kernels import formats as KF
from compressor.utils.atomic import write_text_atomic

SPARSITY_BUCKETS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)

# Conservative defaults (no calibration). Measured on CPU (MKL, 1 thread) with benchmarks/kernels.py: CSR
# breaks even with dense around 85-90% unstructured sparsity for 128-token batches and ~90-95% for batch 1;
# BSR only when most 16x16 blocks are empty. On CUDA the table is a last resort only ("default" mode):
# "auto" measures there, because 2:4 measured slower than dense bf16 on an H200 at every LLM shape tried
# (4096x4096 x 4096 tokens 0.26x, 128 tokens 0.03x, 11008x4096 0.73x; issue 13).
DEFAULT_TABLE: dict[str, dict] = {
    "cpu": {"csr_min_sparsity": 0.90, "csr_min_sparsity_rows1": 0.95, "bsr_min_block_sparsity": 0.80},
    "cuda": {"semi24_min_dim": 2048, "semi24_min_rows": 64, "csr_min_sparsity": 0.99},
}


@dataclass
class Decision:
    format: str
    source: str  # "default" | "measured" | "cache" | "forced"
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # e.g. {"alg_id": 3} for a searched cuSPARSELt algorithm

    @property
    def speedup(self) -> float | None:
        d, s = self.timings_ms.get("dense"), self.timings_ms.get(self.format)
        return (d / s) if d and s else None

    def to_dict(self) -> dict:
        return asdict(self) | {"speedup": self.speedup}


def sparsity_bucket(s: float) -> float:
    return max(b for b in SPARSITY_BUCKETS if s + 1e-9 >= b)


def rows_bucket(n: int) -> str:
    return "1" if n <= 1 else ("<=16" if n <= 16 else ("<=256" if n <= 256 else ">256"))


def cache_key(device: torch.device | str, shape, s: float, is_24: bool, rows: int, dtype: torch.dtype) -> str:
    device = torch.device(device)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return (f"{dev}|t{threads}|{tuple(shape)}|s{sparsity_bucket(s):.2f}|{'2:4' if is_24 else 'u'}"
            f"|rows{rows_bucket(rows)}|{str(dtype).replace('torch.', '')}")


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compressor" / "kernels.json"


class DecisionCache:
    """In-memory decisions, optionally persisted to a JSON file (written atomically)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        if self.path and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def get(self, key: str) -> Decision | None:
        e = self.entries.get(key)
        if not e:
            return None
        return Decision(e["format"], "cache", e.get("reason", ""), dict(e.get("timings_ms", {})), dict(e.get("options", {})))

    def put(self, key: str, d: Decision) -> None:
        self.entries[key] = {"format": d.format, "reason": d.reason, "timings_ms": d.timings_ms, "options": d.options}
        if self.path:
            write_text_atomic(self.path, json.dumps(self.entries, indent=1, sort_keys=True))

    def clear(self) -> None:
        self.entries.clear()


_MEMORY = DecisionCache()


def memory_cache() -> DecisionCache:
    return _MEMORY


# ----------------------------------------------------------------------------------------------------------
# candidates and the default table


def compute_dtype(device: torch.device | str, fmt: str, weight_dtype: torch.dtype,
                  half: torch.dtype | None = torch.bfloat16) -> torch.dtype:
    """The dtype a format computes in: 2:4 needs fp16/bf16 (``half`` when the weight is fp32; ``half=None``
    forbids changing the dtype, which rules 2:4 out for fp32 weights)."""
    if fmt == "semi24" and weight_dtype not in KF.HALF_DTYPES and half is not None:
        return half
    return weight_dtype


def candidates(w: Tensor, device: torch.device | str, half: torch.dtype | None = torch.bfloat16, block: int = 16) -> dict[str, str]:
    """{format: "" if eligible else reason} for this weight on this device."""
    device = torch.device(device)
    out = {"dense": "", "csr": ""}
    if w.dim() != 2:
        return {"dense": "", "csr": "not 2-D", "bsr": "not 2-D", "semi24": "not 2-D"}
    out["bsr"] = "" if (w.shape[0] % block == 0 and w.shape[1] % block == 0) else f"shape does not tile into {block}x{block}"
    ok, why = KF.semi24_support(w, device, compute_dtype(device, "semi24", w.dtype, half))
    out["semi24"] = "" if ok else why
    return out


def default_decision(w: Tensor, device: torch.device | str, rows: int, half: torch.dtype | None = torch.bfloat16,
                     block: int = 16, table: dict | None = None) -> Decision:
    """The conservative, unmeasured choice."""
    device = torch.device(device)
    table = table or DEFAULT_TABLE
    st = KF.weight_stats(w, block)
    cand = candidates(w, device, half, block)
    if device.type == "cuda":
        t = table["cuda"]
        if not cand["semi24"] and min(w.shape) >= t["semi24_min_dim"] and rows >= t["semi24_min_rows"]:
            return Decision("semi24", "default", f"2:4 and both dims >= {t['semi24_min_dim']}, rows >= {t['semi24_min_rows']}")
        if st.sparsity >= t["csr_min_sparsity"]:
            return Decision("csr", "default", f"sparsity {st.sparsity:.3f} >= {t['csr_min_sparsity']}")
        why = cand["semi24"] or f"below the 2:4 size threshold ({t['semi24_min_dim']})"
        return Decision("dense", "default", f"no sparse format pays by default ({why})")
    t = table["cpu"]
    if not cand["bsr"] and st.block_sparsity >= t["bsr_min_block_sparsity"]:
        return Decision("bsr", "default", f"{st.block_sparsity:.2f} of {block}x{block} blocks empty >= {t['bsr_min_block_sparsity']}")
    need = t["csr_min_sparsity_rows1"] if rows <= 1 else t["csr_min_sparsity"]
    if st.sparsity >= need:
        return Decision("csr", "default", f"sparsity {st.sparsity:.3f} >= {need} (rows={rows})")
    return Decision("dense", "default", f"sparsity {st.sparsity:.3f} < {need}: dense is faster on CPU below that")


# ----------------------------------------------------------------------------------------------------------
# measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str = "cpu", repeats: int = 15,
                     warmup: int = 2, min_time_s: float = 0.0) -> dict[str, float]:
    """Median ms per call of each fn, with the fns run round-robin so drift hits all of them alike."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    t_start = time.perf_counter()
    r = 0
    while r < repeats or (time.perf_counter() - t_start < min_time_s and r < repeats * 20):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
        r += 1
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


@torch.no_grad()
def measure(w: Tensor, bias: Tensor | None, rows: int, device: torch.device | str, fmts: list[str] | tuple[str, ...],
            half: torch.dtype | None = torch.bfloat16, block: int = 16, repeats: int = 15, warmup: int = 2,
            search: bool = True, extras: dict | None = None) -> dict[str, float]:
    """Time ``fmts`` (dense always included) on this weight with a random [rows, in] input.

    Each format runs in the dtype it would use in :class:`SparseLinear`; for 2:4 the dense reference is also
    timed in that half dtype (``dense_half``), the fair comparison for tensor cores. With ``search``, 2:4 is
    also timed with the algorithm cuSPARSELt's search picks for this shape (``semi24_search``; its id goes
    into ``extras["alg_id"]``, or the reason it was not tried into ``extras["skipped"]``).
    """
    extras = extras if extras is not None else {}
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, w.shape[1], generator=gen).to(device=device, dtype=w.dtype)
    fns: dict[str, Callable[[], object]] = {}
    for fmt in dict.fromkeys(("dense", *fmts)):
        dt = compute_dtype(device, fmt, w.dtype, half)
        packed = KF.pack(w, fmt, device=device, dtype=dt, block=block)
        b = bias.detach().to(device=device, dtype=dt) if bias is not None else None
        xi = x.to(dt)
        fns[fmt] = (lambda p=packed, f=fmt, b=b, xi=xi: KF.linear(xi, p, f, b))
        if fmt == "semi24" and dt != w.dtype:
            wd, bd = w.detach().to(device=device, dtype=dt), b
            fns["dense_half"] = lambda wd=wd, bd=bd, xi=xi: KF.linear(xi, wd, "dense", bd)
        if fmt == "semi24" and search:
            alg, why = KF.cslt_search(packed, xi)
            if alg is None:
                extras.setdefault("skipped", {})["cusparselt_search"] = why
            elif alg != 0:  # 0 is what "semi24" already times
                searched = KF.pack(w, fmt, device=device, dtype=dt, block=block, alg_id=alg)
                extras["alg_id"] = alg
                fns["semi24_search"] = (lambda p=searched, b=b, xi=xi: KF.linear(xi, p, "semi24", b))
    if "semi24" in fmts:
        extras.setdefault("skipped", {}).update(KF.optional_24_paths())
    return time_interleaved(fns, device, repeats=repeats, warmup=warmup)


def decide(timings: dict[str, float], fmts, margin: float = 1.05, extras: dict | None = None) -> Decision:
    """The measured choice from ``timings`` (ms, from :func:`measure`): a sparse format only when it is at least
    ``margin`` times faster than dense (2:4 against dense in the same half dtype, its searched cuSPARSELt
    algorithm counted when faster). The reason names the measured ratio either way, so a report says why a
    layer stayed dense."""
    extras = extras or {}
    best, best_ratio, options, seen = "dense", 1.0, {}, []
    for f in fmts:
        t, opts = timings[f], {}
        if f == "semi24" and timings.get("semi24_search", float("inf")) < t:
            t, opts = timings["semi24_search"], {"alg_id": extras.get("alg_id")}
        ref = timings.get("dense_half", timings["dense"]) if f == "semi24" else timings["dense"]
        ratio = ref / t
        seen.append(f"{f}{' (cuSPARSELt alg ' + str(opts['alg_id']) + ')' if opts else ''} {ratio:.2f}x "
                    f"({t:.3f} ms vs dense{' ' + _half_name(timings) if f == 'semi24' else ''} {ref:.3f} ms)")
        if ratio >= margin and ratio > best_ratio:
            best, best_ratio, options = f, ratio, opts
    skipped = "; ".join(f"{k}: {v}" for k, v in extras.get("skipped", {}).items())
    if best != "dense":
        reason = f"measured {best_ratio:.2f}x vs dense: " + ", ".join(seen)
    else:
        reason = (f"kept dense: no sparse format >= {margin:.2f}x faster; measured " + (", ".join(seen) or "nothing eligible"))
    if skipped:
        reason += f" [not tried: {skipped}]"
    return Decision(best, "measured", reason, dict(timings), options)


def _half_name(timings: dict) -> str:
    return "half" if "dense_half" in timings else "same dtype"


def calibrate(w: Tensor, bias: Tensor | None = None, *, rows: int = 128, device: torch.device | str = "cpu",
              half: torch.dtype | None = torch.bfloat16, block: int = 16, margin: float = 1.05, repeats: int = 15,
              cache: DecisionCache | None = None, use_cache: bool = True, search: bool = True) -> Decision:
    """Measured decision for this weight on ``device`` with ``rows`` input rows (cached per bucket).

    A sparse format is chosen only when it is at least ``margin`` times faster than dense; 2:4 is compared
    with dense in the same half dtype when it would change the dtype (otherwise the speed-up would mix
    sparsity with precision).
    """
    device = torch.device(device)
    cache = cache if cache is not None else _MEMORY
    st = KF.weight_stats(w, block)
    key = cache_key(device, w.shape, st.sparsity, st.is_24, rows, w.dtype)
    if use_cache and (hit := cache.get(key)) is not None:
        return hit
    cand = candidates(w, device, half, block)
    fmts = [f for f, why in cand.items() if not why and f != "dense"]
    if device.type == "cpu":
        fmts = [f for f in fmts if f != "bsr" or st.block_sparsity >= 0.3]  # BSR with full blocks cannot win
    extras: dict = {}
    t = measure(w, bias, rows, device, fmts, half=half, block=block, repeats=repeats, search=search, extras=extras)
    d = decide(t, fmts, margin, extras)
    cache.put(key, d)
    return d


def choose_format(w: Tensor, device: torch.device | str, *, rows: int = 128, mode: str = "auto",
                  half: torch.dtype | None = torch.bfloat16, block: int = 16, cache: DecisionCache | None = None,
                  table: dict | None = None) -> Decision:
    """``mode``: "auto" (cached measurement if any; else on CUDA a measurement now, on CPU the default table),
    "calibrate" (measure now), "default" (table only) or a format name (forced; raises ValueError when not
    eligible). On CUDA "auto" never trusts the table: 2:4 wins or loses by shape and row count (issue 13)."""
    device = torch.device(device)
    cache = cache if cache is not None else _MEMORY
    if mode in KF.FORMATS:
        why = candidates(w, device, half, block).get(mode, "")
        if why:
            raise ValueError(f"format {mode!r} not usable for weight {tuple(w.shape)} on {device}: {why}")
        return Decision(mode, "forced", "requested")
    if mode == "calibrate":
        return calibrate(w, None, rows=rows, device=device, half=half, block=block, cache=cache)
    if mode == "auto":
        st = KF.weight_stats(w, block)
        hit = cache.get(cache_key(device, w.shape, st.sparsity, st.is_24, rows, w.dtype))
        if hit is not None:
            return hit
        if device.type == "cuda":
            return calibrate(w, None, rows=rows, device=device, half=half, block=block, cache=cache)
        return default_decision(w, device, rows, half, block, table)
    if mode == "default":
        return default_decision(w, device, rows, half, block, table)
    raise ValueError(f"mode must be auto|calibrate|default|{'|'.join(KF.FORMATS)}, got {mode!r}")
