"""Generate one shard of the bag of views (``python -m pipeline.views generate``).

A shard is a contiguous range of global indices of ``list_imagenet(root)`` made of whole parts (see
``shard_range``); batches are formed inside a part. Work is committed in atomic part files of
``part_size`` source images, each with a recorded content digest, in the generator's row store
outside the declared outputs (``results/views/<generator>/parts/``, ``pipeline.views.store``),
keyed on the part's global range and the settings fingerprint, not on the shard. On restart a
part that verifies (digest, ``complete``, range, sources, fingerprint) is reused and a corrupt one
regenerated, so a killed job redoes at most the part it was writing, and a new ``views.shards``
reuses every part already made. ``--stop-after`` (or SIGUSR1) ends a job cleanly between parts
before a time limit. The shard file is then streamed from the parts (bounded memory), verified,
and the parts are removed (layout: ``pipeline.views.hdf5``).

Real images: short side resized to ``image_size`` (PIL bicubic, antialiased) and centre-cropped,
then used both as the generator's condition and as the stored real image, so real image and views
share one resolution.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import inspect
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from pipeline.config import add_runtime_flags, apply_runtime_flags
from pipeline.data.readers import list_imagenet
from pipeline.imaging import load_square
from pipeline.io import IntegrityError, atomic_path, folder_sha256, write_csv_atomic
from pipeline.provenance import (
    ast_digest,
    code_files,
    combined_digest,
    file_digests,
    plugin_code_files,
    registrations,
)
from pipeline.runtime import progress
from pipeline.seeding import derive_seed
from pipeline.views.generators import GENERATORS, build_generator
from pipeline.views.hdf5 import (
    FORMAT_VERSION,
    REJECT_COLUMNS,
    ROW_KEYS,
    ViewsError,
    decode_jpeg,
    encode_jpeg,
    run_command,
    verify_view_file,
    write_rejects,
    write_rows,
)
from pipeline.views.store import (
    find_link,
    list_store,
    plan_rows,
    range_rejects,
    release_parts,
    resolve_views_settings,
    shard_range,
    store_path,
    write_shard,
)
from pipeline.views.timelimit import TIME_LIMIT_MARGIN_MIN, StopControl, stop_after_for_limit

LOG = logging.getLogger("cdgmae.views")

MAX_REGENERATE = 8  # attempts to replace a non-finite view before giving up


def to_uint8(view: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(view * 255.0), 0, 255).astype(np.uint8)


def view_seed(seed: int, image_id: str, view: int, attempt: int = 0) -> int:
    """Seed of view ``view`` of ``image_id``; ``attempt`` > 0 for regenerations of a bad view."""
    if attempt == 0:
        return derive_seed(seed, image_id, view)
    return derive_seed(seed, image_id, view, attempt)


def generator_code_digest(generator: str) -> str:
    """The digest of the code that generates ``generator``'s views (what rule generate_views records).

    A generator registered from outside the package (a plugin, a test) adds its class's source file."""
    entry = "pipeline.views.generate"
    if generator in registrations("views"):
        return combined_digest(file_digests(plugin_code_files(entry, "views", generator)))
    digests = file_digests(code_files(entry, exclude=registrations("views").values()))
    source = inspect.getsourcefile(GENERATORS[generator])
    return combined_digest({**digests, f"<{generator}> {Path(source).name}": ast_digest(source)})


