"""Atomic writes and content digests.

Everything that writes a result goes through ``atomic_path`` so a killed job never leaves a
half-written file under its final name. Artefacts that later stages read back (view parts, shards,
the bag, checkpoints, resume states) also get a recorded content digest: a ``<name>.sha256`` file
beside them in ``sha256sum`` format (``sha256sum -c`` checks it too), verified on every read by
``verify_digest`` so flipped bytes are an error naming the file, never a silently wrong result.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_HOST = socket.gethostname().replace(".", "-")  # no dots: they separate the name's fields


DIGEST_SUFFIX = ".sha256"
# the folder (relative to the working directory, as every rule writes it) holding what the workflow
# made: a file there must carry its recorded digest; a file elsewhere is a user's external input
RESULTS_DIR = "results"
# the marker Snakemake writes into a finished directory() output (not part of the folder's content)
SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"


class IntegrityError(RuntimeError):
    """A file's content does not match its recorded digest (or has none); the message names it."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", digest: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same directory (same filesystem) so ``os.replace`` is atomic.
    ``suffix`` lets writers that infer the format from the extension (PIL, cv2) see the real one.
    ``digest=True`` also records the content digest (``record_digest``) once the file is in place.
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
        if digest:  # the record first: a kill between the two leaves the old file (or none) beside
            # the new digest, which verify_digest reports; never a new file without its record
            write_digest_record(path, file_sha256(tmp))
        os.replace(tmp, path)
    except Exception as err:
        # a full disk surfaces as the writer's own error (h5py, torch, PIL), naming the temporary
        # or nothing: name the artefact being written
        if _disk_full(err, path.parent):
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path} ({err})") from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether ``err`` (or its cause) is a full disk or quota, or the folder has no room left."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


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


FOLDER_DIGESTS = "digests.sha256"  # a model folder's per-file digest manifest, inside the folder


def write_folder_digests(folder: str | os.PathLike) -> Path:
    """Record the SHA-256 of every file of ``folder`` in ``<folder>/digests.sha256`` (``sha256sum``
    format, relative paths, sorted; ``cd folder && sha256sum -c digests.sha256`` checks it too).
    Written atomically and last: a folder killed before it has no manifest."""
    root = Path(folder)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in (FOLDER_DIGESTS, SNAKEMAKE_TIMESTAMP)
    )
    text = "".join(f"{file_sha256(f)}  {f.relative_to(root).as_posix()}\n" for f in files)
    write_text_atomic(root / FOLDER_DIGESTS, text)
    return root / FOLDER_DIGESTS


def read_folder_digests(folder: str | os.PathLike) -> dict[str, str] | None:
    """{relative path: SHA-256} of a folder's manifest; None without one; ``IntegrityError`` when
    it cannot be parsed."""
    path = Path(folder) / FOLDER_DIGESTS
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{path}: unreadable digest manifest ({err})") from None
    digests = {}
    for n, line in enumerate(text.splitlines(), 1):
        sha, sep, rel = line.partition("  ")
        if not sep or len(sha) != 64 or not rel or any(c not in "0123456789abcdef" for c in sha):
            raise IntegrityError(f"{path}: line {n} is not '<sha256>  <file>'; the manifest is corrupt")
        digests[rel] = sha
    return digests


def verify_folder_digests(folder: str | os.PathLike, external: bool | None = None, log=None) -> bool:
    """Check every file of ``folder`` against its ``digests.sha256``; True when verified.

    A file whose content differs from its recorded digest, a listed file that is missing and a
    file the manifest does not list are ``IntegrityError``s naming the file. A folder without a
    manifest is an ``IntegrityError`` when the workflow made it (under ``results/``; ``external``
    False); an external folder (a user's) without one is read with a logged note (``log``) and
    False is returned."""
    root = Path(folder)
    digests = read_folder_digests(root)
    if external is None:
        external = is_external(root)
    if digests is None:
        if not external:
            raise IntegrityError(
                f"{root}: no digest manifest ({FOLDER_DIGESTS} missing); every folder this workflow makes "
                f"under {RESULTS_DIR}/ has one, so this one cannot be trusted: delete it (python -m pipeline.scrub "
                "--remove) and run the workflow again to rebuild it"
            )
        if log is not None:
            log.info("%s: external folder without %s: its files are read unverified", root, FOLDER_DIGESTS)
        return False
    for rel, expected in digests.items():
        path = root / rel
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {root / FOLDER_DIGESTS} but missing; the folder is incomplete")
        actual = file_sha256(path)
        if actual != expected:
            raise IntegrityError(
                f"{path}: content digest {actual[:16]}… does not match the recorded {expected[:16]}… "
                f"({root / FOLDER_DIGESTS}); the file is corrupt or was changed after the folder was written"
            )
    # Snakemake marks a finished directory() output with its own timestamp file: not content
    listed = {*digests, FOLDER_DIGESTS, SNAKEMAKE_TIMESTAMP}
    extra = sorted(
        rel for p in root.rglob("*") if p.is_file() and (rel := p.relative_to(root).as_posix()) not in listed
    )
    if extra:
        raise IntegrityError(
            f"{root / extra[0]}: not listed in {root / FOLDER_DIGESTS}"
            + (f" (nor {len(extra) - 1} more file(s))" if len(extra) > 1 else "")
            + "; the folder was changed after it was written"
        )
    return True


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


