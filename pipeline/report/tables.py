"""Stage 5: assemble the paper's tables, figures and the summary from the evaluation CSVs.

Every number comes from a ``results/eval/<model>/<dataset>/metrics.csv`` written by the
propagation stage; the cell that produced it is read back from the ``<model>`` path (every
hyper-parameter that defines a cell is in it). The paper's published numbers
(``paper_numbers.yaml``) are only printed beside ours in the summary and used for Table 5 rows
this workflow does not train (``source = cited``).

    python -m pipeline.report.tables table --name table4 --evals results/eval/**/metrics.csv \
        --output results/table4.csv
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.config import load_settings
from pipeline.constants import BASELINE_GENERATORS, views_label
from pipeline.io import atomic_path, write_csv_atomic, write_text_atomic
from pipeline.runtime import setup_logging

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
RANDOM_INIT = "random-init encoder (reference)"
CELL_INT = {"anchors", "epochs", "seed"}
CELL_FLOAT = {"anchor_mask", "target_mask"}


# ---------------------------------------------------------------------------------------------
# reading evaluations


def parse_model_path(model: str) -> dict:
    """``method~cdgmae/.../seed~0`` -> dict; ``random-init/arch~X/seed~0`` -> kind random-init."""
    parts = model.strip("/").split("/")
    info: dict = {"model": model, "kind": "trained"}
    if parts[0] in ("random-init", "external"):
        info["kind"] = parts[0]
        parts = parts[1:]
        if info["kind"] == "external":
            info["name"] = parts[0] if parts else "external"
    for part in parts:
        if "~" in part:
            key, value = part.split("~", 1)
            if key in CELL_INT:
                value = int(value)
            elif key in CELL_FLOAT:
                value = float(value)
            info[key] = value
    return info


def read_eval(path: str | Path) -> dict:
    """One metrics.csv -> {model info..., dataset, metric columns (ours)}."""
    path = Path(path)
    m = re.search(r"results/eval/(.+)/(davis|vip|jhmdb)/metrics\.csv$", path.as_posix())
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
# tables


def method_label(row: dict) -> str:
    """Table 5 names; a bag of weights-free pseudo-views is labelled as a baseline, not CDG-MAE."""
    method = row.get("method")
    if method == "cropmae":
        return "CropMAE"
    if method == "siammae":
        return "SiamMAE"
    n, ra = int(row["anchors"]), float(row["anchor_mask"])
    name = {(1, 0.0): "a1", (3, 0.25): "a3"}.get((n, ra), f"N{n}-ra{ra:g}")
    if row.get("generator") in BASELINE_GENERATORS:
        return f"cross-view MAE-{name} on {row['generator']} pseudo-views (baseline)"
    return f"CDG-MAE-{name}"


# per table: (cell keys that identify a row, renamed columns, metrics)
TABLE_SPECS = {
    "table2": (["target"], {"target": "target_view"}, HEADLINE),
    "table3": (["target_mask"], {"target_mask": "target_mask_ratio"}, HEADLINE),
    "table4": (["anchors", "anchor_mask"], {"anchors": "n_anchors", "anchor_mask": "anchor_mask_ratio"}, HEADLINE),
    "table8": (["anchors", "anchor_mask"], {"anchors": "n_anchors", "anchor_mask": "anchor_mask_ratio"}, HEADLINE),
    "table10": (["generator"], {"generator": "views"}, HEADLINE),
    "table5": (
        ["method", "arch", "generator", "target", "anchors", "anchor_mask", "target_mask", "epochs"],
        {},
        list(METRICS),
    ),
    "figure4": (["method", "arch", "generator", "anchors", "anchor_mask", "target_mask"], {}, HEADLINE),
}


def build_table(
    name: str, eval_files, run_label: str, gflops: str | None = None, cited: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, per-seed long table) for one paper table."""
    keys, rename, metrics = TABLE_SPECS[name]
    long = collect(eval_files)
    if long.empty:
        raise ValueError(f"{name}: no evaluation files given")
    trained = long[long["kind"] != "random-init"]
    refs = long[long["kind"] == "random-init"]
    table = aggregate(trained, keys, metrics)
    if name in ("table2", "table3", "table4", "table8", "table10"):
        # which views trained these rows: say so when they are a weights-free baseline
        gens = trained.groupby(keys, sort=False)["generator"].first().reset_index(drop=True)
        table["views"] = [views_label(g) for g in gens] if name != "table10" else table["generator"]
        table["views_are_baseline"] = [g in BASELINE_GENERATORS for g in gens]
    if not refs.empty:
        ref = aggregate(refs, ["arch"], metrics)
        for col in keys:
            if col not in ref:
                ref[col] = RANDOM_INIT if col in ("target", "generator", "method") else math.nan
        ref["row"] = RANDOM_INIT
        table["row"] = "trained"
        table = pd.concat([table, ref[[c for c in table.columns if c in ref.columns]]], ignore_index=True)
        table["row"] = table["row"].fillna("trained")
    if name == "table8" and gflops:
        g = pd.read_csv(gflops)
        g = g.rename(columns={"anchor_mask": "anchor_mask_g"})
        table = table.merge(
            g, how="left", left_on=["anchors", "anchor_mask"], right_on=["anchors", "anchor_mask_g"]
        ).drop(columns=["anchor_mask_g"])
    if name in ("table5", "figure4"):
        table = _method_rows(name, table, metrics, run_label, cited)
    for col in ("anchors", "epochs", "n_seeds"):
        if col in table:  # integer keys stay integers next to the reference row's blanks
            table[col] = pd.array(table[col], dtype="Int64")
    table["run_label"] = run_label
    table = table.rename(columns=rename)
    per_seed = long.rename(columns=rename)
    per_seed["run_label"] = run_label
    return table, per_seed


