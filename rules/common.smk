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

# cheap at parse time: yaml, jsonschema, ast and plain data (no torch)
from pipeline.cells import CELL_KEYS, CellError, canonical_cell, model_path, random_init_model  # noqa: E402
from pipeline.cli import command_module  # noqa: E402
from pipeline.labels import EVAL_DATASETS as ALL_EVAL_DATASETS  # noqa: E402
from pipeline.config import (  # noqa: E402
    ConfigError,
    job_settings,
    result_neutral_keys,
    runtime_flags,
    runtime_resource,
    validate_config,
)
from pipeline.data.layouts import DatasetError, check_layout  # noqa: E402  (standard library only)
from pipeline import job_server  # noqa: E402  (standard library only)
from pipeline.provenance import (  # noqa: E402
    code_digest,
    combined_digest,
    file_digests,
    plugin_code_files,
    registrations,
)
from pipeline.records import describe_record, read_record, record_path  # noqa: E402  (no torch)
from pipeline.table_registry import PAPER_TABLES, PROPAGATION_TABLES, TABLES, table_cells, table_seeds  # noqa: E402

try:
    # fills schema defaults and names the offending key (e.g. "pretrain.cell_defaults.target_mask")
    validate_config(config)
except ConfigError as err:
    raise WorkflowError(str(err))
validate(config, "../schemas/config.schema.yaml")
# every job: the package importable even when not pip-installed (e.g. in a --sdm conda environment),
# and whether a GPU job that finds no CUDA device may run on the CPU (the demo) or must fail
# (pipeline/lease.py)
shell.prefix(
    f'export PYTHONPATH="{workflow.basedir}:$PYTHONPATH"; '
    f"export CDGMAE_ALLOW_CPU={1 if config['allow_cpu'] else 0}; "
)

# every configured dataset root has its official layout: a wrong root fails now, not in the job
for _kind, _root in config["data"]["roots"].items():
    if _root:
        try:
            check_layout(_kind, _root)
        except DatasetError as err:
            raise WorkflowError(f"data.roots.{_kind}: {err}")

EVAL_DATASETS = config["propagation"]["evaluate"]


wildcard_constraints:
    dataset="|".join(ALL_EVAL_DATASETS),
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
# view generators: the S-LDM the workflow trains, or RCG's it imports (rules/sldm.smk), when no
# folder is configured

TRAINED_SLDM = "results/sldm/model"
IMPORTED_RCG = "results/sldm/rcg"


def get_sldm_encoder_input():
    """The local files train_sldm reads besides the images: encoder checkpoint, autoencoder folder."""
    s = config["sldm"]
    files = [s["encoder"]["checkpoint"]] if s["encoder"]["source"] in ("timm", "cdgmae") else []
    return files + ([s["autoencoder"]] if s["autoencoder"] != "none" else [])


def trains_sldm(generator):
    return generator == "sldm" and not config["views"]["generators"]["sldm"]["model_path"]


def imports_rcg(generator):
    """rcg with its checkpoints set and no folder of its own: rule import_rcg (rules/sldm.smk) makes it."""
    s = config["views"]["generators"]["rcg"]
    return generator == "rcg" and not s["model_path"] and bool(s["ldm_checkpoint"] or s["encoder_checkpoint"])


def built_generator_folder(generator):
    """The sldm folder the workflow builds for this generator (trained or imported), else None."""
    if trains_sldm(generator):
        return TRAINED_SLDM
    return IMPORTED_RCG if imports_rcg(generator) else None


def get_generator_model_input(generator):
    """The S-LDM folder the workflow trains or imports for this generator (else nothing)."""
    folder = built_generator_folder(generator)
    return [folder] if folder else []


def get_generator_settings(generator):
    """A generator's settings, the built S-LDM's folder filled in where model_path is null."""
    s = dict(config["views"]["generators"][generator])
    folder = built_generator_folder(generator)
    return {**s, "model_path": folder} if folder else s


# ---------------------------------------------------------------------------------------------
# provenance and params