def shard_fingerprint(generator: str, cfg: dict, seed: int) -> str:
    """Hash of everything that determines the stored bytes (not batch size, shards or parts).

    The generator's code is part of it, as the rule tracks it (``generator_code_digest``): a part
    made by other code is never reused, so a re-run after a code edit regenerates the views instead
    of re-assembling stale ones, while a comment- or format-only edit (same syntax tree) changes
    nothing and costs only re-assembly.
    """
    key = {
        "format": FORMAT_VERSION,
        "generator": generator,
        "seed": int(seed),
        "generator_version": getattr(GENERATORS.get(generator), "version", None),
        "code": generator_code_digest(generator),
        "n_views": cfg["n_views"],
        "image_size": cfg["image_size"],
        "jpeg_quality": cfg["jpeg_quality"],
        "generator_settings": cfg["generators"][generator],
    }
    model_path = cfg["generators"][generator].get("model_path")
    if model_path and Path(model_path).is_dir():
        # the weights' content, not their path: weights replaced in place redo every part, a moved
        # folder reuses them
        key["generator_settings"] = {k: v for k, v in key["generator_settings"].items() if k != "model_path"}
        key["weights_sha256"] = folder_sha256(model_path)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class ShardWriter:
    """Generate one shard as resumable atomic parts, then assemble ``shard-<k>.h5``."""

    def __init__(
        self,
        records,
        generator: str,
        shard: int,
        cfg: dict,
        seed: int,
        out: Path,
        rejects: Path,
        state_dir: Path,
        batch_size: int | None = None,
        device: str | None = None,
        stop_after: float | None = None,
    ):
        self.records = records
        self.generator_name = generator
        self.shard = int(shard)
        self.cfg = cfg
        self.seed = int(seed)
        self.out = Path(out)
        self.rejects_path = Path(rejects)
        self.state_dir = Path(state_dir)
        self.batch_size = int(batch_size or cfg["batch_size"])
        self.device = device
        self.stop = StopControl(stop_after)
        self.M = int(cfg["n_views"])
        self.size = int(cfg["image_size"])
        self.quality = int(cfg["jpeg_quality"])
        n = len(records) if cfg["max_images"] is None else min(len(records), cfg["max_images"])
        self.n_total = n
        self.start, self.end = shard_range(n, self.shard, int(cfg["shards"]), int(cfg["part_size"]))
        self.fp = shard_fingerprint(generator, cfg, seed)
        self._gen = None
        self.parts_written = 0
        self.parts_reused = 0

    # -- generator is built lazily: a fully resumed shard never loads weights
    @property
    def gen(self):
        if self._gen is None:
            self._gen = build_generator(
                self.generator_name,
                self.cfg["generators"][self.generator_name],
                image_size=self.size,
                device=self.device,
            )
        return self._gen

    def part_ranges(self) -> list[tuple[int, int]]:
        P = int(self.cfg["part_size"])
        return [(s, min(s + P, self.end)) for s in range(self.start, self.end, P)]

    def part_path(self, lo: int, hi: int) -> Path:
        """The part of global range [lo, hi): named by range and fingerprint, not by shard."""
        return store_path(self.state_dir, "part", self.fp, lo, hi)

    def _ids_hash(self, lo: int, hi: int) -> str:
        h = hashlib.sha256()
        for r in self.records[lo:hi]:
            h.update(r.image_id.encode() + b"\0")
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------------- resume

    def part_ok(self, path: Path, lo: int, hi: int) -> bool:
        """Integrity, not existence: digest, complete, same settings and sources, row counts add up."""
        if not path.exists():
            return False
        try:
            verify_view_file(path)
            with h5py.File(path, "r") as f:
                a = f.attrs
                rows = int(a["expected_rows"])
                ok = (
                    bool(a["complete"])
                    and a["fingerprint"] == self.fp
                    and int(a["index_start"]) == lo
                    and int(a["index_end"]) == hi
                    and a["sources_hash"] == self._ids_hash(lo, hi)
                    and rows + len(f["reject_index"]) == hi - lo
                    and all(len(f[k]) == rows for k in ROW_KEYS)
                    and f["views"].shape[1:] == (self.M,)
                )
        except IntegrityError as err:
            LOG.warning("part %s is corrupt (%s): regenerating it", path, err)
            return False
        except Exception as err:  # truncated superblock, missing key, ...: redo the part
            LOG.warning("part %s is unreadable (%s): redoing it", path, err)
            return False
        if not ok:
            LOG.warning("part %s is incomplete or stale: redoing it", path)
        return ok

    def _resume(self, parts: list[tuple[int, int]]) -> list[Path | None]:
        """The file already holding each part's rows: its part, or a finished shard's link (a
        shard of another ``views.shards``); None where the part is still to be generated."""
        links = [sf for sf in list_store(self.state_dir, self.fp) if sf.kind == "shard"]
        checked: dict[Path, bool] = {}  # each link's digest is verified once
        sources: list[Path | None] = []
        for lo, hi in parts:
            path = self.part_path(lo, hi)
            if self.part_ok(path, lo, hi):
                LOG.info("reusing complete part %s", path.name)
                sources.append(path)
                continue
            ids = {i: self.records[i].image_id for i in range(lo, hi)}
            link = find_link(links, lo, hi, ids, self.M, checked)
            if link is not None:
                LOG.info("reusing rows [%d, %d) from finished shard %s", lo, hi, link.name)
            sources.append(link)
        self.parts_reused = sum(s is not None for s in sources)
        return sources

    # ------------------------------------------------------------------------- generate

    def _generate_batch(self, reals: list[np.ndarray], ids: list[str]):
        """Views for a batch; non-finite views regenerated one by one with new recorded seeds."""
        seeds = np.array([[view_seed(self.seed, i, m) for m in range(self.M)] for i in ids], dtype=np.int64)
        views = self.gen.generate(np.stack(reals), seeds)  # (B, M, S, S, 3) float
        for b, m in zip(*np.nonzero(~np.isfinite(views).reshape(len(ids), self.M, -1).all(-1))):
            for attempt in range(1, MAX_REGENERATE + 1):
                s = view_seed(self.seed, ids[b], int(m), attempt)
                v = self.gen.generate(reals[b][None], np.array([[s]], np.int64))[0, 0]
                if np.isfinite(v).all():
                    LOG.warning("non-finite view %d of %s regenerated with seed %d", m, ids[b], s)
                    views[b, m], seeds[b, m] = v, s
                    break
            else:
                raise ViewsError(
                    f"view {m} of {ids[b]} is non-finite after {MAX_REGENERATE} "
                    "regenerations (check dtype: use bfloat16/float32)"
                )
        return views, seeds

    def load_part(self, lo: int, hi: int):
        """Decode the sources of [lo, hi): (reals, ids, global indices, rejects)."""
        reals, ids, index, rej = [], [], [], []
        for i in range(lo, hi):
            rec = self.records[i]
            try:
                reals.append(load_square(rec.path, self.size))
                ids.append(rec.image_id)
                index.append(i)
            except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ...
                LOG.warning("rejecting %s: %s", rec.path, err)
                rej.append((i, rec.image_id, str(rec.path), f"{type(err).__name__}: {err}"))
        return reals, ids, index, rej

    def _encode(self, reals, views, ids):
        """JPEG blobs of a batch, each decoded back once: a blob that does not decode never
        reaches a part, so a bad bag is never assembled (the error names the image)."""
        real_jpg = [encode_jpeg(r, self.quality) for r in reals]
        view_jpg = [[encode_jpeg(to_uint8(v), self.quality) for v in row] for row in views]
        for image_id, real, row in zip(ids, real_jpg, view_jpg):
            for k, blob in enumerate([real, *row]):
                try:
                    decode_jpeg(blob)
                except ValueError as err:
                    what = "real image" if k == 0 else f"view {k - 1}"
                    raise ViewsError(
                        f"shard {self.shard}: the {what} of {image_id!r} does not decode ({err})"
                    ) from None
        return real_jpg, view_jpg

    def write_part(self, lo: int, hi: int, loaded, pool, bar, rejects_before: list) -> list[tuple]:
        """Generate and commit the part [lo, hi); JPEG encoding runs in ``pool`` behind the generator."""
        reals, ids, index, rej = loaded
        bar.update(len(rej))
        if len(rejects_before) + len(rej) > self._reject_limit():
            self._check_rejects(pd.DataFrame(rejects_before + rej, columns=REJECT_COLUMNS), final=False)
        encoded, seeds = [], []
        for b0 in range(0, len(ids), self.batch_size):
            batch_ids = ids[b0 : b0 + self.batch_size]
            batch_real = reals[b0 : b0 + self.batch_size]
            views, s = self._generate_batch(batch_real, batch_ids)
            encoded.append(pool.submit(self._encode, batch_real, views, batch_ids))
            seeds.extend(s)
            bar.update(len(batch_ids))
        real_jpg, view_jpg = [], []
        for fut in encoded:  # in submission order: row order is the global index order
            r, v = fut.result()
            real_jpg.extend(r)
            view_jpg.extend(v)
        path = self.part_path(lo, hi)
        # only the job of the shard holding [lo, hi) writes this part: any temporary of it (from a
        # killed job on any host) is stale
        for stale in self.state_dir.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
        with atomic_path(path, digest=True) as tmp:
            with h5py.File(tmp, "w") as f:
                write_rows(f, real_jpg, view_jpg, ids, index, seeds, self.M)
                write_rejects(f, rej)
                f.attrs.update(
                    fingerprint=self.fp,
                    index_start=lo,
                    index_end=hi,
                    sources_hash=self._ids_hash(lo, hi),
                    expected_rows=len(ids),
                    # how the views were sampled, as actually run (scheduler, steps, eta, dtype)
                    sampler=json.dumps(self.gen.describe(), sort_keys=True, default=str),
                )
                f.attrs["complete"] = True  # last: a part without it is never trusted
        return rej

    def _reject_limit(self) -> float:
        return float(self.cfg["max_reject_fraction"]) * (self.end - self.start)

    def _check_rejects(self, rejects: pd.DataFrame, final: bool) -> None:
        """Fail above ``views.max_reject_fraction``, after writing the reasons the message names."""
        if len(rejects) > self._reject_limit():
            listing = self.state_dir / f"shard-{self.shard}-of-{self.cfg['shards']}.rejects.csv"
            write_csv_atomic(rejects, listing)
            raise ViewsError(
                f"shard {self.shard}: {len(rejects)} of {self.end - self.start} source images rejected, above "
                f"views.max_reject_fraction = {self.cfg['max_reject_fraction']}; reasons are listed "
                f"in the job log and in {listing}" + ("" if final else " (stopped early)")
            )

    # ------------------------------------------------------------------------- run, stop

    def run(self) -> Path:
        """Generate the missing parts, then assemble, verify and link the shard; return its path.

        Raises ``ShardStopped`` when a stop was asked for before all parts were written."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        parts = self.part_ranges()
        LOG.info(
            "shard %d: global indices [%d, %d) of %d images, %d parts, generator %s",
            self.shard,
            self.start,
            self.end,
            self.n_total,
            len(parts),
            self.generator_name,
        )
        sources = self._resume(parts)
        rejects = [r for (lo, hi), s in zip(parts, sources) if s for r in range_rejects(s, lo, hi)]
        initial = sum(hi - lo for (lo, hi), s in zip(parts, sources) if s)
        bar = progress(
            total=self.end - self.start,
            initial=initial,
            unit="img",
            desc=f"views {self.generator_name} shard {self.shard}",
        )
        todo = [(j, lo, hi) for j, (lo, hi) in enumerate(parts) if sources[j] is None]
        # source decoding of the next part and JPEG encoding overlap with generation (PIL, cv2
        # and torch release the GIL); parts are still committed one at a time, in order
        with self.stop.on_sigusr1(), ThreadPoolExecutor(max_workers=2) as pool:
            try:
                self._generate(todo, sources, rejects, pool, bar)
            finally:
                bar.close()
        return self.assemble(parts, sources)

    def _generate(self, todo, sources, rejects, pool, bar) -> None:
        self.stop.start()
        nxt = pool.submit(self.load_part, *todo[0][1:]) if todo else None
        for pos, (j, lo, hi) in enumerate(todo):
            done = len(sources) - len(todo) + pos
            self.stop.check(f"shard {self.shard}, {done} of {len(sources)} parts done", parts_written=pos)
            t = time.monotonic()
            loaded = nxt.result()
            nxt = pool.submit(self.load_part, *todo[pos + 1][1:]) if pos + 1 < len(todo) else None
            rejects.extend(self.write_part(lo, hi, loaded, pool, bar, rejects))
            sources[j] = self.part_path(lo, hi)
            self.parts_written += 1
            self.stop.part_done(time.monotonic() - t)
            LOG.info("wrote part %s", sources[j].name)

    # ------------------------------------------------------------------------- assemble

    def _shard_attrs(self, n_rows: int, n_rejects: int) -> dict:
        """The shard file's attributes (``complete`` aside, written last)."""
        settings = {
            "generator": self.generator_name,
            "seed": self.seed,
            "n_views": self.M,
            "image_size": self.size,
            "jpeg_quality": self.quality,
            "generator_settings": self.cfg["generators"][self.generator_name],
            "real_preprocessing": "short side -> image_size (PIL bicubic), centre crop",
            "seed_rule": "derive_seed(seed, image_id, view[, attempt])",
        }
        return dict(
            generator=self.generator_name,
            settings=json.dumps(settings, sort_keys=True),
            is_baseline=bool(GENERATORS[self.generator_name].is_baseline),
            n_views=self.M,
            jpeg_quality=self.quality,
            image_size=self.size,
            expected_rows=n_rows,
            n_rejects=n_rejects,
            n_sources=self.end - self.start,
            index_start=self.start,
            index_end=self.end,
            n_images_total=self.n_total,
            shard=self.shard,
            shards=int(self.cfg["shards"]),
            fingerprint=self.fp,
            format_version=FORMAT_VERSION,
        )

    def assemble(self, parts, sources) -> Path:
        """Stream the rows of every part into the shard file and write the rejects CSV (both
        atomic), then verify the shard and let it replace its parts (``release_parts``)."""
        plan, rejects, samplers = plan_rows(parts, sources)
        rejects_df = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
        self._check_rejects(rejects_df, final=True)
        write_csv_atomic(rejects_df, self.rejects_path)
        n_rows = sum(r1 - r0 for _, r0, r1 in plan)
        attrs = {**self._shard_attrs(n_rows, len(rejects)), "samplers": json.dumps(samplers)}
        write_shard(self.out, plan, rejects, attrs, self.M)
        release_parts(self.out, n_rows, self.state_dir, self.fp, self.start, self.end)
        LOG.info(
            "shard %d: %d rows, %d rejects -> %s (%d parts written, %d reused)",
            self.shard,
            n_rows,
            len(rejects),
            self.out,
            self.parts_written,
            self.parts_reused,
        )
        return self.out


