"""Config schema: good configs pass with defaults filled; bad ones fail naming the key."""

import pytest
import yaml

from pipeline.config import ConfigError, load_config, load_schema, section_defaults, validate_config


def test_default_config_validates_and_fills_defaults(repo_root):
    cfg = load_config(repo_root / "config.yaml")
    # a key absent from config.yaml arrives from the schema default
    assert cfg["propagation"]["temperature"] == 0.7
    assert cfg["pretrain"]["crop"]["scale"] == [0.5, 1.0]
    assert [c["anchors"] for c in cfg["tables"]["table4"]["cells"]] == [1, 2, 2, 2, 3, 3]


def test_paper_preset_validates(repo_root):
    cfg = load_config(repo_root / "config.yaml", repo_root / "presets" / "paper.yaml")
    assert cfg["pretrain"]["batch_size"] == 2048
    assert cfg["views"]["shards"] == 8
    assert cfg["pretrain"]["seeds"] == [0, 1, 2]
    assert cfg["pretrain"]["cell_defaults"]["arch"] == "vit_small_patch16"


@pytest.mark.fault
@pytest.mark.parametrize(
    "override, key",
    [
        ({"views": {"n_view": 4}}, "views.n_view"),  # unknown (typo) key
        ({"pretrain": {"bogus": True}}, "pretrain.bogus"),
        ({"seed": "zero"}, "seed"),  # wrong type
        ({"views": {"shards": 2.5}}, "views.shards"),
        ({"pretrain": {"cell_defaults": {"target_mask": 1.5}}}, "pretrain.cell_defaults.target_mask"),
        ({"tables": {"table4": {"cells": [{"anchors": 2, "anchor_mask": -0.1}]}}}, "tables.table4.cells.0.anchor_mask"),
        ({"propagation": {"davis": {"gt_mode": "approx"}}}, "propagation.davis.gt_mode"),
        # an empty root is an error, not a silent fall-back to the synthetic stand-in
        ({"data": {"roots": {"imagenet": ""}}}, "data.roots.imagenet"),
    ],
)
def test_bad_config_names_the_key(repo_root, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "config.yaml", overrides=override)
    assert key in str(err.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_section_defaults_merge_partial_settings():
    p = section_defaults("propagation", overrides={"davis": {"topk": 5}})
    assert p["davis"] == {"topk": 5, "size": [480, 880], "gt_mode": "resized", "vallist": None}
    assert p["vip"]["topk"] == 10


def test_every_config_key_is_in_the_schema(repo_root):
    """config.yaml and the schema stay in sync: validation alone would reject a stray key, this
    also checks the schema documents every section."""
    schema = load_schema()
    raw = yaml.safe_load((repo_root / "config.yaml").read_text())
    for key in raw:
        assert key in schema["properties"], key
        assert "description" in schema["properties"][key] or key in ("data", "tables", "seed", "run_label")


def test_validation_does_not_mutate_defaults_between_calls(repo_root):
    a = validate_config({})
    a["pretrain"]["crop"]["scale"][0] = 0.9
    b = validate_config({})
    assert b["pretrain"]["crop"]["scale"] == [0.5, 1.0]
