"""Constants more than one stage uses, defined once."""

from __future__ import annotations

# ImageNet normalization of every encoder input (MAE, CropMAE, videowalk, timm's ViTs)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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


def pascal_palette() -> list[int]:
    """The PASCAL VOC colour map of DAVIS annotations (256 entries, flattened RGB, for
    ``PIL.Image.putpalette``)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette
