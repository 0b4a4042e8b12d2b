"""Second opinion on coupled channel groups: torch-pruning's DependencyGraph on the same torch model.

Both sides are reduced to one canonical form so they can be compared:
    a group = frozenset of (parameter name, axis label) members, axis label "out" | "in"
(see graphs/__init__.py for what "out" and "in" mean per layer type). Only trainable parameters count
(BN running statistics, rotary caches and other buffers are dropped): that is what both tools must agree on.

    groups = tp_groups(model, inputs, ignored=["fc"])      # torch-pruning's opinion
    ours   = onnx_groups(analysis, model)                  # compressor.graph.analyze(...) in canonical form
    report = compare_groups(ours, groups)                  # {"same": bool, "differences": [...], ...}
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

Canonical = frozenset  # frozenset[tuple[str, str]]


# ----------------------------------------------------------------------------------------------- axis labels
def _hf_conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers not installed
        return None
    return Conv1D


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Canonical parameter name → (owning module, attribute name), for the name named_parameters() reports."""
    out = {}
    for mname, mod in model.named_modules():
        for pname, _p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            out.setdefault(full, (mod, pname))
    return out


def axis_label(model: nn.Module, name: str, dim: int, _owners_cache: dict | None = None) -> str:
    """Label the physical dim `dim` of parameter `name`: "out", "in", or "dim<k>" for a non-channel axis
    (e.g. an embedding's vocabulary axis, a position embedding's position axis)."""
    owners = _owners_cache if _owners_cache is not None else _owners(model)
    mod, attr = owners[name]
    p = getattr(mod, attr)
    conv1d = _hf_conv1d_type()
    if attr == "weight" and isinstance(mod, nn.modules.conv._ConvNd):
        out_dim, in_dim = (1, 0) if mod.transposed else (0, 1)
        if mod.groups == mod.out_channels and mod.groups > 1:  # depthwise: its only channel axis is dim 0
            in_dim = None
        return "out" if dim == out_dim else "in" if dim == in_dim else f"dim{dim}"
    if attr == "weight" and isinstance(mod, nn.Linear):
        return {0: "out", 1: "in"}.get(dim, f"dim{dim}")
    if conv1d is not None and attr == "weight" and isinstance(mod, conv1d):  # HF GPT-2 Conv1D: [in, out]
        return {1: "out", 0: "in"}.get(dim, f"dim{dim}")
    if attr == "weight" and isinstance(mod, nn.Embedding):
        return "out" if dim == 1 else f"dim{dim}"
    # biases, norm scales/shifts, free parameters: the channel axis is the last non-singleton one
    nonsingleton = [i for i, s in enumerate(p.shape) if s > 1]
    last = nonsingleton[-1] if nonsingleton else p.dim() - 1
    return "out" if dim == last else f"dim{dim}"


# ------------------------------------------------------------------------------------------- torch-pruning
def _conv1d_pruner():
    """torch-pruning has no pruner for HF's GPT-2 Conv1D (weight [in, out]); without one its parameters are
    'unwrapped' and only their last dim is tracked. Register a small pruner so the opinion is meaningful."""
    import torch_pruning as tp

    class Conv1DPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            keep = sorted(set(range(layer.weight.shape[1])) - set(idxs))
            layer.weight = nn.Parameter(layer.weight.data[:, keep])
            layer.bias = nn.Parameter(layer.bias.data[keep])
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer, idxs):
            keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
            layer.weight = nn.Parameter(layer.weight.data[keep])
            return layer

        def get_out_channels(self, layer):
            return layer.weight.shape[1]

        def get_in_channels(self, layer):
            return layer.weight.shape[0]

    return Conv1DPruner()


def build_dg(model: nn.Module, inputs: Sequence[torch.Tensor]):
    """torch-pruning DependencyGraph of `model` traced on `inputs` (quietly)."""
    import torch_pruning as tp

    custom = {}
    conv1d = _hf_conv1d_type()
    if conv1d is not None and any(isinstance(m, conv1d) for m in model.modules()):
        custom[conv1d] = _conv1d_pruner()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.enable_grad():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=tuple(inputs), customized_pruners=custom or None, verbose=False)


