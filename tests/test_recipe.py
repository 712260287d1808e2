import json
from pathlib import Path

import pytest
import yaml

from repskip import recipe as recipe_mod
from repskip.errors import RepskipError
from repskip.pipeline import analyze, compress, open_model, removed_layers, resolve_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("preset", sorted((REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(preset):
    recipe = recipe_mod.load(preset)
    assert recipe.selection is not None and not recipe.is_resolved


@pytest.mark.parametrize(
    "text, message",
    [
        ("selection: {k: 2}\n", "no schema_version"),
        ("schema_version: 9\nselection: {k: 2}\n", "schema_version 9"),
        ("schema_version: 1\n", "neither 'selection' nor 'resolved'"),
        ("schema_version: 1\nselection: {k: 0}\n", "selection.k"),
        ("schema_version: 1\nselection: {k: 2, strategy: magic}\n", "selection.strategy"),
        ("schema_version: 1\nselection: {k: 2, colour: red}\n", "selection.colour"),
        ("schema_version: 1\nselection: [k\n", "not valid YAML"),
        ("- 1\n- 2\n", "not a YAML mapping"),
    ],
)
def test_invalid_recipes_get_one_line_errors(tmp_path, text, message):
    with pytest.raises(RepskipError, match=message) as info:
        recipe_mod.load(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_resolved_recipe_round_trips_and_records_provenance(tiny, tmp_path):
    result = analyze(tiny["qwen2"], num_samples=4, max_length=24)
    unresolved = recipe_mod.Recipe(selection=recipe_mod.SelectionSpec(strategy="block-influence", k=2))
    resolved = recipe_mod.resolve(unresolved, result)
    path = tmp_path / "resolved.yaml"
    resolved.save(path)
    again = recipe_mod.load(path)
    assert again == resolved
    res = again.resolved
    assert len(res.remove) == 2 and 0 not in res.remove and 5 not in res.remove
    assert res.model.fingerprint == open_model(tiny["qwen2"]).ckpt.fingerprint()
    assert res.calibration_hash == result.data["calibration"]["hash"]
    assert set(res.versions) == {"repskip", "torch", "transformers"}
    assert len(res.scores) == 6
    data = yaml.safe_load(path.read_text())
    assert data["schema_version"] == 1
    # the recipe records how the analysis really ran, not the spec's defaults
    assert (again.calibration.num_samples, again.calibration.max_length) == (4, 24)
    assert again.selection.positions == "all" and again.selection.mode == "forward"


def test_an_unresolved_preset_is_resolved_as_a_step_of_its_own_then_compressed(tiny, tmp_path):
    preset = write(tmp_path, "schema_version: 1\nselection: {strategy: block-influence, k: 2}\n"
                             "calibration: {num_samples: 4, max_length: 24}\n")
    out = tmp_path / "out"
    with pytest.raises(RepskipError, match="compress takes a resolved recipe"):
        compress(tiny["llama"], preset, out)
    assert not out.exists()
    resolved, analysis, maps = resolve_recipe(recipe_mod.load(preset), tiny["llama"])
    assert resolved.is_resolved and len(resolved.resolved.remove) == 2 and maps == {}
    assert resolved.resolved.remove == recipe_mod.resolve(recipe_mod.load(preset), analysis).resolved.remove
    _, written = compress(tiny["llama"], resolved, out)
    assert recipe_mod.load(out / "repskip-recipe.yaml").resolved.remove == written.resolved.remove == \
        resolved.resolved.remove


def test_unresolved_recipe_has_no_layers_for_flops(tiny, tmp_path):
    preset = recipe_mod.load(write(tmp_path, "schema_version: 1\nselection: {k: 2}\n"))
    with pytest.raises(RepskipError, match="unresolved"):
        removed_layers(preset, open_model(tiny["llama"]))


def test_fingerprint_ignores_dtype_and_sharding_but_not_weights_layout(tiny, tmp_path):
    from helpers import make_checkpoint
    import torch

    base = open_model(tiny["qwen2"]).ckpt.fingerprint()
    same_bf16 = make_checkpoint(tmp_path / "a", "qwen2", seed=0, dtype=torch.bfloat16, max_shard_size="80KB")
    assert open_model(same_bf16).ckpt.fingerprint() == base
    deeper = make_checkpoint(tmp_path / "b", "qwen2", num_hidden_layers=7, max_window_layers=7)
    assert open_model(deeper).ckpt.fingerprint() != base
    # same architecture, other weights (a fine-tune, say): another model
    retrained = make_checkpoint(tmp_path / "c", "qwen2", seed=5)
    assert open_model(retrained).ckpt.fingerprint() != base


def test_the_json_schema_in_the_docs_is_the_models():
    """docs/recipes.md shows the Recipe model's JSON Schema as pydantic generates it."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    start = text.index("```json\n", text.index("<summary>Recipe JSON Schema")) + len("```json\n")
    assert json.loads(text[start:text.index("```", start)]) == recipe_mod.Recipe.model_json_schema()
