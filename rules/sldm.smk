# The view generator's stage (before the bag of views): train the S-LDM view generator
# (pipeline/sldm/) on the pretraining images, when the
# sldm generator is asked for and views.generators.sldm.model_path is null (a user folder, e.g. an
# imported one, is used as it is). Resumable state in results/sldm_state/, outside the outputs.
# Also: import RCG's public LDM-8 (the rcg generator, Tables 9/10) from its two checkpoints.

import shlex


rule train_sldm:
    input:
        data=get_dataset_input("imagenet"),
        encoder=get_sldm_encoder_input(),
    output:
        model=directory(TRAINED_SLDM),
        # the folder's provenance record beside it (pipeline.records), written by the command
        record=f"{TRAINED_SLDM}.provenance.json",
        log_csv="results/sldm/train_log.csv",
        curve="results/sldm/loss_curve.png",
        samples=report(
            "results/sldm/samples.png",
            caption="../report/sldm_samples.rst",
            category="Figures",
            labels={"figure": "S-LDM samples"},
        ),
    log:
        "results/logs/train_sldm.log",
    benchmark:
        "results/benchmarks/train_sldm.tsv"
    priority: 10
    conda:
        "../envs/pipeline.yaml"
    # the one job everything downstream waits for: it takes every core Snakemake was given, so on a
    # CPU machine no single-threaded job shares them (two torch threads among 8 jobs on 2 cores ran
    # 8x slower), and it is scheduled first; torch uses at most the CPUs the job may run on
    # (pipeline.devices.set_threads). On Slurm the profile gives it --cpus-per-gpu.
    threads: get_all_cores()
    resources:
        **runtime_resources("sldm"),
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("sldm", "train"),
        root=lambda wildcards: get_root("imagenet"),
        settings=settings("sldm", command="train"),
        seed=config["seed"],
        state_dir="results/sldm_state",
        # the bad-image policy of every reader of the image root (views, k-NN, CropMAE)
        max_reject_fraction=config["views"]["max_reject_fraction"],
    shell:
        launch("sldm", "train")
        + "--imagenet-root {params.root:q} --settings {params.settings:q} --seed {params.seed} "
        "--output {output.model:q} --state-dir {params.state_dir:q} --log-csv {output.log_csv:q} "
        "--curve-png {output.curve:q} --samples-png {output.samples:q} --threads {threads} "
        f"--max-reject-fraction {{params.max_reject_fraction}} {runtime_args('sldm')} > {{log}} 2>&1"


rule import_rcg:
    input:
        ldm=lambda wildcards: get_rcg_checkpoint("ldm_checkpoint"),
        encoder=lambda wildcards: get_rcg_checkpoint("encoder_checkpoint"),
        ldm_config=lambda wildcards: get_rcg_config_input(),
    output:
        model=directory(IMPORTED_RCG),
        record=f"{IMPORTED_RCG}.provenance.json",
    log:
        "results/logs/import_rcg.log",
    benchmark:
        "results/benchmarks/import_rcg.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("sldm", "import-rcg"),
        ldm_config=" ".join(f"--ldm-config {shlex.quote(p)}" for p in get_rcg_config_input()),
        unet_weights=config["views"]["generators"]["rcg"]["unet_weights"],
    shell:
        "python -m pipeline.sldm import-rcg --ldm {input.ldm:q} --encoder {input.encoder:q} "
        "{params.ldm_config} --unet-weights {params.unet_weights} --out {output.model:q} > {log} 2>&1"
