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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.repeats < 2:
        ap.error("--repeats must be at least 2 (the first served run waits for the server's imports)")
    with tempfile.TemporaryDirectory() as tmp:
        base = {**os.environ, **dict.fromkeys(job_server.THREAD_ENV, "1")}
        t0 = time.perf_counter()
        running = job_server.start(Path(tmp) / "server.log", env=base)
        if not running.socket:
            raise SystemExit((Path(tmp) / "server.log").read_text())
        served_env = {**base, job_server.SOCKET_ENV: running.socket}
        try:
            rows = []
            for i, (name, cmd) in enumerate(commands(Path(tmp) / "synthetic").items()):
                results = {"own interpreter": [], "job server": []}
                for r in range(args.repeats):
                    for mode, env in (("own interpreter", base), ("job server", served_env)):
                        out_args = [
                            a.replace("synthetic", f"synthetic-{i}-{r}-{mode[0]}") if "/" in a else a for a in cmd
                        ]
                        results[mode].append(run_once(out_args, env))
                        if len(rows) == 0 and r == 0 and mode == "job server":
                            print(f"server ready (first served job done) {time.perf_counter() - t0:.1f} s after start")
                medians = {}
                for mode, runs in results.items():
                    # the first served run waited for the server's imports: reported apart, not in the median
                    timed = runs[1:] if mode == "job server" and i == 0 else runs
                    walls = [w for w, _, _ in timed]
                    medians[mode] = statistics.median(walls)
                    rows.append(
                        [
                            name,
                            mode,
                            f"{medians[mode]:.2f}",
                            f"{min(walls):.2f}",
                            f"{max(walls):.2f}",
                            f"{statistics.median(c for _, c, _ in timed):.2f}",
                            f"{max(m for _, _, m in timed):.0f}",
                            f"{medians['own interpreter'] / medians[mode]:.1f}x",
                        ]
                    )
        finally:
            job_server.stop(running)
        header = ["command", "mode", "median s", "min s", "max s", "job CPU s", "job peak MiB", "speed-up"]
        print_table(header, rows)


if __name__ == "__main__":
    main()
