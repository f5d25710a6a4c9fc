"""Names that tables, captions and paths carry: which generators are baselines or substitutes, how
their views are labelled, the evaluation datasets in table order."""

from __future__ import annotations

# weights-free pseudo-view generators: labelled as baselines in every file, table and caption,
# never reported as CDG-MAE diffusion views
BASELINE_GENERATORS = frozenset({"warp", "crop"})
# diffusion generators that are not the paper's S-LDM: labelled as substitutes wherever they appear
SUBSTITUTE_GENERATORS = {"sd-variation": "CLIP-conditioned SD image variations, a substitute for the paper's S-LDM"}

# the evaluation datasets of label propagation, in table order
EVAL_DATASETS = ("davis", "vip", "jhmdb")


def views_label(generator: str) -> str:
    """How tables and captions name the views a generator made."""
    if generator in BASELINE_GENERATORS:
        return f"{generator} pseudo-views (weights-free baseline, not diffusion)"
    if generator in SUBSTITUTE_GENERATORS:
        return f"{generator} diffusion views ({SUBSTITUTE_GENERATORS[generator]})"
    return f"{generator} diffusion views"
