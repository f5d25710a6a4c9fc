"""pipeline.data.readers, .vallists, .check: readers round-trip on generated data; malformed roots name the path."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.cli import run
from pipeline.data import readers as datasets
from pipeline.data import synthetic
from pipeline.data.readers import (
    DatasetError,
    DavisDataset,
    JhmdbDataset,
    VipDataset,
    list_imagenet,
    list_videos,
)
from pipeline.data.vallists import read_vallist, write_vallist
from pipeline.palette import pascal_palette

TINY = {
    "imagenet": {"classes": 3, "images_per_class": 3, "size": 24},
    "videos": {"count": 2, "frames": 3, "height": 24, "width": 32},
    "davis": {"sequences": 3, "frames": 3, "height": 40, "width": 64, "max_objects": 2},
    "vip": {"videos": 3, "frames": 3, "height": 40, "width": 64},
    "jhmdb": {"classes": 2, "videos_per_class": 2, "frames": 3, "height": 48, "width": 64},
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    for name, cfg in TINY.items():
        synthetic.generate(name, base / name, cfg, seed=5)
    return {name: base / name for name in TINY}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# round trips on the generated datasets


def test_list_imagenet(roots):
    recs = list_imagenet(roots["imagenet"])
    assert len(recs) == 9
    assert [r.image_id for r in recs] == sorted(r.image_id for r in recs)
    assert recs[0].image_id == "n00000000/n00000000_0"
    assert {r.label for r in recs} == {0, 1, 2}
    assert all(r.path.parent.name == f"n{r.label:08d}" for r in recs)


def test_list_videos(roots):
    vids = list_videos(roots["videos"])
    assert [v.name for v in vids] == ["video_0000", "video_0001"]
    assert [f.name for f in vids[0].frames] == ["00000.jpg", "00001.jpg", "00002.jpg"]


def test_davis_reader(roots):
    ds = DavisDataset(roots["davis"])
    assert ds.sequences == ["seq-000", "seq-001", "seq-002"]
    for seq in ds.sequences:
        assert len(ds.frames(seq)) == len(ds.annotations(seq)) == 3
        frame = ds.read_frame(ds.frames(seq)[0])
        assert frame.shape == (40, 64, 3) and frame.dtype == np.uint8
        # RGB: the reverse of OpenCV's BGR
        np.testing.assert_array_equal(frame, cv2.imread(str(ds.frames(seq)[0]))[:, :, ::-1])
        ids = ds.read_annotation(ds.annotations(seq)[0])
        assert ids.shape == (40, 64) and ids.dtype == np.uint8
        np.testing.assert_array_equal(ids, np.array(Image.open(ds.annotations(seq)[0])))
        assert 1 <= ds.num_objects(seq) <= 2 and ds.num_objects(seq) == ids.max()
    assert DavisDataset(roots["davis"], sequences=["seq-001"]).sequences == ["seq-001"]


def test_davis_num_objects_ignores_void(tmp_path, roots):
    root = _copy(roots["davis"], tmp_path / "davis")
    path = DavisDataset(root).annotations("seq-000")[0]
    ids = np.array(Image.open(path))
    ids[0, 0] = 255  # void pixels do not count as an object
    im = Image.fromarray(ids)
    im.putpalette(pascal_palette())
    im.save(path)
    assert DavisDataset(root).num_objects("seq-000") == ids[ids != 255].max()


def test_vip_reader(roots):
    ds = VipDataset(roots["vip"])
    numbers = [int(v[6:]) for v in ds.videos]
    assert numbers == sorted(numbers)  # default order: by video number
    listed = [e.name for e in read_vallist("vip", roots["vip"] / "vip_vallist.txt")]
    assert sorted(listed) == sorted(ds.videos)
    assert VipDataset(roots["vip"], videos=listed).videos == listed
    v = ds.videos[0]
    assert [p.stem for p in ds.frames(v)] == [p.stem for p in ds.annotations(v)]
    ids = ds.read_annotation(ds.annotations(v)[0])
    assert ids.dtype == np.uint8 and ids.max() < len(datasets.VIP_CLASSES)


def test_jhmdb_reader(roots):
    ds = JhmdbDataset(roots["jhmdb"])
    assert len(ds) == 4 and ds.videos == sorted(ds.videos)
    assert all(v.count("/") == 1 for v in ds.videos)
    from_list = JhmdbDataset(roots["jhmdb"], split_list=roots["jhmdb"] / "jhmdb_vallist.txt")
    assert sorted(from_list.videos) == ds.videos
    v = ds.videos[0]
    assert ds.frames(v)[0].name == "00001.png" and len(ds.frames(v)) == 3
    pos = ds.read_joints(v)
    assert pos.shape == (2, 15, 3) and pos.dtype == np.float64
    assert ds.read_frame(ds.frames(v)[0]).shape == (48, 64, 3)


@pytest.mark.parametrize("kind", ["davis", "vip", "jhmdb"])
def test_vallist_round_trip(roots, tmp_path, kind, monkeypatch):
    root = roots[kind]
    expected = read_vallist(kind, next(root.glob(f"{kind}_vallist*.txt")))
    names = [e.name for e in expected]
    # absolute root in the lines
    lines = write_vallist(kind, root, tmp_path / "abs.txt", names=names)
    assert all(len(line.split(" ")) == 2 for line in lines)
    assert read_vallist(kind, tmp_path / "abs.txt") == expected
    # reference style: paths relative to the working directory, list stored elsewhere
    monkeypatch.chdir(root.parent)
    write_vallist(kind, Path(root.name), tmp_path / "ref.txt", names=names)
    got = read_vallist(kind, tmp_path / "ref.txt")
    assert [(e.name, e.frames.resolve(), e.labels.resolve()) for e in got] == [
        (e.name, e.frames.resolve(), e.labels.resolve()) for e in expected
    ]


def test_davis_vallist_defaults_to_val_txt_order(roots, tmp_path):
    lines = write_vallist("davis", roots["davis"], tmp_path / "davis.txt")
    assert [line.split()[0].rsplit("/", 1)[1] for line in lines] == ["seq-000", "seq-001", "seq-002"]
    assert not (tmp_path / "davis.txt").read_text().endswith("\n")


def test_vip_frames_sorted_as_integers(tmp_path):
    img = tmp_path / "Images" / "videos7"
    ann = tmp_path / "Annotations" / "Category_ids" / "videos7"
    img.mkdir(parents=True)
    ann.mkdir(parents=True)
    for stem in ("1", "2", "10"):
        cv2.imwrite(str(img / f"{stem}.jpg"), np.zeros((4, 4, 3), np.uint8))
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(ann / f"{stem}.png")
    ds = VipDataset(tmp_path)
    assert [p.stem for p in ds.frames("videos7")] == ["1", "2", "10"]


def test_read_frame_is_rgb(tmp_path):
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    rgb = datasets.read_rgb(tmp_path / "red.png")
    assert (rgb[..., 0] == 255).all() and (rgb[..., 1:] == 0).all()


# ---------------------------------------------------------------------------------------------
# malformed roots and files


def test_missing_root(tmp_path):
    for cls in (DavisDataset, VipDataset, JhmdbDataset):
        with pytest.raises(DatasetError, match="expected layout") as err:
            cls(tmp_path / "nowhere")
        assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(DatasetError, match="train"):
        list_imagenet(tmp_path)
    with pytest.raises(DatasetError, match="nowhere"):
        list_videos(tmp_path / "nowhere")


@pytest.mark.fault
@pytest.mark.parametrize(
    "kind, wrong",
    # (a videos root one level too deep is a folder of frames: the empty case's message)
    [(k, "empty") for k in ("imagenet", "videos", "davis", "vip", "jhmdb")]
    + [(k, "one-level-too-deep") for k in ("imagenet", "davis", "vip", "jhmdb")],
)
def test_a_wrong_root_is_named_with_its_expected_layout(roots, tmp_path, kind, wrong):
    """The parse-time check (``check_layout``) of an empty root, or a root pointed one level into
    the dataset, is a DatasetError naming the path and the expected layout, never a raw
    FileNotFoundError."""
    from pipeline.data.layouts import LAYOUTS, check_layout

    if wrong == "empty":
        root = tmp_path / "empty"
        root.mkdir()
    else:
        root = next(p for p in sorted(roots[kind].iterdir()) if p.is_dir())
    with pytest.raises(DatasetError) as err:
        check_layout(kind, root)
    assert str(root) in str(err.value) and LAYOUTS[kind] in str(err.value)


def test_davis_missing_annotations_folder(roots, tmp_path):
    root = _copy(roots["davis"], tmp_path / "davis")
    shutil.rmtree(root / "Annotations")
    with pytest.raises(DatasetError) as err:
        DavisDataset(root)
    msg = str(err.value)
    assert str(root / "Annotations" / "480p") in msg and "expected layout" in msg


def test_davis_empty_sequence(roots, tmp_path):
    root = _copy(roots["davis"], tmp_path / "davis")
    for f in (root / "JPEGImages" / "480p" / "seq-001").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="no .jpg frames") as err:
        DavisDataset(root)
    assert str(root / "JPEGImages" / "480p" / "seq-001") in str(err.value)


def test_davis_missing_split_and_sequence(roots, tmp_path):
    root = _copy(roots["davis"], tmp_path / "davis")
    with pytest.raises(DatasetError, match="seq-999"):
        DavisDataset(root, sequences=["seq-999"])
    (root / "ImageSets" / "2017" / "val.txt").unlink()
    with pytest.raises(DatasetError, match="val.txt"):
        DavisDataset(root)


def test_vip_missing_annotation_video(roots, tmp_path):
    root = _copy(roots["vip"], tmp_path / "vip")
    video = VipDataset(root).videos[1]
    shutil.rmtree(root / "Annotations" / "Category_ids" / video)
    with pytest.raises(DatasetError, match=video):
        VipDataset(root)


def test_jhmdb_missing_joints_and_bad_shape(roots, tmp_path):
    root = _copy(roots["jhmdb"], tmp_path / "jhmdb")
    video = JhmdbDataset(root).videos[0]
    mat = root / "joint_positions" / video / "joint_positions.mat"
    scipy.io.savemat(mat, {"pos_img": np.zeros((2, 14, 3))})
    with pytest.raises(DatasetError, match=r"\(2, 15, T\)") as err:
        JhmdbDataset(root).read_joints(video)
    assert str(mat) in str(err.value)
    mat.unlink()
    with pytest.raises(DatasetError, match="joint_positions.mat"):
        JhmdbDataset(root, split_list=[video])


def test_corrupt_files_name_the_path(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="bad.jpg"):
        datasets.read_rgb(bad)
    with pytest.raises(DatasetError, match="bad.jpg"):
        datasets.read_id_png(bad)
    rgb_png = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(rgb_png)
    with pytest.raises(DatasetError, match="mode RGB"):
        datasets.read_id_png(rgb_png)


def test_malformed_vallists(tmp_path):
    three = tmp_path / "davis.txt"
    three.write_text("a b c")
    with pytest.raises(DatasetError, match="davis.txt:1"):
        read_vallist("davis", three)
    frames_first = tmp_path / "jhmdb.txt"
    frames_first.write_text("Rename_Images/c/v joint_positions/c/v/joint_positions.mat")
    with pytest.raises(DatasetError, match="label first"):
        read_vallist("jhmdb", frames_first)
    with pytest.raises(DatasetError, match="not found"):
        read_vallist("vip", tmp_path / "missing.txt")


def test_check_cli(roots, capsys, tmp_path):
    run("data", ["check", "--kind", "davis", "--root", str(roots["davis"])])
    out = capsys.readouterr().out
    assert "sequences: 3" in out and "annotations: 9" in out
    run(
        "data",
        [
            "check",
            "--kind",
            "jhmdb",
            "--root",
            str(roots["jhmdb"]),
            "--deep",
            "--list",
            str(roots["jhmdb"] / "jhmdb_vallist.txt"),
        ],
    )
    assert "videos: 4" in capsys.readouterr().out
    run("data", ["check", "--kind", "vip", "--root", str(roots["vip"]), "--deep"])
    assert "classes_present" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="Annotations"):
        run("data", ["check", "--kind", "vip", "--root", str(roots["davis"])])


def test_jhmdb_official_split_and_vallist_cli(roots, tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    videos = JhmdbDataset(roots["jhmdb"]).videos  # 2 classes x 2 videos
    by_class = {}
    for v in videos:
        cls, name = v.split("/")
        by_class.setdefault(cls, []).append(name)
    for cls, names in by_class.items():
        # first video train (1), second test (2)
        (splits / f"{cls}_test_split1.txt").write_text(f"{names[0]}.avi 1\n{names[1]}.avi 2\n")
    test = datasets.jhmdb_split_videos(splits, 1)
    assert test == [f"{cls}/{names[1]}" for cls, names in sorted(by_class.items())]
    assert datasets.jhmdb_split_videos(splits, 1, "train") == [
        f"{cls}/{names[0]}" for cls, names in sorted(by_class.items())
    ]
    with pytest.raises(DatasetError, match="split2"):
        datasets.jhmdb_split_videos(splits, 2)
    out = tmp_path / "jhmdb_vallist.txt"
    run(
        "data",
        ["vallist", "--kind", "jhmdb", "--root", str(roots["jhmdb"]), "--out", str(out), "--jhmdb-splits", str(splits)],
    )
    assert [e.name for e in read_vallist("jhmdb", out)] == test
    assert JhmdbDataset(roots["jhmdb"], split_list=out).videos == test


def test_shallow_layout_check_names_the_missing_folder(tmp_path, roots):
    """What the workflow runs on every configured root when it starts (a few stats, no listing)."""
    from pipeline.data.layouts import check_layout

    for kind, root in roots.items():
        check_layout(kind, root)  # the synthetic roots are in the official layouts
    with pytest.raises(DatasetError, match=r"missing JPEGImages/480p folder: .*\n  expected layout"):
        check_layout("davis", tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="no sub-folders"):
        check_layout("imagenet", tmp_path)


def test_read_rgb_refuses_truncated_and_empty_jpegs_as_pil_does(tmp_path):
    """OpenCV's imread fills a truncated JPEG with grey and returns it; the reader refuses it, as the
    PIL readers do, so one bad-image policy holds for every reader."""
    img = (np.indices((64, 64)).sum(0) % 256).astype(np.uint8)[..., None].repeat(3, -1)
    good = tmp_path / "good.jpg"
    Image.fromarray(img).save(good, quality=95)
    np.testing.assert_array_equal(datasets.read_rgb(good), np.asarray(Image.open(good).convert("RGB")))
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * 0.9)])
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("cut.jpg", "empty.jpg", "missing.jpg"):
        with pytest.raises(DatasetError, match=name):
            datasets.read_rgb(tmp_path / name)
