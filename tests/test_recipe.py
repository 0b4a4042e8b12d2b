"""Recipe validation names the file, the stage and the field; nothing runs on an invalid recipe."""

import pytest

from compressor.errors import RecipeError
from compressor.recipe import load_recipe, shipped_recipes


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_shipped_recipe_validates():
    recipes = shipped_recipes()
    assert "demo" in recipes
    for _, path in recipes.items():
        r = load_recipe(path)
        assert r.stages


def test_unknown_method_suggests(tmp_path):
    p = write(tmp_path, "name: x\nstages:\n  - method: exprot\n")
    with pytest.raises(RecipeError, match=r"r.yaml: stage 1: unknown method 'exprot'.*did you mean 'export'"):
        load_recipe(p)


def test_field_typo_names_stage_and_field(tmp_path):
    p = write(tmp_path, "name: x\nstages:\n  - method: finetune\n    epochs: 1\n  - method: export\n    fromat: onnx\n")
    with pytest.raises(RecipeError, match=r"stage 2 \(export\): field 'fromat': unknown field"):
        load_recipe(p)


def test_bad_value(tmp_path):
    p = write(tmp_path, "name: x\nstages:\n  - method: finetune\n    epochs: -1\n")
    with pytest.raises(RecipeError, match=r"stage 1 \(finetune\): field 'epochs'"):
        load_recipe(p)


@pytest.mark.parametrize("text,match", [
    ("name: x\nstages: []\n", "no stages"),
    ("stages:\n  - method: export\n", "field 'name'"),
    ("name: x\nstages:\n  - format: onnx\n", "no 'method'"),
    ("- just a list\n", "mapping"),
    ("name: x\nstages: [\n", "not valid YAML"),
])
def test_structure_errors(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write(tmp_path, text))


def test_missing_recipe():
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("no/such/recipe.yaml")
    with pytest.raises(RecipeError, match="no recipe named"):
        load_recipe("no-such-recipe")


def test_defaults_filled_and_hash_stable(tmp_path):
    a = load_recipe(write(tmp_path, "name: x\nstages:\n  - method: export\n", "a.yaml"))
    b = load_recipe(write(tmp_path, "name: x\nstages:\n  - method: export\n    format: onnx\n", "b.yaml"))
    assert a.stages[0].params.atol == 1e-4
    assert a.hash == b.hash


def test_kind_check():
    from compressor.recipe import check_kinds

    r = load_recipe({"name": "x", "stages": [{"method": "finetune"}]})
    with pytest.raises(RecipeError, match="does not work on onnx"):
        check_kinds(r, "onnx")


TRAINING_METHODS = ["finetune", "gradual", "imp_rewind", "sara", "qdistill"]


@pytest.mark.parametrize("method", TRAINING_METHODS)
@pytest.mark.parametrize("field,bad", [("batch_size", 0), ("lr", 0), ("weight_decay", -1e-3), ("epochs", -1)])
def test_training_stages_share_one_declaration_of_train_params(method, field, bad):
    """Every training stage extends TrainParams, so a shared field is checked the same way everywhere."""
    import compressor.methods  # noqa: F401
    from compressor.methods._params import TrainParams
    from compressor.recipe import REGISTRY

    assert issubclass(REGISTRY[method].params, TrainParams)
    with pytest.raises(RecipeError, match=rf"stage 1 \({method}\): field '{field}'"):
        load_recipe({"name": "x", "stages": [{"method": method, field: bad}]})


def test_include_exclude_have_one_documented_meaning():
    import compressor.methods  # noqa: F401
    from compressor.recipe import REGISTRY
    from compressor.utils.selectors import PATTERN_HELP

    documented = {(m, f) for m, spec in REGISTRY.items() for f, info in spec.params.model_fields.items()
                  if f in ("include", "exclude", "full") and PATTERN_HELP in (info.description or "")}
    fields = {(m, f) for m, spec in REGISTRY.items() for f in spec.params.model_fields if f in ("include", "exclude", "full")}
    assert fields and documented == fields


def _fake_methods(tmp_path, modules: dict[str, str], name: str):
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for mod, src in modules.items():
        (pkg / f"{mod}.py").write_text(src)
    return [str(pkg)]


def test_broken_method_module_raises_its_real_error(tmp_path, monkeypatch):
    """A method module with a bug (here: it imports a compressor module that does not exist) is not hidden as
    an 'unknown method': importing the methods raises the real error."""
    from compressor.methods import import_method_modules

    monkeypatch.syspath_prepend(str(tmp_path))
    path = _fake_methods(tmp_path, {"good": "X = 1\n", "broken": "from compressor.no_such_module import thing\n"},
                         "fake_methods_broken")
    with pytest.raises(ModuleNotFoundError, match="compressor.no_such_module"):
        import_method_modules("fake_methods_broken", path)
    path = _fake_methods(tmp_path, {"typo": "from compressor.masks import no_such_name\n"}, "fake_methods_typo")
    with pytest.raises(ImportError, match="no_such_name"):
        import_method_modules("fake_methods_typo", path)


def test_method_module_missing_an_optional_package_is_skipped_with_the_reason(tmp_path, monkeypatch):
    from compressor.methods import import_method_modules

    monkeypatch.syspath_prepend(str(tmp_path))
    path = _fake_methods(tmp_path, {"good": "X = 1\n", "needs_pkg": "import no_such_optional_package_xyz\n"},
                         "fake_methods_optional")
    with pytest.warns(UserWarning, match="needs_pkg"):
        skipped = import_method_modules("fake_methods_optional", path)
    assert set(skipped) == {"needs_pkg"} and "no_such_optional_package_xyz" in skipped["needs_pkg"]
    import sys

    assert "fake_methods_optional.good" in sys.modules


def test_shipped_recipes_are_package_data_found_from_any_directory(tmp_path, monkeypatch):
    from pathlib import Path

    import compressor

    on_disk = sorted(p.stem for p in (Path(compressor.__file__).parent / "recipes").glob("*.yaml"))
    monkeypatch.chdir(tmp_path)  # nothing relative to the working directory
    assert sorted(shipped_recipes()) == on_disk and len(on_disk) >= 10
    assert load_recipe("demo").name == load_recipe("demo.yaml").name
    own = write(tmp_path, "name: mine\nstages:\n  - method: export\n", name="demo.yaml")
    assert load_recipe(own).name == "mine"  # a user's own file (even named like a shipped one) is theirs
    assert load_recipe("./demo.yaml").name == "mine"
