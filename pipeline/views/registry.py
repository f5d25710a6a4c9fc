"""The ``ViewGenerator`` base class and the ``GENERATORS`` registry.

A module of their own so that every generator module (``generators``, ``diffusion``, ``sldm``) can
register into the one registry without an import cycle. Import them from
``pipeline.views.generators``, which imports every generator module, so the registry is complete.
"""

from __future__ import annotations

import numpy as np

from pipeline.registry import Registry

GENERATORS = Registry("views.generator")


def register(name: str):
    """Class decorator: add the generator to ``GENERATORS`` under ``name``, its ``name`` attribute."""

    def deco(cls):
        cls.name = name
        return GENERATORS.add(name, cls)

    return deco


class ViewGenerator:
    """Base class: subclasses implement ``_generate_one`` or override ``generate``."""

    name = "base"
    is_baseline = False
    # Bump when a code change alters the views a given (image, seed, settings) produces: it is part
    # of the part-file fingerprint, so stale parts are redone; cosmetic edits keep finished parts.
    version = 1

    def __init__(self, settings: dict, image_size: int = 96, device: str | None = None):
        self.settings = dict(settings)
        self.image_size = int(image_size)
        self.device = device

    def describe(self) -> dict:
        """Everything that determines the views, recorded as an HDF5 attribute."""
        return {"name": self.name, "is_baseline": self.is_baseline, "image_size": self.image_size, **self.settings}

    def generate(self, images: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        seeds = np.asarray(seeds, dtype=np.int64)
        B, M = seeds.shape
        out = np.empty((B, M, self.image_size, self.image_size, 3), np.float32)
        for b in range(B):
            for m in range(M):
                out[b, m] = self._generate_one(images[b], int(seeds[b, m]))
        return out

    def _generate_one(self, image: np.ndarray, seed: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError
