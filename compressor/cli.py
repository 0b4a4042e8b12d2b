"""`compress` command line: parse, call the API, print with rich. No logic beyond that.

`compress MODEL --recipe R ...` is shorthand for `compress run MODEL --recipe R ...`.
User errors (CompressorError) print one red line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from compressor.device import DEVICE_HELP
from compressor.errors import CompressorError

# the sources of compressor.io.data.DATA_SPECS (kept literal here: io.data imports torch, the CLI's --help need not)
DATA_HELP = ("digits | npz:PATH | text:PATH | imagefolder:DIR | csv:PATH | jsonl:PATH | hf:PATH | random; options after ?, "
             "e.g. imagefolder:DIR?size=32,32&mode=RGB, csv:PATH?label=y&features=a,b, hf:PATH?image=img&label=y "
             "(docs/data.md). Held out for quality: digits, npz, imagefolder, csv, jsonl, hf: 25 % by a permutation "
             "seeded with --seed (default 0); hf: the test (else validation) split instead when the dataset has one; "
             "text: the odd lines")

console = Console()
err_console = Console(stderr=True)
EXPORTER_HELP = ("torch input: the ONNX export the analysis runs on — auto (torch's default exporter, the TorchScript "
                 "one if it fails, noted) | dynamo | torchscript")


def _user_errors(fn):
    """Turn CompressorError into a red one-liner and exit code 2 (works under CliRunner and as a process)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CompressorError as e:
            err_console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


