# Stage 3: cross-view MAE pretraining, one job per (cell, seed), and the Table 8 GFLOPs.
# The cell's defining hyper-parameters are in the output path (Paramspace, rules/common.smk), so
# adding a cell never invalidates another. Resumable state lives in results/pretrain_state/,
# outside the declared outputs, so the retry of a failed or killed job resumes where it stopped.

import shlex


def pretrain_cell_json(wildcards):
    """The job's cell as canonical JSON (plain Python types; Paramspace gives NumPy scalars)."""
    cell = cell_from_wildcards(wildcards)
    return json.dumps({k: v.item() if hasattr(v, "item") else v for k, v in cell.items()}, sort_keys=True)


def pretrain_inputs(wildcards):
    """What a cell reads: its bag of views (cdgmae), the neighbours file (target knn), or the
    image / video dataset (cropmae / siammae)."""
    cell = cell_from_wildcards(wildcards)
    inputs = {}
    if cell["method"] == "cdgmae":
        inputs["bag"] = f"results/views/{cell['generator']}/bag.h5"
        if cell["target"] == "knn":
            inputs["knn"] = "results/consistency/knn.npz"
    elif cell["method"] == "cropmae":
        inputs["data"] = get_dataset_input("imagenet")
    elif cell["method"] == "siammae":
        inputs["data"] = get_dataset_input("videos")
    return inputs


def pretrain_sources(wildcards):
    """Command-line flags naming the cell's data (a wildcards-only function: tracked as params)."""
    cell = cell_from_wildcards(wildcards)
    if cell["method"] == "cdgmae":
        flags = ["--bag", f"results/views/{cell['generator']}/bag.h5"]
        if cell["target"] == "knn":
            flags += ["--knn", "results/consistency/knn.npz"]
    elif cell["method"] == "cropmae":
        flags = ["--imagenet-root", get_root("imagenet")]
    else:
        flags = ["--videos-root", get_root("videos")]
    return " ".join(shlex.quote(f) for f in flags)


rule pretrain:
    input:
        unpack(pretrain_inputs),
        code=stage_code("pretrain", "models_mae", "strategies"),
    output:
        checkpoint=f"results/pretrain/{CELL_PATTERN}/seed~{{seed}}/checkpoint.pth",
        log_csv=f"results/pretrain/{CELL_PATTERN}/seed~{{seed}}/train_log.csv",
        curve=f"results/pretrain/{CELL_PATTERN}/seed~{{seed}}/loss_curve.png",
    params:
        cell=pretrain_cell_json,
        sources=pretrain_sources,
        # training hyper-parameters only: editing the seed list or a table's cells reruns nothing
        settings=settings("pretrain", drop=("seeds", "cell_defaults")),
        state_dir=f"results/pretrain_state/{CELL_PATTERN}/seed~{{seed}}",
    resources:
        gpu=config["pretrain"]["gpus"],
    threads: 2
    log:
        f"results/logs/pretrain/{CELL_PATTERN}/seed~{{seed}}.log",
    benchmark:
        f"results/benchmarks/pretrain/{CELL_PATTERN}/seed~{{seed}}.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        # more than one GPU: one DDP process per leased GPU under torchrun
        "if [ {resources.gpu} -gt 1 ]; then "
        "launch='torchrun --standalone --nproc_per_node {resources.gpu} -m'; "
        "else launch='python -m'; fi; "
        "python -m pipeline.lease --gpus {resources.gpu} -- $launch pipeline.pretrain "
        "--cell {params.cell:q} --seed {wildcards.seed} --settings {params.settings:q} {params.sources} "
        "--output {output.checkpoint} --state-dir {params.state_dir:q} --log-csv {output.log_csv} "
        "--curve-png {output.curve} --threads {threads} > {log} 2>&1"


rule count_gflops:
    input:
        code=stage_code("flops", "models_mae"),
    output:
        "results/gflops.csv",
    params:
        arch=config["pretrain"]["cell_defaults"]["arch"],
        img_size=config["pretrain"]["img_size"],
        target_mask=config["pretrain"]["cell_defaults"]["target_mask"],
        cells=",".join(f"{c['anchors']}:{c['anchor_mask']}" for c in get_cells("table8")),
    threads: 1
    log:
        "results/logs/count_gflops.log",
    benchmark:
        "results/benchmarks/count_gflops.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.flops --output {output} --arch {params.arch} --img-size {params.img_size} "
        "--target-mask {params.target_mask} --cells {params.cells:q} --threads {threads} > {log} 2>&1"
