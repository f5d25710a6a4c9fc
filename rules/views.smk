# Stage 1: bag of views (pipeline/views/, GPU lease pipeline/lease.py).
# One generate_views job per (generator, shard); the generator is a wildcard and its settings come
# from views.generators.<name> only, so switching views.generator never re-runs another
# generator's shards. Shards are never temp().
# Time limits: work is committed in parts (views.part_size images, each with a recorded digest) in
# results/views/<generator>/parts/ (outside the declared outputs), named by global row range and
# settings fingerprint, not by shard: a killed job (SIGKILL, a time limit's SIGTERM) redoes at most
# the part it was writing, a corrupt part is regenerated, and a new views.shards reuses every part
# and every finished shard's rows (kept as hard links in parts/ when Snakemake deletes the old
# shard files). Under a `runtime` resource (minutes; the Slurm profile sets it) the job starts no
# part that would end in the last stretch of it (`--time-limit`; the margin is
# pipeline.views.timelimit.TIME_LIMIT_MARGIN_MIN) and exits 1 naming the clean stop; the retry or
# the next run of the same command continues from the next part, so a shard of any length
# completes across any number of time-limited jobs. SIGUSR1 also stops a job after its current
# part. Once a shard is written and its digest re-verified, its parts are removed (its hard link
# holds the rows at no extra cost): with views.merge_mode vds the disk holds the bag once; copy
# keeps the shards beside bag.h5. Assembly and the copy merge stream rows (bounded memory).

# every @register("name") of pipeline/views/ (read from the source, no import)
VIEW_GENERATORS = "|".join(sorted(registrations("views")))


localrules:
    merge_views,
    plot_bag_of_views,


rule generate_views:
    input:
        data=get_dataset_input("imagenet"),
        # the S-LDM this workflow trains (rules/sldm.smk), when it is the generator asked for
        model=lambda wildcards: get_generator_model_input(wildcards.generator),
    output:
        shard="results/views/{generator}/shard-{shard}.h5",
        rejects="results/views/{generator}/shard-{shard}.rejects.csv",
    log:
        "results/logs/generate_views/{generator}/shard-{shard}.log",
    benchmark:
        "results/benchmarks/generate_views/{generator}/shard-{shard}.tsv"
    wildcard_constraints:
        generator=VIEW_GENERATORS,
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        # infrastructure knobs, not params: the views do not depend on the batch size
        **runtime_resources("views"),
        # minutes, 0: no limit; a profile's set-resources replaces it with the site's job limit
        # (a resource, not a param: running under another limit re-runs nothing)
        runtime=0,
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=lambda wildcards: get_generator_code(wildcards.generator),
        root=lambda wildcards: get_root("imagenet"),
        settings=lambda wildcards: json.dumps(
            {
                # what determines a shard's bytes: no batch size (output-invariant), no gpus or
                # figure keys, and only this generator's settings
                **job_settings(config["views"], "views", command="generate"),
                "generators": {wildcards.generator: get_generator_settings(wildcards.generator)},
            },
            sort_keys=True,
        ),
        seed=config["seed"],
        state_dir=lambda wildcards: f"results/views/{wildcards.generator}/parts",
    shell:
        "python -m pipeline.lease --gpus {resources.gpu} -- "
        "python -m pipeline.views generate --root {params.root:q} --generator {wildcards.generator} "
        "--shard {wildcards.shard} --out {output.shard} --rejects {output.rejects} "
        "--state-dir {params.state_dir} --settings {params.settings:q} --seed {params.seed} "
        f"--time-limit {{resources.runtime}} --threads {{threads}} {runtime_args('views')} > {{log}} 2>&1"


rule merge_views:
    input:
        shards=lambda wildcards: expand(
            "results/views/{generator}/shard-{shard}.h5",
            generator=wildcards.generator,
            shard=range(config["views"]["shards"]),
        ),
        data=get_dataset_input("imagenet"),
    output:
        bag=bag_path("{generator}"),
        # its provenance record (pipeline.records), written by the command
        record="results/views/{generator}/bag.provenance.json",
    log:
        "results/logs/merge_views/{generator}.log",
    benchmark:
        "results/benchmarks/merge_views/{generator}.tsv"
    wildcard_constraints:
        generator=VIEW_GENERATORS,
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("views", "merge"),
        root=lambda wildcards: get_root("imagenet"),
        settings=settings("views", command="merge"),
    shell:
        "python -m pipeline.views merge --shards {input.shards} --out {output.bag} "
        "--root {params.root:q} --settings {params.settings:q} --threads {threads} > {log} 2>&1"


rule plot_bag_of_views:
    input:
        bag=bag_path(config["views"]["generator"]),
    output:
        figure=report(
            "results/figures/bag_of_views.png",
            caption="../report/bag_of_views.rst",
            category="Figures",
            labels={"figure": "5: bag of views"},
        ),
    log:
        "results/logs/plot_bag_of_views.log",
    benchmark:
        "results/benchmarks/plot_bag_of_views.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("views", "figure"),
        n_images=config["views"]["figure_images"],
        seed=config["seed"],
    shell:
        "python -m pipeline.views figure --bag {input.bag} --out {output.figure} "
        "--n-images {params.n_images} --seed {params.seed} --threads {threads} > {log} 2>&1"
