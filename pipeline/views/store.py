"""The row store of a generator's views: files keyed on global row ranges, not on shard numbers.

``results/views/<generator>/parts/`` holds, for every settings fingerprint ``fp``:

- ``part-<fp>-<lo>-<hi>.h5``: one part, the views of global source indices [lo, hi), with
  ``lo`` a multiple of ``part_size`` (``shard_range``): the unit ``generate`` commits;
- ``shard-<fp>-<lo>-<hi>.h5``: a hard link to a finished, verified shard covering [lo, hi).

Every file carries a recorded content digest (``pipeline.io``), its range and ``fingerprint`` as
attributes, the row datasets sorted by global index and the ``REJECT_KEYS`` datasets. So any
layout of shards finds the rows of a part in whatever file holds them: a new ``views.shards``
reuses the parts of unfinished shards and the rows of finished ones (their links survive
Snakemake deleting the old shard files before re-running). Once a shard is written and its
digest re-verified, it is linked and its parts are removed: a link costs no disk while its
shard exists (it is "live"), and an orphaned link (its shard deleted or replaced) is removed as
soon as live links of the new layout cover its rows. Nothing is removed before the files that
hold its rows instead are verified.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.config import load_settings, section_defaults
from pipeline.io import IntegrityError, atomic_path, digest_path, record_digest, verify_digest
from pipeline.views.hdf5 import (
    ROW_KEYS,
    ViewsError,
    copy_rows,
    create_row_datasets,
    read_rejects,
    verify_view_file,
    write_rejects,
)

LOG = logging.getLogger("cdgmae.views")

_NAME = re.compile(r"^(part|shard)-([0-9a-f]{16})-(\d{10})-(\d{10})\.h5$")


def shard_range(n_images: int, shard: int, shards: int, part_size: int) -> tuple[int, int]:
    """Global index range [start, end) of ``shard``: a contiguous run of whole parts.

    Parts tile the global index space in blocks of ``part_size`` and shards take contiguous runs of
    parts, so part (and batch) composition depends only on the global index, never on the shard
    count: a diffusion generator's float kernels can depend on the batch it runs in, so this keeps
    the stored bytes identical whatever ``views.shards`` is. Trailing shards may be empty when
    there are fewer parts than shards.
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for views.shards = {shards}")
    n_parts = -(-n_images // part_size)
    p0, p1 = shard * n_parts // shards, (shard + 1) * n_parts // shards
    return min(p0 * part_size, n_images), min(p1 * part_size, n_images)


def resolve_views_settings(settings_arg: str | None) -> dict:
    """The ``views`` section: ``--settings`` (partial) completed from the schema defaults."""
    return section_defaults("views", overrides=load_settings(settings_arg))


@dataclass(frozen=True)
class StoreFile:
    """One file of the row store: a part or a shard link holding the rows of [lo, hi)."""

    path: Path
    kind: str  # "part" or "shard"
    lo: int
    hi: int

    def covers(self, lo: int, hi: int) -> bool:
        return self.lo <= lo and hi <= self.hi


def store_path(state_dir: Path, kind: str, fp: str, lo: int, hi: int) -> Path:
    """Where the ``kind`` file of fingerprint ``fp`` and global range [lo, hi) lives."""
    return Path(state_dir) / f"{kind}-{fp}-{lo:010d}-{hi:010d}.h5"


def list_store(state_dir: Path, fp: str) -> list[StoreFile]:
    """The store files of fingerprint ``fp`` (other fingerprints' files are other settings)."""
    files = []
    for path in sorted(Path(state_dir).glob(f"*-{fp}-*.h5")):
        m = _NAME.match(path.name)
        if m and m.group(2) == fp:
            files.append(StoreFile(path, m.group(1), int(m.group(3)), int(m.group(4))))
    return files


def row_slices(f, lo: int, hi: int) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and rejects [j0, j1) of an open store file that belong to global range [lo, hi)."""
    index, rejects = f["index"][:], f["reject_index"][:]
    r0, r1 = np.searchsorted(index, [lo, hi])
    j0, j1 = np.searchsorted(rejects, [lo, hi])
    return int(r0), int(r1), int(j0), int(j1)


def link_ok(sf: StoreFile, n_views: int) -> bool:
    """Whether a shard link verifies (digest, complete, ``n_views``); a corrupt one is logged."""
    try:
        verify_digest(sf.path)
        with h5py.File(sf.path, "r") as f:
            if not f.attrs.get("complete", False) or f["views"].shape[1:] != (n_views,):
                raise IntegrityError(f"{sf.path}: incomplete or another number of views")
    except (OSError, IntegrityError) as err:
        LOG.warning("not reusing shard link %s: %s", sf.path, err)
        return False
    return True


def find_link(links: list[StoreFile], lo: int, hi: int, image_ids: dict, n_views: int, checked: dict) -> Path | None:
    """A shard link that verifies (``link_ok``, remembered in ``checked``) and holds exactly the
    sources ``image_ids`` (global index -> id) of [lo, hi) as rows or rejects; else None."""
    for link in (sf for sf in links if sf.covers(lo, hi)):
        if link.path not in checked:
            checked[link.path] = link_ok(link, n_views)
        if not checked[link.path]:
            continue
        with h5py.File(link.path, "r") as f:
            r0, r1, j0, j1 = row_slices(f, lo, hi)
            held = dict(zip(f["index"][r0:r1].tolist(), f["image_id"].asstr()[r0:r1]))
            held.update(zip(f["reject_index"][j0:j1].tolist(), f["reject_image_id"].asstr()[j0:j1]))
        if held == image_ids:
            return link.path
    return None


def range_rejects(path: Path, lo: int, hi: int) -> list[tuple]:
    """The rejects of global range [lo, hi) held by a store file."""
    with h5py.File(path, "r") as f:
        _, _, j0, j1 = row_slices(f, lo, hi)
        return read_rejects(f, j0, j1)


def link_shard(shard: Path, state_dir: Path, fp: str, lo: int, hi: int) -> StoreFile | None:
    """Hard-link a verified shard into the store (no extra disk); None where links are unsupported."""
    link = store_path(state_dir, "shard", fp, lo, hi)
    for stale in link.parent.glob(f".{link.name}.*.link"):  # a killed job's (only the shard's job links it)
        stale.unlink(missing_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    try:
        os.link(shard, tmp)
    except OSError as err:  # a filesystem without hard links: the parts are kept instead
        LOG.warning("cannot hard-link %s into %s (%s): keeping its parts", shard, state_dir, err)
        return None
    os.replace(tmp, link)
    record_digest(link)
    return StoreFile(link, "shard", lo, hi)


def _covered(sf: StoreFile, links: list[StoreFile]) -> bool:
    """Whether the union of ``links`` (other files) covers [sf.lo, sf.hi)."""
    pos = sf.lo
    for link in sorted((x for x in links if x.path != sf.path), key=lambda x: x.lo):
        if link.lo <= pos < link.hi:
            pos = link.hi
    return pos >= sf.hi


def remove_redundant(state_dir: Path, fp: str) -> list[Path]:
    """Remove the parts and orphaned shard links whose rows live shard links hold; return them.

    A link is live while its shard file exists (two hard links): it costs no disk and was
    verified when made. Only live links count as holding rows, so two jobs cleaning up at once
    can never remove each other's only copy; an orphan (its shard deleted or replaced) is kept
    until live links of the new layout cover it."""
    files = list_store(state_dir, fp)
    live = [sf for sf in files if sf.kind == "shard" and sf.path.stat().st_nlink > 1]
    removed = []
    for sf in files:
        if sf not in live and _covered(sf, live):
            sf.path.unlink()
            digest_path(sf.path).unlink(missing_ok=True)
            removed.append(sf.path)
    if removed:
        LOG.info("removed %d part/link files whose rows verified shards hold: %s", len(removed), removed)
    return removed


def plan_rows(parts, sources) -> tuple[list[tuple[Path, int, int]], list[tuple], list[dict]]:
    """For each part range and the store file holding it: the rows to copy (file, r0, r1), then all
    the rejects and the distinct sampler records, in part order."""
    plan, rejects, samplers = [], [], []
    for (lo, hi), src in zip(parts, sources):
        with h5py.File(src, "r") as f:
            r0, r1, j0, j1 = row_slices(f, lo, hi)
            rejects.extend(read_rejects(f, j0, j1))
            a = f.attrs  # a part has its sampler, a shard the distinct ones of its parts
            recs = [json.loads(a["sampler"])] if "sampler" in a else json.loads(a.get("samplers", "[]"))
        samplers.extend(r for r in recs if r not in samplers)
        plan.append((src, r0, r1))
    return plan, rejects, samplers


def write_shard(out: Path, plan, rejects: list[tuple], attrs: dict, n_views: int) -> None:
    """The shard file (atomic, digest recorded), rows streamed from the store files of ``plan``."""
    with atomic_path(out, digest=True) as tmp:
        with h5py.File(tmp, "w") as f:
            create_row_datasets(f, sum(r1 - r0 for _, r0, r1 in plan), n_views)
            at = 0
            for src, r0, r1 in plan:
                with h5py.File(src, "r") as part:
                    at += copy_rows(part, r0, r1, f, at)
            write_rejects(f, rejects)
            f.attrs.update(attrs)
            f.attrs["complete"] = True  # last: a file without it is never trusted


def release_parts(out: Path, n_rows: int, state_dir: Path, fp: str, lo: int, hi: int) -> None:
    """Once the shard verifies (digest re-read from disk, row count), hard-link it into the store
    and remove the parts (and orphaned links) whose rows live shards now hold."""
    verify_view_file(out)
    with h5py.File(out, "r") as f:
        if not all(len(f[k]) == n_rows for k in ROW_KEYS):
            raise ViewsError(f"shard {out}: row datasets do not hold the {n_rows} rows written")
    if link_shard(out, state_dir, fp, lo, hi) is not None:
        remove_redundant(state_dir, fp)
    for tmp in Path(state_dir).glob(f".part-{fp}-*.tmp"):  # a killed writer's, of a part now in the shard
        m = _NAME.match(tmp.name[1:].split(".h5.", 1)[0] + ".h5")
        if m and lo <= int(m.group(3)) and int(m.group(4)) <= hi:
            tmp.unlink(missing_ok=True)
