"""Small shared helpers: atomic writes, logging, seeding, progress bars, JSON settings.

Everything that writes a result goes through ``atomic_path`` so a killed job never leaves a
half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

LOG = logging.getLogger("cdgmae")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same directory (same filesystem) so ``os.replace`` is atomic.
    ``suffix`` lets writers that infer the format from the extension (PIL, cv2) see the real one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(suffix or path.suffix) + ".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are shared files
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # make the bytes durable before the rename
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv_atomic(df, path: str | os.PathLike, **kwargs) -> None:
    """Write a pandas DataFrame as CSV atomically (index off unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **kwargs)


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> logging.Logger:
    """Log to stderr (captured by Snakemake's ``log:``) and optionally to a file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    return LOG


def progress(iterable: Iterable | None = None, **kwargs):
    """tqdm progress bar on stderr; prints periodic lines rather than redraws when not a TTY."""
    from tqdm import tqdm

    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 10.0)
    return tqdm(iterable, **kwargs)


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends only on ``keys`` (ints or strings), via NumPy's SeedSequence.

    Strings are hashed with SHA-256 so the result is stable across processes and Python versions
    (unlike ``hash()``).
    """
    entropy = []
    for key in keys:
        if isinstance(key, str):
            entropy.append(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        else:
            entropy.append(int(key))
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               & ((1 << 63) - 1))


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> None:
    """Bound intra-op threads to what the Snakemake job was given."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def resolve_device(device: str | None = None) -> str:
    """The requested torch device, else ``cuda`` when one is visible, else ``cpu``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_settings(value: str | None) -> dict:
    """Parse a ``--settings`` argument: a JSON string, or a path to a JSON/YAML file, or None."""
    if value is None or value == "":
        return {}
    text = value
    if not value.lstrip().startswith("{"):
        p = Path(value)
        if not p.exists():
            raise FileNotFoundError(f"--settings: {value} is neither JSON nor an existing file")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
    return json.loads(text)


def file_sha256(path: str | os.PathLike, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            if limit is not None and fh.tell() >= limit:
                break
    return h.hexdigest()
