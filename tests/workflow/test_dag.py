"""The workflow's DAG, from dry-runs (``snakemake -n``: parsed and planned, no job run) in a private
copy of the workflow: the default config's Table 4 chain, the paper preset's whole grid, RCG's
import when its checkpoints are set, and a wrong dataset root stopping the parse."""

from __future__ import annotations

import re
import time
from pathlib import Path

import yaml

from pipeline.data.layouts import REQUIRED_DIRS
from tests.support import copy_workflow, job_counts, snakemake


def test_default_config_dry_run(tmp_path):
    """The embedded default's whole Table 4 chain, in a copy of the workflow: never the checkout's
    own results/ (the Quickstart's first line may have filled it)."""
    work = copy_workflow(tmp_path / "wf")
    proc = snakemake(work, "-n", "--cores", "8", "results/table4.csv")
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["assemble_table"] == 1
    assert counts["pretrain"] == 12 and counts["propagate"] == 39


def test_a_wrong_dataset_root_fails_when_the_workflow_starts(tmp_path):
    """A configured root without its official layout stops the parse, naming the key and the path,
    instead of failing hours later in the job that reads it."""
    work = copy_workflow(tmp_path / "wf")
    (work / "wrong.yaml").write_text(f"data: {{roots: {{davis: {tmp_path}}}}}\n")
    proc = snakemake(work, "-n", "--cores", "1", "--configfile=wrong.yaml", "results/table4.csv", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "data.roots.davis" in out and "missing JPEGImages/480p folder" in out and str(tmp_path) in out


def localize_paths(node, placeholders: Path):
    """Replace the preset's `/path/to/...` entries by empty placeholders (files keep their suffix)."""
    if isinstance(node, dict):
        return {k: localize_paths(v, placeholders) for k, v in node.items()}
    if isinstance(node, list):
        return [localize_paths(v, placeholders) for v in node]
    if isinstance(node, str) and node.startswith("/path/to/"):
        local = placeholders / node.removeprefix("/path/to/")
        local.parent.mkdir(parents=True, exist_ok=True)
        if local.suffix:
            local.touch()
        else:
            local.mkdir(exist_ok=True)
        return str(local)
    return node


def test_paper_preset_lists_the_whole_grid(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    preset = localize_paths(yaml.safe_load((work / "presets" / "paper.yaml").read_text()), tmp_path / "local")
    # the placeholder dataset roots get the folders of their official layouts (checked at parse time)
    for kind, root in preset["data"]["roots"].items():
        for rel in REQUIRED_DIRS[kind]:
            (Path(root) / rel / "placeholder").mkdir(parents=True, exist_ok=True)
    (work / "paper_local.yaml").write_text(yaml.safe_dump(preset))
    t0 = time.perf_counter()
    proc = snakemake(work, "-n", "--cores", "8", "--configfile=paper_local.yaml")
    elapsed = time.perf_counter() - t0
    counts = job_counts(proc.stdout + proc.stderr)
    # 21 cells x 3 seeds (Table 10's a1 cells on sldm, rcg and sd-variation views, and the MAE-family
    # table's mae / lut / pseudo-mae among them) + the two single-seed N = 4 cells of Table 8
    assert counts["pretrain"] == 65, counts
    # (65 trained + 2 random-init archs) x 3 datasets
    assert counts["propagate"] == 201
    assert counts["count_method_gflops"] == 1
    assert counts["init_random_encoder"] == 2
    # 8 shards for each of the three diffusion generators (Tables 9/10)
    assert counts["generate_views"] == 24 and counts["merge_views"] == 3
    # the S-LDM is trained by the workflow (8 GPUs) before its views are generated; RCG's imported
    assert counts["train_sldm"] == 1 and counts["import_rcg"] == 1
    assert re.search(r"rule train_sldm:.*?resources: [^\n]*gpu=8", proc.stdout, re.S), "train_sldm must ask for 8 GPUs"
    assert "make_synthetic_data" not in counts  # real roots: nothing synthetic
    print(f"paper-preset DAG: {sum(counts.values())} jobs in {elapsed:.1f} s")


def test_table9_imports_rcg_when_its_checkpoints_are_set(tmp_path):
    """With views.generators.rcg's checkpoints set and rcg a Table 9 row, the DAG imports RCG once
    and generates rcg's bag from the imported folder."""
    work = copy_workflow(tmp_path / "wf")
    (work / "ckpt").mkdir()
    for name in ("ldm.pth", "moco.pth.tar"):
        (work / "ckpt" / name).write_bytes(b"")
    (work / "rcg.yaml").write_text(
        "views: {generators: {rcg: {ldm_checkpoint: ckpt/ldm.pth, encoder_checkpoint: ckpt/moco.pth.tar}}}\n"
        "consistency: {generators: [rcg]}\n"
    )
    # one --configfile with both files: a second --configfile option replaces the first
    args = ("results/table9.csv", "-n", "--cores", "1", "--configfile", "tests/configs/tiny.yaml", "rcg.yaml")
    proc = snakemake(work, *args)
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["import_rcg"] == 1 and counts["generate_views"] >= 1, counts
    assert "results/sldm/rcg" in proc.stdout and "train_sldm" not in counts
