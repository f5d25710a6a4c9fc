"""Warm job server: local jobs start as forks of an interpreter that has already imported torch.

Every job of a local run is a fresh ``python -m pipeline.<stage> <command>`` that spends 5-10 s
importing torch, torchvision (which imports ``torch._dynamo``) and timm before doing a second of
work at demo sizes. While a local run lasts (``job_server: true``; the workflow's ``onstart`` /
``onsuccess`` / ``onerror``), one server process imports those libraries once and forks a child
per command; the command's own process (``pipeline.cli.main``, a stdlib-only client) hands its
module, arguments, working directory, environment, ``sys.path`` and open descriptors (stdin,
stdout, stderr, the GPU lease's lock files) to the server, forwards the signals it gets to the
child's process group and exits with the child's status. The child then runs exactly what the
command would have run (``runpy`` of ``pipeline.<stage>`` as ``__main__``), importing every
``pipeline`` module afresh from the command's ``sys.path``: the server never keeps our own code, so
what a job computes follows the files on disk as it does without the server.

A request is served only where the fork is the same process the command would have been, else
the command runs itself as before (and says why in its log):

- the same interpreter (executable, prefix, version), so a ``--sdm conda`` job runs in its own;
- the same environment except what is read after import (``JOB_ENV``): CUDA device lists (the
  server never initialises CUDA), the lease's variables, temporary folders and ``PYTHONPATH`` (the
  client's ``sys.path`` is used, and every preloaded library must be the one it would import).
  This includes ``SLURM_JOB_ID``: a job of another allocation (a cluster executor's) is never
  forked outside its own cgroup. The server runs with one thread per library (``THREAD_ENV`` = 1,
  as Snakemake sets them for a ``threads: 1`` job), so it forks no thread pool; a job given more
  threads runs in its own interpreter.

The child ends as the interpreter would, less the teardown of the preloaded modules: non-daemon
threads are joined, exit handlers run, the streams are flushed.

Only local runs start a server; a fork's CPU time and memory are not in the client's process
tree, so Snakemake's ``benchmark:`` files of a served job hold the wall time only (the server
writes each child's CPU seconds and peak memory into the job's log). ``job_server: false`` gives
every job its own interpreter.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import dataclasses
import importlib
import importlib.machinery
import io
import json
import logging
import os
import runpy
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

LOG = logging.getLogger("cdgmae.job_server")

SOCKET_ENV = "CDGMAE_JOB_SERVER"  # the server's socket path, in the environment of the run's jobs
SERVED_NOTE = "forked from the run's job server"  # in a served job's log
# imported once by the server (third-party only: our own modules are imported by each child)
PRELOAD = ("numpy", "pandas", "h5py", "torch", "torchvision", "timm", "matplotlib.pyplot")
# thread counts Snakemake sets per job (its shell.py), read when the libraries load: the server's are 1
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
# variables a job may have that the server lacks or has otherwise: read after import, or applied
JOB_ENV = frozenset(
    (
        SOCKET_ENV,
        "CUDA_VISIBLE_DEVICES",
        "CDGMAE_REQUIRE_CUDA",
        "CDGMAE_ALLOW_CPU",
        "CDGMAE_NUM_GPUS",
        "CDGMAE_LOCK_DIR",
        "PYTHONPATH",
        "TMPDIR",
        "TMP",
        "TEMP",
        "TEMPDIR",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
    )
)
# signals the client passes on to the child's process group (SIGUSR1: Slurm's time-limit warning)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
MAX_FDS = 64
STOP_WAIT_S = 30  # for a server to unlink its socket once told to stop (a moment)
REPLY_TIMEOUT_S = 300  # a server that has not answered by then is stuck: run the command here
PR_SET_PDEATHSIG = 1


def interpreter() -> dict:
    return {"executable": os.path.realpath(sys.executable), "prefix": sys.prefix, "version": sys.version}


# ---------------------------------------------------------------------------------------------
# the client: the command's own process


def _send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def _read_line(sock: socket.socket, buf: bytes = b"") -> dict | None:
    """One JSON line (continuing ``buf``, what was already received of it), None at end of stream."""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    return json.loads(buf)


def _open_fds() -> list[int]:
    """stdin, stdout, stderr and every other inheritable descriptor (the GPU lease's locks)."""
    extra = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                if os.get_inheritable(fd):
                    extra.append(fd)
    return [0, 1, 2, *sorted(extra)]


def delegate(module: str, argv: list[str]) -> None:
    """Run ``python -m <module> *argv`` in the run's job server when there is one that may run it:
    exits with the child's status. Returns (having started nothing) when there is none, it is not
    reachable or it declines; the caller then runs the command itself."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REPLY_TIMEOUT_S)  # the server answers once it has loaded its libraries
    try:
        sock.connect(path)
        fds = _open_fds()
        request = {
            "module": module,
            "argv": [sys.argv[0], *argv],
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "sys_path": list(sys.path),
            "interpreter": interpreter(),
            "fds": len(fds),
        }
        _send(sock, request, fds)
        reply = _read_line(sock)
    except OSError as err:
        print(f"cdgmae.job_server: {path} not reachable ({err}); running in this process", file=sys.stderr)
        sock.close()
        return
    if reply is None or "pid" not in reply:
        why = reply.get("declined", "no reason given") if reply else "the server closed the connection"
        print(f"cdgmae.job_server: not served ({why}); running in this process", file=sys.stderr)
        sock.close()
        return
    sock.settimeout(None)  # as long as the job runs
    _wait_for_child(sock, reply["pid"])


def _wait_for_child(sock: socket.socket, pid: int) -> None:
    print(f"cdgmae.job_server: running as pid {pid}, {SERVED_NOTE}", file=sys.stderr, flush=True)

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    status = _read_line(sock)
    if status is None:
        print("cdgmae.job_server: the job server ended before the job; the job was stopped", file=sys.stderr)
        raise SystemExit(1)
    print(
        f"cdgmae.job_server: pid {pid} used {status['cpu_s']:.1f} s CPU, peak resident memory {status['max_rss_mib']:.0f} MiB (pages shared with the server included)",
        file=sys.stderr,
        flush=True,
    )
    if status.get("signal"):
        for signum in FORWARDED:
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), status["signal"])  # end as the job did, so the shell reports 128 + N
    raise SystemExit(status["exit"])


# ---------------------------------------------------------------------------------------------
# the server


class _BecomeJob(BaseException):
    """Raised in a fresh child to leave the server's loop and run the request at the top level."""

    def __init__(self, request: dict):
        self.request = request


def _declined(request: dict, server_env: dict, preloaded: dict[str, str]) -> str | None:
    """Why the fork would not be the process the command would have been, else None."""
    if request.get("interpreter") != interpreter():
        return "another Python interpreter"
    env = request["env"]
    for key in sorted((set(env) | set(server_env)) - JOB_ENV):
        if env.get(key) != server_env.get(key):
            return f"environment variable {key} differs from the server's"
    sys_path = [entry or request["cwd"] for entry in request["sys_path"]]
    for name, origin in preloaded.items():
        spec = importlib.machinery.PathFinder.find_spec(name, sys_path)
        if spec is None or spec.origin != origin:
            return f"its sys.path finds another {name}"
    return None


def _listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def _preload() -> dict[str, str]:
    """Import ``PRELOAD``; the top-level packages' origins (a request must find the same ones)."""
    for name in PRELOAD:
        importlib.import_module(name)
    import torch  # noqa: PLC0415  (just imported above)

    if torch.cuda.is_initialized():  # a forked child could not use CUDA
        raise RuntimeError("CUDA was initialised while preloading")
    tops = dict.fromkeys(name.split(".")[0] for name in PRELOAD)
    return {name: sys.modules[name].__spec__.origin for name in tops}


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


class Server:
    def __init__(self, path: str, parent: int | None):
        self.path, self.parent, self.pid = path, parent, os.getpid()
        self.env = dict(os.environ)
        self.children: dict[int, socket.socket | None] = {}  # pid -> its client's connection
        self.stopping = False

    def serve(self) -> None:
        listener = _listener(self.path)  # bound first: clients queue while the libraries load
        wake_r, self.wake_w = socket.socketpair()
        self.wake_w.setblocking(False)
        try:
            started = time.monotonic()
            preloaded = _preload()
            LOG.info("preloaded %s in %.1f s", ", ".join(PRELOAD), time.monotonic() - started)
            if _threads() != 1:  # forking a multi-threaded process is unsafe: serve nothing
                raise RuntimeError(f"{_threads()} threads after preloading; not forking")
            signal.set_wakeup_fd(self.wake_w.fileno())
            signal.signal(signal.SIGCHLD, lambda *_: None)
            signal.signal(signal.SIGTERM, self._stop)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the client forwards what its job gets
            with selectors.DefaultSelector() as sel:
                sel.register(listener, selectors.EVENT_READ, "accept")
                sel.register(wake_r, selectors.EVENT_READ, "wake")
                self._loop(sel, listener, wake_r, preloaded)
        finally:
            if os.getpid() == self.pid:
                listener.close()
                self.wake_w.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def _stop(self, *_):
        self.stopping = True

    def _loop(self, sel, listener, wake_r, preloaded) -> None:
        while True:
            if self.parent is not None and os.getppid() != self.parent:
                self.stopping = True  # the run is gone: finish the jobs running, take no more
            if self.stopping and listener.fileno() != -1:
                sel.unregister(listener)
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                if self.children:
                    LOG.info("stopping: serving %d running job(s) to their end", len(self.children))
            if self.stopping and not self.children:
                return
            for key, _ in sel.select(timeout=1.0):
                if key.data == "accept":
                    self._accept(sel, listener, preloaded)
                elif key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(4096)
                else:
                    self._client_event(sel, key.fileobj, key.data)
            self._reap(sel)

    def _accept(self, sel, listener, preloaded) -> None:
        conn, _ = listener.accept()
        fds: list[int] = []
        try:
            conn.settimeout(30)
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, MAX_FDS)
            request = _read_line(conn, data)
            if request is None:
                raise OSError("request cut short")
            if len(fds) != request["fds"]:
                raise OSError(f"{len(fds)} descriptors received, {request['fds']} sent")
            why = _declined(request, self.env, preloaded)
            if why:
                _send(conn, {"declined": why})
                raise OSError(why)
        except (OSError, ValueError, KeyError) as err:
            LOG.info("declined a request: %s", err)
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            self._in_child(sel, conn, fds, request)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        sel.register(conn, selectors.EVENT_READ, pid)
        _send(conn, {"pid": pid})
        LOG.info("pid %d: %s %s", pid, request["module"], " ".join(request["argv"][1:])[:160])

    def _in_child(self, sel, conn, fds, request):
        # leave every server resource; the job is run by main() once the stack has unwound
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        self.wake_w.close()
        for other in self.children.values():
            if other is not None:
                other.close()
        conn.close()
        os.setpgid(0, 0)  # its own group: the client's forwarded signals reach its workers too
        with contextlib.suppress(OSError, AttributeError):  # die with the server (Linux)
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.pid:
            os._exit(1)
        for target, fd in zip((0, 1, 2), fds[:3]):
            os.dup2(fd, target)
        for fd in fds[:3]:
            if fd > 2:
                os.close(fd)
        raise _BecomeJob(request)

    def _client_event(self, sel, conn, pid) -> None:
        with contextlib.suppress(OSError):
            if conn.recv(1):
                return
        # the client is gone (killed): so must its job be
        sel.unregister(conn)
        conn.close()
        self.children[pid] = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def _reap(self, sel) -> None:
        while self.children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            message = {
                "exit": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1,
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "max_rss_mib": usage.ru_maxrss / 1024,
            }
            with contextlib.suppress(OSError):
                _send(conn, message)
            sel.unregister(conn)
            conn.close()


