"""``swap_sparse_kernels``: replace pruned ``nn.Linear`` layers by :class:`SparseLinear` in place, verified.

1. Run the model on the example inputs (recording how many rows each Linear sees) → reference outputs.
2. For every Linear with sparsity >= ``min_sparsity``: choose a format (measured or default table), swap.
   Layers that stay dense are left untouched (not wrapped).
3. Run again and compare every output tensor with the reference (``atol``/``rtol``; looser when a layer
   computes in fp16/bf16 for 2:4). On disagreement every swapped layer is put back (the original module
   objects, parametrizations included) and :class:`compressor.errors.VerificationError` is raised.

The report lists each layer: shape, sparsity, format, why, and the speed-up measured for that layer alone
(dense vs chosen format on a random input of the layer's real row count, interleaved medians).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from compressor.device import module_device
from compressor.errors import InputError, VerificationError
from compressor.kernels import calibrate as KC
from compressor.kernels import formats as KF
from compressor.kernels.sparse_linear import SparseLinear
from compressor.utils import progress as bars
from compressor.utils.names import join_name, set_module
from compressor.utils.selectors import selected


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    rows: int
    format: str
    source: str
    reason: str
    dense_ms: float | None = None
    sparse_ms: float | None = None
    speedup: float | None = None


@dataclass
class SwapReport:
    device: str
    layers: list[LayerReport] = field(default_factory=list)
    max_abs_diff: float = 0.0
    atol: float = 0.0
    rtol: float = 0.0
    model_ms_before: float | None = None
    model_ms_after: float | None = None

    @property
    def swapped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.format != "dense"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_swapped"] = len(self.swapped)
        if self.model_ms_before and self.model_ms_after:
            d["model_speedup"] = self.model_ms_before / self.model_ms_after
        return d

    def table(self):
        from rich.table import Table

        t = Table(title=f"sparse kernels on {self.device}")
        for c in ("layer", "shape", "sparsity", "rows", "format", "dense ms", "sparse ms", "speed-up", "why"):
            t.add_column(c)

        def f(v, p=3):
            return "-" if v is None else f"{v:.{p}f}"

        for r in self.layers:
            t.add_row(r.name, "x".join(map(str, r.shape)), f"{r.sparsity:.2f}", str(r.rows), r.format, f(r.dense_ms),
                      f(r.sparse_ms), "-" if r.speedup is None else f"{r.speedup:.2f}x", r.reason)
        return t


def _flatten(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
    if isinstance(out, list | tuple):
        return [t for o in out for t in _flatten(o)]
    return []


def _run(model: nn.Module, inputs, device: torch.device):
    if isinstance(inputs, dict):
        return model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()})
    args = inputs if isinstance(inputs, tuple | list) else (inputs,)
    return model(*[a.to(device) if isinstance(a, Tensor) else a for a in args])


def _compare(before: list[Tensor], after: list[Tensor], atol: float, rtol: float) -> tuple[bool, float]:
    if len(before) != len(after):
        return False, float("inf")
    ok, worst = True, 0.0
    for b, a in zip(before, after, strict=True):
        if b.shape != a.shape:
            return False, float("inf")
        if not b.is_floating_point():
            ok &= bool(torch.equal(a.cpu(), b.cpu()))
            continue
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        worst = max(worst, float((a - b).abs().max()) if a.numel() else 0.0)
        ok &= bool(torch.allclose(a, b, atol=atol, rtol=rtol))
    return ok, worst


def unswap_sparse_kernels(model: nn.Module) -> int:
    """Turn every SparseLinear back into an ``nn.Linear`` (e.g. before ONNX export); returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    for n in names:
        set_module(model, n, model.get_submodule(n).to_linear())
    return len(names)


