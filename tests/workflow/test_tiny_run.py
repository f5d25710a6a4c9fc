"""The end-to-end contract: the Table 4 chain runs on a tiny config, a second run does nothing, and
each kind of edit re-runs exactly the stages it invalidates (checked through Snakemake's dry-run
job counts and printed reasons). Also: the paper preset's full grid, the slurm profile's submission
lines, killed-run recovery and the HTML report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.support import HANG_GUARD_S

ROOT = Path(__file__).resolve().parent.parent
COPY = [
    "Snakefile",
    "rules",
    "pipeline",
    "schemas",
    "config.yaml",
    "envs",
    "profiles",
    "report",
    "presets",
    "tests/configs",
]
# `=` form: --configfile takes several values and would swallow the target that follows
TINY = ["--configfile=tests/configs/tiny.yaml"]
pytestmark = pytest.mark.slow


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = HANG_GUARD_S
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(workdir)}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table: {rule: count} (empty when nothing is to be done)."""
    counts: dict[str, int] = {}
    if "Job stats:" not in output:
        return counts
    block = output.split("Job stats:", 1)[1]
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def copy_workflow(dest: Path) -> Path:
    for item in COPY:
        src = ROOT / item
        target = dest / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    return dest


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A completed tiny run of results/table4.csv in a private copy of the workflow."""
    work = copy_workflow(tmp_path_factory.mktemp("wf"))
    snakemake(work, "--cores", "2", *TINY, "results/table4.csv")
    return work


def dry(work: Path, *extra: str) -> tuple[dict[str, int], str]:
    proc = snakemake(work, "-n", "--cores", "2", *TINY, *extra, "results/table4.csv")
    return job_counts(proc.stdout + proc.stderr), proc.stdout + proc.stderr


def edit(path: Path, change: str = "\n_EDITED_BY_TEST_WORKFLOW = True\n", old: str | None = None):
    """Change a source file (by default a new statement: a change of what Python executes; with
    ``old``, replace that text by ``change``); return a function restoring the original."""
    original = path.read_text()
    if old is None:
        path.write_text(original + change)
    else:
        assert original.count(old) == 1, f"{old!r} must occur once in {path}"
        path.write_text(original.replace(old, change))

    def restore():
        path.write_text(original)

    return restore


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


def test_trained_s_ldm_feeds_the_bag_of_views(tmp_path):
    """With the sldm generator and no model_path, the workflow trains its own S-LDM (rule
    train_sldm) and generates the bag with it; the bag records the trained folder's sampler."""
    import h5py

    work = copy_workflow(tmp_path / "wf")
    (work / "sldm.yaml").write_text(
        "views: {generator: sldm, generators: {sldm: {steps: 2, guidance_scale: 3.0, dtype: float32}}}\n"
        "sldm: {steps: 4, batch_size: 8, warmup_steps: 1, sample_every: 0, checkpoint_every: 2,"
        " samples: {images: 2, views: 2, ddim_steps: 2}}\n"
    )
    # one --configfile with both files: a second --configfile option replaces the first
    args = ("--cores", "2", "--configfile", "tests/configs/tiny.yaml", "sldm.yaml")
    # (the target first: --configfile takes every word after it)
    counts, _ = job_counts(snakemake(work, "results/views/sldm/bag.h5", "-n", *args).stdout), None
    assert counts == {"make_synthetic_data": 1, "train_sldm": 1, "generate_views": 2, "merge_views": 1}, counts
    snakemake(work, "results/views/sldm/bag.h5", *args)
    assert (work / "results" / "sldm" / "model" / "sldm.json").exists()
    assert (work / "results" / "sldm" / "samples.png").exists()
    with h5py.File(work / "results" / "views" / "sldm" / "bag.h5", "r") as f:
        assert f.attrs["generator"] == "sldm" and len(f["index"]) > 0
        (sampler,) = json.loads(f.attrs["samplers"])
    assert sampler["sampler"]["null_condition"] == "projected_zero" and sampler["sampler"]["steps"] == 2


