"""The paper's tables from the evaluation CSVs, and Tables 6 / 7 from the validated config.

Every number comes from a ``results/eval/<model>/<dataset>/metrics.csv`` written by the
propagation stage; the cell that produced it is read back from the ``<model>`` path (every
hyper-parameter that defines a cell is in it, ``pipeline.cells``). Which cell keys identify a row
of each table, and how its columns are named, is the table registry ``pipeline.table_registry.TABLES``.
The paper's published numbers (``paper_numbers.yaml``) are only used for Table 5 rows this
workflow does not train (``source = cited``) and printed beside ours in the summary. Table 10
also reads each generator's ``bag.h5`` attributes (``--bag``): what made its views.

    python -m pipeline.report table --name table4 --evals results/eval/**/metrics.csv \\
        --output results/table4.csv --per-seed results/table4_per_seed.csv
    python -m pipeline.report table --name table10 --evals ... --bag sldm=results/views/sldm/bag.h5 \\
        --bag warp=results/views/warp/bag.h5 --output results/table10.csv
    python -m pipeline.report config-table --name table6 --settings '{...}' --output results/table6.csv
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.cells import CELL_KEYS, RANDOM_INIT, cell_path, complete_cell, parse_model_path
from pipeline.cli import command_parser
from pipeline.config import load_settings
from pipeline.io import write_csv_atomic
from pipeline.labels import (
    BASELINE_GENERATORS,
    EVAL_DATASETS,
    SUBSTITUTE_GENERATORS,
    generator_columns,
    generator_row_label,
    read_bag_samplers,
    views_label,
)
from pipeline.records import write_record
from pipeline.runtime import setup_logging
from pipeline.table_registry import PROPAGATION_TABLES, TABLES

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.yaml")

# our column name -> (dataset, column in that dataset's metrics.csv); all in %
METRICS = {
    "davis_jf_m": ("davis", "J&F-Mean"),
    "davis_j_m": ("davis", "J-Mean"),
    "davis_f_m": ("davis", "F-Mean"),
    "vip_miou": ("vip", "mIoU"),
    "jhmdb_pck01": ("jhmdb", "PCK@0.1"),
    "jhmdb_pck02": ("jhmdb", "PCK@0.2"),
}
HEADLINE = ["davis_jf_m", "vip_miou", "jhmdb_pck01"]
STD_DDOF = 1  # sample standard deviation over seeds; NaN with a single seed
REFERENCE_ROW = "random-init encoder (reference)"  # label of the random-init encoder rows
METHOD_TABLES = ("table5", "figure4", "mae_family")  # one row per method, labelled by ``method_label``
# the single-view MAE family (pipeline.pretrain.models_mae_family) by method key
FAMILY_LABELS = {"mae": "MAE", "lut": "LUT", "pseudo-mae": "Pseudo MAE"}
# training cost columns of results/mae_family_gflops.csv (``pretrain method-flops``), by cell
COST_COLUMNS = ["params_m", "teacher_params_m", "gflops"]
CONFIG_TABLES = [name for name, t in TABLES.items() if t.kind == "config"]  # table6, table7


# ---------------------------------------------------------------------------------------------
# reading evaluations


def read_eval(path: str | Path) -> dict:
    """One metrics.csv -> {model info..., dataset, metric columns (ours)}."""
    path = Path(path)
    m = re.search(rf"results/eval/(.+)/({'|'.join(EVAL_DATASETS)})/metrics\.csv$", path.as_posix())
    if not m:
        raise ValueError(f"{path}: not an evaluation file results/eval/<model>/<dataset>/metrics.csv")
    model, dataset = m.group(1), m.group(2)
    df = pd.read_csv(path)
    if len(df) != 1:
        raise ValueError(f"{path}: expected one row of metrics, found {len(df)}")
    row = {**parse_model_path(model), "dataset": dataset}
    for ours, (ds, col) in METRICS.items():
        if ds == dataset:
            if col not in df.columns:
                raise ValueError(f"{path}: missing column {col!r} (has {list(df.columns)})")
            row[ours] = float(df[col].iloc[0])
    return row


def collect(eval_files) -> pd.DataFrame:
    """Long table: one row per (model, seed) with every metric found across its datasets."""
    rows: dict[str, dict] = {}
    for f in eval_files:
        r = read_eval(f)
        r.pop("dataset")
        rows.setdefault(r["model"], {}).update(r)
    return pd.DataFrame(list(rows.values()))


def aggregate(long: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean and std (ddof=1) over seeds per group of ``keys``, with ``n_seeds``."""
    out = []
    for key, g in long.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key))
        row["n_seeds"] = len(g)
        for m in metrics:
            vals = g[m].dropna().to_numpy(float) if m in g else np.array([])
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m}_std"] = float(vals.std(ddof=STD_DDOF)) if len(vals) > STD_DDOF else math.nan
        out.append(row)
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------
# propagation tables


