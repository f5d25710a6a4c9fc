"""Bag-of-views stage: determinism across shards/batches/resume, killed-run resume, rejects,
non-finite regeneration, merge validation, BagDataset and the figure."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline.cli import run
from pipeline.config import section_defaults
from pipeline.data.readers import list_imagenet
from pipeline.io import IntegrityError, digest_path, file_sha256, record_digest
from pipeline.views.bag import BagDataset
from pipeline.views.figure import plot_bag
from pipeline.views.generate import ShardWriter, shard_fingerprint, view_seed
from pipeline.views.generators import GENERATORS, ViewGenerator
from pipeline.views.hdf5 import ViewsError
from pipeline.views.merge import merge_shards
from pipeline.views.store import shard_range
from pipeline.views.timelimit import ShardStopped
from tests.support import ROOT, VIEWS_SEED, stop_after_parts, views_settings, wait_until, write_imagenet_jpegs


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return write_imagenet_jpegs(tmp_path_factory.mktemp("imagenet"))


def _run_shards(root, out_dir, generator="warp", batch_size=None, **kw):
    cfg = views_settings(**kw)
    records = list_imagenet(root)
    paths = []
    for k in range(cfg["shards"]):
        out = Path(out_dir) / f"shard-{k}.h5"
        ShardWriter(
            records,
            generator,
            k,
            cfg,
            VIEWS_SEED,
            out,
            out.with_suffix(".rejects.csv"),
            Path(out_dir) / "parts",
            batch_size=batch_size,
            device="cpu",
        ).run()
        paths.append(out)
    return paths


def _by_image(paths):
    """image_id -> (index, real bytes, view bytes, seeds) over all shard files."""
    rows = {}
    for p in paths:
        with h5py.File(p, "r") as f:
            for i, iid in enumerate(f["image_id"].asstr()[:]):
                rows[iid] = (
                    int(f["index"][i]),
                    bytes(f["real"][i]),
                    [bytes(v) for v in f["views"][i]],
                    f["seed"][i].tolist(),
                )
    return rows


def test_shard_ranges_are_runs_of_whole_parts():
    assert [shard_range(10, k, 3, 4) for k in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert [shard_range(5, k, 3, 4) for k in range(3)] == [(0, 0), (0, 4), (4, 5)]
    assert [shard_range(25, k, 2, 4) for k in range(2)] == [(0, 12), (12, 25)]
    for n, S, P in [(1000, 8, 7), (5, 8, 2), (64, 3, 64)]:
        ranges = [shard_range(n, k, S, P) for k in range(S)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % P == 0 for lo, _ in ranges)
    with pytest.raises(ValueError, match="out of range"):
        shard_range(10, 3, 3, 4)


def test_views_independent_of_shards_and_batch_size(imagenet, tmp_path):
    ref = _by_image(_run_shards(imagenet, tmp_path / "a", shards=1, batch_size=1))
    other = _by_image(_run_shards(imagenet, tmp_path / "b", shards=3, batch_size=4))
    assert len(ref) == 12 and ref == other
    iid = sorted(ref)[5]
    assert ref[iid][3] == [view_seed(VIEWS_SEED, iid, m) for m in range(3)]
    assert ref[iid][0] == 5  # global index = position in list_imagenet


def test_shard_file_layout(imagenet, tmp_path):
    (path,) = _run_shards(imagenet, tmp_path, shards=1)
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] and f.attrs["is_baseline"] and f.attrs["generator"] == "warp"
        assert f.attrs["expected_rows"] == 12 and f.attrs["n_views"] == 3
        assert f["views"].shape == (12, 3) and f["seed"].dtype == np.int64
        assert f["index"][:].tolist() == list(range(12))
    ds = BagDataset(path)
    item = ds[7]
    assert item["image_id"] == list_imagenet(imagenet)[7].image_id and item["index"] == 7
    assert item["real"].shape == (24, 24, 3) and item["real"].dtype == np.uint8
    assert len(item["views"]) == 3 and all(v.shape == (24, 24, 3) for v in item["views"])
    assert pd.read_csv(path.with_suffix(".rejects.csv")).empty


def test_diffusion_views_identical_across_shard_counts(imagenet, tmp_path_factory):
    from tests.support import build_tiny_sd_variation

    model = build_tiny_sd_variation(tmp_path_factory.mktemp("sdv"))
    gens = {"sd-variation": {"model_path": str(model), "steps": 2, "dtype": "float32"}}
    kw = dict(generator="sd-variation", generators=gens, n_views=2, part_size=3, max_images=6, image_size=32)
    tmp = tmp_path_factory.mktemp("sdv-runs")
    ref = _by_image(_run_shards(imagenet, tmp / "a", shards=1, batch_size=3, **kw))
    assert ref == _by_image(_run_shards(imagenet, tmp / "b", shards=2, batch_size=3, **kw))
    # another batch size changes float kernels only: near-identical pixels
    b1 = BagDataset(_run_shards(imagenet, tmp / "c", shards=1, batch_size=1, **kw)[0])
    b3 = BagDataset(tmp / "a" / "shard-0.h5")
    diff = max(np.abs(b1[i]["views"][m].astype(int) - b3[i]["views"][m]).mean() for i in range(6) for m in range(2))
    assert diff < 0.5
    # the sampler actually run is recorded on the shard and carried onto the merged bag
    with h5py.File(tmp / "a" / "shard-0.h5", "r") as f:
        (sampler,) = json.loads(f.attrs["samplers"])
    assert sampler["sampler"]["scheduler"] == "DDIMScheduler" and sampler["sampler"]["eta"] == 0.0
    assert sampler["sampler"]["dtype"] == "float32" and sampler["sampler"]["steps"] == 2


def test_view_parts_are_keyed_on_the_weights_not_their_path(tmp_path):
    """Weights replaced in place invalidate finished parts; a moved folder keeps them."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "unet.safetensors").write_bytes(b"weights v1")
    (model / "config.json").write_text("{}")
    cfg = {**section_defaults("views"), "generators": {"sd-variation": {"model_path": str(model), "steps": 2}}}
    before = shard_fingerprint("sd-variation", cfg, VIEWS_SEED)
    moved = tmp_path / "elsewhere"
    shutil.copytree(model, moved)
    cfg_moved = {**cfg, "generators": {"sd-variation": {"model_path": str(moved), "steps": 2}}}
    assert shard_fingerprint("sd-variation", cfg_moved, VIEWS_SEED) == before
    (model / "unet.safetensors").write_bytes(b"weights v2")
    assert shard_fingerprint("sd-variation", cfg, VIEWS_SEED) != before


def _cli_generate(root, out, settings, extra=()):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return [
        sys.executable,
        "-m",
        "pipeline.views",
        "generate",
        "--root",
        str(root),
        "--generator",
        "warp",
        "--shard",
        "0",
        "--out",
        str(out),
        "--settings",
        settings,
        "--seed",
        str(VIEWS_SEED),
        *extra,
    ], env


@pytest.mark.slow
def test_killed_run_resumes_to_identical_content(imagenet, tmp_path):
    """A job killed mid-part by a (simulated) time limit's SIGTERM (SIGKILL alike: no handler), or
    stopped by --stop-after, redoes at most the part it was writing and ends with the very bytes of
    an uninterrupted run."""
    # one image a part and large views: twelve parts, each taking a noticeable time, so the kill
    # lands mid-shard however loaded the machine is (the kill waits for two finished parts)
    settings = '{"n_views": 4, "shards": 1, "part_size": 1, "batch_size": 1, "image_size": 320, "jpeg_quality": 90}'
    cfg = section_defaults("views", overrides=json.loads(settings))
    ref = tmp_path / "ref" / "shard-0.h5"
    ShardWriter(
        list_imagenet(imagenet), "warp", 0, cfg, VIEWS_SEED, ref, tmp_path / "r.csv", tmp_path / "ref" / "p"
    ).run()
    out = tmp_path / "run" / "shard-0.h5"
    parts = tmp_path / "run" / "parts"
    cmd, env = _cli_generate(imagenet, out, settings)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished() -> list[str]:
        # a part is finished once it is in place beside its digest record (the record is written
        # first: a record without its part, or a part without one, is redone)
        return sorted(p.name for p in parts.glob("part-*.h5") if digest_path(p).exists())

    wait_until(lambda: len(finished()) >= 2, poll_s=0.005)
    os.kill(proc.pid, signal.SIGKILL)  # what a time limit's SIGTERM does to a job with no handler
    proc.wait()
    done_at_kill = finished()
    assert 2 <= len(done_at_kill) < 12 and not out.exists()
    mtimes = {n: (parts / n).stat().st_mtime_ns for n in done_at_kill}
    # a clean stop before the limit: a budget shorter than the start-up still writes one part
    # (progress is guaranteed), then exit 1 naming the stop
    stopped = subprocess.run([*cmd, "--stop-after", "0.001"], env=env, capture_output=True, text=True)
    assert stopped.returncode == 1 and "stopped cleanly" in stopped.stderr and "run the job again" in stopped.stderr
    assert stopped.stderr.count("wrote part") == 1 and not out.exists()
    assert all((parts / n).stat().st_mtime_ns == m for n, m in mtimes.items())  # not redone
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    reused = res.stderr.count("reusing complete part")
    written = res.stderr.count("wrote part")
    assert reused == len(done_at_kill) + 1 and reused + written == 12
    assert not list(parts.glob(".*.tmp"))  # the killed writer's temp file was cleaned up
    assert file_sha256(out) == file_sha256(ref)
    # the verified shard now holds the rows: its parts are gone, a hard link to it replaces them
    fp = shard_fingerprint("warp", cfg, VIEWS_SEED)
    assert not list(parts.glob("part-*")) and [p.name for p in parts.glob("shard-*.h5")] == [
        f"shard-{fp}-{0:010d}-{12:010d}.h5"
    ]
    assert parts.glob("shard-*.h5").__next__().stat().st_ino == out.stat().st_ino


@pytest.mark.fault
def test_corrupt_or_stale_parts_are_redone(imagenet, tmp_path, caplog):
    ref = _by_image(_run_shards(imagenet, tmp_path / "ref", shards=1))
    path, parts, records = tmp_path / "shard-0.h5", tmp_path / "parts", list_imagenet(imagenet)

    def writer(cls=ShardWriter, **kw):
        return cls(records, "warp", 0, views_settings(**kw), VIEWS_SEED, path, path.with_suffix(".rejects.csv"), parts)

    with pytest.raises(ShardStopped, match="stopped cleanly"):
        writer(stop_after_parts(2)).run()
    assert not path.exists()
    fp = shard_fingerprint("warp", views_settings(), VIEWS_SEED)
    part1 = parts / f"part-{fp}-{4:010d}-{8:010d}.h5"
    with open(part1, "r+b") as fh:  # one flipped byte in the middle
        fh.seek(part1.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    w = writer()
    w.run()
    assert (w.parts_written, w.parts_reused) == (2, 1)  # the corrupt part and the one never made
    assert f"part {part1} is corrupt" in caplog.text and "does not match the recorded" in caplog.text
    assert _by_image([path]) == ref
    # a settings change invalidates every part and finished shard (fingerprint), not just some
    w = writer(jpeg_quality=80)
    w.run()
    assert (w.parts_written, w.parts_reused) == (3, 0)


@pytest.mark.fault
def test_corrupt_source_is_rejected_and_listed(tmp_path):
    root = write_imagenet_jpegs(tmp_path / "inet", classes=2, per_class=4)
    bad = sorted((root / "train" / "n00000001").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    (path,) = _run_shards(root, tmp_path / "out", shards=1)
    rej = pd.read_csv(path.with_suffix(".rejects.csv"))
    assert rej["image_id"].tolist() == ["n00000001/" + bad.stem] and rej["index"].tolist() == [5]
    assert rej["reason"].str.contains("truncated|broken|OSError", regex=True).all()
    with h5py.File(path, "r") as f:
        assert f.attrs["expected_rows"] == 7 and f.attrs["n_rejects"] == 1
        assert 5 not in f["index"][:].tolist()


@pytest.mark.fault
def test_truncated_bag_is_named(tmp_path):
    for name, data in (("empty.h5", b""), ("garbage.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 40)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ViewsError, match=name):
            BagDataset(tmp_path / name)


def test_too_many_rejects_fail_with_a_clear_message(tmp_path):
    root = write_imagenet_jpegs(tmp_path / "inet", classes=1, per_class=4)
    for p in sorted((root / "train" / "n00000000").iterdir())[:2]:
        p.write_bytes(b"not an image")
    with pytest.raises(ViewsError, match=r"2 of 4 source images rejected.*max_reject_fraction") as err:
        _run_shards(root, tmp_path / "out", shards=1)
    # the listing the message names exists and names the bad files
    listing = Path(str(err.value).split("reasons are listed in the job log and in ")[1].split(" (stopped early)")[0])
    assert len(pd.read_csv(listing)) == 2


class _NaNFirstTry(ViewGenerator):
    """Test generator: view 1 is non-finite unless generated with a regeneration seed."""

    name = "nan-first-try"

    def generate(self, images, seeds):
        B, M = seeds.shape
        out = np.zeros((B, M, self.image_size, self.image_size, 3), np.float32)
        out += (seeds % 251)[:, :, None, None, None] / 251.0
        self.first = getattr(self, "first", set(self.first_seeds))
        for b in range(B):
            for m in range(M):
                if int(seeds[b, m]) in self.first and m == 1:
                    out[b, m, 0, 0, 0] = np.nan
        return out


def test_non_finite_views_are_regenerated_with_recorded_seeds(imagenet, tmp_path):
    records = list_imagenet(imagenet)[:4]
    _NaNFirstTry.first_seeds = [view_seed(VIEWS_SEED, r.image_id, 1) for r in records]
    cfg = views_settings(max_images=4)
    cfg["generators"]["nan-first-try"] = {}
    out = tmp_path / "shard-0.h5"
    with GENERATORS.temporarily("nan-first-try", _NaNFirstTry):
        ShardWriter(records, "nan-first-try", 0, cfg, VIEWS_SEED, out, tmp_path / "r.csv", tmp_path / "parts").run()
    with h5py.File(out, "r") as f:
        seeds = f["seed"][:]
    for r, row in zip(records, seeds):
        assert row.tolist() == [
            view_seed(VIEWS_SEED, r.image_id, 0),
            view_seed(VIEWS_SEED, r.image_id, 1, 1),
            view_seed(VIEWS_SEED, r.image_id, 2),
        ]


def test_merge_copy_and_vds_and_dataloader(imagenet, tmp_path):
    import torch

    paths = _run_shards(imagenet, tmp_path, shards=3, part_size=3)
    ref = _by_image(paths)
    copy = merge_shards(paths, tmp_path / "bag.h5", n_images=12, part_size=3)
    vds = merge_shards(paths, tmp_path / "bag_vds.h5", n_images=12, part_size=3, mode="vds")
    a, b = BagDataset(copy), BagDataset(vds)
    assert len(a) == len(b) == 12 and a.is_baseline and a.n_views == 3
    for i in range(12):
        x, y = a[i], b[i]
        assert x["image_id"] == y["image_id"] and x["index"] == i
        assert np.array_equal(x["real"], y["real"])
        assert all(np.array_equal(p, q) for p, q in zip(x["views"], y["views"]))
    assert _by_image([copy]) == ref
    # the file is opened lazily per worker; items match the in-process reads
    loader = torch.utils.data.DataLoader(b, batch_size=4, num_workers=2, collate_fn=list)
    got = [item["image_id"] for batch in loader for item in batch]
    assert got == [a[i]["image_id"] for i in range(12)]
    # a VDS with a missing source must not read as fill values
    paths[1].rename(tmp_path / "moved.h5")
    with pytest.raises(ViewsError, match="virtual source .*shard-1.h5 is missing"):
        BagDataset(vds)


def test_merge_fails_on_missing_incomplete_or_wrong_shards(imagenet, tmp_path):
    paths = _run_shards(imagenet, tmp_path, shards=2)
    with pytest.raises(ViewsError, match="missing shard 1 of 2"):
        merge_shards([paths[0], tmp_path / "nope.h5"], tmp_path / "bag.h5")
    with pytest.raises(ViewsError, match="covers global indices"):
        merge_shards(paths, tmp_path / "bag.h5", n_images=16, part_size=4)  # manifest grew
    with pytest.raises(ViewsError, match="is shard 1 of 2, expected 0"):
        merge_shards(paths[::-1], tmp_path / "bag.h5")
    with h5py.File(paths[1], "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(IntegrityError, match=f"{paths[1]}: content digest"):  # changed after writing
        merge_shards(paths, tmp_path / "bag.h5")
    record_digest(paths[1])  # as if written so: the validation still catches it
    with pytest.raises(ViewsError, match="incomplete"):
        merge_shards(paths, tmp_path / "bag.h5")
    with h5py.File(paths[1], "r+") as f:
        f.attrs["complete"] = True
        f.attrs["expected_rows"] = 5
    record_digest(paths[1])
    with pytest.raises(ViewsError, match="dataset lengths"):
        merge_shards(paths, tmp_path / "bag.h5")
    assert not (tmp_path / "bag.h5").exists()


def test_figure_and_cli_merge(imagenet, tmp_path, capsys):
    """The merge command's CLI, in this process (``cli.run`` is what ``python -m`` dispatches to)."""
    paths = _run_shards(imagenet, tmp_path, shards=2)
    bag, fig = tmp_path / "bag.h5", tmp_path / "fig.png"
    merge = ["merge", "--shards", *map(str, paths), "--out", str(bag), "--root", str(imagenet)]
    run("views", [*merge, "--settings", '{"shards": 2, "part_size": 4}', "--threads", "1"])
    assert bag.exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:
        run(
            "views",
            ["merge", "--shards", str(paths[0]), "--out", str(tmp_path / "x.h5"), "--settings", '{"shards": 2}'],
        )
    assert bad.value.code == 1 and "1 shard files given, views.shards = 2" in capsys.readouterr().err
    plot_bag(bag, fig, n_images=3)
    import matplotlib.image

    assert matplotlib.image.imread(fig).shape[2] in (3, 4)
