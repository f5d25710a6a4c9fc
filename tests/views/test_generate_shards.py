"""View shards at scale: parts keyed on global ranges (a new shard count reuses them and the rows
of finished shards), a clean stop on SIGUSR1, and content digests on parts, shards and bags."""

import os
import signal

import pytest

from pipeline.data.readers import list_imagenet
from pipeline.io import IntegrityError, file_sha256
from pipeline.views.generate import ShardWriter, shard_fingerprint
from pipeline.views.hdf5 import verify_view_file
from pipeline.views.merge import merge_shards
from pipeline.views.timelimit import ShardStopped, StopControl
from tests.support import VIEWS_SEED, stop_after_parts, views_settings, write_imagenet_jpegs


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return list_imagenet(write_imagenet_jpegs(tmp_path_factory.mktemp("imagenet")))


def _writer(records, out_dir, k, shards, cls=ShardWriter):
    out = out_dir / f"shard-{k}.h5"
    cfg = views_settings(shards=shards, part_size=2)
    return cls(records, "warp", k, cfg, VIEWS_SEED, out, out.with_suffix(".rejects.csv"), out_dir / "parts")


def _flip_byte(path, where=0.5):
    with open(path, "r+b") as fh:
        fh.seek(int(path.stat().st_size * where))
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_new_shard_count_reuses_parts_and_finished_shards(records, tmp_path):
    ref_dir, run = tmp_path / "ref", tmp_path / "run"
    refs = [_writer(records, ref_dir, k, 3).run() for k in range(3)]
    # views.shards = 2: shard 0 finished (its parts replaced by a link), shard 1 killed after a part
    _writer(records, run, 0, 2).run()
    with pytest.raises(ShardStopped):
        _writer(records, run, 1, 2, stop_after_parts(1)).run()
    # views.shards = 3 (Snakemake deletes the outputs of the jobs it re-runs first)
    (run / "shard-0.h5").unlink()
    fp = shard_fingerprint("warp", views_settings(part_size=2), VIEWS_SEED)
    # a temporary a job killed on another host left for a part that the new layout never rewrites
    stale = run / "parts" / f".part-{fp}-{0:010d}-{2:010d}.h5.otherhost.1.abc.h5.tmp"
    stale.write_bytes(b"partial")
    counts = []
    for k in range(3):
        w = _writer(records, run, k, 3)
        w.run()
        counts.append((w.parts_written, w.parts_reused))
    # rows [0, 6) came from the finished shard, [6, 8) from its part: only [8, 12) was generated
    assert counts == [(0, 2), (0, 2), (2, 0)]
    assert [file_sha256(run / f"shard-{k}.h5") for k in range(3)] == [file_sha256(p) for p in refs]
    # the old shard's orphaned link, the part and the temporary are gone once verified shards
    # hold their rows
    assert not stale.exists()
    bounds = [(0, 4), (4, 8), (8, 12)]
    assert sorted(p.name for p in (run / "parts").glob("*.h5")) == [
        f"shard-{fp}-{lo:010d}-{hi:010d}.h5" for lo, hi in bounds
    ]


def test_sigusr1_stops_after_the_current_part(records, tmp_path):
    class SignalDuringFirstPart(ShardWriter):
        def write_part(self, lo, *args):
            if lo == self.start:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().write_part(lo, *args)

    with pytest.raises(ShardStopped, match=r"shard 0, 1 of 3 parts done: stopped cleanly \(SIGUSR1\)"):
        _writer(records, tmp_path, 0, 2, SignalDuringFirstPart).run()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler is the run's only
    w = _writer(records, tmp_path, 0, 2)
    w.run()
    assert (w.parts_written, w.parts_reused) == (2, 1)


def test_a_time_budget_never_stops_a_run_before_its_first_part():
    """A budget already spent (start-up took longer) still lets the run write one part; after a
    part, the budget stops it; an explicit request stops at once. No clock is involved."""
    stop = StopControl(stop_after=0.0)
    stop.start()
    stop.check("first", parts_written=0)  # no raise: progress first
    stop.part_done(1.0)
    with pytest.raises(ShardStopped, match=r"second: stopped cleanly \(--stop-after 0 s"):
        stop.check("second", parts_written=1)
    stop.requested = "SIGUSR1"
    with pytest.raises(ShardStopped, match=r"\(SIGUSR1\)"):
        stop.check("asked", parts_written=0)
    StopControl(stop_after=None).check("no budget", parts_written=5)


def test_runs_under_a_spent_budget_complete_the_shard(records, tmp_path):
    """However short the budget, each run writes a part: three runs of a 3-part shard finish it,
    with the bytes of an uninterrupted run."""
    ref = _writer(records, tmp_path / "ref", 0, 2).run()
    outcomes = []
    for _ in range(3):
        w = _writer(records, tmp_path / "run", 0, 2)
        w.stop.stop_after = 0.0
        try:
            w.run()
            outcomes.append(("done", w.parts_written))
        except ShardStopped:
            outcomes.append(("stopped", w.parts_written))
    assert outcomes == [("stopped", 1), ("stopped", 1), ("done", 1)]
    assert file_sha256(tmp_path / "run" / "shard-0.h5") == file_sha256(ref)


@pytest.mark.fault
def test_flipped_bytes_in_a_shard_or_bag_are_errors_naming_the_file(records, tmp_path):
    shards = [_writer(records, tmp_path, k, 2).run() for k in range(2)]
    bag = merge_shards(shards, tmp_path / "bag.h5", n_images=12, part_size=2)
    vds = merge_shards(shards, tmp_path / "bag_vds.h5", n_images=12, part_size=2, mode="vds")
    assert verify_view_file(bag) == [bag] and verify_view_file(vds) == [vds, *shards]
    _flip_byte(bag)
    with pytest.raises(IntegrityError, match=f"{bag}: content digest"):
        verify_view_file(bag)
    _flip_byte(shards[1], 0.7)
    with pytest.raises(IntegrityError, match=f"{shards[1]}: content digest"):
        merge_shards(shards, tmp_path / "bag2.h5", n_images=12, part_size=2)
    with pytest.raises(IntegrityError, match=f"{shards[1]}: content digest"):
        verify_view_file(vds)  # the VDS file itself is intact: its source is not
    assert not (tmp_path / "bag2.h5").exists()
    shards[0].unlink()
    with pytest.raises(IntegrityError, match=f"virtual source {shards[0]} is missing"):
        verify_view_file(vds)
