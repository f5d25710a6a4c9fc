"""Report assembly: tables from evaluation CSVs, hand-computed means/stds, labelling rules."""

import math

import pandas as pd
import pytest

from pipeline.cells import parse_model_path
from pipeline.cli import run
from pipeline.report import summary
from pipeline.report import table as report_table
from tests.support import make_bag, make_sldm_bag, write_eval

CELL = "method~cdgmae/arch~vit_mini_patch8/generator~{g}/target~either/anchors~{n}/anchor_mask~{ra}/target_mask~0.9/epochs~4/seed~{s}"


@pytest.fixture
def table4_evals(tmp_path):
    files = []
    # cell (2, 0.25): seeds give DAVIS 40 and 44 -> mean 42, sample std 2*sqrt(2) = 2.8284
    files += write_eval(tmp_path, CELL.format(g="warp", n=2, ra=0.25, s=0), 40.0, 20.0, 30.0)
    files += write_eval(tmp_path, CELL.format(g="warp", n=2, ra=0.25, s=1), 44.0, 22.0, 30.0)
    files += write_eval(tmp_path, CELL.format(g="warp", n=1, ra=0.0, s=0), 35.0, 18.0, 25.0)
    files += write_eval(tmp_path, CELL.format(g="warp", n=1, ra=0.0, s=1), 35.0, 18.0, 27.0)
    files += write_eval(tmp_path, "random-init/arch~vit_mini_patch8/seed~0", 20.0, 10.0, 15.0)
    return files


def test_parse_model_path_restores_types():
    info = parse_model_path(CELL.format(g="sldm", n=3, ra=0.5, s=2))
    assert info["anchors"] == 3 and info["anchor_mask"] == 0.5 and info["seed"] == 2
    assert info["generator"] == "sldm" and info["kind"] == "trained"
    assert parse_model_path("random-init/arch~vit_small_patch16/seed~0")["kind"] == "random-init"


def test_table4_mean_std_and_reference_row(table4_evals):
    table, per_seed = report_table.build_table("table4", table4_evals, "test")
    row = table[(table["n_anchors"] == 2) & (table["anchor_mask_ratio"] == 0.25)].iloc[0]
    assert row["n_seeds"] == 2
    assert row["davis_jf_m_mean"] == pytest.approx(42.0)
    assert row["davis_jf_m_std"] == pytest.approx(2 * math.sqrt(2))  # ddof = 1
    assert row["vip_miou_mean"] == pytest.approx(21.0)
    assert row["jhmdb_pck01_std"] == pytest.approx(0.0)
    a1 = table[(table["n_anchors"] == 1)].iloc[0]
    assert a1["jhmdb_pck01_mean"] == pytest.approx(26.0)
    ref = table[table["row"] == report_table.REFERENCE_ROW]
    assert len(ref) == 1 and ref.iloc[0]["davis_jf_m_mean"] == pytest.approx(20.0)
    assert math.isnan(ref.iloc[0]["davis_jf_m_std"])  # one seed: no std
    # weights-free views are labelled as a baseline on every trained row
    assert table[table["row"] == "trained"]["views_are_baseline"].all()
    assert len(per_seed) == 5 and set(per_seed["seed"]) == {0, 1}


def test_table8_joins_gflops(table4_evals, tmp_path):
    g = tmp_path / "gflops.csv"
    pd.DataFrame({"anchors": [1, 2], "anchor_mask": [0.0, 0.25], "gflops": [6.036, 8.263]}).to_csv(g, index=False)
    table, _ = report_table.build_table("table8", table4_evals, "test", gflops=str(g))
    row = table[(table["n_anchors"] == 2)].iloc[0]
    assert row["gflops"] == pytest.approx(8.263)


