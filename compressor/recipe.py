"""Recipes: a YAML file with a name and a list of stages `{method: NAME, ...params}`.

Each method registers itself (one file per method in compressor/methods/) with a pydantic model for
its parameters, so a recipe is validated completely — every stage, every field — before anything runs.
Errors name the file, the stage and the field.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from compressor.errors import RecipeError
from compressor.utils.memory import Footprint, available_bytes, fmt_bytes

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def recipes_dir() -> Traversable:
    """The shipped recipes: package data (compressor/recipes/*.yaml), found through importlib.resources so an
    installed wheel, an editable install and a source checkout all see the same files."""
    return files("compressor") / "recipes"


@dataclass
class MethodSpec:
    name: str
    params: type[BaseModel]
    fn: Callable
    help: str = ""
    kinds: tuple[str, ...] = ("torch", "hf", "onnx")
    # "train": the stage trains on labelled data; "train+test": it also evaluates on a labelled test split;
    # a callable decides from the stage's parameters (e.g. qdistill trains only when epochs > 0); None: no need.
    needs_labels: str | Callable[[BaseModel], str | None] | None = None
    # True (or a function of the params): the stage distils from the input model, so compress() keeps a teacher
    # copy for it when an earlier stage may have changed the model. Nothing else gets a teacher copy.
    distils: bool | Callable[[BaseModel], bool] = False
    # memory_needed(footprint, params) -> bytes the stage allocates at its peak on top of the model already in
    # memory (the copies it makes, optimizer state, activations it keeps): checked before anything runs.
    memory_needed: Callable[[Footprint, BaseModel], int] | None = None
    # True (or a function of the params): the stage needs fp32 weights (it trains, or exports and verifies through
    # ONNX / a quantizer in fp32); run_recipe upcasts a bf16/fp16 model in place before it. Others run in its dtype.
    fp32: bool | Callable[[BaseModel], bool] = False


REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, params: type[BaseModel], help: str = "", kinds: tuple[str, ...] = ("torch", "hf", "onnx"),
                    needs_labels: str | Callable[[BaseModel], str | None] | None = None,
                    distils: bool | Callable[[BaseModel], bool] = False,
                    memory_needed: Callable[[Footprint, BaseModel], int] | None = None,
                    fp32: bool | Callable[[BaseModel], bool] = False):
    """Decorator: make `fn(ctx: StageContext, params) -> dict` available to recipes as `method: name`.

    `kinds` lists the model kinds the method accepts ("torch", "hf", "onnx"); the runner refuses others
    before anything runs. `needs_labels` ("train" / "train+test" / a function of the params) lets the runner
    refuse missing labelled data before anything runs too (:func:`check_data`). `distils`, `memory_needed`, `fp32`:
    see :class:`MethodSpec` (:func:`needs_teacher`, :func:`check_memory`).
    """

    def deco(fn: Callable) -> Callable:
        if name in REGISTRY and REGISTRY[name].fn is not fn:
            raise RuntimeError(f"recipe method {name!r} registered twice")
        REGISTRY[name] = MethodSpec(name, params, fn, help or (fn.__doc__ or "").strip().splitlines()[0] if (help or fn.__doc__) else "", tuple(kinds),
                                    needs_labels, distils, memory_needed, fp32)
        return fn

    return deco


@dataclass
class StageContext:
    """Everything a stage may read or change. Stages mutate `model` / `onnx_model` (or assign new ones)."""

    model: torch.nn.Module | None
    onnx_model: object | None = None
    model_kind: str = "torch"
    data: object | None = None  # DataBundle
    example_inputs: tuple | None = None
    tokenizer: object | None = None
    teacher: torch.nn.Module | None = None
    workdir: Path = field(default_factory=lambda: Path("."))
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resume: bool = False
    recipe_hash: str = ""
    stage_index: int = 0
    artifacts: dict = field(default_factory=dict)  # files written by stages: {"onnx": path, ...}
    # the input model's wrapper when compress() keeps it (a caller's object, never modified); None when the model was
    # loaded from a file: the working model is then that loaded model itself, and the file is the original
    original: object | None = None

    def current_model(self):
        """The model as it stands now (after the stages so far), in its wrapper (compressor.wrappers)."""
        from compressor.wrappers import from_parts

        return from_parts(self.model_kind, module=self.model, onnx=self.onnx_model, tokenizer=self.tokenizer, owned=True)


@dataclass
class Stage:
    method: str
    params: BaseModel

    def to_dict(self) -> dict:
        return {"method": self.method, **self.params.model_dump(mode="json")}


@dataclass
class Recipe:
    name: str
    description: str
    stages: list[Stage]
    source: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "stages": [s.to_dict() for s in self.stages]}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class _RecipeFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    stages: list[dict]


def _fmt_validation(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(stage)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"field '{loc}': {msg}")
    return "; ".join(parts)


# {method module: why it was skipped} — filled by compressor.methods when a module's optional package is missing.
# The registry is filled by importing compressor.methods (the layer above this one); api and cli do that.
IMPORT_ERRORS: dict[str, str] = {}


def _require_registry() -> None:
    if not REGISTRY:  # a programming error, not a user mistake: keep the traceback
        raise RuntimeError("no recipe methods are registered: import compressor.methods before parsing recipes")


def shipped_recipes() -> dict[str, Traversable]:
    """{name: file} of the shipped recipes (a Path for an ordinary install; read them with .read_text)."""
    d = recipes_dir()
    if not d.is_dir():
        return {}
    found = [p for p in d.iterdir() if p.name.endswith(".yaml") and p.is_file()]
    return {p.name.removesuffix(".yaml"): p for p in sorted(found, key=lambda p: p.name)}


def resolve_recipe_path(spec: str | Path) -> Path | Traversable:
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    shipped = shipped_recipes()
    name = str(spec).removesuffix(".yaml")
    if name in shipped:
        return shipped[name]
    if p.suffix in (".yaml", ".yml") or "/" in str(spec):
        raise RecipeError(f"recipe file not found: {p}", "check the path, or use a shipped recipe name (compress recipes list)")
    raise RecipeError(f"no recipe named {spec!r}", f"shipped recipes: {', '.join(shipped) or 'none'}; or pass a YAML path")


def parse_recipe(data: object, source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a dict (already parsed YAML)."""
    _require_registry()
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping with 'name' and 'stages'", "see `compress recipes list` / `compress recipes show NAME` for examples")
    try:
        rf = _RecipeFile.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_fmt_validation(e)}", "a recipe has 'name', optional 'description' and a list 'stages'") from e
    if not rf.stages:
        raise RecipeError(f"{source}: the recipe has no stages", "add at least one stage: - method: NAME")
    stages = []
    for i, raw in enumerate(rf.stages, start=1):
        if not isinstance(raw, dict) or "method" not in raw:
            raise RecipeError(f"{source}: stage {i} has no 'method'", "write each stage as '- method: NAME' plus its parameters")
        name = raw["method"]
        if not isinstance(name, str):
            raise RecipeError(f"{source}: stage {i}: 'method' must be a name, got {type(name).__name__} {name!r:.40}",
                              "write '- method: NAME' (one method per stage)")
        spec = REGISTRY.get(name)
        if spec is None:
            import difflib

            hint = difflib.get_close_matches(str(name), REGISTRY, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"known methods: {', '.join(sorted(REGISTRY))}"
            broken = [m for m in IMPORT_ERRORS if str(name) in m]
            if broken:
                fix = f"its module failed to import: {IMPORT_ERRORS[broken[0]]}"
            raise RecipeError(f"{source}: stage {i}: unknown method '{name}'", fix)
        try:
            params = spec.params.model_validate({k: v for k, v in raw.items() if k != "method"})
        except ValidationError as e:
            raise RecipeError(f"{source}: stage {i} ({name}): {_fmt_validation(e)}", f"see `compress recipes show` / the docs of '{name}'") from e
        stages.append(Stage(name, params))
    return Recipe(rf.name, rf.description, stages, source)


def load_recipe(spec: str | Path | dict | Recipe) -> Recipe:
    """A Recipe from a path, a shipped recipe name, a dict, or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return parse_recipe(spec)
    path = resolve_recipe_path(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not a UTF-8 text file ({str(e).splitlines()[0][:80]})",
                          "give a YAML recipe file (UTF-8 text)") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise RecipeError(f"{path.name}: not valid YAML{where}", "fix the YAML syntax") from e
    return parse_recipe(data, source=path.name)


def check_kinds(recipe: Recipe, kind: str) -> None:
    for i, st in enumerate(recipe.stages, start=1):
        spec = REGISTRY[st.method]
        if kind not in spec.kinds:
            raise RecipeError(
                f"{recipe.source}: stage {i} ({st.method}) does not work on {kind} models",
                f"it accepts: {', '.join(spec.kinds)}; to prune channels of any model without training: "
                "compress prune MODEL --ratio R",
            )


def check_data(recipe: Recipe, data) -> None:
    """Refuse, before anything runs or is written, a recipe whose stages train on labelled data the user did not
    give (the stages check again when called on their own)."""
    has_train = data is not None and getattr(data, "task", None) == "classification" and data.train is not None
    has_test = has_train and data.test is not None
    for i, st in enumerate(recipe.stages, start=1):
        need = REGISTRY[st.method].needs_labels
        need = need(st.params) if callable(need) else need
        if need is None or (has_train and (need == "train" or has_test)):
            continue
        given = "no data" if data is None else f"{getattr(data, 'source', '') or 'data'} without {'labels' if not has_train else 'a test split'}"
        what = "labelled data" if need == "train" else "labelled data with a test split"
        raise RecipeError(f"{recipe.source}: stage {i} ({st.method}) needs {what}, and got {given}",
                          "pass --data digits or --data npz:FILE with x and y arrays")


def _flag(value, params) -> bool:
    return bool(value(params) if callable(value) else value)


def needs_teacher(recipe: Recipe) -> bool:
    """True when a stage distils from the input model after an earlier stage may have changed it: only then
    does compress() keep a teacher copy (a distilling first stage reads the unchanged working model)."""
    return any(i > 1 and _flag(REGISTRY[st.method].distils, st.params) for i, st in enumerate(recipe.stages, start=1))


def check_memory(recipe: Recipe, fp: Footprint, device=None, held: int = 0) -> list[dict]:
    """Refuse, before anything runs, a stage whose estimated peak (its `memory_needed` on the model's footprint,
    plus `held`: copies compress() keeps beside the working model) exceeds the memory available now.
    Returns each stage's estimate (for the report)."""
    free = available_bytes(device)
    out = []
    for i, st in enumerate(recipe.stages, start=1):
        spec = REGISTRY[st.method]
        need = int(spec.memory_needed(fp, st.params)) if spec.memory_needed is not None else 0
        out.append({"stage": i, "method": st.method, "bytes": need + held})
        if need + held > free:
            raise RecipeError(
                f"recipe {recipe.name}: stage {i} ({st.method}) would need about {fmt_bytes(need + held)} more memory "
                f"for a {fmt_bytes(fp.param_bytes)} model, and {fmt_bytes(free)} is available",
                "free memory, use scope: layerwise / a smaller batch / fewer calibration samples, a bf16 checkpoint, or a "
                "streaming command (compress prune DIR streams a checkpoint's shards)")
    return out


def _upcast(model) -> str | None:
    """Cast a model holding bf16/fp16 weights to fp32 in place (tensor by tensor); returns what it did, or None."""
    if model is None:
        return None
    half = {t.dtype for t in model.parameters() if t.dtype in (torch.bfloat16, torch.float16)}
    if not half:
        return None
    model.float()
    return f"{'/'.join(sorted(str(d).removeprefix('torch.') for d in half))} -> float32"


def run_recipe(recipe: Recipe, ctx: StageContext, on_stage: Callable[[int, Stage], None] | None = None) -> list[dict]:
    """Run every stage in order; returns one report dict per stage."""
    reports = []
    for i, stage in enumerate(recipe.stages, start=1):
        ctx.stage_index = i
        if on_stage is not None:
            on_stage(i, stage)
        spec = REGISTRY[stage.method]
        upcast = _upcast(ctx.model) if _flag(spec.fp32, stage.params) else None
        out = spec.fn(ctx, copy.deepcopy(stage.params)) or {}
        reports.append({"stage": i, "method": stage.method, "params": stage.params.model_dump(mode="json"), "result": out,
                        **({"upcast": upcast} if upcast else {})})
    return reports
