# Stage 4: training-free label propagation and scoring, one job per (encoder, dataset).
# {model} is any path under results/pretrain/ holding a checkpoint.pth: a trained cell
# (rules/pretrain.smk), a random-init reference or an imported external encoder (also rules/pretrain.smk), so
# all three are evaluated by the same rule. Outputs besides metrics.csv (predictions in the
# standard layouts, the scorers' per-sequence / per-object CSVs under scores/, figures/) differ by
# dataset and are not declared; the module removes stale ones itself.


rule propagate:
    input:
        checkpoint="results/pretrain/{model}/checkpoint.pth",
        data=lambda wildcards: get_dataset_input(wildcards.dataset),
    output:
        metrics=metrics_path("{model}", "{dataset}"),
        # its provenance record (pipeline.records), written by the command
        record="results/eval/{model}/{dataset}/metrics.provenance.json",
    log:
        "results/logs/propagate/{model}/{dataset}.log",
    benchmark:
        "results/benchmarks/propagate/{model}/{dataset}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1  # see rules/pretrain.smk: parallel single-threaded jobs; --set-threads to raise
    resources:
        **runtime_resources("propagation"),
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("propagation", "run"),
        root=lambda wildcards: get_root(wildcards.dataset),
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        # shared protocol keys only (temperature, radius, queue, ...), not the dataset sections,
        # the GPU count or the lists of what to evaluate (the schema's marks)
        settings=settings("propagation", command="run"),
        # the dataset's own section (top-k, size, ...): editing VIP's reruns only VIP
        dataset_settings=lambda wildcards: settings("propagation", wildcards.dataset),
    shell:
        "python -m pipeline.lease --gpus {resources.gpu} -- python -m pipeline.propagation run "
        "--checkpoint {input.checkpoint:q} --dataset {wildcards.dataset} --root {params.root:q} "
        "--output-dir {params.out_dir:q} --settings {params.settings:q} "
        "--dataset-settings {params.dataset_settings:q} --model {wildcards.model:q} "
        "--threads {threads} > {log} 2>&1"
