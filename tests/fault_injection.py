"""Fault-injection cases of issue 13 on tiny inputs, with a tally: ``python tests/fault_injection.py``.

A script, not a test module (pytest collects ``test_*.py`` only) and not run in CI: every behaviour
it exercises is pinned by a pytest test (tests/test_integrity.py, test_views.py, test_bag.py,
test_pretrain.py, test_consistency.py, test_io.py, test_config.py, test_datasets.py). It runs
each case in its own temporary directory, in-process on CPU (tiny images, ``vit_mini_patch8`` at
32 px), and prints one row per case: case / expected / observed / PASS|FAIL; the exit status is
the number of failed cases. 25-40 s on 2 shared CPU cores (measured).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import ConfigError, section_defaults, validate_config  # noqa: E402
from pipeline.consistency.encoders import SiftGridEncoder  # noqa: E402
from pipeline.consistency.knn import find_neighbours  # noqa: E402
from pipeline.consistency.options import list_images  # noqa: E402
from pipeline.data.layouts import DatasetError, check_layout  # noqa: E402
from pipeline.data.readers import list_imagenet, list_videos  # noqa: E402
from pipeline.io import IntegrityError, atomic_path, write_text_atomic  # noqa: E402
from pipeline.pretrain.engine_pretrain import DivergedLossError, NonFiniteLossError  # noqa: E402
from pipeline.pretrain.main_pretrain import resolve_cell, resolve_pretrain_settings, train  # noqa: E402
from pipeline.pretrain.strategies import BagViewsDataset, GlobalToLocalDataset, VideoPairDataset  # noqa: E402
from pipeline.propagation.runner import run_propagation  # noqa: E402
from pipeline.views.bag import BagDataset  # noqa: E402
from pipeline.views.merge import merge_shards  # noqa: E402
from pipeline.views.shards import ShardWriter  # noqa: E402
from pipeline.views.timelimit import ShardStopped  # noqa: E402

SEED = 3
TRAIN = {"img_size": 32, "batch_size": 8, "micro_batch": 4, "num_workers": 0, "samples_per_epoch": 16}


# ---------------------------------------------------------------------------------------------
# tiny inputs


def make_imagenet(root: Path, n: int = 8, bad: bool = False) -> Path:
    """``n`` random JPEGs in two classes; ``bad`` adds a corrupt JPEG and a zero-byte file."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"n{i % 2:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG", quality=90)
    if bad:
        (root / "train" / "n00000000" / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(300))
        (root / "train" / "n00000001" / "empty.JPEG").write_bytes(b"")
    return root


def views_cfg(**kw) -> dict:
    base = dict(n_views=3, shards=1, part_size=4, batch_size=2, image_size=24, jpeg_quality=90)
    return section_defaults("views", overrides={**base, "max_reject_fraction": 0.25, **kw, "generators": {}})


def shard_writer(root: Path, work: Path, **kw) -> ShardWriter:
    out = work / "views" / "shard-0.h5"
    records = list_imagenet(root)
    return ShardWriter(records, "warp", 0, views_cfg(**kw), SEED, out, out.with_suffix(".rejects.csv"), work / "parts")


def make_bag(work: Path) -> Path:
    writer = shard_writer(make_imagenet(work / "imagenet"), work)
    writer.run()
    return merge_shards([writer.out], work / "views" / "bag.h5")


def cell_settings(epochs: int = 2, **overrides):
    settings = resolve_pretrain_settings({**TRAIN, "checkpoint_every": 1, **overrides})
    cell = resolve_cell({"arch": "vit_mini_patch8", "anchors": 2, "anchor_mask": 0.25, "epochs": epochs}, settings)
    return cell, settings


def train_on_bag(bag: Path, state_dir: Path, output: Path, epochs: int = 2, dataset_cls=BagViewsDataset, **kw):
    cell, settings = cell_settings(epochs, **kw)
    data = dataset_cls(BagDataset(bag), img_size=32, anchors=2, target="either", seed=SEED)
    return train(cell, settings, data, seed=0, output=output, state_dir=state_dir)


def flip(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def captured_log():
    """Every log record of the pipeline's loggers, as text, while the block runs."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("cdgmae")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def raised(fn: Callable, *args, **kwargs) -> BaseException | None:
    try:
        fn(*args, **kwargs)
    except Exception as err:  # the case inspects what was raised
        return err
    return None


def short(err: BaseException | None) -> str:
    if err is None:
        return "no error"
    text = str(err).replace("\n", " ")
    return f"{type(err).__name__}: {text[:110]}"


# ---------------------------------------------------------------------------------------------
# the cases: (work dir) -> (observed, passed)

CASES: list[tuple[str, str, Callable[[Path], tuple[str, bool]]]] = []


def case(name: str, expected: str):
    def register(fn):
        CASES.append((name, expected, fn))
        return fn

    return register


class StopAfterOnePart(ShardWriter):
    """A views job that ends (``ShardStopped``) after committing its first part."""

    def write_part(self, *args, **kwargs):
        rejects = super().write_part(*args, **kwargs)
        self.stop.requested = "fault injection"
        return rejects


@case("flipped part", "part regenerated, shard unchanged")
def flipped_part(work):
    reference = shard_writer(make_imagenet(work / "imagenet"), work / "reference")
    reference.run()
    out = work / "views" / "shard-0.h5"
    stopped = StopAfterOnePart(
        list_imagenet(work / "imagenet"), "warp", 0, views_cfg(), SEED, out, out.with_suffix(".csv"), work / "parts"
    )
    with contextlib.suppress(ShardStopped):
        stopped.run()
    (part,) = (work / "parts").glob("part-*.h5")
    flip(part)
    again = shard_writer(work / "imagenet", work)
    with captured_log() as log:
        again.run()
    redone = any("is corrupt" in line and part.name in line for line in log)
    same = again.out.read_bytes() == reference.out.read_bytes()
    return f"corrupt part logged: {redone}, parts written {again.parts_written}, same shard: {same}", redone and same


@case("flipped shard", "merge refuses, naming the shard")
def flipped_shard(work):
    writer = shard_writer(make_imagenet(work / "imagenet"), work)
    writer.run()
    flip(writer.out)
    err = raised(merge_shards, [writer.out], work / "views" / "bag.h5")
    return short(err), isinstance(err, IntegrityError) and str(writer.out) in str(err)


@case("flipped bag.h5", "reading it fails, naming the bag")
def flipped_bag(work):
    bag = make_bag(work)
    flip(bag)
    err = raised(BagDataset, bag)
    return short(err), err is not None and str(bag) in str(err)


@case("flipped checkpoint.pth", "propagation fails, naming it")
def flipped_checkpoint(work):
    bag = make_bag(work)
    checkpoint = work / "pretrain" / "checkpoint.pth"
    train_on_bag(bag, work / "state", checkpoint, epochs=1)
    flip(checkpoint)
    err = raised(run_propagation, checkpoint, "davis", work / "davis", work / "propagation", {"figures": 0})
    return short(err), isinstance(err, IntegrityError) and str(checkpoint) in str(err)


@case("flipped last.pth", "not resumed; previous good state used")
def flipped_last(work):
    bag = make_bag(work)
    full = train_on_bag(bag, work / "state", work / "a.pth", epochs=2)
    flip(work / "state" / "last.pth")
    with captured_log() as log:
        again = train_on_bag(bag, work / "state", work / "b.pth", epochs=2)
    fell_back = any("previous good state" in line for line in log)
    same = again["loss"] == full["loss"]
    return f"fell back to previous.pth: {fell_back}, same loss curve: {same}", fell_back and same


def broken_bag_costs_nothing(work: Path, broken: Callable[[bytes], bytes]) -> tuple[str, bool]:
    bag = make_bag(work)
    checkpoint = work / "pretrain" / "checkpoint.pth"
    train_on_bag(bag, work / "state", checkpoint)
    finished, original = checkpoint.read_bytes(), bag.read_bytes()
    bag.write_bytes(broken(original))
    err = raised(train_on_bag, bag, work / "state", checkpoint)
    named = err is not None and str(bag) in str(err)
    checkpoint.unlink()  # Snakemake removes a failed job's outputs
    bag.write_bytes(original)
    with captured_log() as log:
        history = train_on_bag(bag, work / "state", checkpoint)
    resumed = any("resuming from" in line and "epoch 2" in line for line in log)
    same = checkpoint.read_bytes() == finished
    observed = f"{short(err)[:60]}; after restore resumed at the end: {resumed}, same bytes: {same}"
    return observed, named and resumed and same and len(history["loss"]) == 4


@case("truncated bag.h5", "fails naming the bag; restored bag -> no retraining")
def truncated_bag(work):
    return broken_bag_costs_nothing(work, lambda data: data[: len(data) // 2])


@case("zero-byte bag.h5", "fails naming the bag; restored bag -> no retraining")
def empty_bag(work):
    return broken_bag_costs_nothing(work, lambda data: b"")


@case("bad images: view generation", "both skipped and listed")
def bad_images_views(work):
    writer = shard_writer(make_imagenet(work / "imagenet", bad=True), work)
    writer.run()
    listed = sorted(Path(p).name for p in pd.read_csv(writer.rejects_path)["path"])
    return f"listed: {listed}", listed == ["corrupt.JPEG", "empty.JPEG"]


@case("bad images: CropMAE pretraining", "both skipped and listed")
def bad_images_cropmae(work):
    records = list_imagenet(make_imagenet(work / "imagenet", bad=True))
    data = GlobalToLocalDataset(records, img_size=32, seed=0, max_reject_fraction=0.25)
    shapes = {tuple(data[(0, i)].shape) for i in range(len(data))}
    listed = sorted(Path(row[2]).name for row in data.rejects.rows.values())
    return f"samples {shapes}, listed: {listed}", listed == ["corrupt.JPEG", "empty.JPEG"] and len(shapes) == 1


@case("bad images: SiamMAE frames", "both skipped and listed")
def bad_images_siammae(work):
    rng = np.random.default_rng(0)
    for v in range(4):  # two frames a video: every pair is (frame 0, frame 1)
        (work / "videos" / f"v{v}").mkdir(parents=True)
        for t in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(work / f"videos/v{v}/{t}.jpg")
    (work / "videos/v0/1.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(300))
    (work / "videos/v2/0.jpg").write_bytes(b"")
    data = VideoPairDataset(list_videos(work / "videos"), img_size=32, seed=0, max_reject_fraction=0.25)
    shapes = {tuple(data[(0, i)].shape) for i in range(len(data))}
    listed = sorted(str(Path(row[2]).relative_to(work)) for row in data.rejects.rows.values())
    return f"samples {shapes}, listed: {listed}", listed == ["videos/v0/1.jpg", "videos/v2/0.jpg"] and len(shapes) == 1


@case("bad images: k-NN step", "both skipped and listed, never neighbours")
def bad_images_knn(work):
    images = list_images(make_imagenet(work / "imagenet", bad=True))
    settings = {"name": "sift-grid", "image_size": 64, "patch_size": 16}
    out = find_neighbours(
        SiftGridEncoder(64, 16), images, 3, 4, 0, settings, state_dir=work / "state", max_reject_fraction=0.25
    )
    listed = sorted(Path(p).name for p in pd.read_csv(work / "state" / "rejects.csv")["path"])
    bad_rows = [i for i in range(len(images)) if Path(images.describe(i)).name in listed]
    never = not np.isin(out["neighbours"], bad_rows).any()
    return f"listed: {listed}, never a neighbour: {never}", listed == ["corrupt.JPEG", "empty.JPEG"] and never


@case("config typo", "config error naming the key")
def config_typo(work):
    err = raised(validate_config, {"pretrain": {"base_lrr": 1e-3}})
    return short(err), isinstance(err, ConfigError) and "base_lrr" in str(err)


@case("empty root path", "config error naming data.roots.imagenet")
def empty_root(work):
    err = raised(validate_config, {"data": {"roots": {"imagenet": ""}}})
    return short(err), isinstance(err, ConfigError) and "imagenet" in str(err)


@case("NaN loss", "stops naming the step; kept state finite")
def nan_loss(work):
    class NaNAfterEpoch1(BagViewsDataset):
        def __getitem__(self, key):
            x = super().__getitem__(key)
            return torch.full_like(x, float("nan")) if key[0] >= 1 else x

    bag = make_bag(work)
    err = raised(train_on_bag, bag, work / "state", work / "ck.pth", epochs=3, dataset_cls=NaNAfterEpoch1)
    kept = torch.load(work / "state" / "last.pth", weights_only=True)
    finite = all(torch.isfinite(v).all() for v in kept["model"].values())
    ok = isinstance(err, NonFiniteLossError) and "step 2" in str(err) and finite and kept["epoch"] == 1
    return f"{short(err)[:70]}; kept epoch {kept['epoch']} finite: {finite}", ok


@case("exploding finite loss", "stops on pretrain.divergence_factor")
def exploding_loss(work):
    bag = make_bag(work)
    err = raised(train_on_bag, bag, work / "state", work / "ck.pth", epochs=3, base_lr=100.0)
    kept = (
        torch.load(work / "state" / "last.pth", weights_only=True) if (work / "state" / "last.pth").exists() else None
    )
    healthy = kept is None or max(kept["history"]["loss"]) <= 10 * min(kept["history"]["loss"])
    return short(err), isinstance(err, (DivergedLossError, NonFiniteLossError)) and healthy


@case("killed job's temp file", "removed by the next write")
def killed_temp(work):
    target = work / "out.txt"
    child = os.fork()
    if child == 0:  # a writer killed inside atomic_path
        with atomic_path(target):
            os._exit(0)
    os.waitpid(child, 0)
    left = list(work.glob(".out.txt.*.tmp"))
    write_text_atomic(target, "done")
    after = list(work.glob(".out.txt.*.tmp"))
    return f"temporaries before {len(left)}, after the next write {len(after)}", len(left) == 1 and not after


@case("moved project dir", "training resumes, nothing redone")
def moved_project(work):
    project = work / "a"
    bag = make_bag(project)
    train_on_bag(bag, project / "state", project / "ck.pth")
    moved = work / "b"
    shutil.move(project, moved)
    with captured_log() as log:
        train_on_bag(moved / "views" / "bag.h5", moved / "state", moved / "ck.pth")
    resumed = any("resuming from" in line and "epoch 2" in line for line in log)
    return f"resumed at the end: {resumed}", resumed


@case("wrong dataset root", "layout error at workflow start")
def wrong_root(work):
    wrong = make_imagenet(work / "imagenet")  # an ImageNet folder given as the DAVIS root
    err = raised(check_layout, "davis", wrong)
    return short(err), isinstance(err, DatasetError) and str(wrong) in str(err)


# ---------------------------------------------------------------------------------------------


def run_case(fn: Callable[[Path], tuple[str, bool]]) -> tuple[str, bool]:
    with tempfile.TemporaryDirectory(prefix="fault-") as tmp:
        try:
            return fn(Path(tmp))
        except Exception as err:  # a crash of the case itself is a FAIL with its reason
            traceback.print_exc(file=sys.stderr)
            return f"case crashed: {short(err)}", False


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    rows = []
    for name, expected, fn in CASES:
        t0 = time.perf_counter()
        observed, passed = run_case(fn)
        rows.append((name, expected, observed, "PASS" if passed else "FAIL", f"{time.perf_counter() - t0:.1f}"))
    table = pd.DataFrame(rows, columns=["case", "expected", "observed", "result", "seconds"])
    with pd.option_context("display.max_colwidth", 120, "display.width", 250):
        print(table.to_string(index=False))
    failed = int((table["result"] == "FAIL").sum())
    print(f"\n{len(table) - failed}/{len(table)} passed")
    return failed


if __name__ == "__main__":
    sys.exit(main())
