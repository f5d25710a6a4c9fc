"""Pretraining cells: the hyper-parameters that define one trained model, and their paths.

One definition used by ``rules/common.smk`` (which jobs exist, their output paths), by
``pipeline.pretrain`` (completing ``--cell``) and by ``pipeline.report`` (parsing paths back).
Every key in ``CELL_KEYS`` is part of a model's path, so adding a cell never invalidates another:
``method~cdgmae/arch~vit_small_patch16/generator~sldm/target~either/anchors~2/anchor_mask~0.25/
target_mask~0.9/epochs~100/seed~0``.
"""

from __future__ import annotations

import os

CELL_KEYS = ("method", "arch", "generator", "target", "anchors", "anchor_mask", "target_mask", "epochs")
CELL_INT = frozenset({"anchors", "epochs", "seed"})
CELL_FLOAT = frozenset({"anchor_mask", "target_mask"})
# what a method that reads no bag of views has in place of the view keys, so changing the view
# generator never invalidates the CropMAE / SiamMAE baselines
NO_VIEWS = {"generator": "none", "target": "none", "anchors": 1, "anchor_mask": 0.0}
# the methods that read a bag of views (every cell key applies): CDG-MAE, and CDG-MAE with LUT's
# broader contextualization loss on the anchors' unmasked tokens (pipeline.pretrain.models_mae_family)
VIEW_METHODS = ("cdgmae", "cdgmae-lut")
RANDOM_INIT = "random-init"
EXTERNAL = "external"


class CellError(ValueError):
    """A cell that cannot be trained as configured; the message names the cell."""


def complete_cell(partial: dict, defaults: dict, what: str = "cell") -> dict:
    """``defaults`` completed by ``partial``, restricted to ``CELL_KEYS`` with canonical types."""
    unknown = sorted(set(partial) - set(CELL_KEYS))
    if unknown:
        raise KeyError(f"{what}: unknown keys {unknown}; expected {list(CELL_KEYS)}")
    full = {**defaults, **partial}
    cell = {k: full[k] for k in CELL_KEYS}
    for key in CELL_KEYS:
        if key in CELL_INT:
            cell[key] = int(cell[key])
        elif key in CELL_FLOAT:
            cell[key] = float(cell[key])
    return cell


def canonical_cell(partial: dict, config: dict) -> dict:
    """The cell a table entry names: completed from ``pretrain.cell_defaults``, view keys of
    view-free methods replaced by ``NO_VIEWS``, anchors checked against what the bag can give."""
    cell = complete_cell(partial, config["pretrain"]["cell_defaults"], what=f"cell {partial}")
    n_views, knn_k = config["views"]["n_views"], config["pretrain"]["knn_k"]
    if cell["method"] not in VIEW_METHODS:
        cell.update(NO_VIEWS)
    elif cell["target"] != "knn" and cell["anchors"] > n_views:
        raise CellError(
            f"cell {partial}: {cell['anchors']} anchors need at least {cell['anchors']} "
            f"generated views besides the target, but views.n_views = {n_views}"
        )
    elif cell["target"] == "knn" and cell["anchors"] > knn_k:
        raise CellError(f"cell {partial}: {cell['anchors']} anchors exceed pretrain.knn_k = {knn_k}")
    return cell


def cell_path(cell: dict) -> str:
    return os.path.join(*(f"{k}~{cell[k]}" for k in CELL_KEYS))


def model_path(cell: dict, seed: int) -> str:
    """``{model}`` path of a trained cell (under results/pretrain/ and results/eval/)."""
    return f"{cell_path(cell)}/seed~{seed}"


def random_init_model(arch: str, seed: int) -> str:
    return f"{RANDOM_INIT}/arch~{arch}/seed~{seed}"


def external_model(name: str) -> str:
    return f"{EXTERNAL}/{name}"


def parse_model_path(model: str) -> dict:
    """``method~cdgmae/.../seed~0`` -> dict; ``random-init/arch~X/seed~0`` -> kind random-init."""
    parts = model.strip("/").split("/")
    info: dict = {"model": model, "kind": "trained"}
    if parts[0] in (RANDOM_INIT, EXTERNAL):
        info["kind"] = parts[0]
        parts = parts[1:]
        if info["kind"] == EXTERNAL:
            info["name"] = parts[0] if parts else EXTERNAL
    for part in parts:
        if "~" in part:
            key, value = part.split("~", 1)
            if key in CELL_INT:
                value = int(value)
            elif key in CELL_FLOAT:
                value = float(value)
            info[key] = value
    return info
