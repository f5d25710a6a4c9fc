"""Hand-computed cases for the DAVIS / VIP / JHMDB metrics (pipeline.propagation.metrics)."""

import numpy as np
import pytest

from pipeline.propagation import metrics as m

# ---------------------------------------------------------------------------- J


def test_iou_small_masks_by_hand():
    gt = np.zeros((4, 4), bool)
    gt[1:3, 1:3] = True  # 4 pixels
    pred = np.zeros((4, 4), bool)
    pred[1:3, 2:4] = True  # 4 pixels, 2 shared -> union 6
    assert m.db_eval_iou(gt, pred) == pytest.approx(2 / 6)
    assert m.db_eval_iou(gt, gt) == 1.0
    assert m.db_eval_iou(gt, np.zeros_like(gt)) == 0.0


def test_iou_empty_union_is_one_and_batches():
    empty = np.zeros((3, 5), bool)
    assert m.db_eval_iou(empty, empty) == 1.0
    gt = np.stack([empty, np.eye(3, 5, dtype=bool)])
    pred = np.stack([empty, np.zeros((3, 5), bool)])
    np.testing.assert_array_equal(m.db_eval_iou(gt, pred), [1.0, 0.0])


def test_frame_scores_per_object_by_hand():
    gt = np.zeros((6, 6), np.uint8)
    gt[0:2, 0:2] = 1  # object 1: 4 px
    gt[3:6, 3:6] = 2  # object 2: 9 px
    gt[0, 5] = 3  # id above the object count: belongs to no object
    pred = np.zeros((6, 6), np.uint8)
    pred[0:2, 0:3] = 1  # 6 px, 4 shared -> J 4/6
    pred[4:6, 4:6] = 2  # 4 px inside object 2 -> J 4/9
    j, f = m.davis_frame_scores(gt, pred, n_objects=3)
    # object 3 (one GT pixel) is never predicted: J 0, and one boundary empty -> F 0
    np.testing.assert_allclose(j, [4 / 6, 4 / 9, 0.0])
    assert f.shape == (3,) and f[2] == 0.0
    # with two objects the GT id 3 belongs to no object: object 1 and 2 are unchanged
    j2, _ = m.davis_frame_scores(gt, pred, n_objects=2)
    np.testing.assert_allclose(j2, [4 / 6, 4 / 9])
    with pytest.raises(ValueError, match="0..1"):
        m.davis_frame_scores(gt, pred, n_objects=1)


# ---------------------------------------------------------------------------- F


def test_disk_and_tolerances():
    k = m.disk_kernel(8)
    assert k.shape == (17, 17) and int(k.sum()) == 197
    assert m.boundary_tolerance((480, 854)) == 8
    assert m.boundary_tolerance((480, 880)) == 9
    assert m.boundary_tolerance((480, 910)) == 9
    assert m.boundary_tolerance((480, 1152)) == 10
    assert m.boundary_tolerance((480, 880), bound_th=3) == 3


def test_seg2bmap_by_hand():
    seg = np.zeros((4, 4), bool)
    seg[1:3, 1:3] = True
    expected = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(m.seg2bmap(seg), expected)
    # last row looks right only, last column looks down only, bottom-right corner never
    full = np.ones((3, 3), bool)
    np.testing.assert_array_equal(m.seg2bmap(full), np.zeros((3, 3), bool))
    corner = np.zeros((3, 3), bool)
    corner[2, 2] = True
    exp = np.zeros((3, 3), bool)
    exp[1, 1] = exp[1, 2] = exp[2, 1] = True
    np.testing.assert_array_equal(m.seg2bmap(corner), exp)


