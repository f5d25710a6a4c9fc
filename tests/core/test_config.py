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


def test_job_settings_follow_the_schema_marks():
    """Each rule's settings param is derived from the schema's marks (no hand-written key list):
    result-neutral keys, lists of what runs and nested slices are no job's settings, and an
    x-only-for key belongs to its commands only."""
    from pipeline.config import settings_keys

    assert settings_keys("consistency", command="neighbours") == ["encoder"]
    assert settings_keys("consistency", command="table1") == ["encoder", "n_pairs", "knn_k", "frame_gap"]
    generate = settings_keys("views", command="generate")
    assert "merge_mode" not in generate and "figure_images" not in generate and "batch_size" not in generate
    assert set(settings_keys("views", command="merge")) - set(generate) == {"merge_mode"}
    run = settings_keys("propagation", command="run")
    assert not {"davis", "vip", "jhmdb", "evaluate", "external", "random_init_seed", "gpus"} & set(run)
    assert "temperature" in run
    train = settings_keys("pretrain", command="train")
    assert not {"seeds", "cell_defaults", "num_workers", "checkpoint_every", "gpus"} & set(train)
    assert "base_lr" in train


def test_runtime_flags_are_the_result_neutral_keys():
    """The flags a rule passes from its resources are the section's result-neutral keys (gpus is the
    lease's), and a command's parser accepts them, each overriding its key."""
    import argparse

    from pipeline.config import add_runtime_flags, apply_runtime_flags, runtime_flags, runtime_resource

    assert runtime_flags("sldm") == [
        ("--sample-every", "sample_every"),
        ("--checkpoint-every", "checkpoint_every"),
        ("--num-workers", "num_workers"),
    ]
    assert runtime_resource("views", "batch_size") == "views_batch_size" and runtime_resource("views", "gpus") == "gpu"
    parser = argparse.ArgumentParser()
    add_runtime_flags(parser, "pretrain")
    args = parser.parse_args(["--num-workers", "3"])
    assert apply_runtime_flags(args, "pretrain", {"num_workers": 8, "checkpoint_every": 2}) == {
        "num_workers": 3,
        "checkpoint_every": 2,
    }


def test_generator_names_come_from_one_place():
    """The schema's generator names, the sections of views.generators and the registry agree."""
    from pipeline.provenance import registrations

    schema = load_schema()
    names = schema["$defs"]["generator_name"]["enum"]
    sections = schema["properties"]["views"]["properties"]["generators"]["properties"]
    assert sorted(names) == sorted(sections) == sorted(registrations("views"))


def test_cells_default_to_the_views_generator(repo_root):
    """One key chooses the generator: pretrain.cell_defaults.generator follows views.generator unless
    it is given."""
    cfg = load_config(repo_root / "config.yaml", overrides={"views": {"generator": "crop"}})
    assert cfg["pretrain"]["cell_defaults"]["generator"] == "crop"
    cfg = load_config(
        repo_root / "config.yaml",
        overrides={"views": {"generator": "crop"}, "pretrain": {"cell_defaults": {"generator": "warp"}}},
    )
    assert cfg["pretrain"]["cell_defaults"]["generator"] == "warp"
    with pytest.raises(ConfigError, match="views.generator"):
        load_config(repo_root / "config.yaml", overrides={"views": {"generator": "sdxl"}})