def test_table5_names_and_cited_rows(tmp_path):
    files = write_eval(tmp_path, CELL.format(g="warp", n=1, ra=0.0, s=0), 30.0, 10.0, 20.0)
    files += write_eval(tmp_path, CELL.format(g="sldm", n=3, ra=0.25, s=0), 31.0, 11.0, 21.0)
    files += write_eval(
        tmp_path,
        "method~cropmae/arch~vit_mini_patch8/generator~none/target~none/anchors~1/"
        "anchor_mask~0.0/target_mask~0.985/epochs~4/seed~0",
        25.0,
        9.0,
        19.0,
    )
    table, _ = report_table.build_table("table5", files, "test")
    methods = list(table["method"])
    assert "CropMAE" in methods and "CDG-MAE-a3" in methods
    # warp views never masquerade as CDG-MAE
    assert any("warp pseudo-views (baseline)" in m for m in methods)
    assert not any(m == "CDG-MAE-a1" for m in methods)
    cited = table[table["source"].str.startswith("cited")]
    assert set(cited["method"]) == {"MAE", "Video-MAE", "MAE-ST"}
    assert cited[cited.method == "MAE"].iloc[0]["davis_jf_m"] == 53.5
    crop = table[table.method == "CropMAE"].iloc[0]
    assert crop["davis_j_m"] == pytest.approx(24.0) and crop["jhmdb_pck02"] == pytest.approx(39.0)
    # our rows name our recipe (epochs), the cited ones the paper's
    assert crop["recipe"] == "ours: 4 epochs, test"
    assert cited[cited.method == "Video-MAE"].iloc[0]["recipe"] == "paper: 800 epochs, Kinetics-400"
    md = summary.summary_markdown({"table5": table}, "test", "Data: synthetic.")
    assert "| method | recipe | arch | epochs |" in md
    assert "| CropMAE | ours: 4 epochs, test | vit_mini_patch8 | 4 |" in md


def test_malformed_eval_is_named(tmp_path):
    p = tmp_path / "results" / "eval" / "random-init" / "arch~x" / "seed~0" / "davis" / "metrics.csv"
    p.parent.mkdir(parents=True)
    pd.DataFrame([{"J-Mean": 1.0}]).to_csv(p, index=False)
    with pytest.raises(ValueError, match="J&F-Mean"):
        report_table.read_eval(p)


def test_summary_states_scale_and_paper_values(table4_evals, tmp_path):
    table, _ = report_table.build_table("table4", table4_evals, "synthetic-demo")
    md = summary.summary_markdown({"table4": table}, "synthetic-demo", "Data: synthetic.")
    assert "synthetic-demo" in md and "Data: synthetic." in md
    assert "61.2 / 37.6 / 46.5" in md  # the paper's (1, 0) row beside ours
    assert "42.0 ± 2.8" in md


def test_cli_writes_table_and_figure(table4_evals, tmp_path):
    out = tmp_path / "t.csv"
    fig = tmp_path / "f.png"
    files = table4_evals
    run(
        "report",
        [
            "table",
            "--name",
            "figure4",
            "--evals",
            *files,
            "--output",
            str(out),
            "--per-seed",
            str(tmp_path / "p.csv"),
        ],
    )
    run("report", ["figure4", "--table", str(out), "--output", str(fig)])
    assert out.exists() and fig.stat().st_size > 1000


def test_substitute_generators_are_labelled_as_such():
    from pipeline.labels import views_label

    assert "substitute for the paper's S-LDM" in views_label("sd-variation")
    assert views_label("sldm") == "sldm diffusion views"
    row = {"method": "cdgmae", "anchors": 1, "anchor_mask": 0.0, "generator": "sd-variation"}
    assert report_table.method_label(row) == (
        "CDG-MAE-a1 on sd-variation views (CLIP-conditioned SD image variations, a substitute for the paper's S-LDM)"
    )
    assert report_table.method_label({**row, "generator": "sldm"}) == "CDG-MAE-a1"


