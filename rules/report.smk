# Stage 5: the paper's tables, figures and summary (pipeline/report.py).
# Each table rule lists only the evaluations that table needs, so building one table runs exactly
# its cells; report jobs depend on pipeline/report.py alone, so editing it re-runs only them.


localrules:
    assemble_table2,
    assemble_table3,
    assemble_table4,
    assemble_table5,
    assemble_table6,
    assemble_table7,
    assemble_table8,
    assemble_table10,
    assemble_figure4,
    plot_loss_curves,
    assemble_summary,


REPORT_CMD = (
    "python -m pipeline.report.tables table --name {params.name} --evals {input.evals} "
    "--output {output.table} --per-seed {output.per_seed} --run-label {params.run_label} "
    "{params.extra} 2> {log}"
)


rule assemble_table2:
    input:
        evals=get_table_evals("table2"),
        code=stage_code("report"),
    output:
        table=report_table("table2", "2: target view"),
        per_seed="results/table2_per_seed.csv",
    params:
        name="table2",
        run_label=config["run_label"],
        extra="",
    log:
        "results/logs/assemble_table2.log",
    benchmark:
        "results/benchmarks/assemble_table2.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        REPORT_CMD


rule assemble_table3:
    input:
        evals=get_table_evals("table3"),
        code=stage_code("report"),
    output:
        table=report_table("table3", "3: target masking ratio"),
        per_seed="results/table3_per_seed.csv",
    params:
        name="table3",
        run_label=config["run_label"],
        extra="",
    log:
        "results/logs/assemble_table3.log",
    benchmark:
        "results/benchmarks/assemble_table3.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        REPORT_CMD


rule assemble_table4:
    input:
        evals=get_table_evals("table4"),
        code=stage_code("report"),
    output:
        table=report_table("table4", "4: anchors and anchor masking"),
        per_seed="results/table4_per_seed.csv",
    params:
        name="table4",
        run_label=config["run_label"],
        extra="",
    log:
        "results/logs/assemble_table4.log",
    benchmark:
        "results/benchmarks/assemble_table4.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        REPORT_CMD


rule assemble_table5:
    input:
        evals=get_table_evals("table5"),
        code=stage_code("report"),
    output:
        table=report_table("table5", "5: method comparison"),
        per_seed="results/table5_per_seed.csv",
    params:
        name="table5",
        run_label=config["run_label"],
        extra="",
    log:
        "results/logs/assemble_table5.log",
    benchmark:
        "results/benchmarks/assemble_table5.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        REPORT_CMD


rule assemble_table8:
    input:
        evals=get_table_evals("table8"),
        gflops="results/gflops.csv",
        code=stage_code("report"),
    output:
        table=report_table("table8", "8: anchors, masking and GFLOPs"),
        per_seed="results/table8_per_seed.csv",
    params:
        name="table8",
        run_label=config["run_label"],
        extra="--gflops results/gflops.csv",
    log:
        "results/logs/assemble_table8.log",
    benchmark:
        "results/benchmarks/assemble_table8.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        REPORT_CMD


rule assemble_table10:
    input:
        evals=get_table_evals("table10"),
        code=stage_code("report"),
    output:
        table=report_table("table10", "10: choice of generator"),
        per_seed="results/table10_per_seed.csv",
    params:
        name="table10",
        run_label=config["run_label"],
        extra="",
    log:
        "results/logs/assemble_table10.log",
    benchmark:
        "results/benchmarks/assemble_table10.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        REPORT_CMD


rule assemble_figure4:
    input:
        evals=get_table_evals("figure4"),
        code=stage_code("report"),
    output:
        table="results/figure4.csv",
        per_seed="results/figure4_per_seed.csv",
        figure=report(
            "results/figure4.png",
            caption="../report/figure4.rst",
            category="Figures",
            labels={"figure": "4: patch size"},
        ),
    params:
        name="figure4",
        run_label=config["run_label"],
        extra="--figure results/figure4.png",
    log:
        "results/logs/assemble_figure4.log",
    benchmark:
        "results/benchmarks/assemble_figure4.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        REPORT_CMD


rule assemble_table6:
    input:
        code=stage_code("report"),
    output:
        report_table("table6", "6: training settings"),
    params:
        settings=json.dumps(
            {
                "pretrain": {k: v for k, v in config["pretrain"].items() if k != "seeds"},
                "cell_defaults": normalize_cell({}),
                "cropmae_target_mask": next(
                    (c["target_mask"] for c in get_cells("table5") if c["method"] == "cropmae"),
                    0.985,
                ),
                "n_views": config["views"]["n_views"],
            },
            sort_keys=True,
        ),
    log:
        "results/logs/assemble_table6.log",
    benchmark:
        "results/benchmarks/assemble_table6.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.report.tables config-table --name table6 --settings {params.settings:q} "
        "--output {output} 2> {log}"


rule assemble_table7:
    input:
        code=stage_code("report"),
    output:
        report_table("table7", "7: propagation settings"),
    params:
        settings=json.dumps({"propagation": config["propagation"]}, sort_keys=True),
    log:
        "results/logs/assemble_table7.log",
    benchmark:
        "results/benchmarks/assemble_table7.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.report.tables config-table --name table7 --settings {params.settings:q} "
        "--output {output} 2> {log}"


rule plot_loss_curves:
    input:
        logs=[f"results/pretrain/{m}/train_log.csv" for _, _, m in table_models("table4")],
        code=stage_code("report"),
    output:
        report(
            "results/figures/loss_curves.png",
            caption="../report/loss_curves.rst",
            category="Figures",
            labels={"figure": "training loss (Table 4 cells)"},
        ),
    log:
        "results/logs/plot_loss_curves.log",
    benchmark:
        "results/benchmarks/plot_loss_curves.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.report.tables loss-curves --logs {input.logs} --output {output} 2> {log}"


rule assemble_summary:
    input:
        tables=[f"results/table{i}.csv" for i in range(1, 11)] + ["results/figure4.csv"],
        code=stage_code("report"),
    output:
        report(
            "results/summary.md",
            caption="../report/summary.rst",
            category="Summary",
        ),
    params:
        run_label=config["run_label"],
        synthetic="--synthetic" if not any(config["data"]["roots"].values()) else "",
    log:
        "results/logs/assemble_summary.log",
    benchmark:
        "results/benchmarks/assemble_summary.tsv"
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m pipeline.report.tables summary --tables {input.tables} --output {output} "
        "--run-label {params.run_label} {params.synthetic} 2> {log}"