def method_label(row: dict) -> str:
    """Table 5 names; a bag of weights-free pseudo-views is labelled as a baseline, not CDG-MAE."""
    method = row.get("method")
    if method == "cropmae":
        return "CropMAE"
    if method == "siammae":
        return "SiamMAE"
    if method in FAMILY_LABELS:
        return FAMILY_LABELS[method]
    n, ra = int(row["anchors"]), float(row["anchor_mask"])
    name = {(1, 0.0): "a1", (3, 0.25): "a3"}.get((n, ra), f"N{n}-ra{ra:g}")
    if method == "cdgmae-lut":  # with LUT's loss on the anchors' unmasked tokens
        name += " + LUT"
    if row.get("generator") in BASELINE_GENERATORS:
        return f"cross-view MAE-{name} on {row['generator']} pseudo-views (baseline)"
    if row.get("generator") in SUBSTITUTE_GENERATORS:
        return f"CDG-MAE-{name} on {row['generator']} views ({SUBSTITUTE_GENERATORS[row['generator']]})"
    return f"CDG-MAE-{name}"


def build_table(
    name: str, eval_files, run_label: str, gflops: str | None = None, cited: bool = True, bags: dict | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, per-seed long table) for one paper table. ``bags`` (Table 10: generator -> its
    ``bag.h5``) label each generator's row and give its sampler, encoder and model columns."""
    if name not in PROPAGATION_TABLES:
        raise KeyError(f"{name!r}: not a propagation table; known: {PROPAGATION_TABLES}")
    spec = TABLES[name]
    keys = list(spec.row_keys)
    metrics = list(METRICS) if spec.all_metrics else HEADLINE
    long = collect(eval_files)
    if long.empty:
        raise ValueError(f"{name}: no evaluation files given")
    trained = long[long["kind"] != RANDOM_INIT]
    refs = long[long["kind"] == RANDOM_INIT]
    table = aggregate(trained, keys, metrics)
    if name not in METHOD_TABLES:
        # which views trained these rows: say so when they are a weights-free baseline
        gens = trained.groupby(keys, sort=False)["generator"].first().reset_index(drop=True)
        if name == "table10":
            table = _generator_rows(table, gens, bags or {})
        else:
            table["views"] = [views_label(g) for g in gens]
        table["views_are_baseline"] = [g in BASELINE_GENERATORS for g in gens]
    if not refs.empty:
        table = _with_reference_rows(table, refs, keys, metrics)
    if name == "table8" and gflops:
        g = pd.read_csv(gflops)
        g = g.rename(columns={"anchor_mask": "anchor_mask_g"})
        table = table.merge(
            g, how="left", left_on=["anchors", "anchor_mask"], right_on=["anchors", "anchor_mask_g"]
        ).drop(columns=["anchor_mask_g"])
    if name == "mae_family" and gflops:
        table = _with_cell_costs(table, gflops)
    if name in METHOD_TABLES:
        table = _method_rows(name, table, metrics, run_label, cited)
    for col in ("anchors", "epochs", "n_seeds"):
        if col in table:  # integer keys stay integers next to the reference row's blanks
            table[col] = pd.array(table[col], dtype="Int64")
    table["run_label"] = run_label
    table = table.rename(columns=spec.rename)
    per_seed = long.rename(columns=spec.rename)
    per_seed["run_label"] = run_label
    return table, per_seed


