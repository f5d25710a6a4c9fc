# cdgmae — CDG-MAE reproduction workflow (Belagali et al., "Learning Correspondences from
# Diffusion Generated Views"). Table of contents only; each stage lives in rules/<stage>.smk and
# its logic in the subpackage pipeline/<stage>/. See README.md for the map from paper tables to rules.

from snakemake.utils import min_version

min_version("9.1.4")


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/sldm.smk"
include: "rules/views.smk"
include: "rules/consistency.smk"
include: "rules/pretrain.smk"
include: "rules/propagation.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_targets(),
