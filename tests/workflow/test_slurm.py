"""The Slurm profile: its static settings; the submission lines of a run's first wave of jobs,
captured by a fake ``sbatch``; and against a real Slurm, each kind of job of the tiny Table 4
chain resubmitted through the README's cluster command (`--workflow-profile profiles/slurm`), then
the submitted jobs read back from the controller (`scontrol show job`) and checked against the
profile and the config.

The real-Slurm test needs the CI's single-node test cluster (`.ci/slurm-up`: ClusterName=cdgmae-ci, partitions `cpu`
and `gpu`, four fake a100 GRES, MinJobAge=3600, no slurmdbd); skipped anywhere else, so it never
submits to a real site.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from pipeline.job_server import SERVED_NOTE
from tests.support import HANG_GUARD_S, ROOT, TINY_CONFIG, copy_run, sha256_hex, snakemake, wait_until

CLUSTER = "cdgmae-ci"
GPU_RULES = ("generate_views", "pretrain", "propagate")
# (merge_views and assemble_table are localrules: they run in the submitting process)
CPU_RULES = ("init_random_encoder",)
RANDOM_INIT = "random-init/arch~vit_mini_patch8/seed~0"


def _test_cluster() -> str | None:
    """Why the test cannot run here, or None when the CI's test cluster answers."""
    if not shutil.which("sinfo") or not shutil.which("scontrol"):
        return "no Slurm client (sinfo) on PATH"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=15)
        conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo does not answer: {e}"
    if info.returncode != 0 or conf.returncode != 0:
        return f"sinfo does not answer: {info.stderr.strip() or conf.stderr.strip()}"
    if not re.search(rf"^ClusterName\s*=\s*{CLUSTER}\s*$", conf.stdout, re.M):
        return f"not the CI's test cluster ({CLUSTER}, .ci/slurm-up): refusing to submit"
    return None


def readme_cluster_command() -> list[str]:
    """The README's cluster command, as words, up to its --configfile and target."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Cluster (Slurm)", 1)[1]
    line = next(ln for ln in section.splitlines() if ln.startswith("snakemake "))
    words = shlex.split(line)
    cut = next(i for i, w in enumerate(words) if w.startswith("--configfile"))
    return words[1:cut]


def profile() -> dict:
    return yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())


def slurm_minutes(limit: str) -> int:
    """scontrol's TimeLimit ([D-]HH:MM:SS) in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def slurm_mb(mem: str) -> float:
    """scontrol's memory (8000M, 62.50G, ...) in MB."""
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}
    return float(mem[:-1]) * scale[mem[-1]] if mem[-1] in scale else float(mem)


def submitted_jobs(output: str) -> dict[str, list[dict[str, str]]]:
    """{rule: [scontrol fields of each job]} for every job the plugin submitted in this run."""
    ids = re.findall(r"submitted with SLURM jobid (\d+)", output)
    assert ids, output[-3000:]
    by_rule: dict[str, list[dict[str, str]]] = {}
    for jid in ids:
        proc = subprocess.run(
            ["scontrol", "-o", "show", "job", jid], capture_output=True, text=True, timeout=HANG_GUARD_S
        )
        assert proc.returncode == 0, f"job {jid} left the controller (MinJobAge too low?): {proc.stderr}"
        fields = dict(re.findall(r"(\S+?)=(\S*)", proc.stdout))
        m = re.match(r"rule_(\w+?)_wildcards", fields.get("Comment", ""))
        assert m, fields
        by_rule.setdefault(m.group(1), []).append(fields)
    return by_rule


def test_profile_leaves_gpu_counts_and_cpus_per_task_alone():
    """Static half (runs everywhere): the config decides GPU counts, and no `cpus_per_task` shadows
    the GPU rules' `cpus_per_gpu`; the README's command loads this profile alone."""
    prof = profile()
    assert "cpus_per_task" not in prof.get("default-resources", {})
    for rule in GPU_RULES:
        res = prof["set-resources"][rule]
        # gpu_model would be submitted as --gpus=<model>:0 for a config's `gpus: 0` (srun then fails)
        assert "gpu" not in res and "gres" not in res and "gpu_model" not in res, (rule, res)
        assert "cpus_per_task" not in res and res["cpus_per_gpu"] > 0, (rule, res)
    assert readme_cluster_command()[:2] == ["--workflow-profile", "profiles/slurm"]


