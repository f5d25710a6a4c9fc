"""What re-runs, from dry-runs of the session's tiny Table 4 run (``tiny_run``): a second run does
nothing, neither does a moved or re-cloned project, and each kind of edit re-runs exactly the
stages it invalidates (Snakemake's job counts and printed reasons). Edits go to this worker's copy
of the run (``editable_tiny_run``) and are undone after each case."""

from __future__ import annotations

import os
import time

import pytest

from tests.support import TABLE4, copy_run, dry_table4, edit, job_counts, snakemake

pytestmark = pytest.mark.slow


def test_nothing_to_do_on_second_run(tiny_run):
    counts, out = dry_table4(tiny_run)
    assert counts == {}, out[-2000:]
    assert "Nothing to be done" in out


def test_moved_or_recloned_project_reruns_nothing(tiny_run, tmp_path):
    """The project moved elsewhere with its results/ (mtimes kept), then every code file rewritten
    with the same bytes as a fresh clone does: nothing re-runs (code inputs are relative paths and
    resume keys on content, never on paths or modification times)."""
    moved = copy_run(tiny_run, tmp_path / "elsewhere" / "project")
    counts, out = dry_table4(moved)
    assert counts == {} and "Nothing to be done" in out, out[-2000:]
    later = time.time() + 60
    for f in [*(moved / "pipeline").rglob("*.py"), *(moved / "rules").glob("*.smk"), moved / "Snakefile"]:
        f.write_bytes(f.read_bytes())
        os.utime(f, (later, later))
    counts, out = dry_table4(moved)
    assert counts == {} and "Nothing to be done" in out, out[-2000:]


# table4 on the tiny config: 2 trained cells + the random-init reference, each on 3 datasets
PROPAGATION_ALL = {"propagate": 9, "assemble_table": 1}
PROPAGATION_TRAINED = {"propagate": 6, "assemble_table": 1}


@pytest.mark.parametrize(
    "module, old, new, expected",
    [
        # the report stage alone
        ("report/table", None, None, {"assemble_table": 1}),
        # propagation of the 2 trained models + the random-init reference on 3 datasets, then the report
        ("propagation/run", None, None, PROPAGATION_ALL),
        # the model: pretraining and everything after it, never the views or the data
        ("pretrain/models_mae", None, None, {"pretrain": 2, "init_random_encoder": 1, **PROPAGATION_ALL}),
        # the crop sampler (a core module): every pretraining sample goes through it; the tiny run's
        # warp views do not (the crop generator's would), nor the random-init encoder
        ("crop_sampler", "RRC_TRIES = 10", "RRC_TRIES = 11", {"pretrain": 2, **PROPAGATION_TRAINED}),
        # the normalisation constants: pretraining and propagation normalise with them
        (
            "constants",
            "IMAGENET_MEAN = (0.485, 0.456, 0.406)",
            "IMAGENET_MEAN = (0.5, 0.456, 0.406)",
            {"pretrain": 2, **PROPAGATION_ALL},
        ),
        # seeds reach the data, the views and everything after them
        (
            "seeding",
            "& ((1 << 63) - 1))",
            "& ((1 << 62) - 1))",
            {"make_synthetic_data": 4, "generate_views": 2, "merge_views": 1, "pretrain": 2}
            | {"init_random_encoder": 1, **PROPAGATION_ALL},
        ),
    ],
)
def test_code_edit_reruns_only_what_it_invalidates(editable_tiny_run, module, old, new, expected):
    restore = edit(editable_tiny_run / "pipeline" / f"{module}.py", *((new, old) if old else ()))
    try:
        counts, out = dry_table4(editable_tiny_run)
    finally:
        restore()
    assert counts == expected, counts
    assert "Params have changed since last execution" in out


@pytest.mark.parametrize(
    "module, change",
    [
        # infrastructure: how a job runs, never what it computes
        ("lease", "\n_EDITED_BY_TEST_WORKFLOW = True\n"),
        ("io", "\n_EDITED_BY_TEST_WORKFLOW = True\n"),
        ("runtime", "\n_EDITED_BY_TEST_WORKFLOW = True\n"),
        # a comment- or format-only edit of result-carrying code (same syntax tree)
        ("crop_sampler", "\n# a comment only\n"),
        ("pretrain/models_mae", "\n\n\n# reformatted, commented\n"),
    ],
)
def test_edit_that_changes_no_result_reruns_nothing(editable_tiny_run, module, change):
    restore = edit(editable_tiny_run / "pipeline" / f"{module}.py", change)
    try:
        counts, out = dry_table4(editable_tiny_run)
    finally:
        restore()
    assert counts == {} and "Nothing to be done" in out, out[-2000:]


def test_cell_change_adds_only_that_cell(tiny_run, tmp_path):
    override = tmp_path / "tiny_cell.yaml"  # outside the shared run, which the test only reads
    override.write_text(
        "tables:\n  table4:\n    cells:\n      - {anchors: 1, anchor_mask: 0.0}\n"
        "      - {anchors: 2, anchor_mask: 0.25}\n"
    )
    proc = snakemake(
        tiny_run, "-n", "--cores", "2", "--configfile", "tests/configs/tiny.yaml", str(override), "--", TABLE4
    )
    out = proc.stdout + proc.stderr
    counts = job_counts(out)
    assert counts == {"pretrain": 1, "propagate": 3, "assemble_table": 1}, counts
    assert "anchor_mask~0.25" in out and "Missing output files" in out
