"""Recovery of a damaged run, in copies of the session's tiny Table 4 run (``tiny_run``): a workflow
killed mid-pretraining resumes the job from its saved state, and a scrub of corrupt artefacts
followed by the normal command rebuilds byte-identical results."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

import pytest

from tests.support import (
    HANG_GUARD_S,
    TABLE4,
    TINY_CONFIG,
    copy_run,
    dry_table4,
    flip,
    job_counts,
    snakemake,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def test_killed_pretraining_resumes_when_rerun(tiny_run, tmp_path):
    """Kill the whole workflow (SIGKILL, like a node loss) mid-pretraining; the documented recovery
    (`--unlock`, then `--rerun-incomplete`) resumes the job from its saved state. (On a copy of the
    tiny run: its data and views are up to date, so the first job is the pretraining.)"""
    work = copy_run(tiny_run, tmp_path / "wf")
    cfg = tmp_path / "tiny_kill.yaml"
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
    # waits for the first saved state, whatever the load
    wait_until(lambda: state.exists() or proc.poll() is not None, poll_s=0.2)
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


def test_scrub_then_rebuild_gives_the_same_results(tiny_run, tmp_path):
    """Issue 19: one corrupt artefact of each kind (a checkpoint, the bag, a metrics.csv, a resume
    state) in a copy of the tiny run; ``python -m pipeline.scrub`` lists them and what was made from
    them, ``--remove`` deletes exactly those, and the README's normal command rebuilds them (resuming
    the kept states): the table, the bag, every checkpoint and metrics file byte-identical."""
    work = copy_run(tiny_run, tmp_path / "wf")
    results = work / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(work)}

    def scrub(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "pipeline.scrub", *args]
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)

    def digests() -> dict[str, str]:
        files = [results / "table4.csv", results / "views" / "warp" / "bag.h5"]
        files += sorted((results / "pretrain").rglob("checkpoint.pth")) + sorted(
            (results / "eval").rglob("metrics.csv")
        )
        return {f.relative_to(work).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    original = digests()
    checkpoint = next((results / "pretrain" / "random-init").rglob("checkpoint.pth"))
    bag = results / "views" / "warp" / "bag.h5"
    metrics = sorted((results / "eval").rglob("davis/metrics.csv"))[0]
    states = sorted((results / "pretrain_state").rglob("last.pth"))
    state = states[0]
    # bit rot, which Snakemake's timestamps never see: the modification times are kept
    flip(checkpoint, keep_mtime=True)
    flip(bag, keep_mtime=True)
    stat = metrics.stat()
    metrics.write_text(metrics.read_text().replace("0.", "0.9", 1))
    os.utime(metrics, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    flip(state, keep_mtime=True)
    assert job_counts(dry_table4(work)[1]) == {}  # Snakemake alone sees nothing to do

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

    rebuilt = snakemake(work, "--cores", "2", *TINY_CONFIG, TABLE4)
    counts = job_counts(rebuilt.stdout + rebuilt.stderr)
    assert counts == {"merge_views": 1, "pretrain": 2, "init_random_encoder": 1, "propagate": 9, "assemble_table": 1}
    assert digests() == original
    logs = "".join(p.read_text() for p in (results / "logs" / "pretrain").rglob("*.log"))
    assert "resuming from" in logs  # the intact state's job rewrote its checkpoint without retraining
    assert scrub().returncode == 0 and job_counts(dry_table4(work)[1]) == {}
