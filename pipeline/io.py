"""Atomic writes and content digests.

Everything that writes a result goes through ``atomic_path`` so a killed job never leaves a
half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_HOST = socket.gethostname().replace(".", "-")  # no dots: they separate the name's fields


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same directory (same filesystem) so ``os.replace`` is atomic.
    ``suffix`` lets writers that infer the format from the extension (PIL, cv2) see the real one.
    Its name carries the host and PID of the writer, so the temporaries a killed writer left for the
    same path are removed by the next write (only those of dead processes on this host).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    prefix = f".{path.name}.{_HOST}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=(suffix or path.suffix) + ".tmp", dir=path.parent)
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


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete ``atomic_path`` temporaries of ``path`` whose writer (same host) is no longer alive."""
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(_HOST)}.*.tmp"):
        pid = tmp.name[len(f".{path.name}.{_HOST}.") :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv_atomic(df, path: str | os.PathLike, **kwargs) -> None:
    """Write a pandas DataFrame as CSV atomically (index off unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **kwargs)


def write_npz_atomic(path: str | os.PathLike, arrays: dict) -> None:
    """``np.savez`` under a temporary name, renamed onto ``path`` on success."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def folder_sha256(path: str | os.PathLike) -> str:
    """Digest of a folder's content: every file's relative path and SHA-256, in sorted order.

    Keys work on what a model folder holds (weights, configs), not on its path: weights replaced in
    place change it, a moved or copied folder does not."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def cached_sha256(paths, cache_path: str | os.PathLike) -> list[str]:
    """SHA-256 of each file, re-read only when its size or mtime changed since the digest recorded in
    ``cache_path`` (a JSON file, written atomically). Keys work on content, never on mtimes: a file
    rebuilt byte for byte gets a new mtime, is re-read, and keeps its digest."""
    cache_path = Path(cache_path)
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digests, fresh = [], {}
    for path in map(Path, paths):
        st = path.stat()
        key = str(path.resolve())
        known = cache.get(key)
        if known and known["size"] == st.st_size and known["mtime_ns"] == st.st_mtime_ns:
            digest = known["sha256"]
        else:
            digest = file_sha256(path)
        fresh[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        digests.append(digest)
    if fresh != {k: cache.get(k) for k in fresh}:
        write_text_atomic(cache_path, json.dumps({**cache, **fresh}, indent=1, sort_keys=True))
    return digests


def file_sha256(path: str | os.PathLike, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            if limit is not None and fh.tell() >= limit:
                break
    return h.hexdigest()
