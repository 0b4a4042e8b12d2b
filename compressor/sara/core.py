"""SaRA: fine-tune only the smallest-magnitude ("temporarily ineffective") weights (Hu et al., ICLR 2025; docs/sara.md).

Pieces:
- `select(model, threshold=..., fraction=...)` → `Selection`: the element-wise masks M_p = |w_p| < θ
  (strict) over every parameter tensor, θ given or taken as a quantile of |w| over all candidates.
- `SaRAAdapter`: the memory-efficient form (the paper's "unstructural backprop"). Each selected weight becomes a torch parametrization
  whose only trainable tensor is a 1-D `values` vector (the boolean-mask gather w[M]) plus an index
  buffer; the base weight is a frozen (requires_grad=False) tensor. A custom autograd op writes the values
  into the base storage and hands the module the base tensor itself (a view, no copy); its backward returns
  only g[M], so `.grad` and optimizer moments exist for |M| entries and no dense gradient is ever stored.
- `SaRAOptimizer`: AdamW on the values (β=(0.9, 0.999), ε=1e-8, decoupled wd 1e-2, default
  lr = 1e-3·exp(−350θ), the authors' code) that also clips the task gradient, adds the nuclear-norm low-rank penalty's
  gradient and does the one-time progressive re-selection (§4.4). It is a torch Optimizer, so the
  shared loop `compressor.train.train(model, data, optimizer=opt)` runs it unchanged (the paper's "one line" API).
- `adapter.merge()` writes nothing new: the base tensors already hold the adapted values; it removes the
  parametrizations and returns ordinary parameters (bit-identical forward).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.errors import InputError
from compressor.utils.names import owner
from compressor.utils.selectors import matches, selected


def fingerprint(t: torch.Tensor) -> str:
    """The identity of a base weight (an adaptation file is only applied to the exact base it was trained
    from): SHA-256 (first 16 hex digits) of the tensor's dtype, shape and bytes."""
    a = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{a.dtype}|{tuple(a.shape)}|".encode())
    if a.numel():
        h.update(a.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()[:16]


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 - 1 else torch.int64


# ----------------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """Which entries of which parameters are trainable. masks: {param name: bool tensor (param's shape)}."""

    threshold: float
    masks: dict[str, torch.Tensor]
    total: int  # candidate entries (all parameters considered)
    full: list[str] = field(default_factory=list)  # parameters trained densely (e.g. a new head)

    @property
    def selected(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def fraction(self) -> float:
        return self.selected / max(self.total, 1)

    def summary(self) -> dict:
        return {
            "threshold": self.threshold,
            "selected": self.selected,
            "candidates": self.total,
            "fraction": self.fraction,
            "per_param": {n: int(m.sum()) for n, m in self.masks.items()},
            "full": list(self.full),
        }


def candidate_params(model: nn.Module, include=None, exclude=(), full=()) -> list[tuple[str, torch.Tensor]]:
    """Every parameter tensor (no type filter, as in the paper) that `include`/`exclude` select and `full` does not name;
    the globs match a parameter's name or its module's (:mod:`compressor.utils.selectors`)."""
    return [(name, p) for name, p in model.named_parameters() if not matches(name, full) and selected(name, include, exclude)]


def threshold_for_fraction(tensors: list[torch.Tensor], fraction: float) -> float:
    """θ such that |w| < θ selects the `fraction` smallest entries (exactly, barring ties at θ)."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"fraction must be in (0, 1), got {fraction}", "e.g. fraction: 0.1 trains the 10% smallest weights")
    n = sum(t.numel() for t in tensors)
    k = int(round(fraction * n))
    if k < 1:
        raise InputError(
            f"fraction {fraction} of {n} weights selects nothing",
            "use a larger fraction (at least one weight must be trainable)",
        )
    if k >= n:
        raise InputError(f"fraction {fraction} selects every weight", "use a smaller fraction (SaRA trains a subset)")
    # θ = the (k+1)-th smallest |w|, found by bisection on the float32 bit pattern (monotonic for |w| ≥ 0):
    # 31 counting passes, no concatenated copy or sort of all weights (memory stays at one tensor's size)
    def count_le(bits: int) -> int:
        return sum(int((t.detach().float().abs().view(torch.int32) <= bits).sum()) for t in tensors)

    lo, hi = 0, 0x7F800000  # +inf
    while lo < hi:
        mid = (lo + hi) // 2
        if count_le(mid) >= k + 1:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor(lo, dtype=torch.int32).view(torch.float32))


def select(
    model: nn.Module,
    *,
    threshold: float | None = None,
    fraction: float | None = None,
    include=None,
    exclude=(),
    full=(),
) -> Selection:
    """Masks M_p = |w_p| < θ (strict) on the current weights, over every parameter tensor.

    Give `threshold` (θ, the reference uses 2e-3) or `fraction` (θ = that quantile of |w| over all candidate
    entries). `include` / `exclude` / `full` are name globs (a parameter's or its module's name, see
    :mod:`compressor.utils.selectors`): `full` parameters (e.g. a freshly initialised
    head) are trained densely instead and are not candidates.
    """
    if (threshold is None) == (fraction is None):
        raise InputError("give exactly one of threshold or fraction", "e.g. threshold: 2e-3, or fraction: 0.1")
    cands = candidate_params(model, include, exclude, full)
    if not cands:
        raise InputError("no parameter matches the SaRA candidate filters", "check include/exclude/full name patterns")
    total = sum(p.numel() for _, p in cands)
    if fraction is not None:
        threshold = threshold_for_fraction([p for _, p in cands], fraction)
    threshold = float(threshold)
    if not (threshold > 0 and math.isfinite(threshold)):
        raise InputError(f"threshold must be a positive finite number, got {threshold}", "e.g. threshold: 2e-3")
    masks = {}
    for name, p in cands:
        m = p.detach().abs() < threshold
        if bool(m.any()):
            masks[name] = m
    sel = Selection(threshold, masks, total, [n for n, _ in model.named_parameters() if matches(n, full)])
    if sel.selected == 0:
        smallest = min(float(p.detach().abs().min()) for _, p in cands)
        raise InputError(
            f"threshold {threshold:g} selects no weight (smallest |w| is {smallest:.3g})",
            "use a larger threshold, or give fraction: (e.g. 0.1) instead",
        )
    if sel.selected == total:
        largest = max(float(p.detach().abs().max()) for _, p in cands)
        raise InputError(
            f"threshold {threshold:g} selects every weight (largest |w| is {largest:.3g}), so SaRA would be full fine-tuning",
            "use a smaller threshold, or give fraction: (e.g. 0.1) instead",
        )
    return sel


# ------------------------------------------------------------------------------- memory-efficient form


class _Scatter(torch.autograd.Function):
    """weight = base with base[idx] := values. Forward writes the values into the frozen base storage (O(|M|))
    and returns the base itself as a view (no dense copy); backward returns only g[idx] for the values.

    The write goes through `.data`, so it does not bump the base's autograd version: the values only change in
    optimizer.step() (between backward and the next forward), and re-writing identical values is harmless.
    """

    @staticmethod
    def forward(ctx, base, values, idx):
        base.data.view(-1)[idx] = values.detach().to(base.dtype)
        ctx.save_for_backward(idx)
        return base.view_as(base)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return None, grad.reshape(-1)[idx], None


class SparseDelta(nn.Module):
    """The parametrization of one selected weight: trainable `values` (= w[M]) and the flat indices of M."""

    def __init__(self, base: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        idx = mask.reshape(-1).nonzero().squeeze(1).to(_index_dtype(mask.numel()))
        self.register_buffer("idx", idx)
        self.register_buffer("initial_idx", idx, persistent=False)  # same tensor until re-selection
        self.values = nn.Parameter(base.detach().reshape(-1)[idx].clone())

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return _Scatter.apply(base, self.values, self.idx)

    def sync(self, base: torch.Tensor) -> None:
        with torch.no_grad():
            base.data.view(-1)[self.idx] = self.values.detach().to(base.dtype)


class SaRAAdapter:
    """Attaches SaRA to `model` in place: every parameter is frozen; selected weights get a SparseDelta."""

    def __init__(self, model: nn.Module, selection: Selection):
        self.model = model
        self.selection = selection
        self.threshold = selection.threshold
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        # fingerprints of the base weights (everything not trained densely), so an adaptation file is only
        # ever applied to the exact base it was trained from
        self.base_fingerprints = {
            n: (tuple(p.shape), fingerprint(p)) for n, p in model.named_parameters() if n not in selection.full
        }
        for name, p in model.named_parameters():
            p.requires_grad_(name in selection.full)
        self.deltas: dict[str, SparseDelta] = {}
        for name, mask in selection.masks.items():
            module, attr = owner(model, name)
            base = getattr(module, attr)
            delta = SparseDelta(base, mask.to(base.device))
            parametrize.register_parametrization(module, attr, delta, unsafe=True)
            self.deltas[name] = delta
        self.merged = False

    # -- views
    def values(self) -> list[nn.Parameter]:
        return [d.values for d in self.deltas.values()]

    def full_params(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.selection.full if n in named]

    def trainable_count(self) -> int:
        return sum(d.values.numel() for d in self.deltas.values()) + sum(p.numel() for p in self.full_params())

    def base(self, name: str) -> torch.Tensor:
        module, attr = owner(self.model, name)
        return module.parametrizations[attr].original

    def sync(self) -> None:
        for name, d in self.deltas.items():
            d.sync(self.base(name))

    def adapted_initial_values(self) -> dict[str, torch.Tensor]:
        """Current weights at the *initial* mask positions (a superset of the live set after re-selection)."""
        self.sync()
        return {n: self.base(n).detach().reshape(-1)[d.initial_idx].clone() for n, d in self.deltas.items()}

    def merge(self) -> nn.Module:
        """Remove the parametrizations; the model's parameters become ordinary tensors holding the adapted
        weights (bit-identical to the adapted forward). Restores each parameter's requires_grad flag."""
        if self.merged:
            return self.model
        self.sync()
        for name in self.deltas:
            module, attr = owner(self.model, name)
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, True))
        self.merged = True
        return self.model


# ------------------------------------------------------------------------------------------ optimizer


def default_lr(threshold: float) -> float:
    """The reference's effective LR when none is given: 1e-3 · exp(−350 θ)."""
    return 1e-3 * math.exp(-350.0 * threshold)


class SaRAOptimizer(torch.optim.AdamW):
    """AdamW over the SaRA values of `model` (built from the model), plus:

    - task-gradient clipping of the trainable vectors to `max_grad_norm` (our choice);
    - nuclear-norm penalty λ_rank·‖S‖_* on one random eligible 2-D weight per step, S = current values at the
      trainable positions (zeros elsewhere), `penalize="values"` (the reference) or S = W[M] − W₀[M]
      (`penalize="update"`); its gradient U·Vᵀ gathered at M is added after clipping;
    - progressive re-selection after `progressive_step` updates: M' = M ∧ (|w| < θ); entries that grew past θ
      are frozen at their fine-tuned values; `reset_state` resets the Adam moments/step for the new set
      (default) or slices them; `skip_step` skips the update right after re-selection (the authors' UB code).

    Construction attaches a `SaRAAdapter` to the model in place (`opt.adapter`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float | None = None,
        fraction: float | None = None,
        selection: Selection | None = None,
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        lambda_rank: float = 5e-4,
        rank_min_dim: int = 64,
        penalize: str = "values",
        progressive_step: int | None = None,
        reset_state: bool = True,
        skip_step: bool = False,
        max_grad_norm: float | None = 1.0,
        include=None,
        exclude=(),
        full=(),
        full_lr: float | None = None,
        seed: int = 0,
    ):
        if penalize not in ("values", "update"):
            raise InputError(f"penalize must be 'values' or 'update', got {penalize!r}", "use penalize: values (the reference)")
        if selection is None:
            selection = select(model, threshold=threshold, fraction=fraction, include=include, exclude=exclude, full=full)
        self.adapter = SaRAAdapter(model, selection)
        self.threshold = selection.threshold
        lr = default_lr(self.threshold) if lr is None else float(lr)
        groups = [{"params": self.adapter.values(), "sara": True}]
        if self.adapter.full_params():
            groups.append({"params": self.adapter.full_params(), "sara": False, "lr": full_lr if full_lr is not None else lr})
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.lambda_rank = float(lambda_rank)
        self.penalize = penalize
        self.max_grad_norm = max_grad_norm
        self.progressive_step = progressive_step
        self.reset_state = reset_state
        self.skip_step = skip_step
        self.n_updates = 0
        self.reselected = False
        self.last_rank_loss = float("nan")
        self._gen = torch.Generator().manual_seed(seed)
        self.rank_names = [
            n for n, d in self.adapter.deltas.items()
            if self.adapter.base(n).dim() == 2 and min(self.adapter.base(n).shape) > rank_min_dim
        ]
        self._initial = (
            {n: d.values.detach().clone() for n, d in self.adapter.deltas.items() if n in self.rank_names}
            if penalize == "update" else {}
        )

    # -- pieces of step()
    def _clip(self) -> None:
        if not self.max_grad_norm:
            return
        grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            nn.utils.clip_grad_norm_(grads, self.max_grad_norm)

    def rank_penalty(self, name: str) -> tuple[float, torch.Tensor]:
        """(λ‖S‖_*, its gradient w.r.t. the live values of `name`)."""
        d = self.adapter.deltas[name]
        base = self.adapter.base(name)
        v = d.values.detach().float()
        if self.penalize == "update":
            # initial values at the live positions: the live set is a gather of the initial one
            v = v - self._initial[name].to(v.device)
        s = torch.zeros(base.numel(), dtype=torch.float32, device=v.device)
        s[d.idx] = v
        u, sv, vh = torch.linalg.svd(s.view(base.shape), full_matrices=False)
        # subgradient U·Vᵀ over the non-zero singular values (the minimal one: a zero matrix gets zero)
        keep = sv > sv.max().clamp_min(1e-30) * max(base.shape) * torch.finfo(sv.dtype).eps
        grad = (u[:, keep] @ vh[keep]).reshape(-1)[d.idx]
        return self.lambda_rank * float(sv.sum()), self.lambda_rank * grad.to(d.values.dtype)

    def _add_rank_grad(self) -> None:
        if self.lambda_rank <= 0 or not self.rank_names:
            return
        name = self.rank_names[int(torch.randint(len(self.rank_names), (1,), generator=self._gen))]
        d = self.adapter.deltas[name]
        if d.values.numel() <= 100:  # the reference only applies it when ‖M‖₀ > 100
            return
        loss, grad = self.rank_penalty(name)
        self.last_rank_loss = loss
        if d.values.grad is None:
            d.values.grad = grad
        else:
            d.values.grad.add_(grad)

    def reselect(self) -> dict:
        """Progressive adjustment: keep training only the entries still below θ."""
        self.adapter.sync()
        before, after = 0, 0
        for name, d in self.adapter.deltas.items():
            old = d.values
            keep = old.detach().abs() < self.threshold
            before += old.numel()
            after += int(keep.sum())
            new = nn.Parameter(old.detach()[keep].clone())
            if old.grad is not None:
                new.grad = old.grad[keep].clone()
            for g in self.param_groups:
                for i, p in enumerate(g["params"]):
                    if p is old:
                        g["params"][i] = new
            st = self.state.pop(old, None)
            if st and not self.reset_state:
                self.state[new] = {k: (v[keep].clone() if torch.is_tensor(v) and v.shape == old.shape else v) for k, v in st.items()}
            if name in self._initial:
                self._initial[name] = self._initial[name].to(keep.device)[keep]
            d.idx = d.idx[keep]
            d.values = new
        self.reselected = True
        return {"before": before, "after": after}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.progressive_step is not None and not self.reselected and self.n_updates >= self.progressive_step:
            self.reselect()
            if self.skip_step:
                self.n_updates += 1
                return None
        self._clip()
        with torch.enable_grad():
            self._add_rank_grad()
        super().step()
        self.n_updates += 1
        return None


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by gradients and optimizer state of the optimizer's parameters (what SaRA shrinks)."""
    total = 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                total += p.grad.numel() * p.grad.element_size()
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
    return total
