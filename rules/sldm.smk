# Stage 0.5: train the S-LDM view generator (pipeline/sldm/) on the pretraining images, when the
# sldm generator is asked for and views.generators.sldm.model_path is null (a user folder, e.g. an
# imported one, is used as it is). Resumable state in results/sldm_state/, outside the outputs.


rule train_sldm:
    input:
        data=get_dataset_input("imagenet"),
        encoder=get_sldm_encoder_input(),
        code=stage_code("sldm", "train"),
    output:
        model=directory(TRAINED_SLDM),
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
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        gpu=config["sldm"]["gpus"],
        checkpoint_every=config["sldm"]["checkpoint_every"],
        sample_every=config["sldm"]["sample_every"],
        num_workers=config["sldm"]["num_workers"],
    params:
        root=lambda wildcards: get_root("imagenet"),
        settings=settings("sldm"),
        seed=config["seed"],
        state_dir="results/sldm_state",
    shell:
        "if [ {resources.gpu} -gt 1 ]; then "
        "launch='torchrun --standalone --nproc_per_node {resources.gpu} -m'; "
        "else launch='python -m'; fi; "
        "python -m pipeline.lease --gpus {resources.gpu} -- $launch pipeline.sldm train "
        "--imagenet-root {params.root:q} --settings {params.settings:q} --seed {params.seed} "
        "--output {output.model:q} --state-dir {params.state_dir:q} --log-csv {output.log_csv:q} "
        "--curve-png {output.curve:q} --samples-png {output.samples:q} --threads {threads} "
        "--checkpoint-every {resources.checkpoint_every} --sample-every {resources.sample_every} "
        "--num-workers {resources.num_workers} > {log} 2>&1"