class App(typer.Typer):
    """A Typer whose every command gets the user-error handling above."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def deco(fn):
            register(_user_errors(fn))
            return fn

        return deco


app = App(name="compress", help="Compress PyTorch and ONNX models: prune, sparsify, quantize, distil, export.",
          no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipes_app = App(help="List and show shipped recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
QUIET = ("--quiet", "-q")


@app.callback()
def global_options(quiet: bool = typer.Option(False, *QUIET, help="no progress bars (also off when stderr is not a terminal); "
                                              "accepted anywhere on the command line")):
    """Options of every command (before or after the command name)."""
    from compressor.utils.progress import set_quiet

    set_quiet(quiet)


# --------------------------------------------------------------------------------------------- printing


def _fmt(key: str, v) -> str:
    if v is None:
        return "–"
    if key.endswith("bytes"):
        for unit in ("B", "KB", "MB", "GB"):
            if abs(v) < 1024 or unit == "GB":
                return f"{v:.1f} {unit}" if unit != "B" else f"{v} B"
            v /= 1024
    if key in ("params", "nonzero_params", "macs"):
        return f"{v / 1e6:.3f} M" if v >= 1e5 else f"{v:,}"
    if key == "latency_ms":
        return f"{v:.3f} ms"
    if key == "accuracy":
        return f"{100 * v:.2f} %"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


ROWS = [
    ("params", "parameters"), ("nonzero_params", "non-zero parameters"), ("macs", "MACs / sample"),
    ("size_bytes", "weights size"), ("file_bytes", "file size"), ("latency_ms", "latency"),
    ("accuracy", "accuracy"), ("embedding_fidelity", "embedding cosine to original"), ("perplexity", "perplexity"),
    ("output_cosine", "output cosine to original"), ("output_kl", "output KL to original"),
]


def before_after_table(before: dict, after: dict, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("change", justify="right")
    for key, label in ROWS:
        if key not in before and key not in after:
            continue
        b, a = before.get(key), after.get(key)
        change = ""
        if isinstance(b, int | float) and isinstance(a, int | float) and b:
            if key in ("params", "nonzero_params", "macs", "size_bytes", "file_bytes", "latency_ms"):
                change = ((f"{b / a:.2f}× smaller" if a else "to zero") if a < b
                          else f"{a / b:.2f}× larger" if a > b else "same")
                if key == "latency_ms" and a:
                    change = f"{b / a:.2f}× faster" if a < b else f"{a / b:.2f}× slower"
            elif key == "accuracy":
                change = f"{100 * (a - b):+.2f} pt"
        t.add_row(label, _fmt(key, b), _fmt(key, a), change)
    return t


def metrics_table(m: dict, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, label in ROWS:
        if key in m:
            t.add_row(label, _fmt(key, m[key]))
    return t


def _stage_line(rec):
    return lambda i, st: err_console.print(f"[bold cyan]stage {i}/{len(rec.stages)}[/] {st.method}")


def print_result(result, title: str, output: Path) -> None:
    """The before/after table and every file a compress run wrote."""
    console.print(before_after_table(result.before, result.after, title))
    for stage in result.report.get("stages", []):  # asked vs kept heads (compressor.graph.heads), one line
        note = (stage.get("result") or {}).get("heads", {}).get("note") if isinstance(stage, dict) else None
        if note:
            console.print(f"  {note}", markup=False)
    for k, v in result.files.items():
        console.print(f"  [green]wrote[/] {k}: {v}")
    console.print(f"  [green]wrote[/] report: {output / 'report.json'}")


def _parse_shape(s: str | None) -> tuple[int, ...] | None:
    if not s:
        return None
    try:
        return tuple(int(x) for x in s.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise CompressorError(f"--input-shape {s!r} is not a list of integers", "e.g. --input-shape 3,224,224") from None


# --------------------------------------------------------------------------------------------- commands


@app.command("run")
def run_cmd(
    model: str = typer.Argument(..., help="model: .onnx, .pt2, TorchScript, state dict/.safetensors (+ --arch), HF folder"),
    recipe: str = typer.Option(..., "--recipe", "-r", help="recipe YAML path or shipped name (compress recipes list)"),
    data: str = typer.Option(None, "--data", "-d", help=DATA_HELP),
    output: Path = typer.Option(None, "--output", "-o", help="output folder (default: compressed/<model>-<recipe>)"),
    arch: str = typer.Option(None, "--arch", help="package.module:factory that builds the model for a state dict"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow loading a pickled module (runs code from the file)"),
    teacher: str = typer.Option(None, "--teacher", help="teacher model for distillation (default: the input model)"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed run from its last checkpoint in --output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a previous result in --output"),
    input_shape: str = typer.Option(None, "--input-shape", help="input shape without batch, e.g. 1,8,8 (when no --data)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    sparse_kernels: bool = typer.Option(False, "--sparse-kernels", help="swap masked Linear layers for sparse kernels where measured faster"),
    as_json: bool = typer.Option(False, "--json", help="print report.json instead of the table"),
):
    """Compress MODEL with a recipe; writes the compressed model and report.json to --output."""
    import compressor.methods  # noqa: F401  (registers every method)
    from compressor.api import compress
    from compressor.recipe import load_recipe

    rec = load_recipe(recipe)
    if output is None:
        output = Path("compressed") / f"{Path(model).stem}-{rec.name}"
    result = compress(model, rec, data, output, arch=arch, trust_pickle=trust_pickle, teacher=teacher, seed=seed,
                      resume=resume, overwrite=overwrite, input_shape=_parse_shape(input_shape), device=device,
                      sparse_kernels=sparse_kernels, on_stage=_stage_line(rec))
    if as_json:
        print(json.dumps(result.report, indent=2))
        return
    print_result(result, f"{Path(model).name} · recipe {rec.name}", output)


@app.command("prune")
def prune_cmd(
    model: str = typer.Argument(..., help="model: .onnx, .pt2, TorchScript, state dict/.safetensors (+ --arch), HF folder"),
    ratio: float = typer.Option(..., "--ratio", help="fraction of each group's channels to remove (of MACs with --target macs)"),
    importance: str = typer.Option("l2", "--importance", help="l2 | l1 | bn | taylor | random"),
    scope: str = typer.Option("local", "--scope", help="local (rank inside each group) | global (one threshold)"),
    round_to: str = typer.Option("auto", "--round-to", help="kept widths are multiples of N (auto: 8 on CUDA fp16/bf16, else 1)"),
    heads: bool = typer.Option(False, "--heads", help="also remove whole attention heads"),
    target: str = typer.Option("channels", "--target", help="channels | macs: what --ratio measures"),
    exporter: str = typer.Option("auto", "--exporter", help=EXPORTER_HELP),
    data: str = typer.Option(None, "--data", "-d", help=DATA_HELP + " — used for importance and quality"),
    output: Path = typer.Option(None, "--output", "-o", help="output folder (default: compressed/<model>-prune-<ratio>)"),
    arch: str = typer.Option(None, "--arch", help="package.module:factory that builds the model for a state dict"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow loading a pickled module (runs code from the file)"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a previous result in --output"),
    input_shape: str = typer.Option(None, "--input-shape", help="input shape without batch, e.g. 1,8,8 (when no --data)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print report.json instead of the table"),
):
    """Structured group pruning of any model in one command: verified, measured, saved with report.json."""
    from compressor.api import prune

    rounded: int | str = round_to
    if round_to != "auto":
        try:
            rounded = int(round_to)
        except ValueError:
            raise CompressorError(f"--round-to {round_to!r} is not an integer or 'auto'", "e.g. --round-to 8") from None
    if output is None:
        output = Path("compressed") / f"{Path(model).stem}-prune-{ratio:g}"
    result = prune(model, ratio, data, output, importance=importance, scope=scope, round_to=rounded, heads=heads,
                   target=target, exporter=exporter, arch=arch, trust_pickle=trust_pickle, seed=seed, overwrite=overwrite,
                   input_shape=_parse_shape(input_shape), device=device)
    if as_json:
        print(json.dumps(result.report, indent=2))
        return
    print_result(result, f"{Path(model).name} · prune {ratio:g}", output)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="model path (any supported format)"),
    data: str = typer.Option(None, "--data", "-d", help=DATA_HELP),
    arch: str = typer.Option(None, "--arch"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
    input_shape: str = typer.Option(None, "--input-shape"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json"),
):
    """Measure a model: parameters, MACs, size, latency and quality on the data (on --device)."""
    from compressor.api import evaluate_model

    m = evaluate_model(model, data, arch=arch, trust_pickle=trust_pickle, input_shape=_parse_shape(input_shape), device=device)
    if as_json:
        print(json.dumps(m, indent=2))
    else:
        console.print(metrics_table(m, Path(model).name))


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="torch model (.pt2, TorchScript, state dict + --arch, HF folder)"),
    output: Path = typer.Option(..., "--output", "-o", help="ONNX file to write"),
    arch: str = typer.Option(None, "--arch"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
    data: str = typer.Option(None, "--data", "-d", help="data to take example inputs from"),
    input_shape: str = typer.Option(None, "--input-shape"),
    atol: float = typer.Option(1e-4, "--atol"),
    rtol: float = typer.Option(1e-3, "--rtol"),
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Export a torch model to ONNX, verified against the source in onnxruntime (refuses on disagreement).

    The trace and the check run on the CPU in fp32 (an ONNX file holds no device), so there is no --device."""
    from compressor.api import export

    rep = export(model, output, data=data, input_shape=_parse_shape(input_shape), arch=arch, trust_pickle=trust_pickle,
                 atol=atol, rtol=rtol, overwrite=overwrite)
    console.print(f"[green]wrote[/] {output} ({rep['bytes'] / 1e6:.2f} MB), max |torch − onnxruntime| = {rep['max_abs_diff']:.2e}")


