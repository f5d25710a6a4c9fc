"""Shared workflow helpers: config validation, dataset roots, the pretraining cell table, paths.

Kept cheap to parse (no torch, no h5py): every cluster job re-parses the workflow.
"""

import json
import os
import sys

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import Paramspace, validate

# The stage modules run as `python -m pipeline.<stage>`; make the package importable at parse time
# and in every job even when it is not pip-installed (e.g. inside a --sdm conda environment).
sys.path.insert(0, workflow.basedir)
shell.prefix(f'export PYTHONPATH="{workflow.basedir}:$PYTHONPATH"; ')

from pipeline.config import ConfigError, validate_config  # noqa: E402  (cheap: yaml + jsonschema)

try:
    # fills schema defaults and names the offending key (e.g. "pretrain.cell_defaults.target_mask")
    validate_config(config)
except ConfigError as err:
    raise WorkflowError(str(err))
validate(config, "../schemas/config.schema.yaml")

DATASETS = ["imagenet", "videos", "davis", "vip", "jhmdb"]
EVAL_DATASETS = config["propagation"]["evaluate"]


wildcard_constraints:
    dataset="davis|vip|jhmdb",
    shard=r"\d+",
    seed=r"\d+",
    generator=r"[A-Za-z0-9_\-]+",
    arch=r"[A-Za-z0-9_]+",
    name=r"[A-Za-z0-9_\-]+",
    model=r"[^/].*",


# ---------------------------------------------------------------------------------------------
# datasets


def get_root(name):
    """Dataset root: the configured path, or the embedded synthetic stand-in."""
    root = config["data"]["roots"][name]
    return root if root else f"results/data/synthetic/{name}"


def get_dataset_input(name):
    """Rule input for a dataset: the synthetic directory (so it gets built), or nothing for a
    user-supplied root (a real dataset is not a workflow product and is not re-checked by mtime)."""
    return [] if config["data"]["roots"][name] else [f"results/data/synthetic/{name}"]


# ---------------------------------------------------------------------------------------------
# provenance helpers


def stage_code(*modules):
    """A stage's own module files, listed as a rule input so editing them re-runs that stage and
    what depends on it, and nothing else (shared utilities are deliberately not listed)."""
    return [os.path.join(workflow.basedir, "pipeline", f"{m}.py") for m in modules]


