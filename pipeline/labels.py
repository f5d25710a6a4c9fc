"""Names that tables, captions and paths carry: which generators are baselines or substitutes, how
their views are labelled (with the sampler, encoder and model of an S-LDM's rows), the evaluation
datasets in table order."""

from __future__ import annotations

import json

import h5py

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


# what a row of generated views says about the model that made them (Tables 1, 9 and 10), read from
# its bag's ``samplers`` attribute (each part's ``ViewGenerator.describe()``, pipeline.views.merge):
# the sampler (scheduler class, steps, eta, guidance scale), the conditioning encoder's source and the
# SHA-256 of the S-LDM folder (pipeline.io.folder_sha256); blank where the generator has none
GENERATOR_COLUMNS = ("sampler", "sampler_steps", "sampler_eta", "guidance_scale", "encoder_source", "model_sha256")
RCG_IMPORT = "rcg-ldm8"  # sldm.json ``imported.from`` of RCG's LDM-8 (pipeline.sldm.rcg)


def read_bag_samplers(path) -> list[dict]:
    """The generator descriptions a bag's parts recorded (its ``samplers`` attribute), read-only;
    an empty list where none is recorded."""
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs.get("samplers", "[]"))


def _distinct(samplers, get):
    """The value every description agrees on, the distinct values joined by '; ', or '' if none."""
    found = []
    for s in samplers:
        value = get(s)
        if value is not None and value not in found:
            found.append(value)
    return found[0] if len(found) == 1 else "; ".join(map(str, found))


def generator_columns(samplers) -> dict:
    """The ``GENERATOR_COLUMNS`` of a row from its bag's sampler descriptions."""
    sampler = [s.get("sampler") or {} for s in samplers]
    encoder = [(s.get("manifest") or {}).get("encoder") or {} for s in samplers]
    return {
        "sampler": _distinct(sampler, lambda s: s.get("scheduler")),
        "sampler_steps": _distinct(sampler, lambda s: s.get("steps")),
        "sampler_eta": _distinct(sampler, lambda s: s.get("eta")),
        "guidance_scale": _distinct(sampler, lambda s: s.get("guidance_scale")),
        "encoder_source": _distinct(encoder, lambda e: e.get("source")),
        "model_sha256": _distinct(samplers, lambda s: s.get("model_sha256")),
    }


def generator_row_label(generator: str, samplers=()) -> str:
    """How Tables 1, 9 and 10 name a generator's row. An S-LDM says which one it is, so that it is
    never taken for the paper's (Gen-SIS's) S-LDM it stands beside: RCG's, imported, or ours with
    the source of its conditioning encoder (``random-init``: the demo's untrained stand-in)."""
    manifests = [s.get("manifest") or {} for s in samplers]
    imported = sorted({str((m.get("imported") or {}).get("from")) for m in manifests if m.get("imported")})
    if generator == "rcg" or imported == [RCG_IMPORT]:
        return "RCG S-LDM (imported)"
    if generator != "sldm":
        return views_label(generator)
    if imported:
        return f"S-LDM imported from {', '.join(imported)}"
    if not samplers:
        return "S-LDM (no sampler recorded in its bag)"
    source = generator_columns(samplers)["encoder_source"] or "unrecorded"
    origin = "trained here" if any("training" in m for m in manifests) else "from a given folder"
    return f"S-LDM {origin} (encoder: {source})"
