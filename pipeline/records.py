"""Provenance records: what made an artefact, written beside it as JSON.

Every number the workflow reports says which code, software and hardware made it. A job that writes
an artefact (a checkpoint, a ``metrics.csv``, a bag of views, a table, an S-LDM folder) then writes
its record with ``write_record``: ``record_path(artefact)`` is ``<stem>.provenance.json`` in the
artefact's folder (``results/table4.csv`` -> ``results/table4.provenance.json``; a folder's record
is ``<name>.provenance.json`` beside it: ``results/sldm/model`` -> ``results/sldm/model.provenance.json``).

A record holds the artefact's SHA-256, the command and the digest of its code
(``pipeline.provenance.code_digest``), the git commit of the workflow (with the digests of modified
and untracked files when the tree is dirty), the versions of the libraries that compute numbers,
the CPU / GPU, the device and precision, the digest of the settings the job was given (the settings
too when small), and the digests of its inputs. Inputs that have records of their own (a checkpoint
behind a ``metrics.csv``, the bag behind a checkpoint) are merged flatly: their inputs join this
record's ``inputs``, and their ``environments`` (distinct {commit, dirty, software, hardware,
device, precision} combinations, each with the artefacts made in it) join this one's. So a table's
record lists every distinct environment that made any number in it.

Infrastructure: it reads and writes records, never a number. Cheap: it never imports torch (GPU
details are read only when the job already imported it).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from pipeline.cli import command_module
from pipeline.io import file_sha256, folder_sha256, recorded_digest, write_text_atomic
from pipeline.provenance import code_digest

RECORD_SUFFIX = ".provenance.json"
FORMAT_VERSION = 1
WORKFLOW_DIR = Path(__file__).resolve().parent.parent  # the package's parent: the workflow's folder
# the distributions whose versions can change a number (python itself is recorded too)
SOFTWARE = (
    "torch",
    "torchvision",
    "timm",
    "diffusers",
    "transformers",
    "snakemake",
    "numpy",
    "h5py",
    "opencv-python-headless",
    "scikit-image",
    "pandas",
)
ENVIRONMENT_KEYS = ("commit", "dirty", "dirty_digest", "software", "hardware", "device", "precision")
SMALL_CONFIG = 4096  # settings whose canonical JSON is shorter are stored in the record itself
FOLDER_CONTENT_LIMIT = 4 << 30  # folders up to 4 GiB are digested by content, larger ones by listing
DIRTY_FILE_LIMIT = 64 << 20  # dirty files larger than this are listed without a digest
DIRTY_FILES_MAX = 500


# ---------------------------------------------------------------------------------------------
# paths and digests


def record_path(artefact: str | os.PathLike) -> Path:
    """``<stem>.provenance.json`` beside ``artefact`` (a folder: ``<name>.provenance.json``)."""
    path = Path(artefact)
    stem = path.name if path.is_dir() or not path.suffix else path.stem
    return path.with_name(stem + RECORD_SUFFIX)


def _display(path: str | os.PathLike) -> str:
    """A path as the job was given it; an absolute one inside the working directory made relative."""
    p = Path(path)
    if p.is_absolute():
        try:
            return p.relative_to(Path.cwd()).as_posix()
        except ValueError:
            return p.as_posix()
    return p.as_posix()


def folder_digest(path: str | os.PathLike, limit: int = FOLDER_CONTENT_LIMIT) -> str:
    """``pipeline.io.folder_sha256`` of a folder up to ``limit`` bytes; a larger one (a real dataset
    root) by its listing, ``listing-sha256:<hex>`` of every file's relative path and size."""
    root = Path(path)
    files = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file())
    if sum(size for _, size in files) <= limit:
        return folder_sha256(root)
    h = hashlib.sha256("".join(f"{rel}\0{size}\n" for rel, size in files).encode())
    return "listing-sha256:" + h.hexdigest()


def artefact_digest(path: str | os.PathLike) -> str | None:
    """The recorded digest of a file (``<file>.sha256``) when there is one, else its SHA-256; a
    folder's ``folder_digest``; None when it does not exist."""
    p = Path(path)
    if p.is_dir():
        return folder_digest(p)
    if not p.is_file():
        return None
    return recorded_digest(p) or file_sha256(p)


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# code, software, hardware


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, timeout=60, env={**os.environ, "LC_ALL": "C"}
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"git {' '.join(args)} exited {proc.returncode}")
    return proc.stdout


def _status_paths(porcelain: str) -> list[str]:
    """Paths of ``git status --porcelain=v1 -z`` (a rename's new path; its old one is skipped)."""
    fields, paths, i = porcelain.split("\0"), [], 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC":  # rename / copy: the next field is the source path
            i += 1
    return paths


def code_state(root: str | os.PathLike | None = None) -> dict:
    """The git state of the workflow at ``root`` (default: the package's parent folder):
    ``commit`` (None outside a git checkout or without git, with a ``note``), ``dirty`` and, for a
    dirty tree, ``dirty_files`` = {path: SHA-256} of every modified or untracked file git reports
    (ignored files and anything under ``results/`` skipped; a deleted file has None)."""
    root = Path(root or WORKFLOW_DIR).resolve()
    try:
        commit = _git(root, "rev-parse", "HEAD").strip()
        top = Path(_git(root, "rev-parse", "--show-toplevel").strip())
        porcelain = _git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "note": "git is not installed"}
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        return {"commit": None, "dirty": None, "note": f"not a git checkout: {str(err).splitlines()[0][:200]}"}
    dirty: dict[str, str | None] = {}
    notes = []
    for rel in _status_paths(porcelain):
        path = top / rel
        try:
            inside = path.relative_to(root).as_posix()
        except ValueError:
            inside = None
        if inside is not None and (inside == "results" or inside.startswith("results/")):
            continue
        if len(dirty) >= DIRTY_FILES_MAX:
            notes.append(f"more than {DIRTY_FILES_MAX} dirty files: the rest are not listed")
            break
        if path.is_file() and path.stat().st_size > DIRTY_FILE_LIMIT:
            dirty[rel.rstrip("/")] = None
            notes.append(f"{rel}: larger than {DIRTY_FILE_LIMIT >> 20} MiB, not digested")
        else:
            dirty[rel.rstrip("/")] = file_sha256(path) if path.is_file() else None
    state = {"commit": commit, "dirty": bool(dirty)}
    if dirty:
        state["dirty_files"] = dict(sorted(dirty.items()))
    if notes:
        state["note"] = "; ".join(notes)
    return state


def software_versions() -> dict[str, str | None]:
    """Python's version and each of ``SOFTWARE``'s (None when not installed); imports nothing."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in SOFTWARE:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """CPU model and count; the GPUs, CUDA and cuDNN versions only when the job imported torch
    (None otherwise: reading them must not cost a torch import)."""
    info = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "gpus": None, "cuda": None, "cudnn": None}
    torch = sys.modules.get("torch")
    if torch is None:
        return info
    try:
        available = torch.cuda.is_available()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if available else []
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if available else None
    except Exception as err:  # a broken driver must not lose the record
        info["gpus"] = None
        info["note"] = f"GPU query failed: {err}"
    return info


# ---------------------------------------------------------------------------------------------
# records


def read_record(path: str | os.PathLike) -> dict | None:
    """A record, or None when it is missing or unreadable."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def environment_of(record: dict) -> dict:
    """The environment summary of a record's own job (no artefact list)."""
    code = record.get("code") or {}
    dirty_files = code.get("dirty_files")
    return {
        "commit": code.get("commit"),
        "dirty": code.get("dirty"),
        "dirty_digest": _sha(canonical_json(dirty_files)) if dirty_files else None,
        "software": record.get("software"),
        "hardware": record.get("hardware"),
        "device": record.get("device"),
        "precision": record.get("precision"),
    }


def merge_environments(*groups: Iterable[dict]) -> list[dict]:
    """Distinct environments (by the canonical JSON of ``ENVIRONMENT_KEYS``), in first-seen order,
    each with the union of the artefacts made in it."""
    merged: dict[str, dict] = {}
    for group in groups:
        for env in group:
            summary = {k: env.get(k) for k in ENVIRONMENT_KEYS}
            entry = merged.setdefault(canonical_json(summary), {**summary, "artefacts": []})
            for artefact in env.get("artefacts", []):
                if artefact not in entry["artefacts"]:
                    entry["artefacts"].append(artefact)
    return list(merged.values())


