r"""The ``table1`` and ``table9`` commands: consistency per pair kind (paper Table 1) and per
generator (Table 9), as a table CSV (one row per pair kind) and a per-pair CSV.

    python -m pipeline.consistency table1 --bag B --generator G --videos-root V --imagenet-root R \
        --knn knn.npz --settings JSON --seed 0 --output table1.csv --pairs-output pairs.csv
    python -m pipeline.consistency table9 --bag G=B [--bag G2=B2 ...] [--videos-root V] --settings JSON \
        --seed 0 --output table9.csv --pairs-output pairs.csv
"""

from __future__ import annotations

import argparse
import logging

from pipeline.consistency.knn_file import read_knn
from pipeline.consistency.options import (
    encoder_checkpoint,
    list_images,
    open_encoder,
    resolve_section,
    scoring_parser,
    scoring_settings,
    start,
)
from pipeline.consistency.pairs import generated_kind, knn_kind, random_kind, score_table, video_kind
from pipeline.consistency.sources import BagSource
from pipeline.data.readers import list_videos
from pipeline.io import write_csv_atomic
from pipeline.records import write_record

LOG = logging.getLogger("cdgmae.consistency")


def table_parser(command: str) -> argparse.ArgumentParser:
    """The common flags plus those of both table commands."""
    p = scoring_parser(command, __doc__)
    p.add_argument("--videos-root", help="frame-folder videos root (video frame pairs)")
    p.add_argument("--seed", type=int, default=0, help="workflow seed (pair sampling)")
    p.add_argument("--run-label", default="", help="written into every row")
    p.add_argument("--output", required=True, help="table CSV")
    p.add_argument("--pairs-output", required=True, help="per-pair CSV")
    return p


def write_tables(encoder, kinds, cfg: dict, args, command: str, inputs=(), sources=None) -> None:
    """Score ``kinds`` and write the table and per-pair CSVs named by ``args``, and the table's
    provenance record (``pipeline.records``: ``inputs`` = the bags, knn file and checkpoint read)."""
    table, pairs = score_table(
        encoder, kinds, cfg["encoder"]["batch_size"], cfg["num_workers"], args.seed, args.run_label
    )
    write_csv_atomic(pairs, args.pairs_output)
    write_csv_atomic(table, args.output, float_format="%.6g")
    write_record(
        args.output,
        kind="table",
        command=("consistency", command),
        inputs=[*inputs, encoder_checkpoint(cfg)],
        settings=scoring_settings(cfg, args, sources),
        device=encoder.device,
        precision="fp32",
    )
    LOG.info("wrote %s and %s", args.output, args.pairs_output)


def table1_main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.consistency table1``: video / generated / k-NN / random pairs."""
    p = table_parser("table1")
    p.add_argument("--bag", required=True, help="merged bag of the configured generator")
    p.add_argument("--generator", required=True, help="its registry name (views.generator)")
    p.add_argument("--imagenet-root", required=True)
    p.add_argument("--knn", required=True, help="knn.npz from the neighbours command")
    args = p.parse_args(argv)
    if not args.videos_root:
        p.error("table1 needs --videos-root")
    start(args)
    cfg = resolve_section(args)
    encoder = open_encoder(cfg, args.device)
    n, seed = cfg["n_pairs"], args.seed
    images = list_images(args.imagenet_root)
    neighbours = read_knn(args.knn, [images.image_id(i) for i in range(len(images))])
    kinds = [
        video_kind(list_videos(args.videos_root), cfg["frame_gap"], n, seed),
        generated_kind(BagSource(args.bag), args.generator, n, seed),
        knn_kind(images, neighbours, cfg["knn_k"], n, seed),
        random_kind(images, n, seed),
    ]
    write_tables(encoder, kinds, cfg, args, "table1", [args.bag, args.knn], {"generator": args.generator})


def _bag_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--bag expects GENERATOR=PATH, got {value!r}")
    return name, path


def table9_main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.consistency table9``: real vs generated view per generator."""
    p = table_parser("table9")
    p.add_argument("--bag", type=_bag_arg, action="append", required=True, metavar="GENERATOR=PATH")
    args = p.parse_args(argv)
    start(args)
    cfg = resolve_section(args)
    encoder = open_encoder(cfg, args.device)
    n, seed = cfg["n_pairs"], args.seed
    kinds = []
    if args.videos_root:  # the paper's reference row
        kinds.append(video_kind(list_videos(args.videos_root), cfg["frame_gap"], n, seed))
    kinds += [generated_kind(BagSource(path), name, n, seed) for name, path in args.bag]
    write_tables(encoder, kinds, cfg, args, "table9", [path for _, path in args.bag], {"bags": dict(args.bag)})
