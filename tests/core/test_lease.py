"""GPU lease: per-slot flock leases with fake GPU counts (CDGMAE_NUM_GPUS), real subprocesses."""

import os
import signal
import subprocess
import sys

import pytest

from pipeline.lease import LeaseError, acquire, lease
from tests.support import HANG_GUARD_S, ROOT

# prints its devices, then sleeps N seconds or, given a path, waits until it exists (a hang guard
# of tests.support.HANG_GUARD_S)
SHOW = (
    "import os, sys, time; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'UNSET'), flush=True)\n"
    "a = sys.argv[1]\n"
    "if a.replace('.', '').isdigit(): time.sleep(float(a))\n"
    "else:\n"
    "    t = time.time()\n"
    "    while not os.path.exists(a) and time.time() - t < 10800: time.sleep(0.02)"
)


def _env(n_gpus=None, **extra):
    drop = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "CDGMAE_ALLOW_CPU", "CDGMAE_REQUIRE_CUDA")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if n_gpus is not None:
        env["CDGMAE_NUM_GPUS"] = str(n_gpus)
    env.update(extra)
    return env


def _lease_cmd(lock_dir, gpus=1, sleep=0.0, *opts):
    return [
        sys.executable,
        "-m",
        "pipeline.lease",
        "--gpus",
        str(gpus),
        "--lock-dir",
        str(lock_dir),
        "--poll",
        "0.05",
        *opts,
        "--",
        sys.executable,
        "-c",
        SHOW,
        str(sleep),
    ]