def test_tiny_chain_produces_table4(tiny_run):
    table = pd.read_csv(tiny_run / "results" / "table4.csv")
    trained = table[table["row"] == "trained"]
    assert sorted(zip(trained["n_anchors"], trained["anchor_mask_ratio"])) == [(1, 0.0), (2, 0.5)]
    assert (table["row"] == "random-init encoder (reference)").sum() == 1
    for col in ("davis_jf_m_mean", "vip_miou_mean", "jhmdb_pck01_mean"):
        assert table[col].notna().all() and ((table[col] >= 0) & (table[col] <= 100)).all()
    per_seed = pd.read_csv(tiny_run / "results" / "table4_per_seed.csv")
    assert len(per_seed) == 3
    # never temp(): shards and checkpoints survive the run
    assert list((tiny_run / "results" / "views" / "warp").glob("shard-*.h5"))
    assert len(list((tiny_run / "results" / "pretrain").rglob("checkpoint.pth"))) == 3


def test_nothing_to_do_on_second_run(tiny_run):
    counts, out = dry(tiny_run)
    assert counts == {}, out[-2000:]
    assert "Nothing to be done" in out


def test_moved_or_recloned_project_reruns_nothing(tiny_run, tmp_path):
    """The project moved elsewhere with its results/ (mtimes kept), then every code file rewritten
    with the same bytes as a fresh clone does: nothing re-runs (code inputs are relative paths and
    resume keys on content, never on paths or modification times)."""
    moved = tmp_path / "elsewhere" / "project"
    shutil.copytree(tiny_run, moved, symlinks=True)
    counts, out = dry(moved)
    assert counts == {} and "Nothing to be done" in out, out[-2000:]
    later = time.time() + 60
    for f in [*(moved / "pipeline").rglob("*.py"), *(moved / "rules").glob("*.smk"), moved / "Snakefile"]:
        f.write_bytes(f.read_bytes())
        os.utime(f, (later, later))
    counts, out = dry(moved)
    assert counts == {} and "Nothing to be done" in out, out[-2000:]


# table4 on the tiny config: 2 trained cells + the random-init reference, each on 3 datasets
PROPAGATION_ALL = {"propagate": 9, "assemble_table": 1}
PROPAGATION_TRAINED = {"propagate": 6, "assemble_table": 1}


