"""The colour column of Tables 1 / 9: ``mean_lab_distance`` (CIE76 Delta E of the pairs' mean CIELAB
colours), pinned by hand-computed cases, and carried by the table CSVs and the summary."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import run
from pipeline.consistency.feature_encoders import SiftGridEncoder
from pipeline.consistency.pair_metrics import COLOUR_METRIC, mean_lab_colours
from pipeline.consistency.pairs import PairKind, score_table
from pipeline.report.summary import summary_markdown

BLACK, GREY_128, WHITE, RED = (0, 0, 0), (128, 128, 128), (255, 255, 255), (255, 0, 0)


def uniform(rgb, size=32):
    return np.full((size, size, 3), rgb, dtype=np.uint8)


def hand_lightness(v: int) -> float:
    """L* of the sRGB grey (v, v, v) by the textbook formulas: sRGB decoding to linear Y, then
    L* = 116 (Y / Yn)^(1/3) - 16 with Yn = 1 (a grey has a* = b* = 0)."""
    c = v / 255
    y = ((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92
    return 116 * y ** (1 / 3) - 16 if y > (6 / 29) ** 3 else y * (29 / 3) ** 3


def test_mean_lab_colours_of_uniform_images_match_hand_values():
    lab = mean_lab_colours(np.stack([uniform(BLACK), uniform(WHITE), uniform(GREY_128), uniform(RED)]))
    assert lab[0] == pytest.approx([0, 0, 0], abs=1e-9)
    assert lab[1] == pytest.approx([100, 0, 0], abs=1e-2)  # white: L* = 100, the D65 white point
    assert hand_lightness(128) == pytest.approx(53.585, abs=1e-3)  # Y = 0.21586, (Y)^(1/3) = 0.59987
    assert lab[2] == pytest.approx([hand_lightness(128), 0, 0], abs=1e-2)
    # sRGB red (255, 0, 0) is L*a*b* (53.24, 80.09, 67.20) in the published tables (D65); read as
    # BGR it would be blue, (32.30, 79.19, -107.86): the channel order is pinned here
    assert lab[3] == pytest.approx([53.2408, 80.0925, 67.2032], abs=1e-3)
    # the distance of a pair is the Euclidean distance of the rows: white vs black is 100
    assert np.linalg.norm(lab[1] - lab[0]) == pytest.approx(100, abs=1e-2)


def test_mean_lab_colour_is_the_mean_over_pixels_not_the_colour_of_the_mean_rgb():
    half = uniform(BLACK)
    half[:, 16:] = 255  # half black, half white: mean L* = 50 (the grey of mean RGB 127.5 is 53.4)
    assert mean_lab_colours(half[None])[0] == pytest.approx([50, 0, 0], abs=1e-2)


def test_mean_lab_colours_refuses_what_is_not_a_uint8_rgb_batch():
    with pytest.raises(ValueError, match="uint8 RGB"):
        mean_lab_colours(uniform(RED))  # one image, not a batch
    with pytest.raises(ValueError, match="uint8 RGB"):
        mean_lab_colours(uniform(RED)[None].astype(np.float32) / 255)


class UniformColours:
    """In-memory source: key -> a uniform image of that colour (at the size asked for)."""

    def load(self, rgb, size):
        return uniform(rgb, size)

    def describe(self, rgb):
        return f"uniform{rgb}"


def test_score_table_carries_the_colour_distance_per_pair_and_as_mean_and_std():
    same = PairKind("random_images", "same colour", UniformColours(), [RED, WHITE], [RED, WHITE], [{}, {}])
    other = PairKind("random_images", "other colour", UniformColours(), [RED, WHITE], [BLACK, BLACK], [{}, {}])
    table, pairs = score_table(SiftGridEncoder(32, 8), [same, other], batch_size=3, num_workers=0, seed=0, run_label="")
    red_black = float(np.linalg.norm([53.2408, 80.0925, 67.2032]))  # 117.33: red's L*a*b* vs black's 0
    assert table[COLOUR_METRIC].tolist() == pytest.approx([0, (red_black + 100) / 2], abs=1e-2)
    assert table[f"{COLOUR_METRIC}_std"].tolist() == pytest.approx([0, np.std([red_black, 100], ddof=1)], abs=1e-2)
    assert pairs[COLOUR_METRIC].tolist() == pytest.approx([0, 0, red_black, 100], abs=1e-2)


def test_table9_csv_and_summary_carry_the_colour_column_and_a_crop_keeps_its_source_colour(tmp_path):
    """Uniform-colour source images: crop views have their source's colour (Delta E about 0, JPEG
    rounding aside), and the CSVs and the summary carry the column."""
    import cv2

    folder = tmp_path / "imagenet" / "train" / "n00"
    folder.mkdir(parents=True)
    colours = [RED, (0, 160, 60), (40, 40, 200), (230, 200, 30)]
    for i, rgb in enumerate(colours):
        cv2.imwrite(str(folder / f"img{i}.png"), cv2.cvtColor(uniform(rgb, 48), cv2.COLOR_RGB2BGR))
    s = {"shards": 1, "part_size": 8, "image_size": 32, "n_views": 2}
    shard, bag = tmp_path / "crop" / "shard-0.h5", tmp_path / "crop" / "bag.h5"
    root = str(tmp_path / "imagenet")
    run(
        "views",
        ["generate", "--root", root, "--generator", "crop", "--shard", "0", "--out", str(shard)]
        + ["--settings", json.dumps(s)],
    )
    run("views", ["merge", "--shards", str(shard), "--out", str(bag), "--settings", json.dumps(s)])
    settings = '{"encoder": {"name": "sift-grid", "image_size": 32, "patch_size": 8}, "n_pairs": 4}'
    out, pairs_out = tmp_path / "table9.csv", tmp_path / "pairs9.csv"
    run(
        "consistency",
        [
            "table9",
            "--bag",
            f"crop={bag}",
            "--settings",
            settings,
            "--output",
            str(out),
            "--pairs-output",
            str(pairs_out),
        ],
    )
    table, pairs = pd.read_csv(out), pd.read_csv(pairs_out)
    assert COLOUR_METRIC in table.columns and f"{COLOUR_METRIC}_std" in table.columns
    assert len(pairs) == 4 and (pairs[COLOUR_METRIC] < 1.0).all()
    summary = summary_markdown({"table9": table}, "test", "")
    assert "| paper GS / LS / NPS | colour ΔE |" in summary  # after the paper's columns: ours only
    row = next(line for line in summary.splitlines() if line.startswith(f"| {table.views[0]} |"))
    assert row.endswith(f"| {table[COLOUR_METRIC][0]:.2f} |")


def test_demo_grid_figures_on_hand_made_bags():
    """``bench/sldm_demo_grid.py``'s measures: views of their own source's colour are nearest to
    it (Delta E 0, 100 % vs chance 1/3); a 0/255 checkerboard's neighbours all differ by 255."""
    from bench.sldm_demo_grid import grid_figures, neighbour_roughness

    real = np.stack([uniform(RED, 8), uniform(WHITE, 8), uniform(BLACK, 8)])
    checker = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)
    assert neighbour_roughness(real) == 0 and neighbour_roughness(np.repeat(checker[None, ..., None], 3, -1)) == 255
    own = grid_figures(real, np.repeat(real[:, None], 2, axis=1))
    red_black = float(np.linalg.norm([53.2408, 80.0925, 67.2032]))
    red_white = float(np.linalg.norm([100 - 53.2408, 80.0925, 67.2032]))
    assert own["delta_e_own"] == pytest.approx(0, abs=1e-6) and own["own_nearest"] == 1 and own["chance"] == 1 / 3
    assert own["hue_difference_own"] == 0 and own["chroma_views"] == pytest.approx(own["chroma_real"])
    assert own["chroma_real"] == pytest.approx(np.hypot(80.0925, 67.2032) / 3, abs=1e-2)  # only red has chroma
    # others: red's views to white and black, white's to red and black, black's to red and white
    others = (red_white + red_black + red_white + 100 + red_black + 100) / 6
    assert own["delta_e_others"] == pytest.approx(others, abs=1e-2)
    swapped = grid_figures(real, np.repeat(real[[1, 0, 2]][:, None], 2, axis=1))  # red <-> white views
    assert swapped["own_nearest"] == pytest.approx(1 / 3) and swapped["delta_e_own"] == pytest.approx(
        2 * red_white / 3, abs=1e-2
    )
