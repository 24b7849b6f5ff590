"""Recipes: typed validation with helpful messages, dotted overrides, smoke shrinking."""

import pytest
import yaml

from coalign.config import load_recipe, parse_overrides, save_resolved
from coalign.registry import ENCODERS, ConfigError, Registry


def test_unknown_top_level_key_suggests_the_closest():
    with pytest.raises(ConfigError) as err:
        load_recipe("demo", ["trian.steps=5"])
    msg = str(err.value)
    assert "trian: unknown key (did you mean 'train'?)" in msg
    assert "valid keys:" in msg and "objectives" in msg


def test_unknown_nested_key_in_a_registered_part_names_the_path():
    with pytest.raises(ConfigError) as err:
        load_recipe("demo", ["model.towers.image.depht=3"])
    msg = str(err.value)
    assert "model.towers.image.depht: unknown key (did you mean 'depth'?)" in msg
    assert "patch_size" in msg  # lists the valid keys


def test_unknown_key_in_a_typed_section():
    with pytest.raises(ConfigError, match=r"train\.stpes: unknown key \(did you mean 'steps'\?\)"):
        load_recipe("demo", ["train.stpes=5"])


def test_invalid_value_names_field_and_choices():
    with pytest.raises(ConfigError) as err:
        load_recipe("demo", ["train.precision=fp8"])
    assert "train.precision" in str(err.value) and "'bf16'" in str(err.value)
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_recipe("demo", ["data.batch_size=0"])


def test_unknown_registry_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        load_recipe("demo", ["objectives.0.name=clipp"])
    assert "unknown objective 'clipp' (did you mean 'clip'?)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_recipe("demo", ["model.towers.image.encoder=resnet"])
    assert f"valid encoders: {', '.join(ENCODERS.names())}" in str(err.value)
    assert {"text_transformer", "vit"} <= set(ENCODERS.names())


def test_bad_source_option_value_is_reported_with_path():
    with pytest.raises(
        ConfigError, match=r"data\.train.*split 'val' is not valid; valid splits: train, test, heldout"
    ):
        load_recipe("demo", ["data.train.split=val"])


def test_overrides_are_typed_and_applied():
    r = load_recipe(
        "demo", ["train.steps=7", "train.lr=0.5", "model.towers.image.width=64", "objectives.0.weight=2"]
    )
    assert r.train.steps == 7 and r.train.lr == 0.5
    assert r.model.towers["image"].options()["width"] == 64
    assert r.objectives[0].weight == 2.0
    assert parse_overrides(["a.b=[1, 2]", "c=true", "d=x"]) == {"a.b": [1, 2], "c": True, "d": "x"}
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="list index"):
        load_recipe("demo", ["objectives.3.weight=1"])


def test_missing_recipe_lists_builtin_recipes():
    with pytest.raises(ConfigError, match="built-in recipes: .*demo"):
        load_recipe("nonexistent_recipe")


def test_smoke_shrinks_model_data_and_steps():
    r = load_recipe("demo", smoke=True)
    assert r.train.steps <= 20 and r.data.batch_size <= 32
    assert r.data.train.options()["size"] <= 256
    assert r.model.towers["image"].options()["width"] <= 32


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe("demo", ["train.steps=11"])
    save_resolved(r, tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again == r
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["train"]["steps"] == 11


def test_registry_unknown_and_duplicate_names():
    reg: Registry = Registry("widget")
    reg.register("alpha")(dict)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("alpha")(dict)
    with pytest.raises(
        ConfigError, match="unknown widget 'alpah' \\(did you mean 'alpha'\\?\\); valid widgets: alpha"
    ):
        reg.get("alpah")


def test_views_must_match_their_modality_and_name_a_tower():
    ok = load_recipe(
        "demo", ["data.transforms.image@v1={transform: image, size: 64, crop_scale: [0.5, 1.0]}"]
    )
    assert "image@v1" in ok.data.transforms
    with pytest.raises(
        ConfigError, match=r"data\.transforms\.image@v1\.size: 32 differs from data\.transforms\.image\.size"
    ):
        load_recipe("demo", ["data.transforms.image@v1={transform: image, size: 32}"])
    with pytest.raises(
        ConfigError, match=r"data\.transforms\.image@v1\.transform: a view of 'image' must use 'image'"
    ):
        load_recipe("demo", ["data.transforms.image@v1={transform: bpe}"])
    with pytest.raises(ConfigError, match="the model has no 'audio' tower"):
        load_recipe("demo", ["data.transforms.audio={transform: image}"])