def settings(*keys, drop=()):
    """A narrow config slice as canonical JSON for `params:` (a change re-runs only its users)."""
    node = config
    for k in keys:
        node = node[k]
    if drop:
        node = {k: v for k, v in node.items() if k not in drop}
    return json.dumps(node, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# pretraining cells: every key that defines a cell is part of its output path

CELL_KEYS = [
    "method",
    "arch",
    "generator",
    "target",
    "anchors",
    "anchor_mask",
    "target_mask",
    "epochs",
]


def normalize_cell(partial):
    """Complete a partial cell from pretrain.cell_defaults and canonicalise it.

    Baselines that do not read a bag of views get generator/target "none", so changing the
    view generator never invalidates them.
    """
    cell = {**config["pretrain"]["cell_defaults"], **partial}
    cell = {k: cell[k] for k in CELL_KEYS}
    cell["anchors"] = int(cell["anchors"])
    cell["epochs"] = int(cell["epochs"])
    cell["anchor_mask"] = float(cell["anchor_mask"])
    cell["target_mask"] = float(cell["target_mask"])
    if cell["method"] != "cdgmae":
        cell.update(generator="none", target="none", anchors=1, anchor_mask=0.0)
    elif cell["target"] != "knn" and cell["anchors"] > config["views"]["n_views"]:
        raise WorkflowError(
            f"cell {partial}: {cell['anchors']} anchors need at least {cell['anchors']} "
            f"generated views besides the target, but views.n_views = {config['views']['n_views']}"
        )
    elif cell["target"] == "knn" and cell["anchors"] > config["pretrain"]["knn_k"]:
        raise WorkflowError(
            f"cell {partial}: {cell['anchors']} anchors exceed pretrain.knn_k = {config['pretrain']['knn_k']}"
        )
    return cell


def get_cells(table):
    """Complete cells a table needs, in the table's row order."""
    t = config["tables"]
    if table == "table8":
        partials = t["table4"]["cells"] + t["table8"]["extra_cells"]
    elif table == "table10":
        partials = [{"generator": g, "anchors": 1, "anchor_mask": 0.0} for g in t["table10"]["generators"]]
    elif table == "figure4":
        # SiamMAE and CropMAE as configured for Table 5, and CDG-MAE-a1, at every patch size
        baselines = [c for c in t["table5"]["cells"] if c.get("method") in ("siammae", "cropmae")]
        partials = [
            {**c, "arch": a}
            for a in t["figure4"]["archs"]
            for c in baselines + [{"method": "cdgmae", "anchors": 1, "anchor_mask": 0.0}]
        ]
    else:
        partials = t[table]["cells"]
    return [normalize_cell(p) for p in partials]


def get_seeds(table, cell=None):
    """Seeds per table: Table 8's extra N = 4 cells are single-seed like the paper."""
    if table == "table8" and cell is not None:
        extra = [normalize_cell(p) for p in config["tables"]["table8"]["extra_cells"]]
        if cell in extra and cell not in get_cells("table4"):
            return config["tables"]["table8"]["extra_seeds"]
    return config["pretrain"]["seeds"]


ALL_TABLES = ["table2", "table3", "table4", "table5", "table8", "table10", "figure4"]

CELLS = pd.DataFrame(
    [dict(c) for c in {json.dumps(c, sort_keys=True): c for tb in ALL_TABLES for c in get_cells(tb)}.values()],
    columns=CELL_KEYS,
)
PARAMSPACE = Paramspace(CELLS, param_sep="~")
CELL_PATTERN = PARAMSPACE.wildcard_pattern


def cell_path(cell):
    return os.path.join(*(f"{k}~{cell[k]}" for k in CELL_KEYS))


def model_path(cell, seed):
    """`{model}` path of a trained cell (under results/pretrain/ and results/eval/)."""
    return f"{cell_path(cell)}/seed~{seed}"


def cell_from_wildcards(wildcards):
    """The cell dict of a job from its wildcards, as plain Python types (JSON-serialisable)."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in PARAMSPACE.instance(wildcards).items()}


def random_init_model(arch, seed=None):
    seed = config["propagation"]["random_init_seed"] if seed is None else seed
    return f"random-init/arch~{arch}/seed~{seed}"


def table_models(table):
    """(cell, seed, model path) for every trained model a table needs, plus random-init refs."""
    rows = []
    for cell in get_cells(table):
        for seed in get_seeds(table, cell):
            rows.append((cell, seed, model_path(cell, seed)))
    return rows


def table_archs(table):
    return sorted({cell["arch"] for cell in get_cells(table)})


def eval_metrics(models, datasets=None):
    return [
        f"results/eval/{m}/{d}/metrics.csv"
        for m in models
        for d in (datasets or EVAL_DATASETS)
    ]


def get_table_evals(table):
    """Every metrics.csv a table needs: its trained models and one random-init reference per arch."""
    models = [m for _, _, m in table_models(table)]
    models += [random_init_model(a) for a in table_archs(table)]
    return eval_metrics(models)


def report_table(name, label):
    """A results/<name>.csv output shown in the HTML report with its caption."""
    return report(
        f"results/{name}.csv",
        caption=f"../report/{name}.rst",
        category="Tables",
        labels={"table": label},
    )


def get_final_targets():
    """Everything `snakemake` builds by default: every paper table, the figures, the summary."""
    return (
        [f"results/table{i}.csv" for i in range(1, 11)]
        + [
            "results/figure4.png",
            "results/figures/loss_curves.png",
            "results/figures/bag_of_views.png",
            "results/summary.md",
        ]
    )
