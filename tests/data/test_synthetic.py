"""pipeline.data.synthetic and its scene modules: determinism, official formats, scene properties (tiny sizes)."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.cli import run
from pipeline.data import puppets, sprites, synthetic
from pipeline.data import readers as datasets
from pipeline.data.readers import JHMDB_JOINTS
from pipeline.data.vallists import read_vallist
from pipeline.palette import pascal_palette

TINY = {
    "imagenet": {"classes": 3, "images_per_class": 2, "size": 32},
    "videos": {"count": 2, "frames": 3, "height": 32, "width": 40},
    "davis": {"sequences": 2, "frames": 4, "height": 48, "width": 80, "max_objects": 3},
    "vip": {"videos": 2, "frames": 3, "height": 48, "width": 80},
    "jhmdb": {"classes": 2, "videos_per_class": 1, "frames": 4, "height": 48, "width": 64},
}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    base = tmp_path_factory.mktemp("synthetic")
    for name, cfg in TINY.items():
        synthetic.generate(name, base / "a" / name, cfg, seed=0)
    return base / "a"


@pytest.mark.parametrize("name", list(TINY))
def test_same_seed_byte_identical_other_seed_differs(generated, tmp_path, name):
    again = synthetic.generate(name, tmp_path / "b" / name, TINY[name], seed=0)
    other = synthetic.generate(name, tmp_path / "c" / name, TINY[name], seed=1)
    a, b, c = _tree(generated / name), _tree(tmp_path / "b" / name), _tree(tmp_path / "c" / name)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert again["seed"] == 0 and other["seed"] == 1
    # images/labels differ with the seed (the file names may too)
    images = [k for k in a if k.lower().endswith((".jpg", ".jpeg", ".png"))]
    assert any(k not in c or a[k] != c[k] for k in images)
    # no temporary folders left next to the output
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [name]


def test_manifest_records_settings_seed_counts(generated):
    m = json.loads((generated / "davis" / "manifest.json").read_text())
    assert m["dataset"] == "davis" and m["seed"] == 0
    assert m["settings"] == TINY["davis"]
    assert m["counts"]["sequences"] == 2 and m["counts"]["frames"] == 8


def test_imagenet_layout(generated):
    root = generated / "imagenet" / "train"
    classes = sorted(p.name for p in root.iterdir())
    assert classes == ["n00000000", "n00000001", "n00000002"]
    files = sorted(root.rglob("*.JPEG"))
    assert len(files) == 6
    assert files[0].name == "n00000000_0.JPEG"
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"


def test_videos_layout(generated):
    root = generated / "videos"
    vids = sorted(p for p in root.iterdir() if p.is_dir())
    assert [v.name for v in vids] == ["video_0000", "video_0001"]
    frames = sorted(vids[0].iterdir())
    assert [f.name for f in frames] == ["00000.jpg", "00001.jpg", "00002.jpg"]
    a, b = (np.asarray(Image.open(f), dtype=np.int16) for f in frames[:2])
    assert a.shape == (32, 40, 3)
    assert np.abs(a - b).mean() > 1.0  # camera and objects move


def test_davis_format(generated):
    root = generated / "davis"
    names = (root / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert names == sorted(names) and len(names) == 2
    palette = pascal_palette()
    assert palette[3:6] == [128, 0, 0] and palette[6:9] == [0, 128, 0]  # DAVIS object 1, 2
    for seq in names:
        frames = sorted((root / "JPEGImages" / "480p" / seq).glob("*.jpg"))
        labels = sorted((root / "Annotations" / "480p" / seq).glob("*.png"))
        assert [f.stem for f in frames] == [f.stem for f in labels] == ["00000", "00001", "00002", "00003"]
        first = None
        for path in labels:
            with Image.open(path) as im:
                assert im.mode == "P" and im.size == (80, 48)
                assert im.getpalette()[:30] == palette[:30]
                ids = np.array(im)
            assert ids.max() <= TINY["davis"]["max_objects"]
            first = ids if first is None else first
        k = int(first.max())
        assert k >= 1
        # objects are 1..K and all visible in frame 0 (the reference cannot predict unseen ids)
        assert set(np.unique(first)) == set(range(k + 1))
        last = np.array(Image.open(labels[-1]))
        assert (first != last).any()  # objects move


def test_davis_vallist(generated):
    root = generated / "davis"
    text = (root / "davis_vallist_480_880.txt").read_text()
    assert not text.endswith("\n")
    assert text.splitlines()[0] == "JPEGImages/480p/seq-000 Annotations/480p/seq-000"
    entries = read_vallist("davis", root / "davis_vallist_480_880.txt")
    assert [e.name for e in entries] == ["seq-000", "seq-001"]
    assert all(e.frames.is_dir() and e.labels.is_dir() for e in entries)


def test_vip_format(generated):
    root = generated / "vip"
    entries = read_vallist("vip", root / "vip_vallist.txt")
    assert len(entries) == 2
    seen = set()
    for e in entries:
        assert e.name.startswith("videos") and e.name[6:].isdigit()
        assert e.frames == root / "Images" / e.name
        assert e.labels == root / "Annotations" / "Category_ids" / e.name
        frames = sorted(e.frames.glob("*.jpg"))
        labels = sorted(e.labels.glob("*.png"))
        assert len(frames) == len(labels) == 3
        assert [f.stem for f in frames] == [f.stem for f in labels]
        for path in labels:
            with Image.open(path) as im:
                assert im.mode == "L"
                ids = np.array(im)
            assert ids.max() <= 19
            seen.update(np.unique(ids).tolist())
    assert 0 in seen and len(seen) >= 6  # background + several body parts


def test_jhmdb_format(generated):
    root = generated / "jhmdb"
    entries = read_vallist("jhmdb", root / "jhmdb_vallist.txt")
    first_line = (root / "jhmdb_vallist.txt").read_text().splitlines()[0]
    assert first_line.split()[0].endswith("joint_positions.mat")  # label first
    assert [e.name.split("/")[0] for e in entries] == ["brush_hair", "catch"]
    for e in entries:
        frames = sorted(e.frames.glob("*.png"))
        assert frames[0].name == "00001.png" and len(frames) == 4
        with Image.open(frames[0]) as im:
            assert im.size == (64, 48)
        pos = scipy.io.loadmat(e.labels)["pos_img"]
        assert pos.shape == (2, len(JHMDB_JOINTS), 4)
        # 1-based pixel coordinates inside the frame
        assert (pos >= 1).all() and (pos[0] <= 64).all() and (pos[1] <= 48).all()
        assert e.labels.read_bytes()[:50].startswith(b"MATLAB 5.0 MAT-file, written by")


def test_raw_colour_does_not_solve_propagation(generated):
    # 1-NN in RGB from frame 0 to later frames: with one colour palette per scene shared by the
    # background and all objects, colour alone must stay far from solving the task
    from scipy.spatial import cKDTree

    ds = datasets.DavisDataset(generated / "davis")
    scores = []
    for seq in ds.sequences:
        k = ds.num_objects(seq)
        f0 = ds.read_frame(ds.frames(seq)[0]).reshape(-1, 3).astype(float)
        l0 = ds.read_annotation(ds.annotations(seq)[0]).ravel()
        tree = cKDTree(f0)
        for t in range(1, len(ds.frames(seq))):
            gt = ds.read_annotation(ds.annotations(seq)[t])
            _, nn = tree.query(ds.read_frame(ds.frames(seq)[t]).reshape(-1, 3).astype(float))
            pred = l0[nn].reshape(gt.shape)
            for obj in range(1, k + 1):
                union = ((pred == obj) | (gt == obj)).sum()
                scores.append(((pred == obj) & (gt == obj)).sum() / union if union else 1.0)
    assert np.mean(scores) < 0.5


def test_similarity_maps_anchors():
    a, b = np.array([2.0, 3.0]), np.array([7.0, 3.0])
    A, B = np.array([10.0, 10.0]), np.array([10.0, 20.0])
    M = sprites.similarity(a, b, A, B)
    np.testing.assert_allclose(sprites.apply(M, np.stack([a, b])), np.stack([A, B]), atol=1e-9)
    # a similarity: scale 2, rotation 90 degrees
    np.testing.assert_allclose(M[:, :2], [[0, -2], [2, 0]], atol=1e-9)
    C = np.array([[1.0, 0, 5], [0, 1.0, -1]])
    np.testing.assert_allclose(sprites.apply(sprites.compose(C, M), a[None]), [[15, 9]], atol=1e-9)


def test_puppet_bones_are_rigid():
    rng = np.random.default_rng(0)
    T = 12
    scale = np.linspace(40, 60, T)
    pelvis = np.stack([np.linspace(50, 70, T), np.full(T, 60.0)], 1)
    puppet = puppets.Puppet(rng, 50.0, T, pelvis, scale, puppets.action_family(3, 0))
    joints = puppet.joints_all()
    assert joints.shape == (T, 15, 2)
    j = {n: i for i, n in enumerate(JHMDB_JOINTS)}
    for side in ("right", "left"):
        for a, b, bone in (
            ("shoulder", "elbow", "upper_arm"),
            ("elbow", "wrist", "forearm"),
            ("hip", "knee", "thigh"),
            ("knee", "ankle", "shin"),
        ):
            length = np.linalg.norm(joints[:, j[f"{side}_{a}"]] - joints[:, j[f"{side}_{b}"]], axis=1)
            np.testing.assert_allclose(length, puppets.BODY[bone] * scale, rtol=1e-9)
    # the limbs articulate: the elbow angle changes over time
    v1 = joints[:, j["right_elbow"]] - joints[:, j["right_shoulder"]]
    assert np.ptp(np.arctan2(v1[:, 1], v1[:, 0])) > 0.05


def test_textures_share_colour_statistics():
    # background and objects come from one generator: no colour separates them on average
    rng = np.random.default_rng(0)
    means = np.array([sprites.make_texture(rng, 24, 24).reshape(-1, 3).mean(0) for _ in range(200)])
    assert means.std(0).min() > 20  # colours vary widely between textures
    assert np.abs(means.mean(0) - 127.5).max() < 15  # and are centred (no per-role tint)


def test_cli_replaces_existing_output(tmp_path):
    out = tmp_path / "davis"
    settings = json.dumps({"sequences": 1, "frames": 2, "height": 40, "width": 56, "max_objects": 1})
    run("data", ["synthetic", "--dataset", "davis", "--out", str(out), "--settings", settings, "--seed", "3"])
    first = _tree(out)
    (out / "stale.txt").write_text("old")
    run("data", ["synthetic", "--dataset", "davis", "--out", str(out), "--settings", settings, "--seed", "3"])
    assert _tree(out) == first  # stale file gone, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["davis"]


def test_bad_settings_name_the_key():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="data.synthetic.davis.bogus"):
        synthetic.generate("davis", "/nonexistent/never", {"bogus": 1})
    with pytest.raises(ConfigError, match="data.synthetic.vip.frames"):
        synthetic.generate("vip", "/nonexistent/never", {"frames": 0})
