"""Weight masks: choosing them (magnitude, N:M, random/ERK) and enforcing them (torch parametrizations).

Conventions (docs/sparsity.md):

* A mask set is ``{"fc1.weight": BoolTensor}``; True = kept, False = pruned. Only the tensors named in it are
  prunable; everything else is dense.
* ``sparsity_masked`` = 1 − kept / numel over the masked tensors only (open_lth's number);
  ``sparsity_all_params`` = pruned entries / every parameter of the model (biases, norms, ignored layers
  included), so numbers compare across papers.
* Ranking conventions: ``exact_k`` (default; removes exactly k = round(s·N) entries, ties broken by flat
  index, lower index pruned first) and ``strict_above`` (open_lth: τ = sorted |w| at 0-based index n_prune,
  keep |w| > τ, so n_prune + 1 entries go absent ties).

Enforcement: :func:`apply_masks` registers a parametrization ``weight = where(mask, original, 0)`` and zeroes
the stored original at pruned positions. The forward therefore always sees exact zeros, gradients at pruned
positions are exactly zero, and (because the stored value and its gradient are both zero) SGD momentum,
weight decay, Adam and AdamW all leave them at zero — so the stored weights stay zero too.
Parametrized modules keep their state under ``<module>.parametrizations.weight.original``; use
:func:`plain_copy` / :func:`plain_state_dict` before exporting or saving to get the plain names back.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from compressor.errors import RecipeError
from compressor.utils.kth import kth_smallest
from compressor.utils.names import join_name, module_name_of, owner
from compressor.utils.selectors import selected


def hf_conv1d() -> type | None:
    """transformers' GPT-2 style Conv1D (weight stored as [in, out]), or None when transformers is not
    installed. Any other failure to import it is a real error and propagates: treating it as "no Conv1D"
    would silently leave every GPT-2 projection out of pruning."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ModuleNotFoundError as e:
        if e.name != "transformers":
            raise
        return None
    return Conv1D


_HFConv1D = hf_conv1d()

DEFAULT_TYPES: tuple[type, ...] = (nn.Conv2d, nn.Linear) + ((_HFConv1D,) if _HFConv1D is not None else ())

__all__ = [
    "DEFAULT_TYPES", "WeightMask", "apply_masks", "bake_masks", "check_sparsity", "current_masks", "plain_copy",
    "has_masks", "hf_conv1d", "magnitude_masks", "mask_density", "mask_optimizer_state", "remask_", "nm_masks", "plain_state_dict", "prunable_weights", "baked_state_dict",
    "random_masks", "sparsity_report", "transposed_names",
]


# ----------------------------------------------------------------------------------------------------------
# which tensors


