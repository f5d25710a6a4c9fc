"""View generators for the bag of views, chosen by name from a small registry.

Every generator maps conditioning images and per-view seeds to views:

    gen.generate(images (B, H, W, 3) uint8, seeds (B, M) int64) -> (B, M, S, S, 3) float32 in [0, 1]

where S = ``image_size``. Each view depends only on (its conditioning image, its seed): every view
gets its own CPU ``torch.Generator`` / NumPy ``Generator``, so the result does not depend on the
batch it was generated in (diffusers "Reproducibility" guide; views-and-hdf5.md §4). The output is
float so that the caller can detect non-finite (fp16 NaN) views and regenerate them.

Registry (``GENERATORS``, complete once this module is imported):
- ``sd-variation`` (``pipeline.views.diffusion``): diffusers ``StableDiffusionImageVariationPipeline``
  from a local folder (CLIP image embedding as one cross-attention token, zero-token CFG).
- ``sldm`` (``pipeline.views.sldm_generator``): a self-supervised LDM (Gen-SIS / RCG style) conditioned on the
  CLS embedding of a timm ViT, from one local folder written by ``save_sldm``.
- ``rcg`` (``pipeline.views.sldm_generator``): the same loader on RCG's LDM-8 imported as an ``sldm`` folder
  (``python -m pipeline.sldm import-rcg``), its MoCo v3 representation as the one token, unguided.
- ``warp`` (BASELINE, ``pipeline.views.warp``): weights-free pseudo-views (random perspective + elastic warp + crop).
- ``crop`` (BASELINE, ``pipeline.views.crop``): CropMAE-style random resized crops of the real image.
``warp`` and ``crop`` set ``is_baseline = True``; their bags are never CDG-MAE diffusion views.
One module per generator, so that a generator's views re-run only when its own code changes
(``pipeline.provenance.plugin_code_files``).
"""

from __future__ import annotations

import argparse

# each generator module registers its names; importing them completes the registry
from pipeline.views import crop, diffusion, sldm_generator, warp  # noqa: F401
from pipeline.views.registry import GENERATORS, ViewGenerator


def build_generator(
    name: str, settings: dict | None = None, image_size: int = 96, device: str | None = None
) -> ViewGenerator:
    """Instantiate the generator ``name`` with its ``views.generators.<name>`` settings."""
    if name not in GENERATORS:
        raise KeyError(f"unknown view generator {name!r}; known: {sorted(GENERATORS)}")
    return GENERATORS[name](settings or {}, image_size=image_size, device=device)


def main(argv=None) -> None:
    """List the registered generators (``python -m pipeline.views generators``)."""
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.views generators", description="View generator registry: list the names."
    )
    ap.parse_args(argv)
    for name, cls in sorted(GENERATORS.items()):
        kind = "BASELINE (weights-free)" if cls.is_baseline else "diffusion (local weights)"
        print(f"{name:<14}{kind:<28}{(cls.__doc__ or '').strip().splitlines()[0]}")
