# Stage 2: consistency scores GS / LS / NPS (paper §3.2, Tables 1 and 9) and the k-NN neighbour
# file of the pretraining set (pipeline/consistency/).
# Params carry only what changes the numbers; loader workers and the GPU count travel as
# resources (no rerun when they change). Dataset roots are wildcards-free lambdas: a user root is
# not a workflow file, so it cannot be derived from the inputs.

import shlex

CONSISTENCY = config["consistency"]
# the encoder's weights file (timm / cdgmae) is an input, so new weights re-score and a cdgmae
# checkpoint gets built by rule pretrain; the weights-free descriptor encoders need none
CONSISTENCY_CHECKPOINT = (
    [CONSISTENCY["encoder"]["checkpoint"]]
    if CONSISTENCY["encoder"]["name"] in ("timm", "cdgmae") and CONSISTENCY["encoder"]["checkpoint"]
    else []
)


rule find_neighbours:
    input:
        data=get_dataset_input("imagenet"),
        checkpoint=CONSISTENCY_CHECKPOINT,
    output:
        knn=KNN_PATH,
        # its provenance record (pipeline.records), written by the command
        record="results/consistency/knn.provenance.json",
    log:
        "results/logs/find_neighbours/knn.log",
    benchmark:
        "results/benchmarks/find_neighbours/knn.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        **runtime_resources("consistency"),
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("consistency", "neighbours"),
        root=lambda wildcards: get_root("imagenet"),
        # only the encoder defines the neighbours: changing n_pairs or the gaps keeps knn.npz
        settings=settings("consistency", command="neighbours"),
        k=config["pretrain"]["knn_k"],
        # resumable feature parts, outside the declared outputs (survive a failed job)
        state_dir="results/consistency_state/knn",
        # the views stage's bad-image policy (unreadable images listed in <state_dir>/rejects.csv)
        max_reject_fraction=config["views"]["max_reject_fraction"],
    shell:
        "python -m pipeline.lease --gpus {resources.gpu} -- python -m pipeline.consistency neighbours "
        "--imagenet-root {params.root:q} --settings {params.settings:q} --k {params.k} "
        "--state-dir {params.state_dir:q} --output {output.knn:q} --threads {threads} "
        f"--max-reject-fraction {{params.max_reject_fraction}} {runtime_args('consistency')} > {{log}} 2>&1"


rule score_consistency:
    input:
        bag=bag_path(config["views"]["generator"]),
        knn=KNN_PATH,
        imagenet=get_dataset_input("imagenet"),
        videos=get_dataset_input("videos"),
        checkpoint=CONSISTENCY_CHECKPOINT,
    output:
        table=report_table("results/table1.csv"),
        pairs="results/consistency/table1_pairs.csv",
        # written by the command beside the table (pipeline.records)
        record=report_record("results/table1.provenance.json"),
    log:
        "results/logs/score_consistency/table1.log",
    benchmark:
        "results/benchmarks/score_consistency/table1.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        **runtime_resources("consistency"),
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("consistency", "table1"),
        caption=TABLES["table1"].caption,
        settings=settings("consistency", command="table1"),
        generator=config["views"]["generator"],
        seed=config["seed"],
        run_label=config["run_label"],
        imagenet_root=lambda wildcards: get_root("imagenet"),
        videos_root=lambda wildcards: get_root("videos"),
    shell:
        "python -m pipeline.lease --gpus {resources.gpu} -- python -m pipeline.consistency table1 "
        "--bag {input.bag:q} --generator {params.generator:q} --knn {input.knn:q} "
        "--imagenet-root {params.imagenet_root:q} --videos-root {params.videos_root:q} "
        "--settings {params.settings:q} --seed {params.seed} --run-label {params.run_label:q} "
        "--output {output.table:q} --pairs-output {output.pairs:q} --threads {threads} "
        + runtime_args("consistency")
        + " > {log} 2>&1"


rule score_generators:
    input:
        bags=[bag_path(g) for g in CONSISTENCY["generators"]],
        videos=get_dataset_input("videos"),
        checkpoint=CONSISTENCY_CHECKPOINT,
    output:
        table=report_table("results/table9.csv"),
        pairs="results/consistency/table9_pairs.csv",
        record=report_record("results/table9.provenance.json"),
    log:
        "results/logs/score_generators/table9.log",
    benchmark:
        "results/benchmarks/score_generators/table9.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        **runtime_resources("consistency"),
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("consistency", "table9"),
        caption=TABLES["table9"].caption,
        settings=settings("consistency", command="table9"),
        # one "--bag GENERATOR=PATH" per Table 9 row, in config order
        bags=" ".join(f"--bag {shlex.quote(f'{g}={bag_path(g)}')}" for g in CONSISTENCY["generators"]),
        seed=config["seed"],
        run_label=config["run_label"],
        videos_root=lambda wildcards: get_root("videos"),
    shell:
        "python -m pipeline.lease --gpus {resources.gpu} -- python -m pipeline.consistency table9 "
        "{params.bags} --videos-root {params.videos_root:q} "
        "--settings {params.settings:q} --seed {params.seed} --run-label {params.run_label:q} "
        "--output {output.table:q} --pairs-output {output.pairs:q} --threads {threads} "
        + runtime_args("consistency")
        + " > {log} 2>&1"