def _generator_rows(table: pd.DataFrame, gens: pd.Series, bags: dict) -> pd.DataFrame:
    """Table 10: each generator's row labelled as what made its views (``generator_row_label``: an
    S-LDM trained here, with its encoder's source, or RCG's imported), with the sampler, encoder
    source and model digest its bag recorded (``GENERATOR_COLUMNS``)."""
    missing = sorted(set(gens) - set(bags))
    if missing:
        raise ValueError(f"table10: no bag of views given for {missing} (--bag GENERATOR=PATH)")
    samplers = {g: read_bag_samplers(bags[g]) for g in dict.fromkeys(gens)}
    table["views"] = [generator_row_label(g, samplers[g]) for g in gens]
    # as recorded (object: 50 stays 50 beside the reference row's blanks, not 50.0000)
    columns = pd.DataFrame([generator_columns(samplers[g]) for g in gens], index=table.index, dtype=object)
    return pd.concat([table, columns], axis=1)


def _with_reference_rows(table: pd.DataFrame, refs: pd.DataFrame, keys: list[str], metrics) -> pd.DataFrame:
    """``table`` (rows marked ``trained``) followed by one random-init encoder row per arch."""
    ref = aggregate(refs, ["arch"], metrics)
    for col in keys:
        if col not in ref:
            ref[col] = REFERENCE_ROW if col in ("target", "generator", "method") else math.nan
    ref["row"] = REFERENCE_ROW
    table["row"] = "trained"
    table = pd.concat([table, ref[[c for c in table.columns if c in ref.columns]]], ignore_index=True)
    table["row"] = table["row"].fillna("trained")
    return table


def _method_rows(name: str, table: pd.DataFrame, metrics, run_label: str, cited: bool) -> pd.DataFrame:
    rows = []
    for r in table.to_dict("records"):
        is_ref = r.get("row") == REFERENCE_ROW
        out = {
            "method": REFERENCE_ROW if is_ref else method_label(r),
            "arch": r["arch"],
            "dataset": "-" if is_ref else ("frame-folder videos" if r.get("method") == "siammae" else "image set"),
            "epochs": r.get("epochs"),
            "n_seeds": r["n_seeds"],
            # our rows are our recipe, never the paper's (e.g. SiamMAE: 2000 epochs on Kinetics-400)
            "recipe": "-" if is_ref else f"ours: {_epochs(r.get('epochs'))} epochs, {run_label}",
        }
        for m in metrics:
            out[m] = r[f"{m}_mean"]
            out[f"{m}_std"] = r[f"{m}_std"]
        for col in COST_COLUMNS:  # the MAE-family table's training cost, where given
            if col in r:
                out[col] = r[col]
        out["source"] = f"measured ({run_label})"
        rows.append(out)
    if name == "table5" and cited:
        paper = yaml.safe_load(PAPER_NUMBERS.read_text())["table5"]
        for method in ("MAE", "Video-MAE", "MAE-ST"):
            rows.append(
                {
                    "method": method,
                    **paper[method],
                    "n_seeds": math.nan,
                    "recipe": f"paper: {paper[method]['epochs']} epochs, {paper[method]['dataset']}",
                    "source": "cited (CDG-MAE paper, Table 5)",
                }
            )
    return pd.DataFrame(rows)


def _with_cell_costs(table: pd.DataFrame, costs: str) -> pd.DataFrame:
    """Each trained row's parameters and GFLOPs per sample from ``pretrain method-flops``'s CSV,
    matched by the cell's path (``pipeline.cells.cell_path``); the reference rows get none."""
    by_cell = pd.read_csv(costs, keep_default_na=False).set_index("cell")
    paths = [
        None if r.get("row") == REFERENCE_ROW else cell_path(complete_cell({k: r[k] for k in CELL_KEYS}, {}))
        for r in table.to_dict("records")
    ]
    missing = sorted({p for p in paths if p is not None and p not in by_cell.index})
    if missing:
        raise ValueError(f"{costs}: no GFLOPs / parameter row for cells {missing}")
    for col in COST_COLUMNS:
        table[col] = [float(by_cell.at[p, col]) if p is not None else math.nan for p in paths]
    return table


def _epochs(value) -> str:
    return "?" if value is None or (isinstance(value, float) and math.isnan(value)) else str(int(value))


# ---------------------------------------------------------------------------------------------
# config tables


def config_table(name: str, settings: dict) -> pd.DataFrame:
    """Table 6 (training settings) / Table 7 (propagation settings) from the validated config."""
    if name == "table6":
        return pd.DataFrame(_training_settings(settings), columns=["setting", "cdg_mae", "cropmae"]).astype(str)
    if name == "table7":
        return pd.DataFrame(_propagation_settings(settings), columns=["setting", *EVAL_DATASETS]).astype(str)
    raise ValueError(name)