@torch.no_grad()
def swap_sparse_kernels(model: nn.Module, example_inputs, min_sparsity: float = 0.5, device=None, *,
                        mode: str = "auto", half: torch.dtype | None = torch.bfloat16, atol: float | None = None,
                        rtol: float | None = None, measure: bool = True, repeats: int = 10,
                        include: list[str] | None = None, exclude: list[str] | None = None,
                        cache: KC.DecisionCache | None = None, time_model: bool = False) -> SwapReport:
    """Replace qualifying ``nn.Linear`` layers of ``model`` in place; verify; report.

    ``device``: where the kernels will run (default: the model's device; the model is moved there).
    ``mode``: "auto" (cached measurement, else the conservative default table), "calibrate" (measure every
    layer now and cache it), "default", or a format name to force. ``half``: dtype 2:4 layers compute in when
    the model is fp32 (``None`` keeps fp32 and so rules 2:4 out). ``include`` / ``exclude``: globs on the
    Linear's weight name or module name (the recipes' meaning, :mod:`compressor.utils.selectors`).
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise InputError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    model_device = module_device(model)
    device = torch.device(device) if device is not None else model_device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but CUDA is not available", fix="use --device cpu or run on a GPU machine")
    if device != model_device:
        model.to(device)
    was_training = model.training
    model.eval()

    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and selected(join_name(n, "weight"), include, exclude)}
    rows: dict[str, int] = {}

    def hook(name):
        def f(mod, inp, out):
            rows[name] = max(rows.get(name, 0), inp[0].numel() // max(mod.in_features, 1))
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        ref = [t.detach().clone() for t in _flatten(_run(model, example_inputs, device))]
    finally:
        for h in handles:
            h.remove()
    report = SwapReport(device=str(device))
    if time_model:
        from compressor.kernels.calibrate import time_interleaved

        report.model_ms_before = time_interleaved({"m": lambda: _run(model, example_inputs, device)}, device, repeats=repeats)["m"]

    originals: dict[str, nn.Module] = {}
    any_half = False
    try:
        for name, lin in bars.track(linears.items(), "calibrating sparse kernels"):
            w = lin.weight.detach()
            s = KF.sparsity(w)
            r = rows.get(name, 1)
            if name not in rows:
                continue  # not reached by the example inputs: leave it alone
            if s < min_sparsity:
                report.layers.append(LayerReport(name, tuple(w.shape), s, r, "dense", "threshold",
                                                 f"sparsity {s:.3f} < min_sparsity {min_sparsity}"))
                continue
            layer_mode = mode
            if mode == "calibrate":
                d = KC.calibrate(w, lin.bias, rows=r, device=device, half=half, repeats=repeats, cache=cache)
            else:
                d = KC.choose_format(w, device, rows=r, mode=layer_mode, half=half, cache=cache)
            lr = LayerReport(name, tuple(w.shape), s, r, d.format, d.source, d.reason)
            if d.format != "dense":
                t = d.timings_ms
                if measure and not t:
                    t = KC.measure(w, lin.bias, r, device, [d.format], half=half, repeats=repeats)
                if t:
                    lr.dense_ms = t.get("dense_half", t["dense"]) if d.format == "semi24" and "dense_half" in t else t["dense"]
                    lr.sparse_ms = t.get(d.format)
                    lr.speedup = (lr.dense_ms / lr.sparse_ms) if lr.sparse_ms else None
                if d.source == "default" and lr.speedup is not None and lr.speedup < 1.0:
                    # the unmeasured table guessed wrong for this layer on this machine: keep it dense
                    lr.format, lr.source = "dense", "measured"
                    lr.reason = f"default table chose {d.format} but it measured {lr.speedup:.2f}x: kept dense"
                    report.layers.append(lr)
                    continue
                dt = KC.compute_dtype(device, d.format, w.dtype, half)
                any_half |= dt != w.dtype
                new = SparseLinear(w, lin.bias, d.format, device=device, dtype=dt, decision=d)
                originals[name] = lin
                set_module(model, name, new)
            report.layers.append(lr)

        if atol is None:
            atol = 2e-2 if any_half else 1e-4
        if rtol is None:
            rtol = 2e-2 if any_half else 1e-4
        report.atol, report.rtol = atol, rtol
        out = [t.detach() for t in _flatten(_run(model, example_inputs, device))]
        ok, worst = _compare(ref, out, atol, rtol)
        report.max_abs_diff = worst
        if not ok:
            raise VerificationError(
                f"outputs changed after swapping {len(originals)} layer(s) to sparse kernels (max |diff| {worst:.3g} "
                f"> atol {atol:g} / rtol {rtol:g}); original layers restored",
                fix="check the layers' dtypes or raise the tolerance; pass half=None to keep fp32 (no 2:4)")
    except BaseException:
        for name, orig in originals.items():
            set_module(model, name, orig)
        model.train(was_training)
        raise
    if time_model:
        report.model_ms_after = time_interleaved({"m": lambda: _run(model, example_inputs, device)}, device, repeats=repeats)["m"]
    model.train(was_training)
    return report
