"""The warm job server (``pipeline/job_server.py``): a served command prints, writes and exits as
the command run in its own interpreter, reads our code from its own ``sys.path``, gets the signals
its client gets, holds the GPU lease it was given, dies with its client, and is declined wherever
the fork could differ from a fresh interpreter. (That a served tiny run's bag, checkpoints and
metrics are byte-identical to those of jobs in their own interpreters: tests/workflow/test_slurm.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import job_server, lease
from pipeline.job_server import SERVED_NOTE
from tests.support import HANG_GUARD_S, ROOT, wait_until

# a module the server runs for the signal tests: says its pid, notes SIGUSR1, runs until killed
SLEEPER = """
import os, signal, sys, time
from pathlib import Path

out = Path(sys.argv[1])
signal.signal(signal.SIGUSR1, lambda *_: (out / "usr1").write_text("got it"))
(out / "pid.tmp").write_text(str(os.getpid()))
(out / "pid.tmp").rename(out / "pid")  # whole, or not yet there
while True:
    time.sleep(0.05)
"""
# a client as pipeline.cli.main is one, for the sleeper
CLIENT = "from pipeline import job_server; import sys; job_server.delegate('sleeper', sys.argv[1:]); sys.exit(99)"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job_server")
    (folder / "modules").mkdir()
    (folder / "modules" / "sleeper.py").write_text(SLEEPER)
    base = dict(os.environ)
    base.pop("PYTEST_CURRENT_TEST", None)  # pytest changes it per test
    running = job_server.start(folder / "server.log", env=base)
    assert running.socket, (folder / "server.log").read_text()
    env = {**base, **dict.fromkeys(job_server.THREAD_ENV, "1"), job_server.SOCKET_ENV: running.socket}
    env["PYTHONPATH"] = os.pathsep.join([str(folder / "modules"), str(ROOT)])
    yield SimpleNamespace(env=env, folder=folder, log=folder / "server.log")
    job_server.stop(running)
    assert not Path(running.socket).exists()


def run(cmd: list[str], env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD_S)


def fresh(env: dict) -> dict:
    return {k: v for k, v in env.items() if k != job_server.SOCKET_ENV}


def test_a_served_command_writes_what_it_writes_in_its_own_interpreter(server, tmp_path):
    outputs = {}
    for name, env in (("alone", fresh(server.env)), ("served", server.env)):
        out = tmp_path / name
        settings = '{"frames": 3, "height": 24, "max_objects": 2, "sequences": 1, "width": 32}'
        cmd = [sys.executable, "-m", "pipeline.data", "synthetic", "--dataset", "davis", "--out", str(out)]
        done = run([*cmd, "--settings", settings, "--seed", "0", "--threads", "1"], env)
        assert done.returncode == 0, done.stderr
        assert (SERVED_NOTE in done.stderr) == (name == "served")
        outputs[name] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert len(outputs["served"]) > 3 and outputs["served"] == outputs["alone"]


def test_a_served_command_fails_as_it_does_in_its_own_interpreter(server):
    cmd = [sys.executable, "-m", "pipeline.data", "vallist", "--kind", "davis"]
    alone, served = run(cmd, fresh(server.env)), run(cmd, server.env)
    assert SERVED_NOTE in served.stderr and SERVED_NOTE not in alone.stderr
    assert served.returncode == alone.returncode == 2  # argparse's error, printed as it prints it
    assert served.stdout == alone.stdout
    own = [line for line in served.stderr.splitlines() if not line.startswith("cdgmae.job_server")]
    assert own == alone.stderr.splitlines()


def test_the_job_reads_our_code_from_its_own_path_not_the_servers(server, tmp_path):
    """The server never keeps our modules: an edited copy on the job's PYTHONPATH is what runs."""
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline")
    cli = tmp_path / "pipeline" / "cli.py"
    cli.write_text(cli.read_text().replace("parameter counts of an arch", "EDITED parameter counts of an arch"))
    env = {**server.env, "PYTHONPATH": str(tmp_path)}
    served = run([sys.executable, "-m", "pipeline.pretrain", "--help"], env, cwd=tmp_path)
    assert SERVED_NOTE in served.stderr and "EDITED parameter counts" in served.stdout