@pytest.mark.slow
def test_slurm_profile_requests_gpus_only_for_gpu_rules(tiny_run, tmp_path):
    """A fake sbatch captures the submission lines of the first wave of jobs. In a copy of the tiny
    run: the forced, killed run leaves jobs marked incomplete, which must not reach the other tests
    sharing the run."""
    work = copy_run(tiny_run, tmp_path / "wf")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    captured = tmp_path / "sbatch.log"
    (bindir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {captured}\necho 'Submitted batch job 4242'\n")
    for tool in ("squeue", "sacct", "scancel", "sinfo", "sacctmgr", "sshare", "scontrol"):
        (bindir / tool).write_text("#!/bin/sh\nexit 0\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(work)}
    # force a GPU stage (views) and a CPU stage (random-init encoder) into the first wave
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        "profiles/slurm",
        *TINY_CONFIG,
        "--forcerun",
        "generate_views",
        "init_random_encoder",
        "--",
        "results/table4.csv",
    ]
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    # waits for the submissions, whatever the load
    wait_until(lambda: captured.exists() and captured.read_text().count("\n") >= 3, poll_s=1)
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


@pytest.mark.slow
def test_tiny_chain_through_the_slurm_profile(tiny_run, tmp_path):
    """Each kind of job of the tiny chain, resubmitted in a copy of the tiny run (its data, which
    no submitted job needs to redo, stays): the views' shards, the bag (local), one pretraining,
    its propagation on DAVIS and the random-init encoder (a CPU rule). Each in its own interpreter,
    they rewrite the bytes the tiny run's jobs wrote as forks of its warm job server."""
    # checked here, not at collection: a Slurm client without a controller takes ~20 s to give up
    why_not = _test_cluster()
    if why_not:
        pytest.skip(why_not)
    work = copy_run(tiny_run, tmp_path / "wf")
    model = (
        "method~cdgmae/arch~vit_mini_patch8/generator~warp/target~either/anchors~1/anchor_mask~0.0/"
        "target_mask~0.9/epochs~1/seed~0"
    )
    targets = [f"results/eval/{model}/davis/metrics.csv", f"results/pretrain/{RANDOM_INIT}/checkpoint.pth"]
    # (one --configfile option: the no-GPU run below appends a file to it)
    configs = ["--configfile", "tests/configs/tiny.yaml"]
    # no slurmdbd: squeue for status; first status check after 5 s, not the plugin's 40 s (each
    # wave of these seconds-long jobs would otherwise wait 40 s)
    base = [
        *readme_cluster_command(),
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "5",
        "--verbose",
    ]
    forced = ["--forcerun", *GPU_RULES, *CPU_RULES]
    proc = snakemake(work, *base, *configs, *forced, "--", *targets, timeout=HANG_GUARD_S)
    out = proc.stdout + proc.stderr
    assert all((work / t).is_file() for t in targets)
    # the README's command loads profiles/slurm alone (no local `gpu=8` cap from profiles/default)
    assert "profiles/default" not in out
    # a cluster run starts no warm job server (pipeline/job_server.py): each job has its own
    # interpreter, where the tiny run's were forked from its server; they wrote the same bytes
    assert "job_server" not in (work / "results" / "logs" / "propagate" / model / "davis.log").read_text()
    assert SERVED_NOTE in (tiny_run / "results" / "logs" / "propagate" / model / "davis.log").read_text()
    for artefact in [*targets, f"results/pretrain/{model}/checkpoint.pth", "results/views/warp/bag.h5"]:
        assert sha256_hex(work / artefact) == sha256_hex(tiny_run / artefact), artefact

    prof = profile()
    jobs = submitted_jobs(out)
    for rule in GPU_RULES:
        want = prof["set-resources"][rule]
        assert rule in jobs, sorted(jobs)
        for job in jobs[rule]:
            assert job["Partition"] == want["slurm_partition"] == "gpu", (rule, job)
            # the config's count (1 in tiny.yaml), on a node of the profile's GPU model
            assert job.get("TresPerJob") == "gres:gpu:1", (rule, job)
            assert job["Features"] == want["constraint"] == "a100", (rule, job)
            assert job.get("CpusPerTres") == f"gres:gpu:{want['cpus_per_gpu']}", (rule, job)
            assert int(job["NumCPUs"]) == want["cpus_per_gpu"], (rule, job)
            assert job["JobState"] == "COMPLETED", (rule, job)
            assert slurm_mb(job["MinMemoryNode"]) == want["mem_mb"], (rule, job)
            assert slurm_minutes(job["TimeLimit"]) == want["runtime"], (rule, job)
    defaults = prof["default-resources"]
    for rule in CPU_RULES:
        assert rule in jobs, sorted(jobs)
        for job in jobs[rule]:
            assert job["Partition"] == defaults["slurm_partition"] == "cpu", (rule, job)
            assert "gpu" not in job.get("TresPerJob", "") + job.get("TresPerNode", ""), (rule, job)
            assert job["JobState"] == "COMPLETED", (rule, job)
            assert "CpusPerTres" not in job, (rule, job)
            assert slurm_mb(job["MinMemoryNode"]) == defaults["mem_mb"], (rule, job)
            assert slurm_minutes(job["TimeLimit"]) == defaults["runtime"], (rule, job)

    # a GPU rule whose config asks for no GPU is allocated none (the profile only maps the site)
    no_gpu = work / "tests" / "configs" / "slurm_no_gpu.yaml"
    no_gpu.write_text("views: {gpus: 0}\n")
    proc = snakemake(
        work,
        *base,
        *configs,
        str(no_gpu),
        "--retries",
        "0",
        "--forcerun",
        "generate_views",
        "--",
        "results/views/warp/shard-0.h5",
        timeout=HANG_GUARD_S,
    )
    (job,) = submitted_jobs(proc.stdout + proc.stderr)["generate_views"]
    assert job["JobState"] == "COMPLETED", job
    assert "gpu" not in job.get("TresPerJob", "") + job.get("TresPerNode", ""), job
    assert "CpusPerTres" not in job, job
    assert "gres/gpu" not in job.get("AllocTRES", "") + job.get("TRES", ""), job
