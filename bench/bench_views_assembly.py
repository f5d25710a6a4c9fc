"""Peak memory of view-shard assembly and of the ``copy`` merge: streamed vs all rows in memory.

    OMP_NUM_THREADS=1 python -m bench.bench_views_assembly [--rows 400 --scale 10 --part-size 128 --size 256]

Synthetic parts in the views stage's layout (1 real image + 4 views per row, JPEG q95 stills of
``--size`` px from ``pipeline.data.synthetic``, a pool of 64 distinct stills reused row after
row, each part written with its digest), for a shard of ``--rows`` rows and one ``--scale`` times
larger. For each size, each operation runs in a fresh subprocess; its peak memory is the peak
RSS during the call above the RSS just before it (``bench.common.measure``):

- assembly, streamed: ``store.plan_rows`` + ``store.write_shard`` (what ``ShardWriter.assemble``
  runs); baseline: ``read_rows`` of every part, then ``write_rows`` (the code before streaming);
- merge of two half shards into ``bag.h5``, streamed: ``merge.merge_shards(mode="copy")``, which
  also verifies both shards' digests; baseline: ``read_rows`` + ``write_rows`` of the shards.

Prints rows, JPEG MiB, seconds, MiB/s, peak MiB and the peak's ratio to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from bench.common import measure, print_table
from pipeline.data.synthetic import _imagenet_still
from pipeline.io import atomic_path
from pipeline.views.hdf5 import encode_jpeg, read_rows, write_rejects, write_rows
from pipeline.views.merge import merge_shards
from pipeline.views.store import plan_rows, write_shard

N_VIEWS = 4
POOL = 64  # distinct stills; rows reuse them (the file still holds every row's own copy)
FP = "0123456789abcdef"


def build_parts(folder: Path, rows: int, part_size: int, size: int) -> list[tuple[int, int]]:
    """Part files of ``rows`` rows in ``folder``; returns their global ranges."""
    rng = np.random.default_rng(0)
    pool = [encode_jpeg(_imagenet_still(rng, size, k % 8, 0), 95) for k in range(POOL)]
    ranges = [(lo, min(lo + part_size, rows)) for lo in range(0, rows, part_size)]
    for lo, hi in ranges:
        n = hi - lo
        real = [pool[i % POOL] for i in range(lo, hi)]
        views = [[pool[(i * 5 + m + 1) % POOL] for m in range(N_VIEWS)] for i in range(lo, hi)]
        ids = [f"c/{i:07d}" for i in range(lo, hi)]
        with atomic_path(folder / f"part-{FP}-{lo:010d}-{hi:010d}.h5", digest=True) as tmp:
            with h5py.File(tmp, "w") as f:
                write_rows(f, real, views, ids, list(range(lo, hi)), [[0] * N_VIEWS] * n, N_VIEWS)
                write_rejects(f, [])
                f.attrs.update(sampler=json.dumps({"bench": True}), complete=True)
    return ranges


def part_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"part-{FP}-*.h5"))


def shard_attrs(k: int, shards: int, lo: int, hi: int, total: int) -> dict:
    """What ``merge.validate_shard`` checks and ``merge_shards`` copies onto the bag."""
    return dict(
        generator="bench",
        settings="{}",
        is_baseline=True,
        n_views=N_VIEWS,
        jpeg_quality=95,
        image_size=0,
        fingerprint=FP,
        format_version=1,
        expected_rows=hi - lo,
        n_rejects=0,
        index_start=lo,
        index_end=hi,
        n_images_total=total,
        shard=k,
        shards=shards,
        samplers="[]",
    )


def assemble(folder: Path, out: Path, lo: int, hi: int, total: int, k: int = 0, shards: int = 1) -> None:
    """The streamed assembly of the parts in [lo, hi) into one shard file."""
    ranges, sources = [], []
    for p in part_files(folder):
        a, b = (int(x) for x in p.stem.split("-")[2:4])
        if lo <= a and b <= hi:
            ranges.append((a, b))
            sources.append(p)
    plan, rejects, _ = plan_rows(ranges, sources)
    write_shard(out, plan, rejects, shard_attrs(k, shards, lo, hi, total), N_VIEWS)


def in_memory(sources: list[Path], out: Path) -> None:
    """The baseline: every row of ``sources`` read into memory, then written."""
    with h5py.File(out, "w") as f:
        write_rows(f, **read_rows(sources), M=N_VIEWS)


def measure_op(op: str, folder: Path, rows: int) -> dict:
    """Run ``op`` once in this process; return seconds and peak MiB above the RSS before it."""
    shards = [folder / "shard-0.h5", folder / "shard-1.h5"]
    actions = {
        "assembly/streamed": lambda: assemble(folder, folder / "out.h5", 0, rows, rows),
        "assembly/in-memory": lambda: in_memory(part_files(folder), folder / "out.h5"),
        "merge copy/streamed": lambda: merge_shards(shards, folder / "out.h5", mode="copy"),
        "merge copy/in-memory": lambda: in_memory(shards, folder / "out.h5"),
    }
    with measure() as m:
        actions[op]()
    (folder / "out.h5").unlink()
    return {"seconds": m.seconds, "peak_mib": m.peak_mib}


def run_size(rows: int, part_size: int, size: int) -> list[dict]:
    """Build one size's parts and shards, then measure each operation in a fresh subprocess."""
    with tempfile.TemporaryDirectory(prefix="bench-assembly-") as tmp:
        folder = Path(tmp)
        build_parts(folder, rows, part_size, size)
        half = -(-len(part_files(folder)) // 2) * part_size
        for k, (lo, hi) in enumerate([(0, half), (half, rows)]):
            assemble(folder, folder / f"shard-{k}.h5", lo, hi, rows, k, 2)
        mib = sum(p.stat().st_size for p in part_files(folder)) / 2**20
        out = []
        for op in ("assembly/in-memory", "assembly/streamed", "merge copy/in-memory", "merge copy/streamed"):
            cmd = [sys.executable, "-m", "bench.bench_views_assembly", "--measure", op, "--dir", tmp]
            res = subprocess.run([*cmd, "--rows", str(rows)], check=True, capture_output=True, text=True)
            out.append({"op": op, "rows": rows, "mib": mib, **json.loads(res.stdout.splitlines()[-1])})
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400, help="rows of the smaller shard")
    ap.add_argument("--scale", type=int, default=10, help="the larger shard has rows x scale rows")
    ap.add_argument("--part-size", type=int, default=128)
    ap.add_argument("--size", type=int, default=256, help="px of the synthetic stills")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_op(args.measure, Path(args.dir), args.rows)))
        return
    results = [r for n in (args.rows, args.rows * args.scale) for r in run_size(n, args.part_size, args.size)]
    base = {(r["op"].split("/")[0], r["rows"]): r["peak_mib"] for r in results if r["op"].endswith("in-memory")}
    rows = []
    for r in results:
        ratio = r["peak_mib"] / base[(r["op"].split("/")[0], r["rows"])]
        rows.append(
            [r["op"], r["rows"], f"{r['mib']:.0f}", f"{r['seconds']:.2f}", f"{r['mib'] / r['seconds']:.0f}"]
            + [f"{r['peak_mib']:.0f}", f"{ratio:.2f}"]
        )
    print_table(["operation", "rows", "JPEG MiB", "s", "MiB/s", "peak MiB", "peak vs in-memory"], rows)


if __name__ == "__main__":
    main()