def stage_code(stage, command):
    """The digest of the code ``python -m pipeline.<stage> <command>`` runs: every result-carrying
    module its entry module imports, transitively, wherever it lives (``pipeline.provenance``).
    Recorded as a ``code`` param, so an edit that changes what that code executes re-runs the job
    and what depends on it, and nothing else (comments, docstrings, formatting and infrastructure
    modules re-run nothing; the digests are independent of where the project lives)."""
    return code_digest(command_module(stage, command))


def get_generator_code(generator):
    """``stage_code("views", "generate")`` for one generator: the shard writer without the other
    generators' modules, so editing one generator re-runs only its own views."""
    files = plugin_code_files(command_module("views", "generate"), "views", generator)
    return combined_digest(file_digests(files))


def settings(*keys, command=None):
    """A narrow config slice as canonical JSON for ``params:`` (a change re-runs only its users):
    the keys the schema makes settings of ``command``'s jobs (``pipeline.config.settings_keys``).

    Result-neutral keys (GPUs, workers, checkpoint cadence) are left out: they travel as resources
    (``runtime_resources``), so editing them re-runs nothing; so are the lists of what runs
    (``x-selects``), the nested sections passed as slices of their own (``x-slice``) and the keys
    of other commands (``x-only-for``)."""
    node = config
    for k in keys:
        node = node[k]
    if isinstance(node, dict):
        node = job_settings(node, *keys, command=command)
    return json.dumps(node, sort_keys=True)


def runtime_resources(section):
    """The section's result-neutral keys as a rule's ``resources:`` (``gpu``, ``<section>_<key>``)."""
    return {runtime_resource(section, k): config[section][k] for k in result_neutral_keys(section)}


def runtime_args(section):
    """The command-line flags passing those resources to the command (``--num-workers {resources.
    pretrain_num_workers}`` ...): each command accepts its section's (``pipeline.config.add_runtime_flags``)."""
    return " ".join(f"{flag} {{resources.{runtime_resource(section, k)}}}" for flag, k in runtime_flags(section))


def launch(stage, command):
    """The command line of a GPU job: the lease of ``resources.gpu`` GPUs, then one process, or one
    DDP process per leased GPU under torchrun when there are several."""
    return (
        "if [ {resources.gpu} -gt 1 ]; then "
        "launch='torchrun --standalone --nproc_per_node {resources.gpu} -m'; "
        "else launch='python -m'; fi; "
        f"python -m pipeline.lease --gpus {{resources.gpu}} -- $launch pipeline.{stage} {command} "
    )


# ---------------------------------------------------------------------------------------------
# paths written by one rule and read by others


def bag_path(generator):
    """The merged bag of views of one generator (rule merge_views)."""
    return f"results/views/{generator}/bag.h5"


KNN_PATH = "results/consistency/knn.npz"


def metrics_path(model, dataset):
    """The label-propagation metrics of one encoder on one dataset (rule propagate)."""
    return f"results/eval/{model}/{dataset}/metrics.csv"


# ---------------------------------------------------------------------------------------------
# pretraining cells (pipeline.cells): every key that defines a cell is part of its output path


def get_cells(table):
    """Canonical cells a table needs, in the table's row order."""
    try:
        return table_cells(config, table)
    except CellError as err:
        raise WorkflowError(str(err))


def get_seeds(table, cell):
    return table_seeds(config, table, cell)


CELLS = pd.DataFrame(
    [dict(c) for c in {json.dumps(c, sort_keys=True): c for tb in PROPAGATION_TABLES for c in get_cells(tb)}.values()],
    columns=list(CELL_KEYS),
)
PARAMSPACE = Paramspace(CELLS, param_sep="~")
CELL_PATTERN = PARAMSPACE.wildcard_pattern


