"""The end-to-end contract on tiny configs: the Table 4 chain builds (the session's shared tiny run,
``tiny_run`` in tests/conftest.py), with provenance records and an HTML report; every other table
builds on top of it; the trained S-LDM feeds a bag of views."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import h5py
import pandas as pd
import pytest

from pipeline.io import recorded_digest
from pipeline.job_server import SERVED_NOTE
from tests.support import TABLE4, TINY_CONFIG, copy_run, copy_workflow, job_counts, snakemake

pytestmark = pytest.mark.slow


def test_tiny_chain_produces_table4(tiny_run):
    table = pd.read_csv(tiny_run / "results" / "table4.csv")
    trained = table[table["row"] == "trained"]
    assert sorted(zip(trained["n_anchors"], trained["anchor_mask_ratio"])) == [(1, 0.0), (2, 0.5)]
    assert (table["row"] == "random-init encoder (reference)").sum() == 1
    for col in ("davis_jf_m_mean", "vip_miou_mean", "jhmdb_pck01_mean"):
        assert table[col].notna().all() and ((table[col] >= 0) & (table[col] <= 100)).all()
    per_seed = pd.read_csv(tiny_run / "results" / "table4_per_seed.csv")
    assert len(per_seed) == 3
    # the jobs of one interpreter thread were forked from the run's warm job server (pipeline/job_server.py)
    logs = tiny_run / "results" / "logs"
    assert "preloaded" in (logs / "job_server.log").read_text()
    for log in [*(logs / "pretrain").rglob("*.log"), *(logs / "propagate").rglob("*.log")]:
        assert SERVED_NOTE in log.read_text(), log
    # never temp(): shards and checkpoints survive the run
    assert list((tiny_run / "results" / "views" / "warp").glob("shard-*.h5"))
    assert len(list((tiny_run / "results" / "pretrain").rglob("checkpoint.pth"))) == 3


def test_table_provenance_record_names_the_checkpoints_and_their_environments(tiny_run, tmp_path):
    """results/table4.provenance.json (pipeline.records): every checkpoint behind the table among
    its inputs with its recorded digest, the bag behind them, and the environments with the
    installed torch; the summary shows it."""
    results = tiny_run / "results"
    record = json.loads((results / "table4.provenance.json").read_text())
    assert record["artefact"] == "results/table4.csv" and record["command"] == "report table"
    checkpoints = sorted(p.relative_to(tiny_run).as_posix() for p in (results / "pretrain").rglob("checkpoint.pth"))
    assert checkpoints and sorted(p for p in record["inputs"] if p.endswith("/checkpoint.pth")) == checkpoints
    for ckpt in checkpoints:
        assert record["inputs"][ckpt] == recorded_digest(tiny_run / ckpt)
        assert (tiny_run / ckpt).with_name("checkpoint.provenance.json").exists()
    assert "results/views/warp/bag.h5" in record["inputs"]  # flattened from the checkpoints' records
    assert sum(p.endswith("/metrics.csv") for p in record["inputs"]) == 9
    torch_version = importlib.metadata.version("torch")
    envs = record["environments"]
    assert envs and all(e["software"]["torch"] == torch_version for e in envs)
    made = {a for e in envs for a in e["artefacts"]}
    assert set(checkpoints) <= made and "results/table4.csv" in made
    trained = [e for e in envs if any(a in checkpoints for a in e["artefacts"])]
    assert all(e["device"] == "cpu" and e["precision"] == "fp32" for e in trained)
    # the private copy is not a git checkout: the commit is unknown and says why
    assert record["code"]["commit"] is None and record["code"]["note"]

    # the summary is written outside the shared run (other tests read it)
    summary_md = tmp_path / "summary_provenance.md"
    env = {**os.environ, "PYTHONPATH": str(tiny_run)}
    cmd = [sys.executable, "-m", "pipeline.report", "summary", "--tables", "results/table4.csv"]
    cmd += ["--output", str(summary_md), "--run-label", "tiny", "--synthetic"]
    subprocess.run(cmd, cwd=tiny_run, env=env, check=True, capture_output=True)
    summary = summary_md.read_text()
    assert "*Provenance* (`results/table4.provenance.json`)" in summary
    assert f"torch {torch_version}" in summary and f"{len(record['inputs'])} input artefacts" in summary


@pytest.fixture(scope="module")
def tiny_report(tiny_run, tmp_path_factory) -> str:
    """Snakemake's HTML report of the tiny run's Table 4 (written outside the shared run)."""
    report = tmp_path_factory.mktemp("report") / "report.html"
    snakemake(tiny_run, "--cores", "1", *TINY_CONFIG, "--report", str(report), TABLE4)
    return report.read_text(errors="replace")


def test_html_report(tiny_report):
    assert "table4" in tiny_report
    # captions come from the table registry (pipeline.table_registry) through the rule's params
    assert "Number of anchors N and anchor masking ratio r_a" in tiny_report


def test_html_report_shows_each_tables_provenance(tiny_report):
    # the record itself is a report item (category Provenance), named in the table's caption
    assert "table4.provenance.json" in tiny_report and "Provenance" in tiny_report
    # and the table's label says what the record holds (read when the report is made)
    assert "input artefacts" in tiny_report and "environment(s)" in tiny_report


def test_every_table_builds_on_a_tiny_config(tiny_run, tmp_path):
    """The default target (every table, figure and the summary) on tiny data: each rule runs. Built
    on a copy of the tiny Table 4 run, whose jobs it reuses (tiny_all.yaml only adds tables)."""
    work = copy_run(tiny_run, tmp_path / "wf")
    table4_checkpoints = {p: p.stat().st_mtime_ns for p in (work / "results" / "pretrain").rglob("checkpoint.pth")}
    snakemake(work, "--cores", "2", "--configfile", "tests/configs/tiny.yaml", "tests/configs/tiny_all.yaml")
    # the reuse that makes this test cheap: Table 4's trainings were not redone
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in table4_checkpoints.items())
    results = work / "results"
    for i in range(1, 11):
        assert (results / f"table{i}.csv").stat().st_size > 0, f"table{i}.csv"
    for fig in ("figure4.png", "figures/loss_curves.png", "figures/bag_of_views.png"):
        assert (results / fig).stat().st_size > 1000, fig
    table5 = pd.read_csv(results / "table5.csv")
    assert {"CropMAE", "SiamMAE", "MAE"} <= set(table5["method"])
    table8 = pd.read_csv(results / "table8.csv")
    assert table8["gflops"].notna().sum() == 3  # (1, 0), (2, 0.5) and the N = 4 cell
    table9 = pd.read_csv(results / "table9.csv")
    assert table9["is_baseline"].sum() == 2  # warp and crop rows are labelled baselines
    summary = (results / "summary.md").read_text()
    assert "synthetic" in summary and "## table10" in summary
    family = pd.read_csv(results / "mae_family.csv")  # this project's extension table
    assert {"MAE", "LUT", "Pseudo MAE", "CropMAE"} <= set(family["method"])
    assert family["gflops"].notna().sum() == 5 and "## mae_family" in summary


def test_trained_s_ldm_feeds_the_bag_of_views(tmp_path):
    """With the sldm generator and no model_path, the workflow trains its own S-LDM (rule
    train_sldm) and generates the bag with it; the bag records the trained folder's sampler."""
    work = copy_workflow(tmp_path / "wf")
    (work / "sldm.yaml").write_text(
        "views: {generator: sldm, generators: {sldm: {steps: 2, guidance_scale: 3.0, dtype: float32}}}\n"
        "sldm: {steps: 4, batch_size: 8, warmup_steps: 1, sample_every: 0, checkpoint_every: 2,"
        " samples: {images: 2, views: 2, ddim_steps: 2}}\n"
    )
    # one --configfile with both files: a second --configfile option replaces the first
    args = ("--cores", "2", "--configfile", "tests/configs/tiny.yaml", "sldm.yaml")
    # (the target first: --configfile takes every word after it)
    counts = job_counts(snakemake(work, "results/views/sldm/bag.h5", "-n", *args).stdout)
    assert counts == {"make_synthetic_data": 1, "train_sldm": 1, "generate_views": 2, "merge_views": 1}, counts
    snakemake(work, "results/views/sldm/bag.h5", *args)
    assert (work / "results" / "sldm" / "model" / "sldm.json").exists()
    assert (work / "results" / "sldm" / "samples.png").exists()
    with h5py.File(work / "results" / "views" / "sldm" / "bag.h5", "r") as f:
        assert f.attrs["generator"] == "sldm" and len(f["index"]) > 0
        (sampler,) = json.loads(f.attrs["samplers"])
    assert sampler["sampler"]["null_condition"] == "projected_zero" and sampler["sampler"]["steps"] == 2
