# Stage 5: the paper's tables, figures and summary (pipeline/report/), driven by the table
# registry pipeline.table_registry. Each table lists only the evaluations it needs, so building one table
# runs exactly its cells; report jobs depend on the report code alone, so editing it re-runs only them.


localrules:
    assemble_table,
    assemble_config_table,
    plot_figure4,
    plot_loss_curves,
    assemble_summary,


GFLOPS_OF_TABLE = {"table8": "results/gflops.csv", "mae_family": "results/mae_family_gflops.csv"}


rule assemble_table:
    input:
        evals=lambda wildcards: get_table_evals(wildcards.table),
        # training GFLOPs per sample: Table 8's cells, or the MAE-family table's (with parameters)
        gflops=lambda wildcards: GFLOPS_OF_TABLE.get(wildcards.table, []),
        # table 10: each generator's bag, whose attributes say what made its views (label, sampler,
        # encoder source, model digest); read, never decoded
        bags=lambda wildcards: (
            [bag_path(g) for g in config["tables"]["table10"]["generators"]] if wildcards.table == "table10" else []
        ),
    output:
        table=report_table("results/{table}.csv"),
        per_seed="results/{table}_per_seed.csv",
        # written by the command beside the table (pipeline.records)
        record=report_record("results/{table}.provenance.json"),
    log:
        "results/logs/assemble_table/{table}.log",
    benchmark:
        "results/benchmarks/assemble_table/{table}.tsv"
    wildcard_constraints:
        table="|".join(PROPAGATION_TABLES),
    conda:
        "../envs/pipeline.yaml"
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("report", "table"),
        gflops=lambda wildcards, input: f"--gflops {input.gflops}" if input.gflops else "",
        bags=lambda wildcards, input: " ".join(f"--bag {b.split('/')[-2]}={b}" for b in input.bags),
        caption=lambda wildcards: TABLES[wildcards.table].caption,
        run_label=config["run_label"],
    shell:
        "python -m pipeline.report table --name {wildcards.table} --evals {input.evals} "
        "--output {output.table} --per-seed {output.per_seed} --run-label {params.run_label} "
        "{params.gflops} {params.bags} 2> {log}"


rule assemble_config_table:
    output:
        table=report_table("results/{table}.csv"),
        record=report_record("results/{table}.provenance.json"),
    log:
        "results/logs/assemble_config_table/{table}.log",
    benchmark:
        "results/benchmarks/assemble_config_table/{table}.tsv"
    wildcard_constraints:
        table="|".join(t for t in TABLES if TABLES[t].kind == "config"),
    conda:
        "../envs/pipeline.yaml"
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("report", "config-table"),
        settings=lambda wildcards: json.dumps(config_table_settings(wildcards.table), sort_keys=True),
        caption=lambda wildcards: TABLES[wildcards.table].caption,
    shell:
        "python -m pipeline.report config-table --name {wildcards.table} --settings {params.settings:q} "
        "--output {output.table} 2> {log}"


rule plot_figure4:
    input:
        table="results/figure4.csv",
    output:
        report(
            "results/figure4.png",
            caption="../report/table.rst",
            category="Figures",
            labels={"figure": TABLES["figure4"].label},
        ),
    log:
        "results/logs/plot_figure4.log",
    benchmark:
        "results/benchmarks/plot_figure4.tsv"
    conda:
        "../envs/pipeline.yaml"
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("report", "figure4"),
        caption=TABLES["figure4"].caption,
    shell:
        "python -m pipeline.report figure4 --table {input.table} --output {output} 2> {log}"


rule plot_loss_curves:
    input:
        logs=[f"results/pretrain/{m}/train_log.csv" for _, _, m in table_models("table4")],
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
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("report", "loss-curves"),
    shell:
        "python -m pipeline.report loss-curves --logs {input.logs} --output {output} 2> {log}"


rule assemble_summary:
    input:
        # the paper's tables, Figure 4's, then this project's extension (the MAE-family table)
        tables=[f"results/{t}.csv" for t in PAPER_TABLES + ["figure4", "mae_family"]],
        # each table's provenance record, summarised beside it
        records=[f"results/{t}.provenance.json" for t in PAPER_TABLES + ["figure4", "mae_family"]],
    output:
        report(
            "results/summary.md",
            caption="../report/summary.rst",
            category="Summary",
        ),
    log:
        "results/logs/assemble_summary.log",
    benchmark:
        "results/benchmarks/assemble_summary.tsv"
    conda:
        "../envs/pipeline.yaml"
    params:
        # the digest of the code this job runs (pipeline.provenance): an edit that changes it re-runs the job
        code=stage_code("report", "summary"),
        run_label=config["run_label"],
        synthetic="--synthetic" if not any(config["data"]["roots"].values()) else "",
    shell:
        "python -m pipeline.report summary --tables {input.tables} --output {output} "
        "--run-label {params.run_label} {params.synthetic} 2> {log}"
