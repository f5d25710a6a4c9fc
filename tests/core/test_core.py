"""The core modules: cells and their paths, the table registry, the registry helper, the command
dispatcher, result-neutral config keys and code provenance derived from imports."""

from __future__ import annotations

import ast

import pytest

from pipeline import cells, cli, provenance, table_registry
from pipeline.config import load_config, result_neutral_keys
from pipeline.registry import Registry


@pytest.fixture(scope="module")
def config(repo_root):
    return load_config(repo_root / "config.yaml")


# ---------------------------------------------------------------------------------------------
# cells


def test_complete_cell_fills_defaults_and_types():
    defaults = {k: None for k in cells.CELL_KEYS} | {
        "method": "cdgmae",
        "anchors": 1,
        "anchor_mask": 0.0,
        "target_mask": 0.9,
        "epochs": 5,
    }
    cell = cells.complete_cell({"anchors": "3", "anchor_mask": "0.25"}, defaults)
    assert list(cell) == list(cells.CELL_KEYS)
    assert cell["anchors"] == 3 and isinstance(cell["anchors"], int)
    assert cell["anchor_mask"] == 0.25 and isinstance(cell["anchor_mask"], float)
    with pytest.raises(KeyError, match="unknown keys \\['anchor'\\]"):
        cells.complete_cell({"anchor": 2}, defaults, what="--cell")


def test_canonical_cell_strips_view_keys_of_view_free_methods(config):
    crop = cells.canonical_cell({"method": "cropmae", "anchors": 1, "target_mask": 0.985}, config)
    assert {k: crop[k] for k in cells.NO_VIEWS} == cells.NO_VIEWS
    too_many = {"anchors": config["views"]["n_views"] + 1}
    with pytest.raises(cells.CellError, match="views.n_views"):
        cells.canonical_cell(too_many, config)


def test_model_path_round_trips_through_parse_model_path(config):
    cell = cells.canonical_cell({"anchors": 2, "anchor_mask": 0.5}, config)
    info = cells.parse_model_path(cells.model_path(cell, 3))
    assert info["kind"] == "trained" and info["seed"] == 3
    assert {k: info[k] for k in cells.CELL_KEYS} == cell
    ref = cells.parse_model_path(cells.random_init_model("vit_mini_patch8", 7))
    assert ref == {
        "model": "random-init/arch~vit_mini_patch8/seed~7",
        "kind": "random-init",
        "arch": "vit_mini_patch8",
        "seed": 7,
    }
    assert cells.parse_model_path(cells.external_model("mae"))["name"] == "mae"


# ---------------------------------------------------------------------------------------------
# tables


def test_table_registry_lists_every_paper_table_once():
    assert table_registry.PAPER_TABLES == [f"table{i}" for i in range(1, 11)]
    assert set(table_registry.PROPAGATION_TABLES) == {
        *("table2", "table3", "table4", "table5", "table8", "table10", "figure4"),
        "mae_family",  # this project's extension, not a paper table
    }
    assert [name for name, t in table_registry.TABLES.items() if t.extension] == ["mae_family"]
    for name, t in table_registry.TABLES.items():
        assert t.label and t.caption and t.kind in ("propagation", "consistency", "config"), name
        assert set(t.row_keys) <= set(cells.CELL_KEYS)


def test_table_cells_and_seeds(config):
    t4 = table_registry.table_cells(config, "table4")
    assert [(c["anchors"], c["anchor_mask"]) for c in t4] == [
        (1, 0.0),
        (2, 0.0),
        (2, 0.25),
        (2, 0.5),
        (3, 0.25),
        (3, 0.5),
    ]
    t8 = table_registry.table_cells(config, "table8")
    assert t8[: len(t4)] == t4 and len(t8) == len(t4) + len(config["tables"]["table8"]["extra_cells"])
    assert table_registry.table_seeds(config, "table8", t8[-1]) == config["tables"]["table8"]["extra_seeds"]
    assert table_registry.table_seeds(config, "table8", t4[0]) == config["pretrain"]["seeds"]
    fig4 = table_registry.table_cells(config, "figure4")
    assert {c["arch"] for c in fig4} == set(config["tables"]["figure4"]["archs"])


# ---------------------------------------------------------------------------------------------
# registry, dispatcher, config annotations