def _method_rows(name: str, table: pd.DataFrame, metrics, run_label: str, cited: bool) -> pd.DataFrame:
    rows = []
    for r in table.to_dict("records"):
        is_ref = r.get("row") == RANDOM_INIT
        out = {
            "method": RANDOM_INIT if is_ref else method_label(r),
            "arch": r["arch"],
            "dataset": "-" if is_ref else ("frame-folder videos" if r.get("method") == "siammae" else "image set"),
            "epochs": r.get("epochs"),
            "n_seeds": r["n_seeds"],
        }
        for m in metrics:
            out[m] = r[f"{m}_mean"]
            out[f"{m}_std"] = r[f"{m}_std"]
        out["source"] = f"measured ({run_label})"
        rows.append(out)
    if name == "table5" and cited:
        paper = yaml.safe_load(PAPER_NUMBERS.read_text())["table5"]
        for method in ("MAE", "Video-MAE", "MAE-ST"):
            rows.append(
                {"method": method, **paper[method], "n_seeds": math.nan, "source": "cited (CDG-MAE paper, Table 5)"}
            )
    return pd.DataFrame(rows)


def config_table(name: str, settings: dict) -> pd.DataFrame:
    """Table 6 (training settings) / Table 7 (propagation settings) from the validated config."""
    if name == "table6":
        p = settings["pretrain"]
        cd = settings["cell_defaults"]
        crop = p["crop"]
        cm = p["cropmae"]
        rows = [
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
        return pd.DataFrame(rows, columns=["setting", "cdg_mae", "cropmae"]).astype(str)
    if name == "table7":
        p = settings["propagation"]
        ds = ["davis", "vip", "jhmdb"]
        rows = [
            ("top_k", *[p[d]["topk"] for d in ds]),
            ("queue_length", *[p["queue"]] * 3),
            ("neighborhood_size", *[p["radius"]] * 3),
            ("temperature", *[p["temperature"]] * 3),
            ("input_size", *["x".join(map(str, p[d]["size"])) for d in ds]),
            ("davis_gt_mode", p["davis"]["gt_mode"], "-", "-"),
        ]
        return pd.DataFrame(rows, columns=["setting", *ds]).astype(str)
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------
# figures and summary


def plot_figure4(table: pd.DataFrame, output: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = table[table["method"] != RANDOM_INIT]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (metric, title) in zip(axes, zip(HEADLINE, ["DAVIS J&F_m", "VIP mIoU", "JHMDB PCK@0.1"])):
        methods = list(dict.fromkeys(trained["method"]))
        archs = list(dict.fromkeys(trained["arch"]))
        width = 0.8 / max(len(archs), 1)
        for j, arch in enumerate(archs):
            vals = [trained[(trained.method == m) & (trained.arch == arch)][metric].mean() for m in methods]
            errs = [trained[(trained.method == m) & (trained.arch == arch)][f"{metric}_std"].mean() for m in methods]
            ax.bar(np.arange(len(methods)) + j * width, vals, width, yerr=np.nan_to_num(errs), label=arch)
        for arch, ls in zip(archs, ["--", ":"]):
            ref = table[(table["method"] == RANDOM_INIT) & (table["arch"] == arch)][metric]
            if len(ref):
                ax.axhline(float(ref.iloc[0]), color="k", ls=ls, lw=1, label=f"random init {arch}")
        ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2)
        ax.set_xticklabels([m.replace(" on ", "\non ") for m in methods], fontsize=6)
        ax.set_title(title)
    axes[0].legend(fontsize=6)
    fig.suptitle("Figure 4: patch size 16 vs 8", fontsize=9)
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_loss_curves(logs: list[str], output: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for log in logs:
        df = pd.read_csv(log)
        m = re.search(r"results/pretrain/(.+)/train_log\.csv$", Path(log).as_posix())
        info = parse_model_path(m.group(1)) if m else {}
        label = f"N={info.get('anchors')} ra={info.get('anchor_mask')} seed={info.get('seed')}"
        ax.plot(df["step"], df["loss"], lw=0.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("normalised-pixel MSE (masked patches)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _fmt(v, digits=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (int, float, np.floating)):
        return f"{v:.{digits}f}"
    return str(v)


def summary_markdown(tables: dict[str, pd.DataFrame], run_label: str, data_note: str) -> str:
    """Our numbers beside the paper's, with the scale they came from stated up front."""
    paper = yaml.safe_load(PAPER_NUMBERS.read_text())
    lines = [
        "# CDG-MAE reproduction: summary",
        "",
        f"**Run:** `{run_label}`. {data_note}",
        "",
        "Metrics are in % (DAVIS J&F_m, VIP mIoU, JHMDB PCK@0.1); ours are mean ± sample std "
        f"(ddof={STD_DDOF}) over seeds. The paper's numbers come from ImageNet-1K, ViT-S/16, 100 "
        "epochs and real DAVIS-2017 / VIP / JHMDB: compare to them only when this run used the same "
        "data and scale.",
        "",
    ]
    for name, df in tables.items():
        lines.append(f"## {name}")
        lines.append("")
        ref = paper.get(name, {})
        if name in ("table1", "table9"):
            lines.append("| views | GS | LS | NPS | paper GS / LS / NPS |")
            lines.append("|---|---|---|---|---|")
            for r in df.to_dict("records"):
                p = ref.get(r.get("views"), None)
                ptxt = " / ".join(f"{x:.3f}" for x in p) if p else "–"
                lines.append(
                    f"| {r.get('views')} | {_fmt(r.get('global_sim'), 3)} | {_fmt(r.get('local_sim'), 3)} | "
                    f"{_fmt(r.get('nearest_patch_sim'), 3)} | {ptxt} |"
                )
        elif name in ("table5", "figure4"):
            lines.append("| method | arch | J&F_m | VIP mIoU | PCK@0.1 | source |")
            lines.append("|---|---|---|---|---|---|")
            for r in df.to_dict("records"):
                lines.append(
                    f"| {r['method']} | {r['arch']} | {_fmt(r.get('davis_jf_m'))} | {_fmt(r.get('vip_miou'))} | "
                    f"{_fmt(r.get('jhmdb_pck01'))} | {r.get('source', '')} |"
                )
        elif name in ("table6", "table7"):
            cols = list(df.columns)
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for r in df.to_dict("records"):
                lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
        else:
            key_cols = [
                c
                for c in df.columns
                if c in ("target_view", "target_mask_ratio", "n_anchors", "anchor_mask_ratio", "views") or c == "row"
            ]
            key_cols = [c for c in key_cols if c != "row"] + (["row"] if "row" in df else [])
            extra = ["gflops"] if "gflops" in df else []
            lines.append(
                "| "
                + " | ".join(key_cols)
                + " | J&F_m | VIP mIoU | PCK@0.1 | "
                + " | ".join(extra)
                + (" | " if extra else "")
                + "paper |"
            )
            lines.append("|" + "---|" * (len(key_cols) + 4 + len(extra)))
            for r in df.to_dict("records"):
                pkey = _paper_key(name, r)
                p = ref.get(pkey) if pkey is not None else None
                ptxt = "–" if p is None else " / ".join(_fmt(x) for x in _paper_headline(name, p))
                vals = [f"{_fmt(r.get(m + '_mean'))} ± {_fmt(r.get(m + '_std'))}" for m in HEADLINE]
                lines.append(
                    "| "
                    + " | ".join(_fmt_key(r.get(c)) for c in key_cols)
                    + " | "
                    + " | ".join(vals)
                    + " | "
                    + "".join(f"{_fmt(r.get(e), 2)} | " for e in extra)
                    + ptxt
                    + " |"
                )
        lines.append("")
    return "\n".join(lines) + "\n"


def _fmt_key(v):
    """Row keys as written in the config: 2, 0.25, 0.985, names."""
    if isinstance(v, (int, float, np.integer, np.floating)) and not (isinstance(v, float) and math.isnan(v)):
        return f"{v:g}"
    return _fmt(v)


def _paper_key(name, r):
    if r.get("row") == RANDOM_INIT:
        return None
    if name in ("table4", "table8"):
        return f"{int(r['n_anchors'])}/{float(r['anchor_mask_ratio'])}"
    if name == "table3":
        return float(r["target_mask_ratio"])
    if name == "table2":
        return r["target_view"]
    return None


def _paper_headline(name, p):
    if name == "table4":
        return [p[0], p[2], p[4]]
    return p[:3] if name != "table8" else p[:4]


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.report.tables",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("table", help="a propagation table (2, 3, 4, 5, 8, 10) or figure 4")
    t.add_argument("--name", required=True, choices=sorted(TABLE_SPECS))
    t.add_argument("--evals", nargs="+", required=True, help="results/eval/<model>/<dataset>/metrics.csv files")
    t.add_argument("--output", required=True)
    t.add_argument("--per-seed", help="long-format CSV with the per-seed values")
    t.add_argument("--gflops", help="results/gflops.csv (table 8)")
    t.add_argument("--figure", help="PNG (figure 4)")
    t.add_argument("--run-label", default="synthetic-demo")

    c = sub.add_parser("config-table", help="table 6 / table 7 from the validated config")
    c.add_argument("--name", required=True, choices=["table6", "table7"])
    c.add_argument("--settings", required=True, help="JSON with the config slices")
    c.add_argument("--output", required=True)

    lc = sub.add_parser("loss-curves", help="plot training-loss curves")
    lc.add_argument("--logs", nargs="+", required=True)
    lc.add_argument("--output", required=True)

    s = sub.add_parser("summary", help="results/summary.md: our numbers beside the paper's")
    s.add_argument("--tables", nargs="+", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--run-label", default="synthetic-demo")
    s.add_argument("--synthetic", action="store_true", help="the run used the embedded synthetic data")

    args = ap.parse_args(argv)
    setup_logging()
    if args.cmd == "table":
        table, per_seed = build_table(args.name, args.evals, args.run_label, gflops=args.gflops)
        write_csv_atomic(table, args.output, float_format="%.4f")
        if args.per_seed:
            write_csv_atomic(per_seed, args.per_seed, float_format="%.4f")
        if args.figure:
            plot_figure4(table, args.figure)
    elif args.cmd == "config-table":
        write_csv_atomic(config_table(args.name, load_settings(args.settings)), args.output)
    elif args.cmd == "loss-curves":
        plot_loss_curves(args.logs, args.output)
    elif args.cmd == "summary":
        tables = {Path(p).stem: pd.read_csv(p) for p in sorted(args.tables, key=_table_order)}
        note = (
            "Data: the embedded **synthetic** stand-ins generated by this workflow (not ImageNet, "
            "DAVIS, VIP or JHMDB) at CPU-demo scale; these numbers show that the pipeline runs and "
            "learns, they are not a reproduction of the paper's values."
            if args.synthetic
            else "Data: the dataset roots configured in `data.roots`."
        )
        write_text_atomic(args.output, summary_markdown(tables, args.run_label, note))


def _table_order(p):
    m = re.search(r"(\d+)", Path(p).stem)
    return (Path(p).stem.startswith("figure"), int(m.group(1)) if m else 0)


if __name__ == "__main__":
    main()
