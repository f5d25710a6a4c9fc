"""``python -m pipeline.scrub``: every recorded digest under results/ verified, corrupt and
untrusted artefacts reported, and with ``--remove`` deleted with exactly what was made from them
(issue 19). A small fake results tree with real digests and records; the rebuild after a scrub of a
real tiny run is ``tests/workflow/test_recovery.py::test_scrub_then_rebuild_gives_the_same_results``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.io import FOLDER_DIGESTS, digest_path, record_digest, write_folder_digests
from pipeline.records import record_path, write_record
from tests.support import flip

pytestmark = pytest.mark.fault  # every case here is a fault-injection case (pytest -m fault)

MODEL = "results/sldm/model"
BAG = "results/views/sldm/bag.h5"
CKPT = "results/pretrain/cell/seed~0/checkpoint.pth"
OTHER_CKPT = "results/pretrain/random-init/seed~0/checkpoint.pth"
STATE = "results/pretrain_state/cell/seed~0/last.pth"
METRICS = "results/eval/cell/seed~0/davis/metrics.csv"
OTHER_METRICS = "results/eval/random-init/seed~0/davis/metrics.csv"
TABLE = "results/table4.csv"


def _file(path: str, data: bytes, digest: bool, inputs=None) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    if digest:
        record_digest(p)
    if inputs is not None:
        write_record(p, kind="test", inputs=inputs)


@pytest.fixture
def results(tmp_path, monkeypatch):
    """S-LDM folder -> bag -> checkpoint -> metrics -> table, a random-init checkpoint -> metrics ->
    the same table, and a resume state; every digest and record as the workflow writes them."""
    monkeypatch.chdir(tmp_path)
    model = Path(MODEL)
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 8)
    (model / "sldm.json").write_text(json.dumps({"format": "cdgmae-sldm"}))
    write_folder_digests(model)
    write_record(model, kind="sldm", inputs=[])
    _file(BAG, b"bag" * 300, True, [MODEL])
    _file(CKPT, b"checkpoint" * 100, True, [BAG])
    _file(OTHER_CKPT, b"random" * 100, True, [])
    _file(STATE, b"state" * 100, True)
    _file(METRICS, b"J&F-Mean\n0.5\n", False, [CKPT])
    _file(OTHER_METRICS, b"J&F-Mean\n0.3\n", False, [OTHER_CKPT])
    _file(TABLE, b"row,value\na,0.5\n", False, [METRICS, OTHER_METRICS])
    return tmp_path


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / "results").rglob("*") if p.is_file()}


def _scrub(*args: str) -> int:
    try:
        cli.run_tool("scrub", list(args))
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def _with_companions(*artefacts: str) -> set[str]:
    """An artefact's files: itself (a folder: its files), its recorded digest and its record."""
    out = set()
    for a in artefacts:
        p = Path(a)
        out |= {f.as_posix() for f in p.rglob("*") if f.is_file()} if p.is_dir() else {a}
        out |= {x.as_posix() for x in (digest_path(p), record_path(p)) if x.exists()}
    return out


def _flip_model(root):
    flip(Path(MODEL) / "unet" / "diffusion_pytorch_model.safetensors")


def _edit_metrics(root):
    Path(METRICS).write_text("J&F-Mean\n0.9\n")


CASES = {
    # damage: (how, reported problem and path, removed artefacts)
    "flipped S-LDM weights": (_flip_model, ("CORRUPT", MODEL), [MODEL, BAG, CKPT, METRICS, TABLE]),
    "S-LDM folder without manifest": (
        lambda r: (Path(MODEL) / FOLDER_DIGESTS).unlink(),
        ("NO DIGEST", MODEL),
        [MODEL, BAG, CKPT, METRICS, TABLE],
    ),
    "flipped bag": (lambda r: flip(Path(BAG)), ("CORRUPT", BAG), [BAG, CKPT, METRICS, TABLE]),
    "bag without digest": (lambda r: digest_path(BAG).unlink(), ("NO DIGEST", BAG), [BAG, CKPT, METRICS, TABLE]),
    "flipped checkpoint": (lambda r: flip(Path(CKPT)), ("CORRUPT", CKPT), [CKPT, METRICS, TABLE]),
    "flipped resume state": (lambda r: flip(Path(STATE)), ("CORRUPT", STATE), [STATE]),
    "edited metrics.csv": (_edit_metrics, ("CORRUPT", METRICS), [METRICS, TABLE]),
    "edited table": (lambda r: Path(TABLE).write_text("row,value\na,0.7\n"), ("CORRUPT", TABLE), [TABLE]),
    "unreadable record": (
        lambda r: record_path(METRICS).write_text("{not json"),
        ("CORRUPT", str(record_path(METRICS))),
        [METRICS],
    ),
}


def test_an_intact_results_folder_is_clean(results, capsys):
    before = _tree(results)
    assert _scrub() == 0 and _scrub("--remove") == 0
    assert "every recorded digest verified" in capsys.readouterr().out and _tree(results) == before


@pytest.mark.parametrize("case", list(CASES))
def test_scrub_reports_and_removes_exactly_what_is_damaged_and_made_from_it(results, capsys, case):
    """Before: no command did this; after a corrupt bag or checkpoint was removed by hand, Snakemake
    said 'Nothing to be done' because the table was still there."""
    damage, (problem, path), removed = CASES[case]
    damage(results)
    expected = _with_companions(*removed)
    before = _tree(results)
    assert _scrub() == 1  # report only: found, nothing touched
    out = capsys.readouterr().out
    assert any(line.startswith(problem) and f" {path} " in line for line in out.splitlines()), out
    for dependent in removed[1:]:
        assert any(line.startswith("MADE FROM") and f" {dependent} " in line for line in out.splitlines()), out
    assert _tree(results) == before
    assert _scrub("--remove") == 0
    assert before - _tree(results) == expected, capsys.readouterr().out
    assert _scrub() == 0  # what is left verifies


def test_scrub_is_a_registered_tool_and_an_infrastructure_module():
    from pipeline import provenance

    assert cli.entry_point(cli.TOOLS["scrub"][0]) == ("pipeline.scrub", "main")
    assert provenance.classify("pipeline.scrub") == provenance.INFRASTRUCTURE