def generate_shard(args: argparse.Namespace) -> Path:
    """One shard from the parsed ``generate`` arguments."""
    cfg = apply_runtime_flags(args, "views", resolve_views_settings(args.settings))
    out = Path(args.out)
    state = Path(args.state_dir) if args.state_dir else out.parent / "parts"
    rejects = Path(args.rejects) if args.rejects else out.with_suffix(".rejects.csv")
    return ShardWriter(
        list_imagenet(args.root),
        args.generator,
        args.shard,
        cfg,
        args.seed,
        out,
        rejects,
        state,
        device=args.device,
        stop_after=args.stop_after if args.stop_after is not None else stop_after_for_limit(args.time_limit),
    ).run()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.views generate", description="Generate one shard of views (resumable)."
    )
    ap.add_argument("--root", required=True, help="ImageNet-layout root (holds train/<class>/)")
    ap.add_argument("--generator", required=True, help="registry name: sd-variation, sldm, warp, crop")
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--out", required=True, help="results/views/<generator>/shard-<k>.h5")
    ap.add_argument("--rejects", help="rejects CSV (default: <out>.rejects.csv)")
    ap.add_argument("--state-dir", help="parts of all shards (default: <out dir>/parts)")
    ap.add_argument("--settings", help="views section (JSON or file); missing keys from the schema")
    ap.add_argument("--seed", type=int, default=0, help="base seed of the workflow")
    add_runtime_flags(ap, "views")  # --batch-size: images per generator call, output-invariant
    ap.add_argument("--device", help="torch device (default: cuda if available)")
    ap.add_argument(
        "--stop-after",
        type=float,
        help="seconds: start no part that would end after this (the longest part so far as the "
        "estimate); the job then exits 1 and the next run continues. SIGUSR1 stops after the current part",
    )
    ap.add_argument(
        "--time-limit",
        type=float,
        default=0,
        help=f"minutes the job may run (0: no limit): --stop-after the limit less {TIME_LIMIT_MARGIN_MIN} min (or half)",
    )
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    run_command(lambda: generate_shard(args), args.threads)
