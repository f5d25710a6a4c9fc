"""DAVIS's annotation colour map, written into every synthetic annotation and every predicted mask."""

from __future__ import annotations


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
