"""GPU slot lease: ``python -m pipeline.lease --gpus K -- <command ...>``.

Snakemake's ``resources: gpu`` is only a counter: it neither sets nor rotates
``CUDA_VISIBLE_DEVICES`` (snakemake #281). Every GPU rule therefore wraps its command in this
lease (snakemake.md §3):

- ``--gpus 0``: a CPU job; GPUs are hidden (``CUDA_VISIBLE_DEVICES=""``) so it cannot touch a
  device leased by another job.
- ``CUDA_VISIBLE_DEVICES`` set to a list: that list is the pool. Outside Slurm (e.g. ``0,1,2,3`` on
  a shared node) the lock files are named by device id, so jobs with and without the variable share
  the same slots. Inside a Slurm job (``SLURM_JOB_ID`` set) the list is the allocation's: jobs lease
  from it through locks of that allocation alone (``<lock dir>/slurm-<job id>``; so too from the
  node's GPUs when Slurm set no list), so the jobs of a Snakemake run local inside one allocation
  get distinct devices instead of all landing on cuda:0, and a job that owns its allocation gets
  its devices at once. A list shorter than K is an error.
- otherwise take K free slots of the node's GPUs with a non-blocking ``fcntl.flock`` on one lock file
  per device in a node-local directory (``--lock-dir``, ``$CDGMAE_LOCK_DIR``, default
  ``/tmp/cdgmae-gpu-locks-<uid>``); poll while none is free; set ``CUDA_VISIBLE_DEVICES`` and
  ``exec`` the command. The lock descriptors stay open in the command's process, so the slots are
  held until it exits, and the kernel releases them if it dies (SIGKILL, OOM).
- no CUDA device for a K > 0 job (no GPU on the node, an empty ``CUDA_VISIBLE_DEVICES``): an error
  (exit 2), unless ``CDGMAE_ALLOW_CPU=1`` (the workflow sets it from the
  config's ``allow_cpu``: true for the CPU demo, false in presets/paper.yaml); then the job runs on
  the CPU, with a warning. Where the CPU is not allowed the command also gets
  ``CDGMAE_REQUIRE_CUDA=K``: ``pipeline.devices`` then fails the job if torch sees fewer than K CUDA
  devices (a CPU-only torch, devices hidden by a cgroup) instead of training on the CPU.

Slot count: ``$CDGMAE_NUM_GPUS`` (also how tests simulate nodes, 0 = no GPU), else the lines of
``nvidia-smi -L``, else the entries of ``/proc/driver/nvidia/gpus``, else
``torch.cuda.device_count()`` (only when a driver is present).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

LOG = logging.getLogger("cdgmae.lease")


class LeaseError(RuntimeError):
    pass


def default_lock_dir() -> Path:
    return Path(os.environ.get("CDGMAE_LOCK_DIR") or f"/tmp/cdgmae-gpu-locks-{os.getuid()}")


def count_gpus() -> int:
    """Number of GPU slots on this node."""
    env = os.environ.get("CDGMAE_NUM_GPUS")
    if env not in (None, ""):
        try:
            return int(env)
        except ValueError:
            raise LeaseError(f"CDGMAE_NUM_GPUS={env!r} is not an integer") from None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
            if out.returncode == 0:
                return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.TimeoutExpired):
            pass
    proc = Path("/proc/driver/nvidia/gpus")  # one entry per GPU when the driver is loaded
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    if not Path("/dev/nvidiactl").exists():
        return 0  # no NVIDIA driver: skip the slow torch import
    try:
        # lazy: the lease wraps every GPU job, and torch takes seconds to import
        import torch  # noqa: PLC0415

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _try_lock(path: Path):
    """Open and non-blockingly lock ``path``; return the fd or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # informational only: who holds the slot (the lock, not the content, is authoritative)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
    return fd


def acquire(
    k: int,
    n_slots: int,
    lock_dir: Path | None = None,
    poll: float = 2.0,
    timeout: float | None = None,
    names: list[str] | None = None,
) -> tuple[list, list[int]]:
    """Take ``k`` of ``n_slots`` device slots; returns (device ids, lock fds). Blocks (polls).

    ``names``: the device ids of the slots (a pre-set ``CUDA_VISIBLE_DEVICES`` pool); by default
    slot i is device i."""
    names = list(names) if names is not None else list(range(n_slots))
    if k > n_slots:
        raise LeaseError(f"asked for {k} GPUs but this node has {n_slots}")
    lock_dir = Path(lock_dir or default_lock_dir())
    lock_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    waited = False
    while True:
        got: list[tuple[int, int]] = []
        for slot in range(n_slots):
            fd = _try_lock(lock_dir / f"gpu-{names[slot]}.lock")
            if fd is not None:
                got.append((names[slot], fd))
                if len(got) == k:
                    return [s for s, _ in got], [fd for _, fd in got]
        for _, fd in got:  # all or nothing: never sit on a partial set (deadlock between k>1 jobs)
            os.close(fd)
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise LeaseError(f"no {k} free GPU slot(s) of {n_slots} in {lock_dir} after {timeout}s")
        if not waited:
            LOG.info("waiting for %d free GPU slot(s) of %d (%s)", k, n_slots, lock_dir)
            waited = True
        time.sleep(poll * (0.5 + random.random()))  # jitter: waiting jobs do not poll in lockstep


