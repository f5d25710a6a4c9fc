"""The paper's tables: one registry that drives the report rules (``rules/report.smk``), the
report code (``pipeline.report``) and the HTML report's labels and captions.

``kind`` says which stage builds a table: ``propagation`` tables aggregate label-propagation
metrics of trained cells (one wildcard rule ``assemble_table``), ``consistency`` tables come from
the consistency stage, ``config`` tables from the validated config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.cells import CELL_KEYS, canonical_cell


@dataclass(frozen=True)
class Table:
    label: str  # the HTML report's label
    caption: str
    kind: str  # "propagation" | "consistency" | "config"
    row_keys: tuple[str, ...] = ()  # cell keys that identify a row (propagation tables)
    rename: dict = field(default_factory=dict)  # cell key -> column name in the CSV
    all_metrics: bool = False  # every propagation metric, not only the headline ones
    extension: bool = False  # this project's own table, in none of the papers


_ANCHOR_ROWS = dict(
    row_keys=("anchors", "anchor_mask"), rename={"anchors": "n_anchors", "anchor_mask": "anchor_mask_ratio"}
)

TABLES: dict[str, Table] = {
    "table1": Table(
        "1: view consistency",
        "Consistency of view pairs (paper Table 1): global (GS), local (LS) and nearest-patch (NPS) "
        "similarity per pair kind, with the feature encoder used, and the colour distance of the pairs "
        "(mean_lab_distance: CIE76 Delta E between the two images' mean CIELAB colours, lower is closer; "
        "not in the paper).",
        "consistency",
    ),
    "table2": Table(
        "2: target view",
        "Choice of target view (paper Table 2), N = 1, r_a = 0, r_t = 90 %. Includes a random-init "
        "encoder reference row.",
        "propagation",
        row_keys=("target",),
        rename={"target": "target_view"},
    ),
    "table3": Table(
        "3: target masking ratio",
        "Target masking ratio (paper Table 3), N = 1, r_a = 0. Includes a random-init encoder reference row.",
        "propagation",
        row_keys=("target_mask",),
        rename={"target_mask": "target_mask_ratio"},
    ),
    "table4": Table(
        "4: anchors and anchor masking",
        "Number of anchors N and anchor masking ratio r_a (paper Table 4), mean and sample std over "
        "seeds. Includes a random-init encoder reference row; per-seed values in table4_per_seed.csv.",
        "propagation",
        **_ANCHOR_ROWS,
    ),
    "table5": Table(
        "5: method comparison",
        "Comparison with MAE-family methods (paper Table 5). Rows with source 'cited' are the paper's "
        "numbers, not measured by this workflow.",
        "propagation",
        row_keys=CELL_KEYS,
        all_metrics=True,
    ),
    "table6": Table(
        "6: training settings",
        "Training settings actually used (paper Table 6), generated from the validated config.",
        "config",
    ),
    "table7": Table(
        "7: propagation settings",
        "k-NN label-propagation settings actually used (paper Table 7), generated from the validated config.",
        "config",
    ),
    "table8": Table(
        "8: anchors, masking and GFLOPs",
        "Table 4 extended with N = 4 (single seed) and training GFLOPs per sample (fvcore convention: "
        "GMACs, attention matmuls excluded).",
        "propagation",
        **_ANCHOR_ROWS,
    ),
    "table9": Table(
        "9: generator consistency",
        "Choice of generator: consistency (paper Table 9). Weights-free generators (warp, crop) are baselines. "
        "mean_lab_distance (not in the paper): CIE76 Delta E between the real image's and its view's mean "
        "CIELAB colours, lower is closer; it shows colour the conditioning transfers, which a grayscale "
        "encoder (the demo's SIFT grid) cannot see.",
        "consistency",
    ),
    "table10": Table(
        "10: choice of generator",
        "Choice of generator: downstream (paper Table 10), N = 1, r_a = 0. Weights-free generators are baselines; "
        "an S-LDM's row says whether it was trained here (and its encoder's source) or imported (RCG's), with the "
        "sampler, encoder source and model digest its bag recorded.",
        "propagation",
        row_keys=("generator",),  # views: the row label (pipeline.labels.generator_row_label)
    ),
    "figure4": Table(
        "figure 4: patch size",
        "Patch size 16 vs 8 (paper Figure 4) for SiamMAE, CropMAE and CDG-MAE, with random-init encoder "
        "references as dashed lines.",
        "propagation",
        row_keys=("method", "arch", "generator", "anchors", "anchor_mask", "target_mask"),
    ),
    "mae_family": Table(
        "MAE-family objectives for correspondence (this project's extension)",
        "MAE-family objectives for correspondence: this project's extension, in none of the papers. MAE (He et "
        "al.), LUT (learning with unmasked tokens), Pseudo MAE (multifold pseudo labelling, disentangled EMA "
        "teachers), CropMAE and CDG-MAE a1 / a3 trained here at equal backbone, epochs, schedule and data "
        "(MAE, LUT and Pseudo MAE read CropMAE's data, the image root the bag of views is generated from), judged by label "
        "propagation: DAVIS J&F, VIP mIoU, JHMDB PCK@0.1, mean and sample std over seeds; trainable and EMA-"
        "teacher parameters (M) and training GFLOPs per sample (fvcore convention, teachers' forward passes "
        "counted). Includes a random-init encoder reference row.",
        "propagation",
        row_keys=CELL_KEYS,
        extension=True,
    ),
}

PAPER_TABLES = [name for name in TABLES if name.startswith("table")]  # results/table1.csv ... table10.csv
PROPAGATION_TABLES = [name for name, t in TABLES.items() if t.kind == "propagation"]


def table_partials(config: dict, name: str) -> list[dict]:
    """The (partial) cells a propagation table lists, in its row order."""
    t = config["tables"]
    if name == "table8":
        return t["table4"]["cells"] + t["table8"]["extra_cells"]
    if name == "table10":
        return [{"generator": g, "anchors": 1, "anchor_mask": 0.0} for g in t["table10"]["generators"]]
    if name == "figure4":
        # SiamMAE and CropMAE as configured for Table 5, and CDG-MAE-a1, at every patch size
        baselines = [c for c in t["table5"]["cells"] if c.get("method") in ("siammae", "cropmae")]
        a1 = {"method": "cdgmae", "anchors": 1, "anchor_mask": 0.0}
        return [{**c, "arch": a} for a in t["figure4"]["archs"] for c in baselines + [a1]]
    return t[name]["cells"]


def table_cells(config: dict, name: str) -> list[dict]:
    """Canonical cells of a propagation table, in its row order."""
    return [canonical_cell(p, config) for p in table_partials(config, name)]


def table_seeds(config: dict, name: str, cell: dict) -> list[int]:
    """Seeds per cell: Table 8's extra N = 4 cells are single-seed like the paper."""
    if name == "table8":
        extra = [canonical_cell(p, config) for p in config["tables"]["table8"]["extra_cells"]]
        if cell in extra and cell not in table_cells(config, "table4"):
            return config["tables"]["table8"]["extra_seeds"]
    return config["pretrain"]["seeds"]