def test_summary_puts_our_s_ldm_beside_the_papers_generator_rows():
    t9 = pd.DataFrame(
        [
            {
                "views": "Video frames",
                "generator": "none",
                "global_sim": 0.9,
                "local_sim": 0.3,
                "nearest_patch_sim": 0.8,
            },
            {
                "views": "S-LDM trained here (encoder: random-init)",
                "generator": "sldm",
                "global_sim": 0.8,
                "local_sim": 0.2,
                "nearest_patch_sim": 0.7,
            },
            {
                "views": "warp pseudo-views",
                "generator": "warp",
                "global_sim": 0.7,
                "local_sim": 0.1,
                "nearest_patch_sim": 0.6,
            },
        ]
    )
    t10 = pd.DataFrame(
        [
            {
                "generator": g,
                "views": label,
                "row": "trained",
                **{f"{m}_{s}": 1.0 for m in report_table.HEADLINE for s in ("mean", "std")},
            }
            for g, label in (("sldm", "S-LDM trained here (encoder: random-init)"), ("warp", "warp pseudo-views"))
        ]
    )
    t1 = t9.assign(views=t9.views.where(t9.generator != "warp", "warp pseudo-views"))
    md = summary.summary_markdown({"table1": t1, "table9": t9, "table10": t10}, "demo", "Data: synthetic.")
    assert "| Video frames | 0.900 | 0.300 | 0.800 | 0.991 / 0.405 / 0.885 |" in md
    # Table 9: Gen-SIS S-LDM; Table 1: the paper's "Diffusion (S-LDM)" row (the same values)
    row = "| S-LDM trained here (encoder: random-init) | 0.800 | 0.200 | 0.700 | 0.991 / 0.384 / 0.794 |"
    assert md.count(row) == 2
    assert "| warp pseudo-views | 0.700 | 0.100 | 0.600 | – |" in md
    t10_rows = md.split("## table10")[1].splitlines()
    sldm_row = next(line for line in t10_rows if line.startswith("| S-LDM trained here (encoder: random-init) |"))
    assert sldm_row.endswith("61.2 / 37.6 / 46.5 |")
    assert next(line for line in t10_rows if line.startswith("| warp pseudo-views |")).endswith("– |")


def test_table10_rows_say_which_s_ldm_sampler_and_encoder_made_them(tmp_path):
    """Table 10's rows carry what their bags recorded: the S-LDM trained here with its encoder's
    source (not a bare "sldm" beside Gen-SIS's numbers), its sampler and model digest."""
    import numpy as np
    from PIL import Image

    from pipeline.io import folder_sha256

    images = tmp_path / "imagenet" / "train" / "n0"
    images.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            images / f"{i}.png"
        )
    sldm_bag, folder = make_sldm_bag(tmp_path / "imagenet", tmp_path)
    warp_bag = make_bag(tmp_path / "imagenet", tmp_path / "views", "warp")
    files = []
    for g in ("sldm", "warp"):
        for s in (0, 1):
            files += write_eval(tmp_path, CELL.format(g=g, n=1, ra=0.0, s=s), 40.0 + s, 20.0, 30.0)
    files += write_eval(tmp_path, "random-init/arch~vit_mini_patch8/seed~0", 20.0, 10.0, 15.0)
    out = tmp_path / "table10.csv"
    args = ["table", "--name", "table10", "--evals", *files, "--output", str(out)]
    run("report", [*args, "--bag", f"sldm={sldm_bag}", "--bag", f"warp={warp_bag}"])
    t = pd.read_csv(out)
    assert list(t.generator) == ["sldm", "warp", report_table.REFERENCE_ROW]
    sldm, warp = t.iloc[0], t.iloc[1]
    assert sldm.views == "S-LDM trained here (encoder: random-init)"
    assert (sldm.sampler, sldm.sampler_steps, sldm.sampler_eta, sldm.guidance_scale) == ("DDIMScheduler", 1, 0.5, 3.0)
    assert sldm.encoder_source == "random-init" and sldm.model_sha256 == folder_sha256(folder)
    assert warp.views.startswith("warp pseudo-views") and pd.isna(warp.sampler) and pd.isna(warp.model_sha256)
    assert ",DDIMScheduler,1,0.5,3.0,random-init," in out.read_text()  # as recorded, not 1.0000
    # every generator's row needs its bag
    with pytest.raises(ValueError, match=r"no bag of views given for \['warp'\]"):
        report_table.build_table("table10", files, "demo", bags={"sldm": str(sldm_bag)})
    # the summary shows the labelled row beside the paper's Gen-SIS S-LDM values
    md = summary.summary_markdown({"table10": t}, "demo", "Data: synthetic.")
    line = next(x for x in md.splitlines() if x.startswith("| S-LDM trained here (encoder: random-init) |"))
    assert line.endswith("61.2 / 37.6 / 46.5 |")