@recipes_app.command("list")
def recipes_list():
    """Shipped recipes with their stages."""
    import compressor.methods  # noqa: F401  (registers every method)
    from compressor.recipe import REGISTRY, load_recipe, shipped_recipes

    t = Table(title="shipped recipes (compressor/recipes/)", title_justify="left")
    t.add_column("name")
    t.add_column("stages")
    t.add_column("fits")
    t.add_column("description")
    order = ("torch", "hf", "onnx")  # the model kinds compressor.wrappers loads
    for name, path in shipped_recipes().items():
        try:
            r = load_recipe(path)
            fits = [k for k in order if all(k in REGISTRY[s.method].kinds for s in r.stages)]
            t.add_row(name, " → ".join(s.method for s in r.stages), ", ".join(fits) or "[red]none[/]", r.description)
        except CompressorError as e:
            t.add_row(name, "[red]invalid[/]", "", str(e))
    console.print(t)
    console.print("ONNX models: [bold]compress prune MODEL --ratio R[/] prunes channels of any model kind without training")


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="shipped recipe name or YAML path")):
    """A recipe with every parameter (defaults filled in) and the methods' documentation."""
    import compressor.methods  # noqa: F401  (registers every method)
    from compressor.recipe import REGISTRY, load_recipe, resolve_recipe_path

    r = load_recipe(name)
    console.print(f"[bold]{r.name}[/] — {r.description}  [dim]({resolve_recipe_path(name)})[/]")
    for i, st in enumerate(r.stages, start=1):
        spec = REGISTRY[st.method]
        console.print(f"\n[bold cyan]stage {i}: {st.method}[/] — {spec.help}")
        fields = spec.params.model_fields
        for k, v in st.params.model_dump(mode="json").items():
            desc = fields[k].description if k in fields and fields[k].description else ""
            console.print(f"  {k}: [yellow]{v}[/]  [dim]{desc}[/]")