def digest_path(path: str | os.PathLike) -> Path:
    """Where the recorded content digest of ``path`` lives: ``<name>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def record_digest(path: str | os.PathLike) -> str:
    """Record the SHA-256 of ``path`` beside it (atomically) and return it."""
    path = Path(path)
    sha = file_sha256(path)
    write_digest_record(path, sha)
    return sha


def write_digest_record(path: str | os.PathLike, sha: str) -> None:
    """Record ``sha`` as the digest of ``path`` (``sha256sum`` format, atomically), whether or not
    ``path`` is in place yet."""
    path = Path(path)
    write_text_atomic(digest_path(path), f"{sha}  {path.name}\n")


def recorded_digest(path: str | os.PathLike) -> str | None:
    """The digest recorded for ``path``, or None when there is no (readable) record."""
    try:
        text = digest_path(path).read_text().split()
    except OSError:
        return None
    return text[0] if text and len(text[0]) == 64 else None


def verify_digest(path: str | os.PathLike, required: bool = True) -> str | None:
    """Check ``path`` against its recorded digest and return the digest.

    A mismatch raises ``IntegrityError`` naming the file. A file without a record raises too when
    ``required`` (our own artefacts always have one); otherwise (a checkpoint another tool wrote)
    it returns None and the caller reads the file unverified."""
    path = Path(path)
    expected = recorded_digest(path)
    if expected is None:
        if required:
            raise IntegrityError(f"{path}: no recorded content digest ({digest_path(path).name} missing or unreadable)")
        return None
    actual = file_sha256(path)
    if actual != expected:
        raise IntegrityError(
            f"{path}: content digest {actual[:16]}… does not match the recorded {expected[:16]}… "
            f"({digest_path(path).name}); the file is corrupt or was changed after it was written"
        )
    return actual


def is_external(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies outside the workflow's ``results/`` (a file a user configured)."""
    try:
        Path(path).resolve().relative_to((Path.cwd() / RESULTS_DIR).resolve())
    except ValueError:
        return True
    return False


def check_zip_records(path: str | os.PathLike) -> bool:
    """Check every record of a zip archive (torch's checkpoint format) against its CRC-32; False
    when ``path`` is not a zip archive (nothing to check), ``IntegrityError`` naming it when damaged."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise IntegrityError(f"{path}: damaged zip archive ({err})") from None
    if bad is not None:
        raise IntegrityError(f"{path}: zip record {bad!r} fails its CRC-32 check; the file is corrupt")
    return True


def verify_artefact(path: str | os.PathLike, external: bool | None = None) -> str | None:
    """Verify a file before it is read; return its digest, or None for an external file without one.

    A file the workflow made (``external`` False; by default: inside ``results/``) must carry its
    recorded digest: without it (copied without its ``.sha256``, say) it is an ``IntegrityError``,
    never a silent unverified read. An external file (a user's checkpoint) is checked against its
    digest when one is recorded, else by what can be checked without one: its zip records' CRCs."""
    path = Path(path)
    if external is None:
        external = is_external(path)
    if recorded_digest(path) is not None:
        return verify_digest(path)
    if not external:
        raise IntegrityError(
            f"{path}: no recorded content digest ({digest_path(path).name} missing or unreadable); "
            f"every file this workflow makes under {RESULTS_DIR}/ has one, so this one cannot be "
            "trusted: delete it and run the workflow again to rebuild it"
        )
    check_zip_records(path)
    return None
