# Stage 3: cross-view MAE pretraining, one job per (cell, seed), and the Table 8 GFLOPs.
# The cell's defining hyper-parameters are in the output path (Paramspace, rules/common.smk), so
# adding a cell never invalidates another. Resumable state lives in results/pretrain_state/,
# outside the declared outputs, so the retry of a failed or killed job resumes where it stopped.

import re
import shlex

from pipeline.cells import VIEW_METHODS  # the methods that read a bag of views

# the dataset a cell reads besides its bag of views: the baselines' and the MAE family's images /
# videos, and for target=knn the ImageNet list whose global indices the neighbours file holds
DATASET_OF_METHOD = {
    "cropmae": "imagenet",
    "siammae": "videos",
    "mae": "imagenet",
    "lut": "imagenet",
    "pseudo-mae": "imagenet",
}
pretrain_dataset = lambda wc: DATASET_OF_METHOD.get(wc.method, "imagenet" if wc.target == "knn" else None)


rule pretrain:
    input:
        # what the cell reads: its bag of views (cdgmae), the neighbours (target knn), or the
        # image / video dataset (cropmae / siammae); [] where it does not apply
        bag=lambda wc: bag_path(wc.generator) if wc.method in VIEW_METHODS else [],
        knn=lambda wc: KNN_PATH if wc.target == "knn" else [],
        data=lambda wc: get_dataset_input(pretrain_dataset(wc)) if pretrain_dataset(wc) else [],
    output:
        checkpoint=f"results/pretrain/{CELL_PATTERN}/seed~{{seed}}/checkpoint.pth",
        log_csv=f"results/pretrain/{CELL_PATTERN}/seed~{{seed}}/train_log.csv",
        curve=f"results/pretrain/{CELL_PATTERN}/seed~{{seed}}/loss_curve.png",
        # the checkpoint's provenance record (pipeline.records), written by the command
        record=f"results/pretrain/{CELL_PATTERN}/seed~{{seed}}/checkpoint.provenance.json",
    log:
        f"results/logs/pretrain/{CELL_PATTERN}/seed~{{seed}}.log",
    benchmark:
        f"results/benchmarks/pretrain/{CELL_PATTERN}/seed~{{seed}}.tsv"
    conda:
        "../envs/pipeline.yaml"
    # one intra-op thread: parallel jobs share CPUs better than oversubscribed threads (raise it
    # with --set-threads pretrain=N on big CPU nodes; GPU jobs barely use it)
    threads: 1
    resources:
        # infrastructure knobs are resources, not params: editing them re-runs nothing
        **runtime_resources("pretrain"),
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("pretrain", "train"),
        # canonical JSON of the cell
        cell=lambda wc: json.dumps(cell_from_wildcards(wc), sort_keys=True),
        # flags naming the cell's data (wildcards-only, so tracked like any param)
        sources=lambda wc: (
            (f"--bag {bag_path(wc.generator)}" if wc.method in VIEW_METHODS else "")
            + (f" --knn {KNN_PATH}" if wc.target == "knn" else "")
            + (
                f" --{pretrain_dataset(wc)}-root {shlex.quote(get_root(pretrain_dataset(wc)))}"
                if pretrain_dataset(wc)
                else ""
            )
            # the views stage's bad-image policy for the images / frames the baselines read themselves
            + (
                f" --max-reject-fraction {config['views']['max_reject_fraction']}"
                if wc.method in DATASET_OF_METHOD
                else ""
            )
        ),
        # training hyper-parameters only: editing the seed list or a table's cells reruns nothing
        settings=settings("pretrain", command="train"),
        state_dir=f"results/pretrain_state/{CELL_PATTERN}/seed~{{seed}}",
    shell:
        launch("pretrain", "train")
        + "--cell {params.cell:q} --seed {wildcards.seed} --settings {params.settings:q} {params.sources} "
        "--output {output.checkpoint} --state-dir {params.state_dir:q} --log-csv {output.log_csv} "
        f"--curve-png {{output.curve}} --threads {{threads}} {runtime_args('pretrain')} > {{log}} 2>&1"


rule count_gflops:
    output:
        "results/gflops.csv",
    log:
        "results/logs/count_gflops.log",
    benchmark:
        "results/benchmarks/count_gflops.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("pretrain", "flops"),
        arch=config["pretrain"]["cell_defaults"]["arch"],
        img_size=config["pretrain"]["img_size"],
        target_mask=config["pretrain"]["cell_defaults"]["target_mask"],
        cells=",".join(f"{c['anchors']}:{c['anchor_mask']}" for c in get_cells("table8")),
    shell:
        "python -m pipeline.pretrain flops --output {output} --arch {params.arch} --img-size {params.img_size} "
        "--target-mask {params.target_mask} --cells {params.cells:q} --threads {threads} > {log} 2>&1"


rule count_method_gflops:
    """Training GFLOPs per sample (teachers counted) and parameters of the MAE-family table's cells."""
    output:
        "results/mae_family_gflops.csv",
    log:
        "results/logs/count_method_gflops.log",
    benchmark:
        "results/benchmarks/count_method_gflops.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("pretrain", "method-flops"),
        cells=json.dumps(get_cells("mae_family"), sort_keys=True),
        settings=settings("pretrain", command="method-flops"),
    shell:
        "python -m pipeline.pretrain method-flops --cells {params.cells:q} --settings {params.settings:q} "
        "--output {output} --threads {threads} > {log} 2>&1"


# Encoders that are not trained here, evaluated by the same propagate rule as trained ones: a
# seeded random-init reference per arch, and external checkpoints named in propagation.external.
# only configured external encoders can be imported (a regex that never matches when none are)
EXTERNAL_NAMES = "|".join(re.escape(n) for n in config["propagation"]["external"]) or "(?!)"


rule init_random_encoder:
    output:
        checkpoint="results/pretrain/random-init/arch~{arch}/seed~{seed}/checkpoint.pth",
        record="results/pretrain/random-init/arch~{arch}/seed~{seed}/checkpoint.provenance.json",
    log:
        "results/logs/init_random_encoder/arch~{arch}/seed~{seed}.log",
    benchmark:
        "results/benchmarks/init_random_encoder/arch~{arch}/seed~{seed}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("pretrain", "init-random"),
        # same position-embedding grid as the trained encoders it is compared with
        img_size=config["pretrain"]["img_size"],
    shell:
        "python -m pipeline.pretrain init-random --arch {wildcards.arch} --seed {wildcards.seed} "
        "--img-size {params.img_size} --output {output.checkpoint:q} > {log} 2>&1"


rule import_external_encoder:
    input:
        source=lambda wildcards: config["propagation"]["external"][wildcards.name]["path"],
    output:
        checkpoint="results/pretrain/external/{name}/checkpoint.pth",
        record="results/pretrain/external/{name}/checkpoint.provenance.json",
    log:
        "results/logs/import_external_encoder/{name}.log",
    benchmark:
        "results/benchmarks/import_external_encoder/{name}.tsv"
    wildcard_constraints:
        name=EXTERNAL_NAMES,
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("pretrain", "import-external"),
        arch=lambda wildcards: config["propagation"]["external"][wildcards.name]["arch"],
    shell:
        "python -m pipeline.pretrain import-external --source {input.source:q} "
        "--arch {params.arch:q} --output {output.checkpoint:q} > {log} 2>&1"
