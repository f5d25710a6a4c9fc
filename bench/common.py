"""What every benchmark measures with: wall and CPU time, peak memory, interleaved repeated timings,
and the printed table.

Peak memory has one definition per device. CUDA: torch's peak allocated (and reserved) bytes during
the block, above what was allocated before it (the counters are reset on entry). CPU (Linux): the
peak resident set during the block above the resident set before it; glibc's freed memory is handed
back first (``malloc_trim``) and the kernel's high-water mark reset (``5 > /proc/self/clear_refs``),
so ``VmHWM`` is this block's peak. ``process_peak_mib`` is the same high-water mark unreset: the
peak of the whole process so far. A child process (``measure_process``): the kernel's figures for
that process at its exit (``os.wait4``).
"""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.support import ROOT

__all__ = [
    "ROOT",
    "Measurement",
    "interleaved_seconds",
    "measure",
    "measure_process",
    "print_table",
    "print_table_header",
    "print_table_row",
    "process_peak_mib",
    "sync",
]


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (kB) in MiB; NaN where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def process_peak_mib() -> float:
    """The process's peak resident set so far (MiB)."""
    return _status_mib("VmHWM")


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def sync(device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing on the CPU."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize()


@dataclass
class Measurement:
    """What ``measure`` found: seconds of wall and CPU (this process) time, peak MiB above the start
    (CUDA: allocated; CPU: resident set) and, on CUDA, peak MiB reserved by torch's allocator."""

    seconds: float = float("nan")
    cpu_seconds: float = float("nan")
    peak_mib: float = float("nan")
    reserved_mib: float = float("nan")


@contextmanager
def measure(device="cpu", total: bool = False) -> Iterator[Measurement]:
    """Time and peak memory of the ``with`` block (filled in when it ends). With ``total`` (CUDA),
    the peaks include what was allocated before the block (the weights: what must fit on the GPU)."""
    m = Measurement()
    sync(device)
    gc.collect()
    if _is_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats()
        before = 0 if total else torch.cuda.memory_allocated()
        before_reserved = 0 if total else torch.cuda.memory_reserved()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        before = _status_mib("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    yield m
    sync(device)
    m.seconds, m.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if _is_cuda(device):
        m.peak_mib = max(torch.cuda.max_memory_allocated() - before, 0) / 2**20
        m.reserved_mib = max(torch.cuda.max_memory_reserved() - before_reserved, 0) / 2**20
    else:
        m.peak_mib = max(_status_mib("VmHWM") - before, 0.0)


def measure_process(cmd: list[str], **popen_kwargs) -> tuple[Measurement, int, str]:
    """Run ``cmd`` to its end: (its wall seconds, CPU seconds and peak resident set in MiB — of
    that process alone, ``os.wait4``'s figures —, its exit status, its stderr)."""
    m = Measurement()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen_kwargs)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    m.seconds = time.perf_counter() - t0
    m.cpu_seconds, m.peak_mib = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
    proc.returncode = os.waitstatus_to_exitcode(status)
    return m, proc.returncode, stderr


def interleaved_seconds(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    device="cpu",
) -> dict[str, list[float]]:
    """Seconds of ``clock`` of each of ``repeats`` calls of each function (the device synchronised
    around each call); the functions take turns in every round, so a change of the machine's load
    hits all alike. Callers report the best (``min``) or the ``statistics.median``."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = clock()
            fn()
            sync(device)
            seconds[name].append(clock() - t)
    return seconds


def print_table_header(header: list[str]) -> None:
    """A markdown table's header; its rows follow with ``print_table_row`` (flushed: a long
    benchmark shows each row as it is measured)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)


def print_table_row(row: list) -> None:
    print("| " + " | ".join(str(c) for c in row) + " |", flush=True)


def print_table(header: list[str], rows: list[list]) -> None:
    """A markdown table: one row per list, cells already formatted (or printed with ``str``)."""
    print_table_header(header)
    for row in rows:
        print_table_row(row)