def cell_from_wildcards(wildcards):
    """The cell dict of a job from its wildcards, as plain Python types (JSON-serializable)."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in PARAMSPACE.instance(wildcards).items()}


def get_random_init_model(arch):
    return random_init_model(arch, config["propagation"]["random_init_seed"])


def table_models(table):
    """(cell, seed, model path) for every trained model a table needs."""
    return [(cell, seed, model_path(cell, seed)) for cell in get_cells(table) for seed in get_seeds(table, cell)]


def table_archs(table):
    return sorted({cell["arch"] for cell in get_cells(table)})


def eval_metrics(models, datasets=None):
    return [metrics_path(m, d) for m in models for d in (datasets or EVAL_DATASETS)]


def get_table_evals(table):
    """Every metrics.csv a table needs: its trained models and one random-init reference per arch."""
    models = [m for _, _, m in table_models(table)]
    models += [get_random_init_model(a) for a in table_archs(table)]
    return eval_metrics(models)


def config_table_settings(table):
    """The validated config slices Table 6 (training) / Table 7 (propagation) show."""
    if table == "table6":
        cropmae = [c for c in get_cells("table5") if c["method"] == "cropmae"]
        return {
            "pretrain": {k: v for k, v in config["pretrain"].items() if k != "seeds"},
            "cell_defaults": canonical_cell({}, config),
            "cropmae_target_mask": cropmae[0]["target_mask"] if cropmae else 0.985,
            "n_views": config["views"]["n_views"],
        }
    return {"propagation": config["propagation"]}


def report_table(path):
    """A results/{table}.csv output (or a fixed results/tableN.csv) shown in the HTML report,
    labelled and captioned from the table registry (pipeline.table_registry); the caption text travels as
    the rule's ``caption`` param. Its ``provenance`` label, read from the table's record
    (pipeline.records) when the report is made, names the code, environments and inputs behind it."""
    fixed = os.path.basename(path).split(".")[0]  # "{table}", or the table of a fixed path

    def labels(wildcards):
        name = getattr(wildcards, "table", fixed)
        return {"table": TABLES[name].label, "provenance": provenance_label(f"results/{name}.csv")}

    return report(path, caption="../report/table.rst", category="Tables", labels=labels)


def report_record(path):
    """A table's provenance record (results/{table}.provenance.json) in the HTML report, under
    Provenance, labelled with its table and what its record says."""
    fixed = os.path.basename(path).split(".")[0]

    def labels(wildcards):
        name = getattr(wildcards, "table", fixed)
        return {"table": TABLES[name].label, "record": provenance_label(f"results/{name}.csv")}

    return report(path, caption="../report/provenance.rst", category="Provenance", labels=labels)


def provenance_label(artefact):
    """One line from the provenance record beside ``artefact`` (read when the report is made)."""
    record = read_record(record_path(artefact))
    return describe_record(record) if record else f"no provenance record ({record_path(artefact)})"


def get_final_targets():
    """Everything `snakemake` builds by default: every paper table, the figures, the summary."""
    return [f"results/{t}.csv" for t in PAPER_TABLES] + [
        "results/mae_family.csv",  # this project's extension table
        "results/figure4.png",
        "results/figures/loss_curves.png",
        "results/figures/bag_of_views.png",
        "results/summary.md",
    ]


def get_all_cores():
    """Every core Snakemake was given (--cores): the thread count of a job that should run alone
    on a local machine. 1 under a cluster executor, which has no such total (the profile sets each
    job's CPUs there)."""
    return workflow.resource_settings.cores or 1


def get_rcg_checkpoint(key):
    """A path of views.generators.rcg, required once import_rcg is asked for."""
    path = config["views"]["generators"]["rcg"][key]
    if not path:
        raise ValueError(f"views.generators.rcg.{key} is not set: import_rcg needs both RCG checkpoints")
    return path


def get_rcg_config_input():
    """RCG's LDM config file as an input of import_rcg, when one is set."""
    path = config["views"]["generators"]["rcg"]["ldm_config"]
    return [path] if path else []


# ---------------------------------------------------------------------------------------------
# the warm job server of a local run (config job_server, pipeline/job_server.py)

JOB_SERVERS = []


def start_job_server():
    """Jobs of this run start as forks of one interpreter that has imported torch; not for a
    cluster executor, whose jobs run in their own allocations."""
    if config["job_server"] and workflow.local_exec and not workflow.remote_exec:
        server = job_server.start("results/logs/job_server.log")
        JOB_SERVERS.append(server)
        if server.socket:  # the shell jobs inherit Snakemake's environment
            os.environ[job_server.SOCKET_ENV] = server.socket


def stop_job_server():
    os.environ.pop(job_server.SOCKET_ENV, None)
    while JOB_SERVERS:
        job_server.stop(JOB_SERVERS.pop())


onstart:
    start_job_server()


onsuccess:
    stop_job_server()


onerror:
    stop_job_server()