def _members_of_item(dg, dep, owners, pname_of: dict[int, str], model) -> set[tuple[str, int]]:
    """Physical (canonical parameter name, dim) pairs touched by one group item."""
    import torch_pruning as tp

    mod = dep.target.module
    is_out = dg.is_out_channel_pruning_fn(dep.handler)
    if isinstance(mod, nn.Parameter):
        dim = dep.target.pruning_dim
        if dim is None or dim < 0:
            dim = [i for i, s in enumerate(mod.shape) if s > 1][-1]
        return {(pname_of[id(mod)], dim)} if id(mod) in pname_of else set()
    conv1d = _hf_conv1d_type()
    found: set[tuple[int, int]] = set()  # (id(param), dim)

    def add(p, dim):
        if p is not None:
            found.add((id(p), dim))

    if isinstance(mod, nn.modules.conv._ConvNd):
        depthwise = tp.ops.module2type(mod) == tp.ops.OPTYPE.DEPTHWISE_CONV
        out_dim, in_dim = (1, 0) if mod.transposed else (0, 1)
        if is_out or depthwise:
            add(mod.weight, 0 if depthwise else out_dim)
            add(mod.bias, 0)
        else:
            add(mod.weight, in_dim)
    elif isinstance(mod, nn.Linear):
        if is_out:
            add(mod.weight, 0)
            add(mod.bias, 0)
        else:
            add(mod.weight, 1)
    elif conv1d is not None and isinstance(mod, conv1d):
        if is_out:
            add(mod.weight, 1)
            add(mod.bias, 0)
        else:
            add(mod.weight, 0)
    elif isinstance(mod, nn.Embedding):
        add(mod.weight, 1)
    elif isinstance(mod, nn.MultiheadAttention):
        raise NotImplementedError("nn.MultiheadAttention is not mapped to canonical members")
    else:  # BN / LN / GN / IN / PReLU and other pass-through layers with per-channel parameters
        for p in mod.parameters(recurse=False):
            nonsingleton = [i for i, s in enumerate(p.shape) if s > 1]
            add(p, nonsingleton[-1] if nonsingleton else 0)
    return {(pname_of[pid], dim) for pid, dim in found if pid in pname_of}


class TPTimeout(TimeoutError):
    """torch-pruning did not finish within the time limit (it recurses without bound on some graphs)."""


@contextlib.contextmanager
def _deadline(seconds: float | None):
    """Raise TPTimeout in the main thread after `seconds` (SIGALRM; a no-op elsewhere or when None)."""
    import signal
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        raise TPTimeout(f"torch-pruning did not finish within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def tp_groups(model: nn.Module, inputs: Sequence[torch.Tensor], ignored: Iterable[str | nn.Module] = (),
              root_module_types: Sequence[type] | None = None, dg=None,
              timeout_s: float | None = None) -> list[Canonical]:
    """torch-pruning's groups on `model` in canonical form, in tp's order.

    timeout_s: raise TPTimeout if tracing + grouping takes longer (torch-pruning 1.6 does not finish on the
    LLaMA/GQA graph); only enforced in the main thread.

    ignored: output layers (module names or modules); groups that would prune their out-channels are skipped
    (tp's `get_all_groups(ignored_layers=...)`). Root types: Conv2d and Linear (+ HF Conv1D when present)."""
    mods = dict(model.named_modules())
    ignored_mods = [mods[m] if isinstance(m, str) else m for m in ignored]
    roots = list(root_module_types or [nn.Conv2d, nn.Linear])
    conv1d = _hf_conv1d_type()
    if conv1d is not None and conv1d not in roots and any(isinstance(m, conv1d) for m in model.modules()):
        roots.append(conv1d)
    owners = _owners(model)
    pname_of = {id(p): n for n, p in model.named_parameters()}
    groups = []
    with _deadline(timeout_s), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = dg if dg is not None else build_dg(model, inputs)
        for group in dg.get_all_groups(ignored_layers=ignored_mods, root_module_types=roots):
            phys = set()
            for item in group:
                phys |= _members_of_item(dg, item.dep, owners, pname_of, model)
            canon = frozenset((n, axis_label(model, n, d, owners)) for n, d in phys)
            if canon:
                groups.append(canon)
    return groups


# ------------------------------------------------------------------------------------------- our analyser
def _member_fields(m) -> tuple[str, int]:
    if isinstance(m, tuple | list):
        return str(m[0]), int(m[1])
    for attr in ("name", "param", "initializer", "tensor"):
        if hasattr(m, attr):
            name = getattr(m, attr)
            break
    else:
        raise TypeError(f"cannot read a member name from {m!r}")
    return str(name), int(m.axis)


def _is_frozen(g) -> bool:
    if hasattr(g, "prunable"):
        return not bool(g.prunable)
    return bool(getattr(g, "frozen", False))


