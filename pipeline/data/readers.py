"""Readers for the official on-disk layouts (ImageNet folder, frame-folder videos, DAVIS-2017,
VIP, JHMDB) and the reference val lists (their writer is ``pipeline.data.vallists``).

The same readers serve the embedded synthetic datasets (``pipeline.data.synthetic``) and real data
roots from config. A missing or malformed root raises ``DatasetError`` naming the path and the
expected layout. Frames are read with OpenCV and converted BGR → RGB as the reference propagation
code does; annotations are read with PIL as integer ids (palette indices for DAVIS, class ids for
VIP), as the official DAVIS toolkit does.

Layouts (see docs/architecture.md and spec propagation-eval.md §3)::

    imagenet  <root>/<split>/<class>/<name>.JPEG
    videos    <root>/<video>/<frame>.jpg
    davis     <root>/JPEGImages/480p/<seq>/00000.jpg, <root>/Annotations/480p/<seq>/00000.png,
              <root>/ImageSets/2017/<split>.txt
    vip       <root>/Images/videos<N>/<frame>.jpg, <root>/Annotations/Category_ids/videos<N>/<frame>.png
    jhmdb     <root>/Rename_Images/<class>/<video>/00001.png,
              <root>/joint_positions/<class>/<video>/joint_positions.mat (pos_img 2x15xT, 1-based)
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.layouts import KINDS, LAYOUTS, VALLIST_KINDS, DatasetError, layout_error, require_dir  # noqa: F401  (re-exported: the readers' API)

LOG = logging.getLogger("cdgmae.datasets")

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
VIDEO_FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")

# The 15 JHMDB joints in the order of pos_img's second axis (puppet joint order).
JHMDB_JOINTS = (
    "neck",
    "belly",
    "face",
    "right_shoulder",
    "left_shoulder",
    "right_hip",
    "left_hip",
    "right_elbow",
    "left_elbow",
    "right_knee",
    "left_knee",
    "right_wrist",
    "left_wrist",
    "right_ankle",
    "left_ankle",
)

# VIP / CIHP human-parsing classes; id = position (0 = background).
VIP_CLASSES = (
    "background",
    "hat",
    "hair",
    "glove",
    "sunglasses",
    "upper_clothes",
    "dress",
    "coat",
    "socks",
    "pants",
    "jumpsuits",
    "scarf",
    "skirt",
    "face",
    "left_arm",
    "right_arm",
    "left_leg",
    "right_leg",
    "left_shoe",
    "right_shoe",
)


def _natural_key(path: Path):
    """Sort integer stems as integers (VIP: 1, 2, 10), anything else lexicographically."""
    stem = path.stem
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def _list_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")),
        key=_natural_key,
    )


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# single-file readers


JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"  # start / end of image markers (EOI may precede a trailer)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """HxWx3 uint8 RGB, decoded with OpenCV (BGR → RGB) like the reference propagation code.

    A JPEG without its end-of-image marker is an error: OpenCV would fill the missing rows with grey
    and go on, while PIL (the other image readers) refuses it, so the bad-image policy would differ
    by reader."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        data = np.zeros(0, np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise DatasetError(f"cannot read image (missing or corrupt): {path}")
    if data[:2].tobytes() == JPEG_SOI and JPEG_EOI not in data[-4096:].tobytes():
        raise DatasetError(f"truncated JPEG (no end-of-image marker): {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)  # in place: same values, no second copy


def read_id_png(path: str | os.PathLike) -> np.ndarray:
    """HxW uint8 ids of an indexed ("P") or grey ("L") PNG, as the DAVIS toolkit reads them."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(f"annotation must be an indexed (P) or grey (L) PNG, got mode {im.mode}: {path}")
            return np.array(im, dtype=np.uint8)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"cannot read annotation (missing or corrupt): {path} ({err})") from err


# ---------------------------------------------------------------------------------------------
# ImageNet folder and frame-folder videos


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # "<class>/<stem>"
    path: Path
    label: int  # index of the class folder in sorted order


@dataclass(frozen=True)
class VideoRecord:
    name: str
    frames: list[Path] = field(hash=False)


def list_imagenet(root: str | os.PathLike, split: str = "train") -> list[ImageRecord]:
    """Every image under ``<root>/<split>/<class>/``, sorted by ``image_id``.

    The position of an image in this list is its global index (used by the view shards).
    """
    root = Path(root)
    split_dir = require_dir("imagenet", root / split, f"'{split}' split")
    classes = _subdirs(split_dir)
    if not classes:
        raise layout_error("imagenet", split_dir, "no class folders in")
    records = []
    for label, cls_dir in enumerate(classes):
        for p in cls_dir.iterdir():
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                records.append(ImageRecord(f"{cls_dir.name}/{p.stem}", p, label))
    if not records:
        raise layout_error("imagenet", split_dir, "no images (.JPEG/.jpg/.png) in")
    records.sort(key=lambda r: r.image_id)
    return records


def list_videos(root: str | os.PathLike) -> list[VideoRecord]:
    """Every frame folder under ``root`` (sorted by name; frames sorted, integer stems as ints).

    Empty folders are skipped with a warning (a partly extracted Kinetics is common); a root with
    no video at all is an error.
    """
    root = Path(root)
    require_dir("videos", root, "root")
    videos = []
    for d in _subdirs(root):
        frames = _list_files(d, VIDEO_FRAME_SUFFIXES)
        if not frames:
            LOG.warning("skipping video folder without frames: %s", d)
            continue
        videos.append(VideoRecord(d.name, frames))
    if not videos:
        raise layout_error("videos", root, "no video folder with frames in")
    return videos


# ---------------------------------------------------------------------------------------------
# DAVIS-2017


class _LabelledVideos:
    """Frame folders with a parallel folder of id PNGs (DAVIS, VIP): indexing and readers."""

    kind = ""
    image_dir: Path
    label_dir: Path

    def _index(self, names: Sequence[str], unit: str) -> None:
        self._frames: dict[str, list[Path]] = {}
        self._annotations: dict[str, list[Path]] = {}
        for name in names:
            frames = _list_files(require_dir(self.kind, self.image_dir / name, unit), (".jpg",))
            labels = _list_files(require_dir(self.kind, self.label_dir / name, "annotation"), (".png",))
            if not frames:
                raise layout_error(self.kind, self.image_dir / name, f"no .jpg frames in {unit}")
            if not labels:
                raise layout_error(self.kind, self.label_dir / name, f"no .png annotations in {unit}")
            if labels[0].stem != frames[0].stem:
                raise layout_error(
                    self.kind, self.label_dir / name, f"first frame {frames[0].name} has no annotation in"
                )
            if len(labels) != len(frames):
                LOG.warning("%s %s: %d frames but %d annotations", self.kind, name, len(frames), len(labels))
            self._frames[name], self._annotations[name] = frames, labels

    def __len__(self) -> int:
        return len(self._frames)

    def frames(self, name: str) -> list[Path]:
        return self._frames[name]

    def annotations(self, name: str) -> list[Path]:
        return self._annotations[name]

    @staticmethod
    def read_frame(path) -> np.ndarray:
        return read_rgb(path)

    @staticmethod
    def read_annotation(path) -> np.ndarray:
        return read_id_png(path)


class DavisDataset(_LabelledVideos):
    """DAVIS-2017 semi-supervised layout (also DAVIS_480_880 copies).

    ``sequences`` (default: ``ImageSets/2017/<split>.txt`` in file order) keeps the order given;
    the reference matches results to sequences by position, so this order matters.
    """

    kind = "davis"

    def __init__(self, root: str | os.PathLike, split: str = "val", sequences: Iterable[str] | None = None):
        self.root = Path(root)
        require_dir("davis", self.root, "root")
        self.image_dir = require_dir("davis", self.root / "JPEGImages" / "480p", "JPEGImages/480p")
        self.label_dir = require_dir("davis", self.root / "Annotations" / "480p", "Annotations/480p")
        if sequences is None:
            split_file = self.root / "ImageSets" / "2017" / f"{split}.txt"
            if not split_file.is_file():
                raise layout_error("davis", split_file, "missing split file")
            sequences = [s.strip() for s in split_file.read_text().splitlines() if s.strip()]
            if not sequences:
                raise layout_error("davis", split_file, "empty split file")
        self.sequences = list(sequences)
        self._index(self.sequences, "sequence")

    def num_objects(self, seq: str) -> int:
        """Max object id in the first annotation, 255 (void) ignored — as the official toolkit."""
        ids = self.read_annotation(self._annotations[seq][0])
        ids = np.where(ids == 255, 0, ids)
        return int(ids.max())


# ---------------------------------------------------------------------------------------------
# VIP


def _vip_number(name: str) -> int:
    m = re.fullmatch(r"videos(\d+)", name)
    return int(m.group(1)) if m else sys.maxsize


class VipDataset(_LabelledVideos):
    """VIP layout; ``videos`` defaults to every ``videos<N>`` folder sorted by N."""

    kind = "vip"

    def __init__(self, root: str | os.PathLike, videos: Iterable[str] | None = None):
        self.root = Path(root)
        require_dir("vip", self.root, "root")
        self.image_dir = require_dir("vip", self.root / "Images", "Images")
        self.label_dir = require_dir("vip", self.root / "Annotations" / "Category_ids", "Annotations/Category_ids")
        if videos is None:
            videos = sorted((d.name for d in _subdirs(self.image_dir)), key=lambda n: (_vip_number(n), n))
            if not videos:
                raise layout_error("vip", self.image_dir, "no videos<N> folders in")
        self.videos = list(videos)
        self._index(self.videos, "video")


# ---------------------------------------------------------------------------------------------
# JHMDB


def read_pos_img(path: str | os.PathLike) -> np.ndarray:
    """``pos_img`` of a JHMDB ``joint_positions.mat``: (2, 15, T) float64, 1-based pixels."""
    import scipy.io  # noqa: PLC0415  (only JHMDB's joints need it: 0.3 s of imports for the other readers)

    try:
        mat = scipy.io.loadmat(str(path))
    except (FileNotFoundError, OSError, ValueError, TypeError) as err:
        raise DatasetError(f"cannot read joint positions (missing or corrupt): {path} ({err})") from err
    if "pos_img" not in mat:
        raise DatasetError(f"no 'pos_img' variable in {path}")
    pos = np.asarray(mat["pos_img"], dtype=np.float64)
    if pos.ndim != 3 or pos.shape[:2] != (2, len(JHMDB_JOINTS)):
        raise DatasetError(f"pos_img must have shape (2, 15, T), got {pos.shape}: {path}")
    return pos


class JhmdbDataset:
    """JHMDB layout; ``videos`` are ``"<class>/<video>"`` names.

    ``split_list``: None (every video having both frames and joints, sorted), a sequence of
    ``"<class>/<video>"`` names, or a path to a val list in the reference (label-first) format.
    """

    kind = "jhmdb"

    def __init__(self, root: str | os.PathLike, split_list=None):
        self.root = Path(root)
        require_dir("jhmdb", self.root, "root")
        self.image_dir = require_dir("jhmdb", self.root / "Rename_Images", "Rename_Images")
        self.joint_dir = require_dir("jhmdb", self.root / "joint_positions", "joint_positions")
        if split_list is None:
            videos = [
                f"{c.name}/{v.name}"
                for c in _subdirs(self.image_dir)
                for v in _subdirs(c)
                if (self.joint_dir / c.name / v.name / "joint_positions.mat").is_file()
            ]
            if not videos:
                raise layout_error("jhmdb", self.root, "no video with both frames and joint_positions.mat in")
        elif isinstance(split_list, (str, os.PathLike)):
            videos = [e.name for e in read_vallist("jhmdb", split_list)]
        else:
            videos = list(split_list)
        self.videos = videos
        self._frames: dict[str, list[Path]] = {}
        for v in self.videos:
            # the reference lists only .png frames
            frames = _list_files(require_dir("jhmdb", self.image_dir / v, "video"), (".png",))
            if not frames:
                raise layout_error("jhmdb", self.image_dir / v, "no .png frames in video")
            mat = self.joints_path(v)
            if not mat.is_file():
                raise layout_error("jhmdb", mat, "missing joint positions")
            self._frames[v] = frames

    def __len__(self) -> int:
        return len(self.videos)

    def frames(self, video: str) -> list[Path]:
        return self._frames[video]

    def joints_path(self, video: str) -> Path:
        return self.joint_dir / video / "joint_positions.mat"

    @staticmethod
    def read_frame(path) -> np.ndarray:
        return read_rgb(path)

    def read_joints(self, video: str) -> np.ndarray:
        return read_pos_img(self.joints_path(video))


def jhmdb_split_videos(splits_dir: str | os.PathLike, split: int = 1, subset: str = "test") -> list[str]:
    """``"<class>/<video>"`` names of one official JHMDB split (``splits/<class>_test_split<k>.txt``,
    lines ``<video>.avi <1|2>``, 1 = train, 2 = test), classes in sorted order.

    The reference evaluates split 1 test (268 videos); its list orders classes differently, which
    does not change PCK (distances are pooled over all videos).
    """
    splits_dir = Path(splits_dir)
    files = sorted(splits_dir.glob(f"*_test_split{split}.txt"))
    if not files:
        raise DatasetError(f"no JHMDB split files *_test_split{split}.txt in {splits_dir}")
    flag = {"train": "1", "test": "2"}[subset]
    names = []
    for f in files:
        cls = f.name[: -len(f"_test_split{split}.txt")]
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DatasetError(f"{f}:{lineno}: expected '<video>.avi <1|2>', got {line!r}")
            if fields[1] == flag:
                names.append(f"{cls}/{Path(fields[0]).stem}")
    return names


# ---------------------------------------------------------------------------------------------
# val lists (reference formats, spec §3): the parser


@dataclass(frozen=True)
class ValEntry:
    """One line of a val list, in a fixed field order whatever the file's order."""

    name: str  # DAVIS sequence, VIP "videos<N>", JHMDB "<class>/<video>"
    frames: Path  # frame folder
    labels: Path  # DAVIS/VIP annotation folder, JHMDB joint_positions.mat


def _resolve(entry: str, list_dir: Path) -> Path:
    """Absolute paths as they are; relative ones against the list's folder, else against the
    working directory (reference lists such as ``datasets/VIP/...`` are relative to the repo)."""
    p = Path(entry)
    if p.is_absolute():
        return p
    in_list_dir = list_dir / p
    if in_list_dir.exists() or not p.exists():
        return Path(os.path.normpath(in_list_dir))
    return p


def read_vallist(kind: str, path: str | os.PathLike) -> list[ValEntry]:
    """Parse a reference val list; each line must have two fields (JHMDB: label first)."""
    if kind not in VALLIST_KINDS:
        raise ValueError(f"val list kind must be one of {VALLIST_KINDS}, got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{kind} val list not found: {path}")
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DatasetError(f"{path}:{lineno}: expected two space-separated fields, got {line!r}")
        if kind == "jhmdb":
            labels, frames = (_resolve(f, path.parent) for f in fields)
            if labels.name != "joint_positions.mat":
                raise DatasetError(
                    f"{path}:{lineno}: JHMDB lists are label first "
                    f"(<...>/joint_positions.mat <frames dir>), got {line!r}"
                )
            name = f"{frames.parent.name}/{frames.name}"
        else:
            frames, labels = (_resolve(f, path.parent) for f in fields)
            name = frames.name
        entries.append(ValEntry(name, frames, labels))
    if not entries:
        raise DatasetError(f"{kind} val list is empty: {path}")
    return entries