def _run_job(request: dict) -> None:
    """In the forked child: become ``python -m <module> *argv`` as the client would have been."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(SOCKET_ENV, None)  # the command runs here; its own subprocesses start fresh
    tempfile.tempdir = None  # recomputed from this job's TMPDIR
    sys.path[:] = request["sys_path"]
    for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
        del sys.modules[name]  # our code is imported from the job's sys.path, as it is on disk now
    importlib.invalidate_caches()
    unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False), errors="strict")
    sys.stdout = _text_stream(1, unbuffered, "strict")
    sys.stderr = _text_stream(2, unbuffered, "backslashreplace", line_buffering=True)
    sys.argv = list(request["argv"])
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = _exit_code(done.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT  # Python ends by SIGINT on an uncaught KeyboardInterrupt
    except BaseException:  # noqa: BLE001  (reported as the interpreter reports it)
        traceback.print_exc()
        code = 1
    _exit(code)


def _exit_code(code) -> int:
    """The status ``sys.exit(code)`` gives (a message is printed, as the interpreter prints it)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _exit(code: int) -> None:
    """End the job as the interpreter would, less the teardown of the preloaded modules (2-3 s of
    freeing torch's objects, which would also copy the server's shared pages): the exit handlers
    run (logging, ``weakref.finalize``, multiprocessing's workers) after the threads still running
    end, the streams are flushed."""
    threading._shutdown()  # what the interpreter does first at exit: join non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _text_stream(fd: int, unbuffered: bool, errors: str, line_buffering: bool = False) -> io.TextIOWrapper:
    """A standard stream on ``fd`` buffered as Python buffers its own: line by line on a terminal
    (stderr always), written through under ``PYTHONUNBUFFERED``."""
    buffered = open(fd, "wb", closefd=False)
    line_buffering = line_buffering or os.isatty(fd)
    return io.TextIOWrapper(buffered, errors=errors, line_buffering=line_buffering, write_through=unbuffered)


