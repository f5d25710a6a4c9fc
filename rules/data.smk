# Embedded synthetic datasets (pipeline/synthetic.py), used wherever config.data.roots.<name> is
# null. Each dataset is re-made only when its own settings slice (data.synthetic.<name>), the
# workflow seed or pipeline/synthetic.py change.


rule make_synthetic_data:
    input:
        code=stage_code("synthetic"),
    output:
        directory("results/data/synthetic/{dataset}"),
    params:
        settings=lambda wildcards: settings("data", "synthetic", wildcards.dataset),
        seed=config["seed"],
    # the global constraint covers only the evaluation sets; this rule also makes the
    # pretraining stills and videos
    wildcard_constraints:
        dataset="imagenet|videos|davis|vip|jhmdb",
    log:
        "results/logs/make_synthetic_data/{dataset}.log",
    benchmark:
        "results/benchmarks/make_synthetic_data/{dataset}.tsv"
    threads: 1
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.data.synthetic --dataset {wildcards.dataset} --out {output} "
        "--settings {params.settings:q} --seed {params.seed} --threads {threads} > {log} 2>&1"