def _training_settings(settings: dict) -> list[tuple]:
    """Table 6 rows: (setting, CDG-MAE, CropMAE)."""
    p = settings["pretrain"]
    cd = settings["cell_defaults"]
    crop = p["crop"]
    cm = p["cropmae"]
    return [
        ("optimizer", "AdamW (0.9, 0.95)", "AdamW (0.9, 0.95)"),
        ("weight_decay", p["weight_decay"], p["weight_decay"]),
        ("base_lr", p["base_lr"], p["base_lr"]),
        ("target_mask_ratio", cd["target_mask"], settings["cropmae_target_mask"]),
        ("lr_schedule", f"warm-up {p['warmup_epochs']} ep + cosine", f"warm-up {p['warmup_epochs']} ep + cosine"),
        ("epochs", cd["epochs"], cd["epochs"]),
        ("batch_size", p["batch_size"], p["batch_size"]),
        ("bag_of_views_size", settings["n_views"], "-"),
        ("views", views_label(cd["generator"]), "-"),
        (
            "augmentations",
            f"crop {crop['scale']}, shared={crop['shared']}, flip={crop['flip']}",
            f"GlobalToLocal crop global {cm['global_scale']} local {cm['local_scale']}",
        ),
        ("aspect_ratio", crop["ratio"], crop["ratio"]),
        ("arch", cd["arch"], cd["arch"]),
        ("img_size", p["img_size"], p["img_size"]),
    ]


def _propagation_settings(settings: dict) -> list[tuple]:
    """Table 7 rows: (setting, DAVIS, VIP, JHMDB)."""
    p = settings["propagation"]
    ds = EVAL_DATASETS
    return [
        ("top_k", *[p[d]["topk"] for d in ds]),
        ("queue_length", *[p["queue"]] * 3),
        ("neighborhood_size", *[p["radius"]] * 3),
        ("temperature", *[p["temperature"]] * 3),
        ("input_size", *["x".join(map(str, p[d]["size"])) for d in ds]),
        ("davis_gt_mode", p["davis"]["gt_mode"], "-", "-"),
    ]


# ---------------------------------------------------------------------------------------------
# CLI


def table_main(argv=None) -> None:
    """``table``: one propagation table (2, 3, 4, 5, 8, 10, figure 4) and its per-seed values."""
    ap = command_parser("report", "table", __doc__)
    ap.add_argument("--name", required=True, choices=sorted(PROPAGATION_TABLES))
    ap.add_argument("--evals", nargs="+", required=True, help="results/eval/<model>/<dataset>/metrics.csv files")
    ap.add_argument("--output", required=True)
    ap.add_argument("--per-seed", help="long-format CSV with the per-seed values")
    ap.add_argument("--gflops", help="results/gflops.csv (table 8)")
    ap.add_argument(
        "--bag",
        action="append",
        default=[],
        metavar="GENERATOR=PATH",
        help="table 10: each generator's bag.h5 (its row's label, sampler, encoder and model digest)",
    )
    ap.add_argument("--run-label", default="synthetic-demo")
    args = ap.parse_args(argv)
    setup_logging()
    bags = dict(_bag_arg(ap, value) for value in args.bag)
    table, per_seed = build_table(args.name, args.evals, args.run_label, gflops=args.gflops, bags=bags)
    write_csv_atomic(table, args.output, float_format="%.4f")
    if args.per_seed:
        write_csv_atomic(per_seed, args.per_seed, float_format="%.4f")
    settings = {"name": args.name, "run_label": args.run_label}
    inputs = [*args.evals, args.gflops, *bags.values()]
    write_record(args.output, kind="table", command=("report", "table"), inputs=inputs, settings=settings)


def _bag_arg(ap, value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        ap.error(f"--bag expects GENERATOR=PATH, got {value!r}")
    return name, path


def config_table_main(argv=None) -> None:
    """``config-table``: Table 6 / Table 7 from the validated config slices."""
    ap = command_parser("report", "config-table", __doc__)
    ap.add_argument("--name", required=True, choices=CONFIG_TABLES)
    ap.add_argument("--settings", required=True, help="JSON with the config slices")
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    setup_logging()
    settings = load_settings(args.settings)
    write_csv_atomic(config_table(args.name, settings), args.output)
    write_record(args.output, kind="table", command=("report", "config-table"), settings=settings)
