"""GPU lease: per-slot flock leases with fake GPU counts (CDGMAE_NUM_GPUS), real subprocesses."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.lease import LeaseError, acquire, lease

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# prints its devices, then sleeps N seconds or, given a path, waits (<= 60 s) until it exists
SHOW = (
    "import os, sys, time; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'UNSET'), flush=True)\n"
    "a = sys.argv[1]\n"
    "if a.replace('.', '').isdigit(): time.sleep(float(a))\n"
    "else:\n"
    "    t = time.time()\n"
    "    while not os.path.exists(a) and time.time() - t < 60: time.sleep(0.02)"
)


def _env(n_gpus=None, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
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


def _run(cmd, env, timeout=60):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _two_concurrent_leases(env, locks, release):
    """The devices two jobs leased while both held their lease (released afterwards)."""
    procs = [
        subprocess.Popen(_lease_cmd(locks, sleep=release), env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    devices = sorted(p.stdout.readline().strip() for p in procs)
    release.touch()
    for p in procs:
        p.communicate(timeout=60)
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
    t0 = time.monotonic()
    nxt = _run(_lease_cmd(tmp_path, 1, 0, "--timeout", "10"), env)
    assert nxt.returncode == 0 and nxt.stdout.strip() == "0"
    assert time.monotonic() - t0 < 10


def test_slurm_bound_devices_are_kept(tmp_path):
    res = _run(_lease_cmd(tmp_path), _env(4, CUDA_VISIBLE_DEVICES="3,5", SLURM_JOB_ID="42"))
    assert res.returncode == 0 and res.stdout.strip() == "3,5"
    assert not list(tmp_path.iterdir())  # no lock taken under a scheduler allocation


def test_preset_device_list_outside_slurm_is_the_pool(tmp_path):
    """A node-wide CUDA_VISIBLE_DEVICES list (no Slurm) is leased from, one device per job, instead
    of every job landing on its first device."""
    env = {k: v for k, v in _env(8, CUDA_VISIBLE_DEVICES="3,5").items() if k != "SLURM_JOB_ID"}
    locks = tmp_path / "locks"
    assert _two_concurrent_leases(env, locks, tmp_path / "release") == ["3", "5"]
    assert sorted(f.name for f in locks.iterdir()) == ["gpu-3.lock", "gpu-5.lock"]  # named by device id
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = _run(_lease_cmd(tmp_path / "none"), env)
    assert res.returncode == 0 and res.stdout.strip() == ""  # an empty list: CPU, nothing leased


def test_no_gpu_runs_on_cpu_and_gpus_zero_hides_devices(tmp_path):
    res = _run(_lease_cmd(tmp_path), _env(0))
    assert res.returncode == 0 and res.stdout.strip() == "UNSET"
    res = _run(_lease_cmd(tmp_path, gpus=0), _env(2))
    assert res.returncode == 0 and res.stdout.strip() == ""


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
