"""Where a sweep's result goes: ``sweep.json`` and ``sweep.png``, written atomically, never over an existing
result unless asked."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from compressor.errors import InputError
from compressor.utils.atomic import atomic_path, write_text_atomic


def check_outputs_free(out_dir: str | Path, overwrite: bool = False, names: Iterable[str] = ("sweep.json", "sweep.png")) -> None:
    """Refuse (before any work) to replace an existing result unless `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder", "give a folder for -o")
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        raise InputError(f"{out_dir} already holds {', '.join(existing)}", "choose another -o folder or pass --overwrite")


def plot_sweep(result: dict, path: str | Path, title: str | None = None) -> Path:
    """PNG: metric vs sparsity, one line per curve, knee (★) and tolerance point (○) marked. Written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    ax = fig.add_subplot()
    for i, (name, pts) in enumerate(result["curves"].items()):
        xs = [100 * p["target"] for p in pts]
        ys = [p["metric"] for p in pts]
        style = "--" if name.startswith("random") else (":" if ":" in name else "-")
        (line,) = ax.plot(xs, ys, style, marker="o", ms=3.5, lw=1.6, label=name, zorder=3 + (i == 0))
        a = result["analysis"].get(name, {})
        if a.get("knee") is not None:
            ax.plot([100 * a["knee"]], [a["metric_at_knee"]], ls="none", marker="*", ms=15, color=line.get_color(), mec="black", zorder=6,
                    label=f"knee {name}: {a['knee']:.0%}")
        if a.get("tolerance") is not None and name == next(iter(result["curves"])):
            ax.plot([100 * a["tolerance"]], [a["metric_at_tolerance"]], ls="none", marker="o", ms=11, mfc="none", mec="black", mew=1.5,
                    zorder=6, label=f"≤{result['eps']:g}{'%' if result.get('relative') else ' pt'} drop ({name}): {a['tolerance']:.0%}")
    dense = result["dense"]["metric"]
    thr = dense * (1 - result["eps"] / 100) if result.get("relative") else dense - result["eps"]
    ax.axhline(thr, color="grey", lw=0.8, ls="--", zorder=1)
    ax.set_xlabel("sparsity of the pruned tensors (%)")
    ax.set_ylabel(result["metric"].replace("_%", " (%)").replace("_", " "))
    model_name = Path(str(result.get("model", ""))).name
    ax.set_title(title or f"essential sparsity (one-shot, no retraining): {model_name}", fontsize=10)
    ys_all = [p["metric"] for pts in result["curves"].values() for p in pts]
    lo = min(ys_all)
    ax.set_ylim(max(lo - 0.05 * (dense - lo + 1e-9), lo - 5), dense + 0.08 * max(dense - lo, 1.0))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_sweep(result: dict, out_dir: str | Path, overwrite: bool = False, stem: str = "sweep") -> dict[str, str]:
    """Write `<stem>.json` and `<stem>.png` into out_dir atomically; refuses to replace them unless `overwrite`."""
    out_dir = Path(out_dir)
    check_outputs_free(out_dir, overwrite, (f"{stem}.json", f"{stem}.png"))
    out_dir.mkdir(parents=True, exist_ok=True)
    jp, pp = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    write_text_atomic(jp, json.dumps(result, indent=2) + "\n")
    plot_sweep(result, pp)
    return {"json": str(jp), "png": str(pp)}

