"""Folder scorers (pipeline.propagation.score) on tiny hand-built datasets in the official layouts."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import run
from pipeline.propagation import score
from pipeline.propagation.score import ScoreError

H, W = 20, 30


def _save_ids(path, ids, mode="P"):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), mode="L")
    if mode == "P":
        im = im.convert("P")
        im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255] * (3 * 253))
    im.save(path)


def _save_jpg(path, hw=(H, W)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*hw, 3), 127, np.uint8)).save(path)


def _obj(box, value=1, hw=(H, W)):
    ids = np.zeros(hw, np.uint8)
    y0, y1, x0, x1 = box
    ids[y0:y1, x0:x1] = value
    return ids


# ---------------------------------------------------------------------------- DAVIS


@pytest.fixture
def davis(tmp_path):
    """Sequence A: 1 object; sequence B: 2 objects (ids 1, 2) plus a void (255) border; 5 frames."""
    root = tmp_path / "davis"
    gts = {}
    a = _obj((4, 10, 4, 12))
    b = _obj((2, 6, 2, 6)) + _obj((10, 16, 14, 24), 2)
    b[0, :] = 255
    for seq, gt in (("A", a), ("B", b)):
        gts[seq] = gt
        for t in range(5):
            _save_jpg(root / "JPEGImages/480p" / seq / f"{t:05d}.jpg")
            _save_ids(root / "Annotations/480p" / seq / f"{t:05d}.png", gt)
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("A\nB\n")
    return root, gts


def _write_davis_results(res, gts, size=None):
    """A perfect on scored frames 1-3; B: object 1 half-predicted in frame 2, object 2 never."""
    for seq, gt in gts.items():
        gt = np.where(gt == 255, 0, gt)
        for t in (0, 1, 2, 3):  # frame 4 (last) is absent: it is not scored
            pred = gt.copy()
            if seq == "B":
                pred[pred == 2] = 0
                if t == 2:
                    pred[2:6, 4:6] = 0  # 8 of 16 px of object 1 -> J 0.5
            if t == 0:
                pred[:] = 0  # frame 0 is not scored either
            if size is not None:
                pred = np.array(Image.fromarray(pred).resize(size[::-1], Image.NEAREST))
            _save_ids(res / seq / f"{t:05d}.png", pred)


def test_davis_global_weights_objects_equally(davis, tmp_path):
    root, gts = davis
    res = tmp_path / "res"
    _write_davis_results(res, gts)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "global_results-val.csv").write_text("J&F-Mean\n0.999\n")  # stale: must not be reused
    r = score.davis_scores(root, res, out)
    g = r["global"].iloc[0]
    j_b1 = (1 + 0.5 + 1) / 3
    assert g["J-Mean"] == pytest.approx((1 + j_b1 + 0) / 3)  # per sequence: (1 + (j_b1+0)/2)/2
    assert g["J-Recall"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # 0.5 is not > 0.5
    assert r["per_sequence"]["Sequence"].tolist() == ["A_1", "B_1", "B_2"]
    np.testing.assert_allclose(r["per_sequence"]["J-Mean"], [1.0, j_b1, 0.0])
    f = r["per_sequence"]["F-Mean"].to_numpy()
    assert f[0] == 1.0 and f[2] == 0.0 and 0 < f[1] < 1
    assert g["F-Mean"] == pytest.approx(f.mean())
    assert g["J&F-Mean"] == pytest.approx((g["J-Mean"] + g["F-Mean"]) / 2)

    csv = pd.read_csv(out / "global_results-val.csv")
    assert list(csv.columns) == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    assert csv["J-Mean"].iloc[0] == pytest.approx(round(g["J-Mean"], 3))
    seq_csv = pd.read_csv(out / "per-sequence_results-val.csv")
    assert list(seq_csv.columns) == ["Sequence", "J-Mean", "F-Mean"] and len(seq_csv) == 3
    info = json.loads((out / "scoring.json").read_text())
    assert info["gt_mode"] == "native" and info["frames_scored"] == 6 and info["objects"] == 3
    assert info["boundary_tolerance_px"] == {"A": 1, "B": 1}


def test_davis_resized_gt_mode(davis, tmp_path):
    root, gts = davis
    res = tmp_path / "res"
    _write_davis_results(res, {"A": gts["A"]}, size=(40, 60))
    out = tmp_path / "out"
    r = score.davis_scores(root, res, out, gt_mode="resized", size=(40, 60), sequences=["A"])
    assert r["global"]["J&F-Mean"].iloc[0] == 1.0
    info = json.loads((out / "scoring.json").read_text())
    assert info["gt_mode"] == "resized" and info["gt_size"] == [40, 60]
    # native-size predictions cannot be scored against the resized GT
    _write_davis_results(tmp_path / "native", {"A": gts["A"]})
    with pytest.raises(ScoreError, match=r"differs from the ground truth.*A/00001\.png"):
        score.davis_scores(root, tmp_path / "native", None, gt_mode="resized", size=(40, 60), sequences=["A"])


def test_davis_malformed_results_name_the_file(davis, tmp_path):
    root, gts = davis
    res = tmp_path / "res"
    _write_davis_results(res, gts)
    bad = np.where(gts["A"] == 255, 0, gts["A"])
    bad[0, 0] = 2  # A has one object
    _save_ids(res / "A" / "00002.png", bad)
    with pytest.raises(ScoreError, match=r"predicted id 2 above the 1 object.*A/00002\.png"):
        score.davis_scores(root, res)
    _write_davis_results(res, gts)
    (res / "B" / "00003.png").unlink()
    with pytest.raises(ScoreError, match=r"missing prediction: .*B/00003\.png"):
        score.davis_scores(root, res)
    _write_davis_results(res, gts)
    _save_ids(res / "A" / "00001.png", np.zeros((H + 1, W), np.uint8))
    with pytest.raises(ScoreError, match=r"differs from the ground truth.*A/00001\.png"):
        score.davis_scores(root, res)


def test_davis_cli(davis, tmp_path):
    root, gts = davis
    res = tmp_path / "res"
    _write_davis_results(res, gts)
    out = tmp_path / "cli"
    davis = ["score", "davis", "--davis-root", str(root), "--output-dir", str(out)]
    run("propagation", [*davis, "--results", str(res), "--gt-size", str(H), str(W)])
    assert json.loads((out / "scoring.json").read_text())["gt_mode"] == "resized"
    with pytest.raises(SystemExit):
        run("propagation", [*davis, "--results", str(tmp_path / "missing")])


# ---------------------------------------------------------------------------- VIP


def test_vip_miou_from_one_confusion_matrix(tmp_path):
    root = tmp_path / "vip"
    gt1 = np.zeros((4, 6), np.uint8)
    gt1[:, 3:] = 2  # 12 px background, 12 px class 2
    gt2 = gt1.copy()
    gt2[0, :] = 255  # ignored
    for stem, gt in ((1, gt1), (2, gt2)):
        _save_jpg(root / "Images/videos7" / f"{stem}.jpg", (4, 6))
        _save_ids(root / "Annotations/Category_ids/videos7" / f"{stem}.png", gt, mode="L")
    res = tmp_path / "res"
    pred1 = gt1.copy()
    pred1[:, 2] = 5  # 4 background px -> class 5
    pred2 = np.where(gt2 == 255, 3, gt2)  # class 3 only on ignored px
    pred2 = np.repeat(np.repeat(pred2, 2, 0), 2, 1)  # at 2x: PIL-nearest back to GT size
    _save_ids(res / "videos7/1.png", pred1, mode="L")
    _save_ids(res / "videos7/2.png", pred2, mode="L")
    out = tmp_path / "out"
    r = score.vip_scores(root, res, out)
    # background: GT 12 + 9 = 21 px, TP 8 + 9 = 17, predicted 17 -> 17/21; class 2: 21/21;
    # class 5: predicted only -> 0; class 3 only on ignored pixels and the rest absent -> NaN
    iou = r["per_class"]["iou"].to_numpy()
    assert iou[0] == pytest.approx(17 / 21) and iou[2] == 1.0 and iou[5] == 0.0
    assert np.isnan(iou[3]) and np.isnan(iou[1])
    assert r["miou"] == pytest.approx((17 / 21 + 1 + 0) / 3)
    csv = pd.read_csv(out / "miou.csv")
    assert csv.columns[0] == "mIoU" and csv["mIoU"].iloc[0] == pytest.approx(r["miou"])
    assert len(csv.columns) == 21
    assert json.loads((out / "scoring.json").read_text())["resized_predictions"] == 1

    _save_ids(res / "videos7/2.png", np.full((4, 6), 20, np.uint8), mode="L")
    with pytest.raises(ScoreError, match=r"class 20 outside 0..19: .*videos7/2\.png"):
        score.vip_scores(root, res)
    (res / "videos7/2.png").unlink()
    with pytest.raises(ScoreError, match=r"missing prediction: .*videos7/2\.png"):
        score.vip_scores(root, res)


# ---------------------------------------------------------------------------- JHMDB


def _save_mat(path, pos):
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"pos_img": pos})


def test_jhmdb_pck_on_videos_present(tmp_path):
    root = tmp_path / "jhmdb"
    t = 3
    base = np.stack([np.r_[np.linspace(10, 13, 14), 11.0], np.r_[np.linspace(20, 24, 14), 22.0]])
    gt = np.repeat(base[:, :, None], t, axis=2)  # box diagonal 5 -> normalizer 3
    for video in ("walk/v1", "walk/v2"):  # v2 has no result: not scored
        for k in range(1, t + 1):
            _save_jpg(root / "Rename_Images" / video / f"{k:05d}.png", (24, 32))
        _save_mat(root / "joint_positions" / video / "joint_positions.mat", gt)
    pred = gt.copy()
    pred[:, :, 0] += 40.0  # frame 0: excluded
    pred[:, 1, 1] += [0.3, 0.4]  # 0.5 / 3 = 0.167
    pred[:, 2, 2] += [0.0, 1.2]  # 1.2 / 3 = 0.4 (inside 0.5 only)
    pred[:, 4, 1] = np.nan  # not placed: invisible
    res = tmp_path / "res"
    _save_mat(res / "walk/v1/joint_positions.mat", pred)
    out = tmp_path / "out"
    r = score.jhmdb_scores(root, res, out)
    table = r["pck"].set_index("alpha")
    assert table.loc[0.1, "PCK"] == pytest.approx((13 * 100 + 2 * 50) / 15)
    assert table.loc[0.2, "PCK"] == pytest.approx((14 * 100 + 50) / 15)
    assert table.loc[0.5, "PCK"] == pytest.approx(100.0)
    assert table.loc[0.1, "belly"] == 50.0 and table.loc[0.1, "right_shoulder"] == 100.0
    assert r["info"]["videos"] == 1
    csv = pd.read_csv(out / "pck.csv")
    assert csv["alpha"].tolist() == [0.1, 0.2, 0.3, 0.4, 0.5] and "PCK" in csv.columns

    _save_mat(res / "walk/v1/joint_positions.mat", pred[:, :, :2])
    with pytest.raises(ScoreError, match=r"shape .*walk/v1/joint_positions\.mat"):
        score.jhmdb_scores(root, res)
    _save_mat(res / "run/v9/joint_positions.mat", pred)  # no such GT video
    with pytest.raises(Exception, match="run/v9"):
        score.jhmdb_scores(root, res)