def onnx_groups(analysis, model: nn.Module, *, include_frozen: bool = False) -> list[Canonical]:
    """Canonical groups from a `compressor.graph.analyze(...)` result: members (name, axis, indices) of
    parameters of `model` (initializers that are not parameters, e.g. BN running stats, are dropped);
    frozen groups are left out unless include_frozen."""
    owners = _owners(model)
    groups_attr = getattr(analysis, "groups", analysis)
    out = []
    for g in groups_attr:
        if not include_frozen and _is_frozen(g):
            continue
        members = getattr(g, "members", g)
        canon = set()
        for m in members:
            name, axis = _member_fields(m)
            if name in owners:
                canon.add((name, axis_label(model, name, axis, owners)))
        if canon:
            out.append(frozenset(canon))
    return out


# ------------------------------------------------------------------------------------------- comparison
def canonical(groups: Iterable[Iterable[Sequence[str]]]) -> list[Canonical]:
    """Canonical form of groups written as data (lists of [name, label] pairs, e.g. ZooEntry.expected)."""
    return [frozenset((str(n), str(a)) for n, a in g) for g in groups]


def _fmt(member: tuple[str, str]) -> str:
    return f"{member[0]}:{member[1]}"


def compare_groups(ours: Iterable[Canonical], theirs: Iterable[Canonical]) -> dict:
    """Compare two lists of canonical groups.

    Groups are deduplicated first (an analyser may list one member set twice, e.g. as heads and head_dim).
    Returns {"same", "n_ours", "n_theirs", "matched", "merged", "finer", "differences"}:
      matched      groups equal on both sides
      merged       one of our groups equal to the union of ≥2 of theirs (coarser but safe: listed, not a
                   difference by itself; callers decide whether it is a documented exception)
      finer        one of theirs equal to the union of ≥2 of ours (ours claims more independence: only
                   acceptable where documented, e.g. attention Q·K vs V·O)
      differences  human-readable lines for everything else: a group only on one side, with its closest
                   counterpart and the members that differ
    `same` is True iff there are no differences and nothing merged or finer."""
    ours = list(dict.fromkeys(frozenset(g) for g in ours))
    theirs = list(dict.fromkeys(frozenset(g) for g in theirs))
    their_set = set(theirs)
    matched = [g for g in ours if g in their_set]
    only_ours = [g for g in ours if g not in their_set]
    only_theirs = [g for g in theirs if g not in set(ours)]
    merged, differences = [], []
    for g in list(only_ours):
        parts = [t for t in only_theirs if t <= g]
        if len(parts) >= 2 and frozenset().union(*parts) == g:
            merged.append({"ours": sorted(map(_fmt, g)), "theirs": [sorted(map(_fmt, t)) for t in parts]})
            only_ours.remove(g)
            for t in parts:
                only_theirs.remove(t)
    finer = []  # one of theirs equal to the union of ≥2 of ours: ours is finer (stricter claim: check it)
    for t in list(only_theirs):
        parts = [g for g in only_ours if g <= t]
        if len(parts) >= 2 and frozenset().union(*parts) == t:
            finer.append({"theirs": sorted(map(_fmt, t)), "ours": [sorted(map(_fmt, g)) for g in parts]})
            only_theirs.remove(t)
            for g in parts:
                only_ours.remove(g)
    for t in theirs:  # also a group both sides list whole, that ours additionally splits (heads vs head_dim)
        parts = [g for g in only_ours if g < t]
        if len(parts) >= 2 and frozenset().union(*parts) == t:
            finer.append({"theirs": sorted(map(_fmt, t)), "ours": [sorted(map(_fmt, g)) for g in parts],
                          "also_whole": t in set(ours)})
            for g in parts:
                only_ours.remove(g)
    for g in only_ours:
        best = max(only_theirs + matched, key=lambda t: len(t & g), default=frozenset())
        differences.append(
            f"only ours: {{{', '.join(sorted(map(_fmt, g)))}}}"
            + (f"; closest theirs lacks {sorted(map(_fmt, g - best))} and has extra {sorted(map(_fmt, best - g))}"
               if best else ""))
    for t in only_theirs:
        best = max(only_ours + matched, key=lambda o: len(o & t), default=frozenset())
        differences.append(
            f"only theirs: {{{', '.join(sorted(map(_fmt, t)))}}}"
            + (f"; closest ours lacks {sorted(map(_fmt, t - best))} and has extra {sorted(map(_fmt, best - t))}"
               if best else ""))
    return {"same": not differences and not merged and not finer, "n_ours": len(ours), "n_theirs": len(theirs),
            "matched": len(matched), "merged": merged, "finer": finer, "differences": differences}