@app.command("methods")
def methods_cmd():
    """Every recipe method with its parameters and defaults."""
    import compressor.methods  # noqa: F401  (registers every method)
    from compressor.recipe import REGISTRY

    t = Table(title="recipe methods", title_justify="left")
    t.add_column("method")
    t.add_column("models")
    t.add_column("parameters (defaults)")
    t.add_column("what it does")
    for name, spec in sorted(REGISTRY.items()):
        params = ", ".join(f"{k}={f.default!r}" if not f.is_required() else f"{k} (required)" for k, f in spec.params.model_fields.items())
        t.add_row(name, ",".join(spec.kinds), params, spec.help)
    console.print(t)


@app.command("demo")
def demo_cmd(
    output: Path = typer.Option(Path("compressed/demo"), "--output", "-o"),
    recipe: str = typer.Option("demo", "--recipe", "-r", help="shipped recipe to run on the embedded model"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Compress the embedded default model (a CNN trained on scikit-learn digits) with a shipped recipe."""
    import compressor.methods  # noqa: F401  (registers every method)
    from compressor.api import compress
    from compressor.models import pretrained_digits_cnn
    from compressor.recipe import load_recipe

    rec = load_recipe(recipe)
    err_console.print("[bold]training the embedded DigitsCNN on scikit-learn digits (a few seconds)…[/]")
    model = pretrained_digits_cnn()
    result = compress(model, rec, "digits", output, overwrite=True, device=device, on_stage=_stage_line(rec))
    print_result(result, f"demo: DigitsCNN on digits · recipe {rec.name}", output)


# --- commands added by feature work ---


@app.command("analyze")
def analyze_cmd(
    model: str = typer.Argument(..., help="ONNX file, torch checkpoint, HF folder or its config.json (analysed without loading weights)"),
    as_json: bool = typer.Option(False, "--json", help="print the full analysis as JSON (groups with members)"),
    arch: str = typer.Option(None, "--arch", help="package.module:Factory for state dicts / safetensors"),
    data: str = typer.Option(None, "--data", help="data spec for example inputs (torch checkpoints)"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow loading a pickled module"),
    all_groups: bool = typer.Option(False, "--all", help="also list groups that are entirely frozen"),
    exporter: str = typer.Option("auto", "--exporter", help=EXPORTER_HELP),
):
    """Coupled channel groups of a model: size, members, prunable or why not."""
    from compressor.api import analyze as analyze_model

    with err_console.status(f"analysing {Path(model).name} …"):
        a = analyze_model(model, arch=arch, trust_pickle=trust_pickle, data=data, exporter=exporter,
                          note=lambda m: err_console.print(f"[yellow]{m}[/]"))
    if as_json:
        print(a.dumps())
        return
    table = Table(title=f"coupled channel groups · {Path(model).name}")
    for col in ("#", "group", "kind", "size", "prunable", "members / why not"):
        table.add_column(col, overflow="fold")
    for g in a.groups:
        if not g.prunable and not all_groups:
            continue
        shown = [m for m in g.members if "running_" not in m.name]  # BN statistics follow their BN
        members = ", ".join(f"{m.name}[{m.axis}]" for m in shown[:5]) + (f" … +{len(shown) - 5}" if len(shown) > 5 else "")
        why = "; ".join(g.reasons[:2])
        state = "[green]yes[/]" if g.prunable else "[red]no[/]"
        if g.prunable and g.frozen:
            state = f"[yellow]{g.size - len(g.frozen)}/{g.size}[/]"
        note = members if g.prunable else f"[red]{why}[/]"
        if g.approximate:
            note += " [dim](statistics span this axis: pruning is approximate)[/]"
        table.add_row(str(g.id), g.name, g.kind, str(g.size), state, note)
    console.print(table)
    if a.export.get("exporter_note"):
        console.print(f"[yellow]note:[/] {a.export['exporter_note']}")
    s = a.to_json()["summary"]
    console.print(f"{s['prunable']} of {s['groups']} groups prunable · {s['prunable_channels']} of {s['channels']} "
                  "channels removable" + ("" if all_groups else " (frozen groups hidden; --all lists them)"))


@app.command("bench-kernels")
def bench_kernels_cmd(
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " (CPU: CSR/BSR; CUDA: 2:4 vs dense bf16)"),
    threads: str = typer.Option("1", "--threads", help="CPU thread counts, e.g. 1 or 1,2"),
    shapes: str = typer.Option("768x768,4096x4096", "--shapes", help="Linear weight shapes out x in"),
    sparsities: str = typer.Option("0.5,0.9,0.95", "--sparsities", help="unstructured sparsities"),
    rows: str = typer.Option("128,1", "--rows", help="tokens per matmul"),
    repeats: int = typer.Option(5, "--repeats", help="interleaved repetitions per format (median)"),
    output: Path = typer.Option(Path("benchmarks/results/kernels.json"), "--output", "-o", help="JSON (merged per device)"),
):
    """Dense vs sparse Linear kernels (CSR/BSR on CPU, 2:4 on CUDA), timed side by side; small defaults."""
    from compressor.api import bench_kernels

    bench_kernels(device=device, threads=threads, shapes=shapes, sparsities=sparsities, rows=rows, repeats=repeats, output=output)


@app.command("sweep")
def sweep_cmd(
    model: str = typer.Argument(..., help="torch model (.pt2, TorchScript, state dict + --arch) or HF folder"),
    data: str = typer.Option(None, "--data", "-d", help=DATA_HELP + " — HF text models default to the shipped corpus"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for sweep.json and sweep.png"),
    grid: str = typer.Option("0:0.9:0.1", "--grid", help="sparsities: start:stop:step or a,b,c (0.0 always added)"),
    pattern: list[str] = typer.Option(["unstructured"], "--pattern", "-p",
                                      help="repeatable: unstructured | layerwise | random | random-erk | 2:4 | N:4 | N:8 | nm"),
    refine: float = typer.Option(None, "--refine", help="add levels at this spacing next to the knee, e.g. 0.05"),
    eps: float = typer.Option(1.0, "--eps", help="tolerated drop (metric points) for the tolerance point"),
    relative: bool = typer.Option(False, "--relative", help="eps in percent of the dense metric"),
    include: list[str] = typer.Option(None, "--include", help="glob of weights to prune (replaces the default rule)"),
    exclude: list[str] = typer.Option(None, "--exclude", help="glob of weights to keep dense"),
    texts: int = typer.Option(256, "--texts", help="held-out sentences for text models"),
    arch: str = typer.Option(None, "--arch", help="package.module:factory that builds the model for a state dict"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
    seed: int = typer.Option(0, "--seed", help="seed of the random baselines"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace sweep.json / sweep.png in --output"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Essential sparsity: prune one-shot at every sparsity (from the dense weights each time), measure, find the knee."""
    from compressor.api import check_sweep_memory, load_for_device
    from compressor.io.data import load_data
    from compressor.sweep import check_outputs_free, parse_grid, parse_patterns, sweep, write_sweep

    grid_l, pats = parse_grid(grid), parse_patterns(pattern)  # validate before loading anything
    check_outputs_free(output, overwrite)
    bundle = load_data(data) if data else None
    check_sweep_memory(model, device)  # an HF folder that cannot fit: refused before its weights are read
    loaded = load_for_device(model, device, arch=arch, trust_pickle=trust_pickle)  # the sweep runs where it is placed
    res = sweep(loaded, bundle, grid=grid_l, patterns=pats, eps=eps, relative=relative, refine=refine,
                include=include or None, exclude=exclude or None, n_texts=texts, seed=seed, arch=arch, trust_pickle=trust_pickle)
    files = write_sweep(res, output, overwrite=overwrite)
    curves = res["curves"]
    t = Table(title=f"{res['metric']} vs sparsity · {Path(model).name}", title_justify="left")
    t.add_column("sparsity", justify="right")
    for c in curves:
        t.add_column(c, justify="right")
    levels = sorted({pt["target"] for pts in curves.values() for pt in pts})
    for p in levels:
        row = [f"{p:.0%}" if round(100 * p, 6) == round(100 * p) else f"{100 * p:.1f}%"]
        for c, pts in curves.items():
            hit = next((pt for pt in pts if pt["target"] == p), None)
            knee = res["analysis"][c]["knee"] == p
            row.append("" if hit is None else f"{'[bold]★ ' if knee else ''}{hit['metric']:.2f}")
        t.add_row(*row)
    console.print(t)
    for c, a in res["analysis"].items():
        fmt = lambda v: "none" if v is None else f"{v:.0%}" if round(100 * v, 6) == round(100 * v) else f"{100 * v:.1f}%"  # noqa: E731
        console.print(f"  [bold]{c}[/]: knee {fmt(a['knee'])} (drop-rate check {fmt(a['knee_drop_rate'])}), "
                      f"≤{res['eps']:g}{'%' if relative else ' pt'} drop up to {fmt(a['tolerance'])}")
    console.print(f"  [green]wrote[/] {files['json']}\n  [green]wrote[/] {files['png']}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: `compress MODEL ...` → `compress run MODEL ...`."""
    try:  # typer >= 0.2x ships its own copy of click (and no longer depends on click); older typer uses click
        from typer._click.exceptions import ClickException
    except ImportError:
        from click.exceptions import ClickException

    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = [a for a in argv if a in QUIET][:1]  # a global option: moved before the command name, wherever it was
    argv = [a for a in argv if a not in QUIET]
    names = {c.name or c.callback.__name__ for c in app.registered_commands} | {g.name for g in app.registered_groups}
    if argv and not argv[0].startswith("-") and argv[0] not in names:
        argv.insert(0, "run")
    argv = quiet + argv
    try:
        rv = app(args=argv, prog_name="compress", standalone_mode=False)
    except typer.Exit as e:  # click's Exit / Abort themselves in older typer
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("[red]aborted[/]")
        sys.exit(130)
    except ClickException as e:
        e.show()
        sys.exit(2)
    if isinstance(rv, int) and rv:  # click returns a typer.Exit code instead of raising when not standalone
        sys.exit(rv)


if __name__ == "__main__":
    main()