@contextlib.contextmanager
def lease(k: int, lock_dir: str | os.PathLike | None = None, poll: float = 2.0, timeout: float | None = None):
    """In-process lease: yields the CUDA_VISIBLE_DEVICES value to use (None = leave as is)."""
    env, fds = plan(k, lock_dir, poll, timeout)
    try:
        yield env
    finally:
        for fd in fds:
            os.close(fd)


def cpu_allowed() -> bool:
    """``CDGMAE_ALLOW_CPU``: may a GPU job that finds no CUDA device run on the CPU."""
    return os.environ.get("CDGMAE_ALLOW_CPU", "").strip().lower() in ("1", "true", "yes")


def _no_device(k: int, why: str):
    """No CUDA device for a K > 0 job: the CPU where allowed, else an error."""
    if cpu_allowed():
        LOG.warning("asked for %d GPU(s) but %s: running on the CPU (CDGMAE_ALLOW_CPU=1)", k, why)
        return None, []
    raise LeaseError(
        f"asked for {k} GPU(s) but {why}: a GPU job does not run on the CPU unless allowed "
        "(config allow_cpu: true, i.e. CDGMAE_ALLOW_CPU=1)"
    )


def plan(k: int, lock_dir=None, poll: float = 2.0, timeout: float | None = None):
    """Decide the device set: (CUDA_VISIBLE_DEVICES value or None to keep the env, lock fds)."""
    if k < 0:
        raise LeaseError(f"--gpus must be >= 0, got {k}")
    if k == 0:
        return "", []
    preset = os.environ.get("CUDA_VISIBLE_DEVICES")
    slurm = os.environ.get("SLURM_JOB_ID")
    pool = None
    lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
    if preset is not None:
        pool = [d.strip() for d in preset.split(",") if d.strip()]
        if not pool:
            return _no_device(k, "CUDA_VISIBLE_DEVICES is empty")
        where = f"the Slurm allocation {slurm}'s" if slurm else "the preset"
        if len(pool) < k:
            raise LeaseError(f"asked for {k} GPUs but {where} CUDA_VISIBLE_DEVICES={preset!r} lists {len(pool)}")
        LOG.info("CUDA_VISIBLE_DEVICES=%r%s: leasing from that pool", preset, f" (Slurm job {slurm})" if slurm else "")
    if slurm:
        # the allocation's devices, shared by the jobs run inside it (snakemake run locally in an
        # salloc): locks of this allocation alone (another allocation's "0" is another device)
        lock_dir = lock_dir / f"slurm-{slurm}"
    n = len(pool) if pool is not None else count_gpus()
    if n == 0:
        return _no_device(k, "this node has no GPU")
    devices, fds = acquire(k, n, lock_dir, poll, timeout, names=pool)
    value = ",".join(map(str, devices))
    LOG.info("leased GPU slot(s) %s", value)
    return value, fds


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    else:
        command = []
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.lease",
        usage="python -m pipeline.lease --gpus K [options] -- COMMAND ...",
        description="Lease K GPU slots, set CUDA_VISIBLE_DEVICES, run COMMAND.",
    )
    ap.add_argument("--gpus", type=int, required=True, help="GPU slots the command needs (0 = CPU)")
    ap.add_argument(
        "--lock-dir", help="node-local lock directory (default: $CDGMAE_LOCK_DIR or /tmp/cdgmae-gpu-locks-<uid>)"
    )
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between tries while waiting")
    ap.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    args = ap.parse_args(argv)
    if not command:
        ap.error("no command given after --")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        value, fds = plan(args.gpus, args.lock_dir, args.poll, args.timeout)
    except LeaseError as err:
        LOG.error("%s", err)
        sys.exit(2)
    env = dict(os.environ)
    if value is not None:
        env["CUDA_VISIBLE_DEVICES"] = value
    env.pop("CDGMAE_REQUIRE_CUDA", None)
    if args.gpus > 0 and not cpu_allowed():  # the job checks it got them (pipeline.devices)
        env["CDGMAE_REQUIRE_CUDA"] = str(args.gpus)
    for fd in fds:  # the command inherits the locked descriptors: the lease lives as long as it
        os.set_inheritable(fd, True)
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)
    except OSError as err:
        LOG.error("cannot run %s: %s", command[0], err)
        sys.exit(127)


if __name__ == "__main__":
    main()