@pytest.mark.parametrize(
    "variable, value",
    [("MPLBACKEND", "agg"), ("OMP_NUM_THREADS", "2"), ("SLURM_JOB_ID", "12345"), ("PYTHONHASHSEED", "7")],
)
def test_a_job_whose_environment_could_change_an_import_runs_in_its_own_interpreter(server, variable, value):
    served = run([sys.executable, "-m", "pipeline.pretrain", "--help"], {**server.env, variable: value})
    assert served.returncode == 0 and "describe" in served.stdout
    assert f"not served (environment variable {variable} differs from the server's)" in served.stderr
    assert SERVED_NOTE not in served.stderr


def test_a_job_that_would_import_another_library_or_interpreter_is_declined(tmp_path):
    import torch  # noqa: PLC0415

    preloaded = {"torch": torch.__spec__.origin}
    request = {
        "interpreter": job_server.interpreter(),
        "env": dict(os.environ),
        "sys_path": list(sys.path),
        "cwd": os.getcwd(),
    }
    assert job_server._declined(request, dict(os.environ), preloaded) is None
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    shadowed = {**request, "sys_path": [str(tmp_path), *sys.path]}
    assert job_server._declined(shadowed, dict(os.environ), preloaded) == "its sys.path finds another torch"
    other = {**request, "interpreter": {**job_server.interpreter(), "prefix": "/opt/conda/envs/other"}}
    assert job_server._declined(other, dict(os.environ), preloaded) == "another Python interpreter"


@pytest.fixture
def sleeper(server, tmp_path):
    """Start a served sleeper under a prefix (e.g. the lease): returns (client, the job's pid). Any
    client still running at the end is killed, and with it its job."""
    clients = []

    def start(*prefix: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
        out = tmp_path / "out"
        out.mkdir()
        cmd = [*prefix, sys.executable, "-c", CLIENT, str(out)]
        client = subprocess.Popen(cmd, env=env or server.env, stderr=subprocess.PIPE, text=True)
        clients.append(client)
        assert wait_until(lambda: (out / "pid").exists() or client.poll() is not None)
        assert client.poll() is None, client.stderr.read()
        pid = int((out / "pid").read_text())
        assert pid != client.pid
        return client, pid

    yield start
    for client in clients:
        client.kill()
        client.wait()


def gone(pid: int) -> bool:
    """The job has ended and the server has reaped it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_signals_reach_the_job_and_its_status_is_the_clients(sleeper, tmp_path):
    client, pid = sleeper()
    client.send_signal(signal.SIGUSR1)  # Slurm's warning before the time limit
    assert wait_until(lambda: (tmp_path / "out" / "usr1").exists())
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=HANG_GUARD_S) == -signal.SIGTERM  # ended as the job ended
    assert wait_until(lambda: gone(pid))


def test_a_killed_client_takes_its_job_and_its_gpu_lease_with_it(server, sleeper, tmp_path):
    """SIGKILL of the command (Snakemake's kill, a node's OOM killer) ends the forked job, and the
    lease's lock, which the job held while it ran, is free again."""
    locks = tmp_path / "locks"
    env = {**server.env, "CDGMAE_NUM_GPUS": "1"}
    prefix = (sys.executable, "-m", "pipeline.lease", "--gpus", "1", "--lock-dir", str(locks), "--")
    client, pid = sleeper(*prefix, env=env)
    with pytest.raises(lease.LeaseError):  # the served job holds the only slot
        lease.acquire(1, 1, locks, timeout=0)
    client.kill()
    client.wait(timeout=HANG_GUARD_S)
    assert wait_until(lambda: gone(pid))
    _, fds = lease.acquire(1, 1, locks, timeout=0)
    for fd in fds:
        os.close(fd)


def test_without_a_reachable_server_the_command_runs_itself(tmp_path):
    env = {**os.environ, job_server.SOCKET_ENV: str(tmp_path / "no-such-socket")}
    alone = run([sys.executable, "-m", "pipeline.pretrain", "--help"], env)
    assert alone.returncode == 0 and "describe" in alone.stdout
    assert "not reachable" in alone.stderr and "running in this process" in alone.stderr