def test_sparse_boundaries_equal_seg2bmap_per_object():
    rng = np.random.default_rng(3)
    for h, w, k in ((7, 9, 3), (16, 5, 4), (1, 6, 2), (30, 40, 5)):
        ids = rng.integers(0, k + 2, (h, w))  # ids above k belong to no object
        ids[: h // 2, : w // 2] = 1  # plus a solid block touching two borders
        points = m.boundary_points(ids, k)
        for obj in range(1, k + 1):
            dense = np.zeros((h, w), bool)
            dense[points[obj - 1]] = True
            np.testing.assert_array_equal(dense, m.seg2bmap(ids == obj), err_msg=f"{h}x{w} object {obj}")


def _square(shape, dx=0):
    mask = np.zeros(shape, bool)
    mask[100:200, 100 + dx : 200 + dx] = True
    return mask


@pytest.mark.parametrize(
    "shape, shift, expected",
    [
        # GT outline: 400 px. Shift by tol+1: the far column (99 px) plus its two corner pixels miss,
        # and the near column misses all rows more than tol from the top/bottom edges (99 - 2*tol).
        ((480, 854), 8, 1.0),
        ((480, 854), 9, (400 - (2 + 99 + 99 - 2 * 8)) / 400),  # 0.54
        ((480, 880), 9, 1.0),
        ((480, 880), 10, (400 - (2 + 99 + 99 - 2 * 9)) / 400),  # 0.545
    ],
)
def test_f_shift_inside_and_outside_tolerance(shape, shift, expected):
    gt = _square(shape)
    pred = _square(shape, shift)
    assert m.f_measure(pred, gt) == pytest.approx(expected, abs=1e-12)
    # precision and recall are symmetric here, so the frame scorer must agree
    gt_ids = gt.astype(np.uint8)
    pred_ids = pred.astype(np.uint8)
    _, f = m.davis_frame_scores(gt_ids, pred_ids, 1)
    assert f[0] == pytest.approx(expected, abs=1e-12)


def test_f_empty_boundaries():
    empty = np.zeros((40, 50), bool)
    square = np.zeros((40, 50), bool)
    square[10:20, 10:20] = True
    assert m.f_measure(empty, empty) == 1.0
    assert m.f_measure(square, empty) == 0.0
    assert m.f_measure(empty, square) == 0.0
    # a mask covering the whole image has no boundary either
    assert m.f_measure(np.ones_like(empty), empty) == 1.0
    np.testing.assert_array_equal(m.db_eval_boundary(np.stack([empty, square]), np.stack([empty, empty])), [1.0, 0.0])


def test_f_bbox_dilation_matches_full_frame_dilation():
    """The cropped cv2 dilation equals a full-frame scipy dilation with the same disk, borders included."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    h, w = 60, 90
    yy, xx = np.mgrid[:h, :w]
    for trial in range(12):
        cy, cx = rng.uniform(-5, h + 5), rng.uniform(-5, w + 5)  # blobs may touch the border
        gt = (yy - cy) ** 2 / rng.uniform(20, 400) + (xx - cx) ** 2 / rng.uniform(20, 400) < 1
        pred = ndimage.shift(gt.astype(float), rng.uniform(-6, 6, 2), order=0) > 0.5
        pred ^= rng.random((h, w)) < 0.01
        r = m.boundary_tolerance((h, w))
        fg_b, gt_b = m.seg2bmap(pred), m.seg2bmap(gt)
        disk = m.disk_kernel(r).astype(bool)
        if fg_b.sum() == 0 or gt_b.sum() == 0:
            continue
        p = (fg_b & ndimage.binary_dilation(gt_b, disk)).sum() / fg_b.sum()
        rc = (gt_b & ndimage.binary_dilation(fg_b, disk)).sum() / gt_b.sum()
        expected = 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)
        assert m.f_measure(pred, gt) == pytest.approx(expected, abs=1e-12), trial


# ---------------------------------------------------------------------------- statistics


def test_decay_bins_and_statistics_by_hand():
    # linspace(1, 8, 5) = 1, 2.75, 4.5, 6.25, 8 -> round -> 1, 3, 5, 6, 8 -> minus 1
    np.testing.assert_array_equal(m.decay_bin_edges(8), [0, 2, 4, 5, 7])
    values = np.array([1.0, 1.0, 0.4, 0.5, 0.6, 0.2, 0.0, 0.1])
    mean, recall, decay = m.db_statistics(values)
    assert mean == pytest.approx(values.mean())
    assert recall == pytest.approx(3 / 8)  # 0.5 itself is not > 0.5
    assert decay == pytest.approx(np.mean([1.0, 1.0, 0.4]) - np.mean([0.2, 0.0, 0.1]))


def test_decay_uint8_wrap_past_256_frames():
    # edges 0, 75, 150, 224, 299 -> uint8 299 wraps to 43: the last bin is empty, Decay NaN
    np.testing.assert_array_equal(m.decay_bin_edges(300), [0, 75, 150, 224, 43])
    np.testing.assert_array_equal(m.decay_bin_edges(300, uint8_bins=False), [0, 75, 150, 224, 299])
    values = np.linspace(1, 0, 300)
    assert np.isnan(m.db_statistics(values)[2])
    assert m.db_statistics(values, uint8_bins=False)[2] > 0.7


def test_global_weights_objects_equally():
    # sequence A: one object (J 1, F 1); sequence B: two objects (J 0 / 0.5, F 0 / 0.25)
    j = [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.5]]
    f = [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.25, 0.0, 0.0]]
    g = m.davis_global(j, f)
    assert list(g) == list(m.DAVIS_GLOBAL_COLUMNS)
    assert g["J-Mean"] == pytest.approx(0.5)  # per sequence it would be 0.625
    assert g["F-Mean"] == pytest.approx(1.25 / 3)
    assert g["J&F-Mean"] == pytest.approx((0.5 + 1.25 / 3) / 2)
    assert g["J-Recall"] == pytest.approx(1 / 3)
    assert g["J-Decay"] == pytest.approx(0.5 / 3)


# ---------------------------------------------------------------------------- VIP


def test_vip_confusion_and_iou_by_hand():
    n = 4
    gt = np.array([[0, 0, 1, 1], [0, 1, 1, 255]])  # 255 is outside 0..3 -> ignored
    pred = np.array([[0, 1, 1, 1], [3, 1, 0, 2]])
    hist = m.confusion_matrix(gt, pred, n)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[0, 3] = 1
    expected[1, 1] = 3
    expected[1, 0] = 1
    np.testing.assert_array_equal(hist, expected)
    iou = m.iou_from_confusion(hist)
    # class 0: TP 1 / (GT 3 + Pred 2 - 1); class 1: 3 / (4 + 4 - 3); class 2: absent from both
    # (the 2 sits on an ignored pixel) -> NaN; class 3: predicted only -> 0
    np.testing.assert_allclose(iou[:2], [1 / 4, 3 / 5])
    assert np.isnan(iou[2]) and iou[3] == 0.0
    assert m.mean_iou(hist) == pytest.approx((1 / 4 + 3 / 5 + 0.0) / 3)
    with pytest.raises(ValueError, match="0..3"):
        m.confusion_matrix(gt, np.full_like(pred, 4), n)


def test_vip_class_count_matches_dataset_names():
    from pipeline.data.readers import JHMDB_JOINTS, VIP_CLASSES

    assert len(VIP_CLASSES) == m.VIP_NUM_CLASSES == 20
    assert len(JHMDB_JOINTS) == 15


# ---------------------------------------------------------------------------- JHMDB PCK


def _pck_case():
    """One video, 3 frames, 15 joints, coordinates 1-based like pos_img."""
    t = 3
    gt = np.zeros((2, 15, t))
    # every frame: joints 0..13 span the box x 10..13, y 20..24 (diagonal 5 -> normalizer 3),
    # joint 14 inside it
    base = np.stack([np.r_[np.linspace(10, 13, 14), 11.0], np.r_[np.linspace(20, 24, 14), 22.0]])
    gt[:, :, :] = base[:, :, None]
    gt[:, 14, 1] = [100.0, 100.0]  # far away, but invisible in frame 1 -> not in the box
    pred = gt.copy()
    pred[:, :, 0] += 50.0  # frame 0 is wrong everywhere but excluded
    pred[:, 1, 1] += [0.3, 0.4]  # d 0.5  -> 0.1667
    pred[:, 2, 1] += [0.63, 0.84]  # d 1.05 -> 0.35
    pred[:, 3, 1] += [0.0, 1.4]  # d 1.4  -> 0.4667
    pred[:, 14, 1] = [-15.0, -15.0]  # invisible (could not be placed)
    pred[:, 5, 2] = np.nan  # NaN also means invisible
    return gt, pred


def test_pck_normalizer_visibility_and_frame0():
    gt, pred = _pck_case()
    dist, scored = m.pck_distances(gt, pred)
    assert not scored[:, 0].any()
    assert not scored[14, 1] and not scored[5, 2]
    assert scored.sum() == 2 * 15 - 2
    norm = m.pck_normalizers(gt, m.joint_visibility(pred))
    assert norm[1] == pytest.approx(3.0) and norm[2] == pytest.approx(3.0)
    np.testing.assert_allclose(dist[1:4, 1], [0.5 / 3, 1.05 / 3, 1.4 / 3])
    per_joint = m.pck_per_joint([dist[j][scored[j]] for j in range(15)])
    # joints 1-3 are right in frame 2 only for small alphas: 50 %; joint 14 and 5 have one frame each
    mean = m.pck_mean(per_joint)
    np.testing.assert_allclose(
        mean,
        [
            (12 * 100 + 3 * 50) / 15,  # 0.1
            (13 * 100 + 2 * 50) / 15,  # 0.2
            (13 * 100 + 2 * 50) / 15,  # 0.3
            (14 * 100 + 1 * 50) / 15,  # 0.4
            100.0,
        ],
    )  # 0.5


def test_pck_invisible_joint_would_change_the_box():
    gt, pred = _pck_case()
    pred[:, 14, 1] = gt[:, 14, 1]  # now visible: box spans to (100, 100)
    norm = m.pck_normalizers(gt, m.joint_visibility(pred))
    assert norm[1] == pytest.approx(0.6 * np.hypot(100 - 10, 100 - 20))


def test_pck_never_scored_joint_is_nan_and_skipped():
    per_joint = m.pck_per_joint([np.array([0.05, 0.3]), np.array([])], thresholds=(0.1,))
    assert per_joint[0, 0] == 50.0 and np.isnan(per_joint[0, 1])
    assert m.pck_mean(per_joint)[0] == 50.0
