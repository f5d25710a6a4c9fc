# Embedded synthetic datasets (pipeline/data/), used wherever config.data.roots.<name> is
# null. Each dataset is re-made only when its own settings slice (data.synthetic.<name>), the
# workflow seed or the code of `python -m pipeline.data synthetic` change.


rule make_synthetic_data:
    output:
        directory("results/data/synthetic/{dataset}"),
    log:
        "results/logs/make_synthetic_data/{dataset}.log",
    benchmark:
        "results/benchmarks/make_synthetic_data/{dataset}.tsv"
    # the global constraint covers only the evaluation sets; this rule also makes the
    # pretraining stills and videos
    wildcard_constraints:
        dataset="imagenet|videos|davis|vip|jhmdb",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("data", "synthetic"),
        settings=lambda wildcards: settings("data", "synthetic", wildcards.dataset),
        seed=config["seed"],
    shell:
        "python -m pipeline.data synthetic --dataset {wildcards.dataset} --out {output} "
        "--settings {params.settings:q} --seed {params.seed} --threads {threads} > {log} 2>&1"
