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