def _run(cmd, env, timeout=HANG_GUARD_S):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _two_concurrent_leases(env, locks, release):
    """The devices two jobs leased while both held their lease (released afterwards)."""
    procs = [
        subprocess.Popen(_lease_cmd(locks, sleep=release), env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    devices = sorted(p.stdout.readline().strip() for p in procs)
    release.touch()
    for p in procs:
        p.communicate(timeout=HANG_GUARD_S)
    assert all(p.returncode == 0 for p in procs)
    return devices


def test_two_concurrent_leases_get_different_devices(tmp_path):
    # both hold their lease until released: the second cannot reuse the first one's slot
    assert _two_concurrent_leases(_env(2), tmp_path / "locks", tmp_path / "release") == ["0", "1"]


def test_busy_slot_makes_the_next_job_wait(tmp_path):
    env = _env(1)
    holder = subprocess.Popen(_lease_cmd(tmp_path, sleep=30), env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        waiting = _run(_lease_cmd(tmp_path, 1, 0, "--timeout", "0.5"), env)
        assert waiting.returncode == 2 and "no 1 free GPU slot(s) of 1" in waiting.stderr
    finally:
        holder.kill()
        holder.wait()


def test_dead_holder_frees_its_slot(tmp_path):
    env = _env(1)
    holder = subprocess.Popen(_lease_cmd(tmp_path, sleep=60), env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "0"
    # the lease exec()s the command: its pid holds the lock; SIGKILL leaves no chance to clean up
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    # --timeout 0: one try, no waiting; it succeeds only if the dead holder's slot is free at once
    nxt = _run(_lease_cmd(tmp_path, 1, 0, "--timeout", "0"), env)
    assert nxt.returncode == 0 and nxt.stdout.strip() == "0"


def test_slurm_allocation_devices_are_leased_per_job(tmp_path):
    """Inside a Slurm allocation the pre-set list is the pool: a job that owns its allocation gets
    all of it at once; jobs of a Snakemake run local inside one allocation get distinct devices
    (not all cuda:0); locks are the allocation's own; a list shorter than K is an error."""
    locks = tmp_path / "locks"
    env = _env(8, CUDA_VISIBLE_DEVICES="3,5", SLURM_JOB_ID="42")
    res = _run(_lease_cmd(locks, gpus=2), env)
    assert res.returncode == 0 and res.stdout.strip() == "3,5"
    assert _two_concurrent_leases(env, locks, tmp_path / "release") == ["3", "5"]
    assert sorted(f.name for f in (locks / "slurm-42").iterdir()) == ["gpu-3.lock", "gpu-5.lock"]
    assert sorted(f.name for f in locks.iterdir()) == ["slurm-42"]  # never the node-wide slots
    short = _run(_lease_cmd(locks, gpus=3), env)
    assert short.returncode == 2 and short.stdout == ""
    assert "asked for 3 GPUs but the Slurm allocation 42's CUDA_VISIBLE_DEVICES='3,5' lists 2" in short.stderr


def test_another_allocations_device_zero_is_not_this_ones(tmp_path):
    """Slurm numbers each job's devices from 0: two allocations' "0" never wait on each other."""
    locks = tmp_path / "locks"
    holder = subprocess.Popen(
        _lease_cmd(locks, sleep=30), env=_env(8, CUDA_VISIBLE_DEVICES="0", SLURM_JOB_ID="1"), stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"0"
        other = _run(_lease_cmd(locks, 1, 0, "--timeout", "5"), _env(8, CUDA_VISIBLE_DEVICES="0", SLURM_JOB_ID="2"))
        assert other.returncode == 0 and other.stdout.strip() == "0"
    finally:
        holder.kill()
        holder.wait()


def test_a_preset_list_shorter_than_k_is_an_error_outside_slurm_too(tmp_path):
    res = _run(_lease_cmd(tmp_path, gpus=2), _env(8, CUDA_VISIBLE_DEVICES="1"))
    assert res.returncode == 2 and res.stdout == ""
    assert "asked for 2 GPUs but the preset CUDA_VISIBLE_DEVICES='1' lists 1" in res.stderr


def test_preset_device_list_outside_slurm_is_the_pool(tmp_path):
    """A node-wide CUDA_VISIBLE_DEVICES list (no Slurm) is leased from, one device per job, instead
    of every job landing on its first device."""
    env = {k: v for k, v in _env(8, CUDA_VISIBLE_DEVICES="3,5").items() if k != "SLURM_JOB_ID"}
    locks = tmp_path / "locks"
    assert _two_concurrent_leases(env, locks, tmp_path / "release") == ["3", "5"]
    assert sorted(f.name for f in locks.iterdir()) == ["gpu-3.lock", "gpu-5.lock"]  # named by device id
    env.update(CUDA_VISIBLE_DEVICES="", CDGMAE_ALLOW_CPU="1")
    res = _run(_lease_cmd(tmp_path / "none"), env)
    assert res.returncode == 0 and res.stdout.strip() == ""  # an empty list: CPU (allowed), nothing leased


def test_a_gpu_job_without_a_cuda_device_fails_unless_the_cpu_is_allowed(tmp_path):
    """K > 0 and no CUDA device (none on the node: CDGMAE_NUM_GPUS=0 simulates it; an empty
    CUDA_VISIBLE_DEVICES): exit 2 without running the command, unless the config allows the CPU
    (allow_cpu: true -> CDGMAE_ALLOW_CPU=1), where it runs there with a warning."""
    for extra, why in (({}, "this node has no GPU"), ({"CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES is empty")):
        res = _run(_lease_cmd(tmp_path), _env(0, **extra))
        assert res.returncode == 2 and res.stdout == "", res.stderr
        assert f"asked for 1 GPU(s) but {why}: a GPU job does not run on the CPU unless allowed" in res.stderr
    res = _run(_lease_cmd(tmp_path), _env(0, CDGMAE_ALLOW_CPU="1"))
    assert res.returncode == 0 and res.stdout.strip() == "UNSET"
    assert "running on the CPU (CDGMAE_ALLOW_CPU=1)" in res.stderr
    res = _run(_lease_cmd(tmp_path, gpus=0), _env(2))  # a CPU job: devices hidden, no CPU permission needed
    assert res.returncode == 0 and res.stdout.strip() == ""


REQUIRE = "import os; print(os.environ.get('CDGMAE_REQUIRE_CUDA', 'UNSET'))"


def test_a_leased_job_is_told_to_require_its_devices(tmp_path):
    """The lease exports CDGMAE_REQUIRE_CUDA=K where the CPU is not allowed (pipeline.devices then
    fails the job if torch sees fewer devices); not for CPU jobs or where the CPU is allowed."""

    def show(gpus, env):
        cmd = [sys.executable, "-m", "pipeline.lease", "--gpus", str(gpus), "--lock-dir", str(tmp_path), "--"]
        res = _run([*cmd, sys.executable, "-c", REQUIRE], env)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    assert show(2, _env(4)) == "2"
    assert show(0, _env(4, CDGMAE_REQUIRE_CUDA="3")) == "UNSET"
    assert show(1, _env(4, CDGMAE_ALLOW_CPU="1")) == "UNSET"


def test_a_job_leased_a_gpu_that_torch_cannot_see_fails(tmp_path, monkeypatch):
    """The job side: leased K devices but torch sees fewer (a CPU-only torch, a cgroup): an error
    naming both, from the device choice and the DDP context alike; without the lease's requirement
    the CPU is used."""
    import torch

    from pipeline import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CDGMAE_REQUIRE_CUDA", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(RuntimeError, match=r"leased 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES='3'\) but torch .* sees 0"):
        devices.resolve_device()
    with pytest.raises(RuntimeError, match="not running on the CPU"):
        with devices.distributed_context():
            pass
    assert devices.resolve_device("cpu") == "cpu"  # an explicit device is the caller's choice
    monkeypatch.delenv("CDGMAE_REQUIRE_CUDA")
    assert devices.resolve_device() == "cpu"
    assert devices.describe_device("cpu").startswith("cpu (")


def test_pretraining_and_sldm_jobs_log_their_device_first(monkeypatch, caplog):
    """Both training entry points log the device before building anything."""
    import logging

    from pipeline.pretrain import train as pretrain_train
    from pipeline.sldm import train as sldm_train

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(pretrain_train, "batch_plan", stop)
    monkeypatch.setattr(sldm_train, "build_loop", stop)
    caplog.set_level(logging.INFO)
    with pytest.raises(Stop):
        pretrain_train.train({}, {}, [], seed=0, output="o", state_dir="s", device="cpu")
    with pytest.raises(Stop):
        sldm_train.train({}, [], seed=0, device="cpu", output="o", state_dir="s")
    lines = [r.getMessage() for r in caplog.records if "device: cpu (" in r.getMessage()]
    assert len(lines) == 2 and all(line.startswith("rank 0 device: cpu (") for line in lines)


def test_exit_status_of_the_command_is_returned(tmp_path):
    res = _run(
        [
            sys.executable,
            "-m",
            "pipeline.lease",
            "--gpus",
            "1",
            "--lock-dir",
            str(tmp_path),
            "--",
            sys.executable,
            "-c",
            "raise SystemExit(7)",
        ],
        _env(1),
    )
    assert res.returncode == 7


def test_multi_slot_lease_is_all_or_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CDGMAE_NUM_GPUS", "3")
    with lease(2, lock_dir=tmp_path, poll=0.01) as first:
        assert first == "0,1"
        with pytest.raises(LeaseError, match="no 2 free"):
            acquire(2, 3, tmp_path, poll=0.01, timeout=0.1)
        ids, fds = acquire(1, 3, tmp_path, poll=0.01, timeout=0.1)  # the free one is still free
        assert ids == [2]
        for fd in fds:
            os.close(fd)
    with lease(3, lock_dir=tmp_path, poll=0.01) as all_three:
        assert all_three == "0,1,2"
    with pytest.raises(LeaseError, match="asked for 4 GPUs but this node has 3"):
        acquire(4, 3, tmp_path)