@pytest.mark.parametrize(
    "module, old, new, expected",
    [
        # the report stage alone
        ("report/tables", None, None, {"assemble_table": 1}),
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
def test_code_edit_reruns_only_what_it_invalidates(tiny_run, module, old, new, expected):
    restore = edit(tiny_run / "pipeline" / f"{module}.py", *((new, old) if old else ()))
    try:
        counts, out = dry(tiny_run)
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
def test_edit_that_changes_no_result_reruns_nothing(tiny_run, module, change):
    restore = edit(tiny_run / "pipeline" / f"{module}.py", change)
    try:
        counts, out = dry(tiny_run)
    finally:
        restore()
    assert counts == {} and "Nothing to be done" in out, out[-2000:]


def test_cell_change_adds_only_that_cell(tiny_run, tmp_path):
    override = tiny_run / "tests" / "configs" / "tiny_cell.yaml"
    override.write_text(
        "tables:\n  table4:\n    cells:\n      - {anchors: 1, anchor_mask: 0.0}\n"
        "      - {anchors: 2, anchor_mask: 0.25}\n"
    )
    proc = snakemake(
        tiny_run,
        "-n",
        "--cores",
        "2",
        "--configfile",
        "tests/configs/tiny.yaml",
        str(override),
        "--",
        "results/table4.csv",
    )
    out = proc.stdout + proc.stderr
    counts = job_counts(out)
    assert counts == {"pretrain": 1, "propagate": 3, "assemble_table": 1}, counts
    assert "anchor_mask~0.25" in out and "Missing output files" in out


def test_html_report(tiny_run):
    snakemake(tiny_run, "--cores", "1", *TINY, "--report", "results/report.html", "results/table4.csv")
    html = (tiny_run / "results" / "report.html").read_text(errors="replace")
    assert "table4" in html
    # captions come from the table registry (pipeline.table_registry) through the rule's params
    assert "Number of anchors N and anchor masking ratio r_a" in html


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


def test_paper_preset_lists_the_whole_grid(repo_root, tmp_path):
    import yaml

    work = copy_workflow(tmp_path / "wf")
    preset = localize_paths(yaml.safe_load((work / "presets" / "paper.yaml").read_text()), tmp_path / "local")
    # the placeholder dataset roots get the folders of their official layouts (checked at parse time)
    from pipeline.data.layouts import REQUIRED_DIRS

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


def test_slurm_profile_requests_gpus_only_for_gpu_rules(tiny_run, tmp_path):
    """A fake sbatch captures the submission lines of the first wave of jobs. In a copy of the tiny
    run: the forced, killed run leaves jobs marked incomplete, which must not reach the other tests
    sharing the fixture."""
    tiny_run = Path(shutil.copytree(tiny_run, tmp_path / "wf", symlinks=True))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    captured = tmp_path / "sbatch.log"
    (bindir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {captured}\necho 'Submitted batch job 4242'\n")
    for tool in ("squeue", "sacct", "scancel", "sinfo", "sacctmgr", "sshare", "scontrol"):
        (bindir / tool).write_text("#!/bin/sh\nexit 0\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(tiny_run)}
    # force a GPU stage (views) and a CPU stage (random-init encoder) into the first wave
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        "profiles/slurm",
        *TINY,
        "--forcerun",
        "generate_views",
        "init_random_encoder",
        "--",
        "results/table4.csv",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tiny_run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.time() + HANG_GUARD_S  # waits for the submissions, whatever the load
    while time.time() < deadline and (not captured.exists() or captured.read_text().count("\n") < 3):
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    lines = captured.read_text().splitlines() if captured.exists() else []
    assert lines, "no sbatch submission captured"
    # the plugin names each job's rule in --comment rule_<rule>_wildcards_...
    by_rule = {}
    for line in lines:
        m = re.search(r"--comment rule_(\w+?)_wildcards", line)
        if m:
            by_rule[m.group(1)] = line
    assert "generate_views" in by_rule, lines
    assert re.search(r"--gpus=a100:1|--gpus=1|--gres=gpu", by_rule["generate_views"]), by_rule["generate_views"]
    assert " -p gpu " in by_rule["generate_views"]
    cpu_rule = by_rule.get("init_random_encoder")
    assert cpu_rule is not None, lines
    assert "--gpus" not in cpu_rule and "gres=gpu" not in cpu_rule
    subprocess.run([sys.executable, "-m", "snakemake", "--unlock", *TINY], cwd=tiny_run, env=env, capture_output=True)


def test_killed_pretraining_resumes_when_rerun(tmp_path):
    """Kill the whole workflow (SIGKILL, like a node loss) mid-pretraining; the documented recovery
    (`--unlock`, then `--rerun-incomplete`) resumes the job from its saved state."""
    work = copy_workflow(tmp_path)
    cfg = work / "tests" / "configs" / "tiny_kill.yaml"
    cfg.write_text(
        "pretrain: {cell_defaults: {epochs: 40}}\ntables: {table4: {cells: [{anchors: 1, anchor_mask: 0.0}]}}\n"
    )
    args = ["--configfile", "tests/configs/tiny.yaml", str(cfg), "--cores", "2"]
    model = (
        "method~cdgmae/arch~vit_mini_patch8/generator~warp/target~either/anchors~1/anchor_mask~0.0/"
        "target_mask~0.9/epochs~40/seed~0"
    )
    target = f"results/pretrain/{model}/checkpoint.pth"
    state = work / "results" / "pretrain_state" / model / "last.pth"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(work)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "snakemake", *args, "--", target],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline and not state.exists() and proc.poll() is None:
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists(), "pretraining never saved a resumable state"
    assert not (work / target).exists(), "the job finished before it could be killed"
    snakemake(work, "--unlock", *args)
    snakemake(work, "--rerun-incomplete", *args, "--", target)
    log = (work / "results" / "logs" / "pretrain" / f"{model}.log").read_text()
    assert "resuming from" in log, log[-2000:]
    assert (work / target).exists()


def test_every_table_builds_on_a_tiny_config(tmp_path):
    """The default target (every table, figure and the summary) on tiny data: each rule runs."""
    work = copy_workflow(tmp_path)
    snakemake(
        work, "--cores", "2", "--configfile", "tests/configs/tiny.yaml", "tests/configs/tiny_all.yaml", timeout=1500
    )
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


def test_table_provenance_record_names_the_checkpoints_and_their_environments(tiny_run):
    """results/table4.provenance.json (pipeline.records): every checkpoint behind the table among
    its inputs with its recorded digest, the bag behind them, and the environments with the
    installed torch; the summary shows it."""
    import importlib.metadata

    from pipeline.io import recorded_digest

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

    env = {**os.environ, "PYTHONPATH": str(tiny_run)}
    cmd = [sys.executable, "-m", "pipeline.report", "summary", "--tables", "results/table4.csv"]
    cmd += ["--output", "results/summary_provenance.md", "--run-label", "tiny", "--synthetic"]
    subprocess.run(cmd, cwd=tiny_run, env=env, check=True, capture_output=True)
    summary = (results / "summary_provenance.md").read_text()
    assert "*Provenance* (`results/table4.provenance.json`)" in summary
    assert f"torch {torch_version}" in summary and f"{len(record['inputs'])} input artefacts" in summary


def test_html_report_shows_each_tables_provenance(tiny_run):
    snakemake(tiny_run, "--cores", "1", *TINY, "--report", "results/report_provenance.html", "results/table4.csv")
    html = (tiny_run / "results" / "report_provenance.html").read_text(errors="replace")
    # the record itself is a report item (category Provenance), named in the table's caption
    assert "table4.provenance.json" in html and "Provenance" in html
    # and the table's label says what the record holds (read when the report is made)
    assert "input artefacts" in html and "environment(s)" in html


@pytest.mark.fault
def test_scrub_then_rebuild_gives_the_same_results(tiny_run, tmp_path):
    """Issue 19: one corrupt artefact of each kind (a checkpoint, the bag, a metrics.csv, a resume
    state) in a copy of the tiny run; ``python -m pipeline.scrub`` lists them and what was made from
    them, ``--remove`` deletes exactly those, and the README's normal command rebuilds them (resuming
    the kept states): the table, the bag, every checkpoint and metrics file byte-identical."""
    import hashlib

    work = tmp_path / "wf"
    shutil.copytree(tiny_run, work, symlinks=True)
    results = work / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(work)}

    def scrub(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "pipeline.scrub", *args]
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)

    def digests() -> dict[str, str]:
        files = [results / "table4.csv", results / "views" / "warp" / "bag.h5"]
        files += sorted((results / "pretrain").rglob("checkpoint.pth")) + sorted(
            (results / "eval").rglob("metrics.csv")
        )
        return {f.relative_to(work).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    def flip(path: Path) -> None:
        """16 inverted bytes, the mtime kept: bit rot, which Snakemake's timestamps never see."""
        stat, data = path.stat(), bytearray(path.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 16])
        path.write_bytes(bytes(data))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    original = digests()
    checkpoint = next((results / "pretrain" / "random-init").rglob("checkpoint.pth"))
    bag = results / "views" / "warp" / "bag.h5"
    metrics = sorted((results / "eval").rglob("davis/metrics.csv"))[0]
    states = sorted((results / "pretrain_state").rglob("last.pth"))
    state = states[0]
    flip(checkpoint)
    flip(bag)
    stat = metrics.stat()
    metrics.write_text(metrics.read_text().replace("0.", "0.9", 1))
    os.utime(metrics, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    flip(state)
    assert job_counts(dry(work)[1]) == {}  # Snakemake alone sees nothing to do

    found = scrub()
    assert found.returncode == 1, found.stderr[-2000:]
    lines = found.stdout.splitlines()
    for path in (checkpoint, bag, metrics, state):
        rel = path.relative_to(work).as_posix()
        assert any(line.startswith("CORRUPT") and f" {rel} " in line for line in lines), found.stdout
    assert any(line.startswith("MADE FROM") and " results/table4.csv " in line for line in lines)
    assert bag.exists() and checkpoint.exists()  # the report alone removes nothing

    removed = scrub("--remove")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not bag.exists() and not checkpoint.exists() and not state.exists()
    assert (states[1]).exists()  # an intact state is kept, to be resumed

    rebuilt = snakemake(work, "--cores", "2", *TINY, "results/table4.csv")
    counts = job_counts(rebuilt.stdout + rebuilt.stderr)
    assert counts == {"merge_views": 1, "pretrain": 2, "init_random_encoder": 1, "propagate": 9, "assemble_table": 1}
    assert digests() == original
    logs = "".join(p.read_text() for p in (results / "logs" / "pretrain").rglob("*.log"))
    assert "resuming from" in logs  # the intact state's job rewrote its checkpoint without retraining
    assert scrub().returncode == 0 and job_counts(dry(work)[1]) == {}
