# Stage 4: training-free label propagation and scoring, one job per (encoder, dataset).
# {model} is any path under results/pretrain/ holding a checkpoint.pth: a trained cell
# (rules/pretrain.smk), a random-init reference or an imported external encoder (rules below), so
# all three are evaluated by the same rule. Outputs besides metrics.csv (predictions in the
# standard layouts, the scorers' per-sequence / per-object CSVs under scores/, figures/) differ by
# dataset and are not declared; the module removes stale ones itself.

import re


# only configured external encoders can be imported (a regex that never matches when none are)
EXTERNAL_NAMES = "|".join(re.escape(n) for n in config["propagation"]["external"]) or "(?!)"


rule propagate:
    input:
        checkpoint="results/pretrain/{model}/checkpoint.pth",
        data=lambda wildcards: get_dataset_input(wildcards.dataset),
        code=stage_code("propagate", "score", "metrics"),
    output:
        metrics="results/eval/{model}/{dataset}/metrics.csv",
    params:
        root=lambda wildcards: get_root(wildcards.dataset),
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        # shared protocol keys only (temperature, radius, queue, ...), not the dataset sections,
        # the GPU count or the lists of what to evaluate
        settings=settings(
            "propagation",
            drop=("davis", "vip", "jhmdb", "gpus", "evaluate", "random_init_seed", "external"),
        ),
        # the dataset's own section (top-k, size, ...): editing VIP's reruns only VIP
        dataset_settings=lambda wildcards: settings("propagation", wildcards.dataset),
    resources:
        gpu=config["propagation"]["gpus"],
    threads: 1  # see rules/pretrain.smk: parallel single-threaded jobs; --set-threads to raise
    log:
        "results/logs/propagate/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/propagate/{model}/{dataset}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.lease --gpus {resources.gpu} -- python -m pipeline.propagation.runner "
        "--checkpoint {input.checkpoint:q} --dataset {wildcards.dataset} --root {params.root:q} "
        "--output-dir {params.out_dir:q} --settings {params.settings:q} "
        "--dataset-settings {params.dataset_settings:q} --model {wildcards.model:q} "
        "--threads {threads} > {log} 2>&1"


rule init_random_encoder:
    input:
        code=stage_code("models_mae"),
    output:
        checkpoint="results/pretrain/random-init/arch~{arch}/seed~{seed}/checkpoint.pth",
    params:
        # same position-embedding grid as the trained encoders it is compared with
        img_size=config["pretrain"]["img_size"],
    threads: 1
    log:
        "results/logs/init_random_encoder/arch~{arch}/seed~{seed}.log",
    benchmark:
        "results/benchmarks/init_random_encoder/arch~{arch}/seed~{seed}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.pretrain.models_mae init-random --arch {wildcards.arch} --seed {wildcards.seed} "
        "--img-size {params.img_size} --output {output.checkpoint:q} > {log} 2>&1"


rule import_external_encoder:
    wildcard_constraints:
        name=EXTERNAL_NAMES,
    input:
        source=lambda wildcards: config["propagation"]["external"][wildcards.name]["path"],
        code=stage_code("models_mae"),
    output:
        checkpoint="results/pretrain/external/{name}/checkpoint.pth",
    params:
        arch=lambda wildcards: config["propagation"]["external"][wildcards.name]["arch"],
    threads: 1
    log:
        "results/logs/import_external_encoder/{name}.log",
    benchmark:
        "results/benchmarks/import_external_encoder/{name}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.pretrain.models_mae import-external --source {input.source:q} "
        "--arch {params.arch:q} --output {output.checkpoint:q} > {log} 2>&1"
