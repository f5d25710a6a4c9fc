"""The recipe table (``docs/recipe.csv``, rendered into ``docs/recipe.md``) holds the paper preset:
every config key it lists has that value in the resolved preset (``config.yaml`` then
``presets/paper.yaml``, schema defaults filled: what a paper-scale run reads), and every setting of
the preset's ``sldm``, ``views``, ``pretrain`` and ``propagation`` sections is listed, each with a
source. Rows keyed ``code: ...`` are fixed in code (named in their source), not config keys.

Regenerate the rendered table after editing the CSV: ``python -m tests.workflow.test_recipe --write``.
"""

import csv
import sys

import yaml

from tests.support import ROOT

CSV = ROOT / "docs" / "recipe.csv"
MD = ROOT / "docs" / "recipe.md"
SECTIONS = ("sldm", "views", "pretrain", "propagation")
BEGIN, END = "<!-- recipe.csv: begin (python -m tests.workflow.test_recipe --write) -->", "<!-- recipe.csv: end -->"
COLUMNS = ["stage", "key", "paper", "preset", "source"]


def read_rows(path=CSV) -> list[dict]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS, reader.fieldnames
        return list(reader)


def render(rows: list[dict]) -> str:
    """The markdown table of the CSV, in its order (``|`` escaped)."""
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| stage | key | paper | preset | source |", "|---|---|---|---|---|"]
    for r in rows:
        key = r["key"] if r["key"].startswith("code:") else f"`{r['key']}`"
        lines.append(
            f"| {cell(r['stage'])} | {cell(key)} | {cell(r['paper'])} | `{cell(r['preset'])}` | {cell(r['source'])} |"
        )
    return "\n".join(lines)


def resolved_preset() -> dict:
    from pipeline.config import load_config

    return load_config(ROOT / "config.yaml", ROOT / "presets" / "paper.yaml")


def leaves(node, prefix: str = ""):
    """(dotted key, value) of every setting: a mapping is descended, anything else (a list, an
    empty mapping) is one value."""
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def test_every_listed_key_has_its_value_in_the_paper_preset():
    config = resolved_preset()
    wrong = []
    for r in read_rows():
        assert r["source"].strip() and r["paper"].strip() and r["preset"].strip(), r
        if r["key"].startswith("code:"):
            continue
        assert r["key"].split(".")[0] in SECTIONS, r["key"]
        try:
            value = lookup(config, r["key"])
        except KeyError:
            wrong.append(f"{r['key']}: not a key of the resolved preset")
            continue
        if yaml.safe_load(r["preset"]) != value:
            wrong.append(f"{r['key']}: recipe says {r['preset']!r}, the preset has {value!r}")
    assert not wrong, "\n".join(wrong)


def test_every_setting_of_the_preset_is_listed_once():
    rows = read_rows()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    config = resolved_preset()
    written = yaml.safe_load((ROOT / "presets" / "paper.yaml").read_text())
    missing = []
    for section in SECTIONS:
        # what the preset file writes, and every setting a paper-scale run resolves (schema defaults
        # and config.yaml values it inherits included)
        for node in (written[section], config[section]):
            missing += [k for k, _ in leaves(node, f"{section}.") if k not in keys and k not in missing]
    assert not missing, f"settings of the paper preset missing from {CSV.name}: {missing}"


def test_the_rendered_table_is_the_csv():
    text = MD.read_text()
    assert BEGIN in text and END in text
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == render(read_rows()), "docs/recipe.md is stale: run python -m tests.workflow.test_recipe --write"


def test_readme_lists_the_assumptions():
    readme = (ROOT / "README.md").read_text()
    assert "docs/recipe.md" in readme
    section = " ".join(readme.split("### Assumptions of the paper preset", 1)[1].split("\n## ", 1)[0].split())
    for word in ("steps", "batch", "EMA", "encoder size", "eta"):
        assert word in section, word


def write() -> None:
    text = MD.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    MD.write_text(f"{head}{BEGIN}\n{render(read_rows())}\n{END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(render(read_rows()))
