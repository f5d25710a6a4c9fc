"""Benchmark a job's start: each command in its own interpreter (the straightforward baseline)
against the same command forked from the warm job server (``pipeline/job_server.py``).

One table: per command and mode, the median / min / max wall seconds of the whole command (process
start to exit, interleaved rounds so a change of load hits both alike), the job's CPU seconds and
peak resident memory (its own process in its own interpreter; the forked child's, as the server
reports it, with the pages it shares with the server), and the speed-up. Commands: a model
description (imports torch and timm, builds a ViT) and a small synthetic dataset (NumPy only).

    python -m bench.bench_job_start [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, measure_process, print_table
from pipeline import job_server

SYNTHETIC = '{"frames": 3, "height": 24, "max_objects": 2, "sequences": 1, "width": 32}'
USED = re.compile(r"used ([0-9.]+) s CPU, peak resident memory ([0-9.]+) MiB")


def commands(out: Path) -> dict[str, list[str]]:
    return {
        "pretrain describe (torch, timm)": ["pipeline.pretrain", "describe", "--arch", "vit_mini_patch8"],
        "data synthetic davis (NumPy)": [
            "pipeline.data",
            "synthetic",
            "--dataset",
            "davis",
            "--out",
            str(out),
            "--settings",
            SYNTHETIC,
            "--seed",
            "0",
            "--threads",
            "1",
        ],
    }


def run_once(args: list[str], env: dict) -> tuple[float, float, float]:
    """(wall s, job CPU s, job peak MiB) of ``python -m *args``."""
    m, status, stderr = measure_process([sys.executable, "-m", *args], env=env, cwd=ROOT)
    if status != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{stderr[-2000:]}")
    if env.get(job_server.SOCKET_ENV):
        served = USED.search(stderr)  # the forked job's own figures, as the server reports them
        if not served:
            raise RuntimeError(f"{' '.join(args)} was not served:\n{stderr[-2000:]}")
        return m.seconds, float(served.group(1)), float(served.group(2))
    return m.seconds, m.cpu_seconds, m.peak_mib


MODES = ("own interpreter", "job server")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = {**os.environ, **dict.fromkeys(job_server.THREAD_ENV, "1")}
        t0 = time.perf_counter()
        running = job_server.start(Path(tmp) / "server.log", env=base)
        if not running.socket:
            raise SystemExit((Path(tmp) / "server.log").read_text())
        envs = dict(zip(MODES, (base, {**base, job_server.SOCKET_ENV: running.socket})))
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        try:
            # untimed: the first served job waits for the server's imports
            run_once(next(iter(commands(Path(tmp) / "warm-up").values())), envs["job server"])
            print(f"server ready {time.perf_counter() - t0:.1f} s after its start (one served job done)")
            for r in range(args.repeats):  # the modes take turns: a change of load hits both
                for mode in MODES:
                    for name, cmd in commands(Path(tmp) / f"{MODES.index(mode)}-{r}").items():
                        results.setdefault((name, mode), []).append(run_once(cmd, envs[mode]))
        finally:
            job_server.stop(running)
    rows = []
    for name in commands(Path()):
        own = statistics.median(w for w, _, _ in results[(name, MODES[0])])
        for mode in MODES:
            runs = results[(name, mode)]
            walls = [w for w, _, _ in runs]
            rows.append(
                [
                    name,
                    mode,
                    f"{statistics.median(walls):.2f}",
                    f"{min(walls):.2f}",
                    f"{max(walls):.2f}",
                    f"{statistics.median(c for _, c, _ in runs):.2f}",
                    f"{max(m for _, _, m in runs):.0f}",
                    f"{own / statistics.median(walls):.1f}x",
                ]
            )
    header = ["command", "mode", "median s", "min s", "max s", "job CPU s", "job peak MiB", "speed-up"]
    print_table(header, rows)


if __name__ == "__main__":
    main()