def test_registry_names_the_key_and_known_names():
    reg = Registry("views.generator")
    reg.add("warp", 1)

    @reg.register("crop")
    def build_crop():
        return 2

    assert set(reg) == {"warp", "crop"} and reg["crop"] is build_crop and len(reg) == 2
    with pytest.raises(KeyError, match="views.generator: unknown name 'sldm'; known: crop, warp"):
        reg["sldm"]
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("warp", 3)
    with reg.temporarily("fake", 4):
        assert reg["fake"] == 4
    assert "fake" not in reg


def test_every_command_resolves_to_a_function(capsys):
    for stage in cli.STAGES:
        for command, (target, help_text) in cli.stage_commands(stage).items():
            module, function = cli.entry_point(target)
            path = provenance.module_file(module)
            assert path is not None, (stage, command)
            defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
            assert function in defined, (stage, command, target)
            assert help_text
    with pytest.raises(SystemExit, match="unknown command 'nope'"):
        cli.run("views", ["nope"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run("views", ["--help"])
    assert exit_info.value.code == 0 and "generate" in capsys.readouterr().out


def test_python_m_pipeline_lists_every_stage_and_command(capsys):
    cli.main_all(["--help"])
    listing = capsys.readouterr().out
    for stage in cli.STAGES:
        assert f"python -m pipeline.{stage} <command>" in listing
        assert all(command in listing for command in cli.stage_commands(stage))
    with pytest.raises(SystemExit, match="unknown stage 'nope'"):
        cli.main_all(["nope"])
    cli.main_all(["views", "generators"])  # runs the command, as python -m pipeline.views generators
    assert "warp" in capsys.readouterr().out


def test_result_neutral_keys_come_from_the_schema():
    assert set(result_neutral_keys("pretrain")) == {"gpus", "num_workers", "checkpoint_every"}
    assert "gpus" in result_neutral_keys("propagation") and "temperature" not in result_neutral_keys("propagation")


# ---------------------------------------------------------------------------------------------
# provenance


def _rel(files):
    return {f.relative_to(provenance.PACKAGE_DIR).as_posix() for f in files}


def test_code_files_follow_imports_to_every_result_carrying_module():
    train = _rel(provenance.code_files(cli.command_module("pretrain", "train")))
    assert {"pretrain/train.py", "pretrain/models_mae.py", "pretrain/strategies.py"} <= train
    assert not any(f.startswith(("report/", "propagation/")) for f in train)  # never a later stage
    # result-carrying core modules are tracked wherever they are imported from; infrastructure never
    assert {"crop_sampler.py", "constants.py", "imaging.py", "seeding.py"} <= train
    assert not train & {"io.py", "config.py", "runtime.py", "devices.py", "lease.py", "resume.py", "cli.py"}
    figure = _rel(provenance.code_files(cli.command_module("views", "figure")))
    assert "views/figure.py" in figure and "views/generate.py" not in figure
    run = _rel(provenance.code_files(cli.command_module("propagation", "run")))
    assert {"pretrain/models_mae.py", "constants.py", "palette.py"} <= run  # the encoder it loads, normalisation
    assert "crop_sampler.py" not in run
    report = _rel(provenance.code_files(cli.command_module("report", "table")))
    assert "report/paper_numbers.yaml" in report and "table_registry.py" in report
    with pytest.raises(ModuleNotFoundError):
        provenance.code_files("pipeline.views.no_such_module")


def test_every_core_module_is_classified_once():
    """A new top-level module must be classified before anything runs (and no stale entry stays)."""
    on_disk = set(provenance.core_modules_on_disk())
    assert set(provenance.CORE_MODULES) == on_disk, on_disk ^ set(provenance.CORE_MODULES)
    for module, (kind, why) in provenance.CORE_MODULES.items():
        assert kind in (provenance.RESULT, provenance.INFRASTRUCTURE) and why, module
    for module in provenance.STAGE_INFRASTRUCTURE:
        assert provenance.module_file(module) is not None, module
    with pytest.raises(provenance.UnclassifiedModuleError, match="pipeline.newthing is not classified"):
        provenance.classify("pipeline.newthing")


def test_each_generator_tracks_only_its_own_module():
    """The crop sampler reaches the crop views and pretraining, never the warp views; an S-LDM
    generator's code includes its conditioning encoder's normalisation."""
    generate = cli.command_module("views", "generate")
    assert set(provenance.registrations("views")) == {"warp", "crop", "sd-variation", "sldm", "rcg"}
    files = {g: _rel(provenance.plugin_code_files(generate, "views", g)) for g in ("warp", "crop", "sldm")}
    assert "crop_sampler.py" in files["crop"] and "crop_sampler.py" not in files["warp"]
    assert "views/warp.py" not in files["crop"] and "views/crop.py" not in files["warp"]
    assert {"views/generate.py", "views/generators.py", "imaging.py"} <= files["warp"] & files["crop"]
    assert {"constants.py", "sldm/conditioning.py"} <= files["sldm"] and "constants.py" not in files["warp"]
    # merging shards runs no generator
    merge = _rel(provenance.code_files(cli.command_module("views", "merge")))
    assert not merge & {"views/generators.py", "views/generate.py", "crop_sampler.py", "seeding.py"}
    with pytest.raises(KeyError, match="no @register"):
        provenance.plugin_code_files(generate, "views", "nope")


def test_code_digest_follows_the_syntax_tree(tmp_path):
    """Comments, docstrings and formatting change no digest; a changed constant does."""
    base = '"""Doc."""\n\nRRC_TRIES = 10\n\n\ndef f(x):\n    """Say."""\n    return x + RRC_TRIES\n'
    variants = {
        "same": base,
        "comment": base.replace("RRC_TRIES = 10", "RRC_TRIES = 10  # tries"),
        "docstrings": base.replace("Doc.", "Another doc.").replace("Say.", "Says more."),
        "format": base.replace("return x + RRC_TRIES", "return (x +\n            RRC_TRIES)"),
        "code": base.replace("RRC_TRIES = 10", "RRC_TRIES = 11"),
    }
    digests = {}
    for name, text in variants.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        digests[name] = provenance.ast_digest(path)
    assert digests["comment"] == digests["docstrings"] == digests["format"] == digests["same"]
    assert digests["code"] != digests["same"]
    data = tmp_path / "numbers.yaml"
    data.write_text("a: 1  # note\nb: [1, 2]\n")
    first = provenance.ast_digest(data)
    data.write_text("# header\nb: [1,   2]\na: 1\n")
    assert provenance.ast_digest(data) == first


def test_syntax_results_are_cached_by_content_and_checked(tmp_path, monkeypatch):
    """A file's digest is parsed once per content (the workflow's parse and every job's record read
    the cache); a damaged entry is recomputed, never believed; a cache that cannot be written only
    costs time."""
    import json

    monkeypatch.setenv(provenance.SYNTAX_CACHE_ENV, str(tmp_path / "cache"))
    source = tmp_path / "m.py"
    source.write_text("X = 1\n")
    digest = provenance._file_digest.__wrapped__  # past the in-process memo, as a new process is
    first = digest(source, 0, 0)
    (entry,) = (tmp_path / "cache").rglob("*.json")
    parse = provenance._canonical_digest
    monkeypatch.setattr(provenance, "_canonical_digest", lambda path, source: pytest.fail(f"{path} parsed again"))
    assert digest(source, 0, 0) == first
    stored = json.loads(entry.read_text())
    entry.write_text(json.dumps({**stored, "value": "0" * 64}))  # a flipped value, the old check
    monkeypatch.setattr(provenance, "_canonical_digest", parse)
    assert digest(source, 0, 0) == first == json.loads(entry.read_text())["value"]
    source.write_text("X = 2\n")
    assert digest(source, 0, 0) != first and len(list((tmp_path / "cache").rglob("*.json"))) == 2
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv(provenance.SYNTAX_CACHE_ENV, str(tmp_path / "not-a-folder"))
    assert digest(source, 0, 0) == provenance.ast_digest(source)


def test_no_stage_imports_a_later_stage():
    order = {s: i for i, s in enumerate(cli.STAGES)}
    for stage in cli.STAGES:
        for path in sorted((provenance.PACKAGE_DIR / stage).glob("*.py")):
            module = f"pipeline.{stage}.{path.stem}".removesuffix(".__init__")
            for imported in provenance.imported_modules(module):
                parts = imported.split(".")
                if len(parts) > 1 and parts[1] in order:
                    assert order[parts[1]] <= order[stage], f"{module} imports {imported}"


def test_readme_table_to_module_map_is_literal(repo_root):
    """README's "command → module" pairs are the modules the command table runs (no hidden hop)."""
    import re

    text = (repo_root / "README.md").read_text()
    section = text.split("## Paper tables → rules → modules", 1)[1].split("\n## ", 1)[0]
    pairs = re.findall(r"`(\w+) ([\w-]+)` → `(pipeline/[\w/]+\.py)`", section)
    assert len(pairs) >= 8, pairs
    for stage, command, path in pairs:
        assert cli.command_module(stage, command).replace(".", "/") + ".py" == path, (stage, command, path)