# ---------------------------------------------------------------------------------------------
# starting and stopping (the workflow's onstart / onsuccess / onerror)


@dataclasses.dataclass
class Running:
    """A started server: its process, socket (None if it never bound one) and socket folder."""

    proc: subprocess.Popen
    socket: str | None
    folder: str


def start(log_path: str | os.PathLike, env: dict[str, str] | None = None) -> Running:
    """Start a server for this process's jobs, logging to ``log_path``. Its environment is ``env``
    (default: this process's) with one thread per library (``THREAD_ENV``); jobs reach it through
    ``SOCKET_ENV``, which the caller sets (the workflow sets it in Snakemake's own environment,
    which shell jobs inherit)."""
    folder = tempfile.mkdtemp(prefix="cdgmae-jobs-")
    path = os.path.join(folder, "socket")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        cmd = [sys.executable, "-m", "pipeline.job_server", "--socket", path, "--parent", str(os.getpid())]
        env = {**(os.environ if env is None else env), **dict.fromkeys(THREAD_ENV, "1")}
        env.pop(SOCKET_ENV, None)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while not os.path.exists(path):  # bound before it imports anything: a moment
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            return Running(proc, None, folder)  # no server: jobs run as before
        time.sleep(0.05)
    return Running(proc, path, folder)


def stop(running: Running) -> None:
    """Take no more jobs and remove the socket. Jobs still running (their commands outlived the run,
    as a killed run's jobs do) are served to their end by the server, which then exits."""
    if running.proc.poll() is None:
        running.proc.terminate()
        deadline = time.monotonic() + STOP_WAIT_S
        while running.proc.poll() is None and running.socket and os.path.exists(running.socket):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    shutil.rmtree(running.folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.job_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="Unix socket path to listen on")
    ap.add_argument("--parent", type=int, help="stop taking jobs when this process is gone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        Server(args.socket, args.parent).serve()
    except _BecomeJob as job:
        logging.shutdown()
        logging.root.handlers.clear()  # the server's handler wrote to the server's log
        logging.root.setLevel(logging.WARNING)  # as in a fresh interpreter
        _run_job(job.request)
    logging.shutdown()
    os._exit(0)  # the server is done: skip freeing the preloaded modules (seconds)


if __name__ == "__main__":
    main()
