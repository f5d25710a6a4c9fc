"""The official dataset layouts, and a shallow check of a root against its layout.

Standard library only: ``rules/common.smk`` runs ``check_layout`` on every configured root when the
workflow is parsed, so a wrong root fails at once, naming the path, instead of when the job that
reads it runs (a few ``stat`` calls, never a listing of the images).
"""

from __future__ import annotations

import os
from pathlib import Path

LAYOUTS = {
    "imagenet": "<root>/<split>/<class>/<name>.JPEG",
    "videos": "<root>/<video>/<frame>.jpg (one folder of frames per video)",
    "davis": (
        "<root>/JPEGImages/480p/<seq>/00000.jpg, <root>/Annotations/480p/<seq>/00000.png "
        "(palette PNG of object ids), <root>/ImageSets/2017/val.txt"
    ),
    "vip": (
        "<root>/Images/videos<N>/<frame>.jpg, <root>/Annotations/Category_ids/videos<N>/<frame>.png (class ids 0-19)"
    ),
    "jhmdb": (
        "<root>/Rename_Images/<class>/<video>/00001.png, "
        "<root>/joint_positions/<class>/<video>/joint_positions.mat (pos_img 2x15xT)"
    ),
}
KINDS = tuple(LAYOUTS)
VALLIST_KINDS = ("davis", "vip", "jhmdb")

# the folders a root of each kind must hold, and (last) the one that must hold at least one folder
REQUIRED_DIRS = {
    "imagenet": ("train",),
    "videos": (".",),
    "davis": ("JPEGImages/480p", "Annotations/480p", "ImageSets/2017", "JPEGImages/480p"),
    "vip": ("Images", "Annotations/Category_ids", "Images"),
    "jhmdb": ("Rename_Images", "joint_positions", "Rename_Images"),
}


class DatasetError(RuntimeError):
    """A dataset root or file is missing or malformed; the message names the path."""


def layout_error(kind: str, path: Path | str, problem: str) -> DatasetError:
    return DatasetError(f"{kind} dataset: {problem}: {path}\n  expected layout: {LAYOUTS[kind]}")


def require_dir(kind: str, path: Path, what: str) -> Path:
    if not path.is_dir():
        raise layout_error(kind, path, f"missing {what} folder")
    return path


def check_layout(kind: str, root: str | os.PathLike) -> None:
    """Raise ``DatasetError`` unless ``root`` has the folders of its kind's layout (shallow)."""
    root = Path(root)
    require_dir(kind, root, "root")
    *folders, populated = REQUIRED_DIRS[kind]
    for rel in folders:
        require_dir(kind, root / rel, rel)
    top = require_dir(kind, root / populated, populated if populated != "." else "root")
    if not any(p.is_dir() and not p.name.startswith(".") for p in top.iterdir()):
        raise layout_error(kind, top, "no sub-folders (classes, videos or sequences)")