def _weight_param(module: nn.Module) -> nn.Parameter | None:
    """The trainable storage of `module.weight` (the parametrization's `original` when masked)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    w = getattr(module, "weight", None)
    return w if isinstance(w, nn.Parameter) else None


def prunable_weights(model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None,
                     types: tuple[type, ...] = DEFAULT_TYPES) -> dict[str, nn.Parameter]:
    """``{"fc1.weight": param}`` for every module of `types` (Conv2d, Linear, HF Conv1D by default).

    `include` / `exclude` are glob patterns (fnmatch, case-sensitive) matched against the weight name
    ("fc1.weight") or the module name ("fc1"), see :mod:`compressor.utils.selectors`; e.g. ``exclude=["fc"]`` keeps the output layer dense,
    ``include=["encoder.layer.*"]``. A weight shared by several such modules (tied) is listed once; one tied to a
    module of another type (an embedding) is left out.
    For an already-masked module the returned parameter is its unmasked storage (the parametrization's
    ``original``), still under the plain name. Raises RecipeError when nothing matches.
    """
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    candidates = []
    # a weight tied to a module of another type (e.g. GPT-2's lm_head and its token embedding) is not prunable:
    # the other module would read it unmasked
    foreign = {id(p) for m in model.modules() if not isinstance(m, types + (parametrize.ParametrizationList,))
               for p in m._parameters.values() if p is not None}
    for mname, module in model.named_modules():
        if not isinstance(module, types):
            continue
        p = _weight_param(module)
        if p is None or id(p) in seen or id(p) in foreign:
            continue
        seen.add(id(p))
        name = join_name(mname, "weight")
        candidates.append(name)
        if not selected(name, include, exclude):
            continue
        out[name] = p
    if not out:
        tnames = ", ".join(t.__name__ for t in types)
        if not candidates:
            raise RecipeError(f"the model has no prunable layer ({tnames})", "magnitude pruning needs Conv2d/Linear weights")
        shown = ", ".join(candidates[:6]) + (" ..." if len(candidates) > 6 else "")
        raise RecipeError(
            f"no prunable layer matched include={include or '*'} exclude={exclude or []}",
            f"patterns are globs on names like: {shown}",
        )
    return out


def transposed_names(model: nn.Module, names: Iterable[str]) -> set[str]:
    """Names (of `names`) whose weight is stored [in, out] (HF Conv1D), i.e. the input dim is dim 0."""
    if _HFConv1D is None:
        return set()
    mods = dict(model.named_modules())
    return {n for n in names if isinstance(mods.get(module_name_of(n)), _HFConv1D)}


# ----------------------------------------------------------------------------------------------------------
# choosing masks


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise RecipeError(f"{what} must be in [0, 1), got {sparsity}", "e.g. 0.5 removes half of the weights; 1.0 would remove all")
    return s


def _flat_abs(w: Tensor) -> Tensor:
    return w.detach().abs().float().reshape(-1).cpu()


def _threshold_keep(weights: dict[str, Tensor], alive: dict[str, Tensor | None], n_prune: int, n_alive: int,
                    convention: str) -> dict[str, Tensor]:
    """Flat 'keep' vectors pruning `n_prune` alive entries of `weights` ranked jointly (per convention), in bounded
    memory: the exact threshold comes from a radix select over one tensor at a time (compressor.utils.kth), then
    each tensor is masked against it. exact_k prunes every alive |w| below the k-th smallest and, of those equal
    to it, the first ones in flat order (the names' order, then the index): what a stable sort of all of them
    would prune. Alive None = every entry alive."""
    if n_prune <= 0 or n_alive == 0:
        return {k: (alive[k].clone() if alive[k] is not None else torch.ones(w.numel(), dtype=torch.bool))
                for k, w in weights.items()}

    def alive_scores():
        for k, w in weights.items():
            s = _flat_abs(w)
            yield s if alive[k] is None else s[alive[k]]

    if convention == "exact_k":
        k_th = min(n_prune, n_alive)
    elif convention == "strict_above":
        k_th = min(n_prune, n_alive - 1) + 1
    else:
        raise RecipeError(f"unknown threshold convention {convention!r}", "use exact_k or strict_above")
    tau, below = kth_smallest(alive_scores, k_th)
    ties = k_th - below  # exact_k: entries equal to tau still to prune, in flat order
    keep = {}
    for k, w in weights.items():
        s = _flat_abs(w)
        a = alive[k] if alive[k] is not None else torch.ones(s.numel(), dtype=torch.bool)
        if convention == "strict_above":
            keep[k] = a & (s > tau)
            continue
        kk = a & (s >= tau)
        if ties > 0:
            at = torch.nonzero(a & (s == tau), as_tuple=True)[0][:ties]
            kk[at] = False
            ties -= at.numel()
        keep[k] = kk
        del s
    return keep


def _n_prune(n_total: int, n_alive: int, sparsity: float, fraction_of_remaining: bool) -> int:
    if fraction_of_remaining:  # open_lth: ceil(f * remaining)
        return math.ceil(sparsity * n_alive) if sparsity > 0 else 0
    return max(0, round(sparsity * n_total) - (n_total - n_alive))


# Bytes per weight of the one tensor magnitude_masks ranks at a time (global and layer-wise alike: the global
# threshold is a radix select over one tensor at a time, compressor.utils.kth): |w| in fp32 (4), its int32 high bits
# (4), an alive-only copy (4) and a few boolean comparisons (1 each). The memory estimates of the stages and of
# sweeps are built on it.
RANK_BYTES_PER_WEIGHT = 20


def magnitude_masks(weights: dict[str, Tensor], sparsity: float, scope: str = "global", convention: str = "exact_k",
                    current: dict[str, Tensor] | None = None, fraction_of_remaining: bool = False) -> dict[str, Tensor]:
    """Magnitude masks (True = keep) for `weights` (ranking conventions below).

    scope: ``global`` ranks |w| jointly over all tensors; ``layerwise`` prunes each tensor separately.
    current: existing masks; entries already pruned stay pruned and only alive entries are ranked.
    sparsity: with ``fraction_of_remaining=False`` the target sparsity of the result (k = round(s·N) pruned in
    total, counting already-pruned entries); with ``True`` a fraction f of the *remaining* weights is removed
    (n_prune = ceil(f · n_alive), open_lth's IMP step).
    """
    s = check_sparsity(sparsity)
    if not weights:
        raise RecipeError("no weights to prune", "check include/exclude patterns")
    if scope not in ("global", "layerwise"):
        raise RecipeError(f"unknown pruning scope {scope!r}", "use global or layerwise")
    if convention not in ("exact_k", "strict_above"):
        raise RecipeError(f"unknown threshold convention {convention!r}", "use exact_k or strict_above")
    alive: dict[str, Tensor | None] = {}
    for k, w in weights.items():
        if current is not None and k in current:
            if tuple(current[k].shape) != tuple(w.shape):
                raise RecipeError(f"mask for {k} has shape {tuple(current[k].shape)}, weight {tuple(w.shape)}",
                                  "the masks belong to a different model")
            alive[k] = current[k].detach().bool().reshape(-1).cpu()
        else:
            alive[k] = None
    n_alive = {k: (w.numel() if alive[k] is None else int(alive[k].sum())) for k, w in weights.items()}
    if scope == "global":
        total, live = sum(w.numel() for w in weights.values()), sum(n_alive.values())
        keep = _threshold_keep(weights, alive, _n_prune(total, live, s, fraction_of_remaining), live, convention)
    else:
        keep = {}
        for k, w in weights.items():
            n_prune = _n_prune(w.numel(), n_alive[k], s, fraction_of_remaining)
            keep.update(_threshold_keep({k: w}, {k: alive[k]}, n_prune, n_alive[k], convention))
    return {k: keep[k].reshape(weights[k].shape).to(weights[k].device) for k in weights}


def nm_masks(weights: dict[str, Tensor], n: int, m: int, transposed: Iterable[str] = ()) -> dict[str, Tensor]:
    """N:M masks: in every group of M consecutive input weights of each output row, the N
    smallest |w| are pruned (N is the number *removed*: 2:4 = 50 %).

    Linear [out, in]: groups along `in`. Conv [out, in, kh, kw]: groups along the flattened input dim
    (in·kh·kw, PyTorch memory order). Names in `transposed` are stored [in, out] (HF Conv1D; see
    :func:`transposed_names`). Ties: the lower index is pruned first.
    """
    n, m = int(n), int(m)
    if m < 2 or n < 1 or n >= m:
        raise RecipeError(f"invalid N:M pattern {n}:{m}", "need 1 <= N < M (N weights removed per group of M), e.g. 2:4 or 4:8")
    transposed = set(transposed)
    out = {}
    for k, w in weights.items():
        wt = w.detach()
        if k in transposed:
            if wt.dim() != 2:
                raise RecipeError(f"{k}: transposed layout needs a 2-D weight", "report this as a bug")
            wt = wt.t()
        rows = wt.reshape(wt.shape[0], -1)
        if rows.shape[1] % m:
            raise RecipeError(f"{k}: input dim {rows.shape[1]} is not divisible by M={m}, so {n}:{m} cannot tile it",
                              f"exclude this layer (exclude: ['{k.rsplit('.', 1)[0]}']) or pick an M that divides {rows.shape[1]}")
        g = rows.abs().float().reshape(-1, m)
        order = torch.sort(g, dim=1, stable=True).indices
        keep = torch.ones_like(g, dtype=torch.bool)
        keep.scatter_(1, order[:, :n], False)
        keep = keep.reshape(rows.shape).reshape(wt.shape)
        if k in transposed:
            keep = keep.t().contiguous()
        out[k] = keep.to(w.device)
    return out


def _erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities: d_l = ε·Σdims/Πdims, layers that would exceed 1 made dense, ε re-solved."""
    numel = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(numel[k] for k in dense)
        denom = sum(raw[k] * numel[k] for k in shapes if k not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = [k for k in shapes if k not in dense and eps * raw[k] > 1.0]
        if not over:
            break
        dense.update(over)
    return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}


def random_masks(weights: dict[str, Tensor], sparsity: float, scope: str = "global", seed: int = 0) -> dict[str, Tensor]:
    """Random baselines (for sweeps): ``global`` prunes exactly round(s·N) uniformly chosen entries over all
    tensors; ``erk`` draws per-layer densities from Erdős–Rényi-Kernel and prunes round((1−d_l)·n_l) uniformly
    inside each layer. ``layerwise`` prunes the same fraction from each tensor."""
    s = check_sparsity(sparsity)
    gen = torch.Generator().manual_seed(int(seed))
    names = list(weights)
    if scope == "global":
        # a uniform subset of round(s·N) entries of all tensors, one tensor at a time (a permutation of every
        # weight is 8 bytes each): how many fall in each tensor is multivariate hypergeometric, then uniform inside
        import numpy as np

        sizes = [weights[k].numel() for k in names]
        counts = np.random.default_rng(int(seed)).multivariate_hypergeometric(sizes, round(s * sum(sizes)), method="marginals")
        n_prune = dict(zip(names, (int(c) for c in counts), strict=True))
    elif scope == "erk":
        dens = _erk_densities({k: tuple(weights[k].shape) for k in names}, 1.0 - s)
        n_prune = {k: round((1.0 - dens[k]) * weights[k].numel()) for k in names}
    elif scope == "layerwise":
        n_prune = {k: round(s * weights[k].numel()) for k in names}
    else:
        raise RecipeError(f"unknown random scope {scope!r}", "use global, erk or layerwise")
    out = {}
    for k in names:
        nk = weights[k].numel()
        keep = torch.ones(nk, dtype=torch.bool)
        keep[torch.randperm(nk, generator=gen)[: n_prune[k]]] = False
        out[k] = keep.reshape(weights[k].shape).to(weights[k].device)
    return out


# ----------------------------------------------------------------------------------------------------------
# enforcing masks


class WeightMask(nn.Module):
    """Parametrization: ``weight = where(mask, original, 0)`` (exact zeros; zero gradient where pruned)."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().bool().clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(self.mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _fresh_class(cls: type) -> type:
    d = dict(cls.__dict__)
    d["__deepcopy__"] = _deepcopy_with_own_class
    return type(cls.__name__, cls.__bases__, d)


def _deepcopy_with_own_class(self, memo):
    """deepcopy for masked modules that also copies the module's class (see :func:`_own_class`)."""
    import copyreg

    cls = self.__class__
    replica = cls.__new__(cls)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    for slot in copyreg._slotnames(cls):  # type: ignore[attr-defined]
        if hasattr(self, slot):
            setattr(replica, slot, copy.deepcopy(getattr(self, slot), memo))
    replica.__class__ = _fresh_class(cls)
    return replica


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own. torch's parametrize keeps each tensor's property on the
    module's (dynamically created) class, and plain deepcopy shares that class between copies, so removing a
    parametrization from one copy (e.g. baking a copy for export) would break the others. Masked modules get
    their own class, and a __deepcopy__ that gives every copy its own class too."""
    if parametrize.is_parametrized(module):
        module.__class__ = _fresh_class(module.__class__)


def _module_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    try:
        return owner(model, name)
    except AttributeError as e:
        raise RecipeError(f"mask names {name!r} but the model has no module {module_name_of(name)!r}",
                          "the masks belong to a different model") from e


def _mask_param(module: nn.Module, attr: str) -> WeightMask | None:
    if not parametrize.is_parametrized(module, attr):
        return None
    for p in getattr(module.parametrizations, attr):
        if isinstance(p, WeightMask):
            return p
    return None


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Enforce `masks` on `model` in place: masked weights are exactly zero in every forward, their gradients are
    zero, and the stored values are zeroed. Re-applying to an already-masked tensor replaces its mask."""
    for name, mask in masks.items():
        module, attr = _module_of(model, name)
        existing = _mask_param(module, attr)
        storage = module.parametrizations[attr].original if existing is not None else getattr(module, attr, None)
        if not isinstance(storage, Tensor):
            raise RecipeError(f"mask names {name!r} but the model has no such tensor", "the masks belong to a different model")
        if tuple(mask.shape) != tuple(storage.shape):
            raise RecipeError(f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(storage.shape)}",
                              "the masks belong to a different model")
        mask = mask.detach().bool().to(storage.device)
        if existing is not None:
            existing.mask.copy_(mask)
        else:
            parametrize.register_parametrization(module, attr, WeightMask(mask))
            _own_class(module)
            storage = module.parametrizations[attr].original
        with torch.no_grad():
            storage.masked_fill_(~mask, 0)


def remask_(model: nn.Module) -> None:
    """Zero the stored weights at pruned positions again (e.g. after loading a state dict into a masked model)."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                mp = _mask_param(module, attr)
                if mp is not None:
                    with torch.no_grad():
                        module.parametrizations[attr].original.masked_fill_(~mp.mask, 0)


def mask_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Zero the optimizer state (momentum, Adam moments) of masked parameters at pruned positions, so a mask
    that changes mid-training (gradual pruning) leaves the stored weights at exactly zero too."""
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr in module.parametrizations.keys():
            mp = _mask_param(module, attr)
            if mp is None:
                continue
            p = module.parametrizations[attr].original
            for v in optimizer.state.get(p, {}).values():
                if isinstance(v, Tensor) and v.shape == p.shape:
                    v.masked_fill_(~mp.mask, 0)


def has_masks(model: nn.Module) -> bool:
    return any(isinstance(m, WeightMask) for m in model.modules())


def current_masks(model: nn.Module) -> dict[str, Tensor]:
    """The masks enforced on `model` now: ``{"fc1.weight": BoolTensor}`` (copies)."""
    out = {}
    for mname, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr in module.parametrizations.keys():
            mp = _mask_param(module, attr)
            if mp is not None:
                out[join_name(mname, attr)] = mp.mask.clone()
    return out


def bake_masks(model: nn.Module) -> None:
    """Remove the mask parametrizations in place, leaving plain weights holding exact zeros (for export/save).
    Afterwards nothing keeps pruned weights at zero during training."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        _own_class(module)
        for attr in list(module.parametrizations.keys()):
            if _mask_param(module, attr) is not None:
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def plain_copy(model: nn.Module) -> nn.Module:
    """What every export and save writes: a deep copy in eval mode with every parametrization (masks, an
    un-merged SaRA adapter) baked into plain parameters, so names are plain ("fc1.weight") and pruned entries are
    exact zeros. `model` is untouched, and stays usable: each parametrized module of the copy gets a class of its
    own before its parametrizations are removed (see :func:`_own_class`)."""
    clone = copy.deepcopy(model).eval()
    for module in list(clone.modules()):
        if parametrize.is_parametrized(module):
            _own_class(module)
            for attr in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return clone


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """state_dict with plain names ("fc1.weight") and pruned entries exactly zero, whether or not masks are applied."""
    source = plain_copy(model) if any(parametrize.is_parametrized(m) for m in model.modules()) else model
    return {k: v.detach().clone() for k, v in source.state_dict().items()}


def baked_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """What :func:`plain_state_dict` returns, without copying a weight (for saving a model too large to copy): the
    masked tensors' stored originals, zeroed again in place at pruned positions, under their plain names. None
    when a parametrization other than one mask is applied (e.g. an un-merged SaRA adapter): use plain_copy."""
    suffix = {}
    for mname, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                if len(plist) != 1 or not isinstance(plist[0], WeightMask):
                    return None
                suffix[join_name(mname, f"parametrizations.{attr}")] = join_name(mname, attr)
    remask_(model)
    out = {}
    for k, v in model.state_dict().items():
        head, _, tail = k.rpartition(".original") if k.endswith(".original") else ("", "", "")
        if head in suffix:
            out[suffix[head]] = v
        elif not any(k.startswith(p + ".0.") for p in suffix):  # the masks themselves
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# reporting


def mask_density(masks: dict[str, Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values()) / total) if total else 1.0


def sparsity_report(model: nn.Module, masks: dict[str, Tensor] | None = None) -> dict:
    """Sparsity with both denominators (masked tensors only, and every parameter).

    masks: defaults to the masks applied to `model`; if none are applied, the exact zeros of the prunable
    weights (Conv2d/Linear/Conv1D) are counted instead (e.g. a baked or loaded model).
    Returns {"sparsity_masked", "sparsity_all_params", "per_tensor": {name: sparsity}, "pruned", "masked_numel",
    "total_params"}.
    """
    if masks is None:
        masks = current_masks(model)
        if not masks:
            try:
                masks = {k: p.detach() != 0 for k, p in prunable_weights(model).items()}
            except RecipeError:
                masks = {}
    total_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    masked_numel = sum(m.numel() for m in masks.values())
    pruned = sum(m.numel() - int(m.sum()) for m in masks.values())
    return {
        "sparsity_masked": pruned / masked_numel if masked_numel else 0.0,
        "sparsity_all_params": pruned / total_params if total_params else 0.0,
        "per_tensor": {k: 1.0 - float(m.sum()) / m.numel() for k, m in masks.items()},
        "pruned": pruned,
        "masked_numel": masked_numel,
        "total_params": total_params,
    }