def build_record(
    artefact: str | os.PathLike,
    *,
    kind: str,
    command: tuple[str, str] | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
    settings=None,
    device=None,
    precision: str | None = None,
    root: str | os.PathLike | None = None,
) -> dict:
    """The record of ``artefact`` (already written). ``command``: (stage, command) that made it;
    ``inputs``: the files / folders it read (None entries skipped); ``settings``: the config slice
    it was given; ``device`` / ``precision``: what it computed on and in; ``root``: the workflow
    folder whose git state is recorded (default: this package's parent)."""
    name = _display(artefact)
    record: dict = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "artefact": name,
        "sha256": artefact_digest(artefact),
        "created_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(command) if command else None,
        "code": code_state(root),
        "code_digest": _command_digest(command),
        "software": software_versions(),
        "hardware": hardware(),
        "device": None if device is None else str(device),
        "precision": precision,
    }
    if settings is not None:
        text = canonical_json(settings)
        record["config_digest"] = _sha(text)
        if len(text) < SMALL_CONFIG:
            record["config"] = json.loads(text)
    else:
        record["config_digest"] = None
    own = {_display(p): _input_digest(p) for p in inputs if p is not None and str(p) != ""}
    merged, upstream, stale, conflicts = dict(own), [], [], {}
    environments = [[{**environment_of(record), "artefacts": [name]}]]
    for path, digest in own.items():
        up = read_record(record_path(path))
        if up is None:
            continue
        if up.get("sha256") != digest:  # the record describes other bytes than those read
            stale.append(_display(record_path(path)))
            continue
        upstream.append(_display(record_path(path)))
        for p, d in (up.get("inputs") or {}).items():
            if p not in merged:
                merged[p] = d
            elif merged[p] != d:
                conflicts.setdefault(p, [merged[p]])
                if d not in conflicts[p]:
                    conflicts[p].append(d)
        environments.append(up.get("environments") or [{**environment_of(up), "artefacts": [up.get("artefact", path)]}])
    record["inputs"] = merged
    record["upstream"] = upstream
    if stale:
        record["stale_upstream"] = stale
    if conflicts:
        record["input_conflicts"] = conflicts
    record["environments"] = merge_environments(*environments)
    return record


def _input_digest(path) -> str | None:
    """``artefact_digest``, None where the input cannot be read (the record is still written)."""
    try:
        return artefact_digest(path)
    except OSError:
        return None


def _command_digest(command: tuple[str, str] | None) -> str | None:
    if not command:
        return None
    try:
        return code_digest(command_module(*command))
    except (KeyError, ModuleNotFoundError, SyntaxError, OSError):
        return None


def write_record(artefact: str | os.PathLike, **kwargs) -> Path:
    """Write ``build_record(artefact, **kwargs)`` atomically to ``record_path(artefact)``."""
    path = record_path(artefact)
    write_text_atomic(path, json.dumps(build_record(artefact, **kwargs), indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# one-line descriptions (summary.md, the HTML report)


def describe_environment(env: dict) -> str:
    """``torch 2.5.1 · timm 1.0.9 · diffusers 0.31.0 · cuda fp32 · GPU NVIDIA H100`` (what ran)."""
    sw = env.get("software") or {}
    hw = env.get("hardware") or {}
    parts = [f"{k} {sw.get(k) or '–'}" for k in ("torch", "timm", "diffusers")]
    parts.append(" ".join(str(x) for x in (env.get("device"), env.get("precision")) if x) or "no device")
    gpus = hw.get("gpus")
    parts.append(f"GPU {', '.join(sorted(set(gpus)))}" if gpus else "no GPU")
    return " · ".join(parts)


def describe_code(record: dict) -> str:
    """``commit abc1234 (dirty: 2 files)`` / ``commit unknown (not a git checkout)``."""
    code = record.get("code") or {}
    if not code.get("commit"):
        return f"commit unknown ({(code.get('note') or 'no git information').split(':')[0]})"
    dirty = f" (dirty: {len(code.get('dirty_files') or {})} files)" if code.get("dirty") else ""
    return f"commit {code['commit'][:12]}{dirty}"


def describe_record(record: dict) -> str:
    """One line: code, distinct environments, number of inputs."""
    envs = {describe_environment(e) for e in record.get("environments") or []}
    return (
        f"{describe_code(record)}; {len(envs)} environment(s): {' | '.join(sorted(envs))}; "
        f"{len(record.get('inputs') or {})} input artefacts"
    )
